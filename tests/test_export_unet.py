"""The dual-UNet step and the VAE exported to ONNX (export/unet.py), the engine cache (export/engine.py) and
the TensorRT denoiser (zone_engine/tensorrt_denoiser.py).

Tiny random models, ONNX Runtime on the CPU; one dynamic export (32x32 to 96x64, opt 64x64) serves the module.
Tolerances, |onnxruntime - torch| <= atol + rtol * max|torch|:
- guided noise, fp32: 1e-4 + 1e-4 x max. Both runtimes compute in fp32 and differ only in fusion and summation
  order (~1e-6 relative per layer); guidance then multiplies branch differences by up to 14 (measured ~1e-5
  on values ~10).
- attention sums, fp32: 1e-5 absolute. Softmax probabilities summed over 20 rows, values ~0.3; the two
  runtimes agree to ~1e-7.
- fp16 graphs: 2e-2 + 2e-2 x max against the fp32 model: fp16 weights and activations (eps 1e-3). ONNX
  Runtime's CPU provider runs fp16 nodes through inserted fp32 casts, so this checks the graph and its rounded
  weights; the TensorRT class below checks fp16 arithmetic on a GPU.
The TensorRT class runs only where `tensorrt` and CUDA are present (never on our machines).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import smooth_image  # noqa: E402

from zone_engine import __version__  # noqa: E402
from zone_engine.cli import Terminated, terminated_as_interrupt  # noqa: E402
from zone_engine.config import EditConfig  # noqa: E402
from zone_engine.denoise import DenoiseInputs, guided_noise, initial_noise  # noqa: E402
from zone_engine.dual_step import DualUNet, FusedDualDenoiser  # noqa: E402
from zone_engine.errors import CheckpointError, ConfigError, DeviceError, ZoneError  # noqa: E402
from zone_engine.localize import AttentionAccumulator, attention_grid, localize, record_cross_attention  # noqa: E402
from zone_engine.models import build_tiny_components  # noqa: E402
from zone_export import engine as engine_module  # noqa: E402
from zone_export import unet as export_module  # noqa: E402
from zone_export.engine import (  # noqa: E402
    EngineCache,
    build_engine,
    engine_cache_key,
    named_graphs,
    run_build_engine,
)
from zone_export.options import TINY_SEED, add_build_engine_arguments, add_export_unet_arguments  # noqa: E402
from zone_export.unet import (  # noqa: E402
    MANIFEST_FILE,
    DualStepForExport,
    ShapeProfile,
    export_dual_step,
    export_unet_graphs,
    export_vae,
    latent_size,
    parse_dynamic_shapes,
    read_manifest,
    run_export_unet,
    weights_sha256,
)

PROFILE = "32x32:64x64:96x64"
SIZES = [(64, 64), (96, 64), (32, 32)]  # opt (the export size), then the other sizes of the profile
EPS_TOLERANCE = dict(atol=1e-4, rtol=1e-4)
ATTENTION_ATOL = 1e-5
FP16_TOLERANCE = dict(atol=2e-2, rtol=2e-2)


def grid_of(size) -> tuple[int, int]:
    """The attention grid of an image size (height, width): 1/32 of it."""
    return attention_grid(latent_size(size))


def export_args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_export_unet_arguments(parser)
    return parser.parse_args(["--out", str(out), *extra])


@pytest.fixture(scope="module")
def models():
    """The tiny models `--tiny` exports (same seed: same weights), in fp32 on the CPU."""
    models = build_tiny_components(TINY_SEED)
    for net in (models.ip2p_unet, models.mb_unet, models.vae):
        net.eval().requires_grad_(False)
    return models


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """`zone export unet --tiny --dynamic-shapes 32x32:64x64:96x64`: the dual step and the VAE."""
    out = tmp_path_factory.mktemp("export") / "unet"
    return run_export_unet(export_args(out, "--tiny", "--dynamic-shapes", PROFILE))


@pytest.fixture(scope="module")
def manifest(exported) -> dict:
    return json.loads((exported / MANIFEST_FILE).read_text())


def session(path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would starve torch
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def dual_step_session(exported):
    return session(exported / "dual_step.onnx")


def step_inputs(models, size, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(6, 8, *latent_size(size), generator=generator),
        "timestep": torch.tensor([949.0]),
        "context": torch.randn(3, 77, models.ip2p_unet.config.cross_attention_dim, generator=generator),
        "guidance": torch.tensor([7.5, 1.5]),
    }


def assert_close(got, want, atol, rtol=0.0):
    got = torch.as_tensor(got)
    assert got.shape == want.shape
    difference = (got - want).abs().max().item()
    assert difference <= atol + rtol * want.abs().max().item(), difference


# ------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dual_step_graph_matches_pytorch(models, dual_step_session, size):
    inputs = step_inputs(models, size, seed=size[0] + size[1])
    with torch.no_grad():
        expected = DualStepForExport(models.ip2p_unet, models.mb_unet, size)(**inputs)
    outputs = dual_step_session.run(None, {k: v.numpy() for k, v in inputs.items()})
    eps_mb, eps_ip2p, attention = (torch.from_numpy(o) for o in outputs)
    assert eps_mb.shape == eps_ip2p.shape == (1, 4, *latent_size(size))
    assert attention.shape == (grid_of(size)[0] * grid_of(size)[1], 77)
    assert_close(eps_mb, expected[0], **EPS_TOLERANCE)
    assert_close(eps_ip2p, expected[1], **EPS_TOLERANCE)
    assert_close(attention, expected[2], ATTENTION_ATOL)


def test_attention_output_is_the_accumulators_step_sum(models, dual_step_session, manifest):
    """The graph's attention = what `record_cross_attention` adds in one eager DualUNet call (dual_step.py's)."""
    size = (96, 64)
    inputs = step_inputs(models, size, seed=5)
    with torch.no_grad(), record_cross_attention(models.ip2p_unet, latent_size(size), grid_of(size)) as acc:
        eps = DualUNet(models.mb_unet, models.ip2p_unet)(
            inputs["sample"], torch.tensor([949]), inputs["context"]).float()  # int64, as dual_step passes it
    with torch.no_grad():
        eps_mb, eps_ip2p, attention = DualStepForExport(models.ip2p_unet, models.mb_unet, size)(**inputs)
    assert torch.equal(attention, acc.total)  # the same processor and accumulator: bit for bit
    assert torch.equal(eps_mb, guided_noise(eps[:3], 7.5, 1.5))
    assert torch.equal(eps_ip2p, guided_noise(eps[3:], 7.5, 1.5))
    rows_per_step = manifest["graphs"]["dual_step"]["attention"]["rows_per_step"]
    assert rows_per_step == acc.rows == 5 * 2 * 2  # layers x kept batch rows x heads
    onnx_attention = dual_step_session.run(["attention"], {k: v.numpy() for k, v in inputs.items()})[0]
    assert_close(torch.from_numpy(onnx_attention), acc.total, ATTENTION_ATOL)
    # The mask's average follows: total / rows, as AttentionAccumulator.average.
    assert_close(torch.from_numpy(onnx_attention) / acc.rows, acc.average(), ATTENTION_ATOL / acc.rows)


def test_manifest_records_what_the_engine_depends_on(models, exported, manifest):
    graph = manifest["graphs"]["dual_step"]
    assert manifest["format"] == 1 and set(manifest["graphs"]) == {"dual_step", "vae_encoder", "vae_decoder"}
    assert graph["weights_sha256"] == {"ip2p_unet": weights_sha256(models.ip2p_unet),
                                       "mb_unet": weights_sha256(models.mb_unet)}
    assert graph["weights_sha256"]["ip2p_unet"] != graph["weights_sha256"]["mb_unet"]
    assert manifest["graphs"]["vae_decoder"]["weights_sha256"] == {"vae": weights_sha256(models.vae)}
    assert graph["precision"] == "fp32" and graph["opset"] == 19 and graph["io_dtype"] == "float32"
    assert graph["image_sizes"] == {"min": [32, 32], "opt": [64, 64], "max": [96, 64]}
    assert graph["profile"]["sample"] == [[6, 8, 4, 4], [6, 8, 8, 8], [6, 8, 12, 8]]
    assert graph["profile"]["context"] == [[3, 77, 32]] * 3
    assert all(side // 32 % 2 == 1 for side in graph["traced_at"])  # see ShapeProfile.trace_size
    assert len(graph["attention"]["recorded_layers"]) == 5
    assert graph["zone_engine_version"] == __version__ and graph["torch_version"] == torch.__version__
    assert graph["sources"] == {"ip2p": "tiny:seed=0", "magicbrush": "tiny:seed=0"}
    for entry in manifest["graphs"].values():
        assert set(entry["validation"]) == {"tolerance", "64x64", "32x32", "96x64"}
        for name, sha in entry["files"].items():
            assert engine_module.file_sha256(exported / name) == sha
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [MANIFEST_FILE, "dual_step.onnx", "vae_encoder.onnx", "vae_decoder.onnx"])  # no staging left behind


@pytest.mark.parametrize("size", [(64, 64), (96, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_vae_graphs_match_pytorch(models, exported, size):
    generator = torch.Generator().manual_seed(size[0])
    image = torch.rand(1, 3, *size, generator=generator) * 2 - 1
    latent = torch.randn(1, 4, *latent_size(size), generator=generator)
    with torch.no_grad():
        want_latent = models.vae.encode(image).latent_dist.mode()
        want_image = models.vae.decode(latent / models.vae.config.scaling_factor, return_dict=False)[0]
    got_latent = session(exported / "vae_encoder.onnx").run(None, {"image": image.numpy()})[0]
    got_image = session(exported / "vae_decoder.onnx").run(None, {"latent": latent.numpy()})[0]
    assert_close(got_latent, want_latent, **EPS_TOLERANCE)
    assert_close(got_image, want_image, **EPS_TOLERANCE)


def test_fp16_export_keeps_float32_io_and_half_weights(models, tmp_path):
    out = export_vae(models, tmp_path / "fp16", height=64, width=64, dtype="fp16")
    model = onnx.load(str(out / "vae_decoder.onnx"))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    assert {p.key: p.value for p in model.metadata_props}["zone.precision"] == "fp16"
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer) > 10
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = models.vae.decode(latent / models.vae.config.scaling_factor, return_dict=False)[0]
    assert_close(session(out / "vae_decoder.onnx").run(None, {"latent": latent.numpy()})[0], want, **FP16_TOLERANCE)
    assert next(models.vae.parameters()).dtype == torch.float32  # the caller's model is left as it was
    entry = json.loads((out / MANIFEST_FILE).read_text())["graphs"]["vae_encoder"]
    assert entry["precision"] == "fp16" and entry["validation"]["tolerance"] == FP16_TOLERANCE


def test_an_export_that_fails_validation_writes_nothing(models, tmp_path, monkeypatch):
    monkeypatch.setitem(export_module.TOLERANCES, "fp32", dict(atol=-1.0, rtol=0.0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier contents")
    with pytest.raises(ZoneError, match="differs from PyTorch .* nothing was written"):
        export_vae(models, out, height=32, width=32)
    assert sorted(path.name for path in out.iterdir()) == ["keep.txt"]
    with pytest.raises(ZoneError, match="differs from PyTorch"):
        export_vae(models, tmp_path / "new", height=32, width=32)
    assert not (tmp_path / "new").exists()  # the folder this call created goes with its files


def test_sizes_that_record_no_or_different_layers_are_refused(models, monkeypatch):
    """One dual_step graph serves the whole profile only if every size records the same layers; recording none
    would export an attention output that is always zero, so the mask would be empty."""
    profile = parse_dynamic_shapes(PROFILE)
    assert len(export_module.check_recorded_layers(models.ip2p_unet, profile)) == 5
    for layers in (lambda unet, latent, grid: [], lambda unet, latent, grid: [f"layer {latent[0]}"]):
        monkeypatch.setattr(export_module, "recorded_layers", layers)
        with pytest.raises(ConfigError, match="recorded cross-attention layers differ across 32x32:64x64:96x64"):
            export_module.check_recorded_layers(models.ip2p_unet, profile)
    # The graph is traced at none of min, opt and max here (96x96, see ShapeProfile.trace_size): its layers count.
    profile = parse_dynamic_shapes("64x64:128x128:192x192")
    assert profile.trace_size() not in profile.sizes()
    monkeypatch.setattr(export_module, "recorded_layers", lambda unet, latent, grid: [f"layer {latent == (12, 12)}"])
    with pytest.raises(ConfigError, match="differ across 64x64:128x128:192x192"):
        export_module.check_recorded_layers(models.ip2p_unet, profile)


@pytest.mark.parametrize(("got", "words"), [
    (np.array([[1.0, float("nan")]], np.float32), "differs from PyTorch on out by nan"),
    (np.array([1.0, 2.0], np.float32), r"gives out of shape \(2,\), PyTorch \(1, 2\)"),  # broadcasts to it
])
def test_validation_refuses_a_nan_output_and_one_of_another_shape(got, words):
    """An exported graph is kept only if each output is within tolerance of PyTorch's: a NaN compares false
    with every bound, and an output of another shape that broadcasts to PyTorch's would compare fine."""
    from types import SimpleNamespace

    from zone_export.onnx_graph import compare

    graph = SimpleNamespace(run=lambda names, feed: [got])
    with pytest.raises(ZoneError, match=words):
        compare(graph, "g.onnx", {}, [torch.tensor([[1.0, 2.0]])], ["out"], {"atol": 1e-3, "rtol": 0.0})
    assert compare(SimpleNamespace(run=lambda names, feed: [np.array([[1.0, 2.0005]], np.float32)]), "g.onnx", {},
                   [torch.tensor([[1.0, 2.0]])], ["out"], {"atol": 1e-3, "rtol": 0.0})["out"] < 1e-3
    # The relative term scales with max|torch|: negative outputs get the same room as positive ones.
    assert compare(SimpleNamespace(run=lambda names, feed: [np.array([[-1.0, -2.0015]], np.float32)]), "g.onnx", {},
                   [torch.tensor([[-1.0, -2.0]])], ["out"], {"atol": 0.0, "rtol": 1e-3})["out"] < 2e-3


