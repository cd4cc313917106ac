"""CUDA graphs for the stages around the denoising loop: CLIP's text encoder, the VAE's encoder and decoder.

Measured on an H200 (benchmarks/RESULTS.md, 2026-11-30) these stages were bound by the host's launches:
text 14.3 ms and action 16.4 ms of wall for 0.6-0.8 ms of device work each, vae_encode 31.9 ms for
12.5 ms, vae_decode 30.8 ms for 20.9 ms. Replayed from a graph, a stage costs one launch.

A stage is a function of tensors returning one tensor, named by the caller: `run(name, fn, *inputs)`.
`eager` calls it; `CapturedCalls` captures each (name, input shapes, dtypes, devices) once on CUDA
and replays it after, the inputs copied into the graph's static buffers and its output cloned. A
function that cannot be captured (say a library reads a tensor's value on the host) is warned about
once and runs eagerly from then on: a graph changes the speed of a stage, never whether it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import first_line, warn_caller

WARMUP_CALLS = 2  # eager calls on a side stream before capture: lazy initialisation, cuDNN's choices


class Run(Protocol):
    def __call__(self, name: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor: ...


def eager(name: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs): the plain path, and every stage's reference."""
    return fn(*inputs)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class CapturedCalls:
    """`run(name, fn, *inputs)` that replays a CUDA graph of `fn` for every call after a signature's first.

    `fn` is read at a signature's first call only: a name must always mean the same computation on the
    same weights (a module converted in place, e.g. `.to(dtype)`, would leave its graphs reading freed
    memory). The graphs share one memory pool: each one's temporaries are dead when it ends and its
    output is cloned before anything else replays, so one's output may overlap another's temporaries.
    Not thread-safe: ZonePipeline calls it under its lock.
    """

    def __init__(self) -> None:
        self._graphs: dict[tuple, _Captured | None] = {}  # None: could not be captured, runs eagerly
        self._pool: tuple[int, int] | None = None
        self._stream: torch.cuda.Stream | None = None  # warm-ups and captures, off the caller's stream
        self.captures = 0

    def __call__(self, name: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        if not all(tensor.is_cuda for tensor in inputs):
            return fn(*inputs)
        key = (name, *((tuple(tensor.shape), tensor.dtype, tensor.device) for tensor in inputs))
        if key not in self._graphs:
            self._graphs[key] = self._capture(name, fn, inputs)
        captured = self._graphs[key]
        if captured is None:
            return fn(*inputs)
        for static, tensor in zip(captured.inputs, inputs, strict=True):
            static.copy_(tensor)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, name: str, fn: Callable[..., torch.Tensor],
                 inputs: tuple[torch.Tensor, ...]) -> _Captured | None:
        static = tuple(tensor.clone() for tensor in inputs)  # outside the pool: alive as long as the graph
        if self._stream is None:
            self._stream, self._pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        caller, graph = torch.cuda.current_stream(), torch.cuda.CUDAGraph()
        self._stream.wait_stream(caller)
        # The outer stream context restores the caller's stream even when the capture fails (torch.cuda.graph
        # alone leaves its capture stream current if ending the capture raises).
        try:
            with torch.cuda.stream(self._stream):
                for _ in range(WARMUP_CALLS):  # an error here is the function's own: it propagates
                    fn(*static)
                try:
                    with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                        output = fn(*static)
                except RuntimeError as error:  # e.g. a host sync: "operation not permitted when stream is capturing"
                    cause = error.__context__ or error  # ending an invalidated capture raises over the real cause
                    for oom in (error, cause):  # the device's memory now, not fn: raised, nothing kept, a later
                        if isinstance(oom, torch.OutOfMemoryError):  # call captures again (not eager for good)
                            raise oom from None  # the invalidated capture's own error said nothing more
                    warn_caller(f"{name}: not captured as a CUDA graph ({first_line(cause)}); it runs eagerly",
                                UserWarning)
                    return None
        finally:
            caller.wait_stream(self._stream)
        self.captures += 1
        return _Captured(graph, static, output)
