"""Instruction-guided localization (ZONE.md section 3): IP2P's cross-attention -> edit mask M_b.

Two halves:
- capture: an attention processor on the few cross-attention layers ZONE reads (those at 1/32 of
  the image size) that adds softmax(Q K^T) of the empty-prompt rows to one running (N, 77) sum. It
  never keeps a per-layer or per-step map, and its output is the plain SDPA output, unchanged.
- mask math: normalise, truncate, saturating subtract, bicubic resize, threshold, small-region
  removal — plain functions with the reference's exact integer semantics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .masks import remove_small_regions

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

# Rows of IP2P's UNet batch [c_T+image, empty+image, empty+zero] whose attention ZONE reads: the two
# empty-prompt branches (the reference keeps P[heads:] of the (3*heads, N, 77) probabilities).
EMPTY_PROMPT_ROWS = slice(1, 3)


# ---------------------------------------------------------------------------------------------- capture


# accumulate(total, query, key, scale): add sum over (R, heads) of softmax(q k^T * scale) into total, in place.
Accumulate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], None]


class AttentionAccumulator:
    """Running sum of cross-attention probabilities over (steps, layers, kept rows).

    `accumulate` does the in-place add; the default is the plain-torch reference, and the fused
    Triton kernel (kernels/attn_accumulate.py) has the same signature. The sum and its row count are
    device tensors updated in place: a compiled step reads no Python number that changes from call to
    call (torch.compile guards on such numbers, so a Python row count recompiled the step every step),
    and a captured CUDA graph updates both on replay.
    """

    def __init__(self, accumulate: Accumulate | None = None) -> None:
        self.accumulate = accumulate or accumulate_attention_probabilities
        self.total: torch.Tensor | None = None  # (N, 77) float32
        self.count: torch.Tensor | None = None  # () int64: rows summed into total

    def reserve(self, queries: int, keys: int, device: torch.device) -> None:
        """Allocate the (queries, keys) sum and its count unless they exist. A compiled step's caller
        reserves before the first call, so that every call traces the same code."""
        if self.total is None:
            self.total = torch.zeros(queries, keys, dtype=torch.float32, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def rows(self) -> int:
        """Rows summed so far (read from the device)."""
        return 0 if self.count is None else int(self.count)

    def add(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """query (R, heads, N, d), key (R, heads, 77, d): add sum_rows softmax(q k^T * scale)."""
        self.reserve(query.shape[2], key.shape[2], query.device)
        self.accumulate(self.total, query, key, scale)
        self.count += query.shape[0] * query.shape[1]

    def add_sum(self, total: torch.Tensor, rows: int) -> None:
        """Add an already-summed map (N, 77) holding `rows` rows (from an engine or a CUDA-graph replay)."""
        queries, keys = total.shape
        self.reserve(queries, keys, total.device)
        self.total.add_(total)
        self.count += rows

    def average(self) -> torch.Tensor:
        """Mean attention map (N, 77) over every recorded step, layer and row."""
        if self.total is None:
            raise RuntimeError("no cross-attention was recorded: the UNet has no layer at 1/32 of the image size")
        return self.total / self.count


def attention_probability_sum(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch reference for the fused accumulation kernel: (R, H, N, d), (R, H, K, d) -> (N, K) fp32."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    return scores.softmax(dim=-1).sum(dim=(0, 1))


def accumulate_attention_probabilities(
    total: torch.Tensor, query: torch.Tensor, key: torch.Tensor, scale: float
) -> None:
    """Plain-torch reference of the in-place accumulation: total (N, K) fp32 += attention_probability_sum."""
    total.add_(attention_probability_sum(query, key, scale))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)  # (B, heads, length, d)


class RecordingAttnProcessor:
    """Cross-attention computed with SDPA, as diffusers' AttnProcessor2_0, plus recording.

    The batch holds one group of 3 rows [c_T+image, empty+image, empty+zero] per edit; group b's
    kept rows go to `accumulators[b]`, so edits denoised together are recorded apart. The recorded
    probabilities are computed from the same Q and K beside the SDPA call, so the layer's output is
    exactly the fast path's.
    """

    def __init__(self, accumulators: Sequence[AttentionAccumulator], kept_rows: slice = EMPTY_PROMPT_ROWS) -> None:
        self.accumulators = list(accumulators)
        self.kept_rows = kept_rows

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **_: object) -> torch.Tensor:
        if hidden_states.ndim != 3 or attention_mask is not None or encoder_hidden_states is None:
            raise ValueError("RecordingAttnProcessor handles unmasked cross-attention on (B, N, C) states only")
        batch = hidden_states.shape[0]
        if batch != 3 * len(self.accumulators):
            raise ValueError(f"a batch of {batch} rows is not 3 rows for each of {len(self.accumulators)} edits")
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = _split_heads(attn.to_q(hidden_states), attn.heads)
        key = _split_heads(attn.to_k(context), attn.heads)
        value = _split_heads(attn.to_v(context), attn.heads)
        for accumulator, edit_query, edit_key in zip(self.accumulators, query.split(3), key.split(3), strict=True):
            accumulator.add(edit_query[self.kept_rows], edit_key[self.kept_rows], attn.scale)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[3]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _halve(size: tuple[int, int], times: int) -> tuple[int, int]:
    height, width = size
    for _ in range(times):  # a stride-2, padding-1, 3x3 convolution: ceil(s / 2)
        height, width = -(-height // 2), -(-width // 2)
    return height, width


def cross_attention_sizes(unet: UNet2DConditionModel) -> dict[str, int]:
    """Name of every down/up block cross-attention layer -> how many times its input was halved."""
    levels: dict[str, int] = {}
    level = 0
    for i, block in enumerate(unet.down_blocks):
        for name, _ in block.named_modules():
            if name.endswith("attn2"):
                levels[f"down_blocks.{i}.{name}"] = level
        level += block.downsamplers is not None
    for i, block in enumerate(unet.up_blocks):
        for name, _ in block.named_modules():
            if name.endswith("attn2"):
                levels[f"up_blocks.{i}.{name}"] = level
        level -= block.upsamplers is not None
    return levels


def recorded_layers(unet: UNet2DConditionModel, latent_size: tuple[int, int], grid: tuple[int, int]) -> list[str]:
    """The cross-attention layers whose query grid is `grid` (ceil(H/32) x ceil(W/32)).

    In SD1.5 at 512x512 these are 2 down and 3 up layers at 16x16; the mid block is not read.
    """
    return [name for name, level in cross_attention_sizes(unet).items() if _halve(latent_size, level) == grid]


ATTENTION_CELL = 32  # image pixels a side of one cell of the query grid ZONE reads (the VAE's 8, halved twice)


def attention_grid(latent_size: tuple[int, int]) -> tuple[int, int]:
    """The query grid ZONE reads: ceil(H/32) x ceil(W/32), i.e. the latent halved twice."""
    return _halve(latent_size, 2)


@contextmanager
def record_cross_attention(
    unet: UNet2DConditionModel, latent_size: tuple[int, int], grid: tuple[int, int],
    accumulator: AttentionAccumulator | Sequence[AttentionAccumulator] | None = None,
) -> Iterator[AttentionAccumulator | Sequence[AttentionAccumulator]]:
    """Install recording processors; the UNet's own processors come back afterwards.

    One accumulator records one edit (a batch of 3 rows); a sequence of B accumulators records B
    edits denoised together (3B rows), each into its own. Yields what it records into.
    """
    accumulator = accumulator if accumulator is not None else AttentionAccumulator()
    accumulators = [accumulator] if isinstance(accumulator, AttentionAccumulator) else accumulator
    modules = {name: unet.get_submodule(name) for name in recorded_layers(unet, latent_size, grid)}
    originals = {name: module.processor for name, module in modules.items()}
    try:
        for module in modules.values():
            module.set_processor(RecordingAttnProcessor(accumulators))
        yield accumulator
    finally:
        for name, module in modules.items():
            module.set_processor(originals[name])


# -------------------------------------------------------------------------------------------- mask math


@dataclass(frozen=True)
class Localization:
    mask_b: np.ndarray  # bool (H, W): the edit region, small components removed
    difference: np.ndarray  # uint8 (H, W): d = max(a1 - aL, 0) resized, for the heatmap view


def token_map_uint8(token_map: torch.Tensor) -> np.ndarray:
    """uint8(255 * m / max m) with the reference's truncating cast, computed in float32."""
    token_map = token_map.float().cpu()
    return (255 * token_map / token_map.max()).to(torch.uint8).numpy()


