"""sam_torch.best_segment: the on-device search for M_b's segment against the generator's own list.

The reference is segment-anything's `SamAutomaticMaskGenerator.generate` followed by
`choose_segment`; the search must give the same segment pixel for pixel, the same IoU to the last bit
(both are ratios of the same integer pixel counts) and the same segment count. Tiny random SAMs give
few segments at SAM's default settings, so the configurations below loosen the thresholds and NMS to
keep dozens to hundreds of segments, some filtered by predicted IoU and by stability, many duplicated
(ties, decided by order). The search's decoder is SAM's up to float rounding (~3e-7 of its outputs'
magnitude: sam_decoder.py), the generator's SAM's own: on these images no mask's filter decisions or
pixels lie that close to a threshold, so the integer counts and the choice come out exactly equal.
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


def test_only_masks_that_pass_the_iou_filter_are_upscaled(sam, monkeypatch):
    """The generator upscales 3 masks per point; the search, the survivors and the chosen one."""
    from zone_engine import sam_torch

    config = CONFIGS["filtered"]
    segmenter = TorchSamSegmenter(sam, config)
    model = segmenter.generator.predictor.model
    upscaled: list[int] = []
    real, upscale = model.postprocess_masks, sam_torch._upscale

    def counting(masks, *args):
        upscaled.append(masks.shape[0] * masks.shape[1])
        return real(masks, *args)

    model.postprocess_masks = counting  # the generator's
    monkeypatch.setattr(sam_torch, "_upscale", lambda predictor, low_res: upscaled.append(len(low_res)) or upscale(
        predictor, low_res))  # the search's
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


@pytest.mark.parametrize("config_name", ["filtered", "loose-nms"])  # both filters; NMS
def test_segments_and_search_agree_with_stock_segment_anything(sam, config_name):
    """The tests above compare the search with the engine's own segmenter, whose generator runs the engine's
    TorchSamPredictor (its encoder through SDPA: sam_encoder.py). Here both against stock segment-anything:
    `SamAutomaticMaskGenerator(sam, ...)` with its own `SamPredictor`.

    Features within 1e-5 of their magnitude: the same weights and operations, SDPA's fused softmax and the
    relative positions folded into q·k reordering fp32 sums (measured ~4e-7 of the magnitude, a few fp32 eps);
    a wrong attention moves them by a sizable fraction of it. Segments in the same order, each within IoU 0.99 of
    stock's (a pixel whose logit lies within rounding of the threshold may flip; measured identical), and the
    search's choice that of `choose_segment` over stock's list."""
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    from zone_engine.sam_torch import TorchSamPredictor

    config, size = CONFIGS[config_name], (80, 112)  # not square: height and width are not interchangeable
    image = smooth_image(*size, seed=3)
    stock_predictor, ours_predictor = SamPredictor(sam), TorchSamPredictor(sam)
    with torch.inference_mode():
        stock_predictor.set_image(image)
        ours_predictor.set_image(image)
        stock = [np.asarray(record["segmentation"], dtype=bool)
                 for record in SamAutomaticMaskGenerator(sam, **dataclasses.asdict(config)).generate(image)]
    torch.testing.assert_close(ours_predictor.features, stock_predictor.features, rtol=0,
                               atol=1e-5 * float(stock_predictor.features.abs().max()))

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return (a & b).sum() / max((a | b).sum(), 1)

    segmenter = TorchSamSegmenter(sam, config)
    ours = segmenter.segment(image)
    assert len(ours) == len(stock) > 0
    assert min(iou(a, b) for a, b in zip(ours, stock, strict=True)) >= 0.99
    for mask_b in masks_b_for(stock, size):
        expected, found = choose_segment(mask_b, stock), segmenter.select(image, mask_b)
        assert found.segment_count == expected.segment_count
        assert (found.segment is None) == (expected.segment is None)
        if expected.segment is not None:
            assert iou(found.segment, expected.segment) >= 0.99 and abs(found.iou - expected.iou) <= 0.01


# ---------------------------------------------------------------------------------------------------
# TorchSamPredictor.predict_passing: the decoder with its image side shared, upscaling only what passes
# ---------------------------------------------------------------------------------------------------


def decoder_inputs(sam: torch.nn.Module, device: str, prompts: int = 37):
    """A predictor with an image set, and `prompts` point prompts in its input frame (one short batch)."""
    from zone_engine.sam_torch import TorchSamPredictor

    predictor = TorchSamPredictor(sam.to(device))
    predictor.set_image(smooth_image(80, 112, seed=3))
    generator = torch.Generator().manual_seed(1)
    coords = torch.rand(prompts, 1, 2, generator=generator, dtype=torch.float64) * torch.tensor([112.0, 80.0])
    coords = torch.as_tensor(predictor.transform.apply_coords(coords.numpy(), (80, 112)), device=device)
    return predictor, coords, torch.ones(prompts, 1, dtype=torch.int, device=device)


def passing_reference(predictor, coords, labels, min_score: float) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's own decoder call, flattened and filtered as the generator does."""
    _, scores, low_res = predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    low_res, scores = low_res.flatten(0, 1), scores.flatten(0, 1)
    keep = scores > min_score if min_score > 0.0 else torch.ones_like(scores, dtype=torch.bool)
    return low_res[keep], scores[keep]


