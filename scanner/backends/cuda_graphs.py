"""CUDA graphs for the torch CUDA runner's networks: a network call replayed from a graph captured once per
input shape, so the CPU no longer launches each of the network's kernels one by one.

    graphed = GraphedCall(fn)       # fn(*tensors) -> a tensor or a tuple of tensors, all on one CUDA device
    out = graphed(*inputs)          # the first call of a shape warms fn up and captures it; later ones replay

The runner's power-of-two batch shapes (scanner.backends.torch_cuda) keep the graphs to a handful per
network. Inputs are copied into the graph's own input tensors before each replay, and outputs copied out
after it, since the next replay overwrites them. Whatever fn depends on besides its inputs (weights,
autocast) is fixed at capture: autocast must run with cache_enabled=False around capture and replay (its
weight cache would be freed under the graph). torch.compile's "reduce-overhead" mode also uses CUDA graphs,
after seconds of compilation per shape; a capture here takes one warm-up and one recorded pass.

`capture(fn, inputs)` does the recording; tests replace it with an eager stand-in to check the buffer
handling on the CPU, and the GPU tests compare graphed and eager runners.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

WARMUP_CALLS = 2  # eager calls on a side stream before capture: cuDNN picks its algorithms, lazy state settles


@dataclass
class Captured:
    inputs: tuple[torch.Tensor, ...]  # the graph reads these
    outputs: tuple[torch.Tensor, ...]  # and writes these
    replay: Callable[[], None]


def capture(fn: Callable, inputs: tuple[torch.Tensor, ...]) -> Captured:
    """Record fn(*inputs) on a CUDA graph; `inputs` become the graph's own input tensors."""
    device = inputs[0].device
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need CUDA tensors; got one on {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            fn(*inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _as_tuple(fn(*inputs))
    return Captured(inputs, outputs, graph.replay)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


class GraphedCall:
    """fn, replayed from one graph per distinct (shape, dtype, device) of its inputs."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.graphs: dict[tuple, Captured] = {}

    def __call__(self, *inputs: torch.Tensor):
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        captured = self.graphs.get(key)
        if captured is None:
            # The graph keeps its own copies, so that the caller's tensors stay the caller's.
            captured = self.graphs[key] = capture(self.fn, tuple(t.clone() for t in inputs))
        for mine, given in zip(captured.inputs, inputs):
            mine.copy_(given)
        captured.replay()
        outputs = tuple(t.clone() for t in captured.outputs)
        return outputs[0] if len(outputs) == 1 else outputs
