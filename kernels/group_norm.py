"""Kernel 3: GroupNorm in the input's own memory layout (the UNets' and VAE's norms).

    y = (x - mean_g) / sqrt(var_g + eps) * weight_c + bias_c

over x (N, C, *spatial), mean and (biased) variance per (sample, group of C/G channels), in fp32.

Why: PyTorch's CUDA GroupNorm works only on NCHW-contiguous tensors. A channels-last UNet (NHWC, the
layout of the GPUs' fastest fp16 convolutions) pays two layout conversions around every norm (its own
`.contiguous()`, and the next convolution's back to NHWC), and its statistics pass runs one thread block
per (sample, group): 32 blocks for one image. Profiled on an H200 at 512² with NCHW UNets: 139 ms of
cuDNN's NCHW->NHWC conversions and 50.7 ms of `RowwiseMoments` in a 527 ms denoising stage; NHWC UNets
then made the step only 10.5 % faster, the norms converting back and forth (benchmarks/RESULTS.md).
This kernel reads the tensor through its strides, NHWC or NCHW alike, and writes y in the same layout
(H200, 2026-12-04: the UNets' largest norm 28 us from a CUDA graph, 2.4x its memory floor; the captured
channels-last dual step 17.7 ms with it against 22.7 ms with PyTorch's; eager, its launches make the step
slower than PyTorch's, so the engine's auto takes it only where the calls are captured).

Three launches; the stats and apply kernels over (samples) x (blocks of BLOCK_C adjacent channels) x
(chunks of BLOCK_HW spatial positions), the moments kernel over (samples) x (blocks of groups):
    _channel_stats_kernel     each chunk's mean and sum of squared deviations, per channel, from one tile
    _group_moments_kernel     each group's mean and 1/sqrt(var + eps) from its channels' chunk statistics
                              (Chan et al.'s parallel variance: no E[x^2] - E[x]^2 cancellation), in a fixed order
    _group_norm_apply_kernel  normalise a tile, apply weight and bias, store in y's layout
x is read twice and y written once; the statistics are two floats a channel and chunk (6 % of an fp16
x's bytes at 64 positions a chunk). Deterministic. Tiles are blocks of channels, not of groups: SD1.5's groups are
4 to 80 channels wide (UNets 10 to 80), and a tile of whole groups padded to a power of two (up to 128 lanes)
compiled on NHWC to 2-byte loads with up to 37.5 % of lanes masked (sm_90 PTX); a block of 64 adjacent channels
is 16-byte vector loads, whatever the groups (tests/gpu_compile.py checks it). Groups straddle channel
blocks; statistics per channel let the moments kernel combine them. A ResNet block's sum with its time
embedding (a constant per sample and channel: it moves the chunk means, not their M2) and the SiLU after its
norms ride along in the moments and apply kernels (`addend`, `silu`; `resnet_forward` calls them so).

Public API:
    group_norm(x, num_groups, weight, bias, eps)          guarded: kernel when usable, else PyTorch's
    group_norm_triton(x, num_groups, weight, bias, eps)   the launcher (always launches, or ValueError)
    group_norm_reference(...)                             torch.nn.functional.group_norm
    torch.ops.zone.group_norm                             the custom op (fake impl registered)
    triton_group_norms(*modules)                          context: their affine nn.GroupNorms run `group_norm`,
                                                          their ResnetBlock2Ds `resnet_forward` (fused norms)
    benchmark(...)                                        (a) torch on NHWC, (b) torch on NCHW, (c) kernel
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F

from zone_kernels.runtime import benchmark_rows, can_launch, is_interpreted, traced

TILE_ELEMENTS = 4096  # a program's tile on a GPU: 8 KB of fp16, enough loads in flight to hide the latency


@triton.jit
def _tile_offsets(x_ptr, sample, channel_block, chunk, C, HW, stride_n, stride_c, stride_hw,
                  BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Pointers (BLOCK_HW, BLOCK_C) to a program's tile, which of them are in the tensor, and its channels.
    A tile is a block of adjacent channels, whatever their groups: on NHWC its rows are runs of BLOCK_C
    adjacent elements (vector loads for any group width), on NCHW its columns runs of BLOCK_HW."""
    offs_hw = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (offs_hw[:, None] < HW) & (offs_c[None, :] < C)
    ptrs = x_ptr + sample * stride_n + offs_c[None, :] * stride_c + offs_hw[:, None] * stride_hw
    return ptrs, inside, offs_c


