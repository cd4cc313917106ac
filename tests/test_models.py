"""Loading real checkpoints: exercised on tiny models saved to disk in the diffusers layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

import zone_engine.models
from zone_engine.errors import CheckpointError, ConfigError
from zone_engine.models import (
    SAM_URLS,
    ActionClassifier,
    build_random_components,
    build_sam,
    build_tiny_components,
    build_tiny_tokenizer,
    build_tiny_unet,
    check_same_unet,
    checked_sam_type,
    load_action_classifier,
    load_ip2p,
    load_magicbrush_unet,
    load_pretrained,
    load_sam,
    locate_model,
    sam_type_from_path,
)


def assert_same_weights(loaded, source):
    """Every tensor of `source` (a module or a state dict) in `loaded`, bit for bit, and nothing else."""
    expected = source if isinstance(source, dict) else source.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert not [name for name, tensor in expected.items() if not torch.equal(got[name], tensor)]


def assert_unets_in_place(ip2p_unet, mb_unet, models):
    """Each UNet loaded from its own folder: the two differ, so swapped UNets fail here."""
    assert not all(torch.equal(a, b) for a, b in zip(models.ip2p_unet.state_dict().values(),
                                                     models.mb_unet.state_dict().values(), strict=True))
    assert_same_weights(ip2p_unet, models.ip2p_unet)
    assert_same_weights(mb_unet, models.mb_unet)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny IP2P and MagicBrush folders as diffusers writes them, and SAM / classifier files."""
    root = tmp_path_factory.mktemp("checkpoints")
    models = build_tiny_components(seed=3)
    from diffusers import DPMSolverMultistepScheduler

    def save(unet, folder):
        StableDiffusionInstructPix2PixPipeline(
            vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=unet,
            scheduler=DPMSolverMultistepScheduler.from_config(models.scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        ).save_pretrained(root / folder)

    save(models.ip2p_unet, "ip2p")
    save(models.mb_unet, "magicbrush")
    torch.save(build_sam("vit_b").state_dict(), root / "sam_vit_b_test.pth")
    torch.save(ActionClassifier(32).state_dict(), root / "action_classifier.pth")
    return root, models


def test_ip2p_and_magicbrush_load_from_folders(saved, monkeypatch):
    """From folders under ~ too (`--ip2p=~/x`, where bash leaves the ~): diffusers took `~/ip2p` for a hub id."""
    root, models = saved
    monkeypatch.setenv("HOME", str(root))
    ip2p = load_ip2p("~/ip2p")
    unet = load_magicbrush_unet("~/magicbrush", ip2p)
    assert_unets_in_place(ip2p.unet, unet, models)
    assert_same_weights(ip2p.vae, models.vae)
    assert_same_weights(ip2p.text_encoder, models.text_encoder)
    assert ip2p.tokenizer("the dog").input_ids == models.tokenizer("the dog").input_ids


def test_magicbrush_with_other_architecture_is_refused(saved, tmp_path):
    root, models = saved
    ip2p = load_ip2p(str(root / "ip2p"))
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**build_tiny_unet().config, "block_out_channels": (16, 16, 32, 64)})
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(root / "magicbrush", local_files_only=True,
                                                                  safety_checker=None)
    pipe.unet = other
    pipe.save_pretrained(tmp_path / "wrong")
    with pytest.raises(CheckpointError, match="does not match InstructPix2Pix"):
        load_magicbrush_unet(str(tmp_path / "wrong"), ip2p)


def test_missing_models_say_how_to_get_them(tmp_path):
    with pytest.raises(CheckpointError, match="hf download timbrooks/instruct-pix2pix"):
        load_ip2p(str(tmp_path / "nothing-here"))
    with pytest.raises(CheckpointError, match=r"--ip2p DIR \(ip2p=DIR\)"):  # both callers' spelling
        load_ip2p("someone/not-in-the-cache")
    with pytest.raises(CheckpointError, match="sam_vit_h_4b8939.pth"):
        load_sam(tmp_path / "sam_vit_h_4b8939.pth")
    with pytest.raises(CheckpointError, match="action_classifier.pth"):
        load_action_classifier(tmp_path / "action_classifier.pth", 768)


def test_every_missing_checkpoint_is_said_at_once_before_any_loads(saved, tmp_path):
    """A first run without checkpoints learns the whole list, not one name a run (SAM loaded first before)."""
    missing = tmp_path / "nothing"
    with pytest.raises(CheckpointError, match="^4 checkpoints are missing") as caught:
        load_pretrained(str(missing / "ip2p"), "someone/not-in-the-cache", missing / "sam_vit_h_4b8939.pth",
                        missing / "action_classifier.pth")
    for flag in ("--ip2p", "--magicbrush", "--sam", "action_classifier.pth"):
        assert flag in str(caught.value)
    empty = tmp_path / "interrupted-download"
    empty.mkdir()  # passed as found, then failed once SAM had loaded
    with pytest.raises(CheckpointError, match="^2 checkpoints are missing") as caught:
        load_pretrained(str(empty), "someone/not-in-the-cache", None)
    assert "InstructPix2Pix folder" in str(caught.value) and "has no model_index.json" in str(caught.value)
    root, _ = saved
    with pytest.raises(CheckpointError, match="^MagicBrush weights not found") as caught:
        load_pretrained(str(root / "ip2p"), str(missing), root / "sam_vit_b_test.pth")