def test_bf16_is_refused_with_the_reason(models, tmp_path):
    with pytest.raises(ConfigError, match="opset 22.*--fp16"):
        export_dual_step(models, tmp_path, height=32, width=32, dtype="bf16")


def test_export_precisions_are_read_from_names_and_torch_dtypes():
    """`dtype` may be a torch dtype or a name in any case: each reaches the same fp32/fp16/bf16 (bf16 with
    its reason, not as an unknown precision); anything else is refused."""
    precision = export_module._precision
    assert precision(torch.float16) == precision(" FP16 ") == precision("float16") == precision("fp16") == "fp16"
    assert precision(torch.float32) == precision("Float32") == "fp32"
    for bf16 in (torch.bfloat16, "bfloat16", "BF16"):
        with pytest.raises(ConfigError, match="bf16 ONNX export is not supported"):
            precision(bf16)
    for other in ("int8", torch.float64):
        with pytest.raises(ConfigError, match="unknown export precision"):
            precision(other)


# ------------------------------------------------------------------------------------------------ shapes


def test_dynamic_shapes_parse():
    profile = parse_dynamic_shapes("256x256:512x512:768x640")
    assert (profile.min, profile.opt, profile.max) == ((256, 256), (512, 512), (768, 640))
    assert profile.trace_size() == (480, 480)  # nearest odd multiples of 32 to opt
    assert ShapeProfile.static(512, 512).trace_size() == (512, 512)
    assert parse_dynamic_shapes(" 64X64 : 64x64 : 64x96 ").trace_size() == (64, 96)


