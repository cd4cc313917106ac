"""Kernel 2: the edit mask M_b from the averaged attention map (ZONE.md section 3), in place.

From the averaged map (N, K) fp32, the grid (h, w) with h*w == N and the token L-1, writes into
preallocated (H, W) uint8 buffers
    mask        1 where the rule keeps the pixel (reference: min(2d, 255) <= 108; paper: d < T)
    difference  (optional) the resized d itself, for the heatmap view
bit-identical to the reference composition `zone_engine.localize.binarize_reference`:
    a_t = uint8(255 * A[:, t] / max A[:, t])      fp32, multiply then divide, truncating cast
    d   = max(a_1 - a_L, 0)                       saturating, on the h x w grid
    d   = PIL bicubic resize of the uint8 image d to H x W
PIL's bicubic resize of an 8-bit image is separable fixed-point arithmetic (libImaging/Resample.c):
per output pixel, a window of inputs with integer weights kk (the a = -0.5 cubic evaluated in
double, normalised to sum 1, scaled by 2^22 and rounded half away from zero), and
    out = clip8((2^21 + sum in * kk) >> 22)
once per axis, horizontal pass first into a uint8 intermediate, then vertical; an axis whose size
does not change is skipped (an identity table here: (2^21 + v * 2^22) >> 22 == v).

One launch, `_binarize_kernel`, one program per output tile: the two column maxima (every program
reads the whole map: a few hundred floats), then for each grid row the tile's output rows read, its
horizontal pass at the tile's columns (normalise, truncate, subtract, the integer MACs, Pillow's uint8
intermediate: in registers, never stored), added with each output row's vertical weight for it; the
threshold, the uint8 stores. At SD1.5's 16x16 -> 512x512 a 16 x 128 tile reads 4 grid rows: 4 x 5
normalised cells per column instead of 5 x 5 per pixel (until 2026-11-30, each output row recomputed
the horizontal passes of its own taps: 20x the divisions; 35 us on an H200).
The weight tables are computed on the host in float64 exactly as Pillow does
(`zone_engine.pillow_resize`, shared with SAM's input resize on CUDA), cached per (in size, out
size, device), and passed as int32 tensors: the kernel only does integer MACs.

Only enlarging the height (H >= h) is fused: Pillow 13 runs the vertical pass first when the height
shrinks by more than twice as many pixels as the width, older Pillows never do, so a shrinking
height has no single bit-exact answer; ZONE's map is 1/32 of the image and only ever grows.

Public API:
    mask_binarize_(average, grid, last_token, mask, *, rule, reference_threshold, paper_threshold,
                   difference=None)            guarded: kernels when usable, else reference
    binarize_mask(average, grid, last_token, size, *, rule, ...) -> (mask bool, difference uint8)
                                               numpy results: the `binarize=` callable of localize()
    mask_binarize_triton(...)                  the launcher (always launches)
    mask_binarize_reference_(...)              plain torch/numpy/PIL, same in-place contract
    torch.ops.zone.mask_binarize_              the custom op (fake impl registered)
    benchmark(...)                             (a) reference code path, (b) engine reference, (c) kernels
"""

from __future__ import annotations

import functools
import time
from typing import Literal

import numpy as np
import torch
import triton
import triton.language as tl

from zone_engine.localize import binarize_reference
from zone_engine.pillow_resize import PRECISION_BITS, device_coefficients, pillow_coefficients
from zone_kernels.runtime import benchmark_rows, can_launch, is_interpreted, traced