def test_a_model_in_the_offline_hugging_face_cache_is_found_without_loading_it(tmp_path, monkeypatch):
    """The cache layout hf download writes: refs/main names the snapshot folder."""
    repository = tmp_path / "hub" / "models--someone--cached-model"
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text("0" * 40)
    (repository / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repository / "snapshots" / ("0" * 40) / "model_index.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    locate_model("InstructPix2Pix", "someone/cached-model", "timbrooks/instruct-pix2pix", "--ip2p")
    with pytest.raises(CheckpointError, match="not found at 'someone/other-model'"):
        locate_model("InstructPix2Pix", "someone/other-model", "timbrooks/instruct-pix2pix", "--ip2p")


def test_a_model_not_found_names_the_cache_folder_looked_in(tmp_path, monkeypatch):
    """A cache copied into a container whose HOME is elsewhere, or unset, is looked for under that home: "not
    found (local folder or offline Hugging Face cache)" said neither where it looked nor what moves it."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=re.escape(f"offline Hugging Face cache, here {tmp_path / 'hub'}: "
                                                        "HF_HUB_CACHE or HF_HOME name another)")):
        locate_model("InstructPix2Pix", "someone/other-model", "timbrooks/instruct-pix2pix", "--ip2p")


def test_a_model_not_in_the_cache_is_said_missing_without_asking_the_hub(monkeypatch):
    """Telling a missing model from a damaged one looks in the cache only: online, asking the hub would download
    the model (gigabytes) to word an error."""
    asked = []
    cache_only = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kwargs):
        asked.append(kwargs.get("local_files_only", False))
        return cache_only(repo_id, **{**kwargs, "local_files_only": True})  # never the network, from this test

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(CheckpointError, match="not found at 'someone/not-in-the-cache'"):
        load_ip2p("someone/not-in-the-cache")
    assert asked == [True]


def test_a_model_the_offline_cache_holds_in_part_is_said_damaged_not_missing(tmp_path, monkeypatch):
    """A snapshot a download left without a component's files was reported "weights not found at ...", as if
    the cache had no such model; the missing file is named."""
    snapshot = tmp_path / "hub" / "models--someone--cut-short" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (snapshot / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionInstructPix2PixPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"^cannot load InstructPix2Pix 'someone/cut-short' from the offline "
                       r"Hugging Face cache \(.*no file named config\.json.*\): download it again "
                       r"\(`hf download someone/cut-short`\)"):  # that id, not the default model's
        load_ip2p("someone/cut-short")


def test_sam_loads_and_checks_its_type(saved, tmp_path):
    root, _ = saved
    sam = load_sam(root / "sam_vit_b_test.pth")
    assert sam.image_encoder.patch_embed.proj.out_channels == 768
    assert_same_weights(sam, torch.load(root / "sam_vit_b_test.pth", weights_only=True))
    with pytest.raises(CheckpointError, match="sam_vit_b_test.pth is not a SAM vit_l checkpoint"):
        load_sam(root / "sam_vit_b_test.pth", "vit_l")
    unnamed = tmp_path / "weights.pth"
    unnamed.write_bytes((root / "sam_vit_b_test.pth").read_bytes())
    with pytest.raises(CheckpointError, match=r"from its name: pass --sam-type TYPE \(sam_type=TYPE\), one of vit_h"):
        load_sam(unnamed)
    corrupt = tmp_path / "sam_vit_b_corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read the SAM checkpoint .*sam_vit_b_corrupt.pth"):
        load_sam(corrupt)
    assert sam_type_from_path(root / "sam_vit_h_4b8939.pth") == "vit_h"
    with pytest.raises(CheckpointError, match="is a folder: pass the SAM checkpoint file itself with --sam"):
        load_sam(root)  # was "not found"
    with pytest.raises(ConfigError, match="unknown SAM type 'vit_x'"):
        load_sam(root / "sam_vit_b_test.pth", "vit_x")
    assert load_sam(unnamed, "VIT_B").image_encoder.patch_embed.proj.out_channels == 768


def test_a_model_folder_that_is_there_but_does_not_load_says_why(saved, tmp_path):
    root, _ = saved
    broken = tmp_path / "ip2p"
    broken.mkdir()
    (broken / "model_index.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="cannot load InstructPix2Pix from the folder .*json") as caught:
        load_ip2p(str(broken))
    assert "\n" not in str(caught.value)
    # JSON of the wrong shape (diffusers' KeyError, TypeError) and a truncated weights file (safetensors' own
    # error) were tracebacks from deep inside the libraries.
    for index, words in (("{}", "KeyError: '_class_name'"), ("[]", "TypeError: ")):
        (broken / "model_index.json").write_text(index)
        with pytest.raises(CheckpointError, match=f"cannot load InstructPix2Pix from the folder .*{words}"):
            load_ip2p(str(broken))
    truncated = tmp_path / "truncated"
    shutil.copytree(root / "ip2p", truncated)
    weights = next((truncated / "text_encoder").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot load InstructPix2Pix from the folder .*header"):
        load_ip2p(str(truncated))


def test_action_classifier_loads_and_checks_width(saved):
    root, _ = saved
    assert isinstance(load_action_classifier(root / "action_classifier.pth", 32), ActionClassifier)
    with pytest.raises(CheckpointError, match="768-wide"):
        load_action_classifier(root / "action_classifier.pth", 768)
    with pytest.warns(UserWarning, match="keyword rule"):
        assert load_action_classifier(None, 768) is None
    with pytest.raises(CheckpointError, match="768-wide text encoder \\(Error\\(s\\) in loading") as caught:
        load_action_classifier(root / "action_classifier.pth", 768)
    assert "\n" not in str(caught.value)
    with pytest.raises(CheckpointError, match="cannot read the action classifier .*not a PyTorch checkpoint"):
        load_action_classifier(root / "ip2p" / "model_index.json", 32)


def test_the_action_classifier_in_zones_place_is_read_without_being_named(saved, tmp_path, monkeypatch):
    """ZONE.md section 2: the keyword rule only when the classifier's weights are absent; the reference keeps
    them at ckpts/action_classifier.pth, as it keeps SAM's (the default --sam)."""
    from zone_engine import ZonePipeline

    root, _ = saved
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    shutil.copy(root / "sam_vit_b_test.pth", tmp_path / "ckpts" / "sam_vit_h_4b8939.pth")  # DEFAULT_SAM's name
    arguments = dict(ip2p=str(root / "ip2p"), magicbrush=str(root / "magicbrush"), sam_type="vit_b", device="cpu")
    with pytest.warns(UserWarning, match="none at ckpts/action_classifier.pth: actions come from the keyword rule"):
        assert ZonePipeline.from_pretrained(**arguments).models.action_classifier is None
    shutil.copy(root / "action_classifier.pth", tmp_path / "ckpts" / "action_classifier.pth")
    classifier = ZonePipeline.from_pretrained(**arguments).models.action_classifier
    saved_weights = torch.load(root / "action_classifier.pth", weights_only=True)
    assert all(torch.equal(classifier.state_dict()[name], value) for name, value in saved_weights.items())


def test_from_pretrained_reads_backend_names_in_any_case(saved):
    """Its checks run before the weights load: "Eager" was refused there, as an unknown denoiser backend."""
    from zone_engine import ZonePipeline
    from zone_engine.denoise import SequentialDenoiser

    root, models = saved
    pipe = ZonePipeline.from_pretrained(str(root / "ip2p"), str(root / "magicbrush"), root / "sam_vit_b_test.pth",
                                        root / "action_classifier.pth", device="cpu", denoiser="Eager")
    assert isinstance(pipe.denoiser, SequentialDenoiser)  # the eager reference
    loaded = pipe.models  # every network is the one saved, each in its place
    assert_unets_in_place(loaded.ip2p_unet, loaded.mb_unet, models)
    assert_same_weights(loaded.vae, models.vae)
    assert_same_weights(loaded.text_encoder, models.text_encoder)
    assert_same_weights(loaded.sam, torch.load(root / "sam_vit_b_test.pth", weights_only=True))
    assert_same_weights(loaded.action_classifier, torch.load(root / "action_classifier.pth", weights_only=True))
    assert pipe.denoiser.ip2p_unet is loaded.ip2p_unet and pipe.denoiser.mb_unet is loaded.mb_unet


def test_tiny_components_are_reproducible():
    a, b = build_tiny_components(seed=5), build_tiny_components(seed=5)
    for x, y in zip(a.ip2p_unet.parameters(), b.ip2p_unet.parameters(), strict=True):
        assert torch.equal(x, y)
    assert a.tokenizer.model_max_length == 77
    assert not torch.equal(next(a.ip2p_unet.parameters()), next(build_tiny_components(seed=6).ip2p_unet.parameters()))


def test_unets_go_channels_last_by_default_only_on_cuda_in_half_precision():
    from zone_engine.models import unets_channels_last

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert unets_channels_last(cuda, torch.float16) and unets_channels_last(cuda, torch.bfloat16)
    assert not unets_channels_last(cuda, torch.float32) and not unets_channels_last(cpu, torch.float32)


def test_the_default_layout_on_the_cpu_is_contiguous_and_true_converts_every_diffusion_network(tiny_models):
    import copy

    models = copy.deepcopy(tiny_models)
    conv = {name: next(m for m in getattr(models, name).modules() if isinstance(m, torch.nn.Conv2d))
            for name in ("vae", "ip2p_unet", "mb_unet")}
    models.to(torch.device("cpu"), torch.float32, True)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in conv.values())
    models.to(torch.device("cpu"), torch.float32)
    assert all(c.weight.is_contiguous() for c in conv.values())