@pytest.mark.parametrize("text, words", [
    ("512x512", "three sizes MIN:OPT:MAX"),
    ("256x256:512x512", "three sizes MIN:OPT:MAX"),
    ("256:512:768", "HEIGHTxWIDTH"),
    ("256x256:500x512:768x768", "multiple of 32"),
    ("0x256:256x256:256x256", "multiple of 32"),
    ("512x512:256x256:768x768", "min <= opt <= max"),
    ("256x256:512x512:768xabc", "HEIGHTxWIDTH"),
    ("256x256:512x512:768x768:1024x1024", "three sizes MIN:OPT:MAX"),  # not a TypeError from ShapeProfile
    ("256x256:768x768:512x512", "min <= opt <= max"),  # opt above max: TensorRT refuses such a profile
    ("256x256:512x512:2080x512", "over 2048 pixels"),
])
def test_bad_dynamic_shapes_are_clear_errors(text, words):
    with pytest.raises(ConfigError, match=words) as caught:
        parse_dynamic_shapes(text)
    assert str(caught.value).startswith(f"--dynamic-shapes {text!r}")  # "cannot read size '256'" named no option


def test_profile_bounds_and_which_profiles_are_dynamic():
    """2048 a side is the largest working size and allowed; a profile is dynamic whenever min and max differ,
    opt equal to min included (a static graph there would fail at every other size of the profile)."""
    assert ShapeProfile.static(2048, 32).max == (2048, 32)
    assert ShapeProfile((32, 32), (32, 32), (64, 32)).dynamic and ShapeProfile((32, 32), (64, 32), (64, 32)).dynamic
    assert not ShapeProfile.static(64, 32).dynamic


def test_every_size_option_and_tiny_conflict_is_checked(tmp_path):
    """--width conflicts with --dynamic-shapes as --height does; one side given keeps the other's default;
    --tiny refuses --magicbrush as it does --ip2p; --opset's both ends are refused before checkpoints are looked
    for (a real export would load gigabytes first)."""
    with pytest.raises(ConfigError, match="either --height/--width or --dynamic-shapes"):
        run_export_unet(export_args(tmp_path, "--width", "256", "--dynamic-shapes", "256x256:512x512:512x512"))
    assert export_module.profile_from_args(export_args(tmp_path, "--height", "256")) == ShapeProfile.static(256, 512)
    assert export_module.profile_from_args(export_args(tmp_path, "--width", "256")) == ShapeProfile.static(512, 256)
    with pytest.raises(ConfigError, match="--tiny exports random weights"):
        run_export_unet(export_args(tmp_path, "--tiny", "--magicbrush", "some/model"))
    for opset in ("13", "21"):
        with pytest.raises(ConfigError, match="opsets 14 to 20"):
            run_export_unet(export_args(tmp_path / "out", "--opset", opset, "--ip2p", str(tmp_path / "none")))


def test_an_unreadable_manifest_is_not_replaced(tmp_path):
    """Not knowing whose export an unreadable manifest.json is, an export must not replace it (it could orphan
    another export's graphs): check_export_target, which both exports run, says so."""
    from zone_export.onnx_graph import check_export_target

    (tmp_path / MANIFEST_FILE).mkdir()
    with pytest.raises(ZoneError, match="cannot read its manifest.json .*choose another folder"):
        check_export_target(tmp_path, "unet")


def test_command_line_checks_run_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="either --height/--width or --dynamic-shapes"):
        run_export_unet(export_args(tmp_path, "--height", "512", "--dynamic-shapes", "256x256:512x512:512x512"))
    with pytest.raises(ConfigError, match="multiple of 32"):
        run_export_unet(export_args(tmp_path, "--height", "500"))
    with pytest.raises(ConfigError, match="--tiny exports random weights"):
        run_export_unet(export_args(tmp_path, "--tiny", "--ip2p", "some/model"))
    with pytest.raises(ConfigError, match="bf16"):
        run_export_unet(export_args(tmp_path, "--bf16", "--tiny"))
    with pytest.raises(ConfigError, match="opsets 14 to 20"):
        run_export_unet(export_args(tmp_path, "--tiny", "--opset", "21"))
    with pytest.raises(SystemExit):
        export_args(tmp_path, "--fp16", "--bf16")
    (tmp_path / "vae_decoder.onnx").mkdir()  # was found after the export, with dual_step already installed
    with pytest.raises(ZoneError, match="holds a folder named vae_decoder.onnx"):
        run_export_unet(export_args(tmp_path, "--tiny"))
    assert [path.name for path in tmp_path.iterdir()] == ["vae_decoder.onnx"]
    (tmp_path / "vae_decoder.onnx").rmdir()
    (tmp_path / "dual_step.onnx.data").mkdir()  # where a real-size UNet's weights go, past protobuf's 2 GB
    with pytest.raises(ZoneError, match="holds a folder named dual_step.onnx.data"):
        run_export_unet(export_args(tmp_path, "--tiny"))
    (tmp_path / "dual_step.onnx.data").rmdir()
    # A SAM export's folder: its manifest was replaced, its graphs orphaned, exit 0.
    (tmp_path / "manifest.json").write_text('{"format": 1, "model_type": "vit_b", "files": {}}')
    with pytest.raises(ZoneError, match="holds a `zone export sam` folder: `zone export unet` would replace"):
        run_export_unet(export_args(tmp_path, "--tiny"))
    (tmp_path / "manifest.json").write_text("not json")
    with pytest.raises(ZoneError, match="holds a manifest.json that is no zone export's"):
        run_export_unet(export_args(tmp_path, "--tiny"))


def test_an_export_cut_off_after_its_first_graph_installs_none(models, tmp_path, monkeypatch):
    """The graphs used to be installed one export at a time: Ctrl-C (or SIGTERM) during the VAE's left a new
    folder with dual_step alone, or an old one with dual_step at another size than its VAE graphs."""
    traced = []

    def cut_off_after_the_first(spec, staging, *_):
        if traced:
            raise KeyboardInterrupt
        traced.append(spec.name)
        (staging / spec.file).write_bytes(b"graph")  # its file in staging, as a real trace leaves it (10 s)
        return {"files": {spec.file: "0" * 64}}

    monkeypatch.setattr(export_module, "_export_spec", cut_off_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        export_unet_graphs(models, tmp_path / "new", height=32, width=32)
    assert traced == ["dual_step"] and not (tmp_path / "new").exists()  # removed: this export created it


def test_an_export_cut_off_in_the_folder_it_created_keeps_another_exports_files(models, tmp_path, monkeypatch):
    """Two exports into one new folder at once (two shells, a CI farm): Ctrl-C or SIGTERM of the one that made the
    folder removed the whole folder, the other export's finished files with it (exit 0, its folder gone) or, while
    it ran, its scratch folder (`error: [Errno 2] No such file or directory: 'out/.export-PID-.../raw-...'`)."""
    out = tmp_path / "new"
    theirs = [".export-1-running/raw-image_encoder/image_encoder.onnx", "mask_decoder.onnx", "manifest.json"]

    def the_other_export_meanwhile(spec, staging, *_):
        (staging / spec.file).write_bytes(b"graph")
        for name in theirs:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(b"theirs")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_export_spec", the_other_export_meanwhile)
    with pytest.raises(KeyboardInterrupt):
        export_unet_graphs(models, out, height=32, width=32)
    assert sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()) == sorted(theirs)


