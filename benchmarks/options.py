"""The options of `zone bench` (`python -m zone_benchmarks`) and `zone profile`: the presets, their parsing and
checks, and the entry points that run the tools once the options are good.

argparse and zone_engine's torch-free modules only: `--help` and a mistyped option answer at once, not after
torch's import (seconds); benchmarks/harness.py and benchmarks/profile_edit.py are imported to run.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zone_engine.cli import EXIT_CODES, CommandParser, said_stopped, terminated_as_interrupt
from zone_engine.config import (
    DENOISERS,
    GROUP_NORMS,
    MAX_BATCH,
    MAX_POINTS_PER_SIDE,
    MAX_SEED,
    MAX_STEPS,
    MAX_WORKING_SIDE,
    MODEL_SIZES,
    SAM_PRECISIONS,
    SAM_TYPES,
    Action,
    EditConfig,
    SamConfig,
    check_backend_options,
    check_precision,
    device_kind,
    parse_action,
)
from zone_engine.errors import ConfigError, ZoneError
from zone_engine.paths import check_output_file, check_output_folder, file_argument, folder_argument
from zone_engine.streams import stdout_kept

# Backends whose first edit builds something (torch.compile, TensorRT engines): they always get at least
# one warm-up edit (as does a row that captures CUDA graphs: harness.builds_on_first_edit), so the build
# never lands in the timed numbers, and the CPU presets leave them out (inductor's CPU build of two SD1.5
# UNets takes many minutes).
BUILDING_BACKENDS = ("compile", "tensorrt")
NO_BUILD_BACKENDS = tuple(kind for kind in DENOISERS if kind not in BUILDING_BACKENDS)
REFERENCE_SAM = SamConfig()  # segment-anything's defaults, as the reference ran them
SMOKE_SAM = SamConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run needs; the presets below are named instances."""

    preset: str
    models: str = "sd15"  # a zone_engine.models.PRESETS name
    resolution: int = 256
    steps: int = 20
    dtype: str = "fp32"  # the engine's; the baseline always runs fp32, the reference precision
    sam_type: str = "vit_b"
    sam: SamConfig = REFERENCE_SAM
    repeats: int = 1
    warmup: int = 0
    device: str = "auto"
    seed: int = 42
    model_seed: int = 0
    instruction: str = "make the dog a golden statue"
    action: Action = Action.CHANGE
    backends: tuple[str, ...] = DENOISERS
    engines: Path | None = None  # the tensorrt row's `zone export unet` folder; none: that row is skipped
    batch: int = 1  # > 1: also time batches of this many concurrent edits (edit_batch); 1: sequential only
    sam_onnx: bool = False  # also an engine row refining with SAM exported to ONNX and run on ONNX Runtime
    sam_precision: str | None = None  # bf16/fp16: also an engine row with SAM's image encoder in that precision
    # Also a fused row with PyTorch's GroupNorm ("+gn-torch"): what kernel 3 gains, measured in the same run.
    compare_group_norm: bool = False
    # True: every engine row's UNets and VAE in NHWC (half precision only: see _check); False: none;
    # None: the engine's default (the UNets on CUDA in fp16/bf16).
    channels_last: bool | None = None
    group_norm: str = "auto"  # every engine row's GroupNorms (zone edit --group-norm)
    time_limit_s: float | None = None  # no edit or batch starts after this many seconds; the rest is reported
    out: Path = Path("benchmarks/out")

    @property
    def sam_export_folder(self) -> Path:
        """Where the `+sam-onnx` row's SAM export is written, in --out."""
        return self.out / f"sam-onnx-{self.sam_type}"