@triton.jit
def _binarize_kernel(
    average_ptr, x_starts_ptr, x_weights_ptr, y_starts_ptr, y_weights_ptr, mask_ptr, difference_ptr,
    N, GRID_H, GRID_W, OUT_H, OUT_W, last_token, stride_an, stride_ak, threshold,
    BLOCK_MAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, TAPS_X: tl.constexpr,
    TAPS_Y: tl.constexpr, TILE_ROWS: tl.constexpr, PRECISION: tl.constexpr, PAPER: tl.constexpr,
    STORE_DIFFERENCE: tl.constexpr,
):
    # Column maxima over the whole map, in every program: N is a few hundred floats, cheaper than
    # another launch. max is exact, so the order of the reduction does not matter.
    cells = tl.arange(0, BLOCK_MAP)
    first_max = tl.max(tl.load(average_ptr + cells * stride_an, mask=cells < N, other=float("-inf")), axis=0)
    last_max = tl.max(tl.load(average_ptr + cells * stride_an + last_token * stride_ak, mask=cells < N,
                              other=float("-inf")), axis=0)

    ys = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    xs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    inside = (ys < OUT_H)[:, None] & (xs < OUT_W)[None, :]
    y_starts = tl.load(y_starts_ptr + ys, mask=ys < OUT_H, other=0)
    x_starts = tl.load(x_starts_ptr + xs, mask=xs < OUT_W, other=0)
    # The tile's output rows read the grid rows first_row .. first_row + TILE_ROWS - 1 (windows start in
    # ascending order; TILE_ROWS, from the host's table, covers the widest tile). Each such row's horizontal
    # pass (Pillow's uint8 intermediate) is computed once per tile, then added into every output row whose
    # window holds it with that row's weight for it: each (row, tap) term once, integers, so exact.
    first_row = tl.load(y_starts_ptr + tl.program_id(0) * BLOCK_H)
    acc = tl.full((BLOCK_H, BLOCK_W), 1 << (PRECISION - 1), tl.int32)
    for j in tl.static_range(TILE_ROWS):
        grid_row = tl.minimum(first_row + j, GRID_H - 1)  # past the map: read the last row, weighted 0 below
        row_acc = tl.full((BLOCK_W,), 1 << (PRECISION - 1), tl.int32)
        for tx in tl.static_range(TAPS_X):
            x_weight = tl.load(x_weights_ptr + xs * TAPS_X + tx, mask=xs < OUT_W, other=0)  # 0 past the window
            cell = grid_row * GRID_W + tl.minimum(x_starts + tx, GRID_W - 1)
            first = tl.load(average_ptr + cell * stride_an, mask=xs < OUT_W, other=0.0)
            last = tl.load(average_ptr + cell * stride_an + last_token * stride_ak, mask=xs < OUT_W, other=0.0)
            # uint8(255 * a / max a): fp32 multiply, IEEE-rounded divide (div_rn: Triton's `/` is an
            # approximate division on NVIDIA GPUs), truncating cast, as torch does on the CPU.
            first_u8 = tl.math.div_rn(first * 255.0, first_max).to(tl.int32)
            last_u8 = tl.math.div_rn(last * 255.0, last_max).to(tl.int32)
            row_acc += tl.maximum(first_u8 - last_u8, 0) * x_weight
        row = tl.minimum(tl.maximum(row_acc >> PRECISION, 0), 255)
        tap = first_row + j - y_starts  # this grid row's place in each output row's window
        uses = (ys < OUT_H) & (tap >= 0) & (tap < TAPS_Y) & (first_row + j < GRID_H)
        y_weight = tl.load(y_weights_ptr + ys * TAPS_Y + tap, mask=uses, other=0)
        acc += row[None, :] * y_weight[:, None]
    difference = tl.minimum(tl.maximum(acc >> PRECISION, 0), 255)
    keep = (difference < threshold) if PAPER else (tl.minimum(2 * difference, 255) <= threshold)
    offsets = ys[:, None] * OUT_W + xs[None, :]
    tl.store(mask_ptr + offsets, keep.to(tl.uint8), mask=inside)
    if STORE_DIFFERENCE:
        tl.store(difference_ptr + offsets, difference.to(tl.uint8), mask=inside)