def test_a_running_exports_scratch_folder_is_not_swept_whatever_its_pid_names(tmp_path):
    """An export in another PID namespace (a container sharing the folder) read a running export's PID as no
    process and swept its scratch folder: that export failed, `error: [Errno 2] No such file or directory:
    'out/.export-PID-.../raw-image_encoder'`. The lock a running export holds on it says; a killed one's goes."""
    import fcntl

    from zone_export.onnx_graph import staging_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running, killed = (tmp_path / f".export-{dead.stdout.strip()}-{name}" for name in ("running", "killed"))
    for scratch in (running, killed):
        (scratch / "raw-image_encoder").mkdir(parents=True)
    held = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the running export holds it
        with staging_folder(tmp_path) as staging:
            assert sorted(path.name for path in tmp_path.iterdir()) == sorted([running.name, staging.name])
            ours = os.open(staging, os.O_RDONLY)  # this export's own scratch is locked as it runs
            with pytest.raises(BlockingIOError):
                fcntl.flock(ours, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.close(ours)
    finally:
        os.close(held)
    assert [path.name for path in tmp_path.iterdir()] == [running.name]


def test_without_locks_the_sweep_goes_by_the_pid_and_keeps_a_scratch_folder_it_cannot_open(tmp_path, monkeypatch):
    """A file system without locks (some network ones: flock fails, ENOLCK): the sweep goes by the PID, and the
    export runs unlocked. A scratch folder the sweep cannot open (out of descriptors here, or another user's) is not
    its to sweep, whatever its PID says. Each folder the sweep opened is closed, and the export forgets the files it
    installed (from a mutation audit: none of these was tried)."""
    import errno
    import fcntl

    from zone_export import onnx_graph
    from zone_export.onnx_graph import staging_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running = tmp_path / f".export-{os.getpid()}-running"
    killed, unopened = (tmp_path / f".export-{dead.stdout.strip()}-{name}" for name in ("killed", "unopened"))
    for scratch in (running, killed, unopened):
        (scratch / "raw-image_encoder").mkdir(parents=True)
    real_open, refused = os.open, []

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    def refused_once_there(path, *args, **kwargs):  # the sweep's open; a removal's after it would succeed
        if Path(path) == unopened and not refused:
            refused.append(path)
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(os, "open", refused_once_there)
    open_before = len(os.listdir("/dev/fd"))
    with staging_folder(tmp_path) as staging:
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted([running.name, unopened.name, staging.name])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([running.name, unopened.name])
    assert len(os.listdir("/dev/fd")) == open_before and onnx_graph._installed == {}


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_while_a_re_export_installs_waits_for_the_moves(models, tmp_path, monkeypatch, number):
    """A signal between two moves left a new dual_step beside the old VAE graphs and manifest: the folder's
    working export lost, refused as corrupt. It is held off until every file is in, then delivered. SIGTERM (what
    `timeout` and orchestrators send) too, raised by the handler the CLI installs for it."""
    graphs = ["dual_step", "vae_encoder", "vae_decoder"]
    for name in graphs:
        (tmp_path / f"{name}.onnx").write_bytes(b"old")
    old = {"format": 1, "graphs": {name: {"files": {f"{name}.onnx": "1" * 64}} for name in graphs}}
    (tmp_path / "manifest.json").write_text(json.dumps(old))

    def traced(spec, staging, *_):
        (staging / spec.file).write_bytes(b"new")  # its file in staging, as a real trace leaves it (10 s)
        return {"files": {spec.file: "0" * 64}}

    moves, real_replace = [], os.replace

    def ctrl_c_at_the_second_move(source, target):
        moves.append(Path(target).name)
        if len(moves) == 2:
            signal.raise_signal(number)  # a real one, as the terminal (Ctrl-C) or `kill` sends it
        return real_replace(source, target)

    monkeypatch.setattr(export_module, "_export_spec", traced)
    monkeypatch.setattr(os, "replace", ctrl_c_at_the_second_move)
    with pytest.raises(KeyboardInterrupt) as stopped, terminated_as_interrupt():
        export_unet_graphs(models, tmp_path, height=32, width=32)
    assert isinstance(stopped.value, Terminated) == (number == signal.SIGTERM)
    assert moves == [f"{name}.onnx" for name in graphs] + ["manifest.json"]
    assert all((tmp_path / f"{name}.onnx").read_bytes() == b"new" for name in graphs)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [entry["files"] for entry in manifest["graphs"].values()] == [{f"{name}.onnx": "0" * 64} for name in graphs]


def test_ctrl_c_while_a_new_folder_installs_removes_it(models, tmp_path, monkeypatch):
    """The held signal is delivered inside the scratch folder's block: a folder this export created goes, as at any
    interrupt (README: a folder that was there holds the new export; one the export created is removed)."""

    def traced(spec, staging, *_):
        (staging / spec.file).write_bytes(b"new")
        return {"files": {spec.file: "0" * 64}}

    moves, real_replace = [], os.replace

    def ctrl_c_at_the_second_move(source, target):
        moves.append(Path(target).name)
        if len(moves) == 2:
            signal.raise_signal(signal.SIGINT)
        return real_replace(source, target)

    monkeypatch.setattr(export_module, "_export_spec", traced)
    monkeypatch.setattr(os, "replace", ctrl_c_at_the_second_move)
    with pytest.raises(KeyboardInterrupt):
        export_unet_graphs(models, tmp_path / "new", height=32, width=32)
    assert len(moves) == 4 and not (tmp_path / "new").exists()  # every move made, then the folder removed


# ------------------------------------------------------------------------------------------------ engine cache


KEY_INPUTS = dict(
    onnx_manifest={"files": {"dual_step.onnx": "ab" * 32}, "precision": "fp16", "opset": 19,
                   "weights_sha256": {"ip2p_unet": "1" * 64, "mb_unet": "2" * 64},
                   "image_sizes": {"min": [256, 256], "opt": [512, 512], "max": [512, 512]},
                   "attention": {"rows_per_step": 80}, "torch_version": "2.14.1"},
    profile={"sample": [[6, 8, 32, 32], [6, 8, 64, 64], [6, 8, 64, 64]], "timestep": [[1], [1], [1]]},
    precision="fp16", tensorrt_version="10.13.0", gpu_name="NVIDIA H100 80GB HBM3 sm_90",
)


def _changed(inputs: dict, path: tuple, value) -> dict:
    inputs = copy.deepcopy(inputs)
    target = inputs
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return inputs


@pytest.mark.parametrize("path, value", [
    (("onnx_manifest", "files", "dual_step.onnx"), "cd" * 32),
    (("onnx_manifest", "precision"), "fp32"),
    (("onnx_manifest", "opset"), 17),
    (("onnx_manifest", "weights_sha256", "mb_unet"), "3" * 64),
    (("onnx_manifest", "image_sizes", "max"), [768, 768]),
    (("onnx_manifest", "attention", "rows_per_step"), 96),
    (("onnx_manifest", "torch_version"), "2.15.0"),
    (("onnx_manifest", "new_field"), 1),
    (("profile", "sample"), [[6, 8, 32, 32], [6, 8, 48, 48], [6, 8, 64, 64]]),
    (("profile", "guidance"), [[2], [2], [2]]),
    (("precision",), "fp32"),
    (("tensorrt_version",), "10.13.1"),
    (("gpu_name",), "NVIDIA H200 sm_90"),
], ids=lambda v: "/".join(v) if isinstance(v, tuple) else None)
def test_cache_key_changes_with_every_input(path, value):
    assert engine_cache_key(**_changed(KEY_INPUTS, path, value)) != engine_cache_key(**KEY_INPUTS)


def test_cache_key_is_stable_for_equal_inputs():
    key = engine_cache_key(**KEY_INPUTS)
    reordered = copy.deepcopy(KEY_INPUTS)
    reordered["onnx_manifest"] = dict(reversed(list(reordered["onnx_manifest"].items())))
    reordered["profile"] = {name: tuple(tuple(s) for s in shapes) for name, shapes in reordered["profile"].items()}
    assert engine_cache_key(**reordered) == key == engine_cache_key(**copy.deepcopy(KEY_INPUTS))
    assert len(key) == 64 and int(key, 16) >= 0


DESCRIPTION = {"graph": "dual_step", "precision": "fp16", "tensorrt_version": "10.13.0",
               "gpu_name": "NVIDIA H100 80GB HBM3 sm_90"}


def _fake_build(calls: list):
    def build(path: Path) -> None:
        calls.append(path)
        path.write_bytes(b"engine %d" % len(calls))
    return build


def test_engine_cache_builds_once_then_loads(tmp_path):
    cache, calls = EngineCache(tmp_path), []
    key = engine_cache_key(**KEY_INPUTS)
    path, reason = cache.get_or_build("dual_step", key, DESCRIPTION, _fake_build(calls))
    assert reason == "no engine built yet" and path.read_bytes() == b"engine 1"
    sidecar = json.loads(cache.sidecar_path(path).read_text())
    assert sidecar["key"] == key and sidecar["gpu_name"] == DESCRIPTION["gpu_name"]
    assert cache.get_or_build("dual_step", key, DESCRIPTION, _fake_build(calls)) == (path, None)
    assert len(calls) == 1
    assert cache.get_or_build("dual_step", key, DESCRIPTION, _fake_build(calls), force=True)[1] == "rebuild asked for"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial files left


@pytest.mark.parametrize("damage, words", [
    (lambda path, sidecar: sidecar.unlink(), "missing or unreadable"),
    (lambda path, sidecar: sidecar.write_text("{"), "missing or unreadable"),
    (lambda path, sidecar: _edit(sidecar, key="0" * 64), "its key differs"),
    (lambda path, sidecar: _edit(sidecar, tensorrt_version="10.8.0"), "tensorrt_version '10.8.0'"),
    (lambda path, sidecar: _edit(sidecar, gpu_name="NVIDIA A100 sm_80"), "gpu_name 'NVIDIA A100 sm_80'"),
    (lambda path, sidecar: path.write_bytes(b"someone else's engine"), "not the one its sidecar describes"),
], ids=["no-sidecar", "bad-sidecar", "other-key", "other-tensorrt", "other-gpu", "replaced-engine"])
def test_stale_or_foreign_engines_are_rebuilt_never_loaded(tmp_path, damage, words):
    cache, calls = EngineCache(tmp_path), []
    key = engine_cache_key(**KEY_INPUTS)
    path, _ = cache.get_or_build("dual_step", key, DESCRIPTION, _fake_build(calls))
    damage(path, cache.sidecar_path(path))
    assert words in cache.stale_reason("dual_step", key, DESCRIPTION)
    rebuilt, reason = cache.get_or_build("dual_step", key, DESCRIPTION, _fake_build(calls))
    assert rebuilt == path and words in reason and path.read_bytes() == b"engine 2"
    assert cache.stale_reason("dual_step", key, DESCRIPTION) is None


def _edit(sidecar: Path, **changes) -> None:
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **changes}))


