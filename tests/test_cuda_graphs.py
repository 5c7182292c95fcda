"""CUDA graphs for the torch CUDA runner (scanner.backends.cuda_graphs).

On the CPU, `capture` is replaced by an eager stand-in with a graph's semantics (the outputs are fixed
tensors that every replay overwrites, computed from the fixed input tensors), which checks the buffer
handling and the runner's wiring. On a GPU (`pytest -m gpu`) the real graphs are compared with eager runs.
"""

from __future__ import annotations

import pytest
import torch

from scanner.backends import cuda_graphs
from scanner.backends.cuda_graphs import Captured, GraphedCall
from scanner.backends.torch_cuda import TorchCudaRunner
from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.detector import Detector
from tests.test_kernels import SHAPES, _noise_images

HAS_GPU = torch.cuda.is_available()


def eager_capture(fn, inputs):
    """What a captured graph does, run eagerly: replay recomputes fn on the fixed inputs into the fixed outputs."""
    outputs = cuda_graphs._as_tuple(fn(*inputs))

    def replay():
        for mine, fresh in zip(outputs, cuda_graphs._as_tuple(fn(*inputs))):
            mine.copy_(fresh)

    return Captured(inputs, outputs, replay)


@pytest.fixture
def eager_graphs(monkeypatch):
    captures = []

    def counting(fn, inputs):
        captures.append(tuple(t.shape for t in inputs))
        return eager_capture(fn, inputs)

    monkeypatch.setattr(cuda_graphs, "capture", counting)
    return captures


def test_graphed_call_gives_fns_results_with_one_capture_per_shape(eager_graphs):
    def fn(x, y):
        return x * 2 + y.sum(), (x - y).abs()

    graphed = GraphedCall(fn)
    g = torch.Generator().manual_seed(0)
    results = []
    for shape in [(4, 3), (4, 3), (8, 3), (4, 3), (8, 3)]:
        x, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x_before, y_before = x.clone(), y.clone()
        got = graphed(x, y)
        want = fn(x, y)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        results.append((got, want, (x, y), (x_before, y_before)))
    assert eager_graphs == [((4, 3), (4, 3)), ((8, 3), (8, 3))]
    for got, want, given, before in results:
        # Every result is the caller's own (later replays do not change it), and the graph never writes
        # into a caller's inputs (not even those it was captured from).
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert all(torch.equal(a, b) for a, b in zip(given, before))


def test_graphed_call_with_one_output_returns_a_tensor(eager_graphs):
    graphed = GraphedCall(lambda x: x + 1)
    out = graphed(torch.zeros(3))
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.ones(3))


def test_capture_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        cuda_graphs.capture(lambda x: x, (torch.zeros(2),))


@pytest.fixture(scope="module")
def tiny_detector():
    torch.manual_seed(0)
    return Detector(ModelConfig(backbone="tiny")).eval()


@pytest.mark.parametrize("fuse", [True, False])
def test_runner_with_graphs_gives_the_runners_results(tiny_detector, eager_graphs, fuse):
    """The runner's wiring: both networks through GraphedCall, one capture per network and batch shape."""
    plain = TorchCudaRunner(tiny_detector, "cpu", precision="fp32", use_kernels=False, fuse_normalise=fuse,
                            max_batch=4, min_shape=2)
    graphed = TorchCudaRunner(tiny_detector, "cpu", precision="fp32", use_kernels=False, fuse_normalise=fuse,
                              max_batch=4, min_shape=2, cuda_graphs=True)
    images = _noise_images(4, SHAPES[:7])  # 7 images: shapes 4, 2 and 1 padded to 2
    want = plain.eval()(images)
    for _ in range(2):  # the second pass replays only
        got = graphed.eval()(images)
        assert torch.equal(got.boxes, want.boxes)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-6)
    assert sorted(shapes[0][0] for shapes in eager_graphs) == [2, 2, 4, 4]  # global and local, at 4 and 2


def test_graphs_need_fixed_shapes_and_no_compile(tiny_detector):
    with pytest.raises(ScannerError, match="fixed batch shapes"):
        TorchCudaRunner(tiny_detector, "cpu", precision="fp32", use_kernels=False, min_shape=0, cuda_graphs=True)
    with pytest.raises(ScannerError, match="no compile_mode"):
        TorchCudaRunner(tiny_detector, "cpu", precision="fp32", use_kernels=False, compile_mode="default",
                        cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_gpu_graphs_replay_what_the_eager_runner_computes(precision):
    torch.manual_seed(0)
    model = Detector(ModelConfig(backbone="tiny")).eval().cuda()
    eager = TorchCudaRunner(model, "cuda", precision=precision, max_batch=8, min_shape=4)
    graphed = TorchCudaRunner(model, "cuda", precision=precision, max_batch=8, min_shape=4, cuda_graphs=True)
    images = _noise_images(5, SHAPES * 2)[:13]  # chunks of 8, 4 and 1 padded to 4: two shapes
    want = eager.eval()(images)
    for _ in range(3):
        got = graphed.eval()(images)
        assert torch.equal(got.boxes, want.boxes)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-3 if precision == "fp16" else 1e-5)
    assert len(graphed._global_net.graphs) == len(graphed._local_net.graphs) == 2
