"""DPM-Solver++ (2M) as precomputed per-step coefficients: the scheduler step as pure tensor math.

diffusers' `DPMSolverMultistepScheduler.step` keeps Python-side state (a step counter, a history
list, an index lookup that syncs with the host). Every one of its updates is linear in the current
latent `z`, the current data prediction `x0` and the previous one, with scalars that depend only on
the step index. Computing those scalars once per (schedule, steps) — with the same float32 torch
operations diffusers uses, so the results agree to the last bit — turns a step into a few fused
element-wise ops that need no host round trip and can live inside a captured CUDA graph.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DPMSolverMultistepScheduler


@dataclass(frozen=True)
class SolverSchedule:
    """Per-step scalars, each a float32 tensor of shape (steps,), and the int64 timesteps."""

    timesteps: torch.Tensor
    alpha: torch.Tensor  # alpha_s of the current step: x0 = (z - sigma * eps) / alpha
    sigma: torch.Tensor
    z_scale: torch.Tensor  # sigma_t / sigma_s
    x0_scale: torch.Tensor  # alpha_t * (exp(-h) - 1)
    correction_scale: torch.Tensor  # 0.5 * alpha_t * (exp(-h) - 1); 0 on first-order steps
    inverse_r0: torch.Tensor  # 1 / r0; 0 on first-order steps

    @property
    def steps(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device: torch.device) -> SolverSchedule:
        return SolverSchedule(**{name: value.to(device) for name, value in vars(self).items()})


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)  # as DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t
    return alpha_t, sigma * alpha_t


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    alpha_t, sigma_t = _alpha_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


_FILTERS_LOCK = threading.Lock()  # catch_warnings swaps the process's filter list: one thread at a time here


def set_timesteps(scheduler: DPMSolverMultistepScheduler, steps: int, device: torch.device | None = None) -> None:
    """`scheduler.set_timesteps`, without the DeprecationWarning NumPy 2 raises at diffusers' `np.array(tensor)`
    (diffusers' to mend, not the caller's): under `-W error` or pytest's filterwarnings=error it failed the edit.
    Once a step count for the fused denoisers (their schedule is cached), every edit for the eager reference."""
    with _FILTERS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        scheduler.set_timesteps(steps, device=device)


def solver_schedule(scheduler: DPMSolverMultistepScheduler, steps: int) -> SolverSchedule:
    """Coefficients of `scheduler` (a configured DPMSolverMultistepScheduler) for `steps` steps."""
    config = scheduler.config
    if (config.algorithm_type, config.solver_type, config.solver_order, config.prediction_type) != (
        "dpmsolver++", "midpoint", 2, "epsilon"
    ) or config.thresholding:
        raise ValueError("the fused solver implements DPM-Solver++ 2M (midpoint, epsilon prediction) only")
    set_timesteps(scheduler, steps)
    sigmas = scheduler.sigmas  # (steps + 1,) float32, last one the final sigma
    count = len(scheduler.timesteps)
    names = ("alpha", "sigma", "z_scale", "x0_scale", "correction_scale", "inverse_r0")
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for i in range(count):
        # Which update diffusers' step() takes at index i (lower_order_nums counts earlier steps).
        lower_order_final = i == count - 1 and (
            config.euler_at_final or (config.lower_order_final and count < 15) or config.final_sigmas_type == "zero"
        )
        first_order = i == 0 or lower_order_final
        sigma_t, sigma_s0 = sigmas[i + 1], sigmas[i]
        alpha_t, sigma_t_scaled = _alpha_sigma(sigma_t)
        alpha_s0, sigma_s0_scaled = _alpha_sigma(sigma_s0)
        h = _lambda(sigma_t) - _lambda(sigma_s0)
        x0_scale = alpha_t * (torch.exp(-h) - 1.0)
        rows["alpha"].append(alpha_s0)
        rows["sigma"].append(sigma_s0_scaled)
        rows["z_scale"].append(sigma_t_scaled / sigma_s0_scaled)
        rows["x0_scale"].append(x0_scale)
        if first_order:
            rows["correction_scale"].append(torch.zeros(()))
            rows["inverse_r0"].append(torch.zeros(()))
        else:
            h_0 = _lambda(sigma_s0) - _lambda(sigmas[i - 1])
            rows["correction_scale"].append(0.5 * x0_scale)
            rows["inverse_r0"].append(1.0 / (h_0 / h))
    return SolverSchedule(
        timesteps=scheduler.timesteps.clone(),
        **{name: torch.stack(values).float() for name, values in rows.items()},
    )


def data_prediction(schedule: SolverSchedule, step: torch.Tensor, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0 = (z - sigma_s * eps) / alpha_s at step index `step` (a (1,) int64 device tensor)."""
    sigma, alpha = schedule.sigma.index_select(0, step), schedule.alpha.index_select(0, step)
    return (z - sigma * eps) / alpha


def solver_update(
    schedule: SolverSchedule, step: torch.Tensor, z: torch.Tensor, x0: torch.Tensor, x0_previous: torch.Tensor
) -> torch.Tensor:
    """z_next = (sigma_t/sigma_s) z - E x0 - (E/2) (x0 - x0_prev) / r0, E = alpha_t (e^-h - 1), in fp32.

    On first-order steps the last term's scalars are 0, so one expression serves every step.
    """
    def pick(values: torch.Tensor) -> torch.Tensor:
        return values.index_select(0, step)

    correction = pick(schedule.inverse_r0) * (x0 - x0_previous)
    scaled = pick(schedule.z_scale) * z.float()
    return scaled - pick(schedule.x0_scale) * x0 - pick(schedule.correction_scale) * correction