def test_weight_bytes_count_every_networks_weights_in_their_dtype_sam_and_the_classifier_kept_fp32(tiny_models):
    """What `zone serve` logs at load: half precision halves the diffusion models' share only."""
    import copy
    import dataclasses

    def floats(*nets):
        return sum(t.numel() for net in nets for t in net.state_dict().values() if t.is_floating_point())

    models = copy.deepcopy(tiny_models)
    diffusion = floats(models.text_encoder, models.vae, models.ip2p_unet, models.mb_unet)
    in_fp32 = models.weight_bytes()
    assert in_fp32 >= 4 * (diffusion + floats(models.sam, models.action_classifier))  # and integer buffers
    models.to(torch.device("cpu"), torch.bfloat16)
    assert in_fp32 - models.weight_bytes() == 2 * diffusion
    # No classifier file (a keyword rule decides) or an exported SAM: counted as nothing, not an AttributeError
    without, empty = (dataclasses.replace(models, sam=net, action_classifier=net) for net in (None, torch.nn.Module()))
    assert without.weight_bytes() == empty.weight_bytes() < models.weight_bytes()


def test_the_torch_free_name_lists_match_the_models():
    """The command line offers config's names (no torch at --help); the models are keyed by models.py's."""
    from zone_engine.config import MODEL_SIZES, SAM_TYPES
    from zone_engine.models import PRESETS, SAM_SIZES

    assert set(MODEL_SIZES) == set(PRESETS) and set(SAM_SIZES) == {*SAM_TYPES, "tiny"}