# ------------------------------------------------------------------------------------------------ without TensorRT


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_build_engine_without_tensorrt_says_what_to_install(no_tensorrt, exported, tmp_path):
    with pytest.raises(DeviceError, match=r"TensorRT is not installed: install NVIDIA TensorRT 10") as error:
        build_engine(exported / "dual_step.onnx", tmp_path / "x.plan", {}, "fp16")
    assert "metapackage" in str(error.value) and "tensorrt-cu12" in str(error.value)
    parser = argparse.ArgumentParser()
    add_build_engine_arguments(parser)
    with pytest.raises(DeviceError, match="TensorRT is not installed"):
        run_build_engine(parser.parse_args([str(exported)]))
    assert not (exported / "engines").exists()
    # A graph the folder lacks is the first thing said (TensorRT missing would hide the typo).
    with pytest.raises(ZoneError, match=r"holds no unet graph \(it has dual_step, vae_encoder, vae_decoder\)"):
        run_build_engine(parser.parse_args([str(exported), "--graph", "VAE_Decoder", "--graph", "unet"]))
    assert named_graphs(exported, read_manifest(exported), ["VAE_Decoder", "vae_decoder "]) == ["vae_decoder"]
    # So is a broken graph file, and a --cache that is a file: the user would install TensorRT to learn of them.
    (tmp_path / "engines.txt").write_text("")
    with pytest.raises(ZoneError, match="--cache .*engines.txt is a file"):
        run_build_engine(parser.parse_args([str(exported), "--cache", str(tmp_path / "engines.txt")]))
    broken = shutil.copytree(exported, tmp_path / "broken")
    (broken / "vae_decoder.onnx").write_bytes((broken / "vae_decoder.onnx").read_bytes()[:100])
    with pytest.raises(ZoneError, match="vae_decoder.onnx does not match its sha256 in manifest.json"):
        run_build_engine(parser.parse_args([str(broken)]))
    with pytest.raises(SystemExit):  # argparse: "argument --cache: empty: name a folder"
        parser.parse_args([str(exported), "--cache", " "])
    # SAM's export folder (what --sam-onnx takes) is named as such, not as a manifest of the wrong format.
    sam_folder = tmp_path / "sam"
    sam_folder.mkdir()
    (sam_folder / "manifest.json").write_text('{"format": 1, "model_type": "vit_b", "files": {}}')
    with pytest.raises(ZoneError, match="is a `zone export sam` folder .*, not a `zone export unet` one") as said:
        run_build_engine(parser.parse_args([str(sam_folder)]))
    # Not `zone export unet --out` that folder, which refuses to replace SAM's manifest: another folder.
    assert f"--out {sam_folder}" not in str(said.value) and "--out NEW_FOLDER" in str(said.value)
    (sam_folder / "manifest.json").write_text("{not json")
    with pytest.raises(ZoneError, match="cannot read .*will not replace.*--out NEW_FOLDER"):
        run_build_engine(parser.parse_args([str(sam_folder)]))
    # A manifest no export wrote is not replaced either; an older `zone export unet` one is, by the command said.
    (sam_folder / "manifest.json").write_text('{"a": 1}')
    with pytest.raises(ZoneError, match="not a format-1 `zone export unet` manifest, which .*will not replace"):
        run_build_engine(parser.parse_args([str(sam_folder)]))
    (sam_folder / "manifest.json").write_text('{"format": 0, "graphs": {"dual_step": {}}}')
    with pytest.raises(ZoneError, match=f"not a format-1 `zone export unet` manifest; write one with `zone export "
                                        f"unet --out {sam_folder}`"):
        run_build_engine(parser.parse_args([str(sam_folder)]))


def test_tensorrt_denoiser_without_tensorrt_is_a_clear_device_error(no_tensorrt, models, manifest, tmp_path):
    from zone_engine.tensorrt_denoiser import TensorRTDenoiser

    with pytest.raises(DeviceError, match="tensorrt denoiser cannot run: TensorRT is not installed") as error:
        TensorRTDenoiser(tmp_path / "dual_step.plan", manifest["graphs"]["dual_step"], models.scheduler_config)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in str(error.value)
    with pytest.raises(DeviceError, match="TensorRT is not installed"):
        TensorRTDenoiser.from_export(tmp_path, models.scheduler_config)


def test_build_engine_refuses_an_unknown_precision_first(no_tensorrt, tmp_path):
    """The precision is checked before TensorRT is looked for: a typo is said as such, not as a missing install."""
    with pytest.raises(ZoneError, match="unknown engine precision 'int8': use one of fp32, fp16, bf16"):
        build_engine(tmp_path / "dual_step.onnx", tmp_path / "x.plan", {}, "int8")


def test_zone_engine_imports_without_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None; import zone_engine, zone_engine.tensorrt_denoiser, "
            "zone_engine.backends, zone_engine.cli, zone_export.engine; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert "tensorrt" not in importlib.import_module("zone_engine.tensorrt_denoiser").__dict__


# ------------------------------------------------------------------------------------- the loop, with a stand-in