@triton.jit
def _channel_stats_kernel(
    x_ptr, mean_ptr, m2_ptr, C, HW, stride_xn, stride_xc, stride_xhw, CHUNKS,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Each chunk's mean and sum of squared deviations from it, per channel: (N, C, CHUNKS) each."""
    sample, channel_block, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ptrs, inside, offs_c = _tile_offsets(x_ptr, sample, channel_block, chunk, C, HW, stride_xn, stride_xc, stride_xhw,
                                         BLOCK_C, BLOCK_HW)
    x = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    count = tl.minimum(HW - chunk * BLOCK_HW, BLOCK_HW).to(tl.float32)
    # The corrected two-pass form (Chan, Golub & LeVeque): deviations d from a first estimate of the mean, then
    # mean = estimate + sum(d) / n and M2 = sum(d^2) - sum(d)^2 / n. A plain fp32 sum of 4,096 values around
    # 1e4 misses the mean by more than the variance's digits can take; the sums of d are of the data's spread.
    estimate = tl.sum(x, axis=0) / count  # (BLOCK_C,)
    deviation = tl.where(inside, x - estimate[None, :], 0.0)
    drift = tl.sum(deviation, axis=0)
    stats = (sample * C + offs_c) * CHUNKS + chunk
    tl.store(mean_ptr + stats, estimate + drift / count, mask=offs_c < C)
    tl.store(m2_ptr + stats, tl.sum(deviation * deviation, axis=0) - drift * drift / count, mask=offs_c < C)


@triton.jit
def _partial_block(sample, offs_g, start, HW, GROUPS, PARTIALS, CHUNKS, CHUNK_HW, BLOCK_P: tl.constexpr):
    """The groups' partial statistics start..start + BLOCK_P, (BLOCK_G, BLOCK_P): their offsets, which exist, and
    how many elements each holds (0 where none). A group's partials are its channels' chunk statistics, one
    run of PARTIALS = CPG * CHUNKS in the (N, C, CHUNKS) arrays, partial p being chunk p % CHUNKS."""
    offs_p = start + tl.arange(0, BLOCK_P)
    present = (offs_g[:, None] < GROUPS) & (offs_p[None, :] < PARTIALS)
    counts = tl.where(present, tl.minimum(HW - (offs_p % CHUNKS) * CHUNK_HW, CHUNK_HW).to(tl.float32)[None, :], 0.0)
    return (sample * GROUPS + offs_g[:, None]) * PARTIALS + offs_p[None, :], present, counts


@triton.jit
def _chunk_mean(chunk_mean_ptr, addend_ptr, stats, present, CHUNKS, ADDEND: tl.constexpr):
    """The chunk means at offsets `stats` of the (N, C, CHUNKS) arrays, plus their channels' addend (N, C)."""
    chunk_mean = tl.load(chunk_mean_ptr + stats, mask=present, other=0.0)
    if ADDEND:
        chunk_mean += tl.load(addend_ptr + stats // CHUNKS, mask=present, other=0.0).to(tl.float32)
    return chunk_mean


@triton.jit
def _group_moments_kernel(
    chunk_mean_ptr, chunk_m2_ptr, addend_ptr, mean_ptr, rstd_ptr, HW, group_size, eps, GROUPS, PARTIALS, CHUNKS,
    CHUNK_HW, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, ADDEND: tl.constexpr,
):
    """Each group's mean and 1/sqrt(var + eps), (N, GROUPS) each, from its partials (Chan, Golub & LeVeque's
    parallel variance, M2 = sum m2_k + n_k (mean_k - mean)^2: no E[x^2] - E[x]^2 cancellation), BLOCK_P
    partials at a time: one pass for the mean, one for M2. `group_size` (CPG * HW, a float from the host):
    Triton compiles an int argument equal to 1 as a constant, on which no tensor method runs. The passes are
    `while` loops, bounded at run time: one compilation for any map size (an unrolled loop grew with the map),
    and triton 3.6's interpreter refuses a run-time `range` bound (NumPy 2.4), not a `while` condition.
    ADDEND: the norm is of x + addend (N, C), a constant per channel: it moves each chunk's mean, not its M2."""
    sample, group_block = tl.program_id(0), tl.program_id(1)
    offs_g = group_block * BLOCK_G + tl.arange(0, BLOCK_G)
    weighted = tl.zeros([BLOCK_G], dtype=tl.float32)
    start = 0
    while start < PARTIALS:
        stats, present, counts = _partial_block(sample, offs_g, start, HW, GROUPS, PARTIALS, CHUNKS, CHUNK_HW, BLOCK_P)
        chunk_mean = _chunk_mean(chunk_mean_ptr, addend_ptr, stats, present, CHUNKS, ADDEND)
        weighted += tl.sum(counts * chunk_mean, axis=1)
        start += BLOCK_P
    mean = weighted / group_size  # (BLOCK_G,)
    m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
    start = 0
    while start < PARTIALS:
        stats, present, counts = _partial_block(sample, offs_g, start, HW, GROUPS, PARTIALS, CHUNKS, CHUNK_HW, BLOCK_P)
        spread = _chunk_mean(chunk_mean_ptr, addend_ptr, stats, present, CHUNKS, ADDEND) - mean[:, None]
        m2 += tl.sum(tl.load(chunk_m2_ptr + stats, mask=present, other=0.0) + counts * spread * spread, axis=1)
        start += BLOCK_P
    group = sample * GROUPS + offs_g
    tl.store(mean_ptr + group, mean, mask=offs_g < GROUPS)
    tl.store(rstd_ptr + group, 1.0 / tl.sqrt(m2 / group_size + eps), mask=offs_g < GROUPS)


@triton.jit
def _group_norm_apply_kernel(
    x_ptr, y_ptr, weight_ptr, bias_ptr, addend_ptr, mean_ptr, rstd_ptr, C, HW,
    stride_xn, stride_xc, stride_xhw, stride_yn, stride_yc, stride_yhw, GROUPS, CPG,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ADDEND: tl.constexpr, SILU: tl.constexpr,
):
    """y = (x + addend - mean) * rstd * weight + bias over a program's tile, then SiLU if asked, stored in y's
    layout (addend: (N, C) where ADDEND, else none)."""
    sample, channel_block, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    x_ptrs, inside, offs_c = _tile_offsets(x_ptr, sample, channel_block, chunk, C, HW, stride_xn, stride_xc,
                                           stride_xhw, BLOCK_C, BLOCK_HW)
    y_ptrs, _, _ = _tile_offsets(y_ptr, sample, channel_block, chunk, C, HW, stride_yn, stride_yc, stride_yhw,
                                 BLOCK_C, BLOCK_HW)
    in_c = offs_c < C
    group = sample * GROUPS + offs_c // CPG  # each channel's group: a gather from N x GROUPS floats
    mean = tl.load(mean_ptr + group, mask=in_c, other=0.0)
    if ADDEND:
        mean -= tl.load(addend_ptr + sample * C + offs_c, mask=in_c, other=0.0).to(tl.float32)
    scale = tl.load(weight_ptr + offs_c, mask=in_c, other=0.0).to(tl.float32) * tl.load(rstd_ptr + group, mask=in_c,
                                                                                      other=0.0)
    shift = tl.load(bias_ptr + offs_c, mask=in_c, other=0.0).to(tl.float32)
    x = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=inside)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_arguments(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                     addend: torch.Tensor | None = None) -> None:
    """ValueError unless x (N, C, *spatial) floating, C divisible by num_groups, weight and bias (C,), addend
    None or (N, C)."""
    if x.ndim < 2:
        raise ValueError(f"group_norm needs x of shape (N, C, *spatial), got {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    for name, parameter in (("weight", weight), ("bias", bias)):
        if parameter.shape != (channels,) or not parameter.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating ({channels},) tensor, got {parameter.dtype} "
                             f"{tuple(parameter.shape)}")
        if parameter.device != x.device:
            raise ValueError(f"{name} is on {parameter.device}, x on {x.device}: one device for all")
    if addend is not None and (addend.shape != x.shape[:2] or not addend.dtype.is_floating_point
                               or addend.device != x.device):
        raise ValueError(f"addend must be a floating {tuple(x.shape[:2])} tensor on {x.device}, got "
                         f"{addend.dtype} {tuple(addend.shape)} on {addend.device}")


def _kernel_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  addend: torch.Tensor | None = None) -> str | None:
    """Why the kernels cannot take these tensors, or None: fp16/bf16/fp32 only, and 32-bit offsets."""
    tensors = _given(x, weight, bias, addend)
    if not all(tensor.dtype in _DTYPES for tensor in tensors):
        return f"the kernel takes fp16, bf16 or fp32, got {', '.join(str(tensor.dtype) for tensor in tensors)}"
    span = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride(), strict=True) if size)
    if x.numel() >= 2**31 or span >= 2**31:
        return "the kernel's offsets are 32-bit: a tensor spanning 2^31 elements goes to PyTorch"
    return None


