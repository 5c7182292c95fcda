"""Checkpoint -> ONNX -> TensorRT engines, by a recipe (docs/design.md, "Backends, export and kernels").

    python build_engine.py --model WEIGHTS.safetensors --recipe engines/lite0_fp16.yaml --out engines/

writes OUT/NAME.global.engine and OUT/NAME.local.engine, each with its provenance sidecar
(X.engine.json). Without --onnx the model is exported first, to OUT/onnx-<weights sha>/.
User errors print one line and exit with code 2. The library is scanner.backends.engines.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build_engine.py",
        description="Compile the detector into TensorRT engines (needs a CUDA GPU and TensorRT 10).",
    )
    parser.add_argument("--model", required=True, help="detector weights (.safetensors)")
    parser.add_argument("--recipe", required=True, help="engine recipe, e.g. engines/lite0_fp16.yaml")
    parser.add_argument("--out", default="engines/", help="folder for the engines and sidecars (default: engines/)")
    parser.add_argument("--onnx", help="folder of an existing export (global.onnx, local_fuser.onnx, export.json); "
                        "default: export the model now")
    return parser


def _export(model: str, out: Path) -> Path:
    """Export the model's two graphs next to the engines, in a folder named by the weights."""
    from scanner.errors import ScannerError
    from scanner.model.weights import load_detector

    try:
        from scanner.backends.export import export_onnx
    except ImportError:
        raise ScannerError("the ONNX exporter (scanner.backends.export) is not available; pass --onnx DIR with an export") from None
    detector, info = load_detector(model)  # float32, on the CPU: the export's reference
    folder = out / f"onnx-{info.sha256[:12]}"
    export_onnx(detector, info, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from scanner.backends.engines import build_engines, load_recipe
    from scanner.errors import ScannerError

    try:
        recipe = load_recipe(args.recipe)
        out = Path(args.out)
        onnx_dir = Path(args.onnx) if args.onnx else _export(args.model, out)
        paths = build_engines(onnx_dir, recipe, out, weights=args.model)
    except ScannerError as exc:
        print(f"build_engine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for graph, path in paths.items():
        print(f"{graph}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
