"""One dual-UNet step with guidance, both solver updates and the blend fused: the fast denoiser.

`SequentialDenoiser` (denoise.py) is the plain reference: two diffusers schedulers, Python-side
history, a host sync per step. Here a step is one function of tensors only:

    eps  = DualUNet([z_mb x3, z_ip x3] ++ image latents, t, context)     # both weight sets
    z_mb = DPM++(z_mb, guided(eps[:3])),  z_ip = DPM++(z_ip, guided(eps[3:]))
    z_ip = (z_ip + beta z_mb) / (1 + beta)

with the solver's per-step scalars precomputed (solver.py), the step index, guidance scales and
beta held in device tensors, and the trajectories in persistent fp32 buffers updated in place — no
`.item()`, no host round trip, the same shapes every step: what `torch.compile` and CUDA-graph
capture need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import EditConfig
from .denoise import DenoiseInputs, blend_latents, guided_noise, make_scheduler
from .localize import Accumulate, AttentionAccumulator, attention_grid, record_cross_attention
from .models import NormScope, pytorch_norms
from .solver import SolverSchedule, data_prediction, solver_schedule, solver_update


class DualUNet(nn.Module):
    """Both UNets (same architecture, two weight sets) on one batch [MagicBrush x3B, IP2P x3B].

    Two calls of the real UNets; with `streams` (CUDA), MagicBrush's runs on a side stream beside
    IP2P's, joined before the outputs are concatenated. Measured on an H100 at 512² fp16, replayed
    from a CUDA graph: 26.5 ms for two streams, 31.0 ms for two calls in order, 23.2 ms for ONE UNet
    on all 6 rows (benchmarks/RESULTS.md); stacked weights under vmap were slower than either.
    """

    def __init__(self, mb_unet: nn.Module, ip2p_unet: nn.Module, streams: bool = False) -> None:
        super().__init__()
        self.mb_unet, self.ip2p_unet = mb_unet, ip2p_unet
        self.streams = streams
        self._side: torch.cuda.Stream | None = None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """sample (6B, 8, h, w), timestep (1,), context (3B, 77, C) -> eps (6B, 4, h, w), for B edits."""
        mb_sample, ip2p_sample = sample.chunk(2)
        if not (self.streams and sample.is_cuda):
            mb = self.mb_unet(mb_sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
            ip2p = self.ip2p_unet(ip2p_sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
            return torch.cat([mb, ip2p])
        main = torch.cuda.current_stream(sample.device)
        if self._side is None:
            self._side = torch.cuda.Stream(sample.device)
        self._side.wait_stream(main)  # the inputs were written on the main stream
        with torch.cuda.stream(self._side):
            mb = self.mb_unet(mb_sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
        ip2p = self.ip2p_unet(ip2p_sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
        main.wait_stream(self._side)
        mb.record_stream(main)  # freed after the main stream's use of it, not the side stream's
        return torch.cat([mb, ip2p])


@dataclass
class DualState:
    """Persistent device buffers of the loop for B edits, updated in place every step."""

    z_mb: torch.Tensor  # (B, 4, h, w) float32
    z_ip: torch.Tensor
    x0_mb: torch.Tensor  # previous data predictions, for the second-order update
    x0_ip: torch.Tensor
    step: torch.Tensor  # (1,) int64

    @classmethod
    def start(cls, noise: torch.Tensor) -> DualState:
        buffers = [torch.empty_like(noise, dtype=torch.float32) for _ in range(4)]
        state = cls(*buffers, torch.empty(1, dtype=torch.long, device=noise.device))
        state.reset_(noise)
        return state

    def reset_(self, noise: torch.Tensor) -> None:
        """Both trajectories at z_T (init_noise_sigma is 1 for DPM-Solver), no history, step 0; in place."""
        self.z_mb.copy_(noise)
        self.z_ip.copy_(noise)
        self.x0_mb.zero_()
        self.x0_ip.zero_()
        self.step.zero_()


def dual_step(
    unet: DualUNet, schedule: SolverSchedule, state: DualState, image_latents: torch.Tensor,
    context: torch.Tensor, guidance: torch.Tensor, beta: torch.Tensor,
) -> None:
    """Advance both trajectories of B edits by one step, in place.

    image_latents (3B, 4, h, w) and context (3B, 77, C): each edit's 3 guidance rows in turn;
    guidance (2,) = (text, image) scales, shared; beta (B, 1, 1, 1), one per edit.
    """
    model_dtype = image_latents.dtype
    latents = torch.cat([state.z_mb.repeat_interleave(3, 0), state.z_ip.repeat_interleave(3, 0)]).to(model_dtype)
    model_input = torch.cat([latents, image_latents.repeat(2, 1, 1, 1)], dim=1)  # (6B, 8, h, w)
    eps_mb, eps_ip = unet(model_input, schedule.timesteps.index_select(0, state.step), context).float().chunk(2)
    text_scale, image_scale = guidance[0], guidance[1]
    advance(schedule, state, guided_noise(eps_mb, text_scale, image_scale),
            guided_noise(eps_ip, text_scale, image_scale), beta)


def advance(schedule: SolverSchedule, state: DualState, eps_mb: torch.Tensor, eps_ip: torch.Tensor,
            beta: torch.Tensor) -> None:
    """Both solver updates from the guided noises (B, 4, h, w) each, then the blend; state in place."""
    x0_mb = data_prediction(schedule, state.step, state.z_mb, eps_mb)
    x0_ip = data_prediction(schedule, state.step, state.z_ip, eps_ip)
    z_mb = solver_update(schedule, state.step, state.z_mb, x0_mb, state.x0_mb)
    z_ip = solver_update(schedule, state.step, state.z_ip, x0_ip, state.x0_ip)
    state.z_ip.copy_(blend_latents(z_ip, z_mb, beta))
    state.z_mb.copy_(z_mb)
    state.x0_mb.copy_(x0_mb)
    state.x0_ip.copy_(x0_ip)
    state.step.add_(1)


@dataclass
class CapturedStep:
    """One dual step recorded as a CUDA graph over static buffers, for one (batch, latent size, steps).

    Replays read `state.step` on the device, so one graph serves every step. What the graph reads
    is copied into `inputs`, `state`, `guidance` and `beta` before an edit; what it writes (the
    trajectories, each edit's attention sum in `attention`) is read after.
    """

    graph: torch.cuda.CUDAGraph
    inputs: DenoiseInputs
    state: DualState
    guidance: torch.Tensor
    beta: torch.Tensor
    attention: list[AttentionAccumulator]
    rows_per_step: list[int]


class FusedDualDenoiser:
    """The `Denoiser` built on `dual_step`; `compile=True` runs the step through torch.compile;
    `cuda_graphs=True` (on CUDA) captures the step once per (batch, latent size, steps) and replays it;
    `pad_batches` (default: with either) rounds batch sizes up to powers of two; `shared_graph_pool`
    (default) lets every captured step allocate from one memory pool (`_capture`), False gives each its
    own as PyTorch does by default (to measure the difference: benchmarks/graph_memory.py). Under CUDA
    graphs without compile, the two UNets run on two streams inside the graph (DualUNet). `norms`: how
    the UNets' GroupNorms run while denoising (models.NormScope; backends.make_group_norms chooses)."""

    def __init__(self, ip2p_unet: nn.Module, mb_unet: nn.Module, scheduler_config: dict, compile: bool = False,
                 cuda_graphs: bool = False, pad_batches: bool | None = None, shared_graph_pool: bool = True,
                 norms: NormScope = pytorch_norms) -> None:
        self.unet = DualUNet(mb_unet, ip2p_unet, streams=cuda_graphs and not compile)
        self.norms = norms
        self.scheduler_config = scheduler_config
        if compile:
            allow_recompiles(COMPILE_RECOMPILE_LIMIT)
        self.step_fn = torch.compile(dual_step, dynamic=False) if compile else dual_step
        self.cuda_graphs = cuda_graphs
        # Shapes are what compilation and capture are keyed by: bound them unless told otherwise.
        self.pad_batches = compile or cuda_graphs if pad_batches is None else pad_batches
        self._schedules: dict[tuple[int, torch.device], SolverSchedule] = {}
        self._graphs: dict[tuple, CapturedStep] = {}
        self.shared_graph_pool = shared_graph_pool
        self._graph_pool: tuple[int, int] | None = None  # the pool every captured step shares (if shared_graph_pool)
        self.captures = 0  # graphs recorded so far: one per new shape, never one per edit

    def schedule(self, steps: int, device: torch.device) -> SolverSchedule:
        key = (steps, device)
        if key not in self._schedules:
            self._schedules[key] = solver_schedule(make_scheduler(self.scheduler_config), steps).to(device)
        return self._schedules[key]

    @torch.inference_mode()
    def __call__(self, inputs: DenoiseInputs, config: EditConfig, beta: float, attention: AttentionAccumulator,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        return self.denoise_batch([inputs], config, [beta], [attention], on_step)[0]

    @torch.inference_mode()
    def denoise_batch(
        self, inputs: Sequence[DenoiseInputs], config: EditConfig, betas: Sequence[float],
        attention: Sequence[AttentionAccumulator], on_step: Callable[[int], None] | None = None,
    ) -> list[torch.Tensor]:
        """B edits of one latent size as one batch (6B UNet rows a step); each edit's final z_ip (1, 4, h, w).

        With `pad_batches`, B is rounded up to a power of two with copies of the last edit whose
        results are dropped: a server's batches of 1..N then need log2(N) + 1 compiled graphs or
        CUDA-graph captures per size, not N.
        """
        edits = len(inputs)
        if self.pad_batches:
            padding = padded_batch(edits) - edits
            inputs = [*inputs, *[inputs[-1]] * padding]
            betas = [*betas, *[betas[-1]] * padding]
            attention = [*attention, *(AttentionAccumulator(attention[-1].accumulate) for _ in range(padding))]
        batch = DenoiseInputs.stack(inputs)
        device = batch.noise.device
        schedule = self.schedule(config.steps, device)
        guidance = torch.tensor([config.text_guidance, config.image_guidance], device=device)
        beta_tensor = torch.tensor(betas, device=device).view(-1, 1, 1, 1)
        if self.cuda_graphs and device.type == "cuda":
            latents = self._replay(batch, schedule, guidance, beta_tensor, attention, on_step)
        else:
            with self._denoising(batch, attention):
                latents = self._loop(batch, schedule, DualState.start(batch.noise), guidance, beta_tensor, on_step)
        return list(latents.to(batch.noise.dtype).split(1))[:edits]

    @contextlib.contextmanager
    def _denoising(self, batch: DenoiseInputs, accumulators: Sequence[AttentionAccumulator]) -> Iterator[None]:
        """The UNets as a step runs them: IP2P's cross-attention recorded into `accumulators` (their sums
        allocated first: a compiled step then traces one code path from its first call on, one compilation,
        not two), the GroupNorms as `norms` says."""
        latent_size = tuple(batch.noise.shape[-2:])
        grid = attention_grid(latent_size)
        for accumulator in accumulators:
            accumulator.reserve(grid[0] * grid[1], batch.context.shape[1], batch.noise.device)
        with self.norms(self.unet.mb_unet, self.unet.ip2p_unet), \
                record_cross_attention(self.unet.ip2p_unet, latent_size, grid, accumulators):
            yield

    def _loop(self, batch: DenoiseInputs, schedule: SolverSchedule, state: DualState, guidance: torch.Tensor,
              beta: torch.Tensor, on_step: Callable[[int], None] | None) -> torch.Tensor:
        for index in range(schedule.steps):
            self.step_fn(self.unet, schedule, state, batch.image_latents, batch.context, guidance, beta)
            if on_step is not None:
                on_step(index)
        return state.z_ip

    def _replay(self, batch: DenoiseInputs, schedule: SolverSchedule, guidance: torch.Tensor, beta: torch.Tensor,
                attention: Sequence[AttentionAccumulator], on_step: Callable[[int], None] | None) -> torch.Tensor:
        key = (tuple(batch.noise.shape), batch.context.shape, batch.image_latents.dtype, schedule.steps)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch, schedule, guidance, beta, attention[0].accumulate)
        captured = self._graphs[key]
        load_static(captured, batch, guidance, beta)
        for index in range(schedule.steps):
            captured.graph.replay()
            if on_step is not None:
                on_step(index)
        for edit, static, rows in zip(attention, captured.attention, captured.rows_per_step, strict=True):
            edit.add_sum(static.total.clone(), rows * schedule.steps)
        return captured.state.z_ip.clone()

    def _capture(self, batch: DenoiseInputs, schedule: SolverSchedule, guidance: torch.Tensor,
                 beta: torch.Tensor, accumulate: Accumulate) -> CapturedStep:
        """Warm up on a side stream (allocations, autotuning happen outside the graph), then record one step.

        Every captured step allocates from one shared memory pool (unless `shared_graph_pool=False`: a pool
        each, PyTorch's default, for graph_memory's comparison). What a step reads and writes across
        replays (inputs, trajectories, attention sums) lives in static buffers made before its capture, so
        whatever it allocates while captured is a temporary, dead by the step's end: steps of different
        shapes can then reuse each other's memory and replay in any order. A server's graphs (each image
        size by each padded batch size) hold the largest step's temporaries, not the sum of them all.
        """
        if self._graph_pool is None and self.shared_graph_pool:
            self._graph_pool = torch.cuda.graph_pool_handle()
        static = DenoiseInputs(batch.context.clone(), batch.image_latents.clone(), batch.noise.clone())
        state = DualState.start(static.noise)
        accumulators = [AttentionAccumulator(accumulate) for _ in range(batch.noise.shape[0])]
        static_guidance, static_beta = guidance.clone(), beta.clone()
        args = (self.unet, schedule, state, static.image_latents, static.context, static_guidance, static_beta)
        with self._denoising(static, accumulators):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    state.step.zero_()
                    self.step_fn(*args)
            torch.cuda.current_stream().wait_stream(side)
            rows_per_step = [accumulator.rows // WARMUP_STEPS for accumulator in accumulators]
            state.step.zero_()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self.step_fn(*args)
        self.captures += 1
        return CapturedStep(graph, static, state, static_guidance, static_beta, accumulators, rows_per_step)


# On the H100's torch 2.11, dynamo split the UNet at a graph break into per-block frames, and
# ResnetBlock2D.forward needs one compiled entry per (channels, size) of SD1.5's blocks (about 16):
# past dynamo's default limit of 8 the rest of the UNet ran eager. Our torch 2.14 traces one graph.
COMPILE_RECOMPILE_LIMIT = 64


def allow_recompiles(limit: int) -> None:
    """Raise dynamo's per-frame recompile limit to `limit` (never lower one the process set higher)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)


def padded_batch(edits: int) -> int:
    """The batch size a padding denoiser runs `edits` edits as: the next power of two."""
    return 1 << (edits - 1).bit_length()


WARMUP_STEPS = 3  # eager steps before capture, as torch.cuda.graphs' documentation advises


def load_static(captured: CapturedStep, batch: DenoiseInputs, guidance: torch.Tensor, beta: torch.Tensor) -> None:
    """Copy one edit batch into a captured step's static buffers and reset its loop state."""
    captured.inputs.context.copy_(batch.context)
    captured.inputs.image_latents.copy_(batch.image_latents)
    captured.state.reset_(batch.noise)
    captured.guidance.copy_(guidance)
    captured.beta.copy_(beta)
    for accumulator in captured.attention:
        accumulator.total.zero_()
