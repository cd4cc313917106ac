"""End to end with ZonePipeline.tiny(): sizes, determinism, locality, timings (ZONE.md sections 0-5)."""

from __future__ import annotations

import copy
import inspect
import os
import threading
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import smooth_image, spy_calls

from zone_engine import Action, EditConfig, EditRequest, EditResult, SamConfig, ZonePipeline
from zone_engine.denoise import SequentialDenoiser
from zone_engine.errors import ConfigError, EditCancelled, EditWarning
from zone_engine.pipeline import STAGES
from zone_engine.refine import ListSegmenter
from zone_engine.timing import Stopwatch

INSTRUCTION = "make the house golden"


def _edit(pipe, image, **changes) -> EditResult:
    return pipe.edit(image, INSTRUCTION, pipe.default_config.replace(steps=2, **changes))


@pytest.mark.parametrize("size", [(64, 64), (77, 51), (33, 130), (600, 380)])
def test_outputs_have_the_input_size(tiny_pipe, size):
    result = _edit(tiny_pipe, smooth_image(*size))
    assert result.image.shape == (*size, 3) and result.image.dtype == np.uint8
    assert result.styled.shape == result.heatmap.shape == (*size, 3)
    assert result.difference.shape == size and result.difference.dtype == np.uint8
    for mask in (result.mask_b, result.mask_f, result.region, result.seam):
        assert mask.shape == size and mask.dtype == bool


def test_same_seed_same_output_and_other_seed_differs(tiny_pipe):
    image = smooth_image(64, 96, seed=3)
    first, second = _edit(tiny_pipe, image, seed=7), _edit(tiny_pipe, image, seed=7)
    assert np.array_equal(first.image, second.image) and np.array_equal(first.mask_b, second.mask_b)
    assert not np.array_equal(first.styled, _edit(tiny_pipe, image, seed=8).styled)


def test_timings_cover_every_stage(tiny_pipe):
    timings = _edit(tiny_pipe, smooth_image(64, 64)).timings
    assert set(timings) == {*STAGES, "total"}
    assert all(value > 0 for value in timings.values()), timings  # each stage does work, and it was timed
    assert timings["total"] >= sum(timings[stage] for stage in STAGES) * 0.99


class OneSquare(ListSegmenter):
    """A segmenter that finds one 24x24 square: makes M_f, and so the edit, small and known."""

    def segment(self, image):
        mask = np.zeros(image.shape[:2], dtype=bool)
        mask[20:44, 30:54] = True
        return [mask]


@pytest.mark.parametrize("action", [Action.CHANGE, Action.ADD, Action.REMOVE])
def test_pixels_outside_the_region_are_untouched(tiny_pipe, monkeypatch, action):
    monkeypatch.setattr(tiny_pipe, "segmenter", lambda config: OneSquare())
    image = smooth_image(64, 96, seed=5)
    result = _edit(tiny_pipe, image, action=action)
    assert 0 < result.region.mean() < 0.5  # a real, local edit
    outside = ~(result.region | result.seam)
    assert np.array_equal(result.image[outside], image[outside])
    inside = result.region & ~result.seam
    assert np.array_equal(result.image[inside], result.styled[inside])
    assert not result.used_fallback and result.mask_f[20:44, 30:54].all()


def test_untouched_pixels_are_exact_after_a_shrink(tiny_pipe, monkeypatch):
    """Images over 512 px run shrunk; the composite happens at the input size, so outside R is exact."""
    monkeypatch.setattr(tiny_pipe, "segmenter", lambda config: OneSquare())
    image = smooth_image(700, 530, seed=2)
    result = _edit(tiny_pipe, image)
    outside = ~(result.region | result.seam)
    assert outside.any() and np.array_equal(result.image[outside], image[outside])


def test_no_overlapping_segment_falls_back_to_mask_b(tiny_pipe, monkeypatch):
    class Nothing(ListSegmenter):
        def segment(self, image):
            return []

    monkeypatch.setattr(tiny_pipe, "segmenter", lambda config: Nothing())
    result = _edit(tiny_pipe, smooth_image(64, 64))
    assert result.used_fallback
    assert np.array_equal(result.mask_f, result.mask_b)


@pytest.mark.parametrize("progress", [False, True])
def test_progress_reaches_the_segmenter(tiny_pipe, monkeypatch, progress):
    """`edit(progress=True)` shows refinement's bar too (a minute or more of SAM on a CPU)."""
    seen = []

    class Recorder(OneSquare):
        def select(self, image, mask_b, *, progress=False):
            seen.append(progress)
            return super().select(image, mask_b)

    monkeypatch.setattr(tiny_pipe, "segmenter", lambda config: Recorder())
    tiny_pipe.edit(smooth_image(64, 64), INSTRUCTION, tiny_pipe.default_config.replace(steps=2), progress=progress)
    assert seen == [progress]


def test_remove_segments_the_input_not_the_styled_image(tiny_pipe, monkeypatch):
    seen = []

    class Recorder(OneSquare):
        def segment(self, image):
            seen.append(image.copy())
            return super().segment(image)

    monkeypatch.setattr(tiny_pipe, "segmenter", lambda config: Recorder())
    image = smooth_image(64, 64, seed=1)
    _edit(tiny_pipe, image, action=Action.REMOVE)
    change = _edit(tiny_pipe, image, action=Action.CHANGE)
    assert np.array_equal(seen[0], image)  # 64x64 needs neither shrink nor padding
    assert np.array_equal(seen[1], change.styled)


def test_long_instruction_is_truncated_with_a_warning(tiny_pipe):
    with pytest.warns(EditWarning, match="truncated"):
        result = tiny_pipe.edit(smooth_image(64, 64), "make it red " * 40, tiny_pipe.default_config.replace(steps=1))
    assert result.instruction_truncated and len(result.notes) == 1 and "truncated" in result.notes[0]