@pytest.mark.parametrize("quantile", [None, 0.3, 0.7, 1.0], ids=["all", "most", "some", "none"])
def test_predict_passing_agrees_with_sams_decoder(sam, quantile):
    """The same masks pass the filter and come out as SAM's decoder gives them, up to the factored
    transformer's rounding (sam_decoder.py: ~3e-7 of the outputs' magnitude, bounded against float64 in
    test_sam_decoder.py): checked at 1e-5 of the magnitude. The thresholds sit 1e-6 under a prediction,
    far over that rounding, so the two filters keep the same masks."""
    predictor, coords, labels = decoder_inputs(sam, "cpu")
    with torch.inference_mode():
        _, all_scores = passing_reference(predictor, coords, labels, 0.0)
        if quantile is None:
            min_score = 0.0  # no filter
        elif quantile == 1.0:
            min_score = float(all_scores.max()) + 1e-3  # nothing passes
        else:  # just under one of the predictions, so that it passes and those below it do not
            min_score = float(torch.quantile(all_scores, quantile)) - 1e-6
        low_res, scores = predictor.predict_passing(coords, labels, min_score)
        expected_low_res, expected_scores = passing_reference(predictor, coords, labels, min_score)
    assert low_res.shape == expected_low_res.shape and low_res.shape[1:] == (4 * 4, 4 * 4)
    assert (len(scores) == 0) == (quantile == 1.0)
    if len(scores):
        torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5 * float(expected_scores.abs().max()))
        torch.testing.assert_close(low_res, expected_low_res, rtol=0,
                                   atol=1e-5 * float(expected_low_res.abs().max()))


def test_predict_passing_upscales_only_prompts_with_a_passing_mask(sam, monkeypatch):
    from zone_engine import sam_torch

    predictor, coords, labels = decoder_inputs(sam, "cpu")
    batches: list[int] = []
    upscale = sam_torch.decode_masks
    monkeypatch.setattr(sam_torch, "decode_masks",
                        lambda decoder, tokens, image, shape: batches.append(len(tokens)) or upscale(
                            decoder, tokens, image, shape))
    with torch.inference_mode():
        _, scores, _ = predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
        min_score = float(scores.max(1).values.median())  # about half the prompts have a mask over it
        batches.clear()
        predictor.predict_passing(coords, labels, min_score)
    assert batches == [int((scores > min_score).any(1).sum())] and 0 < batches[0] < len(coords)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decoder's CUDA kernels: needs CUDA")