PRESETS: dict[str, BenchConfig] = {
    # Tests: tiny models, seconds. SAM thresholds at zero so random weights still give segments.
    "tiny-smoke": BenchConfig("tiny-smoke", models="tiny", resolution=64, steps=2, sam_type="tiny",
                              sam=SamConfig.for_random_weights(), device="cpu", backends=NO_BUILD_BACKENDS, batch=2,
                              sam_onnx=True, sam_precision="bf16"),
    # CI: proves the harness works on real-size architectures: ~1 minute on 2 idle cores including the
    # model build (up to 4.6 minutes measured on a busy shared machine), 11 GiB peak RSS. No speed claim.
    # No batch: tiny-smoke covers the batched path, and a batch of 2 here (~+30 s, most of it SAM's
    # refine of each edit) shows nothing on 2 cores; `--batch 2` measures it.
    "cpu-smoke": BenchConfig("cpu-smoke", resolution=128, steps=2, sam=SMOKE_SAM, device="cpu",
                             backends=NO_BUILD_BACKENDS),
    # The CPU target (256², fp32, 2 cores): two rounds of three ~3-minute edits, ~20 minutes
    # on 2 idle cores (41.8 measured on a busy shared machine); most of an edit is SAM's 1,024
    # prompts and 20 steps of two SD1.5 UNets; the ONNX Runtime row adds a fourth edit per round.
    "cpu-256": BenchConfig("cpu-256", resolution=256, steps=20, repeats=2, device="cpu", backends=NO_BUILD_BACKENDS,
                           sam_onnx=True),
    "gpu-512": BenchConfig("gpu-512", resolution=512, steps=20, dtype="fp16", sam_type="vit_h", repeats=5,
                           warmup=1, device="cuda", batch=4, sam_onnx=True, sam_precision="bf16",
                           compare_group_norm=True),
    "gpu-throughput": BenchConfig("gpu-throughput", resolution=512, steps=20, dtype="fp16", sam_type="vit_h",
                                  repeats=16, warmup=2, device="cuda", batch=8),
}


# ---------------------------------------------------------------------------------------------- zone bench


TINY_MODELS_HERE = {"--tiny": "--models tiny"}  # zone edit's switch, as the benchmark tools write it


def bench_main(argv: list[str] | None = None) -> int:
    """`zone bench` and `python -m zone_benchmarks`: the options checked, then the run (benchmarks/harness.py)."""
    config = parse_bench_args(argv)

    def run() -> int:
        from .harness import run_and_report  # imports torch (seconds): a signal meanwhile is said as below

        return run_and_report(config, argv)

    return quitting_on_a_signal(run)


def quitting_on_a_signal(run: Callable[[], int]) -> int:
    """`run()`'s exit status; a Ctrl-C that reaches here (a bench's second, a profile's first) is one line and
    130, and a SIGTERM (a profile's; a bench's before its run installs its own handler) `terminated` and 143, as
    zone's own commands say them, not a traceback or a silent death. A reader gone from the report on stdout
    (`| head -1`) is no error either, as for zone's own commands."""
    try:
        with terminated_as_interrupt(), stdout_kept():
            return run()
    except KeyboardInterrupt as stop:
        return said_stopped(stop)


def _preset_summary(config: BenchConfig) -> str:
    edits = "timed edit" if config.repeats == 1 else "timed edits"
    variants = [name for name, wanted in (
        ("+sam-onnx", config.sam_onnx), (f"+sam-{config.sam_precision}", config.sam_precision),
        ("+gn-torch", config.compare_group_norm)) if wanted]
    return (f"{config.preset} = {config.models} models, {config.resolution} px, {config.steps} steps, {config.dtype}, "
            f"SAM {config.sam_type} ({config.sam.points_per_side} points a side, IoU/stability thresholds "
            f"{config.sam.pred_iou_thresh:g}/{config.sam.stability_score_thresh:g}), {config.repeats} {edits} after "
            f"{config.warmup} warm-up, device {config.device}, batch {config.batch}, backends "
            f"{','.join(config.backends)}, variant rows {' '.join(variants) or 'none'}")


def parse_bench_args(argv: list[str] | None = None) -> BenchConfig:
    """`zone bench`'s options over the named preset's settings, checked before anything is built."""
    parser = _bench_parser()
    args = parser.parse_args(argv)
    config = dataclasses.replace(PRESETS[args.preset], **_changes(parser, args))
    _check(parser, config)
    return config


