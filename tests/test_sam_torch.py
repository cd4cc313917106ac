"""sam_torch.best_segment: the on-device search for M_b's segment against the generator's own list.

The reference is segment-anything's `SamAutomaticMaskGenerator.generate` followed by
`choose_segment`; the search must give the same segment pixel for pixel, the same IoU to the last bit
(both are ratios of the same integer pixel counts) and the same segment count. Tiny random SAMs give
few segments at SAM's default settings, so the configurations below loosen the thresholds and NMS to
keep dozens to hundreds of segments, some filtered by predicted IoU and by stability, many duplicated
(ties, decided by order).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_same_selection, smooth_image
from test_refine import rectangle, tiny_random_sam

from zone_engine.config import SamConfig
from zone_engine.refine import choose_segment
from zone_engine.sam_torch import TorchSamSegmenter, searchable

BASE = SamConfig(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
CONFIGS = {
    "random-weights": SamConfig.for_random_weights(),  # NMS leaves 1 or 2 segments
    "keep-all": dataclasses.replace(BASE, box_nms_thresh=1.0),  # 192: every mask, duplicates too
    # About half the masks fail each filter (the tiny SAM's IoU predictions and stability scores sit
    # around these values); batches of 20 leave a short last batch.
    "filtered": dataclasses.replace(BASE, box_nms_thresh=1.0, points_per_batch=20, pred_iou_thresh=0.1,
                                    stability_score_offset=0.02, stability_score_thresh=0.27),
    "loose-nms": dataclasses.replace(BASE, box_nms_thresh=0.95),
}
SIZES = [(80, 112), (77, 53)]  # the second: odd, portrait, not a multiple of anything


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    return tiny_random_sam()


def masks_b_for(segments: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    """M_b's that exercise the search: some segments themselves (IoU 1, ties with their duplicates),
    a rectangle, nothing, everything."""
    height, width = size
    return [*segments[:4], *segments[-2:], rectangle(height, width, 10, 10, 50, 40),
            np.zeros(size, bool), np.ones(size, bool)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_search_finds_what_choosing_among_the_generators_segments_finds(sam, config_name, size):
    segmenter = TorchSamSegmenter(sam, CONFIGS[config_name])
    image = smooth_image(*size, seed=3)
    segments = segmenter.segment(image)
    assert segments, "these settings should leave segments"
    found_any = False
    for mask_b in masks_b_for(segments, size):
        expected = choose_segment(mask_b, segments)
        assert_same_selection(segmenter.select(image, mask_b), expected)
        found_any |= expected.segment is not None
    assert found_any


def test_only_masks_that_pass_the_iou_filter_are_upscaled(sam):
    """The generator upscales 3 masks per point; the search, the survivors and the chosen one."""
    config = CONFIGS["filtered"]
    segmenter = TorchSamSegmenter(sam, config)
    model = segmenter.generator.predictor.model
    upscaled: list[int] = []
    real = model.postprocess_masks

    def counting(masks, *args):
        upscaled.append(masks.shape[0] * masks.shape[1])
        return real(masks, *args)

    model.postprocess_masks = counting
    image = smooth_image(80, 112, seed=3)
    segments = segmenter.segment(image)
    by_generator = sum(upscaled)
    upscaled.clear()
    selection = segmenter.select(image, segments[0])
    assert by_generator == 3 * config.points_per_side**2
    assert len(segments) + 1 <= sum(upscaled) < by_generator
    assert_same_selection(selection, choose_segment(segments[0], segments))


@pytest.mark.parametrize("change", [{"crop_n_layers": 1}, {"min_mask_region_area": 20}])
def test_settings_the_search_does_not_cover_go_through_the_generator(sam, change, monkeypatch):
    config = dataclasses.replace(CONFIGS["keep-all"], **change)
    segmenter = TorchSamSegmenter(sam, config)
    assert not searchable(segmenter.generator)
    monkeypatch.setattr("zone_engine.sam_torch.best_segment", lambda *a: pytest.fail("searched"))
    image = smooth_image(64, 96, seed=1)
    mask_b = rectangle(64, 96, 10, 10, 40, 60)
    assert_same_selection(segmenter.select(image, mask_b), choose_segment(mask_b, segmenter.segment(image)))


def test_search_with_a_bf16_image_encoder(sam):
    """The encoder's precision changes the features, not the search: same answer as its own list."""
    segmenter = TorchSamSegmenter(sam, CONFIGS["keep-all"], torch.bfloat16)
    image = smooth_image(80, 112, seed=3)
    segments = segmenter.segment(image)
    for mask_b in masks_b_for(segments, (80, 112))[:3]:
        assert_same_selection(segmenter.select(image, mask_b), choose_segment(mask_b, segments))


def test_search_rejects_bad_inputs_clearly(sam):
    segmenter = TorchSamSegmenter(sam, CONFIGS["keep-all"])
    image = smooth_image(64, 96)
    with pytest.raises(ValueError, match="uint8 RGB"):
        segmenter.select(image[..., 0], np.zeros((64, 96), bool))
    with pytest.raises(ValueError, match=r"M_b has shape \(64, 64\), the image to segment \(64, 96\)"):
        segmenter.select(image, np.zeros((64, 64), bool))


def test_search_leaves_the_predictor_reset(sam):
    """As the generator does: no image embedding is kept between edits."""
    segmenter = TorchSamSegmenter(sam, CONFIGS["random-weights"])
    segmenter.select(smooth_image(64, 96), np.ones((64, 96), bool))
    assert not segmenter.generator.predictor.is_image_set and segmenter.generator.predictor.features is None