def _given(*tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The tensors of a call that were given (the addend is optional)."""
    return tuple(tensor for tensor in tensors if tensor is not None)


def spatial_stride(x: torch.Tensor) -> int | None:
    """The one stride that walks x's spatial dims as a single flat axis, or None when they are not
    laid out as one (NCHW: 1; NHWC: C; a (B, C, L) view of (B, L, C): C). Size-1 dims take no step."""
    dims = [(size, stride) for size, stride in zip(x.shape[2:], x.stride()[2:], strict=True) if size > 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:], strict=False):  # each dim with the next
        if outer != size * inner:
            return None
    return dims[-1][1] if dims else 1


def output_like(x: torch.Tensor) -> torch.Tensor:
    """The kernels' output for x: x's layout when its spatial dims walk as one axis, else contiguous."""
    return torch.empty_like(x if spatial_stride(x) is not None else x.contiguous())


def group_norm_triton(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      blocks: tuple[int, int] | None = None, *, addend: torch.Tensor | None = None,
                      silu: bool = False) -> torch.Tensor:
    """Launch the kernels; y in x's layout (`output_like`). `blocks`: (channels, spatial positions) a
    program's tile covers (None: the launcher's choice; tests pick small ones: many chunks, channel blocks).
    `addend`, `silu`: as `group_norm`'s."""
    _check_arguments(x, num_groups, weight, bias, addend)
    if (reason := _kernel_takes(x, weight, bias, addend)) is not None:
        raise ValueError(reason)
    return _launch(x, num_groups, weight, bias, eps, blocks, addend, silu)