def test_the_stages_say_what_they_take_instead_of_failing_inside_torch(tiny_pipe):
    """prepare / denoise / finish are public (edit_batch's stages): their inputs are checked as edit's are."""
    config = tiny_pipe.default_config.replace(steps=1)
    prepared, other, third = (tiny_pipe.prepare(smooth_image(64, 64), INSTRUCTION, config.replace(seed=seed))
                              for seed in (0, 1, 2))
    (latents,) = tiny_pipe.denoise([prepared])
    (third_latents,) = tiny_pipe.denoise([third])
    cases = [
        (lambda: tiny_pipe.denoise([prepared], progress="no"), "progress must be True or False"),
        (lambda: tiny_pipe.denoise([]), "denoise takes a non-empty list of the PreparedEdits"),
        # By type, not the values: an image's array filled the message.
        (lambda: tiny_pipe.denoise([prepared.original]), r"PreparedEdits prepare\(\) returns, got \[ndarray\]$"),
        (lambda: tiny_pipe.denoise(prepared), "returns, got a PreparedEdit$"),
        (lambda: tiny_pipe.edit_batch([prepared.original, "x"]), r"got \[ndarray, str\]$"),
        (lambda: tiny_pipe.edit_batch(prepared.original), "got a ndarray$"),
        (lambda: tiny_pipe.finish(prepared, None), r"a tensor of shape \(1, 4, 8, 8\); got NoneType"),
        (lambda: tiny_pipe.finish(prepared, latents[..., :4]), r"got \(1, 4, 8, 4\)"),
        (lambda: tiny_pipe.finish(other, latents), "this edit was not denoised"),  # said "no attention recorded"
        # Another edit's latents made an image of one edit's masks over the other's styled image, unsaid.
        (lambda: tiny_pipe.finish(prepared, third_latents), "not the latents denoise\\(\\) returned for this edit"),
        (lambda: tiny_pipe.finish(prepared, latents, progress="no"), "progress must be True or False"),
        (lambda: tiny_pipe.finish(latents, latents), "finish takes the PreparedEdit prepare"),
    ]
    for call, words in cases:
        with pytest.raises(ConfigError, match=words):
            call()
    first, again = (tiny_pipe.finish(prepared, z) for z in (latents, latents.clone()))  # a copy, by its values
    # A REPL shows an edit by its arrays' shapes, not their pixels.
    assert "image=<ndarray uint8 (64, 64, 3)>" in repr(first) and "used_fallback=" in repr(first)
    assert "original=<ndarray uint8 (64, 64, 3)>" in repr(prepared) and "tensor(" not in repr(prepared)
    assert repr(EditRequest(prepared.original, "x")) == ("EditRequest(image=<ndarray uint8 (64, 64, 3)>, "
                                                         "instruction='x', config=None, cancel=None)")
    assert repr(tiny_pipe) == ("ZonePipeline(device=cpu, dtype=torch.float32, denoiser='fused', "
                               "segmenter='torch', sam_dtype=torch.float32)")
    assert repr(ZonePipeline(tiny_pipe.models, "cpu", denoiser="eager", sam_precision="bf16")) == (
        "ZonePipeline(device=cpu, dtype=torch.float32, denoiser='eager', segmenter='torch', "
        "sam_dtype=torch.bfloat16)")  # SAM's own precision, not the UNets'
    # compile is fused's class, compiled: its name was said as FusedDualDenoiser; an instance by its class.
    assert "denoiser='compile'," in repr(ZonePipeline(tiny_pipe.models, "cpu", denoiser="COMPILE"))
    models = tiny_pipe.models
    instance = SequentialDenoiser(models.ip2p_unet, models.mb_unet, models.scheduler_config)
    assert "denoiser='SequentialDenoiser'," in repr(ZonePipeline(models, "cpu", denoiser=instance))
    assert np.array_equal(first.image, again.image) and first.image.shape == (64, 64, 3)
    # Each finish times its own stages: they were added into the PreparedEdit's stopwatch, the second's doubled.
    assert set(prepared.watch.seconds) == {"text", "action", "vae_encode", "denoise"}