# --------------------------------------------------------------------------------------------------
# Loading and building, each test below shown to fail on a one-line change to models.py (a mutation audit).


def test_sam_sizes_build_segment_anythings_own_architectures():
    """A real SAM checkpoint loads only into the architecture it was trained as, and the tests' own checkpoints
    come from build_sam itself, so a wrong number in SAM_SIZES or build_sam (window size, global layers, norm
    eps, pixel statistics) passed every other test. Built on the meta device: no weights are allocated."""
    from segment_anything import sam_model_registry

    for name in ("vit_h", "vit_l", "vit_b"):
        with torch.device("meta"):
            ours, theirs = build_sam(name), sam_model_registry[name]()
        assert str(ours) == str(theirs), name
        shapes = [{key: value.shape for key, value in sam.state_dict().items()} for sam in (ours, theirs)]
        assert shapes[0] == shapes[1], name
        assert torch.equal(ours.pixel_mean.cpu(), theirs.pixel_mean.cpu())
        assert torch.equal(ours.pixel_std.cpu(), theirs.pixel_std.cpu())


class _RunsCode:
    """A pickle payload that creates a file when unpickled: what a tampered checkpoint could run instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_checkpoints_are_read_without_running_pickled_code(tmp_path):
    """SAM and the action classifier come from downloaded .pth files: torch.load must keep weights_only=True,
    so a checkpoint that carries code is refused as unreadable instead of run."""
    marker = tmp_path / "code-ran"
    loaders = (("sam_vit_b_tampered.pth", load_sam), ("classifier.pth", lambda path: load_action_classifier(path, 32)))
    for name, load in loaders:
        torch.save({"weight": _RunsCode(marker)}, tmp_path / name)
        with pytest.raises(CheckpointError, match="cannot read"):
            load(tmp_path / name)
        assert not marker.exists(), name


def test_an_unreadable_sam_checkpoint_points_to_its_own_types_download(tmp_path):
    """A corrupt vit_l file must be downloaded again from vit_l's address, not vit_h's (the default's)."""
    corrupt = tmp_path / "sam_vit_l_partial.pth"
    corrupt.write_bytes(b"cut off")
    with pytest.raises(CheckpointError, match="download it again from " + re.escape(SAM_URLS["vit_l"])):
        load_sam(corrupt)


def test_a_sam_checkpoint_of_the_wrong_shape_is_said_in_one_line(tmp_path, monkeypatch):
    """Missing keys (RuntimeError) and a checkpoint that is not a state dict at all (TypeError) are both
    CheckpointErrors of one line, naming the type and the option; the tiny SAM stands in for vit_b."""
    build = zone_engine.models.build_sam
    monkeypatch.setattr(zone_engine.models, "build_sam", lambda model_type: build("tiny"))
    state = build("tiny").state_dict()
    state.pop("mask_decoder.iou_token.weight")
    for name, contents in (("sam_vit_b_partial.pth", state), ("sam_vit_b_list.pth", [1, 2, 3])):
        torch.save(contents, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name} is not a SAM vit_b checkpoint .*check --sam-type") as caught:
            load_sam(tmp_path / name)
        assert "\n" not in str(caught.value)


def test_the_sam_type_is_read_from_the_option_or_the_file_name_alone(tmp_path):
    """The option is read as typed in a config file (spaces, any case; empty means "from the name"); the name of
    the folder holding the file says nothing; an unknown type names the caller's own option."""
    assert sam_type_from_path(tmp_path / "vit_l" / "weights.pth") is None
    assert sam_type_from_path(tmp_path / "vit_l" / "sam_vit_b_01ec64.pth") == "vit_b"
    assert checked_sam_type(" Vit_B\n") == "vit_b"
    assert checked_sam_type("") is None and checked_sam_type("  ") is None and checked_sam_type(None) is None
    with pytest.raises(ConfigError, match="unknown SAM type 'vit_x': --model-type TYPE takes vit_h"):
        checked_sam_type("vit_x", "--model-type TYPE")


def test_a_magicbrush_unet_must_match_in_config_and_in_weight_shapes():
    """transformer_layers_per_block is not among the compared config keys but changes the weights' shapes: the
    shape comparison must catch it; a compared key that differs is named."""
    from diffusers import UNet2DConditionModel

    reference = build_tiny_unet()
    deeper = UNet2DConditionModel(**{**reference.config, "transformer_layers_per_block": 2})
    with pytest.raises(CheckpointError, match=r"at 'mb' does not match .*\(state-dict shapes differ\)"):
        check_same_unet(reference, deeper, "mb")
    wider = UNet2DConditionModel(**{**reference.config, "cross_attention_dim": 48})
    with pytest.raises(CheckpointError, match=r"\(config differs in cross_attention_dim\)"):
        check_same_unet(reference, wider, "mb")


def test_moving_the_models_casts_the_diffusion_networks_only_and_keeps_the_vae_contiguous(tiny_models, monkeypatch):
    """to(device, dtype): text encoder, VAE and UNets in `dtype`; SAM and the action classifier stay fp32 (the mask
    generator's thresholds are tuned on fp32 scores); by default the VAE stays contiguous even where the UNets go
    channels-last (as on CUDA in half precision, stood in for here)."""
    import copy

    models = copy.deepcopy(tiny_models)
    monkeypatch.setattr(zone_engine.models, "unets_channels_last", lambda *args: True)
    models.to(torch.device("cpu"), torch.bfloat16)
    for name in ("text_encoder", "vae", "ip2p_unet", "mb_unet"):
        assert {p.dtype for p in getattr(models, name).parameters()} == {torch.bfloat16}, name
    for net in (models.sam, models.action_classifier):
        assert {p.dtype for p in net.parameters()} == {torch.float32}
    conv = {name: next(m for m in getattr(models, name).modules() if isinstance(m, torch.nn.Conv2d))
            for name in ("vae", "ip2p_unet", "mb_unet")}
    assert conv["ip2p_unet"].weight.is_contiguous(memory_format=torch.channels_last)
    assert conv["mb_unet"].weight.is_contiguous(memory_format=torch.channels_last)
    assert conv["vae"].weight.is_contiguous()


def test_random_components_check_their_names_and_build_the_sam_asked_for(monkeypatch):
    """The benchmarks' builder: unknown names are ConfigErrors (not KeyErrors), and sam_type is the SAM built."""
    with pytest.raises(ConfigError, match="unknown model preset 'sd14'"):
        build_random_components("sd14")
    with pytest.raises(ConfigError, match="unknown SAM type 'vit_x'"):
        build_random_components("tiny", sam_type="vit_x")
    build, built = zone_engine.models.build_sam, []
    monkeypatch.setattr(zone_engine.models, "build_sam", lambda model_type: built.append(model_type) or build("tiny"))
    build_random_components("tiny", sam_type="vit_l")
    assert built == ["vit_l"]


def test_a_damaged_model_folder_under_home_is_said_as_a_folder(tmp_path, monkeypatch):
    """`--ip2p=~/ip2p` (bash leaves the ~): a damaged folder there is "cannot load from the folder", not "not
    found"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ip2p").mkdir()
    (tmp_path / "ip2p" / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="cannot load InstructPix2Pix from the folder '~/ip2p'"):
        load_ip2p("~/ip2p")


def test_magicbrush_loads_without_its_own_text_encoder_and_vae(saved, tmp_path):
    """ZONE uses IP2P's text encoder and VAE for both trajectories, so MagicBrush's copies are never loaded: a
    MagicBrush folder without them (downloaded with only its UNet) loads."""
    root, models = saved
    partial = tmp_path / "magicbrush"
    shutil.copytree(root / "magicbrush", partial, ignore=shutil.ignore_patterns("text_encoder", "vae"))
    unet = load_magicbrush_unet(str(partial), load_ip2p(str(root / "ip2p")))
    assert_same_weights(unet, models.mb_unet)


def test_locating_a_hub_id_never_downloads(monkeypatch):
    """Nothing here downloads: the presence check asks the local cache only, whatever HF_HUB_OFFLINE says."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: calls.append(kwargs) or "/x")
    locate_model("InstructPix2Pix", "someone/model", "timbrooks/instruct-pix2pix", "--ip2p")
    assert calls == [{"local_files_only": True}]


def test_load_pretrained_loads_the_diffusion_networks_in_the_dtype_asked(saved):
    """Both pipelines are read in `dtype` (a fp16 load holds half the memory), MagicBrush's UNet too."""
    root, _ = saved
    with pytest.warns(UserWarning, match="keyword rule"):
        models = load_pretrained(str(root / "ip2p"), str(root / "magicbrush"), None, dtype=torch.bfloat16)
    for name in ("text_encoder", "vae", "ip2p_unet", "mb_unet"):
        assert next(getattr(models, name).parameters()).dtype == torch.bfloat16, name


def test_a_folder_given_as_the_action_classifier_is_not_found_before_anything_loads(tmp_path):
    """A folder is not the classifier's file: said by the presence check, before the models load."""
    with pytest.raises(CheckpointError, match="action classifier not found"):
        load_action_classifier(tmp_path, 32)


def test_the_tiny_tokenizer_knows_every_printable_character():
    """Its vocabulary is CLIP's byte alphabet: any instruction tokenizes without unknown tokens (CLIP's unknown
    token is its end token)."""
    tokenizer = build_tiny_tokenizer()
    text = "".join(map(chr, range(ord("!"), ord("~") + 1))) + " é¡ÿ"
    ids = tokenizer(text).input_ids
    assert tokenizer.eos_token_id not in ids[1:-1]


def test_both_pipelines_are_read_from_local_files_only(monkeypatch):
    """Nothing here downloads: IP2P's and MagicBrush's loads ask diffusers for local files only, whatever
    HF_HUB_OFFLINE says (conftest sets it, so a dropped local_files_only passed every other test)."""
    from types import SimpleNamespace

    asked = []

    def from_pretrained(source, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        raise OSError(f"{source} is not here")

    monkeypatch.setattr(StableDiffusionInstructPix2PixPipeline, "from_pretrained", from_pretrained)
    with pytest.raises(CheckpointError, match="InstructPix2Pix weights not found"):
        load_ip2p("someone/model")
    with pytest.raises(CheckpointError, match="MagicBrush weights not found"):
        load_magicbrush_unet("someone/model", SimpleNamespace(text_encoder=None, tokenizer=None, vae=None))
    assert asked == [True, True]


def test_a_magicbrush_unet_with_other_attention_heads_is_refused():
    """attention_head_dim (SD1.5's key for the number of heads) changes no weight's shape, only how attention
    splits them: the config comparison alone can catch it."""
    from diffusers import UNet2DConditionModel

    reference = build_tiny_unet()
    other = UNet2DConditionModel(**{**reference.config, "attention_head_dim": 4})
    with pytest.raises(CheckpointError, match=r"\(config differs in attention_head_dim\)"):
        check_same_unet(reference, other, "mb")


def test_the_scheduler_settings_are_the_checkpoints_not_the_class_defaults(saved, tmp_path):
    """SD's scheduler uses scaled_linear betas where diffusers' default is linear: the saved folders' own config
    (here the class defaults) would pass a loader that ignored it."""
    root, _ = saved
    ip2p = tmp_path / "ip2p"
    shutil.copytree(root / "ip2p", ip2p)
    scheduler = ip2p / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace('"beta_schedule": "linear"', '"beta_schedule": "scaled_linear"'))
    with pytest.warns(UserWarning, match="keyword rule"):
        models = load_pretrained(str(ip2p), str(root / "magicbrush"), None)
    assert models.scheduler_config["beta_schedule"] == "scaled_linear"


def test_the_sd15_preset_builds_clip_vit_l14s_text_tower(monkeypatch):
    """The benchmarks' text encoder has CLIP's full 49408-token vocabulary, not the tiny tokenizer's length (the
    tiny preset's choice): the embedding table is part of the measured model. Its config is read, nothing built."""
    import transformers

    configs = []

    class Recorded(Exception):
        pass

    def record(config):
        configs.append(config)
        raise Recorded

    monkeypatch.setattr(transformers, "CLIPTextModel", record)
    with pytest.raises(Recorded):
        build_random_components("sd15")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
    assert [getattr(configs[0], name) for name in sizes] == [49408, 768, 3072, 12, 12]


def test_moving_the_models_leaves_every_network_in_inference_mode(tiny_models):
    """Built networks start in training mode (dropout on, gradients kept): `to` turns every one to eval without
    gradients, as an edit runs them (the tiny and SD configs have no dropout, so the edits alone cannot tell)."""
    import copy

    models = copy.deepcopy(tiny_models)
    nets = [models.text_encoder, models.vae, models.ip2p_unet, models.mb_unet, models.sam, models.action_classifier]
    for net in nets:
        net.train().requires_grad_(True)
    models.to(torch.device("cpu"), torch.float32)
    assert not [net for net in nets if net.training or any(p.requires_grad for p in net.parameters())]


def test_a_torch_cache_folder_that_cannot_be_made_is_said_naming_the_variable(saved, tmp_path, monkeypatch):
    """Diffusers imports torch._dynamo, which makes TORCHINDUCTOR_CACHE_DIR's folder as it loads: a path where
    none can be made failed deep in torch (FileNotFoundError), for every denoiser. Both ways to models say it."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    said = r"TORCHINDUCTOR_CACHE_DIR='.*a_file/cache': .* \(Not a directory\); set it to a folder you can write"
    with pytest.raises(ConfigError, match=said):
        build_tiny_components()
    with pytest.raises(ConfigError, match=said):
        load_pretrained(str(saved[0] / "ip2p"), str(saved[0] / "magicbrush"), None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "new" / "cache"))  # made, as PyTorch would
    zone_engine.models.check_torch_cache_folder()
    assert (tmp_path / "new" / "cache").is_dir()


def test_no_temporary_folder_to_write_is_said_before_torch_fails_on_it(tmp_path, monkeypatch):
    """A read-only filesystem (a locked-down server) with TMPDIR unset: torch._dynamo's import, which puts
    TORCHINDUCTOR_CACHE_DIR's default in the temporary folder, ended `zone serve` with tempfile's traceback."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", None)  # looked for again, among these folders only: none writable
    monkeypatch.setattr("tempfile._candidate_tempdir_list", lambda: [str(tmp_path / "a_file")])
    with pytest.raises(ConfigError, match=r"No usable temporary directory found in .*a_file.*: PyTorch keeps its "
                       r"cache in the temporary folder .* set TMPDIR \(or TORCHINDUCTOR_CACHE_DIR\) to a folder"):
        zone_engine.models.check_torch_cache_folder()