class StandInTensorRT:
    """The few TensorRT 10 names the denoiser and ensure_engine use, with ONNX Runtime (CPU) as the "engine".

    An engine file holds the ONNX path it was "built" from. Tensor addresses are resolved back to the
    denoiser's buffers, so the stand-in reads and writes exactly the memory TensorRT would.
    """

    __version__ = "10.99.0-stand-in"
    DataType = type("DataType", (), {"FLOAT": "float32"})
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return StandInEngine(session(Path(data.decode())))


class StandInEngine:
    def __init__(self, onnx_session) -> None:
        self.session = onnx_session
        self.names = [t.name for t in (*onnx_session.get_inputs(), *onnx_session.get_outputs())]
        self.num_io_tensors = len(self.names)
        self.contexts = []

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_dtype(self, name: str) -> str:
        return "float32"

    def create_execution_context(self):
        self.contexts.append(StandInContext(self.session))
        return self.contexts[-1]


class StandInContext:
    def __init__(self, onnx_session) -> None:
        self.session, self.addresses, self.memory = onnx_session, {}, []  # memory: tensors that may be bound
        self.input_shapes: dict[str, tuple] = {}

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.input_shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        """As TensorRT infers it from the input shapes set: here by running the graph on zeros."""
        inputs = {i.name: np.zeros(self.input_shapes[i.name], np.float32) for i in self.session.get_inputs()}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, (value.shape for value in self.session.run(names, inputs)), strict=True))[name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        tensors = {t.data_ptr(): t for t in self.memory}
        bound = {name: tensors[address] for name, address in self.addresses.items()}
        inputs = {i.name: bound[i.name].cpu().numpy() for i in self.session.get_inputs()}
        names = [o.name for o in self.session.get_outputs()]
        for name, value in zip(names, self.session.run(names, inputs), strict=True):
            bound[name].copy_(torch.from_numpy(value))
        return True


def _build_stand_in_engine(onnx_path, engine_path, profile=None, precision=None) -> None:
    """build_engine's stand-in: the "engine" is the graph's path, which StandInTensorRT reads back."""
    Path(engine_path).write_bytes(str(onnx_path).encode())


@pytest.fixture
def stand_in_tensorrt(monkeypatch):
    """TensorRT and the GPU replaced by ONNX Runtime and the CPU, for everything around the engine calls.
    Returns the log of stream waits ("wait", waiting stream, stream waited for) and engine runs ("run", stream):
    torch's current stream is 0, the one made for TensorRT 7."""
    import contextlib
    from types import SimpleNamespace

    from zone_engine import tensorrt_denoiser

    monkeypatch.setattr(tensorrt_denoiser, "require_tensorrt_runtime", lambda device: StandInTensorRT)
    monkeypatch.setattr(engine_module, "import_tensorrt", lambda: StandInTensorRT)
    monkeypatch.setattr(engine_module, "gpu_name", lambda device=None: "stand-in GPU sm_00")
    monkeypatch.setattr(engine_module, "build_engine", _build_stand_in_engine)
    monkeypatch.setattr(torch.cuda, "device", contextlib.nullcontext)
    log = []

    def stream(handle: int) -> SimpleNamespace:
        return SimpleNamespace(cuda_stream=handle, wait_stream=lambda other: log.append(("wait", handle,
                                                                                         other.cuda_stream)))

    def logged_run(context, handle: int) -> bool:
        log.append(("run", handle))
        return run(context, handle)

    run, current, own = StandInContext.execute_async_v3, stream(0), stream(7)
    monkeypatch.setattr(StandInContext, "execute_async_v3", logged_run)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: own)
    return log


def test_tensorrt_denoiser_loop_equals_the_fused_denoiser(models, exported, stand_in_tensorrt, tmp_path):
    """Everything but the TensorRT calls: engine cache, buffers, solver, blend, attention into the accumulator."""
    from zone_engine.pipeline import encode_image_latents
    from zone_engine.tensorrt_denoiser import TensorRTDenoiser
    from zone_engine.text import encode_instruction

    size = (96, 64)  # the profile's max: neither the size it was traced (32x32) nor tuned (64x64) at
    encoded = encode_instruction(models.tokenizer, models.text_encoder, "make the dog a golden statue")
    inputs = DenoiseInputs(
        context=encoded.context,
        image_latents=encode_image_latents(models.vae, smooth_image(*size, seed=2), torch.float32),
        noise=initial_noise(42, latent_size(size), torch.device("cpu"), torch.float32),
    )
    config, beta = EditConfig(steps=4), 0.2
    eager_attention = AttentionAccumulator()
    eager = FusedDualDenoiser(models.ip2p_unet, models.mb_unet, models.scheduler_config)(
        inputs, config, beta, eager_attention)

    denoiser = TensorRTDenoiser.from_export(exported, models.scheduler_config, device="cpu", cache_root=tmp_path)
    assert [p.suffix for p in sorted(tmp_path.iterdir())] == [".plan", ".json"]  # built into the cache
    denoiser.context.memory = list(denoiser.buffers(latent_size(size), 32).values())
    engine_attention, steps = AttentionAccumulator(), []
    latents = denoiser(inputs, config, beta, engine_attention, on_step=steps.append)

    assert steps == [0, 1, 2, 3]
    # Each step on TensorRT's own stream (the default one would synchronise the device), between the inputs'
    # copies and the solver's reads on the caller's.
    assert stand_in_tensorrt == [("wait", 7, 0), ("run", 7), ("wait", 0, 7)] * 4
    stand_in_tensorrt.clear()
    denoiser.context.execute_async_v3 = lambda stream: False  # a failed enqueue: the streams joined all the same
    with pytest.raises(ZoneError, match="TensorRT could not run the dual-step engine"):
        denoiser(inputs, config, beta, AttentionAccumulator())
    assert stand_in_tensorrt == [("wait", 7, 0), ("wait", 0, 7)]
    assert engine_attention.rows == eager_attention.rows == 4 * 20
    # ONNX Runtime vs torch, both fp32: ~1e-5 on the guided noise per step, carried through 4 solver steps.
    assert_close(latents, eager, 1e-4, 1e-4)
    assert_close(engine_attention.average(), eager_attention.average(), 1e-6)
    masks = [localize(acc.average(), grid_of(size), encoded.token_count - 1, size).mask_b
             for acc in (eager_attention, engine_attention)]
    assert np.array_equal(*masks)
    with pytest.raises(ConfigError, match="serves images from 32x32 to 96x64, not 128x64"):
        denoiser.buffers((16, 8), 32)
    denoiser.context.get_tensor_shape = lambda name: (1, 4, 8, 8)  # an engine from another export's shapes
    with pytest.raises(ZoneError, match=r"writes eps_mb as \(1, 4, 8, 8\), not \(1, 4, 12, 8\)"):
        denoiser.buffers(latent_size(size), 32)


@pytest.mark.parametrize(("version", "too_old"), [("9.3.0", True), ("unknown", True), ("10.0.1", False)])
def test_tensorrt_before_10_is_refused_by_its_version(monkeypatch, version, too_old):
    """The denoiser is written for TensorRT 10's name-based tensor API: an older one is said, not an AttributeError."""
    from zone_engine.tensorrt_denoiser import import_tensorrt

    module = SimpleNamespace(__version__=version)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    if too_old:
        with pytest.raises(DeviceError, match=f"TensorRT {version} is too old: zone-engine needs TensorRT 10"):
            import_tensorrt()
    else:
        assert import_tensorrt() is module