def _launch(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            blocks: tuple[int, int] | None = None, addend: torch.Tensor | None = None,
            silu: bool = False) -> torch.Tensor:
    if (x_step := spatial_stride(x)) is None:
        x = x.contiguous()
        x_step = spatial_stride(x)
    y = torch.empty_like(x)  # x's spatial dims walk as one axis now: `output_like` is x's own layout
    if x.numel() == 0:
        return y
    weight, bias = weight.contiguous(), bias.contiguous()  # addressed as weight_ptr + channel
    # addressed as addend_ptr + sample * C + channel; without one, x stands in for the unread pointer
    addend_or_x = x if addend is None else addend.contiguous()
    samples, channels, positions = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    plan = LaunchPlan.of(channels, num_groups, positions, x.stride(1) == 1, is_interpreted(_channel_stats_kernel),
                         blocks)
    chunk_stats = torch.empty(2, samples * channels * plan.chunks, device=x.device, dtype=torch.float32)
    moments = torch.empty(2, samples * num_groups, device=x.device, dtype=torch.float32)  # mean, rstd
    grid = (samples, triton.cdiv(channels, plan.block_c), plan.chunks)
    x_strides = (x.stride(0), x.stride(1), x_step)
    y_strides = (y.stride(0), y.stride(1), spatial_stride(y))
    per_group = channels // num_groups
    _channel_stats_kernel[grid](x, chunk_stats[0], chunk_stats[1], channels, positions, *x_strides, plan.chunks,
                                **plan.tile)
    _group_moments_kernel[(samples, triton.cdiv(num_groups, plan.moments_g))](
        chunk_stats[0], chunk_stats[1], addend_or_x, moments[0], moments[1], positions, float(positions * per_group),
        float(eps), num_groups, per_group * plan.chunks, plan.chunks, plan.block_hw, **plan.moments,
        ADDEND=addend is not None)
    _group_norm_apply_kernel[grid](x, y, weight, bias, addend_or_x, moments[0], moments[1], channels, positions,
                                   *x_strides, *y_strides, num_groups, per_group, **plan.tile,
                                   ADDEND=addend is not None, SILU=silu)
    return y