def _check_arguments(
    average: torch.Tensor, grid: tuple[int, int], last_token: int, mask: torch.Tensor,
    difference: torch.Tensor | None, rule: str,
) -> None:
    """ValueError unless the map, grid, token, rule and output buffers fit together."""
    if average.ndim != 2 or average.dtype != torch.float32:
        raise ValueError(f"average must be a float32 (N, K) map; got {average.dtype} {tuple(average.shape)}")
    height, width = grid
    if height < 1 or width < 1 or height * width != average.shape[0]:
        raise ValueError(f"grid {tuple(grid)} does not hold the map's {average.shape[0]} query positions")
    if not 0 <= last_token < average.shape[1]:
        raise ValueError(f"token index {last_token} is outside the map's {average.shape[1]} tokens")
    if rule not in ("reference", "paper"):
        raise ValueError(f"unknown threshold rule {rule!r}: use 'reference' or 'paper'")
    for name, buffer in (("mask", mask), ("difference", difference)):
        if buffer is None:
            continue
        if buffer.dtype != torch.uint8 or buffer.ndim != 2 or not buffer.is_contiguous() or buffer.numel() == 0:
            raise ValueError(f"{name} must be a contiguous, non-empty uint8 (H, W) buffer; got {buffer.dtype} "
                             f"{tuple(buffer.shape)}")
        if buffer.device != average.device:
            raise ValueError(f"{name} is on {buffer.device} but the map is on {average.device}")
    if difference is not None and difference.shape != mask.shape:
        raise ValueError(f"difference {tuple(difference.shape)} and mask {tuple(mask.shape)} differ in shape")


def _threshold(rule: str, reference_threshold: int, paper_threshold: int) -> int:
    return paper_threshold if rule == "paper" else reference_threshold


def mask_binarize_triton(
    average: torch.Tensor, grid: tuple[int, int], last_token: int, mask: torch.Tensor, *,
    rule: Literal["reference", "paper"] = "reference", reference_threshold: int = 108,
    paper_threshold: int = 128, difference: torch.Tensor | None = None,
) -> None:
    """Launch the kernel: write M_b (uint8 0/1) into `mask` and, if given, d into `difference`."""
    _check_arguments(average, grid, last_token, mask, difference, rule)
    if mask.shape[0] < grid[0]:
        raise ValueError(f"the fused path only enlarges the height ({grid[0]} -> {mask.shape[0]} shrinks it): "
                         "Pillow's pass order for a shrinking height depends on its version")
    _launch(average, grid, last_token, mask, rule == "paper", _threshold(rule, reference_threshold, paper_threshold),
            difference)


def _launch(
    average: torch.Tensor, grid: tuple[int, int], last_token: int, mask: torch.Tensor, paper: bool, threshold: int,
    difference: torch.Tensor | None,
) -> None:
    grid_h, grid_w = grid
    out_h, out_w = mask.shape
    x_starts, x_weights = device_coefficients(grid_w, out_w, "bicubic", average.device)
    y_starts, y_weights = device_coefficients(grid_h, out_h, "bicubic", average.device)
    # 16 x 128 tiles: 128 programs at 512 x 512, one wave on an H100; the interpreter prefers fewer.
    block_h, block_w = (128, 256) if is_interpreted(_binarize_kernel) else (16, 128)
    _binarize_kernel[(triton.cdiv(out_h, block_h), triton.cdiv(out_w, block_w))](
        average, x_starts, x_weights, y_starts, y_weights, mask, mask if difference is None else difference,
        average.shape[0], grid_h, grid_w, out_h, out_w, last_token, average.stride(0), average.stride(1), threshold,
        BLOCK_MAP=triton.next_power_of_2(average.shape[0]), BLOCK_H=block_h, BLOCK_W=block_w,
        TAPS_X=x_weights.shape[1], TAPS_Y=y_weights.shape[1], TILE_ROWS=grid_rows_per_tile(grid_h, out_h, block_h),
        PRECISION=PRECISION_BITS,
        PAPER=paper, STORE_DIFFERENCE=difference is not None,
    )


@functools.lru_cache(maxsize=64)
def grid_rows_per_tile(grid_h: int, out_h: int, block_h: int) -> int:
    """How many grid rows the widest tile of `block_h` output rows reads, counted from its first row's
    window start (Pillow's bicubic table for grid_h -> out_h; window starts never decrease down the rows)."""
    starts, weights = pillow_coefficients(grid_h, out_h, "bicubic")
    return max(int(starts[top:top + block_h].max() - starts[top]) for top in range(0, out_h, block_h)) \
        + weights.shape[1]