def test_predict_passing_on_cuda_agrees_with_sams_decoder():
    """On CUDA: IoU predictions (fp32 matmuls, the transformer factored: sam_decoder.py) within 1e-5,
    as before the factoring (the CPU measures ~1e-7 between the two); logits within 2e-3, as the output
    upscaling's transposed convolutions may run in TF32 (cuDNN's default), one algorithm rounding to TF32
    where another does not."""
    predictor, coords, labels = decoder_inputs(tiny_random_sam(), "cuda")  # not the module's CPU SAM
    with torch.inference_mode():
        low_res, scores = predictor.predict_passing(coords, labels, 0.0)
        expected_low_res, expected_scores = passing_reference(predictor, coords, labels, 0.0)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(low_res, expected_low_res, rtol=0, atol=2e-3)


def test_search_shows_a_progress_bar_when_asked(sam, capsys, monkeypatch):
    from zone_engine import progress

    monkeypatch.setattr(progress, "is_terminal", lambda stream: True)  # tqdm's bar, as on a terminal
    segmenter = TorchSamSegmenter(sam, CONFIGS["filtered"])  # 64 prompts in batches of 20: 4 batches
    image, mask_b = smooth_image(80, 112, seed=3), rectangle(80, 112, 10, 10, 50, 40)
    quiet = segmenter.select(image, mask_b)
    assert capsys.readouterr().err == ""
    shown = segmenter.select(image, mask_b, progress=True)
    bar = capsys.readouterr().err
    assert "segmenting" in bar and "64/64" in bar  # 64 prompts: 65 counted the encoder
    # The encoder's line counts no prompt: "0/64" shown through its minute on a CPU read as a stall.
    assert "SAM image encoder: running" in bar and "/64" not in bar.split("segmenting")[0]
    assert_same_selection(shown, quiet)


def test_search_decodes_prompts_per_run_as_the_predictor_says_with_the_same_answer(sam, monkeypatch):
    """Larger runs than points_per_batch (what CUDA gets when memory allows) choose the same segment."""
    from zone_engine import sam_torch

    config = CONFIGS["filtered"]  # points_per_batch 20
    segmenter = TorchSamSegmenter(sam, config)
    predictor = segmenter.generator.predictor
    assert predictor.prompts_per_run(config.points_per_batch, 64, (80, 112)) == 20  # the CPU keeps SAM's batches
    image, mask_b = smooth_image(80, 112, seed=3), rectangle(80, 112, 10, 10, 50, 40)
    runs: list[int] = []
    score = sam_torch._score_batch
    monkeypatch.setattr(sam_torch, "_score_batch",
                        lambda generator, points, *args: runs.append(len(points)) or score(generator, points, *args))
    in_batches_of_20 = segmenter.select(image, mask_b)
    assert runs == [20, 20, 20, 4]
    runs.clear()
    monkeypatch.setattr(predictor, "prompts_per_run", lambda *_: 64)
    assert_same_selection(segmenter.select(image, mask_b), in_batches_of_20)
    assert runs == [64]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the search's CUDA batching: needs CUDA")
