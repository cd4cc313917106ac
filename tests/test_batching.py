"""Several edits denoised as one batch (issue: serving, dynamic batching) get exactly their own results."""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import smooth_image

from zone_engine import Action, ZonePipeline
from zone_engine.config import EditConfig, SamConfig
from zone_engine.denoise import DenoiseInputs, initial_noise
from zone_engine.dual_step import FusedDualDenoiser, padded_batch
from zone_engine.errors import ConfigError, EditCancelled, InputImageError, InstructionError
from zone_engine.localize import AttentionAccumulator, RecordingAttnProcessor
from zone_engine.pipeline import EditRequest, batch_key, encode_image_latents
from zone_engine.text import encode_instruction

# (instruction, seed, image seed): different texts, noises, images and actions in one batch.
EDITS = [("make the dog a golden statue", 1, 5), ("add a red hat", 2, 6), ("remove the cup", 3, 7)]
# The fp32 bound for "batched == alone", relative to the latents' magnitude: the CPU's matmul library
# may choose another kernel for more rows, which rounds differently (measured: 0.0 at 64x96; ~2e-6
# relative where a layer sees 3 rows alone but 6 batched, e.g. the tiny UNet's 1x1 level at 64x64).
LATENT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def fused_pipe(tiny_models):
    return ZonePipeline(tiny_models, device="cpu", denoiser="fused",
                        default_config=EditConfig(steps=3, sam=SamConfig.for_random_weights()))


