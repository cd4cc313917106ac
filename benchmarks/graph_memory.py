"""Device memory of the fused denoiser's captured steps: one pool shared by every shape, or one pool each.

    python -m zone_benchmarks.graph_memory                      # SD1.5-sized random UNets, fp16, on CUDA
    python -m zone_benchmarks.graph_memory --sizes 512x512,512x256 --batches 1,2

A server captures one dual step per (padded batch, latent size, steps): each image size it sees, by
each padded batch size. For each pool policy a fresh `FusedDualDenoiser(cuda_graphs=True)` denoises
one batch of every shape in turn (`--steps` steps each: the capture, then replays), and after each
capture the caching allocator's reserved memory is read. What it reports: the reserved memory each
capture added, and in all, for a pool per graph (PyTorch's default) against the engine's shared pool,
and the shared pool's results against the own pools' (the same kernels on the same inputs: they must
agree exactly). CUDA only: graphs need a GPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

import torch

from zone_engine.backends import DTYPES, make_localization_kernels
from zone_engine.cli import CommandParser
from zone_engine.config import EditConfig
from zone_engine.denoise import DenoiseInputs
from zone_engine.dual_step import FusedDualDenoiser
from zone_engine.localize import AttentionAccumulator
from zone_engine.models import PRESETS, build_unet

from .options import refuse_first

Shape = tuple[int, int, int]  # (edits in the batch, image height, image width)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m zone_benchmarks.graph_memory",
                           description=__doc__.split("\n")[0] + " CUDA only: graphs need a GPU.")
    parser.add_argument("--models", type=str.lower, choices=PRESETS, default="sd15",
                        help="UNet size (default sd15: real size)")
    parser.add_argument("--dtype", type=str.lower, choices=("fp32", "fp16", "bf16"), default="fp16",
                        help="the UNets' precision (default: %(default)s)")
    parser.add_argument("--sizes", default="512x512,512x384,384x512,512x256",
                        help="working image sizes HxW, comma-separated (multiples of 32; default: %(default)s)")
    parser.add_argument("--batches", default="1,2,4",
                        help="padded batch sizes, comma-separated (powers of two; default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per batch (default 2)")
    args = parser.parse_args(argv)
    try:
        sizes = [tuple(map(int, size.lower().split("x"))) for size in args.sizes.split(",")]
        args.shapes = [(int(batch), *size) for batch in args.batches.split(",") for size in sizes]
    except ValueError:
        parser.error("--sizes takes HxW,HxW,... and --batches N,N,...")
    if any(len(size) != 2 for size in sizes):
        parser.error("--sizes takes HxW,HxW,... (height x width each)")
    refuse_first(parser, [
        (not any(h % 32 or w % 32 or h < 32 or w < 32 for h, w in sizes),
         f"--sizes {args.sizes}: each side a multiple of 32, at least 32"),
        (all(b >= 1 for b, _, _ in args.shapes), f"--batches {args.batches}: each at least 1"),
        (args.steps >= 1, "--steps must be at least 1"),
    ])
    if any(b & (b - 1) for b, _, _ in args.shapes):  # the fused denoiser pads a batch to a power of two
        parser.error(f"--batches {args.batches}: each a power of two (what a server's batches are padded to)")
    return args


def shape_inputs(shape: Shape, context_dim: int, dtype: torch.dtype, seed: int) -> list[DenoiseInputs]:
    """Random inputs for one batch of `shape` (cost does not depend on the values)."""
    edits, height, width = shape
    generator = torch.Generator().manual_seed(seed)

    def random(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to("cuda", dtype)

    latent = (height // 8, width // 8)
    return [DenoiseInputs(context=random(3, 77, context_dim), image_latents=random(3, 4, *latent),
                          noise=random(1, 4, *latent)) for _ in range(edits)]


def reserved_per_capture(denoiser: FusedDualDenoiser, shapes: Sequence[Shape], context_dim: int,
                         dtype: torch.dtype, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Denoise one batch of each shape; the reserved bytes each shape's capture added, and the latents."""
    accumulate, _ = make_localization_kernels("auto", torch.device("cuda"))
    config = EditConfig(steps=steps)
    added, latents = [], []
    for seed, shape in enumerate(shapes):
        inputs = shape_inputs(shape, context_dim, dtype, seed)
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        latents += denoiser.denoise_batch(inputs, config, [0.01] * len(inputs),
                                          [AttentionAccumulator(accumulate) for _ in inputs])
        torch.cuda.synchronize()
        added.append(torch.cuda.memory_reserved() - before)
    return added, latents


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: CUDA graphs need a CUDA GPU; this machine has none", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    mb_unet, ip2p_unet = (build_unet(PRESETS[args.models]).to("cuda", DTYPES[args.dtype]).eval() for _ in range(2))
    from diffusers import DPMSolverMultistepScheduler

    scheduler_config = dict(DPMSolverMultistepScheduler().config)
    context_dim = mb_unet.config.cross_attention_dim
    # One eager batch first: what the first capture would otherwise carry alone (cuBLAS workspaces,
    # the kernels' first launches) lands before either policy is measured.
    eager = FusedDualDenoiser(ip2p_unet, mb_unet, scheduler_config, cuda_graphs=False, pad_batches=False)
    reserved_per_capture(eager, args.shapes[:1], context_dim, DTYPES[args.dtype], 1)
    results = {}
    for shared in (False, True):
        gc.collect()
        torch.cuda.empty_cache()
        denoiser = FusedDualDenoiser(ip2p_unet, mb_unet, scheduler_config, cuda_graphs=True, pad_batches=False,
                                     shared_graph_pool=shared)
        results[shared] = reserved_per_capture(denoiser, args.shapes, context_dim, DTYPES[args.dtype], args.steps)
        del denoiser
    print(f"device {torch.cuda.get_device_name()}, {args.models} UNets, {args.dtype}, {len(args.shapes)} shapes, "
          f"{args.steps} steps each; reserved memory each capture added, GiB")
    print(f"{'batch':>5} {'image':>9} {'own pool':>9} {'shared':>9}")
    for shape, own, shared in zip(args.shapes, results[False][0], results[True][0], strict=True):
        print(f"{shape[0]:>5} {shape[1]:>4}x{shape[2]:<4} {own / 2**30:>9.2f} {shared / 2**30:>9.2f}")
    print(f"{'in all':>15} {sum(results[False][0]) / 2**30:>9.2f} {sum(results[True][0]) / 2**30:>9.2f}")
    difference = max((own - shared).float().abs().max().item()
                     for own, shared in zip(results[False][1], results[True][1], strict=True))
    print(f"max |latents, shared pool - own pools|: {difference:.3g} (the same kernels on the same inputs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