def difference_map(average: torch.Tensor, grid: tuple[int, int], last_token: int) -> np.ndarray:
    """d = saturate(a1 - aL) on the attention grid: average (N, 77) -> uint8 (h, w)."""
    maps = average.reshape(*grid, average.shape[-1])
    first = token_map_uint8(maps[..., 0]).astype(np.int16)
    last = token_map_uint8(maps[..., last_token]).astype(np.int16)
    return np.clip(first - last, 0, 255).astype(np.uint8)


def resize_bicubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (h, w) -> (H, W) with PIL's bicubic filter, the reference's resize."""
    height, width = size
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def threshold_difference(
    difference: np.ndarray, rule: Literal["reference", "paper"], reference_threshold: int = 108,
    paper_threshold: int = 128,
) -> np.ndarray:
    """Binary edit mask from d (uint8): reference min(2d, 255) <= 108; paper d < T."""
    if rule == "reference":
        return np.minimum(2 * difference.astype(np.int32), 255) <= reference_threshold
    return difference < paper_threshold


def binarize_reference(
    average: torch.Tensor, grid: tuple[int, int], last_token: int, size: tuple[int, int], *,
    rule: Literal["reference", "paper"] = "reference", reference_threshold: int = 108,
    paper_threshold: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """M_b before small-region removal (bool (H, W)) and the resized difference d (uint8 (H, W)).

    The reference composition; the fused kernel (kernels/mask_binarize.py) is bit-identical.
    """
    difference = resize_bicubic(difference_map(average, grid, last_token), size)
    return threshold_difference(difference, rule, reference_threshold, paper_threshold), difference


# binarize(average, grid, last_token, size, *, rule, reference_threshold, paper_threshold) -> (mask, difference)
Binarize = Callable[..., tuple[np.ndarray, np.ndarray]]


def localize(
    average: torch.Tensor, grid: tuple[int, int], last_token: int, size: tuple[int, int], *,
    rule: Literal["reference", "paper"] = "reference", reference_threshold: int = 108,
    paper_threshold: int = 128, min_area: int = 64, binarize: Binarize = binarize_reference,
) -> Localization:
    """M_b at `size` (the padded working size) from the averaged attention map."""
    mask, difference = binarize(
        average, grid, last_token, size, rule=rule, reference_threshold=reference_threshold,
        paper_threshold=paper_threshold,
    )
    return Localization(mask_b=remove_small_regions(np.asarray(mask, dtype=bool), min_area), difference=difference)


def heatmap_overlay(image: np.ndarray, difference: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """The attention difference map as a JET heatmap over the image (both (H, W[, 3]) uint8)."""
    colours = cv2.cvtColor(cv2.applyColorMap(difference, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1 - opacity, colours, opacity, 0)