@pytest.mark.parametrize("size", SIZES)
def test_search_on_cuda_in_one_run_finds_what_choosing_among_the_generators_segments_finds(size, monkeypatch):
    """On CUDA the search takes all 64 prompts in one run (points_per_batch 20) and chooses as the generator's
    list does. cuDNN's TF32 is off here: the generator's transposed convolutions would otherwise round to
    TF32 (~1e-3) where the search's matmuls do not, and move pixels at the threshold."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    segmenter = TorchSamSegmenter(tiny_random_sam().cuda(), CONFIGS["filtered"])
    assert segmenter.generator.predictor.prompts_per_run(20, 64, size) == 64
    image = smooth_image(*size, seed=3)
    segments = segmenter.segment(image)
    for mask_b in masks_b_for(segments, size):
        assert_same_selection(segmenter.select(image, mask_b), choose_segment(mask_b, segments))


def test_search_halves_its_runs_when_the_device_runs_out_of_memory(sam, monkeypatch):
    """An out-of-memory error in a run larger than points_per_batch retries it halved (never below
    points_per_batch, where the error is the user's to see), with the same answer."""
    from zone_engine import sam_torch

    config = CONFIGS["filtered"]
    segmenter = TorchSamSegmenter(sam, config)
    image, mask_b = smooth_image(80, 112, seed=3), rectangle(80, 112, 10, 10, 50, 40)
    expected = segmenter.select(image, mask_b)
    runs: list[int] = []
    score = sam_torch._score_batch

    def scarce(generator, points, *args):  # room for 30 prompts at a time
        runs.append(len(points))
        if len(points) > 30:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return score(generator, points, *args)

    monkeypatch.setattr(sam_torch, "_score_batch", scarce)
    monkeypatch.setattr(segmenter.generator.predictor, "prompts_per_run", lambda *_: 64)
    assert_same_selection(segmenter.select(image, mask_b), expected)
    assert runs == [64, 32, 20, 20, 20, 4]  # 64 and 32 fail; then runs of max(32 // 2, 20)
    monkeypatch.setattr(segmenter.generator, "points_per_batch", 64)
    with pytest.raises(torch.OutOfMemoryError):
        segmenter.select(image, mask_b)


def test_search_batch_estimate_on_cuda_grows_with_free_memory(sam, monkeypatch):
    """prompts_per_run on CUDA, with the free memory given: between points_per_batch and all prompts."""
    from zone_engine import sam_torch

    predictor = sam_torch.TorchSamPredictor(sam)
    monkeypatch.setattr(sam_torch.TorchSamPredictor, "device", torch.device("cuda"))
    per_prompt = sam_torch.search_bytes_per_prompt(32, (4, 4), (512, 512))
    for free, expected in ((0, 64), (200 * per_prompt, 100), (1000 * per_prompt, 500), (10**15, 1024)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2 * free))
        assert predictor.prompts_per_run(64, 1024, (512, 512)) == expected
    assert sam_torch.search_bytes_per_prompt(256, (64, 64), (512, 512)) / 1e6 == pytest.approx(72, abs=1)


# Mask arithmetic of the search: the same integers as torch's bool reductions and segment-anything's
# own functions, exactly (no tolerance: counts and box edges are integers, the stability score one
# float32 quotient of the same two integers).
MASK_SHAPES = [(5, 77, 53), (3, 8, 8), (1, 1, 1), (4, 33, 131), (2, 512, 512), (0, 16, 24)]