def _bench_parser() -> CommandParser:
    parser = CommandParser(
        prog="zone bench", written_here=TINY_MODELS_HERE,
        epilog="Exit codes: 0 reports written (after --time-limit, SIGTERM or Ctrl-C: of what was timed by then), 2 "
        "bad input or setup, or SIGTERM or --time-limit before the baseline's first timed edit (nothing to compare), "
        "130 Ctrl-C before it, 143 SIGTERM before the measuring starts.",
        description="Per-stage latency of the ZONE engine against a reference-style baseline, in one run "
                    "on random-weight models of real size. Writes JSON, markdown and a PNG chart.",
    )
    parser.add_argument("--preset", type=str.lower, choices=PRESETS, default="cpu-smoke",
                        help="named settings (default cpu-smoke); an option below that is left out takes its "
                        f"preset's value: {'; '.join(_preset_summary(preset) for preset in PRESETS.values())}")
    parser.add_argument("--models", type=str.lower, choices=MODEL_SIZES,
                        help="architecture sizes: sd15 (real) or tiny (tests)")
    parser.add_argument("--resolution", type=int,
                        help=f"side of the square test image, a multiple of 32 from 32 to {MAX_WORKING_SIDE} "
                        "pixels: the edit works at this size (its max_side)")
    parser.add_argument("--steps", type=int, help=f"denoising steps, 1..{MAX_STEPS}")
    parser.add_argument("--dtype", type=str.lower, choices=("fp32", "fp16", "bf16"),
                        help="engine precision (baseline: fp32)")
    parser.add_argument("--sam-type", type=str.lower, choices=(*SAM_TYPES, "tiny"), help="SAM size")
    parser.add_argument("--sam-points", type=int,
                        help=f"SAM automatic generator points per side, 1..{MAX_POINTS_PER_SIDE}")
    parser.add_argument("--repeats", type=int, help="timed edits per implementation")
    parser.add_argument("--warmup", type=int, help="untimed edits before them")
    parser.add_argument("--device", type=device_name, help="where to run: auto, cpu, cuda or cuda:N")
    parser.add_argument("--backends", help="comma-separated engine denoisers, each once, of "
                        f"{','.join(DENOISERS)} (default: the preset's)")
    parser.add_argument("--engines", type=folder_argument, metavar="DIR",
                        help="the tensorrt row's engines: a folder `zone export unet` wrote for this --resolution "
                        "and --dtype, its engines built by `zone build-engine` or at the row's first edit "
                        "(default: none, so that row is skipped)")
    parser.add_argument("--action", type=str.lower, choices=("add", "change", "remove"),
                        help=f"forced action (default {BenchConfig.action.value})")
    parser.add_argument("--seed", type=int, help=f"edit seed (default {BenchConfig.seed})")
    parser.add_argument("--batch", type=int, help="also time batches of N concurrent edits (edit_batch) on every "
                                                  "backend that batches; 1 = sequential only (preset's default)")
    parser.add_argument("--sam-onnx", action=argparse.BooleanOptionalAction, default=None,
                        help="also an engine row refining on ONNX Runtime (SAM exported in the run; preset's default)")
    parser.add_argument("--sam-precision", type=str.lower, choices=("none", "bf16", "fp16"),
                        help="also an engine row with SAM's image encoder in bf16/fp16 (none: no such row; "
                        "preset's default)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="every engine row's UNets and VAE in the channels-last layout (zone edit "
                        "--channels-last; needs --dtype fp16 or bf16); --no-channels-last: neither; default: "
                        "the engine's (the UNets' on CUDA in fp16/bf16)")
    parser.add_argument("--compare-group-norm", action=argparse.BooleanOptionalAction, default=None,
                        help="also a fused row with PyTorch's GroupNorm (engine:fused+gn-torch), to see what the "
                        "GroupNorm kernel gains in the same run (preset's default: on for gpu-512)")
    parser.add_argument("--group-norm", type=str.lower, choices=GROUP_NORMS,
                        help="every engine row's UNet and VAE GroupNorms: triton (kernel 3), torch (PyTorch's); "
                        "default auto, the engine's (zone edit --group-norm)")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="start no edit or batch after this many seconds from the start; report what was "
                        "measured by then (SIGTERM does the same at once; default: no limit)")
    parser.add_argument("--out", type=folder_argument, help=f"output folder (default {BenchConfig.out})")
    return parser