def test_random_models_without_a_temporary_folder_say_to_set_tmpdir(tmp_path, monkeypatch):
    """Their tokenizer is written in a temporary folder: with TORCHINDUCTOR_CACHE_DIR set, as the README advises,
    and a read-only filesystem, `zone demo` and `zone serve --tiny` ended in tempfile's traceback (exit 1)."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("tempfile.tempdir", None)  # looked for again, among these folders only: none writable
    monkeypatch.setattr("tempfile._candidate_tempdir_list", lambda: [str(tmp_path / "a_file")])
    with pytest.raises(ConfigError, match=r"No usable temporary directory found in .*: the tokenizer of "
                       r"random-weight models is written .* set TMPDIR to a folder you can write"):
        build_tiny_components()


def test_compile_with_a_torch_cache_folder_it_cannot_write_is_said_before_any_edit(tmp_path, monkeypatch):
    """A read-only image's pre-warmed cache (or another user's /tmp/torchinductor_NAME) passes the check that the
    folder can be made; `--denoiser compile` then failed at its first edit, after the models loaded, with
    inductor's 120-line traceback: `InductorError: OSError: [Errno 30] Read-only file system: '.../hp'`."""
    from zone_engine import ZonePipeline

    cache = tmp_path / "cache"
    cache.mkdir(mode=0o500)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    if os.access(cache, os.W_OK):  # root writes anywhere: denied here as a read-only mount would
        monkeypatch.setattr("os.access", lambda path, mode: Path(path) != cache)
    with pytest.raises(ConfigError, match=r"--denoiser compile \(denoiser='compile'\) keeps the kernels it compiles "
                       r"in PyTorch's cache folder \(TORCHINDUCTOR_CACHE_DIR, here .*cache\), but cannot write in "
                       r".*cache \(read-only or not yours\): set TORCHINDUCTOR_CACHE_DIR to a folder you can write"):
        ZonePipeline(build_tiny_components(), denoiser="Compile")
    ZonePipeline(build_tiny_components(), denoiser="fused")  # writes nothing there


