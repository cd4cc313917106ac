"""Two weight sets per step: the ways to evaluate the dual UNet, timed in one run on the same inputs.

    python -m benchmarks.bench_dual_unet                       # SD1.5-sized random UNets, 256², fp32, CPU
    python -m benchmarks.bench_dual_unet --resolution 512 --dtype fp16 --batch 1   # on a GPU

For B edits each model gets 3B rows (IP2P's guidance triple). Variants:
- single:    ONE plain UNet call on all 6B rows — the yardstick of the issue's target ("the dual step
             within 1.3x of one UNet call at batch 6"): what a single weight set would cost.
- two-calls: `zone_engine.dual_step.DualUNet`, the engine's choice: MagicBrush on its 3B rows, then
             IP2P on its 3B rows; each weight set resident once, the recording processors work.
- vmap:      `torch.func.stack_module_state` + `functional_call` + `torch.vmap` over a leading model
             dimension: one traced call over stacked weights (a second copy of the weights).
- streams:   (CUDA only) the two calls on two CUDA streams, joined before the solver math.
Each row: median wall time over --repeats after one warm-up, ratio to `single`, max |difference|
from two-calls (same inputs), peak CUDA memory.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from zone_engine.backends import DTYPES, resolve_device
from zone_engine.dual_step import DualUNet
from zone_engine.models import PRESETS, build_unet

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


def streams_variant(mb_unet: nn.Module, ip2p_unet: nn.Module) -> Variant:
    """The two calls overlapped on two CUDA streams."""
    side = torch.cuda.Stream()

    def run(sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        mb_sample, ip2p_sample = sample.chunk(2)
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            mb = mb_unet(mb_sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
        ip2p = ip2p_unet(ip2p_sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
        main.wait_stream(side)
        return torch.cat([mb, ip2p])

    return run


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
    return sorted(seconds)[len(seconds) // 2], output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dual_unet", description=__doc__.split("\n")[0])
    parser.add_argument("--models", choices=PRESETS, default="sd15", help="UNet size (default sd15: real size)")
    parser.add_argument("--resolution", type=int, default=256, help="image side; the latent is 1/8 (default 256)")
    parser.add_argument("--batch", type=int, default=1, help="edits B: each model gets 3B rows (default 1)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (default 3)")
    args = parser.parse_args(argv)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    if dtype != torch.float32 and device.type != "cuda":
        parser.error("fp16/bf16 need CUDA")

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

    variants: dict[str, Variant] = {"single": single, "two-calls": DualUNet(mb_unet, ip2p_unet),
                                    "vmap": vmap_variant(mb_unet, ip2p_unet)}
    if device.type == "cuda":
        variants["streams"] = streams_variant(mb_unet, ip2p_unet)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, {args.models} UNets, {args.resolution}² ({latent}² latent), {2 * rows} rows "
          f"(B = {args.batch}), {args.dtype}, median of {args.repeats}")
    results, reference = {}, None
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for label, run in variants.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, output = time_variant(run, (sample, timestep, context), device, args.repeats)
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            if label == "two-calls":
                reference = output
            results[label] = (seconds, output, memory)
    for warning in {str(w.message).split(".")[0] for w in caught if "batching rule" in str(w.message)}:
        print(f"note (vmap): {warning}")  # e.g. no vmap rule for the CPU's fused SDPA: a per-model loop
    print(f"{'variant':<10} {'median':>10} {'x single':>9} {'max |diff| vs two-calls':>24} {'peak GiB':>9}")
    for label, (seconds, output, memory) in results.items():
        difference = "n/a (other rows)" if label == "single" else f"{(output - reference).abs().max().item():.3g}"
        peak = f"{memory:.2f}" if memory is not None else "n/a"
        print(f"{label:<10} {seconds * 1e3:>8.1f}ms {seconds / results['single'][0]:>9.2f} {difference:>24} "
              f"{peak:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