def _changes(parser: CommandParser, args: argparse.Namespace) -> dict[str, Any]:
    """What the options change in their preset's settings (an option left out changes nothing)."""
    config = PRESETS[args.preset]
    changes = {name: value for name, value in (
        ("models", args.models), ("resolution", args.resolution), ("steps", args.steps), ("dtype", args.dtype),
        ("sam_type", args.sam_type), ("repeats", args.repeats), ("warmup", args.warmup), ("device", args.device),
        ("seed", args.seed), ("batch", args.batch), ("sam_onnx", args.sam_onnx), ("out", args.out),
        ("channels_last", args.channels_last), ("group_norm", args.group_norm), ("time_limit_s", args.time_limit),
        ("compare_group_norm", args.compare_group_norm), ("engines", args.engines),
    ) if value is not None}
    if args.models == "tiny" and args.sam_type is None:
        changes["sam_type"] = "tiny"
    if args.sam_points is not None:
        refuse_first(parser, [(1 <= args.sam_points <= MAX_POINTS_PER_SIDE,
                               f"--sam-points must be between 1 and {MAX_POINTS_PER_SIDE}")])
        changes["sam"] = config.sam.replace(points_per_side=args.sam_points)
    if args.backends is not None:
        changes["backends"] = _backends(parser, args.backends)
    if args.action is not None:
        changes["action"] = parse_action(args.action)
    if args.sam_precision is not None:
        changes["sam_precision"] = None if args.sam_precision == "none" else args.sam_precision
    return changes


def _backends(parser: CommandParser, text: str) -> tuple[str, ...]:
    """--backends' denoisers, in any case; an empty entry (`fused,,eager`), a repeated one or an unknown one
    refused, not left out or collapsed: a typo there had dropped a row unsaid. None named: () (`_check` says it)."""
    named = [kind.strip().lower() for kind in text.split(",")]
    if not any(named):
        return ()
    if "" in named:
        parser.error(f"--backends {text!r}: entry {named.index('') + 1} is empty (a comma too many?); name the "
                     "denoisers between commas, e.g. fused,eager")
    if unknown := [kind for kind in named if kind not in DENOISERS]:
        parser.error(f"--backends: unknown {', '.join(unknown)}; the denoisers are {','.join(DENOISERS)}")
    if repeated := [kind for kind in dict.fromkeys(named) if named.count(kind) > 1]:  # a row's name keys its results
        parser.error(f"--backends {text!r} names {', '.join(repeated)} more than once: name each denoiser once")
    return tuple(named)