def test_a_setup_warning_points_at_the_callers_line(tiny_models, monkeypatch):
    """It pointed into pipeline.py, where a filter by module or the once-per-place rule never saw the caller."""
    monkeypatch.setenv("ZONE_DISABLE_TRITON", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ZonePipeline(tiny_models, device="cpu", kernels="triton", group_norm="triton")
    said = [(w.filename, str(w.message).split(" cannot")[0]) for w in caught if "cannot run" in str(w.message)]
    assert said == [(__file__, "--group-norm triton (group_norm='triton')"),
                    (__file__, "--kernels triton (kernels='triton')")]


def test_backend_names_are_read_in_any_case_as_device_and_dtype_are(tiny_models):
    from zone_engine.dual_step import FusedDualDenoiser

    pipe = ZonePipeline(tiny_models, device="CPU", dtype="FP32", denoiser="Fused", segmenter="TORCH", kernels="Auto",
                        attention="SDPA", sam_precision="FP32", group_norm="Torch")
    assert isinstance(pipe.denoiser, FusedDualDenoiser) and pipe.group_norms == {"unets": "pytorch", "vae": "pytorch"}
    with pytest.raises(ConfigError, match="unknown denoiser backend 'fusd'"):
        ZonePipeline(tiny_models, device="cpu", denoiser="Fusd")


def test_unknown_localization_kernels_are_refused_before_the_models_move(tiny_models, monkeypatch):
    """Checked with the other backend names: it was said only after the weights had moved and the denoiser was
    built (seconds for the real models on a GPU)."""
    monkeypatch.setattr(type(tiny_models), "to", lambda *args: pytest.fail("the models moved first"))
    with pytest.raises(ConfigError, match="unknown localization kernels 'cuda': available auto, torch, triton"):
        ZonePipeline(tiny_models, device="cpu", kernels="CUDA")


def test_a_default_config_is_checked_when_given_or_set(tiny_models):
    pipe = ZonePipeline.tiny(default_config=EditConfig(steps=2))  # was: "got multiple values for default_config"
    assert pipe.default_config == EditConfig(steps=2)
    with pytest.raises(ConfigError, match="default_config must be an EditConfig"):
        pipe.default_config = {"steps": 2}  # was accepted, and failed inside the next edit
    assert pipe.default_config == EditConfig(steps=2)


@pytest.mark.parametrize("denoiser", ["eager", "fused"])
def test_an_edit_runs_where_deprecation_warnings_are_errors(tiny_models, denoiser):
    """diffusers' set_timesteps hands NumPy 2 a tensor: its DeprecationWarning failed the first edit at each step
    count under -W error (or pytest's filterwarnings = error). A pipeline of its own: no schedule cached yet."""
    pipe = ZonePipeline(tiny_models, device="cpu", denoiser=denoiser)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        pipe.edit(smooth_image(64, 64), INSTRUCTION, EditConfig(steps=2, sam=SamConfig.for_random_weights()))


def test_a_long_instruction_is_said_by_the_engine_not_also_by_transformers(capfd):
    """transformers printed that the ids were too long "for the model" and "will result in indexing errors":
    false (the model sees them truncated) and alarming, beside the engine's own EditWarning."""
    from zone_engine.models import build_tiny_tokenizer
    from zone_engine.text import MAX_TOKENS, count_tokens

    tokenizer = build_tiny_tokenizer()
    assert count_tokens(tokenizer, "make it red " * 40) == (MAX_TOKENS, True)
    # The boundary: 75 words and the start and end tokens fill CLIP's 77 exactly; one word more is cut.
    assert count_tokens(tokenizer, " ".join(["a"] * 75)) == (MAX_TOKENS, False)
    assert count_tokens(tokenizer, " ".join(["a"] * 76)) == (MAX_TOKENS, True)
    # The flag transformers sets when it prints the line (its handler may hold a stderr capfd does not see).
    assert not tokenizer.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_what_an_edit_did_not_take_as_given_is_in_its_notes_and_each_warned_once(tiny_pipe):
    """A server reports the notes with their request (and silences the process-wide warnings)."""
    rgba = np.dstack([smooth_image(12, 300), np.full((12, 300), 128, np.uint8)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tiny_pipe.edit(rgba, INSTRUCTION, tiny_pipe.default_config.replace(steps=1))
    assert len(result.notes) == 2 and result.notes[0].startswith("the given array has transparency")
    assert result.notes[1].startswith("the image is 300x12, its short side under one")  # not said twice
    assert [str(warning.message) for warning in caught if warning.category is EditWarning] == list(result.notes)
    plain = tiny_pipe.edit(smooth_image(64, 64), INSTRUCTION, tiny_pipe.default_config.replace(steps=1))
    assert plain.notes == ()


@pytest.mark.parametrize(("changes", "why"), [
    ({"min_region_area": 64 * 64 + 1}, "M_b, the edit mask, is empty"),  # the tiny models' M_b is one region
    ({"fft_threshold": 255}, "the styled image differs from the input nowhere past fft_threshold"),
])
def test_an_edit_that_changed_nothing_says_so(tiny_pipe, changes, why):
    """The input came back as it was, with nothing in the result saying why."""
    image = smooth_image(64, 64, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _edit(tiny_pipe, image, **changes)
    assert np.array_equal(result.image, image) and not result.region.any()
    assert len(result.notes) == 1 and result.notes[0].startswith(f"nothing was edited, the output is the input: {why}")
    assert [str(warning.message) for warning in caught if warning.category is EditWarning] == list(result.notes)


def test_an_edit_of_part_of_the_image_says_nothing_of_it(tiny_pipe):
    """The note is for an empty region alone: one that covers part of the image (the tiny models' edit, past a
    high fft_threshold) is a plain edit."""
    result = _edit(tiny_pipe, smooth_image(64, 64, seed=4), fft_threshold=120)
    assert 0 < result.region.mean() < 1 and result.notes == ()


@pytest.mark.parametrize("size, coarse", [((8, 3000), True), ((20, 20), True), ((33, 130), False), ((64, 64), False)])
def test_an_image_under_one_attention_cell_is_edited_with_a_warning(tiny_pipe, size, coarse):
    """ZONE locates the edit on 32-pixel cells: a short side under one at the working size (8 x 3000 becomes
    1 x 512) is said; the edit still runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tiny_pipe.edit(smooth_image(*size), INSTRUCTION, tiny_pipe.default_config.replace(steps=1))
    said = [str(warning.message) for warning in caught if "32-pixel cell" in str(warning.message)]
    assert len(said) == coarse and result.image.shape == (*size, 3)
    if coarse:
        assert said[0].startswith(f"the image is {size[1]}x{size[0]}")
        assert ("(512x1 at the working size)" in said[0]) == (size == (8, 3000))


def test_fp16_vae_overflow_is_decoded_again_in_fp32(tiny_models, monkeypatch):
    """SD's VAE overflows in fp16; the decode must come back finite (simulated: fp16 decode returns inf),
    and the VAE itself stays as it was, weights and all (its CUDA graphs point at them)."""
    from zone_engine.pipeline import decode_latents

    # A copy: the session's VAE, rounded to fp16 and back, changed the edits of every test after this one.
    vae = copy.deepcopy(tiny_models.vae)
    original = type(vae).decode

    def overflowing(self, latents, return_dict=False):  # on the class: the fp32 copy runs it too
        out = original(self, latents, return_dict=False)[0]
        if next(self.parameters()).dtype == torch.float16:
            out = torch.full_like(out, float("inf"))
        return (out,)

    monkeypatch.setattr(type(vae), "decode", overflowing)
    vae.to(torch.float16)
    try:
        weights = [parameter.data_ptr() for parameter in vae.parameters()]
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        pixels = decode_latents(vae, latents.half())
        assert torch.isfinite(pixels).all()
        assert [parameter.data_ptr() for parameter in vae.parameters()] == weights
        assert all(parameter.dtype == torch.float16 for parameter in vae.parameters())
    finally:
        vae.to(torch.float32)
    expected = decode_latents(vae, latents)
    assert (pixels - expected).abs().max().item() <= 1e-3  # fp16 latents in, fp32 decoder


# These edits run on the CPU, where Triton runs only under TRITON_INTERPRET=1 (as CI runs the suite); compiled on
# CUDA the kernels would fall back to torch here, and a test would compare torch with torch.
TRITON_ON_THE_CPU = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="Triton runs on the CPU only under TRITON_INTERPRET=1")


def test_an_edit_denoised_before_is_refused_until_restarted(tiny_pipe):
    """Denoised again after a stop, an edit's attention record mixed both runs (about 3% off), silently."""
    config = tiny_pipe.default_config.replace(steps=3)
    edit = tiny_pipe.prepare(smooth_image(64, 64, seed=3), INSTRUCTION, config)
    # A stop that cannot be called is refused before any step (it was a TypeError after the first), edit untouched.
    with pytest.raises(ConfigError, match=r"stop must be a function of no arguments .* got str: e.g. stop=event"):
        tiny_pipe.denoise([edit], stop="x")
    with pytest.raises(EditCancelled):
        tiny_pipe.denoise([edit], stop=iter([False, True]).__next__)  # after the first step
    with pytest.raises(ConfigError, match=r"denoised before .* pass edit.restart\(\)"):
        tiny_pipe.denoise([edit])
    (again,) = tiny_pipe.denoise([restarted := edit.restart()])
    # The stopped edit with its restart's latents: "not denoised by this pipeline", which had denoised it.
    with pytest.raises(ConfigError, match=r"did not end \(it stopped part way.* finish the edit you denoised"):
        tiny_pipe.finish(edit, again)
    clean = tiny_pipe.prepare(smooth_image(64, 64, seed=3), INSTRUCTION, config)
    (expected,) = tiny_pipe.denoise([clean])
    assert torch.equal(again, expected) and torch.equal(restarted.attention.total, clean.attention.total)


def test_a_stop_that_needs_arguments_or_answers_no_bool_is_refused(tiny_pipe):
    """One that needs arguments was a TypeError after the first step's work; `lambda: event` for `event.is_set`, an
    unset Event, truthy, stopped every edit at its first step as if cancelled."""
    edit = tiny_pipe.prepare(smooth_image(64, 64), INSTRUCTION, tiny_pipe.default_config.replace(steps=1))
    with pytest.raises(ConfigError, match=r"stop is called with no arguments, and .*lambda.* needs some"):
        tiny_pipe.denoise([edit], stop=lambda request: False)
    assert edit.attention.total is None  # refused before any step
    with pytest.raises(ConfigError, match=r"stop must return True or False, got an Event: .*not lambda: event"):
        tiny_pipe.denoise([edit], stop=lambda: threading.Event())
    assert edit.attention.total is None  # its answer asked before any step: said then, the edit untouched
    with pytest.raises(EditCancelled, match="before denoising"):  # numpy's bool (`(mask > 0).any()`) is a bool too
        tiny_pipe.denoise([edit], stop=lambda: np.bool_(True))
    assert edit.attention.total is None  # a stop already set: no step done, no restart() needed
    tiny_pipe.denoise([edit], stop=lambda: None)  # None: go on
    tiny_pipe.denoise([edit.restart()], stop=bool)  # a builtin without a signature is called as it is: bool() is False


def test_a_second_pipeline_may_not_change_the_models_another_one_holds():
    """A pipeline moves, casts and lays out its models in place: a second one over the same models with other
    settings silently changed the first one's layout (its output moved by a level; on CUDA its graphs would read
    freed memory). Same settings, a deep copy, or the first one gone: allowed."""
    first = ZonePipeline.tiny()
    with pytest.raises(ConfigError, match=r"in use by another ZonePipeline \(cpu, torch.float32, UNets contiguous"):
        ZonePipeline(first.models, device="cpu", channels_last=True)
    assert first.models.ip2p_unet.conv_in.weight.is_contiguous()  # untouched
    ZonePipeline(first.models, device="cpu")
    ZonePipeline(copy.deepcopy(first.models), device="cpu", channels_last=True)
    with pytest.raises(ConfigError, match="in use by another ZonePipeline"):  # the second one, gone, was the latest
        ZonePipeline(first.models, device="cpu", channels_last=True)
    assert first.models.ip2p_unet.conv_in.weight.is_contiguous()
    models = first.models
    first.itself = first  # now only a reference cycle keeps it: no holder (the check collects it)
    del first
    second = ZonePipeline(models, device="cpu", channels_last=True)
    # Checked against the live one's settings, not the first's (from a mutation audit: they were never updated).
    with pytest.raises(ConfigError, match=r"in use by another ZonePipeline \(cpu, torch.float32, UNets channels-last"):
        ZonePipeline(models, device="cpu")
    assert second.models is models


def test_an_edit_prepared_over_other_models_is_refused(tiny_pipe):
    """Another pipeline's UNets denoised an edit's text embedding and image latents silently (a wrong edit; on
    another device a torch error); a pipeline over the same models may take it."""
    config = tiny_pipe.default_config.replace(steps=1)
    edit = tiny_pipe.prepare(smooth_image(64, 64), INSTRUCTION, config)
    with pytest.raises(ConfigError, match=r"prepared by a pipeline over other models: .* prepare it with this"):
        ZonePipeline(copy.deepcopy(tiny_pipe.models), default_config=config).denoise([edit])
    assert edit.attention.total is None  # untouched: refused before any step
    same_models = ZonePipeline(tiny_pipe.models, denoiser=tiny_pipe.denoiser, default_config=config)
    (latents,) = same_models.denoise([edit.restart()])
    assert latents.shape == edit.inputs.noise.shape

@TRITON_ON_THE_CPU
def test_triton_localization_kernels_give_the_same_edit(tiny_models, monkeypatch):
    import zone_kernels.attn_accumulate as attn_module
    import zone_kernels.mask_binarize as binarize_module

    assert attn_module.runs_on(torch.device("cpu"))  # kernel 2 shares its rule (kernels/runtime.py)
    image = smooth_image(64, 96, seed=6)
    config = EditConfig(steps=2, sam=SamConfig.for_random_weights())
    torch_path = ZonePipeline(tiny_models, device="cpu", kernels="torch").edit(image, INSTRUCTION, config)
    launches = spy_calls(monkeypatch, attn_module, "_launch")
    binarized = spy_calls(monkeypatch, binarize_module, "_launch")
    triton_path = ZonePipeline(tiny_models, device="cpu", kernels="triton").edit(image, INSTRUCTION, config)
    assert launches and binarized == ["_launch"]  # the kernels ran, not their torch fallbacks
    assert np.array_equal(torch_path.mask_b, triton_path.mask_b)
    assert np.array_equal(torch_path.image, triton_path.image)


@TRITON_ON_THE_CPU
def test_the_group_norm_kernel_runs_every_unet_and_vae_norm_and_keeps_the_edit(tiny_models, monkeypatch):
    """--group-norm triton: each of the UNets' and the VAE's GroupNorms goes through kernel 3 (counted),
    and the edit is PyTorch's up to fp32 rounding: pixels within one level, the same M_b."""
    import zone_kernels.group_norm as norm_module

    image = smooth_image(64, 64, seed=6)
    config = EditConfig(steps=1, sam=SamConfig.for_random_weights())
    expected = ZonePipeline(tiny_models, device="cpu", group_norm="torch").edit(image, INSTRUCTION, config)
    launches = spy_calls(monkeypatch, norm_module, "_launch")
    result = ZonePipeline(tiny_models, device="cpu", group_norm="triton").edit(image, INSTRUCTION, config)

    def norms(*modules):
        return sum(isinstance(m, torch.nn.GroupNorm) for module in modules for m in module.modules())

    vae = tiny_models.vae
    assert len(launches) == norms(tiny_models.ip2p_unet, tiny_models.mb_unet) + norms(vae.encoder, vae.decoder)
    assert np.array_equal(result.mask_b, expected.mask_b)
    assert np.abs(result.image.astype(int) - expected.image).max() <= 1
    assert not any("forward" in vars(m) for m in vae.modules())  # the scope ended with the edit


@pytest.mark.parametrize("kind, device, denoiser, captured, unets, vae", [
    ("auto", "cpu", "fused", False, False, False),
    ("auto", "cuda", "fused", True, True, True),
    ("auto", "cuda", "compile", True, False, True),  # inductor generates its own fused norm for the step
    ("auto", "cuda", "eager", False, False, False),  # the plain reference
    ("auto", "cuda", "eager", True, False, False),  # the reference's, whatever a caller says of graphs
    ("auto", "cuda", "tensorrt", True, False, True),
    # Uncaptured (--no-cuda-graphs), the kernel's launches cost more host time than its device time saves.
    ("auto", "cuda", "fused", False, False, False),
    ("auto", "cuda", "tensorrt", False, False, False),
    ("triton", "cpu", "fused", False, True, True),
    ("triton", "cpu", "compile", False, True, True),
    ("triton", "cpu", "eager", False, False, True),
    ("triton", "cuda", "fused", False, True, True),  # asked for: run even uncaptured
    ("torch", "cuda", "fused", True, False, False),
])
def test_group_norm_option_decides_where_the_kernel_runs(kind, device, denoiser, captured, unets, vae, monkeypatch):
    import zone_kernels.group_norm as norm_module
    from zone_engine.backends import make_group_norms

    monkeypatch.setattr(norm_module, "runs_on", lambda device: True)  # as on a GPU machine
    scopes = make_group_norms(kind, torch.device(device), denoiser, captured)
    assert [scope is norm_module.triton_group_norms for scope in scopes] == [unets, vae]


@pytest.mark.parametrize(("capability", "dtype", "sam", "said"), [
    ((7, 5), torch.bfloat16, torch.float32, "--dtype bf16 (dtype='bf16') on Tesla T4 (compute capability 7.5)"),
    ((7, 5), torch.float16, torch.bfloat16, "--sam-precision bf16 (sam_precision='bf16') on Tesla T4"),
    ((7, 5), torch.bfloat16, torch.bfloat16, "--dtype bf16 (dtype='bf16') and --sam-precision bf16"),
    ((7, 5), torch.float16, torch.float16, None),  # fp16: what a T4 runs natively
    ((8, 0), torch.bfloat16, torch.bfloat16, None),  # an A100 has bf16 units
])
def test_bf16_asked_of_a_gpu_without_bf16_units_says_fp16_is_faster(capability, dtype, sam, said, monkeypatch):
    from zone_engine.backends import warn_if_bf16_is_emulated

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_bf16_is_emulated(torch.device("cuda"), dtype, sam)
    messages = [str(warning.message) for warning in caught]
    if said is None:
        assert messages == []
    else:
        assert len(messages) == 1 and said in messages[0]
        assert messages[0].endswith("which has no bf16 units: it is emulated, slower than fp16 there; use fp16 instead")


def test_the_pipeline_asks_whether_its_bf16_is_emulated(tiny_models, monkeypatch):
    import zone_engine.pipeline as pipeline_module

    seen = []
    monkeypatch.setattr(pipeline_module, "warn_if_bf16_is_emulated", lambda *args: seen.append(args))
    pipeline_module.ZonePipeline(tiny_models, device="cpu", sam_precision="bf16")
    assert seen == [(torch.device("cpu"), torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("cuda_graphs", [None, False])
def test_the_pipeline_tells_make_group_norms_whether_it_captures(cuda_graphs, tiny_models, monkeypatch):
    """Resolved (uses_cuda_graphs, as on CUDA: None is on), not the raw option: auto's kernel 3 rests on it."""
    import zone_engine.pipeline as pipeline_module
    from zone_engine.backends import make_group_norms

    seen = []

    def recording(kind, device, denoiser, captured):
        seen.append(captured)
        return make_group_norms(kind, torch.device("cpu"), denoiser, captured)

    monkeypatch.setattr(pipeline_module, "make_group_norms", recording)
    monkeypatch.setattr("zone_engine.backends.uses_cuda_graphs", lambda device, option: option is not False)
    pipeline_module.ZonePipeline(tiny_models, device="cpu", group_norm="triton", cuda_graphs=cuda_graphs)
    assert seen == [cuda_graphs is not False]


def test_group_norm_option_errors(tiny_models, monkeypatch):
    from zone_engine.backends import make_denoiser, make_group_norms
    from zone_engine.models import pytorch_norms

    with pytest.raises(ConfigError, match="unknown GroupNorm implementation 'apex': available auto, torch, triton"):
        ZonePipeline(tiny_models, device="cpu", group_norm="apex")
    denoiser = make_denoiser(tiny_models, "fused", torch.device("cpu"))
    from zone_kernels.group_norm import triton_group_norms

    with pytest.raises(ConfigError, match="a Denoiser instance comes configured"):
        make_denoiser(tiny_models, denoiser, torch.device("cpu"), norms=triton_group_norms)
    monkeypatch.setenv("ZONE_DISABLE_TRITON", "1")
    with pytest.warns(UserWarning, match="--group-norm triton .*cannot run on cpu here.*PyTorch's GroupNorm runs"):
        make_group_norms("triton", torch.device("cpu"), "fused", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto where the kernel cannot run: PyTorch's, without a word
        assert make_group_norms("auto", torch.device("cuda"), "fused", True) == (pytorch_norms, pytorch_norms)


def test_threads_sharing_a_pipeline_get_the_edits_they_would_get_alone(tiny_pipe):
    """The VAE, the denoiser's buffers and SAM's predictor hold one edit's state at a time: threads take turns."""
    from concurrent.futures import ThreadPoolExecutor

    config = EditConfig(steps=2, sam=SamConfig.for_random_weights())
    images = [smooth_image(64, 64, seed=seed) for seed in range(4)]
    alone = [tiny_pipe.edit(image, INSTRUCTION, config) for image in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda image: tiny_pipe.edit(image, INSTRUCTION, config), images))
    for expected, result in zip(alone, together, strict=True):
        assert np.array_equal(expected.mask_f, result.mask_f) and np.array_equal(expected.image, result.image)


def test_pipelines_over_the_same_models_take_turns(tiny_pipe):
    """An edit swaps its recording processors into the shared UNet while it denoises: two pipelines over the same
    models editing from two threads mixed their attention records (every run, wrong masks). They share the lock:
    the second one's stages wait while the first one denoises."""
    other = ZonePipeline(tiny_pipe.models, denoiser=tiny_pipe.denoiser, default_config=tiny_pipe.default_config)
    edit = tiny_pipe.prepare(smooth_image(64, 64), INSTRUCTION, tiny_pipe.default_config.replace(steps=1))
    waiting = threading.Thread(target=other.empty_prompt)  # a stage, at once when the lock is free
    finished_while_denoising = []

    def stop() -> bool:
        if not finished_while_denoising:  # asked before the first step
            waiting.start()
            waiting.join(timeout=2)
            finished_while_denoising.append(not waiting.is_alive())
        return False

    tiny_pipe.denoise([edit], stop=stop)
    waiting.join()
    assert finished_while_denoising == [False]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (a pipeline on cuda:1)")
def test_a_pipeline_on_the_second_gpu_runs_there_while_the_first_is_current(tiny_models):
    """Streams, CUDA graphs and Triton launch on the current device: the pipeline makes its own current
    (copies: a pipeline moves its models in place)."""
    image, config = smooth_image(64, 64, seed=2), EditConfig(steps=2, sam=SamConfig.for_random_weights())
    first = ZonePipeline(copy.deepcopy(tiny_models), device="cuda:0").edit(image, INSTRUCTION, config)
    assert torch.cuda.current_device() == 0
    second = ZonePipeline(copy.deepcopy(tiny_models), device="cuda:1").edit(image, INSTRUCTION, config)
    assert torch.cuda.current_device() == 0
    assert np.array_equal(first.mask_b, second.mask_b)
    assert np.abs(first.image.astype(int) - second.image.astype(int)).max() <= 1  # same GPU model, same kernels


def test_the_empty_prompt_is_encoded_once_per_pipeline(tiny_pipe):
    """Its embedding does not depend on the instruction: later edits encode c_T alone, same context."""
    from zone_engine.text import encode_instruction, padded_ids

    models = tiny_pipe.models
    empty_ids = padded_ids(models.tokenizer, [""], tiny_pipe.device)[0]
    encoded: list[bool] = []  # per text-encoder call: was it the empty prompt?
    hook = models.text_encoder.register_forward_pre_hook(
        lambda _module, args: encoded.append(torch.equal(args[0], empty_ids)))
    try:
        tiny_pipe.prepare(smooth_image(64, 64), "make the dog a golden statue")
        encoded.clear()
        prepared = tiny_pipe.prepare(smooth_image(64, 64), "add a hat")
        assert encoded and not any(encoded)  # c_T (and the action classifier's c_T), never "" again
    finally:
        hook.remove()
    fresh = encode_instruction(models.tokenizer, models.text_encoder, "add a hat")  # encodes "" itself
    assert torch.equal(prepared.encoded.context, fresh.context)


def test_channels_last_converts_the_convolutions_and_keeps_the_edit(tiny_pipe):
    """NHWC is a layout, not other math: the same edit up to the convolution kernels' summation order
    (oneDNN's NHWC and NCHW kernels: latents within ~1e-6, so pixels within one level, M_b the same)."""
    nhwc = ZonePipeline.tiny(seed=0, channels_last=True)  # its own models: tiny_pipe's stay contiguous
    def kernels(pipe):  # every convolution weight of both UNets and the VAE
        nets = (pipe.models.ip2p_unet, pipe.models.mb_unet, pipe.models.vae)
        return [p for net in nets for p in net.parameters() if p.ndim == 4 and p.shape[-1] > 1]

    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels(nhwc))
    assert not any(p.is_contiguous(memory_format=torch.channels_last) for p in kernels(tiny_pipe))
    image = smooth_image(64, 96, seed=8)
    expected, result = _edit(tiny_pipe, image), _edit(nhwc, image)
    assert np.array_equal(result.mask_b, expected.mask_b)
    assert np.abs(result.styled.astype(int) - expected.styled).max() <= 1
    assert np.abs(result.image.astype(int) - expected.image).max() <= 1


def test_uint8_conversion_rounds_as_diffusers_numpy_to_pil():
    from zone_engine.pipeline import to_uint8_image

    pixels = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(3))
    pixels[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 1.0])  # ties: half to even
    expected = (pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
    got = to_uint8_image(pixels)
    assert got.dtype == np.uint8 and got.shape == (37, 53, 3) and np.array_equal(got, expected)


@pytest.mark.parametrize(("action", "beta"), [(Action.REMOVE, 0.2), (Action.ADD, 0.01)])
def test_an_edit_localizes_at_its_last_token_and_blends_with_its_actions_beta(tiny_pipe, monkeypatch, action, beta):
    """ZONE.md: M_b from tokens 0 and L-1 (L counting the start and end tokens); beta 0.2 for REMOVE, 0.01
    otherwise, reaching the denoiser."""
    from zone_engine import pipeline

    seen = {}
    real_localize, denoiser_class = pipeline.localize, type(tiny_pipe.denoiser)
    real_call = denoiser_class.__call__

    def localize(average, grid, last_token, *args, **kwargs):
        seen["last_token"] = last_token
        return real_localize(average, grid, last_token, *args, **kwargs)

    def call(self, inputs, config, beta, *args, **kwargs):
        seen["beta"] = beta
        return real_call(self, inputs, config, beta, *args, **kwargs)

    monkeypatch.setattr(pipeline, "localize", localize)
    monkeypatch.setattr(denoiser_class, "__call__", call)
    instruction = "put a red hat on the house"
    tiny_pipe.edit(smooth_image(64, 64), instruction, tiny_pipe.default_config.replace(steps=1, action=action))
    assert seen == {"last_token": len(tiny_pipe.models.tokenizer(instruction).input_ids) - 1, "beta": beta}


def test_the_heatmap_is_drawn_over_the_input(tiny_pipe, monkeypatch):
    """Over I_G, where the user sees what the instruction pointed at (not over I_sty, which the edit changed)."""
    from zone_engine import pipeline

    drawn_over, real = [], pipeline.heatmap_overlay
    monkeypatch.setattr(pipeline, "heatmap_overlay", lambda image, difference: drawn_over.append(image) or real(
        image, difference))
    image = smooth_image(64, 64, seed=4)  # a multiple of 32: the working canvas is the input itself
    result = _edit(tiny_pipe, image)
    np.testing.assert_array_equal(drawn_over[0], image)
    assert not np.array_equal(result.styled, image)  # so drawing over I_sty would show


@pytest.mark.parametrize("size", [(64, 96), (1000, 90)])
@pytest.mark.parametrize("rule", ["reference", "paper"])
def test_the_difference_thresholded_is_m_b(tiny_pipe, size, rule):
    """d, the levels M_b thresholds (the reference's crossattn_diff.png), at the input size: the heatmap alone
    (d blended with the image) did not let a researcher see or re-threshold it. Random weights' d is low
    everywhere, so the thresholds are d's own levels (the defaults would make M_b the whole image); 1000x90 is shrunk
    to the working size and enlarged back."""
    from zone_engine.localize import threshold_difference

    image = smooth_image(*size, seed=3)
    levels = np.unique(_edit(tiny_pipe, image, seed=3).difference)  # the thresholds leave d as it is
    assert len(levels) > 1
    # d <= the second highest level (reference: min(2d, 255) <= 2 of it), d < the second lowest (paper).
    threshold = min(2 * int(levels[-2]), 255) if rule == "reference" else int(levels[1])
    config = {"reference_threshold" if rule == "reference" else "paper_threshold": threshold}
    result = _edit(tiny_pipe, image, seed=3, threshold_rule=rule, min_region_area=0, **config)
    assert result.difference.shape == size and result.difference.dtype == np.uint8
    assert 0 < result.mask_b.mean() < 1
    np.testing.assert_array_equal(threshold_difference(result.difference, rule, threshold, threshold), result.mask_b)


def test_the_difference_is_enlarged_as_the_masks_are(tiny_pipe, monkeypatch):
    """Random weights' d changes by a level from pixel to pixel, where a bicubic enlargement rounds to the nearest
    one's level too (from a mutation audit: it passed the test above). Stripes a pixel wide at the working size: the
    levels at the input size are d's own, and the threshold of them is M_b."""

    def stripes(average, grid, last_token, size, **thresholds):
        difference = np.zeros(size, np.uint8)
        difference[:, ::2] = 200
        return difference < 128, difference

    monkeypatch.setattr(tiny_pipe, "binarize", stripes)
    result = _edit(tiny_pipe, smooth_image(1000, 90, seed=3), min_region_area=0)  # shrunk, enlarged back
    assert result.difference.shape == (1000, 90) and np.unique(result.difference).tolist() == [0, 200]
    np.testing.assert_array_equal(result.difference < 128, result.mask_b)


def test_a_stopwatch_adds_up_a_stage_timed_twice_and_its_copy_goes_on_apart(monkeypatch):
    ticks = iter([0.0, 2.0, 10.0, 13.0, 20.0, 24.0])  # perf_counter at each stage's start and end
    monkeypatch.setattr("zone_engine.timing.time.perf_counter", lambda: next(ticks))
    watch = Stopwatch(torch.device("cpu"))
    for _ in range(2):
        with watch("denoise"):
            pass
    later = watch.copy()
    with later("denoise"):
        pass
    assert watch.seconds == {"denoise": 5.0} and later.seconds == {"denoise": 9.0}


def test_a_stage_that_raises_is_still_timed(monkeypatch):
    """A failed or cancelled edit's timings still say where its time went: the stage counts its seconds on the
    way out of an exception too."""
    ticks = iter([0.0, 3.0])
    monkeypatch.setattr("zone_engine.timing.time.perf_counter", lambda: next(ticks))
    watch = Stopwatch(torch.device("cpu"))
    with pytest.raises(EditCancelled), watch("denoise"):
        raise EditCancelled("stopped")
    assert watch.seconds == {"denoise": 3.0}


def test_a_short_side_of_exactly_one_attention_cell_is_not_coarse():
    """The note is for a short side *under* one 32-pixel cell (ZONE locates the edit on those cells): 32 pixels
    is one whole cell, and an image of that size must not be told its edit will be coarse."""
    from zone_engine.image_io import working_geometry
    from zone_engine.localize import ATTENTION_CELL
    from zone_engine.pipeline import _coarse_grid_note

    config = EditConfig()

    def note(height, width):
        return _coarse_grid_note(working_geometry(height, width, config.max_side, config.size_multiple))

    assert note(ATTENTION_CELL, 200) is None and note(200, ATTENTION_CELL) is None
    assert note(ATTENTION_CELL - 1, 200).startswith("the image is 200x31")


def test_the_configs_localization_settings_reach_m_b(tiny_pipe, monkeypatch):
    """threshold_rule, reference_threshold and paper_threshold reach the binarization, and min_region_area the
    small-region removal, each the edit's own: set to values whose M_b is known (every pixel, or none). The
    tiny models' attention is flat (d = 0), so the thresholds are also checked where they are handed on."""
    edit = tiny_pipe.prepare(smooth_image(64, 64, seed=2), INSTRUCTION, tiny_pipe.default_config.replace(steps=1))
    tiny_pipe.denoise([edit])
    handed, real_binarize = [], tiny_pipe.binarize

    def binarize(*args, **kwargs):
        handed.append(kwargs)
        return real_binarize(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe, "binarize", binarize)

    def mask_b(**changes):
        return tiny_pipe._localize(replace(edit, config=edit.config.replace(**changes))).mask_b

    assert mask_b(reference_threshold=255).all()  # min(2d, 255) <= 255 everywhere
    assert not mask_b(reference_threshold=255, min_region_area=64 * 64 + 1).any()  # its one region is too small
    assert not mask_b(threshold_rule="paper", paper_threshold=0).any()  # d < 0 nowhere
    assert [(given["rule"], given["reference_threshold"], given["paper_threshold"]) for given in handed] == [
        ("reference", 255, 128), ("reference", 255, 128), ("paper", 108, 0)]


def test_the_configs_blend_settings_and_d_reach_the_blend(tiny_pipe):
    """R is found inside D (M_f dilated, not M_f) with the config's fft_radius, fft_threshold and close_kernel,
    and the seam is mixed with its seam_alpha: each value is chosen so that a default in its place shows."""
    from zone_engine import blend
    from zone_engine.localize import Localization
    from zone_engine.refine import Refinement

    working = smooth_image(64, 64, seed=2)
    edit = tiny_pipe.prepare(working, INSTRUCTION, tiny_pipe.default_config.replace(steps=1))
    styled = working.copy()
    styled[16:48, 16:48] = 255 - styled[16:48, 16:48]
    fine, dilated = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    fine[22:42, 22:42], dilated[12:52, 12:52] = True, True
    located = Localization(mask_b=fine, difference=np.zeros((64, 64), np.uint8))
    refined = Refinement(mask_f=fine, dilated=dilated, iou=1.0, used_fallback=False, segment_count=1)

    def blended(**changes):
        return tiny_pipe._blend(replace(edit, config=edit.config.replace(**changes)), styled, located, refined)

    def region(inside=dilated, **settings):
        return blend.fft_edit_region(styled, working, inside, device=tiny_pipe.device, **settings)

    assert np.array_equal(blended()["region"], region())
    assert not np.array_equal(region(inside=fine), region())
    for name, setting, value in (("fft_radius", "radius", 3), ("fft_threshold", "threshold", 120),
                                 ("close_kernel", "close_kernel", 41)):
        expected = region(**{setting: value})
        assert not np.array_equal(expected, region()), name  # the value matters for this image
        assert np.array_equal(blended(**{name: value})["region"], expected), name
    whole = blended(seam_alpha=1.0)
    assert whole["seam"].any() and np.array_equal(whole["image"][whole["seam"]], styled[whole["seam"]])


def test_a_decoder_overflow_to_inf_comes_back_nan_not_a_plausible_pixel(tiny_models, monkeypatch):
    """decode_latents keeps a value that overflowed NaN: clamped, an inf became a plausible white pixel, and
    finish could not tell a diverged decode ("latents too large to decode") from an image."""
    from zone_engine.pipeline import decode_latents

    vae = tiny_models.vae
    original = type(vae).decode

    def overflowing(self, latents, return_dict=False):
        out = original(self, latents, return_dict=False)[0].clone()
        out[..., 0, 0], out[..., 0, 1] = float("inf"), -float("inf")
        return (out,)

    monkeypatch.setattr(type(vae), "decode", overflowing)
    pixels = decode_latents(vae, torch.zeros(1, 4, 8, 8))
    assert pixels[..., 0, :2].isnan().all() and torch.isfinite(pixels[..., 1:, :]).all()


def test_auto_localization_kernels_are_the_torch_reference_off_cuda():
    """kernels="auto" means Triton on CUDA only: elsewhere the plain torch reference runs (interpreted Triton on
    the CPU gives the same masks, far slower)."""
    from zone_engine.backends import make_localization_kernels
    from zone_engine.localize import accumulate_attention_probabilities, binarize_reference

    assert make_localization_kernels("auto", torch.device("cpu")) == (accumulate_attention_probabilities,
                                                                      binarize_reference)


def test_a_pipelines_segmenter_is_made_once_per_sam_config(tiny_pipe):
    """SAM's generator (its predictor and buffers) is built on first use and kept: one per SamConfig."""
    config = tiny_pipe.default_config.sam
    first = tiny_pipe.segmenter(config)
    assert tiny_pipe.segmenter(config) is first
    assert tiny_pipe.segmenter(config.replace(points_per_side=4)) is not first


def test_a_pipeline_kept_only_by_a_reference_cycle_holds_no_models_before_the_collector_runs(tiny_models):
    """The models' holder is looked up after collecting garbage: with automatic collection off (or simply not
    due yet), a dead pipeline that only a reference cycle keeps refused a second pipeline its models."""
    import gc

    first = ZonePipeline(copy.deepcopy(tiny_models), device="cpu")
    models = first.models
    first.itself = first
    gc.disable()
    try:
        del first
        ZonePipeline(models, device="cpu", channels_last=True)
    finally:
        gc.enable()


# --------------------------------------------------------------------------------------------------
# Each test below shown to fail on a one-line change to pipeline.py (a mutation audit).


def test_the_total_is_the_wall_time_from_prepare_to_finish(tiny_pipe, monkeypatch):
    """An edit's total counts from prepare to finish, waiting included (a batch's queue, the work between stages),
    not the sum of its stages: a stand-in clock says 1000 s passed."""
    from types import SimpleNamespace

    import zone_engine.pipeline

    clock = iter([0.0, 1000.0])
    monkeypatch.setattr(zone_engine.pipeline, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert _edit(tiny_pipe, smooth_image(64, 64)).timings["total"] == 1000.0


def test_the_eager_reference_replays_no_stage_from_a_cuda_graph(tiny_models, monkeypatch):
    """denoiser="eager" is the plain reference throughout: its text encoder and VAE run eagerly even where CUDA
    graphs are on (stood in for on the CPU), where the other denoisers' pipelines capture them."""
    from zone_engine.graphs import CapturedCalls, eager

    monkeypatch.setattr("zone_engine.backends.uses_cuda_graphs", lambda device, cuda_graphs: True)
    assert ZonePipeline(tiny_models, device="cpu", denoiser="eager").run is eager
    assert isinstance(ZonePipeline(tiny_models, device="cpu").run, CapturedCalls)


def test_prepare_makes_the_denoisers_inputs_in_the_pipelines_dtype(tiny_models, monkeypatch):
    """In half precision the image latents and the initial noise are made in the pipeline's dtype, as the UNets
    take them (bf16 stood in for on the CPU, where the engine offers fp32 only)."""
    import zone_engine.pipeline

    monkeypatch.setattr(zone_engine.pipeline, "resolve_dtype", lambda dtype, device: torch.bfloat16)
    pipe = ZonePipeline(copy.deepcopy(tiny_models), device="cpu", denoiser="eager")
    edit = pipe.prepare(smooth_image(64, 64), INSTRUCTION, pipe.default_config.replace(action=Action.CHANGE))
    inputs = edit.inputs
    assert inputs.noise.dtype == inputs.image_latents.dtype == inputs.context.dtype == torch.bfloat16


def test_from_pretrained_refuses_an_unknown_backend_before_any_checkpoint_loads(monkeypatch):
    """Loading the real checkpoints takes minutes: a misspelt backend is said before, not by the constructor after."""
    monkeypatch.setattr("zone_engine.pipeline.load_pretrained", lambda *a, **k: pytest.fail("loaded checkpoints"))
    with pytest.raises(ConfigError, match="unknown localization kernels 'cuda'"):
        ZonePipeline.from_pretrained(device="cpu", kernels="CUDA")


def test_finishing_an_edit_again_times_that_finish_alone(tiny_pipe):
    """finish times its stages on a copy of the edit's stopwatch: a second finish of one edit (as a caller retrying
    it does) reported both finishes' seconds added up."""
    edit = tiny_pipe.prepare(smooth_image(64, 64), INSTRUCTION, tiny_pipe.default_config.replace(steps=1))
    (latents,) = tiny_pipe.denoise([edit])
    prepared = dict(edit.watch.seconds)
    tiny_pipe.finish(edit, latents)
    assert edit.watch.seconds == prepared


def test_a_cpu_pipeline_enlarges_its_images_with_pillow_on_the_host(tiny_pipe, monkeypatch):
    """The device resize (pillow_resize.py) is CUDA's; on the CPU Pillow itself is the faster, and gives the same
    bytes, so only the path taken tells."""
    import zone_engine.pipeline

    calls = spy_calls(monkeypatch, zone_engine.pipeline, "to_input_size_on")
    _edit(tiny_pipe, smooth_image(77, 51))
    assert calls == []


def test_from_pretrained_with_the_onnx_segmenter_refuses_a_sam_checkpoint_it_would_not_read(monkeypatch):
    """segmenter="onnx" runs the SAM export: a SAM checkpoint given beside it would go unread, so it is refused
    before anything loads, as `check_pretrained_present` refuses it."""
    monkeypatch.setattr("zone_engine.pipeline.load_pretrained", lambda *a, **k: pytest.fail("loaded checkpoints"))
    with pytest.raises(ConfigError, match="reads no SAM checkpoint: drop --sam PATH"):
        ZonePipeline.from_pretrained(device="cpu", segmenter="onnx", sam="sam_vit_b_01ec64.pth")


def test_a_pipeline_said_not_picklable_with_what_to_send_another_process_instead(tiny_pipe):
    """pool.map(pipe.edit, images) pickles the pipeline: it failed with "cannot pickle '_thread.RLock' object"."""
    import pickle

    for attempt in (lambda: pickle.dumps(tiny_pipe.edit), lambda: copy.deepcopy(tiny_pipe)):
        with pytest.raises(ConfigError, match="cannot be pickled or deep-copied.*Pool's initializer.*EditRequests"):
            attempt()
    shallow = copy.copy(tiny_pipe)  # as before: the same models and lock, its own default config
    shallow.default_config = tiny_pipe.default_config.replace(steps=2)
    assert shallow._lock is tiny_pipe._lock and tiny_pipe.default_config.steps != 2
    # What the message says to send does pickle.
    request = EditRequest(smooth_image(16, 16), INSTRUCTION, tiny_pipe.default_config)
    assert pickle.loads(pickle.dumps(request)).config == tiny_pipe.default_config


def test_a_shallow_copy_holds_its_models_as_the_pipeline_it_copies_does():
    """From a mutation audit: a copy.copy(pipe) that outlived `pipe` was no holder of the models, and a pipeline
    with other settings over them changed its layout in place, unsaid."""
    first = ZonePipeline.tiny()
    shallow, models = copy.copy(first), first.models
    del first
    with pytest.raises(ConfigError, match=r"in use by another ZonePipeline \(cpu, torch.float32, UNets contiguous"):
        ZonePipeline(models, device="cpu", channels_last=True)
    assert shallow.models.ip2p_unet.conv_in.weight.is_contiguous()


def test_the_public_methods_keep_their_signatures_for_type_checkers():
    """The stages' decorators were typed Callable[..., T]: a type checker saw pipe.edit(...) and ZonePipeline(...)
    take anything, and an editor showed no parameter. And edit_batch is typed by return_exceptions: without it,
    each item an EditResult (`results[0].image` was no attribute of Exception)."""
    import typing

    from zone_engine import errors, pipeline

    for decorator in (pipeline._unknown_keywords_said, pipeline._locked_on_device,
                      pipeline._unknown_init_options_refused, pipeline._keywords_said, errors.unknown_keywords_refused):
        hints = typing.get_type_hints(decorator)
        taken = hints[next(iter(inspect.signature(decorator).parameters))]
        assert hints["return"] == taken and typing.get_args(taken)[0] is not Ellipsis, decorator.__name__
    if not hasattr(typing, "get_overloads"):  # Python 3.10
        return
    returns = [typing.get_type_hints(item, vars(pipeline))["return"]
               for item in typing.get_overloads(ZonePipeline.edit_batch)]
    assert returns == [list[EditResult], list[EditResult | Exception]]


def test_out_of_gpu_memory_is_said_with_what_to_try_and_fails_its_edit_alone(tiny_pipe, monkeypatch):
    """A CUDA OOM (a 16 GB GPU) was a torch traceback that stopped `zone edit a.png b.png` at that image: now a
    ZoneError (a line, exit 2) naming what to try, that edit's only."""
    from zone_engine import pipeline
    from zone_engine.errors import OutOfDeviceMemory

    real_decode, calls = pipeline.decode_latents, []

    def decode_latents(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_latents", decode_latents)
    config = tiny_pipe.default_config.replace(steps=1)
    requests = [EditRequest(smooth_image(64, 64, seed), "make it red", config) for seed in (0, 1)]
    failed, done = tiny_pipe.edit_batch(requests, return_exceptions=True)
    assert isinstance(failed, OutOfDeviceMemory) and isinstance(done, EditResult)
    assert "Tried to allocate 2.00 GiB" in str(failed) and "--dtype fp16" in str(failed)
    assert isinstance(failed.__cause__, torch.OutOfMemoryError)

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug, not the GPU's memory")

    monkeypatch.setattr(pipeline, "decode_latents", broken)
    (bug,) = tiny_pipe.edit_batch(requests[:1], return_exceptions=True)
    assert type(bug) is RuntimeError  # only CUDA's out-of-memory error is said as the GPU's limit
