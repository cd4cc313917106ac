"""ZONE.md section 4: best-segment selection, M_f, D, and the SAM backend, on synthetic masks."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from zone_engine.config import EditConfig, SamConfig
from zone_engine.masks import iou
from zone_engine.refine import (
    ListSegmenter,
    Refinement,
    Segmenter,
    Selection,
    best_segment_index,
    choose_segment,
    refine_mask,
    refine_with_sam,
)
from zone_engine.sam_torch import TorchSamSegmenter

SIZES = [(64, 96), (80, 48), (64, 64)]  # (H, W)


def rectangle(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def brute_force_best(mask_b: np.ndarray, segments: list[np.ndarray]) -> tuple[int | None, float]:
    """IoU by counting pixels; the first segment with the largest positive IoU."""
    best_index, best_iou = None, 0.0
    for index, segment in enumerate(segments):
        both = sum(1 for a, b in zip(mask_b.ravel(), segment.ravel(), strict=True) if a and b)
        either = sum(1 for a, b in zip(mask_b.ravel(), segment.ravel(), strict=True) if a or b)
        value = both / either if either else 0.0
        if value > best_iou:
            best_index, best_iou = index, value
    return best_index, best_iou


# ---------------------------------------------------------------------------------------------------
# best_segment_index
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_segment_matches_brute_force(size, seed):
    height, width = size
    rng = np.random.default_rng(seed)

    def random_box() -> np.ndarray:
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        return rectangle(height, width, top, left, top + rng.integers(4, 30), left + rng.integers(4, 30))

    mask_b = random_box()
    segments = [random_box() for _ in range(8)]
    index, value = best_segment_index(mask_b, segments)
    expected_index, expected_iou = brute_force_best(mask_b, segments)
    assert index == expected_index
    assert value == pytest.approx(expected_iou, abs=1e-12)


def test_ties_pick_the_first_segment():
    mask_b = rectangle(32, 48, 8, 8, 24, 24)
    weaker = rectangle(32, 48, 8, 8, 24, 16)  # IoU 0.5
    shifted = rectangle(32, 48, 8, 16, 24, 32)  # IoU 1/3
    mirror = rectangle(32, 48, 8, 16, 24, 24)  # IoU 0.5 as well, a different mask
    assert best_segment_index(mask_b, [shifted, weaker, mirror, weaker.copy()]) == (1, 0.5)
    assert best_segment_index(mask_b, [shifted, mirror, weaker]) == (1, 0.5)


def test_no_overlap_and_empty_list_give_none():
    mask_b = rectangle(32, 48, 0, 0, 10, 10)
    assert best_segment_index(mask_b, [rectangle(32, 48, 20, 20, 30, 30)]) == (None, 0.0)
    assert best_segment_index(mask_b, []) == (None, 0.0)


def test_segment_of_another_size_raises():
    with pytest.raises(ValueError, match="shape"):
        best_segment_index(np.zeros((8, 8), bool), [np.zeros((8, 9), bool)])
    # A segmenter's own selection alike: a wrong-size M_f would fail later, in blend, as another mistake.
    with pytest.raises(ValueError, match=r"the chosen segment has shape \(8, 9\), M_b has shape \(8, 8\)"):
        refine_mask(np.zeros((8, 8), bool), Selection(np.ones((8, 9), bool), 0.5, 1))


# ---------------------------------------------------------------------------------------------------
# refine_mask
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_refine_picks_best_segment_and_drops_small_components(size):
    height, width = size
    mask_b = rectangle(height, width, 10, 10, 40, 40)
    best = rectangle(height, width, 12, 12, 40, 40)
    speck = rectangle(height, width, height - 6, width - 6, height - 1, width - 1)  # 25 px < 64
    segments = [rectangle(height, width, 0, 0, 5, 5), best | speck, rectangle(height, width, 30, 30, 50, 45)]
    refined = refine_mask(mask_b, choose_segment(mask_b, segments))
    assert isinstance(refined, Refinement)
    assert not refined.used_fallback
    assert refined.segment_count == 3
    assert refined.mask_f.dtype == bool
    np.testing.assert_array_equal(refined.mask_f, best)
    assert refined.iou == pytest.approx(brute_force_best(mask_b, segments)[1])


def test_an_empty_segment_is_no_match_for_an_empty_mask_b():
    """Two empty masks have IoU 0 here (the benchmark's comparison counts them as agreeing; a selection must
    not): an empty M_b would otherwise 'match' an empty segment and paste nothing, instead of falling back."""
    empty = np.zeros((16, 24), dtype=bool)
    assert iou(empty, empty) == 0.0
    assert best_segment_index(empty, [empty.copy(), rectangle(16, 24, 2, 2, 8, 8)]) == (None, 0.0)


@pytest.mark.parametrize("segments", [[], "disjoint"], ids=["empty", "no-overlap"])
def test_no_overlap_falls_back_to_mask_b(segments):
    height, width = 48, 64
    big = rectangle(height, width, 5, 5, 25, 25)
    small = rectangle(height, width, 40, 50, 45, 55)  # 25 px: dropped from M_f
    mask_b = big | small
    if segments == "disjoint":
        segments = [rectangle(height, width, 30, 30, 48, 48), rectangle(height, width, 0, 40, 10, 64)]
    refined = refine_mask(mask_b, choose_segment(mask_b, segments))
    assert refined.used_fallback
    assert refined.iou == 0.0
    assert refined.segment_count == len(segments)
    np.testing.assert_array_equal(refined.mask_f, big)


def test_small_components_use_their_own_area():
    """A 63 px component is dropped, a 64 px one kept, whatever their bounding boxes hold."""
    segment = np.zeros((40, 40), dtype=bool)
    segment[2:9, 2:11] = True  # 63 px
    segment[20:28, 20:28] = True  # 64 px
    refined = refine_mask(segment, choose_segment(segment, [segment]))
    expected = np.zeros_like(segment)
    expected[20:28, 20:28] = True
    np.testing.assert_array_equal(refined.mask_f, expected)


def test_components_touching_only_at_a_corner_are_counted_apart():
    """ZONE.md: 4-connectivity. Two 40 px blocks meeting diagonally are two small components (both dropped),
    not one 80 px component (kept with 8-connectivity)."""
    segment = np.zeros((30, 30), dtype=bool)
    segment[5:13, 5:10] = True
    segment[13:21, 10:15] = True
    refined = refine_mask(segment, choose_segment(segment, [segment]))
    assert not refined.mask_f.any()


@pytest.mark.parametrize("size", SIZES)
def test_dilation_grows_a_pixel_to_a_9x9_square(size):
    height, width = size
    row, col = height // 2, width // 3
    mask_b = np.zeros(size, dtype=bool)
    mask_b[row, col] = True
    refined = refine_mask(mask_b, choose_segment(mask_b, []), min_area=0, dilate_kernel=3, dilate_iterations=4)
    np.testing.assert_array_equal(refined.mask_f, mask_b)
    square = rectangle(height, width, row - 4, col - 4, row + 5, col + 5)
    np.testing.assert_array_equal(refined.dilated, square)


def test_refine_defaults_are_zones_64_pixels_and_four_3x3_dilations():
    """ZONE.md section 4 with refine_mask's defaults: a 63 px component is dropped, a 64 px one kept, and D is
    the kept 8x8 block dilated 4 times by a 3x3 square: grown by 4 on every side, a 16x16 square."""
    segment = rectangle(48, 48, 2, 2, 9, 11)  # 7 x 9 = 63 px
    segment |= rectangle(48, 48, 20, 20, 28, 28)  # 8 x 8 = 64 px
    refined = refine_mask(segment, choose_segment(segment, [segment]))
    np.testing.assert_array_equal(refined.mask_f, rectangle(48, 48, 20, 20, 28, 28))
    np.testing.assert_array_equal(refined.dilated, rectangle(48, 48, 16, 16, 32, 32))


# ---------------------------------------------------------------------------------------------------
# Segmenter backends
# ---------------------------------------------------------------------------------------------------


class FakeSegmenter(ListSegmenter):
    """Returns fixed segments and records the image it was given."""

    def __init__(self, segments: list[np.ndarray]) -> None:
        self.segments = segments
        self.images: list[np.ndarray] = []

    def segment(self, image: np.ndarray) -> list[np.ndarray]:
        self.images.append(image)
        return self.segments


def test_refine_with_sam_uses_segmenter_and_config():
    height, width = 48, 72
    mask_b = rectangle(height, width, 10, 10, 30, 30)
    target = rectangle(height, width, 12, 12, 30, 30)
    segmenter: Segmenter = FakeSegmenter([rectangle(height, width, 40, 40, 48, 48), target])
    image = np.zeros((height, width, 3), np.uint8)
    config = EditConfig(dilate_kernel=3, dilate_iterations=2, min_region_area=300)
    refined = refine_with_sam(segmenter, image, mask_b, config)
    assert segmenter.images == [image]
    assert refined.segment_count == 2 and not refined.used_fallback
    np.testing.assert_array_equal(refined.mask_f, target)  # 324 px >= 300: kept
    np.testing.assert_array_equal(refined.dilated, rectangle(height, width, 10, 10, 32, 32))

    small = FakeSegmenter([rectangle(height, width, 12, 12, 20, 20)])
    dropped = refine_with_sam(small, image, mask_b, config)
    assert not dropped.mask_f.any() and not dropped.dilated.any()  # 64 px < 300: dropped


def tiny_random_sam() -> torch.nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=32, img_size=64, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=(1,), window_size=2, out_chans=32,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


@pytest.mark.parametrize("size", [(96, 64), (64, 96)])
def test_torch_sam_segmenter_on_tiny_random_sam(size):
    height, width = size
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    segmenter = TorchSamSegmenter(tiny_random_sam(), SamConfig.for_random_weights())
    segments = segmenter.segment(image)
    assert isinstance(segments, list) and segments
    for segment in segments:
        assert isinstance(segment, np.ndarray)
        assert segment.dtype == bool and segment.shape == (height, width)

    refined = refine_with_sam(segmenter, image, rectangle(height, width, 16, 16, 48, 48), EditConfig())
    assert refined.segment_count == len(segments)
    assert refined.mask_f.shape == (height, width)


def test_torch_sam_segmenter_rejects_non_rgb():
    segmenter = TorchSamSegmenter(tiny_random_sam(), SamConfig.for_random_weights())
    with pytest.raises(ValueError, match="uint8 RGB"):
        segmenter.segment(np.zeros((64, 64), np.uint8))


def test_bf16_image_encoder_runs_in_bf16_and_keeps_the_masks():
    """The encoder really runs in bf16 (its linear layers' outputs), the decoder gets fp32 features,
    and the masks stay those of fp32 SAM: mean IoU of each fp32 mask with its best bf16 match >= 0.95.

    Tolerance: bf16 keeps 8 significant bits, so logits near SAM's 0 threshold move a few boundary
    pixels; random weights put many logits there (tiny random SAMs of three seeds: 0.978 to 0.999).
    """
    import dataclasses

    from conftest import smooth_image

    from zone_benchmarks.bench_refine import mask_agreement

    torch.manual_seed(0)
    sam = tiny_random_sam()
    image = smooth_image(96, 128, seed=0)
    config = dataclasses.replace(SamConfig.for_random_weights(), points_per_side=16)
    encoder_out: list[torch.dtype] = []
    decoder_in: set[torch.dtype] = set()
    hooks = [
        sam.image_encoder.blocks[0].attn.qkv.register_forward_hook(lambda _m, _i, out: encoder_out.append(out.dtype)),
        sam.mask_decoder.register_forward_pre_hook(
            lambda _m, _a, kwargs: decoder_in.add(kwargs["image_embeddings"].dtype), with_kwargs=True),
    ]
    reference = TorchSamSegmenter(sam, config).segment(image)
    masks = TorchSamSegmenter(sam, config, torch.bfloat16).segment(image)
    for hook in hooks:
        hook.remove()
    assert encoder_out == [torch.float32, torch.bfloat16] and decoder_in == {torch.float32}
    assert masks and mask_agreement(reference, masks)[0] >= 0.95


def test_sam_precision_is_checked_before_anything_loads(tiny_models):
    from zone_engine import ZonePipeline
    from zone_engine.errors import ConfigError, DeviceError

    with pytest.raises(DeviceError, match=r"fp16 \(sam_precision=.fp16.\) runs only on CUDA"):
        ZonePipeline(tiny_models, device="cpu", sam_precision="fp16")
    with pytest.raises(ConfigError, match="unknown SAM precision"):
        ZonePipeline(tiny_models, device="cpu", sam_precision="int8")
    with pytest.raises(ConfigError, match=r"--sam-precision bf16 \(sam_precision='bf16'\) is for --segmenter torch"):
        ZonePipeline(tiny_models, device="cpu", segmenter="onnx", sam_onnx="x", sam_precision="bf16")
    pipe = ZonePipeline(tiny_models, device="cpu", sam_precision="bf16")
    assert pipe.segmenter(pipe.default_config.sam).generator.predictor.encoder_dtype == torch.bfloat16
