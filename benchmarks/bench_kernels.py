"""The Triton kernels against (a) the reference-style path and (b) the torch reference.

    python -m zone_benchmarks.bench_kernels

SD1.5 shapes at 512x512: kernel 1 with 5 layers of 2 kept rows x 8 heads, N = 256, d = 160, 77
keys (fp16 on CUDA); kernel 2 from a 16x16 map to a 512x512 mask; kernel 3 (GroupNorm) on the
UNets' largest activation, 6 rows x 320 x 64 x 64 channels-last, against PyTorch's norm on it and
on its NCHW copy. On a CUDA GPU each row carries
the do_bench median (ms), the modelled memory traffic, their ratios to the kernel launched eagerly
(the guarded call, as the engine makes it: no custom-op dispatch), and a quality figure; two more
rows time it through the custom op (as torch.compile calls it) and replayed from a CUDA graph
(do_bench_cudagraph: the device's time without the host's launch cost), and a last line puts that
against the kernel's memory floor: its modelled bytes at the rate of a 1 GiB device copy measured
in the same run (kernel 1's also against a floor kernel making its launches and loads, nothing else:
latency's floor beside DRAM's, and its row splits across programs). On the CPU the kernels run under
TRITON_INTERPRET=1 and only the quality figures mean anything (timings need a GPU).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

from zone_engine.cli import CommandParser
from zone_engine.streams import stdout_kept

from .measure import guarded  # neither imports a kernel module: TRITON_INTERPRET is still set below in time


def _eager_kernel(rows: list[dict]) -> dict:
    """The row of the kernel launched eagerly: the first "c:" row, what the others are compared with."""
    return next(row for row in rows if row["name"].startswith("c:"))


def _table(title: str, rows: list[dict], quality: str) -> str:
    kernel = _eager_kernel(rows)
    lines = [title, f"  {'variant':<46} {'time ms':>9} {'x kernel':>9} {'MB moved':>9} {'x kernel':>9}  {quality}"]
    for row in rows:
        timed = row["time_ms"] is not None
        time_ms = f"{row['time_ms']:.4f}" if timed else "n/a"
        time_ratio = f"{row['time_ms'] / kernel['time_ms']:.1f}" if timed else "n/a"
        measured = "-" if row[quality] is None else f"{row[quality]:.3g}"  # a floor row computes nothing to check
        lines.append(f"  {row['name']:<46} {time_ms:>9} {time_ratio:>9} {row['bytes'] / 1e6:>9.2f} "
                     f"{row['bytes'] / kernel['bytes']:>9.1f}  {measured}")
    return "\n".join(lines)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), do_bench median: the floor's rate."""
    import triton

    source = torch.empty(2**28, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    seconds = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median") / 1e3
    return 2 * source.nbytes / seconds


# Issue 6's kernel 1 target, "close to the memory floor (read Q, K once)", read as: within this factor of the same
# launches doing nothing but reading Q and K once (the floor row). Stated on 2026-12-04 before that row was first
# timed. The DRAM floor alone is out of reach: a layer's 1.9 MB take 0.4 us, under one launch's latency.
CLOSE_TO_FLOOR = 2.0


def floor_line(rows: list[dict], bandwidth: float) -> str:
    """The kernel's memory floor (its modelled bytes at the measured copy rate) and how far the
    graph-replayed kernel (the device's time alone) is from it; and, where a row measured one (kernel 1),
    from a floor kernel making the same launches that only read the inputs (latency's floor as well)."""
    kernel = _eager_kernel(rows)
    replayed = next(row for row in rows if "CUDA graph" in row["name"])
    floor_us = kernel["bytes"] / bandwidth * 1e6
    line = (f"  memory floor: {floor_us:.2f} us ({kernel['bytes'] / 1e6:.2f} MB at {bandwidth / 1e9:.0f} GB/s "
            f"measured); replayed from a CUDA graph: {replayed['time_ms'] * 1e3:.2f} us = "
            f"{replayed['time_ms'] * 1e3 / floor_us:.1f}x the floor")
    if measured := next((row for row in rows if row["name"].startswith("floor:")), None):
        ratio = replayed["time_ms"] / measured["time_ms"]
        line += (f"; the same launches only reading their inputs: {measured['time_ms'] * 1e3:.2f} us, the kernel "
                 f"{ratio:.1f}x that (target: within {CLOSE_TO_FLOOR:g}x, "
                 f"{'met' if ratio <= CLOSE_TO_FLOOR else 'not met'})")
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """No options: the shapes are SD1.5's at 512x512 (`--help` says so rather than running)."""
    parser = CommandParser(prog="python -m zone_benchmarks.bench_kernels", description=__doc__.split("\n")[0],
                           epilog="SD1.5 shapes at 512x512; timings need a CUDA GPU, the CPU checks correctness under "
                                  "TRITON_INTERPRET=1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules import triton
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 on a CUDA machine would time the interpreter: unset it", file=sys.stderr)
        return 2
    from zone_kernels import attn_accumulate, group_norm, mask_binarize

    device = torch.device("cuda" if cuda else "cpu")
    if not (attn_accumulate.runs_on(device) and group_norm.runs_on(device)):  # kernel 2 shares kernel 1's rule
        # Each kernel's launcher would run its reference instead: the "c" rows would be it, under the kernel's name.
        print(f"the Triton kernels cannot run on {device.type} here (Triton needs CUDA or TRITON_INTERPRET=1, and "
              "ZONE_DISABLE_TRITON unset): there is no kernel to measure", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"device: {name}")
    if not cuda:
        print("timings need a GPU: this run checks correctness only (bytes are the traffic model)")
    bandwidth = copy_bandwidth() if cuda else None
    for title, benchmark, quality in (
        ("kernel 1: attention-map accumulation, 5 layers x 16 rows x 256 x 77, d = 160", attn_accumulate.benchmark,
         "max_abs_diff"),
        ("kernel 2: mask binarization, 16x16 -> 512x512", mask_binarize.benchmark, "mismatched_pixels"),
        ("kernel 3: GroupNorm, 6 x 320 x 64 x 64 (the UNets' largest), 32 groups", group_norm.benchmark,
         "max_abs_diff"),
        ("kernel 3 fused: + time embedding, GroupNorm, SiLU (a ResNet block's second norm), 6 x 320 x 64 x 64",
         functools.partial(group_norm.benchmark, fused=True), "max_abs_diff"),
    ):
        rows = guarded(title, lambda benchmark=benchmark: benchmark(device))  # one kernel's failure spares the other
        if rows is None:
            continue
        print(_table(title, rows, quality))
        if bandwidth is not None:
            print(floor_line(rows, bandwidth))
    return 0


if __name__ == "__main__":
    with stdout_kept():  # a closed pipe (`| head`) or an ASCII locale: the tables go on, not a traceback
        sys.exit(main())
