"""Where one edit's time goes inside each stage: device-busy time, launches and the longest device work.

    zone profile                      # CUDA: SD1.5 + SAM vit_h, 512², 20 steps, fp16, the fused denoiser
    zone profile --models tiny --device cpu --resolution 64 --steps 2
    python -m zone_benchmarks.profile_edit ...   # the same

`zone bench` says how long each stage takes; this says why. After warm-up edits (CUDA-graph capture,
SAM's first call), one edit runs under `torch.profiler`. The engine's stopwatch marks each stage
(`zone.<stage>` ranges); inside a stage's range the profiler's device activities give the device's
busy time (overlaps counted once) and their number, and the host side the torch ops dispatched from
Python and the CUDA-graph launches. A stage whose device is busy for a small share of its wall time
is bound by the host (Python, launches, synchronisations), not by the GPU: capturing it in a graph or
compiling it would pay; a busy one needs less arithmetic or better kernels. The profiler slows the
host side, so the walls here are above `zone bench`'s: read shares and counts, not latencies.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile

from zone_engine.backends import resolve_device, resolve_dtype
from zone_engine.cli import error_line
from zone_engine.config import SAMPLE_INSTRUCTION, EditConfig, SamConfig
from zone_engine.errors import ZoneError
from zone_engine.image_io import make_sample_image, working_geometry
from zone_engine.models import build_random_components, unets_channels_last
from zone_engine.paths import written_atomically
from zone_engine.pipeline import STAGES, ZonePipeline
from zone_engine.timing import RANGE_PREFIX

from .options import profile_main

Window = tuple[float, float]  # microseconds on the profiler's clock


@dataclass(frozen=True)
class StageProfile:
    stage: str
    wall_us: float
    device_busy_us: float | None  # None: no device activity was traced (a CPU run)
    device_ops: int  # kernels, copies and sets on the device
    graph_launches: int
    torch_ops: int  # aten ops called from outside another aten op: what Python dispatched
    in_torch_ops_us: float  # host time inside those ops; the rest of the wall is Python, waits and syncs
    longest: tuple[tuple[str, float], ...]  # the device work (or, on a CPU, the torch ops) taking most time

    @property
    def busy_share(self) -> float | None:
        return None if self.device_busy_us is None else self.device_busy_us / max(self.wall_us, 1e-9)

    @property
    def torch_ops_share(self) -> float:
        return self.in_torch_ops_us / max(self.wall_us, 1e-9)


def covered(intervals: Iterable[Window], window: Window) -> float:
    """How much of `window` lies under at least one interval (overlapping intervals counted once)."""
    low, high = window
    clipped = sorted((max(start, low), min(end, high)) for start, end in intervals if end > low and start < high)
    total, reached = 0.0, low
    for start, end in clipped:
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def _span(event) -> Window:
    return event.time_range.start, event.time_range.end


def _inside(event, windows: Sequence[Window]) -> bool:
    return any(low <= event.time_range.start < high for low, high in windows)


def _is_dispatched_op(event) -> bool:
    parent = event.cpu_parent
    return event.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::"))


def _longest(pairs: Iterable[tuple[str, float]], count: int) -> tuple[tuple[str, float], ...]:
    totals: Counter[str] = Counter()
    for name, duration in pairs:
        totals[name] += duration
    return tuple(totals.most_common(count))


def stage_profiles(events: Sequence, stages: Sequence[str] = STAGES, longest: int = 3) -> list[StageProfile]:
    """One StageProfile per stage that has a `zone.<stage>` range among the profiler's `events`."""
    host = [e for e in events if e.device_type == DeviceType.CPU]
    device = [e for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation]
    profiles = []
    for stage in stages:
        windows = [_span(e) for e in host if e.is_user_annotation and e.name == RANGE_PREFIX + stage]
        if windows:
            profiles.append(_stage_profile(stage, windows, host, device, longest))
    return profiles