def test_a_custom_hub_id_not_found_says_to_download_that_id():
    """`--ip2p some/fine-tune` not in the cache was told to `hf download timbrooks/instruct-pix2pix`."""
    with pytest.raises(CheckpointError, match=r"run `hf download someone/not-in-the-cache`") as caught:
        locate_model("InstructPix2Pix", "someone/not-in-the-cache", "timbrooks/instruct-pix2pix", "--ip2p DIR")
    assert "timbrooks" not in str(caught.value)
    for folder in ("/models/ip2p", "./ip2p", "~/ip2p", "ip2p"):  # folders' paths: the default model to get
        with pytest.raises(CheckpointError, match=r"run `hf download timbrooks/instruct-pix2pix`"):
            locate_model("InstructPix2Pix", folder, "timbrooks/instruct-pix2pix", "--ip2p DIR")


def test_a_triton_cache_folder_that_cannot_be_written_names_the_variable(tmp_path, monkeypatch):
    """With a read-only or missing home, Triton's first compiled launch on a GPU failed deep in Triton, after the
    models loaded; its folder: TRITON_CACHE_DIR, else TRITON_HOME/.triton/cache, else ~/.triton/cache."""
    from zone_engine.models import check_triton_cache_writable, triton_cache_dir

    (tmp_path / "a_file").write_text("")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "a_file"))
    assert triton_cache_dir() == str(tmp_path / "a_file" / ".triton" / "cache")
    with pytest.raises(ConfigError, match=r"Triton's cache folder .*here .*a_file/.triton/cache\), but .*a_file is a "
                       r"file, not a folder: set TRITON_CACHE_DIR to a folder you can write, or use --kernels torch"):
        check_triton_cache_writable()
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o500)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(read_only))  # over TRITON_HOME
    if os.access(read_only, os.W_OK):  # root writes anywhere: denied here as a read-only mount would
        monkeypatch.setattr("os.access", lambda path, mode: Path(path) != read_only)
    with pytest.raises(ConfigError, match=r"here .*read-only\), but cannot write in .*read-only \(read-only or not"):
        check_triton_cache_writable()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "new" / "cache"))  # made by Triton: nothing to say
    check_triton_cache_writable()


