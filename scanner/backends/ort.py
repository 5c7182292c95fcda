"""ONNX Runtime sessions on the CPU, for the onnxruntime backend and for the export's parity check
(scanner.backends.export.verify_onnx): one place that says how a session is set up, which both import.
"""

from __future__ import annotations

import torch

from scanner.errors import ScannerError

INSTALL_HINT = "pip install 'glff-scanner[onnx]'"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ScannerError(f"the onnxruntime backend needs the onnxruntime package, which is not installed; "
                           f"run: {INSTALL_HINT} (or use --backend torch)") from None
    return onnxruntime


def ort_session(path, threads: int | None = None):
    """A CPU InferenceSession: `threads` intra-op threads (default: torch's count), one inter-op thread
    (the graphs are one chain of convolutions: nothing to run side by side), all graph optimisations."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