def _stage_profile(stage: str, windows: list[Window], host: list, device: list,
                   longest: int) -> StageProfile:
    """The profile of one stage's `windows` (its ranges' spans) from the host and device events."""
    on_device = [e for e in device if _inside(e, windows)]
    dispatched = [e for e in host if _is_dispatched_op(e) and _inside(e, windows)]
    ranked = on_device or dispatched
    # A device run's stage without traced device work ranks its torch ops: host time, said so.
    prefix = "host: " if device and not on_device else ""
    return StageProfile(
        stage=stage,
        wall_us=sum(high - low for low, high in windows),
        device_busy_us=sum(covered(map(_span, on_device), w) for w in windows) if device else None,
        device_ops=len(on_device),
        graph_launches=sum(e.name.startswith("cudaGraphLaunch") and _inside(e, windows) for e in host),
        torch_ops=len(dispatched),
        in_torch_ops_us=sum(covered(map(_span, dispatched), w) for w in windows),
        longest=_longest(((prefix + e.name, e.time_range.elapsed_us()) for e in ranked), longest),
    )


def _ms(us: float | None) -> str:
    return "—" if us is None else f"{us / 1000:.2f} ms"


def _percent(share: float | None) -> str:
    return "—" if share is None else f"{100 * share:.0f} %"


def stage_table(profiles: Sequence[StageProfile]) -> str:
    on_device = any(p.device_busy_us is not None for p in profiles)
    work = "longest device work" if on_device else "longest torch ops (CPU)"
    lines = [f"| stage | wall | device busy | busy share | device ops | graph launches | torch ops | in torch ops "
             f"| {work} |", "|---|---|---|---|---|---|---|---|---|"]
    for p in [*profiles, *([all_stages(profiles)] if profiles else [])]:
        top = "; ".join(f"{name[:60]} {_ms(us)}" for name, us in p.longest)
        lines.append(f"| {p.stage} | {_ms(p.wall_us)} | {_ms(p.device_busy_us)} | {_percent(p.busy_share)} | "
                     f"{p.device_ops} | {p.graph_launches} | {p.torch_ops} | "
                     f"{_percent(p.torch_ops_share)} | {top} |")
    return "\n".join(lines)


def all_stages(profiles: Sequence[StageProfile]) -> StageProfile:
    """The stages summed (what lies between them, e.g. loading the image, is not in it); no longest work."""
    busy = [p.device_busy_us for p in profiles if p.device_busy_us is not None]
    return StageProfile(
        stage="all stages", wall_us=sum(p.wall_us for p in profiles), device_busy_us=sum(busy) if busy else None,
        device_ops=sum(p.device_ops for p in profiles), graph_launches=sum(p.graph_launches for p in profiles),
        torch_ops=sum(p.torch_ops for p in profiles), in_torch_ops_us=sum(p.in_torch_ops_us for p in profiles),
        longest=())


# ---------------------------------------------------------------------------------------------- CLI