def _check(parser: CommandParser, config: BenchConfig) -> None:
    """The settings' values, the output folder and the combinations, refused with the option named."""
    refuse_first(parser, [
        (config.repeats >= 1, "--repeats must be at least 1"), (config.warmup >= 0, "--warmup must be 0 or more"),
        (1 <= config.steps <= MAX_STEPS, f"--steps must be between 1 and {MAX_STEPS}"),
        edit_resolution_check(config.resolution),
        (1 <= config.batch <= MAX_BATCH, f"--batch must be between 1 and {MAX_BATCH}"),
        # Checked here, not after the models are built: a batch's edits take seeds seed..seed+batch-1.
        (0 <= config.seed <= MAX_SEED - config.batch + 1, f"--seed must be between 0 and "
         f"{MAX_SEED - config.batch + 1} (a batch's edits take seeds seed..seed+batch-1)"),
        (config.time_limit_s is None or 0 < config.time_limit_s < float("inf"),
         "--time-limit must be a finite number of seconds above 0"),
    ])
    if not config.backends:
        parser.error(f"--backends names no denoiser: give one or more of {','.join(DENOISERS)}")
    if config.engines is not None and "tensorrt" not in config.backends:
        parser.error("--engines is read by the tensorrt row only: add tensorrt to --backends, or drop --engines")
    try:  # before the run: its reports (and SAM's export) must have somewhere to go
        reports = report_paths(config.out, config.preset).values()
        check_output_folder(config.out, "--out", [path.name for path in reports])
        if config.sam_onnx:
            check_output_folder(config.sam_export_folder, "--out's SAM export folder")
    except ZoneError as error:
        parser.error(str(error))
    try:  # a GPU preset's fp16 with --device cpu, say: the preset's value named, which the user may not have typed
        check_precision(config.dtype, device_kind(config.device))
    except ZoneError:
        parser.error(f"--dtype {config.dtype} (the {config.preset} preset's unless given) runs only on CUDA: on the "
                     "CPU pass --dtype fp32")
    if config.channels_last and config.dtype == "fp32":
        # fp32 engine rows share the weights with the baseline's rows, round by round: the layout would
        # change the baseline too. Half-precision engine rows convert them once the baseline's rounds are done.
        parser.error("--channels-last needs --dtype fp16 or bf16 (fp32 engine rows share the baseline's weights)")


def report_paths(out: Path, preset: str) -> dict[str, Path]:
    """Where a run's reports go (benchmarks/report.py writes them)."""
    stem = out / f"bench-{preset}"
    return {"json": stem.with_suffix(".json"), "markdown": stem.with_suffix(".md"), "chart": stem.with_suffix(".png")}


# ---------------------------------------------------------------------------------------------- zone profile

PROFILE_DESCRIPTION = (
    "Where one edit's time goes inside each stage: device-busy time, launches and the longest device work."
)


def profile_main(argv: list[str] | None = None) -> int:
    """`zone profile`: the options checked, then the profiled edit (benchmarks/profile_edit.py)."""
    args = parse_profile_args(argv)

    def run() -> int:
        from .profile_edit import profile_and_report  # imports torch (seconds): a signal meanwhile is said too

        return profile_and_report(args)

    return quitting_on_a_signal(run)