def edit_inputs(models, instruction: str, seed: int, image_seed: int, size=(64, 96)) -> DenoiseInputs:
    encoded = encode_instruction(models.tokenizer, models.text_encoder, instruction)
    return DenoiseInputs(
        context=encoded.context,
        image_latents=encode_image_latents(models.vae, smooth_image(*size, seed=image_seed), torch.float32),
        noise=initial_noise(seed, (size[0] // 8, size[1] // 8), torch.device("cpu"), torch.float32),
    )


def test_denoise_batch_gives_each_edit_its_own_latents_and_attention(tiny_models):
    config = EditConfig(steps=4)
    denoiser = FusedDualDenoiser(tiny_models.ip2p_unet, tiny_models.mb_unet, tiny_models.scheduler_config)
    inputs = [edit_inputs(tiny_models, *edit) for edit in EDITS]
    betas = [config.beta_for(action) for action in (Action.CHANGE, Action.ADD, Action.REMOVE)]
    alone_attention = [AttentionAccumulator() for _ in EDITS]
    alone = [denoiser(x, config, beta, acc) for x, beta, acc in zip(inputs, betas, alone_attention, strict=True)]
    batched_attention = [AttentionAccumulator() for _ in EDITS]
    batched = denoiser.denoise_batch(inputs, config, betas, batched_attention)
    for got, expected in zip(batched, alone, strict=True):
        assert got.shape == expected.shape == (1, 4, 8, 12)
        assert (got - expected).abs().max() <= LATENT_TOLERANCE * expected.abs().max()
    for got, expected in zip(batched_attention, alone_attention, strict=True):
        assert got.rows == expected.rows
        assert torch.allclose(got.total, expected.total, rtol=LATENT_TOLERANCE, atol=0)
    # The edits really differ, so a mix-up would show.
    assert (batched[0] - batched[1]).abs().max() > 1e-2


def test_recording_refuses_a_batch_that_does_not_match_its_accumulators(tiny_models):
    processor = RecordingAttnProcessor([AttentionAccumulator(), AttentionAccumulator()])
    attn = tiny_models.ip2p_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    states, context = torch.zeros(3, 4, attn.to_q.in_features), torch.zeros(3, 77, attn.to_k.in_features)
    with pytest.raises(ValueError, match="3 rows for each of 2 edits"):
        processor(attn, states, context)


def test_edit_batch_equals_each_edit_alone_in_request_order(fused_pipe):
    images = {"wide": smooth_image(64, 96, seed=5), "tall": smooth_image(96, 64, seed=6)}
    config = fused_pipe.default_config
    # The two wide edits share a batch with different actions, so different betas (the tiny classifier
    # calls every instruction ADD: the actions are forced).
    requests = [
        EditRequest(images["wide"], "make the dog a golden statue", config.replace(seed=1, action=Action.CHANGE)),
        EditRequest(images["tall"], "add a red hat", config.replace(seed=2)),
        EditRequest(images["wide"], "remove the cup", config.replace(seed=3, action=Action.REMOVE)),
    ]
    batched = fused_pipe.edit_batch(requests)
    for request, result in zip(requests, batched, strict=True):
        alone = fused_pipe.edit(request.image, request.instruction, request.config)
        assert result.image.shape == request.image.shape
        # Rounding (see LATENT_TOLERANCE) can move a pixel by one uint8 level; masks must not change.
        assert np.abs(result.image.astype(int) - alone.image.astype(int)).max() <= 1
        assert np.abs(result.styled.astype(int) - alone.styled.astype(int)).max() <= 1
        assert np.array_equal(result.mask_b, alone.mask_b) and np.array_equal(result.mask_f, alone.mask_f)
        assert result.action is alone.action
    assert [result.action for result in batched] == [Action.CHANGE, Action.ADD, Action.REMOVE]
    assert not np.array_equal(batched[0].styled, batched[2].styled)


def test_each_edit_of_a_batch_blends_with_its_own_beta(fused_pipe):
    """beta is not part of the batch key: two REMOVE edits with different beta_remove share a batch,
    and each must be blended with its own (the second must not take the first's)."""
    image, config = smooth_image(64, 64, seed=8), fused_pipe.default_config.replace(action=Action.REMOVE)
    configs = [config, config.replace(beta_remove=5.0)]
    batched = fused_pipe.edit_batch([EditRequest(image, "remove the cup", c) for c in configs])
    alone = [fused_pipe.edit(image, "remove the cup", c) for c in configs]
    for got, expected in zip(batched, alone, strict=True):
        assert np.abs(got.styled.astype(int) - expected.styled.astype(int)).max() <= 1
    assert np.abs(alone[0].styled.astype(int) - alone[1].styled.astype(int)).max() > 8  # beta matters here


def test_batch_key_groups_what_can_share_a_denoising_loop():
    config = EditConfig()
    assert batch_key((512, 384), config) == batch_key((500, 380), config.replace(seed=9, action=Action.ADD))
    assert batch_key((512, 384), config) != batch_key((384, 512), config)
    assert batch_key((512, 384), config) != batch_key((512, 384), config.replace(steps=10))
    assert batch_key((512, 384), config) != batch_key((512, 384), config.replace(text_guidance=5.0))
    assert batch_key((512, 384), config) != batch_key((512, 384), config.replace(image_guidance=2.0))
    assert batch_key((1024, 768), config) == batch_key((512, 384), config)  # both shrink to the same canvas


@pytest.mark.parametrize(
    ("keywords", "said"),
    [({"cfg": EditConfig()}, r"EditRequest has no field 'cfg': did you mean config\?"),
     ({"steps": 10},
      r"steps is a field of EditConfig, not one of EditRequest's fields: pass config=pipe.default_config.replace"),
     ({"cancel": 1}, r"cancel must be a threading.Event or None, not an int"),
     ({"cancel": asyncio.Event()}, r"not an asyncio.Event, .* pass a threading.Event and set\(\) it where your task")],
    ids=["misspelt", "a config field", "cancel", "an asyncio Event"],
)
def test_a_request_says_a_keyword_it_has_no_field_for(keywords, said):
    """EditConfig and ZonePipeline say a misspelt keyword as a ConfigError; EditRequest raised a TypeError."""
    with pytest.raises(ConfigError, match=said):
        EditRequest(smooth_image(8, 8), "add a hat", **keywords)


@pytest.mark.parametrize(
    ("call", "said"),
    [(lambda pipe: pipe.edit(smooth_image(8, 8), "add a hat", steps=3),
      r"^steps is a field of EditConfig, not one of edit\(\)'s options: pass config=pipe.default_config.replace"),
     (lambda pipe: pipe.prepare(smooth_image(8, 8), "add a hat", num_inference_steps=3),
      r"^num_inference_steps is called steps here, and is a field of EditConfig, not one of prepare\(\)'s options"),
     (lambda pipe: pipe.edit(smooth_image(8, 8), prompt="add a hat"),
      r"^edit\(\) has no option 'prompt': did you mean instruction\? its options: image, instruction, config, "),
     (lambda pipe: pipe.edit_batch([], return_exception=True),
      r"^edit_batch\(\) has no option 'return_exception': did you mean return_exceptions\?"),
     (lambda pipe: pipe.denoise([], stp=None), r"^denoise\(\) has no option 'stp': did you mean stop\?"),
     (lambda pipe: pipe.finish(None, None, progess=True), r"^finish\(\) has no option 'progess'"),
     (lambda pipe: pipe.edit_batch([], steps=3), r"^edit_batch\(\) has no option 'steps'")],  # it takes no config=
    ids=["edit: a config field", "prepare: diffusers' name", "edit: misspelt", "edit_batch", "denoise", "finish",
         "edit_batch: a config field"],
)
def test_a_stage_says_a_keyword_it_has_no_option_for(tiny_pipe, call, said):
    """As EditRequest and the constructors do: `pipe.edit(image, text, steps=3)` was a TypeError."""
    with pytest.raises(ConfigError, match=said):
        call(tiny_pipe)


def test_a_bad_request_fails_alone_and_the_others_finish(fused_pipe):
    good = EditRequest(smooth_image(64, 64, seed=1), "add a hat")
    requests = [good, EditRequest(np.zeros((2, 2, 3), np.uint8), "add a hat"), EditRequest(good.image, "  "), good]
    outcomes = fused_pipe.edit_batch(requests, return_exceptions=True)
    assert isinstance(outcomes[1], InputImageError) and isinstance(outcomes[2], InstructionError)
    # The two good edits share one batch, so rows 0 and 1 of its UNet calls: the CPU's convolution kernels
    # may round those rows differently (seen on an AMD EPYC: one level), so the bound of the test above.
    assert np.abs(outcomes[0].image.astype(int) - outcomes[3].image.astype(int)).max() <= 1
    assert np.array_equal(outcomes[0].mask_b, outcomes[3].mask_b)


def test_without_return_exceptions_a_bad_request_raises_before_any_edit_is_denoised(fused_pipe, monkeypatch):
    """The good edits' work was done, then thrown away with the bad request's error, which said not which it was."""
    denoised = []
    monkeypatch.setattr(fused_pipe, "denoise", lambda *args, **kwargs: denoised.append(args) or 1 / 0)
    good = EditRequest(smooth_image(64, 64, seed=1), "add a hat")
    with pytest.raises(InstructionError) as raised:
        fused_pipe.edit_batch([good, good, EditRequest(good.image, "  "), EditRequest(good.image, None)])
    assert denoised == []
    if sys.version_info >= (3, 11):  # exception notes
        assert raised.value.__notes__ == ["(edit_batch: request 2)"]


def test_without_return_exceptions_a_failed_group_raises_before_the_next_group_is_denoised(fused_pipe, monkeypatch):
    """A diverged edit's error was kept while every other batch key's group ran its steps, then raised."""
    denoised, denoise = [], fused_pipe.denoise

    def counted(edits, **kwargs):
        denoised.append(edits[0].config.steps)
        return denoise(edits, **kwargs)

    monkeypatch.setattr(fused_pipe, "denoise", counted)
    image, config = smooth_image(64, 64, seed=1), fused_pipe.default_config
    diverging = EditRequest(image, "add a hat", config.replace(steps=1, text_guidance=1e30))
    with pytest.raises(ConfigError, match="the denoising diverged") as raised:
        fused_pipe.edit_batch([diverging, EditRequest(image, "add a hat", config.replace(steps=2))])
    assert denoised == [1]  # the steps=2 group, another batch key, never started
    if sys.version_info >= (3, 11):
        assert raised.value.__notes__ == ["(edit_batch: request 0)"]


def test_a_fault_in_the_batched_loop_is_retried_alone_and_stays_with_its_edit(fused_pipe, monkeypatch, caplog):
    poisoned_seed = 13
    real_batch = fused_pipe.denoiser.denoise_batch

    def flaky_batch(inputs, *args, **kwargs):
        # The whole batch fails while the poisoned edit is in it; alone, only the poisoned one fails.
        if len(inputs) > 1:
            raise RuntimeError("one bad member breaks the batched loop")
        noise = inputs[0].noise
        if torch.equal(noise, initial_noise(poisoned_seed, tuple(noise.shape[-2:]), noise.device, noise.dtype)):
            raise RuntimeError("the poisoned edit")
        return real_batch(inputs, *args, **kwargs)

    monkeypatch.setattr(fused_pipe.denoiser, "denoise_batch", flaky_batch)
    image, config = smooth_image(64, 64, seed=2), fused_pipe.default_config
    with caplog.at_level("WARNING", logger="zone_engine"):
        outcomes = fused_pipe.edit_batch(
            [EditRequest(image, "add a hat", config.replace(seed=seed)) for seed in (1, poisoned_seed, 2)],
            return_exceptions=True,
        )
    assert not [record for record in caplog.records if "out of GPU memory" in record.getMessage()]  # not memory
    assert isinstance(outcomes[1], RuntimeError) and str(outcomes[1]) == "the poisoned edit"
    monkeypatch.undo()
    assert np.array_equal(outcomes[0].image, fused_pipe.edit(image, "add a hat", config.replace(seed=1)).image)
    assert np.array_equal(outcomes[2].image, fused_pipe.edit(image, "add a hat", config.replace(seed=2)).image)


def test_a_batch_out_of_gpu_memory_is_said_in_the_log_and_retried_alone(fused_pipe, monkeypatch, caplog):
    """Without the line a server's batches could all be split, each edit rerun, with nothing said (its warm-up of
    --max-batch passed through the same retries)."""
    real_batch = fused_pipe.denoiser.denoise_batch

    def too_large(inputs, *args, **kwargs):
        if len(inputs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real_batch(inputs, *args, **kwargs)

    monkeypatch.setattr(fused_pipe.denoiser, "denoise_batch", too_large)
    image, config = smooth_image(64, 64, seed=4), fused_pipe.default_config.replace(steps=1)
    with caplog.at_level("WARNING", logger="zone_engine"):
        outcomes = fused_pipe.edit_batch([EditRequest(image, "add a hat", config.replace(seed=s)) for s in (1, 2)])
    assert len(outcomes) == 2
    said = [record.getMessage() for record in caplog.records if record.name == "zone_engine.pipeline"]
    assert said == ["a batch of 2 edits ran out of GPU memory in denoising: each is retried alone (a smaller batch, "
                    "--max-batch or --batch-size, may fit)"]


def test_a_batch_failing_after_a_step_retries_each_edit_from_the_start(fused_pipe, monkeypatch):
    """The retry restarts each edit (its attention and trajectory): a batch that failed after its first step
    left that step's attention in the accumulators, which the retried edit would count again."""
    real_batch = fused_pipe.denoiser.denoise_batch

    def fails_after_a_step(inputs, config, betas, attention, on_step=None):
        if len(inputs) == 1:  # an edit retried alone
            return real_batch(inputs, config, betas, attention, on_step)

        def tick(index):
            on_step(index)
            raise RuntimeError("the batch broke after its first step")
        return real_batch(inputs, config, betas, attention, tick)

    monkeypatch.setattr(fused_pipe.denoiser, "denoise_batch", fails_after_a_step)
    image, config = smooth_image(64, 64, seed=4), fused_pipe.default_config
    requests = [EditRequest(image, "add a hat", config.replace(seed=seed)) for seed in (1, 2)]
    outcomes = fused_pipe.edit_batch(requests)
    monkeypatch.undo()
    for request, outcome in zip(requests, outcomes, strict=True):
        alone = fused_pipe.edit(request.image, request.instruction, request.config)
        assert np.array_equal(outcome.image, alone.image) and np.array_equal(outcome.heatmap, alone.heatmap)


def test_an_edit_cancelled_mid_batch_stops_alone(fused_pipe, monkeypatch):
    """The loop stops once every member is cancelled, not the first: the live edit finishes as it would alone."""
    image, config = smooth_image(64, 64, seed=3), fused_pipe.default_config
    gone, live = threading.Event(), threading.Event()
    real_batch = fused_pipe.denoiser.denoise_batch

    def cancel_the_first_at_step_0(inputs, config, betas, attention, on_step=None):
        def tick(index):
            gone.set()
            on_step(index)
        return real_batch(inputs, config, betas, attention, tick)

    monkeypatch.setattr(fused_pipe.denoiser, "denoise_batch", cancel_the_first_at_step_0)
    outcomes = fused_pipe.edit_batch([EditRequest(image, "add a hat", config, cancel=gone),
                                      EditRequest(image, "add a hat", config.replace(seed=5), cancel=live)],
                                     return_exceptions=True)
    monkeypatch.undo()
    assert isinstance(outcomes[0], EditCancelled)
    alone = fused_pipe.edit(image, "add a hat", config.replace(seed=5))
    assert np.abs(outcomes[1].image.astype(int) - alone.image.astype(int)).max() <= 1


def test_cancelled_edits_stop_and_say_so(fused_pipe):
    image = smooth_image(64, 64, seed=3)
    cancelled, live = threading.Event(), threading.Event()
    cancelled.set()
    outcomes = fused_pipe.edit_batch(
        [EditRequest(image, "add a hat", cancel=cancelled), EditRequest(image, "add a hat", cancel=live)],
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], EditCancelled)
    assert outcomes[1].image.shape == image.shape

    # Cancelled while denoising: the loop stops at the next step once every member is cancelled.
    steps_run, event = [], threading.Event()
    real_denoise = fused_pipe.denoiser.denoise_batch

    def count_steps(*args, on_step=None, **kwargs):
        def tick(index):
            steps_run.append(index)
            event.set()
            on_step(index)
        return real_denoise(*args, on_step=tick, **kwargs)

    fused_pipe.denoiser.denoise_batch = count_steps
    try:
        outcomes = fused_pipe.edit_batch([EditRequest(image, "add a hat", cancel=event)] * 2, return_exceptions=True)
    finally:
        del fused_pipe.denoiser.denoise_batch
    assert all(isinstance(outcome, EditCancelled) for outcome in outcomes)
    assert steps_run == [0]


def test_a_denoiser_that_cannot_batch_runs_the_edits_one_by_one(tiny_models, capsys, monkeypatch):
    from zone_engine import progress

    monkeypatch.setattr(progress, "is_terminal", lambda stream: True)  # tqdm's bar, as on a terminal
    eager_pipe = ZonePipeline(tiny_models, device="cpu", denoiser="eager")  # the sequential reference
    image, config = smooth_image(64, 64, seed=4), eager_pipe.default_config.replace(steps=2)
    requests = [EditRequest(image, "add a hat", config.replace(seed=seed)) for seed in (1, 2)]
    results = eager_pipe.edit_batch(requests)
    for request, result in zip(requests, results, strict=True):
        assert np.array_equal(result.image, eager_pipe.edit(request.image, request.instruction, request.config).image)

    polls = []

    def stop() -> bool:
        polls.append(1)
        return False

    eager_pipe.denoise([eager_pipe.prepare(image, "add a hat", config) for _ in range(2)], stop=stop, progress=True)
    assert len(polls) == 1 + 2 * config.steps  # once before any step, then one loop per edit, after every step
    assert f" {2 * config.steps}/{2 * config.steps} " in capsys.readouterr().err  # the bar counts both loops' steps


def test_edits_of_one_key_share_one_denoising_loop(fused_pipe):
    """A batching denoiser runs the edits of one batch key as one loop (polled once a step, and once before it),
    not one loop an edit: the batched results equal the edits alone, so they could not tell."""
    config, image, polls = fused_pipe.default_config.replace(steps=2), smooth_image(64, 64, seed=4), []
    edits = [fused_pipe.prepare(image, "add a hat", config.replace(seed=seed)) for seed in (1, 2)]
    fused_pipe.denoise(edits, stop=lambda: polls.append(1) and False)
    assert len(polls) == 1 + config.steps


def test_padded_batches_run_a_power_of_two_and_return_only_the_real_edits(tiny_models):
    config = EditConfig(steps=3)
    plain = FusedDualDenoiser(tiny_models.ip2p_unet, tiny_models.mb_unet, tiny_models.scheduler_config)
    padded = FusedDualDenoiser(tiny_models.ip2p_unet, tiny_models.mb_unet, tiny_models.scheduler_config,
                               pad_batches=True)
    assert not plain.pad_batches
    assert [padded_batch(edits) for edits in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    batch_sizes = []
    real_step = padded.step_fn

    def spy(unet, schedule, state, *args):
        batch_sizes.append(state.z_mb.shape[0])
        real_step(unet, schedule, state, *args)

    padded.step_fn = spy
    inputs = [edit_inputs(tiny_models, *edit) for edit in EDITS]
    betas = [0.01, 0.01, 0.2]
    alone_attention, padded_attention = [AttentionAccumulator() for _ in EDITS], [AttentionAccumulator() for _ in EDITS]
    alone = [plain(x, config, beta, acc) for x, beta, acc in zip(inputs, betas, alone_attention, strict=True)]
    got = padded.denoise_batch(inputs, config, betas, padded_attention)
    assert batch_sizes == [4] * config.steps and len(got) == 3
    for g, e in zip(got, alone, strict=True):
        assert (g - e).abs().max() <= LATENT_TOLERANCE * e.abs().max()
    for g, e in zip(padded_attention, alone_attention, strict=True):
        assert g.rows == e.rows and torch.allclose(g.total, e.total, rtol=LATENT_TOLERANCE, atol=0)


def test_denoise_refuses_any_used_edit_and_a_batch_of_two_keys(fused_pipe):
    """A batch holding one edit denoised before (beside a fresh one) would mix that edit's two attention
    records; edits of two batch keys (here two step counts) would all run the first one's steps."""
    config = fused_pipe.default_config.replace(steps=1)
    used = fused_pipe.prepare(smooth_image(64, 64, seed=3), "add a hat", config)
    with pytest.raises(EditCancelled):
        fused_pipe.denoise([used], stop=iter([False, True]).__next__)  # stopped after its one step: used
    with pytest.raises(ConfigError, match="denoised before"):
        fused_pipe.denoise([used.restart(), used])
    with pytest.raises(ConfigError, match="need one batch key"):
        fused_pipe.denoise([used.restart(), replace(used.restart(), config=config.replace(steps=2))])