# At most, adjacent channels (NHWC) a tile row reads: a 128-byte line of fp16. Wider rows would leave fewer positions
# a tile, so more chunks: the statistics (8 bytes a channel and chunk) grow to 1/8 of the tile's bytes at 128.
CHANNEL_BLOCK = 64
VECTOR_CHANNELS = 16  # a channel block that divides C is a power of two at least this wide, or C's own
INTERPRETED_TILE = 2**18  # a quarter of Triton's largest block


@dataclass(frozen=True)
class LaunchPlan:
    """The compile-time shape of one GroupNorm's three launches. Only tiles are compile-time: channel,
    group and chunk counts and lengths are run-time values, so SD1.5's UNets and VAE (every norm shape of an edit)
    compile a handful of kernel configurations, not one per shape."""

    block_c: int  # channels a stats/apply program covers
    block_hw: int  # positions a chunk holds
    chunks: int
    moments_g: int  # groups a moments program covers
    block_p: int  # partial statistics (a channel's chunk) a moments program reads at a time

    @classmethod
    def of(cls, channels: int, groups: int, positions: int, channels_adjacent: bool, interpreted: bool,
           blocks: tuple[int, int] | None = None) -> LaunchPlan:
        block_c, block_hw = blocks or tile_shape(channels, positions, channels_adjacent, interpreted)
        chunks = triton.cdiv(positions, block_hw)
        partials = channels // groups * chunks
        tile = INTERPRETED_TILE if interpreted else TILE_ELEMENTS
        block_p = min(triton.next_power_of_2(partials), tile)
        moments_g = max(1, min(triton.next_power_of_2(groups), tile // block_p))
        return cls(block_c, block_hw, chunks, moments_g, block_p)

    @property
    def tile(self) -> dict[str, int]:
        """The stats and apply kernels' compile-time arguments."""
        return {"BLOCK_C": self.block_c, "BLOCK_HW": self.block_hw}

    @property
    def moments(self) -> dict[str, int]:
        """The moments kernel's compile-time arguments."""
        return {"BLOCK_G": self.moments_g, "BLOCK_P": self.block_p}


def tile_shape(channels: int, positions: int, channels_adjacent: bool, interpreted: bool) -> tuple[int, int]:
    """(channels, positions) a program covers: about TILE_ELEMENTS in all, whatever the map's size (a large
    map has more chunks, not larger tiles). NHWC: rows of adjacent channels, a power of two that divides C
    where one of at least VECTOR_CHANNELS does (SD1.5's 128 to 2560: 64; no masked lanes), up to
    CHANNEL_BLOCK; NCHW: long runs of positions, as few channels as fill the tile. The interpreter pays per
    operation, not per element: every channel, and tiles up to INTERPRETED_TILE."""
    if interpreted:
        block_c, tile = triton.next_power_of_2(channels), INTERPRETED_TILE
    elif channels_adjacent:
        divisor = min(channels & -channels, CHANNEL_BLOCK)  # the largest power of two dividing C
        block_c = divisor if divisor >= VECTOR_CHANNELS else min(triton.next_power_of_2(channels), CHANNEL_BLOCK)
        tile = TILE_ELEMENTS
    else:
        block_hw = min(triton.next_power_of_2(positions), TILE_ELEMENTS)
        return max(1, min(triton.next_power_of_2(channels), TILE_ELEMENTS // block_hw)), block_hw
    return block_c, max(1, min(tile // block_c, triton.next_power_of_2(positions)))


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         addend: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """PyTorch's own GroupNorm (NCHW on CUDA: it converts other layouts first), of x + addend and then SiLU as
    diffusers' ResnetBlock2D computes them (the sum in x's dtype)."""
    if addend is not None:
        x = x + addend.to(x.dtype).reshape(*addend.shape, *(1,) * (x.ndim - 2))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


@torch.library.custom_op("zone::group_norm", mutates_args=())
def _group_norm_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   addend: torch.Tensor | None, silu: bool) -> torch.Tensor:
    if _launchable(x, weight, bias, addend):
        return group_norm_triton(x, num_groups, weight, bias, eps, addend=addend, silu=silu)
    # In the fake's layout either way: PyTorch's CUDA norm returns NCHW whatever it was given.
    return output_like(x).copy_(group_norm_reference(x, num_groups, weight, bias, eps, addend, silu))


@_group_norm_op.register_fake
def _(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
      addend: torch.Tensor | None, silu: bool) -> torch.Tensor:
    _check_arguments(x, num_groups, weight, bias, addend)
    return output_like(x)


def _launchable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, addend: torch.Tensor | None) -> bool:
    tensors = _given(x, weight, bias, addend)
    # A call that autograd must record goes to PyTorch: the kernels have no backward.
    needs_grad = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)
    return (not needs_grad and _kernel_takes(x, weight, bias, addend) is None
            and can_launch(_channel_stats_kernel, x.device, tuple(tensor.dtype for tensor in tensors)))


def runs_on(device: torch.device) -> bool:
    """Whether the kernel can launch on `device` here (else `group_norm` runs PyTorch's)."""
    return can_launch(_channel_stats_kernel, device)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
               addend: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """GroupNorm of x (N, C, *spatial) with per-channel weight and bias, y in x's memory layout
    (`output_like`: contiguous where x's spatial dims do not walk as one axis). `addend` (N, C): the norm is of
    x + addend (a constant per sample and channel, as a ResNet block's time embedding); `silu`: SiLU(y). Both
    in the kernel's one pass over y: no tensor the size of x for the sum, none for the activation.

    Runs the kernels when Triton can run here on these tensors (fp16/bf16/fp32, offsets within 32 bits,
    no autograd to record; traced calls through `zone::group_norm`, eager calls and CUDA-graph capture
    launch directly); otherwise PyTorch's.
    """
    _check_arguments(x, num_groups, weight, bias, addend)
    if not _launchable(x, weight, bias, addend):
        return group_norm_reference(x, num_groups, weight, bias, eps, addend, silu)
    if traced(*_given(x, weight, bias, addend)):
        return torch.ops.zone.group_norm(x, num_groups, weight, bias, float(eps), addend, silu)
    return _launch(x, num_groups, weight, bias, eps, None, addend, silu)


@contextlib.contextmanager
def triton_group_norms(*modules: nn.Module) -> Iterator[int]:
    """Within the block every affine nn.GroupNorm in `modules` (without a forward of its own already:
    an outer scope's, or a hook library's) runs `group_norm`, and every diffusers ResnetBlock2D in SD's
    configuration runs `resnet_forward` (its norms fused with their SiLU and the time embedding's sum);
    afterwards their classes' forwards again. Yields how many norms were switched.

    A scope, not a module swap: the models are shared with callers that must keep PyTorch's norm (the
    eager reference, the benchmarks' baseline), as the recording attention processors are installed
    around a denoise only (zone_engine.localize.record_cross_attention). Another thread running the same
    modules meanwhile runs the kernel too (the same results up to rounding): the engine's pipelines hold
    a lock per edit, and pipelines that share models in several threads should share the pipeline. A
    module deep-copied inside the block keeps running the kernel, on its own weights.
    """
    blocks = [block for module in modules for block in module.modules() if fusable_resnet(block)]
    norms = [norm for module in modules for norm in module.modules()
             if isinstance(norm, nn.GroupNorm) and norm.affine and "forward" not in vars(norm)]
    try:
        for norm in norms:
            norm.forward = types.MethodType(_kernel_forward, norm)
        for block in blocks:
            block.forward = types.MethodType(resnet_forward, block)
        yield len(norms)
    finally:
        for module in (*norms, *blocks):
            vars(module).pop("forward", None)


def _kernel_forward(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def fusable_resnet(module: nn.Module) -> bool:
    """Whether `module` is diffusers' ResnetBlock2D as SD's UNets and VAE use it, which `resnet_forward`
    computes: the class's own forward, the default time-embedding norm, no resampling inside the block, SiLU,
    affine GroupNorms, no forward of its own already (an outer scope's), and no hooks on the norms or the
    activation (`resnet_forward` does not call those modules, so their hooks would not run)."""
    if type(module).forward is not _resnet_block_class().forward or "forward" in vars(module):
        return False
    inner = (module.norm1, module.norm2, module.nonlinearity)
    return (module.time_embedding_norm == "default" and module.upsample is None and module.downsample is None
            and not module.skip_time_act and isinstance(module.nonlinearity, nn.SiLU)
            and all(isinstance(norm, nn.GroupNorm) and norm.affine and "forward" not in vars(norm)
                    for norm in inner[:2])
            and not any(part._forward_hooks or part._forward_pre_hooks for part in inner))


@functools.cache
def _resnet_block_class() -> type:
    from diffusers.models.resnet import ResnetBlock2D  # imported once: the scope asks of every module of a model

    return ResnetBlock2D


def resnet_forward(block: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args,
                   **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward for a `fusable_resnet` block in inference, with each norm and the SiLU
    after it one `group_norm` call, the time embedding added inside the second: three passes over the block's
    activations fewer (the sum, two activations), and no division by an output scale of 1. Where PyTorch's
    norm runs instead (no kernel here), the same operations as diffusers' (0.42), in its order. Training,
    deprecated arguments, and a time embedding that is missing, unprojected or not one row a sample take
    diffusers' own forward (its broadcasting or its error)."""
    if (block.training or args or kwargs or (temb is None) != (block.time_emb_proj is None)
            or (temb is not None and temb.shape[0] != input_tensor.shape[0])):
        return type(block).forward(block, input_tensor, temb, *args, **kwargs)
    hidden = block.conv1(_norm_and_silu(block.norm1, input_tensor))
    addend = None if temb is None else block.time_emb_proj(block.nonlinearity(temb))  # (N, C)
    hidden = block.conv2(block.dropout(_norm_and_silu(block.norm2, hidden, addend)))
    shortcut = input_tensor if block.conv_shortcut is None else block.conv_shortcut(input_tensor)
    output = shortcut + hidden
    return output if block.output_scale_factor == 1 else output / block.output_scale_factor  # x / 1 is x


def _norm_and_silu(norm: nn.GroupNorm, x: torch.Tensor, addend: torch.Tensor | None = None) -> torch.Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, addend=addend, silu=True)


# ------------------------------------------------------------------------------------------- benchmark


def benchmark(
    device: str | torch.device | None = None, *, shape: tuple[int, int, int, int] = (6, 320, 64, 64),
    groups: int = 32, dtype: torch.dtype | None = None, seed: int = 0, fused: bool = False,
) -> list[dict]:
    """SD1.5's largest UNet norm at 512x512 by default: 6 rows (two UNets x 3 guidance rows) x 320 x 64 x 64.
    `fused`: a ResNet block's second norm instead, x + time embedding, GroupNorm, SiLU, as diffusers runs it
    (three PyTorch ops) against one kernel call.

    Returns one dict per variant: name, time_ms (do_bench median on CUDA, None elsewhere), bytes (a
    model of the DRAM traffic, see below), max_abs_diff against the same function in fp64.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    nchw = (torch.randn(shape, generator=generator) * 2 + 0.5).to(device, dtype)
    nhwc = nchw.to(memory_format=torch.channels_last)
    weight = (1 + 0.1 * torch.randn(channels, generator=generator)).to(device, dtype)
    bias = (0.1 * torch.randn(channels, generator=generator)).to(device, dtype)
    addend = torch.randn(shape[:2], generator=generator).to(device, dtype) if fused else None
    exact = group_norm_reference(nchw.double(), groups, weight.double(), bias.double(), 1e-5,
                                 None if addend is None else addend.double(), fused)

    size = nchw.numel() * nchw.element_size()
    # Traffic model: PyTorch reads x twice (statistics, then normalise) and writes y once; on an NHWC x
    # it first writes and reads an NCHW copy (its output is NCHW: the next NHWC convolution converts it
    # back, one more read and write not counted here); the sum and SiLU read and write once each. The kernel
    # reads x twice and writes y once, and writes its per-channel chunk statistics once and reads them twice
    # (the moments kernel's two passes), whatever it fuses.
    plan = LaunchPlan.of(channels, groups, math.prod(shape[2:]), True, is_interpreted(_channel_stats_kernel))
    kernel_bytes = 3 * size + 3 * 2 * 4 * shape[0] * channels * plan.chunks
    if fused:
        variants = {
            "a: PyTorch on NHWC: + time embedding, norm, SiLU": (
                lambda: group_norm_reference(nhwc, groups, weight, bias, 1e-5, addend, True), 9 * size),
            "c: Triton kernel on NHWC, the three fused": (
                lambda: group_norm(nhwc, groups, weight, bias, 1e-5, addend=addend, silu=True), kernel_bytes),
        }
    else:
        variants = {
            "a: PyTorch on NHWC (converts to NCHW)": (lambda: group_norm_reference(nhwc, groups, weight, bias, 1e-5),
                                                      5 * size),
            "b: PyTorch on NCHW": (lambda: group_norm_reference(nchw, groups, weight, bias, 1e-5), 3 * size),
            "c: Triton kernel on NHWC": (lambda: group_norm(nhwc, groups, weight, bias, 1e-5), kernel_bytes),
        }

    def check(out: torch.Tensor) -> dict:
        return {"max_abs_diff": (out.double() - exact).abs().max().item()}

    return benchmark_rows(variants, check, device,
                          lambda: torch.ops.zone.group_norm(nhwc, groups, weight, bias, 1e-5, addend, fused))
