"""SAM's decoder as the engine runs it: sam_decoder.two_way_transformer (the two-way transformer factored
for prompts sharing one image) and sam_torch.decode_masks (the output upscaling channels last).

Reference: segment-anything's own `TwoWayTransformer` on the image repeated per prompt. The factored
form reassociates sums (projections folded into the tokens' side, biases moved past softmax weights
that sum to one), so it is compared with SAM's module in float64: its error must stay within twice
that of SAM's own module in float32, plus 1e-6 of the outputs' magnitude (measured: the two errors are
within 1.6x of each other, ~1e-7 to 4e-7 of the magnitude).
"""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer

from zone_engine.sam_decoder import two_way_transformer
from zone_engine.sam_torch import decode_masks

# (channels, heads, MLP width, depth, attention downsampling, embedding h x w, prompts)
SHAPES = {
    "tiny-sam": (32, 2, 64, 2, 2, (4, 4), 5),
    "odd-map": (32, 2, 64, 2, 2, (5, 3), 7),
    "one-layer": (64, 4, 128, 1, 2, (7, 9), 3),  # never leaves the shared image side
    "one-head-deep": (48, 1, 96, 3, 1, (6, 5), 3),
    "one-prompt": (32, 2, 64, 2, 2, (4, 6), 1),
    "sam": (256, 8, 2048, 2, 2, (64, 64), 2),  # every SAM's decoder (vit_b/l/h alike)
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_factored_transformer_is_as_accurate_as_sams_in_float32(name):
    check_against_float64(name, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's matmul and softmax kernels: needs CUDA")
@pytest.mark.parametrize("name", ["odd-map", "one-head-deep", "sam"])
def test_factored_transformer_on_cuda_is_as_accurate_as_sams_in_float32(name):
    check_against_float64(name, "cuda")


def check_against_float64(name: str, device: str) -> None:
    channels, heads, mlp, depth, downsample, (h, w), prompts = SHAPES[name]
    torch.manual_seed(len(name))
    transformer = TwoWayTransformer(depth=depth, embedding_dim=channels, mlp_dim=mlp, num_heads=heads,
                                    attention_downsample_rate=downsample).eval().to(device)
    image, image_pe = (torch.randn(1, channels, h, w, device=device) for _ in range(2))
    tokens = torch.randn(prompts, 7, channels, device=device)
    untouched = image.clone()
    with torch.inference_mode():
        reference = copy.deepcopy(transformer).double()(
            image.double().expand(prompts, -1, -1, -1), image_pe.double(), tokens.double())
        sams = transformer(image.expand(prompts, -1, -1, -1), image_pe, tokens)
        factored = two_way_transformer(transformer, image, image_pe, tokens)
    assert torch.equal(image, untouched)
    for label, exact, plain, fast in zip(("tokens", "image side"), reference, sams, factored, strict=True):
        assert fast.shape == exact.shape == (prompts, *exact.shape[1:]) and fast.dtype == torch.float32
        error, plain_error = (fast.double() - exact).abs().max(), (plain.double() - exact).abs().max()
        assert error <= 2 * plain_error + 1e-6 * exact.abs().max(), (label, float(error), float(plain_error))


def test_factored_transformer_takes_one_shared_image():
    transformer = TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2).eval()
    with torch.inference_mode(), pytest.raises(ValueError, match="one image"):
        two_way_transformer(transformer, torch.randn(2, 32, 4, 4), torch.randn(1, 32, 4, 4), torch.randn(2, 7, 32))


# (channels, embedding h x w, prompts) for the output upscaling and hypernetwork product
UPSCALING_SHAPES = {"tiny-sam": (32, (4, 4), 5), "odd-map": (32, (5, 3), 3), "no-prompt": (32, (4, 4), 0),
                    "sam": (256, (64, 64), 2)}


def sams_mask_logits(decoder: MaskDecoder, tokens_out: torch.Tensor, image_out: torch.Tensor, shape) -> torch.Tensor:
    """`MaskDecoder.predict_masks` after its transformer, multimask outputs 1..3 (segment-anything's code)."""
    src = image_out.transpose(1, 2).reshape(len(image_out), *shape)
    upscaled = decoder.output_upscaling(src)
    hyper = torch.stack([mlp(tokens_out[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    return (hyper @ upscaled.flatten(2)).reshape(len(image_out), hyper.shape[1], *upscaled.shape[2:])[:, 1:]


@pytest.mark.parametrize("name", list(UPSCALING_SHAPES))
def test_channels_last_upscaling_is_as_accurate_as_sams_in_float32(name):
    """Same bound as the transformer's: within twice SAM's own float32 error + 1e-6 of the magnitude
    (measured: 2.5e-7 to 4.0e-7 of the magnitude, SAM's module 3.1e-7 to 5.4e-7)."""
    check_upscaling_against_float64(name, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's matmul and convolution kernels: needs CUDA")
def test_channels_last_upscaling_on_cuda_is_as_accurate_as_sams_in_float32():
    check_upscaling_against_float64("sam", "cuda")


def check_upscaling_against_float64(name: str, device: str) -> None:
    channels, (h, w), prompts = UPSCALING_SHAPES[name]
    torch.manual_seed(len(name))
    decoder = MaskDecoder(transformer_dim=channels, transformer=torch.nn.Identity()).eval().to(device)
    for parameter in decoder.output_upscaling.parameters():  # SAM's init leaves the norm at 1 and 0
        parameter.data.normal_(0.0, 0.5)
    tokens_out = torch.randn(prompts, 7, channels, device=device)
    image_out = torch.randn(prompts, h * w, channels, device=device)
    shape = torch.Size((channels, h, w))
    with torch.inference_mode():
        exact = sams_mask_logits(copy.deepcopy(decoder).double(), tokens_out.double(), image_out.double(), shape)
        plain = sams_mask_logits(decoder, tokens_out, image_out, shape)
        fast = decode_masks(decoder, tokens_out, image_out, shape)
    assert fast.shape == exact.shape == (prompts, 3, 4 * h, 4 * w) and fast.dtype == torch.float32
    if prompts:
        error, plain_error = (fast.double() - exact).abs().max(), (plain.double() - exact).abs().max()
        assert error <= 2 * plain_error + 1e-6 * exact.abs().max(), (float(error), float(plain_error))


@pytest.mark.parametrize("conv", [dict(kernel_size=2, stride=2, padding=1), dict(kernel_size=4, stride=4)],
                         ids=["padded", "4x4"])
def test_upscaling_refuses_what_is_not_sams_2x2_stride_2_convolution(conv):
    """decode_masks reads each transposed convolution as one matmul into a 2x2 block per pixel; another
    kernel, stride or padding would give wrong logits (or a shape error far from the cause): refused by name."""
    decoder = MaskDecoder(transformer_dim=32, transformer=torch.nn.Identity()).eval()
    decoder.output_upscaling[0] = torch.nn.ConvTranspose2d(32, 8, **conv)
    with torch.inference_mode(), pytest.raises(ValueError, match="2x2 stride-2 output upscaling"):
        decode_masks(decoder, torch.randn(2, 7, 32), torch.randn(2, 16, 32), torch.Size((32, 4, 4)))
