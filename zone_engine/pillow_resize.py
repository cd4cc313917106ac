"""Pillow's 8-bit resampling, bit for bit, as integer tensor arithmetic (on any device).

Pillow resizes an 8-bit image separably in fixed point (libImaging/Resample.c): per output pixel a
window of inputs with integer weights kk (the filter evaluated in double, normalised to sum 1,
scaled by 2^22 and rounded half away from zero), and
    out = clip8((2^21 + sum in * kk) >> 22)
once per axis, horizontal pass first into a uint8 intermediate, then vertical; an axis whose size
does not change is skipped (an identity table here: (2^21 + v * 2^22) >> 22 == v).

Used where a resize would otherwise run on the host between device stages: SAM's input on CUDA
(sam_torch.py), an edit's styled image and heatmap back to a photo's size on CUDA (`to_input_size_on`)
and, through its weight tables, kernel 2 (kernels/mask_binarize.py). Only enlarging
the height is reproduced: Pillow 13 runs the vertical pass first when the height shrinks by more
than twice as many pixels as the width, older Pillows never do, so a shrinking height has no single
bit-exact answer.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch

from .image_io import Geometry, crop_padding, to_input_size

PRECISION_BITS = 22  # Pillow's 8-bit resampling precision: 32 - 8 bits of result - 2 bits of headroom
Filter = Literal["bicubic", "bilinear"]


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}  # Pillow's filters and their supports


@functools.lru_cache(maxsize=64)
def pillow_coefficients(in_size: int, out_size: int, filter: Filter = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """Pillow's integer tables for one axis: starts int32 (out,), weights int32 (out, taps).

    Output pixel i reads inputs starts[i] + t with weight weights[i, t] (zero-padded past its
    window). Python floats are C doubles and int() truncates toward zero as C's cast does, so this
    is precompute_coeffs + normalize_coeffs_8bpc step for step. An unchanged size gives the identity.
    """
    if in_size == out_size:
        return np.arange(out_size, dtype=np.int32), np.full((out_size, 1), 1 << PRECISION_BITS, np.int32)
    function, filter_support = _FILTERS[filter]
    scale = in_size / out_size  # box = (0, in_size): in1 - in0 is exact in float
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    starts, windows = [], []
    for i in range(out_size):
        center = (i + 0.5) * scale
        start = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - start
        weights = [function((x + start - center + 0.5) * (1.0 / filterscale)) for x in range(count)]
        total = 0.0
        for w in weights:
            total += w
        if total != 0.0:
            weights = [w / total for w in weights]
        starts.append(start)
        windows.append([int((-0.5 if w < 0 else 0.5) + w * (1 << PRECISION_BITS)) for w in weights])
    table = np.zeros((out_size, max(len(w) for w in windows)), np.int32)
    for i, window in enumerate(windows):
        table[i, : len(window)] = window
    return np.asarray(starts, np.int32), table


@functools.lru_cache(maxsize=64)
def device_coefficients(
    in_size: int, out_size: int, filter: Filter, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pillow_coefficients` as int32 tensors on `device`, cached: after the first call for a size no
    host-to-device copy happens (so a kernel that reads them can be captured in a CUDA graph)."""
    starts, weights = pillow_coefficients(in_size, out_size, filter)
    return torch.from_numpy(starts).to(device), torch.from_numpy(weights).to(device)


def resize_uint8(image: torch.Tensor, size: tuple[int, int], filter: Filter = "bilinear") -> torch.Tensor:
    """uint8 (H, W, C) -> uint8 (*size, C), each channel on its own: `Image.resize((size[1], size[0]),
    filter)` of an L (C = 1) or RGB (C = 3) image, identical to the byte, where the tensor lives (RGBA
    Pillow premultiplies by alpha first: not this). The height must not shrink (see the module's note)."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 (H, W, C) image, got {image.dtype} {tuple(image.shape)}")
    height, width = size
    if min(height, width) < 1:
        raise ValueError(f"the size must be at least 1x1, got {height}x{width}")
    if height < image.shape[0]:
        raise ValueError(f"only enlarging the height is reproduced exactly: {image.shape[0]} -> {height}")
    rows = _resample(image.to(torch.int32), width, axis=1, filter=filter)  # Pillow's horizontal pass first
    return _resample(rows, height, axis=0, filter=filter).to(torch.uint8)


def to_input_size_on(device: torch.device, image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """`image_io.to_input_size` of a uint8 RGB image, the same bytes, its bicubic enlargement made on `device`:
    on a GPU a 12 MP photo's takes none of the 0.3 s of a host core that Pillow's does."""
    if geometry.scaled_size == geometry.input_size:
        return to_input_size(image, geometry, is_mask=False)
    cropped = torch.from_numpy(crop_padding(image, geometry)).to(device)
    return resize_uint8(cropped, geometry.input_size, "bicubic").cpu().numpy()


def _resample(pixels: torch.Tensor, size: int, axis: int, filter: Filter) -> torch.Tensor:
    """One pass along `axis` of int32 (H, W, C) values 0..255: int32 results 0..255 (Pillow's clip8)."""
    if pixels.shape[axis] == size:
        return pixels
    starts, weights = device_coefficients(pixels.shape[axis], size, filter, pixels.device)
    out_shape = (size, *pixels.shape[1:]) if axis == 0 else (pixels.shape[0], size, pixels.shape[2])
    weight_shape = (size, 1, 1) if axis == 0 else (1, size, 1)
    total = torch.full(out_shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=pixels.device)
    # A tap at a time: a 12 MP output's whole window at once would hold 5 of them (0.7 GB of int32).
    for tap in range(weights.shape[1]):
        # Past a window the weight is 0, so a clamped index reads any valid pixel harmlessly.
        sources = (starts + tap).clamp(max=pixels.shape[axis] - 1)
        total += pixels.index_select(axis, sources) * weights[:, tap].view(weight_shape)
    return (total >> PRECISION_BITS).clamp(0, 255)