def mask_binarize_reference_(
    average: torch.Tensor, grid: tuple[int, int], last_token: int, mask: torch.Tensor, *,
    rule: Literal["reference", "paper"] = "reference", reference_threshold: int = 108,
    paper_threshold: int = 128, difference: torch.Tensor | None = None,
) -> None:
    """The same in-place contract on the reference composition (numpy + PIL on the host)."""
    binary, resized = binarize_reference(
        average, tuple(grid), last_token, tuple(mask.shape), rule=rule,
        reference_threshold=reference_threshold, paper_threshold=paper_threshold,
    )
    mask.copy_(torch.from_numpy(binary.astype(np.uint8)))
    if difference is not None:
        difference.copy_(torch.from_numpy(np.array(resized)))  # PIL's array is read-only


@torch.library.custom_op("zone::mask_binarize_", mutates_args=("mask", "difference"))
def _mask_binarize_op(
    average: torch.Tensor, grid_h: int, grid_w: int, last_token: int, paper: bool, threshold: int,
    mask: torch.Tensor, difference: torch.Tensor | None,
) -> None:
    rule: Literal["reference", "paper"] = "paper" if paper else "reference"
    if _fusable(average, (grid_h, grid_w), mask):
        mask_binarize_triton(average, (grid_h, grid_w), last_token, mask, rule=rule, reference_threshold=threshold,
                             paper_threshold=threshold, difference=difference)
    else:
        mask_binarize_reference_(average, (grid_h, grid_w), last_token, mask, rule=rule,
                                 reference_threshold=threshold, paper_threshold=threshold, difference=difference)


@_mask_binarize_op.register_fake
def _(average, grid_h, grid_w, last_token, paper, threshold, mask, difference) -> None:
    _check_arguments(average, (grid_h, grid_w), last_token, mask, difference, "paper" if paper else "reference")


def _fusable(average: torch.Tensor, grid: tuple[int, int], mask: torch.Tensor) -> bool:
    return mask.shape[0] >= grid[0] and can_launch(_binarize_kernel, average.device)


def mask_binarize_(
    average: torch.Tensor, grid: tuple[int, int], last_token: int, mask: torch.Tensor, *,
    rule: Literal["reference", "paper"] = "reference", reference_threshold: int = 108,
    paper_threshold: int = 128, difference: torch.Tensor | None = None,
) -> None:
    """Write M_b before small-region removal into `mask` (uint8 (H, W), 0/1), in place.

    average: (h*w, K) float32, the accumulator's mean; grid (h, w); last_token = L - 1. When given,
    `difference` (uint8 (H, W)) receives the resized d. Bit-identical to the reference composition;
    the kernel runs when Triton can run here and the height does not shrink (under torch.compile
    through the `zone::mask_binarize_` custom op; eager calls and CUDA-graph capture launch it
    directly), otherwise the reference does.
    """
    _check_arguments(average, grid, last_token, mask, difference, rule)
    threshold = _threshold(rule, reference_threshold, paper_threshold)
    if not _fusable(average, grid, mask):
        mask_binarize_reference_(average, grid, last_token, mask, rule=rule, reference_threshold=reference_threshold,
                                 paper_threshold=paper_threshold, difference=difference)
    elif traced(average, mask):
        torch.ops.zone.mask_binarize_(average, grid[0], grid[1], last_token, rule == "paper", threshold, mask,
                                      difference)
    else:  # eager or CUDA-graph capture: checked above, launched without the dispatcher's host time
        _launch(average, grid, last_token, mask, rule == "paper", threshold, difference)


