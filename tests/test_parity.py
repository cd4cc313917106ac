"""ZONE.md section 1 with beta = 0 is plain InstructPix2Pix: the engine must equal diffusers' pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import smooth_image
from diffusers import DPMSolverMultistepScheduler, StableDiffusionInstructPix2PixPipeline

from zone_engine.config import Action, EditConfig
from zone_engine.denoise import DenoiseInputs, SequentialDenoiser, initial_noise, make_scheduler, trajectory_step
from zone_engine.localize import AttentionAccumulator
from zone_engine.pipeline import decode_latents, encode_image_latents
from zone_engine.solver import set_timesteps, solver_schedule
from zone_engine.text import encode_instruction

INSTRUCTION = "make the dog a golden statue"
STEPS = 4


def _reference(tiny_models, image, output_type):
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=tiny_models.vae, text_encoder=tiny_models.text_encoder, tokenizer=tiny_models.tokenizer,
        unet=tiny_models.ip2p_unet, scheduler=make_scheduler(tiny_models.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    return pipe(
        INSTRUCTION, image=Image.fromarray(image), num_inference_steps=STEPS, guidance_scale=7.5,
        image_guidance_scale=1.5, generator=torch.Generator().manual_seed(42), output_type=output_type,
    ).images


def test_scheduler_timesteps_match_reference_diffusers():
    scheduler = make_scheduler(dict(DPMSolverMultistepScheduler().config))
    scheduler.set_timesteps(20)
    expected = [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    assert scheduler.timesteps.tolist() == expected


@pytest.mark.parametrize(("steps", "second_order"), [(20, True), (15, True), (14, False), (4, False)])
def test_last_step_goes_to_timestep_zero_as_diffusers_018(steps, second_order):
    """diffusers 0.18's step(): prev_timestep = 0 at the last step (sigma of alphas_cumprod[0], not 0),
    first order there only below 15 steps (lower_order_final). Newer defaults jump to sigma 0."""
    # SD1.5's betas, as IP2P's scheduler config has them (without the "_use_default_values" that
    # would make from_config reset them to the defaults).
    defaults = {key: value for key, value in DPMSolverMultistepScheduler().config.items() if not key.startswith("_")}
    config = dict(defaults, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler = make_scheduler(config)
    scheduler.set_timesteps(steps)
    first = scheduler.alphas_cumprod[0]
    assert scheduler.sigmas[-1].item() == pytest.approx(((1 - first) / first).sqrt().item(), rel=1e-6)
    assert scheduler.sigmas[-1].item() > 0.02
    last_is_second_order = solver_schedule(make_scheduler(config), steps).correction_scale[-1].item() != 0
    assert last_is_second_order == second_order


@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_ip2p_trajectory_equals_diffusers(tiny_models, size):
    image = smooth_image(*size)
    config = EditConfig(steps=STEPS, seed=42)
    encoded = encode_instruction(tiny_models.tokenizer, tiny_models.text_encoder, INSTRUCTION)
    inputs = DenoiseInputs(
        context=encoded.context,
        image_latents=encode_image_latents(tiny_models.vae, image, torch.float32),
        noise=initial_noise(42, (size[0] // 8, size[1] // 8), torch.device("cpu"), torch.float32),
    )
    denoiser = SequentialDenoiser(tiny_models.ip2p_unet, tiny_models.mb_unet, tiny_models.scheduler_config)
    latents = denoiser(inputs, config, 0.0, AttentionAccumulator())

    expected_latents = _reference(tiny_models, image, "latent")
    assert (latents - expected_latents).abs().max().item() <= 1e-4

    pixels = decode_latents(tiny_models.vae, latents)
    expected_pixels = _reference(tiny_models, image, "pt")
    assert (pixels - expected_pixels).abs().max().item() <= 1e-4


def test_whole_edit_styled_image_equals_diffusers(tiny_pipe):
    image = smooth_image(64, 96)
    config = tiny_pipe.default_config.replace(steps=STEPS, beta_add_change=0.0, action=Action.CHANGE)
    result = tiny_pipe.edit(image, INSTRUCTION, config)
    expected = np.asarray(_reference(tiny_pipe.models, image, "pil")[0])
    # Rounding to uint8 may differ by one level where fp32 noise straddles a .5 boundary.
    assert np.abs(result.styled.astype(int) - expected.astype(int)).max() <= 1


def test_magicbrush_blend_changes_ip2p_trajectory(tiny_models):
    """beta > 0 must pull z_ip toward MagicBrush's trajectory: each step z_ip <- (z_ip + beta z_mb) / (1 + beta),
    with z_mb MagicBrush's own trajectory, never blended (ZONE.md section 1), computed here by hand."""
    image = smooth_image(64, 64)
    encoded = encode_instruction(tiny_models.tokenizer, tiny_models.text_encoder, INSTRUCTION)
    inputs = DenoiseInputs(encoded.context, encode_image_latents(tiny_models.vae, image, torch.float32),
                           initial_noise(1, (8, 8), torch.device("cpu"), torch.float32))
    denoiser = SequentialDenoiser(tiny_models.ip2p_unet, tiny_models.mb_unet, tiny_models.scheduler_config)
    config, beta = EditConfig(steps=2), 0.2
    plain = denoiser(inputs, config, 0.0, AttentionAccumulator())
    blended = denoiser(inputs, config, beta, AttentionAccumulator())
    assert not torch.allclose(plain, blended)

    ip2p_scheduler, mb_scheduler = (make_scheduler(tiny_models.scheduler_config) for _ in range(2))
    for scheduler in (ip2p_scheduler, mb_scheduler):
        set_timesteps(scheduler, config.steps, torch.device("cpu"))
    z_ip = z_mb = inputs.noise * ip2p_scheduler.init_noise_sigma
    with torch.inference_mode():
        for t in ip2p_scheduler.timesteps:
            z_mb = trajectory_step(tiny_models.mb_unet, mb_scheduler, z_mb, t, inputs, config)
            z_ip = trajectory_step(tiny_models.ip2p_unet, ip2p_scheduler, z_ip, t, inputs, config)
            z_ip = (z_ip + beta * z_mb) / (1 + beta)
    assert torch.allclose(blended, z_ip, rtol=1e-6, atol=1e-4)  # the same arithmetic: equal on the CPU
    # and towards MagicBrush's trajectory, not away from it
    assert (blended - z_mb).abs().max().item() < (plain - z_mb).abs().max().item()