def test_the_tensorrt_denoiser_on_a_cuda_machine_refuses_another_device(monkeypatch):
    """TensorRT and a GPU present, --device cpu: said as such (the stand-in fixture skips this check)."""
    from zone_engine.tensorrt_denoiser import require_tensorrt_runtime

    monkeypatch.setitem(sys.modules, "tensorrt", StandInTensorRT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(DeviceError, match="runs on CUDA, not on cpu: use --device cuda"):
        require_tensorrt_runtime(torch.device("cpu"))
    assert require_tensorrt_runtime(torch.device("cuda")) is StandInTensorRT


def _engine_file(onnx_path: Path, folder: Path) -> Path:
    """A stand-in engine "built" from `onnx_path` into `folder`."""
    path = folder / f"{onnx_path.stem}.plan"
    _build_stand_in_engine(onnx_path, path)
    return path


def test_an_engine_that_is_not_a_float32_dual_step_is_refused(models, exported, manifest, stand_in_tensorrt,
                                                               tmp_path, monkeypatch):
    """Another graph's engine, one with a half-precision tensor, one TensorRT cannot load: each said when the
    denoiser is made, not as wrong numbers or a crash inside an engine run."""
    from zone_engine.tensorrt_denoiser import TensorRTDenoiser

    graph, dual_step = manifest["graphs"]["dual_step"], _engine_file(exported / "dual_step.onnx", tmp_path)
    with pytest.raises(ZoneError, match=r"vae_decoder.plan is not a dual-step engine: tensors \["):
        TensorRTDenoiser(_engine_file(exported / "vae_decoder.onnx", tmp_path), graph, models.scheduler_config, "cpu")
    monkeypatch.setattr(StandInEngine, "get_tensor_dtype",
                        lambda self, name: "float16" if name == "attention" else "float32")
    with pytest.raises(ZoneError, match="attention is float16, expected float32"):
        TensorRTDenoiser(dual_step, graph, models.scheduler_config, "cpu")
    monkeypatch.setattr(StandInTensorRT.Runtime, "deserialize_cuda_engine", lambda self, data: None)
    with pytest.raises(DeviceError, match="TensorRT cannot load .*rebuild it with `zone build-engine FOLDER`"):
        TensorRTDenoiser(dual_step, graph, models.scheduler_config, "cpu")


def test_engine_buffers_serve_the_profiles_smallest_size_and_the_engines_refusals_are_said(
        models, exported, manifest, stand_in_tensorrt, tmp_path):
    """The profile's bounds are inclusive at both ends; an input shape or address TensorRT refuses, and inputs on
    another device than the engine's, are ZoneErrors before the engine runs."""
    from zone_engine.tensorrt_denoiser import TensorRTDenoiser

    denoiser = TensorRTDenoiser(_engine_file(exported / "dual_step.onnx", tmp_path), manifest["graphs"]["dual_step"],
                                models.scheduler_config, "cpu")
    smallest = latent_size((32, 32))
    assert denoiser.buffers(smallest, 32)["attention"].shape == (1, 77)
    with pytest.raises(ConfigError, match="serves images from 32x32 to 96x64, not 24x32"):
        denoiser.buffers((3, 4), 32)
    denoiser.context.set_input_shape = lambda name, shape: False
    with pytest.raises(ZoneError, match=r"refuses sample of shape \(6, 8, 4, 4\)"):
        denoiser.buffers(smallest, 32)
    del denoiser.context.set_input_shape
    denoiser.context.set_tensor_address = lambda name, address: False
    with pytest.raises(ZoneError, match="TensorRT refused the address of the dual-step engine's sample"):
        denoiser.buffers(smallest, 32)
    elsewhere = torch.zeros(1, 4, *smallest, device="meta")
    with pytest.raises(DeviceError, match="runs on cpu; the inputs are on meta"):
        denoiser(DenoiseInputs(context=elsewhere, image_latents=elsewhere, noise=elsewhere), EditConfig(steps=2), 0.2,
                 AttentionAccumulator())


def test_build_engine_command_builds_into_the_folders_engines_once(exported, stand_in_tensorrt, tmp_path, capsys):
    """`zone build-engine FOLDER` builds into FOLDER/engines (where `zone edit --engines FOLDER` looks), says
    that an fp32 graph gives an fp32 engine, reuses what it built, and rebuilds with --force."""
    folder = shutil.copytree(exported, tmp_path / "unet")
    parser = argparse.ArgumentParser()
    add_build_engine_arguments(parser)
    said = []
    for extra in ([], [], ["--force"]):
        paths = run_build_engine(parser.parse_args([str(folder), "--graph", "vae_decoder", *extra]))
        assert [path.parent for path in paths] == [folder / "engines"] and paths[0].is_file()
        said.append(capsys.readouterr().err)
    assert all("note: vae_decoder is an fp32 graph, so its engine is fp32" in text for text in said)
    assert [text.splitlines()[-1].split(": ")[1] for text in said] == [
        "built (no engine built yet)", "up to date", "built (rebuild asked for)"]


# ------------------------------------------------------------------------------------------------ TensorRT


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (it cannot be on our machines): run where NVIDIA TensorRT 10+ is"
    if not torch.cuda.is_available():
        return "no CUDA GPU: TensorRT engines run on NVIDIA GPUs only"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
class TestTensorRT:
    """Engines built from the tiny fp16 export on a GPU, against PyTorch fp16 on the same GPU.

    Tolerance on one step's outputs, flash-attention style: |engine - fp32| <= 2 |torch fp16 - fp32| + 1e-3
    (TensorRT may fuse and order fp16 arithmetic differently from PyTorch, but should be no less accurate).
    Over a whole denoise the latents may drift by fp16 rounding, so they are compared at 5e-2 x max; M_b, the
    thresholded attention difference, must be identical.
    """

    SIZE = (64, 96)

    @pytest.fixture(scope="class")
    def fp16_export(self, models, tmp_path_factory):
        out = tmp_path_factory.mktemp("trt") / "unet"
        profile = ShapeProfile((32, 32), (64, 96), (96, 96))
        export_dual_step(models, out, dtype="fp16", dynamic=profile)
        return out

    @pytest.fixture(scope="class")
    def cuda_models(self, models):
        return {dtype: tuple(copy.deepcopy(unet).to("cuda", dtype) for unet in (models.ip2p_unet, models.mb_unet))
                for dtype in (torch.float16, torch.float32)}

    def test_engine_step_matches_pytorch_fp16(self, models, fp16_export, cuda_models, monkeypatch):
        from zone_engine.tensorrt_denoiser import TensorRTDenoiser

        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        denoiser = TensorRTDenoiser.from_export(fp16_export, models.scheduler_config, device="cuda")
        inputs = {k: v.cuda() for k, v in step_inputs(models, self.SIZE, seed=3).items()}
        buffers = denoiser.buffers(latent_size(self.SIZE), inputs["context"].shape[-1])
        for name in ("sample", "timestep", "context", "guidance"):
            buffers[name].copy_(inputs[name])
        assert denoiser.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        with torch.no_grad():
            half = DualStepForExport(*cuda_models[torch.float16], self.SIZE)(**inputs)
            full = DualStepForExport(*cuda_models[torch.float32], self.SIZE)(**inputs)
        for name, want16, want32 in zip(("eps_mb", "eps_ip2p", "attention"), half, full, strict=True):
            engine_error = (buffers[name] - want32).abs().max().item()
            torch_error = (want16 - want32).abs().max().item()
            assert engine_error <= 2 * torch_error + 1e-3, (name, engine_error, torch_error)

    def test_whole_denoise_gives_the_same_mask(self, models, fp16_export, cuda_models):
        from zone_engine.pipeline import encode_image_latents
        from zone_engine.tensorrt_denoiser import TensorRTDenoiser
        from zone_engine.text import encode_instruction

        vae = copy.deepcopy(models.vae).to("cuda", torch.float16)
        text_encoder = copy.deepcopy(models.text_encoder).to("cuda", torch.float16)
        encoded = encode_instruction(models.tokenizer, text_encoder, "make the dog a golden statue")
        inputs = DenoiseInputs(
            context=encoded.context,
            image_latents=encode_image_latents(vae, smooth_image(*self.SIZE, seed=2), torch.float16),
            noise=initial_noise(42, latent_size(self.SIZE), torch.device("cuda"), torch.float16),
        )
        config, beta = EditConfig(steps=6), 0.01
        ip2p, mb = cuda_models[torch.float16]
        eager_attention = AttentionAccumulator()
        eager = FusedDualDenoiser(ip2p, mb, models.scheduler_config)(inputs, config, beta, eager_attention)
        for cuda_graph in (False, True):
            engine_attention = AttentionAccumulator()
            denoiser = TensorRTDenoiser.from_export(fp16_export, models.scheduler_config, cuda_graph=cuda_graph)
            latents = denoiser(inputs, config, beta, engine_attention)
            assert engine_attention.rows == eager_attention.rows
            assert_close(latents.float(), eager.float(), 0.0, 5e-2)
            masks = [localize(acc.average(), grid_of(self.SIZE), encoded.token_count - 1, self.SIZE).mask_b
                     for acc in (eager_attention, engine_attention)]
            assert np.array_equal(*masks)


def test_an_export_writes_and_records_the_opset_asked_for_and_a_static_one_has_fixed_shapes(models, tmp_path):
    """The manifest's opset (part of the engine key) is the one the file holds, at a non-default opset; an
    opset outside the range is refused by the export functions too, before anything is written. A static
    export (no --dynamic-shapes) has no symbolic input dimension, for which TensorRT would need a profile."""
    out = export_vae(models, tmp_path / "unet", height=32, width=64, opset=17)
    for name, entry in read_manifest(out)["graphs"].items():
        model = onnx.load(str(out / entry["onnx"]))
        assert entry["opset"] == 17
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
        dims = [d for value in model.graph.input for d in value.type.tensor_type.shape.dim]
        assert dims and all(d.HasField("dim_value") for d in dims), name
    with pytest.raises(ConfigError, match="opsets 14 to 20"):
        export_vae(models, tmp_path / "other", height=32, width=32, opset=21)
    assert not (tmp_path / "other").exists()


def test_dynamic_exports_keep_every_size_dependent_axis_symbolic(exported, manifest):
    """With --dynamic-shapes, the spatial axes of every input and output (and the attention's query axis) are
    symbolic in the file, not the traced size, and the inputs' other axes fixed: TensorRT and ONNX Runtime then
    serve the whole profile. (The exporter may leave more output axes symbolic.) The manifest's input and
    output names are the file's."""
    expected = {"dual_step": {"sample": {2, 3}, "timestep": set(), "context": set(), "guidance": set(),
                              "eps_mb": {2, 3}, "eps_ip2p": {2, 3}, "attention": {0}},
                "vae_encoder": {"image": {2, 3}, "latent": {2, 3}},
                "vae_decoder": {"latent": {2, 3}, "image": {2, 3}}}
    for graph, axes in expected.items():
        model = onnx.load(str(exported / f"{graph}.onnx"))
        symbolic = {value.name: {axis for axis, d in enumerate(value.type.tensor_type.shape.dim)
                                 if not d.HasField("dim_value")} for value in (*model.graph.input, *model.graph.output)}
        assert set(symbolic) == set(axes) and all(axes[name] <= symbolic[name] for name in axes), graph
        assert all(symbolic[value.name] == axes[value.name] for value in model.graph.input), graph
        entry = manifest["graphs"][graph]
        assert (entry["inputs"], entry["outputs"]) == ([v.name for v in model.graph.input],
                                                       [v.name for v in model.graph.output])


def test_the_opset_range_includes_both_ends():
    from zone_export.onnx_graph import LAST_OPSET, check_opset

    assert check_opset(14, 14, "the UNets") == 14 and check_opset(LAST_OPSET, 14, "the UNets") == LAST_OPSET
    for outside in (13, LAST_OPSET + 1):
        with pytest.raises(ConfigError, match=f"--opset {outside} is not supported"):
            check_opset(outside, 14, "the UNets")


def test_a_re_export_without_external_data_removes_the_old_data_files(models, exported, tmp_path, monkeypatch):
    """Weights past 2 GB go to `<graph>.onnx.data`; a later export of smaller graphs writes none, and the old
    ones (gigabytes, no longer listed) are removed, not left beside the new graphs. The VAE's graphs stand for
    all three (the same export_graph writes each; the dual step's would add 12 s)."""
    from zone_export import onnx_graph

    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_BYTES", 0)
    out = export_vae(models, tmp_path / "unet", height=32, width=32)
    listed = {name for graph in read_manifest(out)["graphs"].values() for name in graph["files"]}
    data_files = {"vae_decoder.onnx.data", "vae_encoder.onnx.data"}
    assert {path.name for path in out.glob("*.onnx.data")} == data_files and data_files <= listed
    # The later export's install step, with the graphs of an export of the same models without external data
    # (the module's; a second export here would take as long as the first).
    staging = shutil.copytree(exported, tmp_path / "staging")
    export_module._install(read_manifest(staging)["graphs"], staging, out)
    assert not list(out.glob("*.onnx.data"))
    assert not [name for graph in read_manifest(out)["graphs"].values() for name in graph["files"]
                if name.endswith(".data")]


def test_exporting_without_the_checkpoints_names_each_missing_one_at_once(tmp_path):
    """It named InstructPix2Pix alone; MagicBrush's absence showed only once IP2P was there and loaded."""
    with pytest.raises(CheckpointError, match="^2 checkpoints are missing") as caught:
        run_export_unet(export_args(tmp_path / "out", "--ip2p", str(tmp_path / "none"), "--magicbrush", "nobody/none"))
    assert "InstructPix2Pix" in str(caught.value) and "MagicBrush" in str(caught.value)


def test_a_failed_export_removes_the_parent_folders_it_created(models, tmp_path, monkeypatch):
    """`--out a/b/c` cut off (Ctrl-C, a failed check) removed c and left the empty a/b it had made."""
    (tmp_path / "a").mkdir()
    monkeypatch.setattr(export_module, "_export_spec", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        export_unet_graphs(models, tmp_path / "a" / "b" / "c" / "d", height=32, width=32)
    assert [path.name for path in tmp_path.iterdir()] == ["a"] and not any((tmp_path / "a").iterdir())


def test_export_unet_graphs_refuses_a_sam_exports_folder_before_tracing(models, tmp_path, monkeypatch):
    """From Python the check was the command line's alone: the SAM export's manifest was replaced."""
    sam_manifest = '{"format": 1, "model_type": "tiny", "files": {}}'
    (tmp_path / "manifest.json").write_text(sam_manifest)
    monkeypatch.setattr(export_module, "_export_spec", lambda *_: pytest.fail("traced into a SAM export's folder"))
    with pytest.raises(ZoneError, match="holds a `zone export sam` folder: `zone export unet` would replace"):
        export_unet_graphs(models, tmp_path, height=32, width=32)
    assert (tmp_path / "manifest.json").read_text() == sam_manifest


def test_a_re_export_drops_the_engines_built_from_the_graphs_it_replaced(models, exported, stand_in_tensorrt,
                                                                           tmp_path):
    """`zone export sam` deletes its TensorRT cache on a re-export; `zone export unet` left FOLDER/engines as it
    was, engines never loaded again (keyed by the old files): 3.4 GB a re-export for SD1.5's fp16 dual step."""
    folder = shutil.copytree(exported, tmp_path / "unet")
    built = {graph: engine_module.ensure_engine(folder, graph)[0] for graph in ("dual_step", "vae_decoder")}
    export_dual_step(models, folder, height=32, width=32)  # another size: the dual step's engine is stale
    assert not built["dual_step"].exists() and not EngineCache.sidecar_path(built["dual_step"]).exists()
    assert built["vae_decoder"].exists()  # its graph was not re-exported
    rebuilt, _, reason = engine_module.ensure_engine(folder, "dual_step")
    assert reason == "no engine built yet"
    export_vae(models, folder, height=32, width=32)
    assert rebuilt.exists() and EngineCache.sidecar_path(rebuilt).exists()  # built from the graph still there
    assert not built["vae_decoder"].exists()
