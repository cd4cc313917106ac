"""When a Triton kernel may run: the one switch the kernel modules consult, read at call time.

- `ZONE_DISABLE_TRITON=1` turns every kernel off (the torch references run instead).
- A kernel defined while `TRITON_INTERPRET=1` was set is an interpreted function: it runs on CPU
  tensors through numpy (the CI path), and cannot take bf16 (the interpreter has no bf16). CUDA
  tensors get the torch reference: interpreting over device memory would copy every launch to the
  host and back (and the interpreter of triton 3.6 fails on it).
- Otherwise a kernel runs compiled, on CUDA tensors only.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

DISABLE_ENV = "ZONE_DISABLE_TRITON"


SWITCHED_OFF = {"1", "true", "yes", "on"}  # ZONE_DISABLE_TRITON's spellings of yes, and below of no
LEFT_ON = {"", "0", "false", "no", "off"}


def triton_disabled() -> bool:
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value not in SWITCHED_OFF | LEFT_ON:  # a typo (`ture`) silently left the kernels on
        _warn_neither_yes_nor_no(value)
    return value in SWITCHED_OFF


@functools.cache  # once a value: every kernel's caller asks, and warnings' own once-only was reset between them
def _warn_neither_yes_nor_no(value: str) -> None:
    warnings.warn(f"{DISABLE_ENV}={value!r} is neither yes (1, true, yes, on) nor no (0, false, no, off): the "
                  "Triton kernels stay on", UserWarning, stacklevel=3)


def is_interpreted(kernel) -> bool:
    """True when `kernel` was built by `triton.jit` under TRITON_INTERPRET=1."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def traced(*tensors: torch.Tensor) -> bool:
    """Whether the caller is being traced (torch.compile, torch.export; fake or functional tensors).

    Traced calls go through the kernel's custom op, an opaque node with a fake implementation. Eager
    calls, CUDA-graph capture included, launch directly: the dispatcher adds host time a call (27.7 us
    for a no-op custom op on the 2-core AMD CPU), more than these kernels take on a GPU.
    """
    return torch.compiler.is_compiling() or any(type(tensor) not in PLAIN_TENSORS for tensor in tensors)


PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # a module's weights are Parameters, not traced values


def can_launch(kernel, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> bool:
    """Whether `kernel` can run on tensors of `device` with these dtypes, here and now."""
    if triton_disabled():
        return False
    if is_interpreted(kernel):
        return device.type == "cpu" and torch.bfloat16 not in dtypes
    return device.type == "cuda"


Variants = dict[str, tuple[Callable[[], Any], int]]  # name -> (run it, modelled bytes moved)


def benchmark_rows(variants: Variants, check: Callable[[Any], dict], device: torch.device,
                   through_op: Callable[[], Any], time_ms: Callable[[str, Callable[[], Any]], float] | None = None,
                   ) -> list[dict]:
    """A kernel benchmark's rows: each variant's name, time (on CUDA: `time_ms(name, run)`, by default
    do_bench's median; None elsewhere), modelled bytes and quality (`check` of its first call's output,
    made before any timing: compilation stays out). The last variant is the kernel; on CUDA its launch-
    cost rows follow (`launch_cost_rows`, `through_op`: the same work through the custom op)."""
    import triton.testing

    def do_bench(_name: str, run: Callable[[], Any]) -> float:
        return triton.testing.do_bench(run, return_mode="median")

    results = []
    for name, (run, traffic) in variants.items():
        quality = check(run())
        timed = (time_ms or do_bench)(name, run) if device.type == "cuda" else None
        results.append({"name": name, "time_ms": timed, "bytes": traffic, **quality})
    if device.type == "cuda":  # where the host's launch cost goes, and the device's time without it
        kernel = list(variants.values())[-1][0]
        results += launch_cost_rows(results[-1], kernel, through_op, check)
    return results


def launch_cost_rows(kernel_row: dict, direct: Callable[[], Any], through_op: Callable[[], Any],
                     check: Callable[[Any], dict]) -> list[dict]:
    """A kernel benchmark's CUDA-only rows, beside its row `kernel_row` (the direct launch): the same work
    through the custom op (as torch.compile calls it: the dispatcher's host time added, its output checked
    by `check`), and the direct launch replayed from a CUDA graph (the device's time, no launch cost)."""
    import triton.testing

    return [
        {**kernel_row, "name": "c: through the custom op (as torch.compile calls it)",
         "time_ms": triton.testing.do_bench(through_op, return_mode="median"), **check(through_op())},
        {**kernel_row, "name": "c: the same, replayed from a CUDA graph",
         "time_ms": triton.testing.do_bench_cudagraph(direct, return_mode="median")},
    ]