def binarize_mask(
    average: torch.Tensor, grid: tuple[int, int], last_token: int, size: tuple[int, int], *,
    rule: Literal["reference", "paper"] = "reference", reference_threshold: int = 108,
    paper_threshold: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """`localize(..., binarize=binarize_mask)`: (M_b bool (H, W), d uint8 (H, W)) as numpy arrays."""
    mask = torch.empty(size, dtype=torch.uint8, device=average.device)
    difference = torch.empty_like(mask)
    mask_binarize_(average, grid, last_token, mask, rule=rule, reference_threshold=reference_threshold,
                   paper_threshold=paper_threshold, difference=difference)
    return mask.cpu().numpy().astype(bool), difference.cpu().numpy()


# ------------------------------------------------------------------------------------------- benchmark


def _reference_code_path(average: torch.Tensor, grid: tuple[int, int], last_token: int, size: tuple[int, int]):
    """(a) the reference implementation's own steps: host copy, 3-channel images, cv2, PIL on RGB."""
    import cv2
    from PIL import Image

    maps = average.cpu().numpy().reshape(*grid, average.shape[-1])
    images = []
    for token in (0, last_token):
        m = np.float32(255) * maps[:, :, token] / maps[:, :, token].max()
        images.append(np.repeat(m[:, :, None], 3, axis=2).astype(np.uint8))
    difference = np.array(Image.fromarray(cv2.subtract(images[0], images[1])).resize((size[1], size[0])))
    scaled = cv2.convertScaleAbs(difference, alpha=2, beta=0)
    return cv2.bitwise_not(np.where(scaled <= 108, 0, 255).astype(np.uint8))[:, :, 0] > 0


def benchmark(
    device: str | torch.device | None = None, *, grid: tuple[int, int] = (16, 16), size: tuple[int, int] = (512, 512),
    tokens: int = 77, seed: int = 0,
) -> list[dict]:
    """SD1.5 at 512x512 by default: a 16x16 map -> 512x512 M_b (reference rule).

    Returns one dict per variant: name, time_ms (on CUDA: do_bench medians for the kernels, host
    clock medians for the CPU paths, which include the device-to-host copy; None elsewhere), bytes
    (a model of the memory traffic, see below), mismatched_pixels against (b).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(seed)
    average = (torch.rand(grid[0] * grid[1], tokens, generator=generator) ** 3).to(device)
    last_token = 5
    mask = torch.empty(size, dtype=torch.uint8, device=device)
    difference = torch.empty_like(mask)

    def engine_reference():
        return binarize_reference(average, grid, last_token, size)[0]

    def fused():
        mask_binarize_(average, grid, last_token, mask, difference=difference)
        return mask

    pixels, cells = size[0] * size[1], grid[0] * grid[1]
    # Traffic model, bytes per output pixel after the map's copy to the host (N*K*4): (b) the resize's 1,
    # its array copy 2, the int32 cast 5, 2x 8, the minimum 8, the threshold 5: 29; (a) its steps on 3-channel
    # images: the resize 3, its copy 6, convertScaleAbs 6, the threshold 6, np.where's int64 result 27 and its
    # uint8 cast 27, bitwise_not 6, the first channel's test 4: 85. The kernel reads two map columns (each
    # program reads them again from cache) and writes mask + d.
    variants = {
        "a: reference code path (numpy/cv2/PIL RGB)": (lambda: _reference_code_path(average, grid, last_token, size),
                                                       cells * tokens * 4 + 85 * pixels),
        "b: engine reference (numpy/PIL)": (engine_reference, cells * tokens * 4 + 29 * pixels),
        "c: fused Triton kernel": (fused, 2 * cells * 4 + 2 * pixels),
    }
    expected = engine_reference()

    def check(out: torch.Tensor | np.ndarray) -> dict:
        out = out.cpu().numpy().astype(bool) if isinstance(out, torch.Tensor) else out
        return {"mismatched_pixels": int((out != expected).sum())}

    def through_the_op() -> torch.Tensor:
        torch.ops.zone.mask_binarize_(average, grid[0], grid[1], last_token, False, 108, mask, difference)
        return mask

    def time_ms(name: str, run) -> float:  # the host paths by the host's clock: they copy to the host
        return triton.testing.do_bench(run, return_mode="median") if name.startswith("c") else _host_median_ms(run)

    return benchmark_rows(variants, check, device, through_the_op, time_ms)


def _host_median_ms(run, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))
