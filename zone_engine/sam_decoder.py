"""SAM's two-way transformer for many point prompts on one image, factored so that no per-prompt
projection of the image side is ever stored.

ZONE asks SAM's decoder about 1,024 point prompts on one image. SAM's `TwoWayTransformer` carries an
image side of (B, hw, C) = (B, 4096, 256) per prompt through its layers, and every attention layer
adds the positional encoding to it and projects it (keys, values, queries) before attending to the
prompt's 7 tokens. Those tensors are large and the arithmetic on them small, so the decoder is bound
by memory traffic (on a 2-core CPU: 2.5 to 5.5 s per batch of 64 prompts, a small part of it matmuls).

Attention to or from 7 tokens is low-rank, so the projections of the image side fold into the
tokens' side (T tokens, H heads, c = C'/H channels a head):
- tokens -> image: q·(W_k x + b_k) = (W_kᵀ q)·x + q·b_k, and the second term is constant along the
  softmax axis (it cancels); the values' projection and bias come after the weighted sum over the
  image, since the weights sum to one. The image side is read twice and nothing of its size written.
- image -> tokens: (W_q x + b_q)·k = x·(W_qᵀ k) + b_q·k; the output projection folds into the values
  (U = W_o,h v per head and token) and its bias into U too (b_o / H per head, weights summing to one
  per head), so the layer is `x + P U` in one batched product.
- the positional encoding is one (hw, C) tensor for every prompt: its part of each product is a
  matmul against the small token-side matrices, never a copy of the image side.

Same modules and weights as SAM's; the same function up to float rounding (reassociated sums and
softmax weights that sum to one within rounding): `tests/test_sam_decoder.py` states the tolerance.
SAM's own module is the reference (`MaskDecoder.transformer`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def two_way_transformer(
    transformer: nn.Module, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`TwoWayTransformer.forward` for B prompts on one image.

    image, image_pe: (1, C, h, w), shared by the prompts; tokens: (B, T, C) the prompts' tokens.
    Returns the tokens (B, T, C) and the image side (B, hw, C), as SAM's module does for `image`
    repeated B times.
    """
    if image.shape[0] != 1:
        raise ValueError(f"the prompts share one image: expected an embedding of shape (1, C, h, w), got "
                         f"{tuple(image.shape)}")
    keys = image.flatten(2).transpose(1, 2).contiguous()  # (1, hw, C): one image side until it mixes
    key_pe = image_pe.flatten(2).transpose(1, 2)  # (1, hw, C)
    queries = tokens
    for layer in transformer.layers:
        queries, keys = _attention_block(layer, queries, keys, tokens, key_pe)
    attended = _tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys, key_pe)
    queries = transformer.norm_final_attn(queries + attended)
    return queries, keys.expand(tokens.shape[0], -1, -1)


