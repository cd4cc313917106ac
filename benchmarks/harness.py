"""`zone bench` / `python -m zone_benchmarks`: the reference-style baseline and every engine backend, one run.

One process builds the random-weight models once, then times (a) the baseline (benchmarks/baseline.py)
and (b) the engine with each backend the config names (`--backends`, of `zone_engine.config.DENOISERS`,
and the variant rows), on the same image, seed,
steps and forced action; with `batch` > 1 it also times batches of concurrent edits
(`ZonePipeline.edit_batch`) on every engine backend that denoises a batch as one; compares their
outputs; and writes JSON, markdown and a PNG chart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import NoReturn, TypeVar

import numpy as np
import torch

from zone_engine.action import classify_action
from zone_engine.backends import DTYPES, current_device, resolve_device, resolve_dtype
from zone_engine.cli import error_line
from zone_engine.config import DENOISERS, LATENT_SCALE, EditConfig, command_line_spelling
from zone_engine.denoise import BatchDenoiser, Denoiser
from zone_engine.errors import ZoneError, first_line
from zone_engine.graphs import CapturedCalls
from zone_engine.image_io import make_sample_image, working_geometry
from zone_engine.models import ZoneModels, build_random_components, pytorch_norms, unets_channels_last
from zone_engine.paths import nearest_existing
from zone_engine.pipeline import STAGES, EditRequest, EditResult, ZonePipeline
from zone_engine.sam_onnx import TRT_CACHE
from zone_engine.timing import Stopwatch
from zone_export.sam import EXPORT_FILES, export_sam

from .baseline import ReferenceStyleZone
from .measure import (
    INTERRUPTED,
    Deadline,
    PeakMemory,
    StepClock,
    attempt,
    machine_info,
    matmul_peak,
    process_peak_rss_bytes,
    step_timed,
    summarize,
    unet_flops_per_row,
)
from .options import BUILDING_BACKENDS, BenchConfig
from .report import NO_MATPLOTLIB, markdown, write_reports

ROWS_PER_STEP = 6  # 2 UNets x 3 guidance branches (ZONE.md cost model)
THROUGHPUT_LABEL = ("sequential: the timed edits run one after another, edits ÷ wall time (batches of "
                    "concurrent edits: batched_throughput, --batch N; batched serving over HTTP: "
                    "python -m zone_benchmarks.load_test)")
BATCHED_THROUGHPUT_LABEL = ("batched: rounds of one ZonePipeline.edit_batch of B concurrent requests (same image "
                            "and instruction, seeds seed..seed+B-1; each request's classification paid for, as in a "
                            "sequential edit), their denoising one batched dual-UNet loop; edits ÷ wall time")

Progress = Callable[[str], None]
T = TypeVar("T")
EditRun = Callable[[], tuple[EditResult, dict[str, float], list[float]]]


# ------------------------------------------------------------------------------------------ running


@torch.inference_mode()
def prime(models: ZoneModels, latent_size: tuple[int, int], device: torch.device) -> None:
    """One untimed call of each network at the edit's shapes: CPU kernels are built on first use.

    Used instead of warm-up edits when `warmup` is 0, so that one-time costs land on no implementation.
    """
    dtype = next(models.ip2p_unet.parameters()).dtype
    context = models.text_encoder(torch.zeros(3, 77, dtype=torch.long, device=device))[0]
    pixels = torch.zeros(1, 3, latent_size[0] * LATENT_SCALE, latent_size[1] * LATENT_SCALE, device=device, dtype=dtype)
    latents = models.vae.encode(pixels).latent_dist.mode()
    sample = torch.randn(3, 8, *latent_size, device=device, dtype=dtype)
    for unet in (models.mb_unet, models.ip2p_unet):
        unet(sample, torch.tensor(999, device=device), encoder_hidden_states=context)
    models.vae.decode(latents)
    side = models.sam.image_encoder.img_size  # SAM's encoder takes one size: the baseline's and the engine's refine
    models.sam.image_encoder(torch.zeros(1, 3, side, side, device=device, dtype=next(models.sam.parameters()).dtype))


@dataclass
class Implementation:
    """One row of the report: a name, the dtype it runs in, and how to run one edit."""

    name: str
    dtype: str
    edit: EditRun
    warmup_s: list[float] = dataclasses.field(default_factory=list)
    timings: list[dict[str, float]] = dataclasses.field(default_factory=list)
    steps: list[list[float]] = dataclasses.field(default_factory=list)
    peak_memory: list[dict] = dataclasses.field(default_factory=list)
    walls: list[float] = dataclasses.field(default_factory=list)
    result: EditResult | None = None
    pipe: ZonePipeline | None = None  # engine rows: their pipeline, for the batched measurement
    batched: BatchedRun | None = None
    batched_skip: str | None = None  # why this row has no batched measurement (with batch > 1)
    failure: str | None = None  # an engine row whose edit raised: reported in its place, the run goes on


def builds_on_first_edit(impl: Implementation) -> bool:
    """Whether the row's first edit (at a shape) builds something the timed edits must not pay for: a compile,
    TensorRT engines, or the CUDA graphs a fused row captures (its step's, the text encoder's and the VAE's)."""
    return (impl.name.removeprefix("engine:") in BUILDING_BACKENDS
            or impl.pipe is not None and isinstance(impl.pipe.run, CapturedCalls))


@dataclass
class BatchedRun:
    """Timed `edit_batch` calls of one engine row: `batch` requests each, one call per round."""

    batch: int
    warmup_s: list[float] = dataclasses.field(default_factory=list)
    walls: list[float] = dataclasses.field(default_factory=list)
    steps: list[list[float]] = dataclasses.field(default_factory=list)  # batched step marks, per call
    peak_memory: list[dict] = dataclasses.field(default_factory=list)
    denoise_runs: list[list[int]] = dataclasses.field(default_factory=list)  # loop sizes the denoiser saw
    first_vs_sequential: dict | None = None  # the batch's first edit against the sequential timed edit
    error: str | None = None


def measure(implementations: list[Implementation], config: BenchConfig, device: torch.device,
            progress: Progress, deadline: Deadline) -> None:
    """`repeats` rounds of one timed edit of each implementation, in turn; in the first round each one's
    warm-up edits (untimed) come right before its timed edit, so a run cut short during a long warm-up
    (a compilation) keeps the rows timed before it.

    Interleaving the rounds spreads any drift of the machine (other processes, clocks, heat) over
    every implementation instead of charging it to whichever ran during it. An engine row whose edit
    raises gets its `failure` (the traceback goes to `progress`) and leaves the rounds: one broken
    backend costs its own row, not the run (on a lent GPU, the whole lease). The baseline's raises.
    Every edit starts through `deadline`: once the time is up, the rounds stop where they are.
    """
    def warm_up(impl: Implementation) -> None:
        warmup = max(config.warmup, 1) if builds_on_first_edit(impl) else config.warmup
        for index in range(warmup):
            if deadline.expired():  # a warm-up edit is an edit: none starts past --time-limit either
                return
            started = time.perf_counter()
            impl.edit()
            impl.warmup_s.append(time.perf_counter() - started)
            progress(f"{impl.name}: warm-up {index + 1}/{warmup} {impl.warmup_s[-1]:.1f} s")

    def timed_edit(impl: Implementation, index: int) -> None:
        with PeakMemory(device) as memory:
            started = time.perf_counter()
            impl.result, timings, step_seconds = impl.edit()
            wall = time.perf_counter() - started
        impl.timings.append(timings)
        impl.steps.append(step_seconds)
        impl.peak_memory.append(memory.report())
        impl.walls.append(wall)  # last: a run cut short in between leaves no edit counted half-recorded
        progress(f"{impl.name}: edit {index + 1}/{config.repeats} {timings['total']:.2f} s")

    for index in range(config.repeats):
        if deadline.expired():  # no round left starts an edit: a --repeats the time cannot hold ends here, at once
            break
        for impl in implementations:
            if index == 0:
                deadline.run(partial(_isolated, impl, "warm-up", partial(warm_up, impl), device, progress))
            if impl.failure is None and not deadline.expired():
                deadline.run(partial(_isolated, impl, f"timed edit {index + 1}", partial(timed_edit, impl, index),
                                     device, progress))
                _release(device)


def _isolated(impl: Implementation, what: str, work: Callable[[], None], device: torch.device,
              progress: Progress) -> None:
    """Run `work`; if an engine row's work raises, record it as the row's `failure` instead."""
    if impl.name == "baseline":  # nothing to compare against without it
        work()
        return
    _, impl.failure = _attempt(impl.name, what, work, progress)
    if impl.failure is not None:
        _release(device)


def _attempt(name: str, what: str, work: Callable[[], T], progress: Progress) -> tuple[T | None, str | None]:
    """`measure.attempt` with the row's name before what it reports: the line goes in the report, the
    traceback to `progress` (the log), and the run goes on."""
    return attempt(what, work, lambda message: progress(f"{name}: {message}"))


def batch_requests(image: np.ndarray, config: BenchConfig, edit_config: EditConfig) -> list[EditRequest]:
    """`config.batch` concurrent edits of the benchmark's image and instruction, seeds seed, seed+1, ...

    The first is the sequential timed edit (same seed and inputs), so its result must be the same.
    """
    return [EditRequest(image, config.instruction, edit_config.replace(seed=config.seed + index))
            for index in range(config.batch)]


def batching_rows(implementations: list[Implementation], batch: int) -> list[Implementation]:
    """The rows whose denoiser batches (a `BatchDenoiser`), each given its `BatchedRun`; the others get
    `batched_skip`, the reason they have no batched measurement."""
    batchers = []
    for impl in implementations:
        denoiser = impl.pipe.denoiser if impl.pipe is not None else None
        if denoiser is None:
            impl.batched_skip = "the reference-style baseline edits one image at a time"
        elif not isinstance(denoiser, BatchDenoiser):
            impl.batched_skip = (f"{type(denoiser.denoiser).__name__} is no BatchDenoiser: "
                                 "edit_batch would denoise its edits one after another")
        else:
            impl.batched = BatchedRun(batch)
            batchers.append(impl)
    return batchers


def measure_batched(implementations: list[Implementation], config: BenchConfig, image: np.ndarray,
                    edit_config: EditConfig, device: torch.device, progress: Progress, deadline: Deadline) -> None:
    """With `config.batch` > 1, after the per-stage rounds: `repeats` rounds of one timed `edit_batch`
    of `config.batch` requests for each engine row whose denoiser batches (a `BatchDenoiser`).

    One untimed warm-up batch first when the run has warm-up edits, or when the backend builds
    something per shape (torch.compile, CUDA graphs: a new batch size is a new shape). Rows without
    a batched denoiser get `batched_skip` instead. A batch that fails (e.g. out of memory) is
    recorded as the row's `error`, and the row leaves the rounds; the rest of the run goes on. No batch
    starts once `deadline` says the time is up.
    """
    if config.batch < 2:
        return
    requests = batch_requests(image, config, edit_config)
    batchers = batching_rows(implementations, config.batch)

    def run_batch(impl: Implementation) -> list[EditResult]:
        models = impl.pipe.models
        for request in requests:  # paid for, as beside each sequential edit (the action is forced)
            classify_action(request.instruction, models.tokenizer, models.text_encoder, models.action_classifier,
                            request.config.action_rule)
        return impl.pipe.edit_batch(requests)

    def warm_up(impl: Implementation) -> None:
        started = time.perf_counter()
        run_batch(impl)
        impl.batched.warmup_s.append(time.perf_counter() - started)
        progress(f"{impl.name}: warm-up batch of {config.batch} {impl.batched.warmup_s[-1]:.1f} s")

    def timed_batch(impl: Implementation, index: int) -> None:
        run, denoiser = impl.batched, impl.pipe.denoiser
        denoiser.runs.clear()
        with PeakMemory(device) as memory:
            started = time.perf_counter()
            results = run_batch(impl)
            wall = time.perf_counter() - started
        run.steps.append(denoiser.clock.seconds())
        run.peak_memory.append(memory.report())
        run.denoise_runs.append(list(denoiser.runs))
        run.first_vs_sequential = agreement(results[0], impl.result)
        run.walls.append(wall)  # last: a run cut short in between leaves no batch counted half-recorded
        progress(f"{impl.name}: batch of {config.batch} {index + 1}/{config.repeats} {run.walls[-1]:.2f} s "
                 f"({config.batch / run.walls[-1]:.3g} edits/s)")

    def attempt_batch(impl: Implementation, work: Callable[[], None]) -> None:
        _, impl.batched.error = deadline.run(partial(_attempt, impl.name, f"batch of {config.batch}", work,
                                                     progress)) or (None, None)
        if impl.batched.error is not None:
            batchers.remove(impl)
        _release(device)

    for impl in list(batchers):
        if config.warmup > 0 or builds_on_first_edit(impl):
            attempt_batch(impl, partial(warm_up, impl))
    for index in range(config.repeats):
        if deadline.expired():  # as in `measure`'s rounds
            break
        for impl in list(batchers):
            if not deadline.expired():
                attempt_batch(impl, partial(timed_batch, impl, index))
    for impl in batchers:
        if not impl.batched.walls:
            impl.batched.error = f"no timed batch: the run was cut short ({deadline.reason})"


def summarize_batched(run: BatchedRun, sequential: dict, config: BenchConfig) -> dict:
    """batched_throughput of one row: edits/s over the timed batches, and against the sequential edits/s."""
    edits_per_s = run.batch * len(run.walls) / sum(run.walls) if run.walls else None
    steps = [s for marks in run.steps for s in marks]
    record = {
        "batch": run.batch,
        "batches": len(run.walls),
        "edits_per_s": edits_per_s,
        "wall_s_per_batch": summarize(run.walls),
        "speedup_vs_sequential": edits_per_s / sequential["edits_per_s"] if edits_per_s else None,
        # one step of the batched loop (all B edits), from the denoiser's step marks
        "per_step": summarize(steps) if all(len(marks) == config.steps for marks in run.steps) else None,
        "peak_memory": max(run.peak_memory, key=lambda m: m["bytes"] or 0) if run.peak_memory else None,
        "warmup_s": run.warmup_s,
        # the denoising loops of each timed batch: [B] when the batch was denoised as one
        "denoise_runs": run.denoise_runs,
        "denoised_as_one_batch": bool(run.denoise_runs) and all(r == [run.batch] for r in run.denoise_runs),
        "first_vs_sequential": run.first_vs_sequential,
        "label": BATCHED_THROUGHPUT_LABEL,
    }
    if record["peak_memory"] is not None:
        record["peak_memory"] = {**record["peak_memory"],
                                 "label": record["peak_memory"]["label"].replace("timed edits", "timed batches")}
    if run.error:
        record["error"] = run.error
    return record


def summarize_run(impl: Implementation, config: BenchConfig, device: torch.device) -> dict:
    """Per-stage statistics, per-step time, peak memory and throughput of one implementation."""
    stages = {stage: summarize([t[stage] for t in impl.timings]) for stage in (*STAGES, "total")}
    if all(len(s) == config.steps for s in impl.steps):
        per_step = summarize([s for run in impl.steps for s in run])
        source = "on_step marks per step" + (" (CUDA events)" if device.type == "cuda" else "")
    else:  # the backend does not report steps: the mean is all there is
        per_step = summarize([t["denoise"] / config.steps for t in impl.timings])
        source = "denoise ÷ steps (the backend reports no per-step marks)"
    memory = max(impl.peak_memory, key=lambda m: m["bytes"] or 0)
    throughput = {"edits_per_s": len(impl.walls) / sum(impl.walls), "requests": len(impl.walls),
                  "wall_s": sum(impl.walls), "label": THROUGHPUT_LABEL}
    record = {
        "name": impl.name,
        "dtype": impl.dtype,
        "stages": stages,
        "per_step": per_step,
        "per_step_source": source,
        "warmup_s": impl.warmup_s,  # the first one holds any compilation or engine build
        "peak_memory": memory,
        "throughput": throughput,
        "used_fallback": impl.result.used_fallback,
        "mask_b_fraction": float(impl.result.mask_b.mean()),
        "mask_f_fraction": float(impl.result.mask_f.mean()),
        "region_fraction": float(impl.result.region.mean()),
    }
    # With batch > 1 every row says how it batches: measured, or why not (not_applicable).
    if impl.batched is not None:
        record["batched_throughput"] = summarize_batched(impl.batched, throughput, config)
    elif impl.batched_skip is not None:
        record["batched_throughput"] = {"batch": config.batch, "not_applicable": impl.batched_skip}
    if impl.pipe is not None:  # the GroupNorms that ran (the config says what was asked)
        record["group_norms"] = impl.pipe.group_norms
    return record


def baseline_edit(baseline: ReferenceStyleZone, image: np.ndarray, config: BenchConfig, edit_config: EditConfig,
                  device: torch.device) -> EditRun:
    clock = StepClock(device)

    def edit():
        result = baseline.edit(image, config.instruction, edit_config, step_clock=clock)
        return result, dict(result.timings), clock.seconds()

    return edit


def engine_edit(pipe: ZonePipeline, image: np.ndarray, config: BenchConfig, edit_config: EditConfig) -> EditRun:
    """An engine edit with the action forced (as the baseline's) and classification timed beside it."""
    clock = StepClock(pipe.device)
    pipe.denoiser = step_timed(pipe.denoiser, clock)
    models = pipe.models

    def edit():
        watch = Stopwatch(pipe.device)
        with watch("action"):
            classify_action(config.instruction, models.tokenizer, models.text_encoder, models.action_classifier,
                            edit_config.action_rule)
        result = pipe.edit(image, config.instruction, edit_config)
        timings = dict(result.timings)
        timings["action"] += watch.seconds["action"]
        timings["total"] += watch.seconds["action"]
        return result, timings, clock.seconds()

    return edit


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


AGREEMENT_KEYS = ("max_pixel_diff_image", "max_pixel_diff_styled", "mask_b_identical", "mask_f_identical")


def agreement(result: EditResult, reference: EditResult) -> dict:
    """A batched edit against the same edit run alone: both should be the same image (0 on the CPU, fp32)."""
    differences = compare(result, reference, dtype="")
    return {key: differences[key] for key in AGREEMENT_KEYS}


def compare(result: EditResult, reference: EditResult, dtype: str) -> dict:
    """How far an output is from the baseline's: max pixel differences and mask IoUs."""
    return {
        "dtype": dtype,
        "max_pixel_diff_image": _max_diff(result.image, reference.image),
        "max_pixel_diff_styled": _max_diff(result.styled, reference.styled),
        "iou_mask_b": _iou(result.mask_b, reference.mask_b),
        "mask_b_identical": bool(np.array_equal(result.mask_b, reference.mask_b)),
        "iou_mask_f": _iou(result.mask_f, reference.mask_f),
        "mask_f_identical": bool(np.array_equal(result.mask_f, reference.mask_f)),
        "iou_region": _iou(result.region, reference.region),
        "used_fallback": result.used_fallback,
        "baseline_used_fallback": reference.used_fallback,
    }


def ceiling_dtypes(device: torch.device, engine_dtype: torch.dtype) -> list[torch.dtype]:
    """The run's dtype, and on CUDA also bf16: ZONE.md's floor is dense bf16."""
    if device.type == "cuda" and engine_dtype != torch.bfloat16:
        return [engine_dtype, torch.bfloat16]
    return [engine_dtype]


def cost_floor(models: ZoneModels, latent_size: tuple[int, int], config: BenchConfig, device: torch.device,
               ceilings_at_start: list[dict], runs: list[dict], *, remeasure: bool = True) -> dict:
    """UNet FLOPs per step x 6 rows ÷ measured matmul rate, and each row's denoise time over it.

    The matmul rate is measured before the edits and, with `remeasure` (not in a run cut short), again after
    them; the better of the two is the ceiling (a busy moment can only make a measurement slower).
    """
    flops = unet_flops_per_row(dict(models.ip2p_unet.config), latent_size, models.text_encoder.config.hidden_size)
    ceilings = []
    for at_start in ceilings_at_start:
        at_end = matmul_peak(device, DTYPES[at_start["dtype"]]) if remeasure else None
        ceiling = max(at_start, at_end or at_start, key=lambda c: c["flops_per_s"])
        step_floor = ROWS_PER_STEP * flops / ceiling["flops_per_s"]
        ceilings.append({
            **ceiling,
            "measured_flops_per_s": {"before": at_start["flops_per_s"], "after": at_end and at_end["flops_per_s"]},
            "step_floor_s": step_floor,
            "denoise_floor_s": step_floor * config.steps,
            "gap": {run["name"]: run["stages"]["denoise"]["median"] / (step_floor * config.steps)
                    for run in runs if "skipped" not in run},
        })
    return {"unet_gflop_per_row": flops / 1e9, "rows_per_step": ROWS_PER_STEP,
            "denoise_tflop": flops * ROWS_PER_STEP * config.steps / 1e12, "latent_size": list(latent_size),
            "ceilings": ceilings}


def _parameter_counts(models: ZoneModels) -> dict[str, int]:
    nets = {"ip2p_unet": models.ip2p_unet, "mb_unet": models.mb_unet, "vae": models.vae,
            "text_encoder": models.text_encoder, "sam": models.sam}
    return {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        # A device error (an illegal address, say) outlives the edit that raised it, and empty_cache
        # raises it again: that row has its failure recorded already, and the run goes on.
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def variant_denoiser(backends: Sequence[str]) -> str:
    """The denoiser of the refinement-variant rows (sam-onnx, sam-bf16): the fastest fused-family backend
    in `backends` (compile, measured ahead of fused end to end on the H100; else fused), else the first."""
    return next((kind for kind in ("compile", "fused") if kind in backends), backends[0])


def bench_words(reason: str) -> str:
    """A pipeline's refusal as `zone bench`'s report says it: the command line's option names alone, not beside
    their Python spelling, and a backend by its name, as `--backends` gives it, not as `zone edit`'s --denoiser."""
    return re.sub(r"--denoiser (\w+)", r"the \1 backend", command_line_spelling(reason))


@dataclass
class EngineRows:
    """Builds the engine rows of one run, on the run's shared models, image and settings. A backend (or
    refinement provider) this machine lacks becomes a row in `skipped` with its reason."""

    config: BenchConfig
    models: ZoneModels
    device: torch.device
    image: np.ndarray
    edit_config: EditConfig
    skipped: list[dict] = dataclasses.field(default_factory=list)
    # SAM's ONNX export, made on first use: its folder, seconds, and whether it created the folder
    sam_export: dict = dataclasses.field(default_factory=dict)
    denoisers: dict[str, Denoiser] = dataclasses.field(default_factory=dict)  # shared by the variant rows

    def build(self, dtype: torch.dtype) -> list[Implementation]:
        """One row per backend of the preset, then the refinement variants of the fastest fused-family one."""
        built = [row for kind in self.config.backends if (row := self._row(f"engine:{kind}", dtype, kind,
                                                                             self._backend_options(kind)))]
        if self.config.sam_onnx:
            built += self._refine_variant(dtype, "sam-onnx", self._onnx_refine_options)
        if self.config.sam_precision:
            built += self._refine_variant(dtype, f"sam-{self.config.sam_precision}",
                                          lambda: {"sam_precision": self.config.sam_precision})
        if self.config.compare_group_norm:
            built += self._pytorch_norm_variant(dtype)
        return built

    def _backend_options(self, kind: str) -> Callable[[], dict]:
        """A backend's own ZonePipeline options: the tensorrt row's engine folder (--engines)."""
        if kind != "tensorrt" or self.config.engines is None:
            return dict  # no folder: ZonePipeline says what the row needs, and the row is skipped with it
        return lambda: {"engines": self.config.engines}

    def _row(self, name: str, dtype: torch.dtype, denoiser: str | Denoiser,
             options: Callable[[], dict]) -> Implementation | None:
        """`options`: more ZonePipeline arguments, asked for inside the check (they may need an export)."""
        try:
            settings = {"channels_last": self.config.channels_last, "group_norm": self.config.group_norm, **options()}
            pipe = ZonePipeline(self.models, self.device, dtype, default_config=self.edit_config, denoiser=denoiser,
                                **settings)
            # Made now, untimed: the pipeline makes its segmenter at its first refine (ONNX Runtime's sessions,
            # SAM's reduced-precision copy), a one-time cost that landed in the row's first timed edit.
            pipe.segmenter(self.edit_config.sam)
        except (ZoneError, ImportError, RuntimeError) as error:  # a backend or provider this machine lacks
            self.skipped.append({"name": name, "skipped": bench_words(first_line(error))})
            return None
        if isinstance(denoiser, str):
            self.denoisers.setdefault(denoiser, pipe.denoiser)  # the backend's own row's, for its variants
        return Implementation(name, self.config.dtype, engine_edit(pipe, self.image, self.config, self.edit_config),
                              pipe=pipe)

    def _refine_variant(self, dtype: torch.dtype, suffix: str, options: Callable[[], dict]) -> list[Implementation]:
        """The variant denoiser's row with another refinement backend, on the same denoiser object as that
        row: compiled and captured once."""
        kind = variant_denoiser(self.config.backends)
        row = self._row(f"engine:{kind}+{suffix}", dtype, self.denoisers.get(kind, kind), options)
        return [row] if row else []

    def _pytorch_norm_variant(self, dtype: torch.dtype) -> list[Implementation]:
        """The fused row again with PyTorch's GroupNorm, on a denoiser of its own (its UNets' norms are part
        of its captured steps): kernel 3's gain, in this run. The compile backend's UNets use inductor's
        norm either way, so the fused one it is."""
        name = "engine:fused+gn-torch"
        fused = self.denoisers.get("fused")
        reason = ("needs the fused backend" if fused is None else
                  "the fused row's norms are PyTorch's already: it would be timed twice" if
                  fused.norms is pytorch_norms else None)
        if reason:
            self.skipped.append({"name": name, "skipped": reason})
            return []
        row = self._row(name, dtype, "fused", lambda: {"group_norm": "torch"})
        return [row] if row else []

    def _onnx_refine_options(self) -> dict:
        """Refinement on ONNX Runtime, SAM exported here once."""
        if self.device.type == "cuda" and not onnxruntime_has_cuda():
            raise ZoneError("this onnxruntime has no CUDA provider: SAM on its CPU provider would not be "
                            "comparable (install onnxruntime-gpu)")
        if "folder" not in self.sam_export:
            started, folder = time.perf_counter(), self.config.sam_export_folder
            created = not folder.exists()  # else a folder of before, or another run's into the same --out
            self.sam_export["folder"] = export_sam(self.models.sam, self.config.sam_type, folder)
            self.sam_export["seconds"] = time.perf_counter() - started
            self.sam_export["created"] = created
        return {"segmenter": "onnx", "sam_onnx": self.sam_export["folder"]}


@dataclass
class Parity:
    """An engine edit in fp32, compared with the baseline's: its row's name and result, or why it failed."""

    name: str | None
    result: EditResult | None = None
    failure: str | None = None

    def report(self, reference: EditResult) -> dict | None:
        if self.result is not None:
            return {"name": self.name, **compare(self.result, reference, "fp32")}
        return {"name": self.name, "failed": self.failure} if self.failure else None


def _stop_untimed(deadline: Deadline) -> NoReturn:
    """A run stopped before the baseline's first timed edit has nothing to report: after a Ctrl-C, the interrupt
    (exit 130, as every zone command's); after a time limit or SIGTERM, why."""
    if deadline.reason == INTERRUPTED:
        raise KeyboardInterrupt
    advice = "; give it more time (--time-limit)" if deadline.ran_out else ""
    raise ZoneError(f"the run was cut short before the baseline's first timed edit ({deadline.reason}): nothing to "
                    f"compare{advice}")


def timed_rows(baseline: Implementation, rows: EngineRows, engine_dtype: torch.dtype, progress: Progress,
               deadline: Deadline) -> tuple[list[Implementation], Parity]:
    """Every row's warm-up and timed edits, and the fp32 parity edit; the rows that failed, or that the
    deadline left without a timed edit, join `skipped`.

    fp32: every implementation in each round, an engine row first (with no warm-up edit, any one-time cost
    left lands on an engine), then the baseline (a run cut short early still has it to compare with), then
    the other engine rows; the first engine row that ran is the parity edit. Half precision: the engine
    casts the shared weights in place, so the fp32 baseline runs first, then one untimed fp32 engine:eager
    edit for parity, then the engine rows.
    """
    config, device = rows.config, rows.device
    if deadline.expired():  # during the models' build: no row is built (SAM's ONNX export, compilation) for nothing
        _stop_untimed(deadline)

    def built_rows() -> list[Implementation]:
        """The engine rows; none when the time is up first or a signal comes while they are built (SAM's ONNX
        export, a minute for vit_b on a CPU, went on to its end after a first Ctrl-C): no edit of theirs starts."""
        built = deadline.run(partial(rows.build, engine_dtype))
        if built is None:
            rows.skipped.append({"name": "engine rows", "skipped": f"not built: the run was cut short "
                                 f"({deadline.reason})"})
        return built or []

    if engine_dtype == torch.float32:
        engines = built_rows()
        timed = [*engines[:1], baseline, *engines[1:]]
        measure(timed, config, device, progress, deadline)
        first = next((impl for impl in timed if impl is not baseline and impl.failure is None), None)
        parity = Parity(first.name, first.result) if first else Parity(None)
    else:
        measure([baseline], config, device, progress, deadline)
        parity = Parity("engine:eager (fp32, untimed)")

        def parity_edit() -> EditResult:
            pipe = ZonePipeline(rows.models, device, torch.float32, default_config=rows.edit_config, denoiser="eager")
            return pipe.edit(rows.image, config.instruction, rows.edit_config)

        parity.result, parity.failure = deadline.run(partial(_attempt, parity.name, "edit", parity_edit, progress)) \
            or (None, f"not run: the run was cut short ({deadline.reason})")
        timed = [baseline, *built_rows()]
        measure(timed[1:], config, device, progress, deadline)
    if not baseline.walls:
        _stop_untimed(deadline)
    rows.skipped += [{"name": impl.name, "skipped": impl.failure or f"no timed edit: the run was cut short "
                      f"({deadline.reason})"} for impl in timed if impl.failure or not impl.walls]
    return [impl for impl in timed if impl.failure is None and impl.walls], parity


def run_benchmark(config: BenchConfig, progress: Progress = lambda _: None, deadline: Deadline | None = None,
                  sam_export: dict | None = None) -> dict:
    """Run the whole benchmark in this process and return its record (what the JSON file holds).
    Past `config.time_limit_s`, or on SIGTERM (the `timeout` around a device stage) or Ctrl-C, no more
    edits start and what was timed by then is reported (the record's `cut_short` says why). A caller's
    `deadline` comes with its signal handlers installed by the caller (`run_and_report`); its `sam_export`, a
    dict, gets where the +sam-onnx row's export went and whether it created that folder (`EngineRows.sam_export`)."""
    if deadline is None:
        deadline = Deadline(config.time_limit_s)
        with deadline.stopping_on_signals():
            return run_benchmark(config, progress, deadline, sam_export)
    device = resolve_device(config.device)
    # The device current for the whole run: the baseline, the clocks' events and the matmul ceiling
    # use the current device's stream, so a run on cuda:1 would otherwise time cuda:0.
    try:
        with current_device(device):
            return _measure_and_record(config, device, deadline, progress, {} if sam_export is None else sam_export)
    finally:
        gc.unfreeze()  # what the build froze (below) is the collector's again


def _measure_and_record(config: BenchConfig, device: torch.device, deadline: Deadline, progress: Progress,
                        sam_export: dict) -> dict:
    started = time.perf_counter()
    load_before = os.getloadavg()
    engine_dtype = resolve_dtype(config.dtype, device)
    unknown = [kind for kind in config.backends if kind not in DENOISERS]
    if unknown:
        raise ZoneError(f"unknown backend(s) {', '.join(unknown)}: available {', '.join(DENOISERS)}")

    ceilings_at_start = [matmul_peak(device, dtype) for dtype in ceiling_dtypes(device, engine_dtype)]
    # Under the deadline: a Ctrl-C or SIGTERM during the build (up to a minute) stops it, there is nothing to report.
    built = deadline.run(partial(_build_models, config, device, progress))
    if built is None:
        _stop_untimed(deadline)
    models, build_s = built
    # What exists now (the modules imported, the models) lives to the end of the run: the collections between rows
    # (_release) skip it, each a few milliseconds where scanning it all took 0.5 s on the CPU.
    gc.freeze()
    image = make_sample_image(config.resolution, config.resolution)
    # Worked on at --resolution (the engine's default max_side, 512, would shrink a larger image to it).
    edit_config = EditConfig(steps=config.steps, seed=config.seed, action=config.action, sam=config.sam,
                             max_side=config.resolution)
    latent_size = working_geometry(*image.shape[:2], edit_config.max_side, edit_config.size_multiple).latent_size
    priming = _prime_unless_warming_up(config, models, latent_size, device)
    baseline = Implementation("baseline", "fp32",
                              baseline_edit(ReferenceStyleZone(models, device), image, config, edit_config, device))
    left_out = [kind for kind in DENOISERS if kind not in config.backends]
    rows = EngineRows(config, models, device, image, edit_config,
                      skipped=[{"name": f"engine:{kind}", "skipped": f"not in this run's --backends (add ...,{kind})"}
                               for kind in left_out], sam_export=sam_export)
    timed, parity = timed_rows(baseline, rows, engine_dtype, progress, deadline)
    # Batches of concurrent edits, after the per-stage rounds (each row's sequential result is its check).
    measure_batched(timed, config, image, edit_config, device, progress, deadline)
    if deadline.reason:
        progress(f"cut short: {deadline.reason}; reporting what was measured")
    timed.sort(key=lambda impl: impl is not baseline)
    runs = [summarize_run(impl, config, device) for impl in timed] + rows.skipped
    quality, speedup = _against_baseline(timed, runs)
    floor, floor_error = _floor(models, latent_size, config, device, ceilings_at_start, runs, deadline, progress)
    return {
        "schema": 1,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(device),
        "config": _config_record(config, priming, engine_dtype, device),
        "model_parameters": _parameter_counts(models),
        "model_build_s": build_s,
        "sam_onnx_export_s": rows.sam_export.get("seconds"),
        "runs": runs,
        "quality": quality,
        "parity": parity.report(baseline.result),
        "speedup": speedup,
        "floor": floor,
        "floor_error": floor_error,
        "cut_short": deadline.reason,  # None, or why no more work started (rows have fewer timed edits)
        "process_peak_rss_bytes": process_peak_rss_bytes(),
        # Other processes on the machine skew CPU timings: the 1-minute load average before and after.
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - started,
    }


def _floor(models: ZoneModels, latent_size: tuple[int, int], config: BenchConfig, device: torch.device,
           ceilings_at_start: list[dict], runs: list[dict], deadline: Deadline,
           progress: Progress) -> tuple[dict | None, str | None]:
    """The cost floor and None, or None and why it failed. A device left unusable by a failed row loses the
    floor, not the report (the error is recorded); a run cut short keeps it, on the ceiling measured before the
    edits alone."""
    progress("measuring the matmul ceiling and counting UNet FLOPs")

    def floor_work(remeasure: bool) -> tuple[dict | None, str | None]:
        return _attempt("floor", "measurement", lambda: cost_floor(
            models, latent_size, config, device, ceilings_at_start, runs, remeasure=remeasure), progress)

    return deadline.run(partial(floor_work, True)) or floor_work(False)


def _build_models(config: BenchConfig, device: torch.device, progress: Progress) -> tuple[ZoneModels, float]:
    """The real-size architectures with random weights, and the seconds they took to build."""
    progress(f"building {config.models} models with random weights (SAM {config.sam_type})")
    started = time.perf_counter()
    models = build_random_components(config.models, config.model_seed, config.sam_type).to(device, torch.float32)
    build_s = time.perf_counter() - started
    progress(f"models built in {build_s:.1f} s")
    return models, build_s


def _against_baseline(timed: list[Implementation], runs: list[dict]) -> tuple[dict, dict]:
    """Each engine row's output difference from the baseline's (same seed, same inputs: a speed-up must not hide
    a different result) and its speed-up; the baseline is the first of both lists."""
    baseline = timed[0]
    quality = {impl.name: compare(impl.result, baseline.result, impl.dtype) for impl in timed[1:]}
    base_total = runs[0]["stages"]["total"]["median"]
    speedup = {run["name"]: base_total / run["stages"]["total"]["median"] for run in runs if "skipped" not in run}
    return quality, speedup


def _prime_unless_warming_up(config: BenchConfig, models: ZoneModels, latent_size: tuple[int, int],
                             device: torch.device) -> str:
    """Without warm-up edits, call each network once untimed (first calls allocate and pick kernels);
    what was done, for the record."""
    if config.warmup > 0:
        return "none: warm-up edits instead"
    started = time.perf_counter()
    prime(models, latent_size, device)
    return f"no warm-up edit; each network called once untimed first ({time.perf_counter() - started:.1f} s)"


def round_order(engine_dtype: torch.dtype) -> str:
    """How the timed edits were ordered (`timed_rows`), for the record: a reader of a half-precision speed-up must
    not take it for one measured in interleaved rounds."""
    if engine_dtype == torch.float32:
        return ("interleaved: each round one timed edit of every row (an engine row, the baseline, the other "
                "engine rows)")
    return ("the fp32 baseline's rounds first, then the engine rows' rounds, interleaved among themselves only (the "
            "engine casts the shared weights in place): a drift of the machine between the two blocks lands on one "
            "side of the speed-up")


def _config_record(config: BenchConfig, priming: str, engine_dtype: torch.dtype, device: torch.device) -> dict:
    """The run's settings as the JSON file keeps them; `unets_channels_last`: the UNets' layout the engine rows
    ran in (--channels-last, or the default for this device and dtype)."""
    return {
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("sam", "out")},
        "rounds": round_order(engine_dtype),
        "unets_channels_last": unets_channels_last(device, engine_dtype, config.channels_last),
        "action": config.action.value, "backends": list(config.backends), "sam": dataclasses.asdict(config.sam),
        "priming": priming, "image": f"make_sample_image({config.resolution}, {config.resolution})",
        "engines": None if config.engines is None else str(config.engines),
    }


# ---------------------------------------------------------------------------------------------- CLI


def _remove_sam_export(sam_export: dict) -> None:
    """The SAM export of a run that ends without its reports (of use to none), when its folder is one the export
    created: the export's files (and ONNX Runtime's engines of them), then the folder while empty. Only these:
    another run into the same --out may use the folder too (its scratch folder or files in it), or have made it
    before this run's export started; a folder that was there keeps whatever the run wrote in it."""
    if not sam_export.get("created"):
        return
    folder = sam_export["folder"]
    for name in EXPORT_FILES:
        with contextlib.suppress(OSError):
            (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / TRT_CACHE, ignore_errors=True)
    with contextlib.suppress(OSError):  # only while empty
        folder.rmdir()


@contextlib.contextmanager
def _made_folders_removed_unless_done(config: BenchConfig) -> Iterator[dict]:
    """A run that ends before its reports (an error, nothing to compare, Ctrl-C) leaves no folder it made: the SAM
    export it wrote into --out (`_remove_sam_export`: the run gives `run_benchmark` the dict this yields) and
    --out's folders that were not there, as `mkdir -p` made them, while empty. A folder that was there stays,
    whatever the run wrote in it."""
    out = config.out.absolute()
    existing, sam_export = nearest_existing(out), {}
    try:
        yield sam_export
    except BaseException:
        _remove_sam_export(sam_export)
        for folder in itertools.takewhile(lambda folder: folder != existing, (out, *out.parents)):
            with contextlib.suppress(OSError):  # only while empty
                folder.rmdir()
        raise


def run_and_report(config: BenchConfig, argv: list[str] | None = None) -> int:
    """`zone bench` once its options are checked (benchmarks/options.py): the run, its reports; the exit status."""

    def progress(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    deadline = Deadline(config.time_limit_s)
    # Through the reports' writing too: a signal then cuts nothing short (SIGTERM there killed the run, its
    # reports half written).
    with deadline.stopping_on_signals():
        try:
            with _made_folders_removed_unless_done(config) as sam_export:
                record = run_benchmark(config, progress, deadline, sam_export)
        except ZoneError as error:
            print(error_line(error), file=sys.stderr)
            return 2
        record["command"] = " ".join(["python -m zone_benchmarks", *(sys.argv[1:] if argv is None else argv)])
        paths = write_reports(record, config.out)
    print(markdown(record))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if "chart" not in paths:
        print(f"chart: {NO_MATPLOTLIB}")
    return 0