def profile_edit(args: argparse.Namespace) -> tuple[torch.device, str, list[StageProfile], str]:
    """Build the random-weight models, run the warm-up edits, profile one edit: (device, what ran, stages, op
    table)."""
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = resolve_dtype(dtype_name, device)
    if device.type == "cpu" and args.models == "sd15":  # the defaults are a GPU's edit
        print(f"[profile] note: SD1.5 and SAM {args.sam_type} on the CPU take minutes an edit ({args.warmup + 1} to "
              "run); --models tiny profiles in seconds", file=sys.stderr)
    print(f"[profile] building {args.models} models with random weights (SAM {args.sam_type})", file=sys.stderr)
    models = build_random_components(args.models, 0, args.sam_type).to(device, torch.float32)
    pipe = ZonePipeline(models, device, dtype, denoiser=args.denoiser, engines=args.engines,
                        sam_precision=args.sam_precision, channels_last=args.channels_last, group_norm=args.group_norm)
    # ZONE's SAM settings; a random tiny SAM keeps no mask at them, so the tiny models get the tests' settings.
    sam = SamConfig.for_random_weights() if args.sam_type == "tiny" else SamConfig()
    # The action classified, as in a user's edit; worked on at --resolution (max_side 512 would shrink it).
    config = EditConfig(steps=args.steps, sam=sam, max_side=args.resolution)
    image = make_sample_image(args.resolution, args.resolution)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # The profiler started once before the warm-up's CUDA-graph capture: replaying a graph captured
    # before the profiler's first use is a known way to lose its kernels from the trace (PyTorch's
    # own workaround, torch.profiler._utils._init_for_cuda_graphs, is this).
    with profile(activities=activities):
        pass
    for index in range(args.warmup):
        print(f"[profile] warm-up edit {index + 1} of {args.warmup}", file=sys.stderr)
        pipe.edit(image, SAMPLE_INSTRUCTION, config)
    print("[profile] profiled edit", file=sys.stderr)
    with profile(activities=activities) as profiler:
        pipe.edit(image, SAMPLE_INSTRUCTION, config)
    if args.trace is not None:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: a Ctrl-C or SIGTERM while a large trace is written (gzip'd in Python) left it cut off.
        with written_atomically(args.trace) as temporary:
            profiler.export_chrome_trace(str(temporary))
    what_ran = _what_ran(args, pipe, config, dtype_name)
    return device, what_ran, stage_profiles(profiler.events()), _op_table(profiler, args.rows, device)


def _what_ran(args: argparse.Namespace, pipe: ZonePipeline, config: EditConfig, dtype_name: str) -> str:
    """The header line: every setting that changes what is timed, as the pipeline resolved it."""
    working = working_geometry(args.resolution, args.resolution, config.max_side, config.size_multiple).padded_size
    layout = layout_said(args.channels_last, pipe.device, pipe.dtype)
    norms = ", ".join(f"{nets} {kind}" for nets, kind in pipe.group_norms.items())
    steps = f"{args.steps} step{'s' if args.steps != 1 else ''}"
    return (f"One edit, {args.models} (SAM {args.sam_type}, its encoder in {args.sam_precision}), image "
            f"{args.resolution}² worked on at {working[0]}×{working[1]}, {steps}, denoiser {args.denoiser} "
            f"in {dtype_name} ({layout}; GroupNorms: {norms}), {_device_name(pipe.device)}, torch {torch.__version__}")


def layout_said(asked: bool | None, device: torch.device, dtype: torch.dtype) -> str:
    """The convolutions' layout: --channels-last turns the VAE's too, the default only the UNets' (on CUDA in
    fp16/bf16, `unets_channels_last`)."""
    if asked:
        return "UNets and VAE channels-last"
    return "UNets channels-last" if unets_channels_last(device, dtype, asked) else "contiguous"


def _op_table(profiler: profile, rows: int, device: torch.device) -> str:
    """The whole edit's top `rows` ops by self time (device time on CUDA), the stages' zone.* ranges left out:
    their self time is the Python between the ops, not an op."""
    if not rows:
        return ""
    averages = profiler.key_averages()
    on_device = device.type == "cuda"
    ops = EventList([event for event in averages if not event.key.startswith(RANGE_PREFIX)],
                    use_device="cuda" if on_device else None)
    return ops.table(sort_by="self_device_time_total" if on_device else "self_cpu_time_total", row_limit=rows)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def profile_and_report(args: argparse.Namespace) -> int:
    """`zone profile` once its options are checked (benchmarks/options.py): the profiled edit, its tables."""
    try:
        device, what_ran, profiles, ops = profile_edit(args)
    except ZoneError as error:
        print(error_line(error), file=sys.stderr)
        return 2
    print(f"{what_ran}:\n")
    print(stage_table(profiles))
    untraced = [p.stage for p in profiles if p.graph_launches and not p.device_ops]
    if device.type == "cuda" and all(p.device_busy_us is None for p in profiles):
        print("\nThe profiler traced no device activity at all (is CUPTI unavailable here?): no busy times.")
    elif untraced:
        print(f"\nNo device work was traced in {', '.join(untraced)} although CUDA graphs were launched there: "
              "this profiler missed the graphs' kernels, so those rows' busy times are not real.")
    if args.rows:
        print(f"\nThe whole edit, top {args.rows} ops by self time:\n\n{ops}")
    return 0


if __name__ == "__main__":
    sys.exit(profile_main())
