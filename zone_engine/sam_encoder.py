"""SAM's image encoder with its attention through `scaled_dot_product_attention`, relative positions included.

SAM's ViT adds decomposed relative-position terms to every attention map: for a query at (h, w) and a
key at (k_h, k_w), rel_h[h, w, k_h] + rel_w[h, w, k_w] (both from the query). Its `Attention` therefore
materialises each (heads, HW, HW) map, adds the two terms by broadcasting, then takes the softmax: in
a global layer of vit_b at 1024² that is 12 × 4096 × 4096 floats (805 MB) written and read several
times, ~3 s of a 21.5 s encoder pass per global layer on a 2-core CPU, the broadcast additions alone
1.7 s of it.

The two terms are a dot product too: with the query extended by its rel_h and rel_w rows and the key
by the one-hot codes of its row and column,
    [q·s, rel_h(q), rel_w(q)] · [k, onehot(k_h), onehot(k_w)] = s q·k + rel_h[k_h] + rel_w[k_w],
so SAM's attention is `scaled_dot_product_attention` (scale 1) on the extended vectors, and the fused
kernels never store the map. The values are padded with zeros to the extended width (the fused kernels
want one head dimension for all three) and the padding dropped from the output; every width is
rounded up to a multiple of 8 with zeros (a requirement of some fused CUDA kernels).

Same modules and weights as SAM's; the same function up to float rounding (the relative terms are
summed inside the dot product; the softmax is the kernel's). `tests/test_sam_encoder.py` bounds the
difference against SAM's own encoder in float64. SAM's `ImageEncoderViT.forward` is the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos, window_partition, window_unpartition
from torch import nn


def encode_image(encoder: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """`ImageEncoderViT.forward`: (B, 3, S, S) preprocessed -> embeddings (B, C, S/16, S/16)."""
    x = encoder.patch_embed(image)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks:
        x = _block(block, x)
    return encoder.neck(x.permute(0, 3, 1, 2))


def _block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM's `Block.forward` with `attention` in place of its `Attention.forward`."""
    shortcut, x = x, block.norm1(x)
    if block.window_size > 0:
        height, width = x.shape[1:3]
        x, padded = window_partition(x, block.window_size)
        x = window_unpartition(attention(block.attn, x), block.window_size, padded, (height, width))
    else:
        x = attention(block.attn, x)
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


def attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM's image-encoder `Attention.forward` on x (B, H, W, C) -> (B, H, W, C), through SDPA."""
    batch, height, width, _ = x.shape
    # (3, B, heads, HW, c), as SAM splits its qkv projection
    q, k, v = module.qkv(x).reshape(batch, height * width, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
    channels = q.shape[-1]
    if module.use_rel_pos:
        q, k = _with_relative_positions(module, q, k, (height, width))
    width_to = -(-q.shape[-1] // 8) * 8
    q, k, v = (F.pad(t, (0, width_to - t.shape[-1])) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0 if module.use_rel_pos else module.scale)
    out = out[..., :channels].permute(0, 2, 1, 3).reshape(batch, height, width, -1)
    return module.proj(out)


def _with_relative_positions(
    module: nn.Module, q: torch.Tensor, k: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, heads, HW, c) -> [q·scale, rel_h(q), rel_w(q)], [k, onehot(k_h), onehot(k_w)]:
    their dot product is SAM's scaled q·k plus `add_decomposed_rel_pos`'s two terms."""
    height, width = size
    rel_h_table = get_rel_pos(height, height, module.rel_pos_h)  # (H, H, c): [query row, key row]
    rel_w_table = get_rel_pos(width, width, module.rel_pos_w)  # (W, W, c)
    grid = q.reshape(*q.shape[:2], height, width, -1)  # (B, heads, H, W, c), unscaled as SAM takes it
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, rel_h_table).flatten(2, 3)  # (B, heads, HW, H)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, rel_w_table).flatten(2, 3)  # (B, heads, HW, W)
    rows = torch.eye(height, dtype=k.dtype, device=k.device).repeat_interleave(width, 0)  # (HW, H)
    columns = torch.eye(width, dtype=k.dtype, device=k.device).repeat(height, 1)  # (HW, W)
    codes = torch.cat([rows, columns], 1).expand(*k.shape[:2], -1, -1)  # key (k_h, k_w) at k_h·W + k_w
    return torch.cat([q * module.scale, rel_h, rel_w], -1), torch.cat([k, codes], -1)
