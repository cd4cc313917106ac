"""sam_encoder.encode_image: SAM's image encoder with its attention (relative positions included) through SDPA.

Reference: segment-anything's own `ImageEncoderViT` in float64. The relative-position terms are summed
inside the extended dot product and the softmax is the fused kernel's, so the bound is the one of
test_sam_decoder.py: within twice SAM's own float32 error plus 1e-6 of the output's magnitude
(measured with the random position embedding, seed 0: 0.65e-6 to 0.81e-6 of the magnitude against SAM's
own 0.52e-6 to 0.76e-6).
The relative-position tables and the absolute position embedding are drawn at random: SAM initialises
them to zero, which would hide them.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

from zone_engine.sam_encoder import encode_image

# image side, patch grid side = image // 16; window 0 = every layer global
ENCODERS = {
    "tiny-sam": dict(depth=2, embed_dim=32, img_size=64, num_heads=2, window_size=2, global_attn_indexes=(1,)),
    "padded-windows": dict(depth=3, embed_dim=48, img_size=112, num_heads=3, window_size=3, global_attn_indexes=(2,)),
    "no-relative-positions": dict(depth=2, embed_dim=32, img_size=80, num_heads=4, window_size=2,
                                  global_attn_indexes=(0,), use_rel_pos=False),
}


def random_encoder(name: str, device: str) -> ImageEncoderViT:
    torch.manual_seed(len(name))
    settings = {"use_rel_pos": True, **ENCODERS[name]}
    encoder = ImageEncoderViT(**settings, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), patch_size=16,
                              qkv_bias=True, out_chans=16).eval()
    torch.nn.init.normal_(encoder.pos_embed, std=0.5)  # SAM initialises it to zero too: would hide a dropped one
    for module in encoder.modules():
        if getattr(module, "use_rel_pos", False):
            torch.nn.init.normal_(module.rel_pos_h, std=0.5)
            torch.nn.init.normal_(module.rel_pos_w, std=0.5)
    return encoder.to(device)


def check_against_float64(name: str, device: str) -> None:
    encoder = random_encoder(name, device)
    image = torch.randn(2, 3, encoder.img_size, encoder.img_size, device=device)
    with torch.inference_mode():
        reference = copy.deepcopy(encoder).double()(image.double())
        plain, fast = encoder(image), encode_image(encoder, image)
    assert fast.shape == reference.shape and fast.dtype == torch.float32
    error, plain_error = (fast.double() - reference).abs().max(), (plain.double() - reference).abs().max()
    assert error <= 2 * plain_error + 1e-6 * reference.abs().max(), (float(error), float(plain_error))


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_through_sdpa_is_as_accurate_as_sams_in_float32(name):
    check_against_float64(name, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's fused attention kernels: needs CUDA")
@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_through_sdpa_on_cuda_is_as_accurate_as_sams_in_float32(name):
    check_against_float64(name, "cuda")


def test_encoder_through_sdpa_in_bf16_stays_close_to_fp32():
    """Under bf16 autocast (`--sam-precision bf16`) the extended vectors and one-hot codes are bf16 too:
    within 5e-2 of the output's magnitude (bf16 keeps 8 bits of mantissa; two layers here)."""
    encoder = random_encoder("tiny-sam", "cpu")
    image = torch.randn(1, 3, encoder.img_size, encoder.img_size)
    with torch.inference_mode():
        full = encoder(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = encode_image(encoder, image).float()
    assert (half - full).abs().max() <= 5e-2 * full.abs().max()


def test_attention_widths_reach_sdpa_rounded_up_to_a_multiple_of_8(monkeypatch):
    """Some fused CUDA kernels take only head widths that are multiples of 8: the extended q and k of the
    windowed layer (16 channels + 2 + 2 one-hot rows and columns = 20) and its values go in padded to 24,
    the global layer's (16 + 4 + 4) as they are. The CPU's kernel takes any width, so the accuracy tests
    above cannot see a missing padding."""
    encoder = random_encoder("tiny-sam", "cpu")
    widths, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        widths.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.inference_mode():
        encode_image(encoder, torch.randn(1, 3, encoder.img_size, encoder.img_size))
    assert widths == [(24, 24, 24), (24, 24, 24)]
