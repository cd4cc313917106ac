"""SAM exported to ONNX (export/sam.py) and the `onnx` refinement backend (zone_engine/sam_onnx.py).

Tiny random SAM, onnxruntime on the CPU. Tolerances, |onnxruntime - torch| on every output:
- fp32: 1e-4 absolute. Both sides compute in fp32 and differ only in fusion and summation order
  (measured ~2e-6 on the tiny encoder, ~1e-7 on the decoder); 1e-4 leaves room for other CPUs' kernels.
- fp16: 2e-2 absolute + 2e-2 x max|torch|: fp16 weights and activations (eps 1e-3) through every block.
  ONNX Runtime's CPU provider runs most fp16 nodes through inserted fp32 casts, so this checks the graph
  and its rounded weights, not a GPU's fp16 arithmetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import assert_same_selection, smooth_image  # noqa: E402

from zone_engine import __version__  # noqa: E402
from zone_engine.config import SamConfig  # noqa: E402
from zone_engine.errors import CheckpointError, ConfigError, DeviceError, EditWarning, ZoneError  # noqa: E402
from zone_engine.models import SAM_SIZES, build_sam  # noqa: E402
from zone_engine.paths import file_sha256  # noqa: E402
from zone_engine.refine import choose_segment, refine_mask  # noqa: E402
from zone_engine.sam_onnx import (  # noqa: E402
    DECODER_FILE,
    ENCODER_FILE,
    MANIFEST_FILE,
    MANIFEST_KEYS,
    PROVIDER_ORDER,
    OnnxSamSegmenter,
    choose_providers,
    engine_cache_folder,
    onnx_runtime_reason,
)
from zone_engine.sam_torch import TorchSamSegmenter  # noqa: E402
from zone_export import onnx_graph  # noqa: E402
from zone_export import sam as export_module  # noqa: E402
from zone_export.options import add_export_sam_arguments  # noqa: E402
from zone_export.sam import export_sam, run_export_sam  # noqa: E402

CONFIGS = {
    "random-weights": SamConfig.for_random_weights(),
    # Looser NMS keeps more overlapping segments: more masks to compare, and harder tie orders.
    "loose-nms": SamConfig(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.95),
}
IMAGES = {
    "smooth-64x96": lambda: smooth_image(64, 96, seed=0),
    "smooth-80x48": lambda: smooth_image(80, 48, seed=1),
    "noise-96x64": lambda: np.random.default_rng(2).integers(0, 256, size=(96, 64, 3), dtype=np.uint8),
}


def tiny_sam(seed: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)  # seed 2 gives the most segments at random-weights thresholds
    return build_sam("tiny").eval()


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    return tiny_sam()


@pytest.fixture(scope="module")
def exported(sam, tmp_path_factory) -> Path:
    return export_sam(sam, "tiny", tmp_path_factory.mktemp("export") / "sam")


@pytest.fixture
def folder_copy(exported, tmp_path) -> Path:
    """A copy of the export that a test may damage."""
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def rectangle(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# ---------------------------------------------------------------------------------------------------
# The graphs against PyTorch
# ---------------------------------------------------------------------------------------------------


def test_encoder_matches_pytorch(sam, exported):
    session = ort.InferenceSession(str(exported / ENCODER_FILE), providers=["CPUExecutionProvider"])
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    (got,) = session.run(None, {"image": image.numpy()})
    with torch.inference_mode():
        want = sam.image_encoder(image)
    assert got.shape == (1, 32, 4, 4)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("batch", "count"), [(1, 1), (7, 1), (64, 1), (3, 2)])
def test_decoder_matches_sam_prompt_encoder_and_mask_decoder(sam, exported, batch, count):
    """Against segment-anything's own modules, as SamPredictor.predict_torch calls them; dynamic B and P."""
    session = ort.InferenceSession(str(exported / DECODER_FILE), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(batch)
    with torch.inference_mode():
        embeddings = sam.image_encoder(torch.randn(1, 3, 64, 64, generator=generator))
    coords = torch.rand(batch, count, 2, generator=generator) * 64
    labels = torch.ones(batch, count, dtype=torch.int)
    labels[:, 1:] = 0  # background points after the first
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        want_logits, want_iou = sam.mask_decoder(
            image_embeddings=embeddings, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        )
    got_logits, got_iou = session.run(None, {"image_embeddings": embeddings.numpy(), "point_coords": coords.numpy(),
                                             "point_labels": labels.float().numpy()})
    assert got_logits.shape == (batch, 3, 16, 16) and got_iou.shape == (batch, 3)
    np.testing.assert_allclose(got_logits, want_logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_iou, want_iou.numpy(), atol=1e-4, rtol=0)


def test_fp16_export_stays_within_its_tolerance(sam, tmp_path):
    folder = export_sam(sam, "tiny", tmp_path / "fp16", fp16=True)
    manifest = read_manifest(folder)
    assert manifest["precision"] == "fp16"
    assert manifest["validation"]["tolerance"] == {"atol": 2e-2, "rtol": 2e-2}
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    session = ort.InferenceSession(str(folder / ENCODER_FILE), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": image.numpy()})
    assert got.dtype == np.float32  # fp32 in and out: the runtime does not change with precision
    with torch.inference_mode():
        want = sam.image_encoder(image).numpy()
    assert np.abs(got - want).max() <= 2e-2 + 2e-2 * np.abs(want).max()
    import onnx

    weights = onnx.load(str(folder / ENCODER_FILE)).graph.initializer
    assert sum(w.data_type == onnx.TensorProto.FLOAT16 for w in weights) > len(weights) // 2
    decoder = onnx.load(str(folder / DECODER_FILE)).graph  # the mask decoder in fp16 too, fp32 in and out
    assert sum(w.data_type == onnx.TensorProto.FLOAT16 for w in decoder.initializer) > len(decoder.initializer) // 2
    assert {value.type.tensor_type.elem_type for value in (*decoder.input, *decoder.output)} == {onnx.TensorProto.FLOAT}
    assert OnnxSamSegmenter(folder, CONFIGS["random-weights"]).segment(smooth_image(64, 96))


# ---------------------------------------------------------------------------------------------------
# The segmenter against segment-anything's generator
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("image_name", list(IMAGES))
def test_onnx_segments_equal_torch_segments(sam, exported, config_name, image_name):
    config, image = CONFIGS[config_name], IMAGES[image_name]()
    height, width = image.shape[:2]
    torch_segments = TorchSamSegmenter(sam, config).segment(image)
    onnx_segmenter = OnnxSamSegmenter(exported, config)
    onnx_segments = onnx_segmenter.segment(image)
    assert torch_segments, "the tiny SAM should yield segments at these thresholds"
    assert len(onnx_segments) == len(torch_segments)
    for torch_mask, onnx_mask in zip(torch_segments, onnx_segments, strict=True):
        assert onnx_mask.dtype == bool and onnx_mask.shape == (height, width)
        assert iou(torch_mask, onnx_mask) >= 0.99

    # M_f and D from either backend's segments, for several M_b.
    masks_b = [rectangle(height, width, 8, 8, height // 2, width // 2),
               rectangle(height, width, height // 3, width // 4, height, width),
               torch_segments[-1]]
    for mask_b in masks_b:
        from_torch = refine_mask(mask_b, choose_segment(mask_b, torch_segments))
        from_onnx = refine_mask(mask_b, choose_segment(mask_b, onnx_segments))
        np.testing.assert_array_equal(from_onnx.mask_f, from_torch.mask_f)
        np.testing.assert_array_equal(from_onnx.dilated, from_torch.dilated)
        assert from_onnx.used_fallback == from_torch.used_fallback
        # The on-device search, with ORT's decoder, finds what choosing among ORT's own segments does.
        assert_same_selection(onnx_segmenter.select(image, mask_b), choose_segment(mask_b, onnx_segments))


def test_search_with_the_onnx_decoder_filters_as_the_generator(exported):
    """The ORT predictor's `predict_passing` filters by predicted IoU: with a threshold that drops about
    half the masks, the search still chooses what choosing among the generator's own segments does."""
    image = smooth_image(80, 48, seed=1)
    keep_all = CONFIGS["loose-nms"]
    scores = [record["predicted_iou"] for record in OnnxSamSegmenter(exported, keep_all).generator.generate(image)]
    config = dataclasses.replace(keep_all, pred_iou_thresh=float(np.median(scores)))
    segmenter = OnnxSamSegmenter(exported, config)
    segments = segmenter.segment(image)
    assert 0 < len(segments) < len(scores)
    for mask_b in [*segments[:3], rectangle(80, 48, 10, 5, 60, 40)]:
        assert_same_selection(segmenter.select(image, mask_b), choose_segment(mask_b, segments))


def test_sessions_are_created_once(exported, monkeypatch):
    created = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        created.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    segmenter = OnnxSamSegmenter(exported, CONFIGS["random-weights"])
    for name in IMAGES:
        segmenter.segment(IMAGES[name]())
    assert sorted(Path(path).name for path in created) == [ENCODER_FILE, DECODER_FILE]


def test_a_pipeline_loads_the_sessions_once_for_configs_that_differ_in_thresholds(exported, tiny_models, monkeypatch):
    """Each SamConfig an edit passed made (and kept) two new sessions, each a copy of SAM's image encoder: a service
    passing per-request thresholds grew without bound. Another points_per_batch (TensorRT's profiles) makes its own."""
    from zone_engine import ZonePipeline

    created, real = [], ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda *args, **kwargs: created.append(args[0]) or real(*args, **kwargs))
    pipe = ZonePipeline(tiny_models, device="cpu", segmenter="onnx", sam_onnx=exported)
    first, second = CONFIGS["random-weights"], CONFIGS["loose-nms"]
    pipe.segmenter(first)
    reused = pipe.segmenter(second)
    assert len(created) == 2
    image = IMAGES["noise-96x64"]()
    segments, expected = reused.segment(image), OnnxSamSegmenter(exported, second).segment(image)
    assert len(segments) == len(expected) > 0 and all(map(np.array_equal, segments, expected))
    pipe.segmenter(dataclasses.replace(first, points_per_batch=16))
    assert len(created) == 6

def test_the_onnx_predictor_refuses_single_mask_output(exported):
    """The decoder graph gives the three multimask outputs only: a single-mask request is refused, not answered
    with the first of the three."""
    predictor = OnnxSamSegmenter(exported, CONFIGS["random-weights"]).generator.predictor
    predictor.set_image(smooth_image(64, 64))
    with pytest.raises(NotImplementedError, match="multimask output only"):
        predictor.predict_torch(torch.full((1, 1, 2), 32.0), torch.ones(1, 1), multimask_output=False)


def test_segment_rejects_non_rgb(exported):
    segmenter = OnnxSamSegmenter(exported, CONFIGS["random-weights"])
    with pytest.raises(ValueError, match="uint8 RGB"):
        segmenter.segment(np.zeros((64, 64), np.uint8))
    predictor = segmenter.generator.predictor
    predictor.set_image(smooth_image(64, 64))
    with pytest.raises(NotImplementedError, match="point prompts"):
        predictor.predict_torch(None, None, boxes=torch.zeros(1, 4))


def test_providers_follow_tensorrt_cuda_cpu_order():
    class FakeOrt:
        @staticmethod
        def get_available_providers():
            return ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider"]

        @staticmethod
        def get_all_providers():
            return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider",
                    "CPUExecutionProvider"]

    assert choose_providers(FakeOrt, None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(FakeOrt, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError, match="TensorrtExecutionProvider"):
        choose_providers(FakeOrt, ["TensorrtExecutionProvider"])
    # A short name was dropped without a word from a list (or said unavailable, as if it were a provider).
    with pytest.raises(ConfigError, match="unknown ONNX Runtime provider 'cuda': did you mean CUDAExecutionProvider"):
        choose_providers(FakeOrt, ["cuda", "CPUExecutionProvider"])
    # A misspelt full name got no hint, as if nothing resembled it.
    with pytest.raises(ConfigError, match="'CUDAExecutionProvidr': did you mean CUDAExecutionProvider"):
        choose_providers(FakeOrt, ["CUDAExecutionProvidr"])
    with pytest.raises(ConfigError, match="'cpuexecutionprovidor': did you mean CPUExecutionProvider"):
        choose_providers(FakeOrt, ["cpuexecutionprovidor"])
    with pytest.raises(ConfigError, match="'bogus': ONNX Runtime names them"):
        choose_providers(FakeOrt, ["bogus"])


def test_missing_onnxruntime_says_what_to_install(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DeviceError, match=r"pip install 'zone-engine\[onnx\]'"):
        OnnxSamSegmenter(exported, SamConfig())


# ---------------------------------------------------------------------------------------------------
# Bad folders
# ---------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="the SAM export .*nowhere: no such folder.*zone export sam.*`--tiny` in"):
        OnnxSamSegmenter(tmp_path / "nowhere", SamConfig())


def test_missing_or_unreadable_manifest(folder_copy):
    (folder_copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read.*zone export sam"):
        OnnxSamSegmenter(folder_copy, SamConfig())
    (folder_copy / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="the SAM export .*: no manifest.json.*zone export sam"):
        OnnxSamSegmenter(folder_copy, SamConfig())


@pytest.mark.parametrize("key", MANIFEST_KEYS)
def test_manifest_without_required_fields(folder_copy, key):
    manifest = read_manifest(folder_copy)
    del manifest[key]
    write_manifest(folder_copy, manifest)
    with pytest.raises(CheckpointError, match=f"the SAM export .*: manifest.json lacks {key}"):
        OnnxSamSegmenter(folder_copy, SamConfig())


def test_a_manifest_of_another_format_is_refused(folder_copy):
    write_manifest(folder_copy, {**read_manifest(folder_copy), "format": 2})
    with pytest.raises(CheckpointError, match="manifest.json has format 2, this zone-engine reads format 1"):
        OnnxSamSegmenter(folder_copy, SamConfig())


@pytest.mark.parametrize("changes, words", [
    ({"input_size": 72, "embedding_shape": [32, 4, 4], "low_res_size": 18}, "multiple of 16"),
    ({"low_res_size": 32}, "low_res_size must be input_size/4"),  # was ONNX Runtime's "invalid dimensions"
    ({"embedding_shape": [True, 4, 4]}, "embedding_shape must be [channels"),  # a bool is no channel count
    ({"pixel_mean": [1, 2]}, "pixel_mean must be 3 numbers"),  # was a RuntimeError inside segment-anything
    ({"pixel_std": [0, 0, 0]}, "pixel_std must be 3 positive numbers"),  # ran, every segment dropped
    ({"mask_threshold": "x"}, "mask_threshold must be a finite number"),  # was a ValueError at float()
    ({"precision": "int8", "image_format": "XYZ"}, "precision must be fp32 or fp16; image_format must be RGB"),
    ({"graphs": {}}, "a `zone export unet` folder"),  # listed ten missing keys
])
def test_manifest_values_the_segmenter_could_not_use_are_said(folder_copy, changes, words):
    write_manifest(folder_copy, {**read_manifest(folder_copy), **changes})
    with pytest.raises(CheckpointError, match=f"the SAM export .*{re.escape(words)}"):
        OnnxSamSegmenter(folder_copy, SamConfig())


@pytest.mark.parametrize("changes, words", [
    ({"embedding_shape": [48, 4, 4]}, "the graphs' embeddings [1, 32, 4, 4] differ from manifest.json's [48, 4, 4]"),
    ({"input_size": 128, "embedding_shape": [32, 8, 8], "low_res_size": 32},
     f"{ENCODER_FILE} takes [1, 3, 64, 64], not a (1, 3, 128, 128) image"),
])
def test_manifest_sizes_the_graphs_disagree_with_are_said(folder_copy, changes, words):
    """Consistent among themselves but not the graphs': the predictor would bind buffers of the manifest's sizes."""
    write_manifest(folder_copy, {**read_manifest(folder_copy), **changes})
    with pytest.raises(CheckpointError, match=f"not one matching SAM export: .*{re.escape(words)}"):
        OnnxSamSegmenter(folder_copy, SamConfig())


def test_a_bgr_export_is_accepted(folder_copy):
    """image_format is RGB or BGR (segment-anything's two): a BGR export reaches SamPredictor's channel flip."""
    write_manifest(folder_copy, {**read_manifest(folder_copy), "image_format": "BGR"})
    assert OnnxSamSegmenter(folder_copy, CONFIGS["random-weights"]).generator.predictor.model.image_format == "BGR"


def test_a_broken_export_is_said_when_the_pipeline_is_built_not_after_denoising(folder_copy, tiny_models):
    """zone edit denoised for minutes, and zone serve opened its port, before a deleted graph was found."""
    from zone_engine import ZonePipeline

    (folder_copy / DECODER_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{DECODER_FILE} is missing"):
        ZonePipeline(tiny_models, device="cpu", segmenter="onnx", sam_onnx=folder_copy)
    # Checksums matching, but a graph ONNX Runtime cannot load: said when the sessions open, now at the build too.
    (folder_copy / DECODER_FILE).write_text("not a graph")
    manifest = read_manifest(folder_copy)
    manifest["files"][DECODER_FILE] = file_sha256(folder_copy / DECODER_FILE)
    write_manifest(folder_copy, manifest)
    with pytest.raises(CheckpointError, match=f"ONNX Runtime cannot load {DECODER_FILE}"):
        ZonePipeline(tiny_models, device="cpu", segmenter="onnx", sam_onnx=folder_copy)


@pytest.mark.parametrize("manifest", ['{"format": 1, "graphs": {"dual_step": {}}}', "{not json", '{"a": 1}'])
def test_a_folder_the_export_will_not_replace_is_not_the_one_it_is_told_to_write(folder_copy, manifest):
    """A UNet export's folder, or an unreadable or foreign manifest.json: the error said to re-run `zone export sam
    --out` that folder, which the export refuses (it would replace the manifest). Another folder is named."""
    (folder_copy / MANIFEST_FILE).write_text(manifest)
    with pytest.raises(CheckpointError, match="which `zone export sam` will not replace.*--out NEW_FOLDER") as said:
        OnnxSamSegmenter(folder_copy, SamConfig())
    assert f"--out {folder_copy}" not in str(said.value)
    with pytest.raises(ZoneError, match="`zone export sam` would replace its manifest"):  # as the error says
        run_export_sam(argparse.Namespace(tiny=True, checkpoint=None, model_type=None, out=folder_copy,
                                          fp16=False, opset=17))


def test_a_files_checksum_is_computed_once_per_version_of_it(tmp_path, monkeypatch):
    """A server hashed its 2.5 GB export at start and again for each segmenter: now once, until the file changes."""
    path = tmp_path / "graph.onnx"
    path.write_bytes(b"a" * 1000)
    first = file_sha256(path)
    opened = []
    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: opened.append(args) or 1 / 0)
    assert file_sha256(path) == first and opened == []  # from the cache: the file was not read again
    monkeypatch.undo()
    path.write_bytes(b"b" * 1000)  # rewritten, the same size: another version of the file (its mtime)
    assert file_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest() != first


def test_missing_onnx_file(folder_copy):
    (folder_copy / DECODER_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{DECODER_FILE} is missing.*zone export sam") as said:
        OnnxSamSegmenter(folder_copy, SamConfig())
    # The command to run, its folder filled in (it was FOLDER), and the tiny models' way too.
    assert f"re-run `zone export sam --checkpoint SAM.pth --out {folder_copy}` (`--tiny` in place of --checkpoint " \
           "for the tiny models) to write it afresh" in str(said.value)


def test_corrupt_onnx_file_fails_its_checksum(folder_copy):
    data = bytearray((folder_copy / ENCODER_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    (folder_copy / ENCODER_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{ENCODER_FILE} does not match its sha256.*zone export sam"):
        OnnxSamSegmenter(folder_copy, SamConfig())


def test_unloadable_onnx_file_with_matching_checksum(folder_copy):
    """A truncated file whose manifest was rewritten to match: ONNX Runtime's error, as a CheckpointError."""
    path = folder_copy / DECODER_FILE
    path.write_bytes(path.read_bytes()[:1000])
    manifest = read_manifest(folder_copy)
    manifest["files"][DECODER_FILE] = file_sha256(path)
    write_manifest(folder_copy, manifest)
    with pytest.raises(CheckpointError, match=f"cannot load .*{DECODER_FILE}.*zone export sam"):
        OnnxSamSegmenter(folder_copy, SamConfig())


def test_an_export_too_new_for_this_onnx_runtime_says_why(folder_copy):
    """As from a newer onnx than this onnxruntime reads: ORT's reason comes after its source file and C++ signature,
    and cutting its message at 300 characters cut the reason off."""
    onnx = pytest.importorskip("onnx")
    path = folder_copy / DECODER_FILE
    graph = onnx.load(path)
    graph.ir_version = 99
    onnx.save(graph, path)
    manifest = read_manifest(folder_copy)
    manifest["files"][DECODER_FILE] = file_sha256(path)
    write_manifest(folder_copy, manifest)
    with pytest.raises(CheckpointError, match=f"cannot load {DECODER_FILE}: .*IR version: 99.*zone export sam"):
        OnnxSamSegmenter(folder_copy, SamConfig())


def test_onnx_runtimes_reason_is_one_line_with_its_start_and_end():
    """ORT's messages span lines (its source file, then the reason): the error is one line, a long one cut in its
    middle, not at its end where the reason is."""
    said = onnx_runtime_reason(RuntimeError("[ONNXRuntimeError] : 1 : FAIL :\n  " + "x" * 400 + "\n  IR version: 99\n"))
    assert said.startswith("[ONNXRuntimeError] : 1 : FAIL : xxx") and said.endswith("xxx IR version: 99")
    assert len(said) == 300 + len(" ... ") and "\n" not in said
    assert onnx_runtime_reason(RuntimeError(" a\n b ")) == "a b"


def test_manifest_model_type_disagreeing_with_the_graphs(folder_copy):
    manifest = read_manifest(folder_copy)
    manifest["model_type"] = "vit_b"
    write_manifest(folder_copy, manifest)
    with pytest.raises(CheckpointError, match="exported from a tiny SAM but manifest.json says vit_b.*zone export sam"):
        OnnxSamSegmenter(folder_copy, SamConfig())


def test_mismatched_encoder_decoder_pair(folder_copy, tmp_path, monkeypatch):
    """A decoder of a wider SAM next to this encoder (manifest checksums made to match): named clearly."""
    monkeypatch.setitem(SAM_SIZES, "tiny_wide", {**SAM_SIZES["tiny"], "prompt_dim": 48})
    torch.manual_seed(0)
    other = export_sam(build_sam("tiny_wide").eval(), "tiny_wide", tmp_path / "wide")
    shutil.copy(other / DECODER_FILE, folder_copy / DECODER_FILE)
    manifest = read_manifest(folder_copy)
    manifest["files"][DECODER_FILE] = file_sha256(folder_copy / DECODER_FILE)
    write_manifest(folder_copy, manifest)
    with pytest.raises(CheckpointError) as error:
        OnnxSamSegmenter(folder_copy, SamConfig())
    message = str(error.value)
    assert "not one matching SAM export" in message
    assert f"{DECODER_FILE} was exported from a tiny_wide SAM" in message
    assert "[1, 32, 4, 4]" in message and "[1, 48, 4, 4]" in message  # the embedding shapes disagree
    assert "zone export sam" in message


def test_swapped_files_are_named(folder_copy):
    encoder, decoder = folder_copy / ENCODER_FILE, folder_copy / DECODER_FILE
    encoder_bytes = encoder.read_bytes()
    encoder.write_bytes(decoder.read_bytes())
    decoder.write_bytes(encoder_bytes)
    manifest = read_manifest(folder_copy)
    manifest["files"] = {name: file_sha256(folder_copy / name) for name in manifest["files"]}
    write_manifest(folder_copy, manifest)
    with pytest.raises(CheckpointError, match=f"{ENCODER_FILE} is not a SAM image encoder"):
        OnnxSamSegmenter(folder_copy, SamConfig())


# ---------------------------------------------------------------------------------------------------
# Export: manifest, command line, failure
# ---------------------------------------------------------------------------------------------------


def test_manifest_records_the_export(exported):
    manifest = read_manifest(exported)
    assert manifest["format"] == 1
    assert manifest["model_type"] == "tiny"
    assert manifest["input_size"] == 64
    assert manifest["embedding_shape"] == [32, 4, 4] and manifest["low_res_size"] == 16
    assert manifest["opset"] == 17 and manifest["precision"] == "fp32"
    assert manifest["pixel_mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert manifest["pixel_std"] == pytest.approx([58.395, 57.12, 57.375])
    assert manifest["mask_threshold"] == 0.0 and manifest["image_format"] == "RGB"
    assert manifest["files"] == {name: file_sha256(exported / name) for name in (DECODER_FILE, ENCODER_FILE)}
    assert manifest["checkpoint_sha256"] == "random:tiny" and manifest["checkpoint"] is None
    assert manifest["zone_engine_version"] == __version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["onnxruntime_version"] == ort.__version__
    validation = manifest["validation"]
    assert validation["tolerance"] == {"atol": 1e-4, "rtol": 1e-4}
    # The decoder is checked at batch and point counts other than traced with (2 prompts of 1 point).
    assert set(validation) == {"tolerance", ENCODER_FILE, f"{DECODER_FILE} B=5 P=1", f"{DECODER_FILE} B=3 P=3"}
    assert all(value <= 1e-4 for key, value in validation.items() if key != "tolerance")
    assert sorted(path.name for path in exported.iterdir()) == sorted([ENCODER_FILE, DECODER_FILE, MANIFEST_FILE])


def test_tensorrt_engines_are_cached_per_export_and_a_re_export_drops_the_old_ones(sam, tmp_path, monkeypatch):
    """ORT's own engine-cache names do not cover the weights: other weights exported into the same folder
    must not load the old weights' engines; nor the decoder's batch profile. ORT makes only the cache folder's
    last level: it is made here. The GPU providers get the pipeline's device."""
    folder, config = export_sam(sam, "tiny", tmp_path / "sam"), CONFIGS["random-weights"]
    old_cache = engine_cache_folder(folder, read_manifest(folder), config.points_per_batch)
    old_cache.mkdir(parents=True)
    (old_cache / "decoder.engine").write_bytes(b"engine of the old weights")
    export_sam(tiny_sam(seed=3), "tiny", folder)
    new_cache = engine_cache_folder(folder, read_manifest(folder), config.points_per_batch)
    assert new_cache != old_cache and not old_cache.exists()
    assert engine_cache_folder(folder, read_manifest(folder), config.points_per_batch * 2) != new_cache
    segmenter = OnnxSamSegmenter(folder, config, device_index=1)
    options = segmenter._provider_options("TensorrtExecutionProvider", DECODER_FILE, config)
    assert options["trt_engine_cache_path"] == str(new_cache) and options["device_id"] == 1 and new_cache.is_dir()
    assert "trt_fp16_enable" not in options  # an fp16 export's fp32 prompt encoder stays fp32

    def refused(*_args, **_kwargs):  # a read-only export folder (root writes anyway: not made by chmod here)
        raise PermissionError(13, "Permission denied")

    shutil.rmtree(new_cache)
    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(CheckpointError, match=r"TensorRT's engine cache .* cannot be made \(Permission denied\): "
                       "make the folder writable"):
        segmenter._provider_options("TensorrtExecutionProvider", ENCODER_FILE, config)
    assert segmenter._provider_options("CUDAExecutionProvider", ENCODER_FILE, CONFIGS["random-weights"]) == {
        "device_id": 1}


def test_a_gpu_provider_that_cannot_start_drops_out_with_a_warning_the_others_keep_their_options(folder_copy,
                                                                                                monkeypatch):
    """ORT's own fallback would retry CUDA and CPU without their options (on GPU 0 whatever device_id), and
    print its error to stdout: here each failing GPU provider drops out in turn, said in one warning. On a copy:
    TensorRT offered makes its engine cache folder in the export (the shared one failed test_manifest_records_the_export
    run after it)."""
    real, created = ort.InferenceSession, []

    def gpu_libraries_missing(path, options, providers, provider_options, enable_fallback):
        created.append((Path(path).name, providers, provider_options, enable_fallback))
        if providers[0] != "CPUExecutionProvider":
            raise RuntimeError(f"{providers[0]} could not be created: libnvinfer.so.10 not found")
        return real(path, options, providers=providers)

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(PROVIDER_ORDER))
    monkeypatch.setattr(ort, "InferenceSession", gpu_libraries_missing)
    with pytest.warns(EditWarning) as said:
        segmenter = OnnxSamSegmenter(folder_copy, CONFIGS["random-weights"], device_index=1)
    assert [str(warning.message) for warning in said] == [
        "ONNX Runtime could not start TensorrtExecutionProvider (TensorrtExecutionProvider could not be created: "
        "libnvinfer.so.10 not found) or CUDAExecutionProvider (CUDAExecutionProvider could not be created: "
        f"libnvinfer.so.10 not found) for {name}: it runs on CPUExecutionProvider" for name in (ENCODER_FILE,
                                                                                                DECODER_FILE)]
    encoder_tries = [(providers, options, fallback) for name, providers, options, fallback in created
                     if name == ENCODER_FILE]
    assert [providers for providers, _, _ in encoder_tries] == [list(PROVIDER_ORDER), list(PROVIDER_ORDER[1:]),
                                                                 ["CPUExecutionProvider"]]
    assert encoder_tries[1][1] == [{"device_id": 1}, {}] and {fallback for _, _, fallback in encoder_tries} == {0}
    assert segmenter.providers == ["CPUExecutionProvider"] and segmenter.segment(smooth_image(64, 64))


def test_a_lone_gpu_provider_that_cannot_start_is_an_error_not_a_session_without_providers(exported, monkeypatch):
    """Asked for CUDA only, its libraries missing: nothing is left to fall back on, so ORT's reason is raised, as
    the machine's (a DeviceError), not as the export's, which re-exporting would not mend."""
    def cuda_libraries_missing(path, options, providers, provider_options, enable_fallback):
        raise RuntimeError(f"{providers[0]} could not be created: libcudnn.so.9 not found")

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(PROVIDER_ORDER))
    monkeypatch.setattr(ort, "InferenceSession", cuda_libraries_missing)
    said = (f"could start none of CUDAExecutionProvider \\(CUDAExecutionProvider could not be created: "
            f"libcudnn.so.9 not found\\) for {ENCODER_FILE}: install the libraries")
    with pytest.raises(DeviceError, match=said) as raised:
        OnnxSamSegmenter(exported, SamConfig(), providers=["CUDAExecutionProvider"])
    assert "zone export sam" not in str(raised.value)


def test_the_tensorrt_decoder_profile_spans_one_prompt_to_a_full_batch(folder_copy):
    """The generator's last batch may be a single point, the others `points_per_batch`: one profile for all, of
    the export's embedding shape with its batch axis; the encoder (a fixed shape) gets none."""
    config = CONFIGS["random-weights"]
    segmenter, batch = OnnxSamSegmenter(folder_copy, config), config.points_per_batch
    decoder = segmenter._provider_options("TensorrtExecutionProvider", DECODER_FILE, config)
    assert {key: value for key, value in decoder.items() if key.startswith("trt_profile")} == {
        "trt_profile_min_shapes": "image_embeddings:1x32x4x4,point_coords:1x1x2,point_labels:1x1",
        "trt_profile_opt_shapes": f"image_embeddings:1x32x4x4,point_coords:{batch}x1x2,point_labels:{batch}x1",
        "trt_profile_max_shapes": f"image_embeddings:1x32x4x4,point_coords:{batch}x1x2,point_labels:{batch}x1",
    }
    encoder = segmenter._provider_options("TensorrtExecutionProvider", ENCODER_FILE, config)
    assert not [key for key in encoder if key.startswith("trt_profile")]


@pytest.mark.filterwarnings("ignore:Specified provider")  # ORT's own, for the providers this build lacks
def test_a_gpu_provider_that_onnx_runtime_leaves_out_without_an_error_is_said(folder_copy, monkeypatch):
    """On Linux ORT mostly logs a GPU provider whose libraries do not load and builds the session without it:
    no exception for the loop above to see. The real ORT here (a CPU build) does that with providers it lacks.
    On a copy, as above: TensorRT offered makes its engine cache folder in the export."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(PROVIDER_ORDER))
    with pytest.warns(EditWarning) as said:
        segmenter = OnnxSamSegmenter(folder_copy, CONFIGS["random-weights"])
    assert [str(warning.message) for warning in said if warning.category is EditWarning] == [
        "ONNX Runtime could not start TensorrtExecutionProvider (left out by ONNX Runtime, whose log says why: its "
        "libraries may be missing) or CUDAExecutionProvider (left out by ONNX Runtime, whose log says why: its "
        f"libraries may be missing) for {name}: it runs on CPUExecutionProvider" for name in (ENCODER_FILE,
                                                                                              DECODER_FILE)]
    assert segmenter.providers == ["CPUExecutionProvider"]


def test_graph_files_hold_the_manifests_opset_and_dynamic_prompt_axes(exported):
    """What the manifest says is what the files hold: the opset; the decoder's prompt count B (inputs and both
    outputs) and point count P symbolic, so one graph runs every batch; the inputs' other axes fixed. (The
    exporter may leave more output axes symbolic.)"""
    import onnx

    manifest = read_manifest(exported)
    dynamic = {"image": [], "image_embeddings": [], "point_coords": [0, 1], "point_labels": [0, 1],
               "low_res_logits": [0], "iou_predictions": [0]}
    for name in (ENCODER_FILE, DECODER_FILE):
        model = onnx.load(str(exported / name))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [manifest["opset"]]
        for value in (*model.graph.input, *model.graph.output):
            symbolic = [axis for axis, d in enumerate(value.type.tensor_type.shape.dim) if not d.HasField("dim_value")]
            if value in model.graph.input:
                assert symbolic == dynamic[value.name], (name, value.name)
            assert set(dynamic[value.name]) <= set(symbolic), (name, value.name)


def test_manifest_records_the_checkpoint_checksum(sam, tmp_path):
    checkpoint = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), checkpoint)
    # What an earlier export left: a killed one's scratch, a vit_h's weights file this export does not write.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for scratch in (".export-killed", f".export-{dead.stdout.strip()}-abc", f".export-{os.getpid()}-running"):
        (tmp_path / "out" / scratch / "raw-image_encoder").mkdir(parents=True)
    (tmp_path / "out" / f"{ENCODER_FILE}.data").write_bytes(b"2.5 GB of vit_h")
    folder = export_sam(sam, "tiny", tmp_path / "out", checkpoint=checkpoint, opset=18)
    # A running export's scratch (this process's pid) is not another's to sweep.
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [f".export-{os.getpid()}-running", DECODER_FILE, ENCODER_FILE, MANIFEST_FILE])
    manifest = read_manifest(folder)
    assert manifest["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert manifest["checkpoint"] == "sam_tiny.pth"
    assert manifest["opset"] == 18
    import onnx

    for name in (ENCODER_FILE, DECODER_FILE):
        assert [o.version for o in onnx.load(str(folder / name)).opset_import if o.domain in ("", "ai.onnx")] == [18]


def test_run_export_sam_tiny_from_the_command_line(tmp_path):
    parser = argparse.ArgumentParser()
    add_export_sam_arguments(parser)
    args = parser.parse_args(["--tiny", "--out", str(tmp_path / "a")])
    assert (args.fp16, args.opset, args.checkpoint, args.model_type) == (False, 17, None, None)
    folder = run_export_sam(args)
    assert folder == tmp_path / "a"
    assert read_manifest(folder)["checkpoint_sha256"] == "random:tiny"
    assert OnnxSamSegmenter(folder, CONFIGS["random-weights"]).segment(smooth_image(64, 96)) is not None

    # A fixed seed: a second --tiny export has the same weights, and leaves torch's global RNG alone.
    state = torch.random.get_rng_state()
    again = run_export_sam(argparse.Namespace(tiny=True, checkpoint=None, model_type=None, out=tmp_path / "b",
                                              fp16=False, opset=17))
    assert torch.equal(torch.random.get_rng_state(), state)
    segments_a = OnnxSamSegmenter(folder, CONFIGS["loose-nms"]).segment(smooth_image(80, 48, seed=1))
    segments_b = OnnxSamSegmenter(again, CONFIGS["loose-nms"]).segment(smooth_image(80, 48, seed=1))
    assert len(segments_a) == len(segments_b)
    assert all(np.array_equal(a, b) for a, b in zip(segments_a, segments_b, strict=True))

    # The tiny pipeline's own SAM: `zone edit --tiny --segmenter onnx --sam-onnx` refines as `zone edit --tiny`.
    from zone_engine import EditConfig, ZonePipeline

    image, config = smooth_image(64, 96, seed=2), EditConfig(steps=2)
    masks = [ZonePipeline.tiny(**options).edit(image, "make the house golden", config.replace(
        sam=SamConfig.for_random_weights())).mask_f for options in ({}, {"segmenter": "onnx", "sam_onnx": folder})]
    assert masks[0].any() and np.array_equal(masks[0], masks[1])


def test_run_export_sam_argument_errors(tmp_path):
    with pytest.raises(ConfigError, match="--checkpoint"):
        run_export_sam(argparse.Namespace(tiny=False, checkpoint=None, model_type=None, out=tmp_path,
                                          fp16=False, opset=17))
    with pytest.raises(ConfigError, match="leave out --checkpoint"):
        run_export_sam(argparse.Namespace(tiny=True, checkpoint=tmp_path / "x.pth", model_type=None, out=tmp_path,
                                          fp16=False, opset=17))
    with pytest.raises(CheckpointError, match="not found"):
        run_export_sam(argparse.Namespace(tiny=False, checkpoint=tmp_path / "sam_vit_b.pth", model_type=None,
                                          out=tmp_path, fp16=False, opset=17))
    (tmp_path / f"{ENCODER_FILE}.data").mkdir()  # where vit_h's encoder weights go: said before any model loads
    with pytest.raises(ZoneError, match=f"holds a folder named {ENCODER_FILE}.data"):
        run_export_sam(argparse.Namespace(tiny=True, checkpoint=None, model_type=None, out=tmp_path,
                                          fp16=False, opset=17))
    (tmp_path / f"{ENCODER_FILE}.data").rmdir()
    (tmp_path / MANIFEST_FILE).write_text('{"format": 1, "graphs": {"dual_step": {}}}')  # a UNet export's
    with pytest.raises(ZoneError, match="holds a `zone export unet` folder: `zone export sam` would replace"):
        run_export_sam(argparse.Namespace(tiny=True, checkpoint=None, model_type=None, out=tmp_path,
                                          fp16=False, opset=17))


def test_run_export_sam_refuses_tiny_with_a_model_type_and_opsets_below_13(sam, tmp_path):
    """--tiny builds its own SAM, so --model-type is refused as --checkpoint is; opset 12 lacks an op SAM's graphs
    use (unflatten), said before a checkpoint of gigabytes loads."""
    with pytest.raises(ConfigError, match="leave out --checkpoint and --model-type"):
        run_export_sam(argparse.Namespace(tiny=True, checkpoint=None, model_type="vit_b", out=tmp_path / "a",
                                          fp16=False, opset=17))
    with pytest.raises(ConfigError, match="opsets 13 to 20"):
        run_export_sam(argparse.Namespace(tiny=False, checkpoint=None, model_type=None, out=tmp_path / "b",
                                          fp16=False, opset=12))
    with pytest.raises(ConfigError, match="opsets 13 to 20"):  # export_sam itself, as a library call
        export_sam(sam, "tiny", tmp_path / "c", opset=21)
    assert not (tmp_path / "c").exists()


def test_weights_in_external_data_files(sam, tmp_path, monkeypatch):
    """As vit_h's 2.5 GB fp32 encoder is written: weights in `<graph>.onnx.data`, checksummed too."""
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_BYTES", 0)
    folder = export_sam(sam, "tiny", tmp_path / "external")
    data_files = [f"{DECODER_FILE}.data", f"{ENCODER_FILE}.data"]
    assert sorted(read_manifest(folder)["files"]) == sorted([DECODER_FILE, ENCODER_FILE, *data_files])
    assert (folder / ENCODER_FILE).stat().st_size < (folder / data_files[1]).stat().st_size
    image = smooth_image(80, 48, seed=1)
    config = CONFIGS["loose-nms"]
    segments = OnnxSamSegmenter(folder, config).segment(image)
    assert [m.sum() for m in segments] == [m.sum() for m in TorchSamSegmenter(sam, config).segment(image)]
    (folder / data_files[1]).unlink()
    with pytest.raises(CheckpointError, match=f"{ENCODER_FILE}.data is missing"):
        OnnxSamSegmenter(folder, config)


def test_failed_validation_writes_nothing(sam, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier contents")
    monkeypatch.setitem(export_module.TOLERANCES, "fp32", {"atol": -1.0, "rtol": 0.0})
    with pytest.raises(ZoneError, match=f"exported {ENCODER_FILE} differs from PyTorch.*nothing was written"):
        export_sam(sam, "tiny", out)
    assert sorted(path.name for path in out.iterdir()) == ["keep.txt"]
    with pytest.raises(ZoneError, match="differs from PyTorch"):
        export_sam(sam, "tiny", tmp_path / "new" / "out")
    assert not (tmp_path / "new" / "out").exists()


def test_pipeline_mask_f_is_identical_with_either_refinement_backend(tmp_path):
    """The pipeline's M_f is the same with --segmenter torch and --segmenter onnx."""
    from zone_engine import EditConfig, SamConfig, ZonePipeline
    from zone_engine.models import build_tiny_components

    models = build_tiny_components(seed=0)
    folder = export_sam(models.sam, "tiny", tmp_path / "sam")
    config = EditConfig(steps=2, sam=SamConfig.for_random_weights())
    image = smooth_image(64, 96, seed=2)
    results = [
        ZonePipeline(models, device="cpu", **options).edit(image, "make the house golden", config)
        for options in ({"segmenter": "torch"}, {"segmenter": "onnx", "sam_onnx": folder})
    ]
    # A SAM segment became M_f with each backend (with none overlapping M_b both would return M_b, and nothing of
    # the segmenters would be compared): M_b covers this image at these seeds, so any segment overlaps it.
    assert [result.used_fallback for result in results] == [False, False]
    assert not np.array_equal(results[0].mask_f, results[0].mask_b)
    assert np.array_equal(results[0].mask_f, results[1].mask_f)
    assert np.array_equal(results[0].image, results[1].image)


def test_zone_export_shows_each_graph_traced_and_checked_unless_told_not_to(tmp_path, capsys):
    """An export ran minutes silent with real weights (`zone export unet` 1m21s even with --tiny on 2 cores)."""
    from zone_engine.cli import main

    assert main(["export", "sam", "--tiny", "--out", str(tmp_path / "shown")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == [f"{ENCODER_FILE}: tracing to ONNX (opset 17)", f"{DECODER_FILE}: tracing to ONNX (opset 17)"]
    assert any(line.startswith(f"{ENCODER_FILE}: matches PyTorch (largest difference ") for line in lines)
    assert main(["export", "sam", "--tiny", "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert not onnx_graph.log.handlers and onnx_graph.log.level == logging.NOTSET  # the command's, gone with it


def test_ctrl_c_while_a_re_export_installs_waits_for_the_moves(exported, folder_copy, monkeypatch):
    """A signal between two moves left the new encoder beside the old decoder and manifest: the folder's
    working export lost, refused as corrupt. It is held off until every file is in, then delivered."""
    moves, real_replace = [], os.replace

    def ctrl_c_at_the_second_move(source, target):
        moves.append(Path(target).name)
        if len(moves) == 2:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, as the terminal sends it
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", ctrl_c_at_the_second_move)
    with pytest.raises(KeyboardInterrupt):
        export_sam(tiny_sam(seed=3), "tiny", folder_copy)  # other weights than the export in the folder
    monkeypatch.undo()
    assert moves == [ENCODER_FILE, DECODER_FILE, MANIFEST_FILE]
    assert read_manifest(folder_copy)["files"] != read_manifest(exported)["files"]  # the new export, whole
    assert OnnxSamSegmenter(folder_copy, SamConfig()).manifest == read_manifest(folder_copy)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_export_cut_off_while_installing_leaves_no_manifest_vouching_for_missing_graphs(sam, tmp_path, monkeypatch):
    """The manifest is installed last: an export stopped after its first graph's move has no manifest, so the
    folder is refused as unfinished, not read with a graph missing or from the previous export."""
    moves, real_replace = [], os.replace

    def replace_once_then_fail(source, target):
        moves.append(Path(target).name)
        if len(moves) == 2:
            raise KeyboardInterrupt  # Ctrl-C between two moves
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_once_then_fail)
    (tmp_path / "out").mkdir()  # the user's folder (one the export creates, it removes when cut off)
    with pytest.raises(KeyboardInterrupt):
        export_sam(sam, "tiny", tmp_path / "out")
    monkeypatch.undo()
    assert moves[0] != MANIFEST_FILE and not (tmp_path / "out" / MANIFEST_FILE).exists()
    with pytest.raises(CheckpointError, match="no manifest.json: not a `zone export sam` folder, or the export"):
        OnnxSamSegmenter(tmp_path / "out", SamConfig())


def test_an_export_into_another_exports_folder_is_refused_from_python_and_when_made_meanwhile(sam, tmp_path,
                                                                                             monkeypatch):
    """export_sam replaced a `zone export unet` folder's manifest without a word from Python (the command line
    alone checked), and on the command line when `zone export unet` ran into the same new folder at the same
    time: both exit 0, the export that finished first left with graphs and no manifest."""
    unet = tmp_path / "unet"
    unet.mkdir()
    write_manifest(unet, {"format": 1, "graphs": {"dual_step": {}}})
    with pytest.raises(ZoneError, match="holds a `zone export unet` folder: `zone export sam` would replace"):
        export_sam(sam, "tiny", unet)
    assert sorted(path.name for path in unet.iterdir()) == [MANIFEST_FILE]
    out, validate = tmp_path / "shared", export_module._validate

    def unet_export_finishes_meanwhile(*args):
        write_manifest(out, {"format": 1, "graphs": {"dual_step": {}}})
        return validate(*args)

    monkeypatch.setattr(export_module, "_validate", unet_export_finishes_meanwhile)
    with pytest.raises(ZoneError, match="holds a `zone export unet` folder: `zone export sam` would replace"):
        export_sam(sam, "tiny", out)
    assert read_manifest(out) == {"format": 1, "graphs": {"dual_step": {}}}
    assert sorted(path.name for path in out.iterdir()) == [MANIFEST_FILE]