def test_the_triton_cache_folder_without_triton_knobs_is_found_by_tritons_rule(tmp_path, monkeypatch):
    """No Triton, or one without `knobs`: TRITON_CACHE_DIR, else TRITON_HOME/.triton/cache, else ~/.triton/cache."""
    from zone_engine.models import triton_cache_dir

    monkeypatch.setitem(sys.modules, "triton", None)  # `from triton import knobs` is an ImportError
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert triton_cache_dir() == str(tmp_path / "home" / ".triton" / "cache")
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "triton-home"))
    assert triton_cache_dir() == str(tmp_path / "triton-home" / ".triton" / "cache")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))  # over TRITON_HOME
    assert triton_cache_dir() == str(tmp_path / "cache")


def test_the_triton_cache_is_checked_only_where_triton_kernels_compile_on_a_gpu(monkeypatch):
    """On CUDA with the kernels chosen (the default there); never on the CPU, where no Triton cache is written."""
    import zone_kernels.attn_accumulate
    from zone_engine.backends import check_backends, triton_compiles_kernels

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # Interpreted on the CPU (TRITON_INTERPRET=1, as here) the kernels run, but nothing is compiled or kept.
    assert zone_kernels.attn_accumulate.runs_on(cpu)
    assert not triton_compiles_kernels(cpu, kernels="triton", group_norm="triton")
    checked = []
    monkeypatch.setattr("zone_engine.backends.check_triton_cache_writable", lambda: checked.append(True))
    monkeypatch.setattr(zone_kernels.attn_accumulate, "runs_on", lambda device: device.type == "cuda")
    assert triton_compiles_kernels(cuda) and triton_compiles_kernels(cuda, kernels="torch")  # kernel 3's norm
    assert triton_compiles_kernels(cuda, group_norm="torch")  # the localization kernels
    assert triton_compiles_kernels(cuda, kernels="Torch", group_norm="Triton", denoiser="eager")
    assert not triton_compiles_kernels(cuda, kernels="torch", denoiser="eager")
    assert not triton_compiles_kernels(cuda, kernels="torch", group_norm="torch")
    assert not triton_compiles_kernels(cuda, kernels="torch", cuda_graphs=False)  # auto: PyTorch's norm uncaptured
    assert triton_compiles_kernels(cuda, kernels="torch", group_norm="triton", cuda_graphs=False)
    assert not triton_compiles_kernels(cpu, kernels="triton", group_norm="triton")
    check_backends(cpu, kernels="auto", group_norm="auto")
    assert not checked
    check_backends(cuda, kernels="auto", group_norm="auto")
    assert checked
    monkeypatch.setattr(zone_kernels.attn_accumulate, "runs_on", lambda device: False)  # a GPU Triton cannot use
    assert not triton_compiles_kernels(cuda, kernels="triton", group_norm="triton")