def _attention_block(
    layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`TwoWayAttentionBlock.forward`: the token-side steps through SAM's own modules, the two cross
    attentions factored."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    queries = layer.norm2(queries + _tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys, key_pe))
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = layer.norm4(_image_plus_tokens(layer.cross_attn_image_to_token, keys, key_pe, queries + query_pe, queries))
    return queries, keys


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., N, C') -> (..., heads, N, c), as SAM's `Attention._separate_heads`.

    Here and below, shapes are passed on as read from tensors, never `unflatten`ed: the ONNX tracer keeps
    sizes read so symbolic (the prompt and point counts vary), and freezes those `unflatten` computes."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads).transpose(-3, -2)


def _per_head(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """a (B, H, T, k) times m (H, k, n) -> (B, H, T, n): one product per head over every prompt's rows
    (a broadcast batched matmul would copy m once per prompt)."""
    batch, _, count, _ = a.shape
    return (a.transpose(0, 1).flatten(1, 2) @ m).reshape(m.shape[0], batch, count, -1).transpose(0, 1)


def _logits(tokens: torch.Tensor, projection: nn.Linear, x: torch.Tensor, x_pe: torch.Tensor) -> torch.Tensor:
    """Each head's tokens (B, H, T, c) dotted with `projection(x + x_pe)` -> (B, H, T, hw).

    x: (1 or B, hw, C); x_pe: (1, hw, C). What every prompt shares (the image side before it mixes
    with the tokens; the positional encoding) is projected once, as SAM does. A per-prompt x is never
    projected: t·(W x) = (Wᵀ t)·x, so its part is one product with the tokens folded through W.
    """
    heads = tokens.shape[1]
    shared = projection((x + x_pe if x.shape[0] == 1 else x_pe)[0])  # (hw, C'), the bias included
    logits = _per_head(tokens, _heads(shared, heads).transpose(1, 2))  # (B, H, T, hw)
    if x.shape[0] == 1:
        return logits
    folded = (tokens @ projection.weight.unflatten(0, (heads, -1))).flatten(1, 2)  # (B, HT, C)
    return logits.flatten(1, 2).baddbmm_(folded, x.transpose(1, 2)).reshape(logits.shape)


def _tokens_to_image(attention: nn.Module, q: torch.Tensor, x: torch.Tensor, x_pe: torch.Tensor) -> torch.Tensor:
    """SAM's `Attention(q=q, k=x + x_pe, v=x)` with the tokens as queries.

    q: (B, T, C); x: (1 or B, hw, C); x_pe: (1, hw, C). Returns (B, T, C).
    """
    heads, (batch, count, _) = attention.num_heads, q.shape
    q = _heads(attention.q_proj(q), heads)  # (B, H, T, c)
    weights = _logits(q / math.sqrt(q.shape[-1]), attention.k_proj, x, x_pe).softmax(-1)  # (B, H, T, hw)
    if x.shape[0] == 1:
        values = _per_head(weights, _heads(attention.v_proj(x[0]), heads))  # (B, H, T, c)
    else:  # Σ p (W_v x + b_v) = W_v Σ p x + b_v, the weights summing to one
        pooled = (weights.flatten(1, 2) @ x).reshape(batch, heads, count, -1)  # (B, H, T, C)
        w_v, b_v = attention.v_proj.weight.unflatten(0, (heads, -1)), attention.v_proj.bias.unflatten(0, (heads, 1, -1))
        values = pooled @ w_v.transpose(1, 2) + b_v
    return attention.out_proj(values.transpose(1, 2).reshape(batch, count, -1))


def _image_plus_tokens(
    attention: nn.Module, x: torch.Tensor, x_pe: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """x + SAM's `Attention(q=x + x_pe, k=k, v=v)` with the image side as queries (before norm4).

    x: (1 or B, hw, C); x_pe: (1, hw, C); k, v: (B, T, C). Returns (B, hw, C); a per-prompt x is
    updated in place (it is the block's own intermediate).
    """
    heads, batch = attention.num_heads, k.shape[0]
    k = _heads(attention.k_proj(k), heads)  # (B, H, T, c)
    # Laid out (B, H, T, hw), the softmax over T runs along rows of hw, not along 7-element rows.
    weights = _logits(k / math.sqrt(k.shape[-1]), attention.q_proj, x, x_pe).softmax(2)  # (B, H, T, hw)
    # W_o concat_h(Σ_t p v) + b_o = Σ_{h,t} p (W_o,h v + b_o / H): the weights sum to one per head.
    w_o = attention.out_proj.weight.unflatten(1, (heads, -1)).permute(1, 2, 0)  # (H, c, C)
    u = (_heads(attention.v_proj(v), heads) @ w_o + attention.out_proj.bias / heads).flatten(1, 2)  # (B, HT, C)
    weights = weights.flatten(1, 2).transpose(1, 2)  # (B, hw, HT)
    if x.shape[0] == 1:
        return torch.baddbmm(x.expand(batch, -1, -1), weights, u)
    return x.baddbmm_(weights, u)
