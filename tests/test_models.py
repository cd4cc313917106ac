"""Loading real checkpoints: exercised on tiny models saved to disk in the diffusers layout."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

from zone_engine.errors import CheckpointError, ConfigError
from zone_engine.models import (
    ActionClassifier,
    build_sam,
    build_tiny_components,
    build_tiny_unet,
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


def test_the_torch_free_name_lists_match_the_models():
    """The command line offers config's names (no torch at --help); the models are keyed by models.py's."""
    from zone_engine.config import MODEL_SIZES, SAM_TYPES
    from zone_engine.models import PRESETS, SAM_SIZES

    assert set(MODEL_SIZES) == set(PRESETS) and set(SAM_SIZES) == {*SAM_TYPES, "tiny"}
