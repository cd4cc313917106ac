"""Two weight sets per step: the ways to evaluate the dual UNet, timed in one run on the same inputs.

    python -m zone_benchmarks.bench_dual_unet                       # SD1.5-sized random UNets, 256², fp32, CPU
    python -m zone_benchmarks.bench_dual_unet --resolution 512 --dtype fp16 --batch 1   # on a GPU

For B edits each model gets 3B rows (IP2P's guidance triple). Variants:
- single:    ONE plain UNet call on all 6B rows — the yardstick of the issue's target ("the dual step
             within 1.3x of one UNet call at batch 6"): what a single weight set would cost.
- two-calls: `zone_engine.dual_step.DualUNet`, the engine's choice: MagicBrush on its 3B rows, then
             IP2P on its 3B rows; each weight set resident once, the recording processors work.
- vmap:      `torch.func.stack_module_state` + `functional_call` + `torch.vmap` over a leading model
             dimension: one traced call over stacked weights (a second copy of the weights).
- streams:   (CUDA only) `DualUNet(streams=True)`: the two calls on two CUDA streams, joined before
             the solver math — what the engine runs under CUDA graphs.
- step:      the engine's whole `dual_step` (both UNets — on two streams on CUDA —, guidance, both
             solver updates, the blend).
- with `--channels-last`, "two-calls-cl" and "step-cl": the same on copies of both UNets with
             channels-last (NHWC) weights, the UNet input converted inside the call — whether cuDNN's
             convolutions (about 55 % of a UNet's FLOPs) gain from it, before the engine adopts it;
             and on CUDA "step-cl-gn": step-cl with kernel 3's GroupNorm (kernels/group_norm.py), which
             keeps the activations NHWC, as the engine's fused step runs by default.
On CUDA each variant but vmap is also timed replayed from a CUDA graph ("+graph"), as the engine
runs it: eager diffusers UNets at these sizes are bound by kernel launches on the host, so only the
graph rows say what the GPU work costs. Each row: median wall time over --repeats after one
warm-up, ratio to `single` (eager) and, on CUDA, to `single+graph`, max |difference| from two-calls (same
inputs), peak CUDA memory.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from zone_engine.backends import DTYPES, make_localization_kernels
from zone_engine.cli import CommandParser
from zone_engine.config import MAX_BATCH
from zone_engine.denoise import make_scheduler
from zone_engine.dual_step import DualState, DualUNet, dual_step
from zone_engine.localize import AttentionAccumulator, attention_grid, record_cross_attention
from zone_engine.models import PRESETS, NormScope, build_unet, pytorch_norms
from zone_engine.solver import solver_schedule
from zone_engine.streams import stdout_kept

from .measure import on_named_device
from .options import add_unet_arguments, refuse_first, unet_resolution_check

Variant = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def vmap_variant(mb_unet: nn.Module, ip2p_unet: nn.Module) -> Variant:
    """Both weight sets stacked on a leading dimension, one vmapped functional call."""
    from torch.func import functional_call, stack_module_state

    params, buffers = stack_module_state([mb_unet, ip2p_unet])
    skeleton = copy.deepcopy(mb_unet).to("meta")

    def one(p, b, sample, timestep, context):
        return functional_call(skeleton, (p, b), (sample, timestep), {"encoder_hidden_states": context,
                                                                        "return_dict": False})[0]

    batched = torch.vmap(one, in_dims=(0, 0, 0, None, None))

    def run(sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return batched(params, buffers, torch.stack(sample.chunk(2)), timestep, context).flatten(0, 1)

    return run


def step_arguments(sample: torch.Tensor, context: torch.Tensor) -> tuple:
    """`dual_step`'s other arguments for the B edits of a UNet batch sample (6B, 8, h, w) and context
    (3B, 77, C): (schedule, state, image_latents, guidance, beta), a 20-step schedule at its first step."""
    from diffusers import DPMSolverMultistepScheduler

    rows, device = context.shape[0], sample.device
    schedule = solver_schedule(make_scheduler(dict(DPMSolverMultistepScheduler().config)), 20).to(device)
    state = DualState.start(sample[: rows // 3, :4].float())
    image_latents = sample[:rows, 4:].contiguous()
    guidance = torch.tensor([7.5, 1.5], device=device)
    beta = torch.full((rows // 3, 1, 1, 1), 0.2, device=device)
    return schedule, state, image_latents, guidance, beta


def step_variant(unet: DualUNet, sample: torch.Tensor, context: torch.Tensor,
                 norms: NormScope = pytorch_norms) -> Variant:
    """The whole fused step at the same rows, cross-attention recorded as in an edit (the engine's
    kernels for this device), the GroupNorms as `norms` says; its step counter rewound each call (one
    step, timed)."""
    accumulate, _ = make_localization_kernels("auto", sample.device)
    accumulators = [AttentionAccumulator(accumulate) for _ in range(context.shape[0] // 3)]
    latent_size = tuple(sample.shape[-2:])
    schedule, state, image_latents, guidance, beta = step_arguments(sample, context)

    def run(*_: torch.Tensor) -> torch.Tensor:
        state.step.zero_()
        with norms(unet.mb_unet, unet.ip2p_unet), \
                record_cross_attention(unet.ip2p_unet, latent_size, attention_grid(latent_size), accumulators):
            dual_step(unet, schedule, state, image_latents, context, guidance, beta)
        return state.z_ip

    return run


def channels_last_variants(mb_unet: nn.Module, ip2p_unet: nn.Module, sample: torch.Tensor, context: torch.Tensor,
                           streams: bool) -> dict[str, Variant]:
    """two-calls and step on channels-last copies of both UNets (their convolution weights NHWC), and on
    CUDA the step with kernel 3's GroupNorm, as the engine runs it (PyTorch's converts NHWC to NCHW)."""
    mb_copy, ip2p_copy = (copy.deepcopy(unet).to(memory_format=torch.channels_last) for unet in (mb_unet, ip2p_unet))
    two_calls = DualUNet(mb_copy, ip2p_copy)

    def nhwc(run: Callable) -> Variant:
        return lambda sample, *rest: run(sample.contiguous(memory_format=torch.channels_last), *rest)

    engine_unet = DualUNet(mb_copy, ip2p_copy, streams=streams)
    variants = {"two-calls-cl": nhwc(two_calls), "step-cl": step_variant(engine_unet, sample, context)}
    if sample.is_cuda:  # the kernel under the CPU's interpreter would take minutes a step
        from zone_kernels.group_norm import triton_group_norms

        variants["step-cl-gn"] = step_variant(engine_unet, sample, context, triton_group_norms)
    return variants


def graphed(run: Variant, inputs: tuple) -> Variant:
    """`run` on these fixed inputs recorded once as a CUDA graph; each call replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture: allocator, cuDNN/cuBLAS choices
            run(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = run(*inputs)

    def replay(*_: torch.Tensor) -> torch.Tensor:
        graph.replay()
        return output

    return replay


def time_variant(run: Variant, inputs: tuple, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds over `repeats` calls after one warm-up call, and the output."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    output = run(*inputs)
    sync()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        output = run(*inputs)
        sync()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), output  # of an even count, the mean of the middle two


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m zone_benchmarks.bench_dual_unet", description=__doc__.split("\n")[0])
    add_unet_arguments(parser, resolution=256)
    parser.add_argument("--batch", type=int, default=1, help="edits B: each model gets 3B rows (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (default 3)")
    parser.add_argument("--channels-last", action="store_true",
                        help="also time two-calls and step on channels-last copies of the UNets")
    args = parser.parse_args(argv)
    refuse_first(parser, [
        unet_resolution_check(args.resolution),
        (1 <= args.batch <= MAX_BATCH, f"--batch must be between 1 and {MAX_BATCH}"),
        (args.repeats >= 1, "--repeats must be at least 1"),
    ])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return on_named_device(args.device, lambda device: measure_and_print(args, device, DTYPES[args.dtype]))


def measure_and_print(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> int:
    if dtype != torch.float32 and device.type != "cuda":
        print("error: fp16/bf16 need CUDA: use --dtype fp32 on the CPU", file=sys.stderr)
        return 2
    variants, inputs = build_variants(args, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    latent, rows = args.resolution // 8, 6 * args.batch
    print(f"device {name}, {args.models} UNets, {args.resolution}² ({latent}² latent), {rows} rows "
          f"(B = {args.batch}), {args.dtype}, median of {args.repeats}")
    results = {}
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for label, run in variants.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, output = time_variant(run, inputs, device, args.repeats)
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            results[label] = (seconds, output, memory)
            # As it goes, to stderr: a device stage cut off at its limit still shows what it measured.
            print(f"[dual] {label}: {seconds * 1e3:.2f} ms", file=sys.stderr, flush=True)
    for warning in {str(w.message).split(".")[0] for w in caught if "batching rule" in str(w.message)}:
        print(f"note (vmap): {warning}")  # e.g. no vmap rule for the CPU's fused SDPA: a per-model loop
    print_results(results)
    return 0


def build_variants(args: argparse.Namespace, device: torch.device,
                   dtype: torch.dtype) -> tuple[dict[str, Variant], tuple[torch.Tensor, ...]]:
    """Two random UNets of the preset's size and every way of evaluating them (graphed too, on CUDA),
    with the inputs they take: (sample (6B, 8, h, w), timestep, context (3B, 77, C))."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # casting random-weight UNets: nothing to keep in fp32
    torch.manual_seed(0)
    preset = PRESETS[args.models]
    mb_unet, ip2p_unet = (build_unet(preset).to(device, dtype).eval() for _ in range(2))
    latent = args.resolution // 8
    rows = 3 * args.batch
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2 * rows, 8, latent, latent, generator=generator).to(device, dtype)
    context = torch.randn(rows, 77, mb_unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    timestep = torch.tensor([500], device=device)

    def single(sample, timestep, context):
        return ip2p_unet(sample, timestep, encoder_hidden_states=torch.cat([context, context]), return_dict=False)[0]

    on_cuda = device.type == "cuda"
    engine_unet = DualUNet(mb_unet, ip2p_unet, streams=on_cuda)
    variants: dict[str, Variant] = {"single": single, "two-calls": DualUNet(mb_unet, ip2p_unet),
                                    "vmap": vmap_variant(mb_unet, ip2p_unet),
                                    "step": step_variant(engine_unet, sample, context)}
    if args.channels_last:
        variants.update(channels_last_variants(mb_unet, ip2p_unet, sample, context, streams=on_cuda))
    inputs = (sample, timestep, context)
    if on_cuda:
        variants["streams"] = DualUNet(mb_unet, ip2p_unet, streams=True)
        with torch.inference_mode():
            for label in [label for label in variants if label != "vmap"]:
                variants[f"{label}+graph"] = graphed(variants[label], inputs)
    return variants, inputs


def print_results(results: dict[str, tuple[float, torch.Tensor, float | None]]) -> None:
    """The table: each variant's median, against one UNet call (eager and graphed), its eps against the
    two-calls reference, and its peak memory. Without graphs (the CPU) the second ratio column would
    repeat the first: left out."""
    reference = results["two-calls"][1]
    graph_yardstick = results["single+graph"][0] if "single+graph" in results else None
    graph_column = f" {'x single+graph':>15}" if graph_yardstick else ""
    print(f"{'variant':<16} {'median':>10} {'x single':>9}{graph_column} {'max |diff| vs two-calls':>24} "
          f"{'peak GiB':>9}")
    for label, (seconds, output, memory) in results.items():
        if label.startswith(("single", "step")):
            difference = "n/a (other rows)" if label.startswith("single") else "n/a (whole step)"
        else:
            difference = f"{(output - reference).abs().max().item():.3g}"
        peak = f"{memory:.2f}" if memory is not None else "n/a"
        graph_ratio = f" {seconds / graph_yardstick:>15.2f}" if graph_yardstick else ""
        print(f"{label:<16} {seconds * 1e3:>8.2f}ms {seconds / results['single'][0]:>9.2f}{graph_ratio} "
              f"{difference:>24} {peak:>9}")


if __name__ == "__main__":
    with stdout_kept():  # its "256²" under LC_ALL=C: escaped, not a traceback after the timings
        sys.exit(main())