def parse_profile_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="zone profile", description=PROFILE_DESCRIPTION, written_here=TINY_MODELS_HERE,
                           epilog=f"{EXIT_CODES} The walls are inflated by the profiler; zone bench measures latency.")
    parser.add_argument("--models", type=str.lower, choices=MODEL_SIZES, default="sd15",
                        help="architecture sizes (default sd15)")
    parser.add_argument("--sam-type", type=str.lower, choices=(*SAM_TYPES, "tiny"),
                        help="SAM size (default vit_h; tiny with --models tiny)")
    parser.add_argument("--resolution", type=int, default=512,
                        help=f"side of the square test image, a multiple of 32 from 32 to {MAX_WORKING_SIDE} "
                        "pixels, worked on at this size (default 512)")
    parser.add_argument("--steps", type=int, default=20, help=f"denoising steps, 1..{MAX_STEPS} (default 20)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="where to run (default auto: CUDA when there is one)")
    parser.add_argument("--dtype", type=str.lower, choices=("fp32", "fp16", "bf16"),
                        help="engine precision (default fp16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--denoiser", type=str.lower, choices=DENOISERS, default="fused",
                        help="denoiser backend (default fused; tensorrt needs --engines)")
    parser.add_argument("--engines", type=folder_argument, metavar="DIR",
                        help="with --denoiser tensorrt: the folder `zone export unet` wrote")
    parser.add_argument("--sam-precision", type=str.lower, choices=SAM_PRECISIONS, default="fp32",
                        help="SAM image encoder precision: fp32 (default), bf16, fp16 (CUDA only)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="UNets and VAE in the channels-last layout; --no-channels-last: neither; default: "
                        "the engine's (the UNets' on CUDA in fp16/bf16)")
    parser.add_argument("--group-norm", type=str.lower, choices=GROUP_NORMS, default="auto",
                        help="UNet and VAE GroupNorms: triton (kernel 3), torch (PyTorch's); default auto, "
                        "the engine's")
    parser.add_argument("--warmup", type=int, default=1, help="untimed edits before the profiled one (default 1)")
    parser.add_argument("--rows", type=int, default=25, help="rows of the whole edit's op table (default 25)")
    parser.add_argument("--trace", type=file_argument,
                        help="also write the profiled edit as a Chrome trace here: a FILE.json, or FILE.json.gz "
                        "compressed")
    args = parser.parse_args(argv)
    refuse_first(parser, [
        edit_resolution_check(args.resolution),
        (1 <= args.steps <= MAX_STEPS, f"--steps must be between 1 and {MAX_STEPS}"),
        (args.warmup >= 0, "--warmup must be 0 or more"), (args.rows >= 0, "--rows must be 0 or more"),
    ])
    try:  # the profiler's writer would replace a folder by the file, and only log what it cannot write
        if args.trace is not None:
            check_output_file(args.trace, "--trace")  # its folder is made, as `zone edit -o`'s
            if not args.trace.name.endswith((".json", ".json.gz")):  # x.png, the input image, was written over
                raise ConfigError(f"--trace {args.trace}: a Chrome trace is JSON: name it FILE.json (or "
                                  "FILE.json.gz, compressed)")
        # Now, not after minutes of building SD1.5 and SAM: a backend or precision that cannot run on the device.
        check_precision(args.dtype or "fp32", device_kind(args.device))
        check_backend_options(device_kind(args.device), args.denoiser, args.engines, sam_precision=args.sam_precision,
                              group_norm=args.group_norm, channels_last=args.channels_last)
    except ZoneError as error:
        parser.error(str(error))
    if args.sam_type is None:
        args.sam_type = "tiny" if args.models == "tiny" else "vit_h"
    return args


def add_unet_arguments(parser: argparse.ArgumentParser, *, resolution: int) -> None:
    """--models, --resolution, --dtype and --device of the tools that time or trace bare UNets (bench_dual_unet,
    graph_breaks); `resolution`: its default. Checked by `unet_resolution_check`."""
    parser.add_argument("--models", type=str.lower, choices=MODEL_SIZES, default="sd15",
                        help="UNet size (default sd15: real size)")
    parser.add_argument("--resolution", type=int, default=resolution,
                        help=f"image side, a multiple of 8 from 32 to {MAX_WORKING_SIDE}; the latent is 1/8 "
                        f"(default {resolution})")
    parser.add_argument("--dtype", type=str.lower, choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="the UNets' precision (default fp32; fp16 and bf16 on CUDA)")
    parser.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def edit_resolution_check(resolution: int) -> tuple[bool, str]:
    """`refuse_first`'s check of zone bench's and zone profile's --resolution: the edit pads its image to
    multiples of 32 (EditConfig.size_multiple), so 33 would be reported as 33 and worked on at 64."""
    multiple = EditConfig.size_multiple
    return (resolution % multiple == 0 and multiple <= resolution <= MAX_WORKING_SIDE,
            f"--resolution must be a multiple of {multiple} between {multiple} and {MAX_WORKING_SIDE} (the edit "
            "pads its image to such multiples, so another side would be worked on at a larger one)")


def unet_resolution_check(resolution: int) -> tuple[bool, str]:
    """`refuse_first`'s check of `add_unet_arguments`' --resolution."""
    return (resolution % 8 == 0 and 32 <= resolution <= MAX_WORKING_SIDE,
            f"--resolution must be a multiple of 8 between 32 and {MAX_WORKING_SIDE}")


def device_name(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N in any case (`zone edit --device`'s names)."""
    try:
        device_kind(text)
    except ZoneError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text.strip().lower()


def refuse_first(parser: argparse.ArgumentParser, checks: Sequence[tuple[bool, str]]) -> None:
    """`parser.error` with the first failing check's message (ok, message): the option at fault, by name."""
    for ok, message in checks:
        if not ok:
            parser.error(message)
