"""Where torch.compile breaks the engine's dual step into pieces: `torch._dynamo.explain` of one step.

    python -m zone_benchmarks.graph_breaks                         # SD1.5-sized random UNets, CPU, fp32
    python -m zone_benchmarks.graph_breaks --device cuda --dtype fp16

One graph and no breaks is what the compile backend needs: every break is a Python frame that
dynamo traces and guards on its own (and recompiles per shape: a UNet's blocks all differ).
Runs with cross-attention recorded by the engine's localization kernels for the device, as in an edit.
"""

from __future__ import annotations

import argparse
import sys

import torch

from zone_benchmarks.bench_dual_unet import step_arguments
from zone_benchmarks.measure import on_named_device
from zone_benchmarks.options import add_unet_arguments, refuse_first, unet_resolution_check
from zone_engine.backends import DTYPES, make_localization_kernels
from zone_engine.cli import CommandParser
from zone_engine.config import LOCALIZATION_KERNELS, check_precision
from zone_engine.dual_step import DualUNet, dual_step
from zone_engine.localize import (
    AttentionAccumulator,
    accumulate_attention_probabilities,
    attention_grid,
    record_cross_attention,
)
from zone_engine.models import PRESETS, build_unet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m zone_benchmarks.graph_breaks", description=__doc__.split("\n")[0])
    add_unet_arguments(parser, resolution=512)
    parser.add_argument("--kernels", type=str.lower, choices=LOCALIZATION_KERNELS, default="auto",
                        help="attention recording (default auto: Triton on CUDA)")
    args = parser.parse_args(argv)
    refuse_first(parser, [unet_resolution_check(args.resolution)])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return on_named_device(args.device, lambda device: explain(args, device))


def explain(args: argparse.Namespace, device: torch.device) -> int:
    """`torch._dynamo.explain` of one dual step on `device`; 0 for one graph, 1 when it breaks."""
    check_precision(args.dtype, device.type)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    mb_unet, ip2p_unet = (build_unet(PRESETS[args.models]).to(device, dtype).eval() for _ in range(2))
    latent = (args.resolution // 8, args.resolution // 8)
    sample = torch.randn(6, 8, *latent, device=device, dtype=dtype)  # one edit: 6 UNet rows
    context = torch.randn(3, 77, mb_unet.config.cross_attention_dim, device=device, dtype=dtype)
    schedule, state, image_latents, guidance, beta = step_arguments(sample, context)
    accumulate = make_localization_kernels(args.kernels, device)[0]
    accumulators = [AttentionAccumulator(accumulate)]
    with torch.inference_mode(), record_cross_attention(ip2p_unet, latent, attention_grid(latent), accumulators):
        explained = torch._dynamo.explain(dual_step)(DualUNet(mb_unet, ip2p_unet), schedule, state, image_latents,
                                                     context, guidance, beta)
    print(f"torch {torch.__version__}, {device.type}, {args.dtype}, recording by {_recording(accumulate, device)}: "
          f"{explained.graph_count} graph(s), {explained.graph_break_count} break(s)")
    seen: set[str] = set()
    for broken in explained.break_reasons:
        if broken.reason in seen:
            continue
        seen.add(broken.reason)
        print(f"- {broken.reason[:800]}")
        for frame in broken.user_stack[-3:]:
            print(f"    {str(frame)[:300]}")
    # A break in a function called in a loop leaves dynamo's count at 0 with its reason listed (torch 2.14).
    return 0 if explained.graph_break_count == 0 and not explained.break_reasons else 1


def _recording(accumulate: object, device: torch.device) -> str:
    """What recorded the attention: the torch reference, or kernel 1 through its custom op (where it can run)."""
    if accumulate is accumulate_attention_probabilities:
        return "the torch reference"
    from zone_kernels.attn_accumulate import runs_on

    return "kernel 1 (Triton, its custom op)" if runs_on(device) else "the torch reference (Triton cannot run here)"


if __name__ == "__main__":
    sys.exit(main())