def random_masks(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(shape, generator=generator) < torch.rand(shape[0], 1, 1, generator=generator)
    if len(masks) > 2:
        masks[1] = False  # an empty mask
        masks[2] = True  # a full one
    return masks


@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_count_true_counts_as_torch_sums_bools(shape):
    from zone_engine.sam_torch import count_true

    masks, within = random_masks(shape, seed=1), random_masks((1, *shape[1:]), seed=2)[0]
    assert torch.equal(count_true(masks), masks.flatten(1).sum(1))
    assert torch.equal(count_true(masks, within=within), (masks & within).flatten(1).sum(1))
    if len(masks) > 1:  # a view that starts mid-storage, and a transposed (non-contiguous) one
        assert torch.equal(count_true(masks[1:]), masks[1:].flatten(1).sum(1))
        assert torch.equal(count_true(masks.transpose(1, 2)), masks.flatten(1).sum(1))


@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_mask_boxes_and_stability_score_equal_segment_anythings(shape):
    from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score

    from zone_engine.sam_torch import mask_boxes, stability_score

    masks = random_masks(shape, seed=3)
    if not shape[0]:  # segment-anything returns float zeros (0, 4) here; the search concatenates either
        assert mask_boxes(masks).shape == (0, 4)
    else:
        assert torch.equal(mask_boxes(masks), batched_mask_to_box(masks))
        window = torch.zeros(shape, dtype=torch.bool)  # one box each, inside the image
        window[:, shape[1] // 3: shape[1] - 1, shape[2] // 4: shape[2] // 2 + 1] = True
        assert torch.equal(mask_boxes(window), batched_mask_to_box(window))
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 3
    ours, theirs = stability_score(logits, 0.0, 1.0), calculate_stability_score(logits, 0.0, 1.0)
    assert ours.dtype == theirs.dtype and torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())


@pytest.mark.parametrize("size", [(80, 112), (77, 53), (512, 512), (600, 7), (1, 1)])
def test_upscaling_in_two_products_agrees_with_postprocess_masks(size):
    """`_upscale` (one composed resize matrix per axis) against segment-anything's two bilinear resizes:
    float rounding apart (measured ~2e-7 of the magnitude; bound 1e-6), on awkward image sizes."""
    from types import SimpleNamespace

    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    from zone_engine.sam_torch import _upscale

    model = SimpleNamespace(image_encoder=SimpleNamespace(img_size=64))
    model.postprocess_masks = lambda masks, *sizes: Sam.postprocess_masks(model, masks, *sizes)
    predictor = SimpleNamespace(model=model, original_size=size,
                                input_size=ResizeLongestSide(64).get_preprocess_shape(*size, 64))
    low_res = torch.randn(5, 16, 16, generator=torch.Generator().manual_seed(sum(size))) * 4
    expected = model.postprocess_masks(low_res[None], predictor.input_size, predictor.original_size)[0]
    got = _upscale(predictor, low_res)
    assert got.shape == expected.shape == (5, *size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert _upscale(predictor, low_res[:0]).shape == (0, *size)


def test_equal_ious_go_to_the_first_segment_in_the_generators_order(sam, monkeypatch):
    """ZONE.md section 4: the first one on ties. Every candidate given the same counts ties them all; with NMS
    keeping everything, the generator's order is by predicted IoU, so the best-scored mask must be chosen."""
    from zone_engine import sam_torch

    scored, real = [], sam_torch._score_batch

    def all_tied(*args):
        batch = real(*args)
        batch["intersection"], batch["area"] = torch.ones_like(batch["area"]), torch.ones_like(batch["area"])
        scored.append(batch)
        return batch

    monkeypatch.setattr(sam_torch, "_score_batch", all_tied)
    segmenter = TorchSamSegmenter(sam, CONFIGS["keep-all"])
    image = smooth_image(80, 112, seed=3)
    selection = segmenter.select(image, rectangle(80, 112, 10, 10, 50, 40))
    scores, low_res = torch.cat([b["scores"] for b in scored]), torch.cat([b["low_res"] for b in scored])
    predictor = segmenter.generator.predictor
    predictor.set_image(image)
    first, last = (sam_torch._upscale(predictor, low_res[i][None])[0] > predictor.model.mask_threshold
                   for i in (int(scores.argmax()), int(scores.argmin())))
    assert not torch.equal(first, last)  # the choice shows
    np.testing.assert_array_equal(selection.segment, first.cpu().numpy())


@pytest.mark.parametrize("shape", [(1, 3, 32, 48), (1, 3, 64, 96), (1, 1, 64, 48), (3, 64, 48)])
def test_set_torch_image_takes_only_sams_input_size(sam, shape):
    """SAM's input is the image resized to a long side of the encoder's img_size (64 here); any other
    size would be encoded into a wrong-sized embedding and its masks mapped back to the wrong pixels."""
    from zone_engine.sam_torch import TorchSamPredictor

    with torch.inference_mode(), pytest.raises(ValueError, match="long side 64"):
        TorchSamPredictor(sam).set_torch_image(torch.zeros(shape, dtype=torch.uint8), (32, 48))


def test_predict_passing_drops_a_mask_scored_exactly_at_the_threshold(sam):
    """The generator keeps predicted IoUs strictly over pred_iou_thresh (`iou_preds > thresh`): a mask
    scored exactly at it is dropped. The thresholds above sit between predictions, which hides `>=`."""
    predictor, coords, labels = decoder_inputs(sam, "cpu")
    with torch.inference_mode():
        _, scores = predictor.predict_passing(coords, labels, 0.0)
        min_score = float(scores.median())  # a float32 prediction, exactly
        _, kept = predictor.predict_passing(coords, labels, min_score)
    assert min_score > 0.0 and min_score not in kept.tolist()
    assert torch.equal(kept, scores[scores > min_score])


@pytest.mark.parametrize("start", [1, 3, 8])
def test_count_true_counts_a_view_that_starts_between_words(start):
    """Masks with rows of whole words (8 x 16 pixels here) can still start mid-word in their storage (a
    contiguous slice of a larger bool buffer): they are copied to whole, aligned words, not read in place."""
    from zone_engine.sam_torch import count_true

    buffer = torch.rand(start + 3 * 8 * 16, generator=torch.Generator().manual_seed(start)) < 0.5
    masks = buffer[start:].view(3, 8, 16)
    within = buffer[:8 * 16].view(8, 16)
    assert masks.is_contiguous() and masks.storage_offset() == start
    assert torch.equal(count_true(masks), masks.flatten(1).sum(1))
    assert torch.equal(count_true(masks, within=within), (masks & within).flatten(1).sum(1))


def test_a_mask_scored_exactly_at_the_stability_threshold_is_kept(sam, monkeypatch):
    """The generator keeps stability scores at or over stability_score_thresh (`>=`, unlike the predicted-IoU
    filter's `>`). The threshold is set to one mask's own score, so that mask sits exactly on it."""
    from zone_engine import sam_torch

    seen, real = [], sam_torch.stability_score
    monkeypatch.setattr(sam_torch, "stability_score", lambda *args: seen.append(score := real(*args)) or score)
    image, mask_b = smooth_image(80, 112, seed=3), rectangle(80, 112, 10, 10, 50, 40)
    TorchSamSegmenter(sam, CONFIGS["filtered"]).select(image, mask_b)
    scores = torch.cat(seen)
    threshold = float(scores[scores.isfinite()].median())
    segmenter = TorchSamSegmenter(sam, dataclasses.replace(CONFIGS["filtered"], stability_score_thresh=threshold))
    segments = segmenter.segment(image)
    assert threshold > 0.0 and len(segments) == int((scores >= threshold).sum())  # NMS keeps all: box_nms_thresh 1
    assert_same_selection(segmenter.select(image, mask_b), choose_segment(mask_b, segments))


def test_masks_empty_at_every_threshold_are_segments_without_the_stability_filter(sam, monkeypatch):
    """A mask with no pixel over the threshold minus the offset has stability 0/0 (NaN); with the filter off
    (stability_score_thresh 0: the generator skips it) it is still a segment, counted, never chosen."""
    monkeypatch.setattr(sam, "mask_threshold", 1e9)  # every mask empty
    segmenter = TorchSamSegmenter(sam, dataclasses.replace(BASE, box_nms_thresh=1.0, points_per_side=4))
    image = smooth_image(80, 112, seed=3)
    segments = segmenter.segment(image)
    assert len(segments) == 3 * 4**2 and not any(segment.any() for segment in segments)
    for mask_b in (np.ones((80, 112), bool), np.zeros((80, 112), bool)):
        assert_same_selection(segmenter.select(image, mask_b), choose_segment(mask_b, segments))


def test_no_mask_passing_the_filters_gives_no_segment(sam):
    """With a predicted-IoU threshold no mask reaches, the generator's list is empty: no segment, none counted."""
    segmenter = TorchSamSegmenter(sam, dataclasses.replace(CONFIGS["filtered"], pred_iou_thresh=1.0))
    image, mask_b = smooth_image(80, 112, seed=3), rectangle(80, 112, 10, 10, 50, 40)
    assert segmenter.segment(image) == []
    assert_same_selection(segmenter.select(image, mask_b), choose_segment(mask_b, []))
