"""Action-aware dual-trajectory denoising (ZONE.md section 1) — the plain sequential reference.

Both trajectories start from the same noise. Each step: MagicBrush's step on z_mb, IP2P's step on
z_ip, then z_ip <- (z_ip + beta * z_mb) / (1 + beta). z_mb is never overwritten by the blend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from .config import EditConfig
from .localize import AttentionAccumulator, attention_grid, record_cross_attention
from .models import pytorch_norms
from .solver import set_timesteps

if TYPE_CHECKING:
    from diffusers import DPMSolverMultistepScheduler


@dataclass(frozen=True)
class DenoiseInputs:
    """Everything the loop needs, computed once per edit and shared by both UNets."""

    context: torch.Tensor  # (3, 77, C): [c_T, empty, empty]
    image_latents: torch.Tensor  # (3, 4, h, w): [image, image, zeros]
    noise: torch.Tensor  # (1, 4, h, w): z_T, shared by both trajectories

    @classmethod
    def stack(cls, edits: Sequence[DenoiseInputs]) -> DenoiseInputs:
        """B edits of one latent size as one batch: context (3B, 77, C), image latents (3B, ...), noise (B, ...)."""
        return cls(
            context=torch.cat([edit.context for edit in edits]),
            image_latents=torch.cat([edit.image_latents for edit in edits]),
            noise=torch.cat([edit.noise for edit in edits]),
        )


class Denoiser(Protocol):
    """The narrow backend interface: run the whole dual loop and return the final z_ip (1, 4, h, w).

    Each step must also add IP2P's cross-attention (ZONE.md section 3) into `attention`: PyTorch
    denoisers install recording processors (`record_cross_attention`), an exported engine adds its
    attention output. The eager sequential reference below implements it; the fused, compiled and
    TensorRT denoisers implement the same call.
    """

    def __call__(
        self, inputs: DenoiseInputs, config: EditConfig, beta: float, attention: AttentionAccumulator,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor: ...


@runtime_checkable
class BatchDenoiser(Denoiser, Protocol):
    """A denoiser that can also run B edits of one latent size, steps and guidance as one batch.

    Each edit gets its own noise, beta and attention accumulator, and the same result it would get
    alone (the same arithmetic on a larger batch; see tests/test_batching.py for the tolerance).
    """

    def denoise_batch(
        self, inputs: Sequence[DenoiseInputs], config: EditConfig, betas: Sequence[float],
        attention: Sequence[AttentionAccumulator], on_step: Callable[[int], None] | None = None,
    ) -> list[torch.Tensor]:
        """Each edit's final IP2P latents (1, 4, h, w), in order; IP2P's cross-attention recorded into its
        accumulator every step; `on_step(i)` called after step i (it may raise to stop the loop)."""
        ...


# diffusers 0.18's DPMSolverMultistep as the reference ran it (make_scheduler).
REFERENCE_SCHEDULER = dict(algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace",
                           final_sigmas_type="sigma_min")


def make_scheduler(scheduler_config: dict) -> DPMSolverMultistepScheduler:
    """DPMSolverMultistep from IP2P's scheduler config; one instance per trajectory (it keeps history).

    diffusers 0.18, which the reference ran, used dpmsolver++ order 2 with linspace spacing
    (timesteps 999, 949, ..., 50 for 20 steps), and its last step went to timestep 0 (sigma_min, not
    zero; second order from 15 steps on). Those are pinned so newer diffusers keep them: their default
    last step (0.42 here) jumps, first order, to sigma 0 (final_sigmas_type="zero").
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(scheduler_config, **REFERENCE_SCHEDULER)


def initial_noise(seed: int, latent_size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """z_T drawn on the CPU from `seed`, so every device gets the same noise (as diffusers does)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, 4, *latent_size), generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def guided_noise(eps: torch.Tensor, text_scale: float, image_scale: float) -> torch.Tensor:
    """IP2P's two-way classifier-free guidance: (3B, 4, h, w), B groups [text, image, uncond] -> (B, 4, h, w)."""
    eps_text, eps_image, eps_uncond = eps.unflatten(0, (-1, 3)).unbind(1)
    return eps_uncond + text_scale * (eps_text - eps_image) + image_scale * (eps_image - eps_uncond)


def blend_latents(z_ip: torch.Tensor, z_mb: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """ZONE's step 3: IP2P's next latents pulled towards MagicBrush's by beta (a tensor: one per edit)."""
    return (z_ip + beta * z_mb) / (1 + beta)


def trajectory_step(unet: torch.nn.Module, scheduler: DPMSolverMultistepScheduler, latents: torch.Tensor,
                    t: torch.Tensor, inputs: DenoiseInputs, config: EditConfig) -> torch.Tensor:
    """One guided UNet evaluation and scheduler step of one trajectory, as diffusers' IP2P pipeline."""
    model_input = scheduler.scale_model_input(torch.cat([latents] * 3), t)
    model_input = torch.cat([model_input, inputs.image_latents], dim=1)
    eps = unet(model_input, t, encoder_hidden_states=inputs.context, return_dict=False)[0]
    noise = guided_noise(eps, config.text_guidance, config.image_guidance)
    return scheduler.step(noise, t, latents, return_dict=False)[0]


class SequentialDenoiser:
    """The plain reference: MagicBrush's step, then IP2P's, then the blend, one UNet call each."""

    def __init__(self, ip2p_unet: torch.nn.Module, mb_unet: torch.nn.Module, scheduler_config: dict) -> None:
        self.norms = pytorch_norms  # its UNets' GroupNorms, as FusedDualDenoiser says its own (reports read it)
        self.ip2p_unet = ip2p_unet
        self.mb_unet = mb_unet
        self.scheduler_config = scheduler_config

    @torch.inference_mode()
    def __call__(self, inputs: DenoiseInputs, config: EditConfig, beta: float, attention: AttentionAccumulator,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        latent_size = tuple(inputs.noise.shape[-2:])
        with record_cross_attention(self.ip2p_unet, latent_size, attention_grid(latent_size), attention):
            return self._loop(inputs, config, beta, on_step)

    def _loop(self, inputs: DenoiseInputs, config: EditConfig, beta: float,
              on_step: Callable[[int], None] | None) -> torch.Tensor:
        ip2p_scheduler, mb_scheduler = (make_scheduler(self.scheduler_config) for _ in range(2))
        device = inputs.noise.device
        set_timesteps(ip2p_scheduler, config.steps, device)
        set_timesteps(mb_scheduler, config.steps, device)
        z_ip = z_mb = inputs.noise * ip2p_scheduler.init_noise_sigma
        for index, t in enumerate(ip2p_scheduler.timesteps):
            z_mb = trajectory_step(self.mb_unet, mb_scheduler, z_mb, t, inputs, config)
            z_ip = trajectory_step(self.ip2p_unet, ip2p_scheduler, z_ip, t, inputs, config)
            z_ip = blend_latents(z_ip, z_mb, beta)
            if on_step is not None:
                on_step(index)
        return z_ip
