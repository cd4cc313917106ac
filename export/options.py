"""The command-line options of `zone export unet`, `zone export sam` and `zone build-engine`.

argparse only: no torch, so `zone --help` (whose parser holds these) answers at once. The commands
themselves are `zone_export.unet.run_export_unet`, `zone_export.sam.run_export_sam` and
`zone_export.engine.run_build_engine`.
"""

from __future__ import annotations

import argparse

from zone_engine.config import IP2P_ID, MAGICBRUSH_ID, SAM_TYPES
from zone_engine.paths import file_argument, folder_argument

TINY_SEED = 0  # the seed of `--tiny`'s random weights
DEFAULT_SIZE = (512, 512)  # `zone export unet`'s image size (height, width) unless told


def add_export_unet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ip2p", metavar="ID|DIR", help=f"InstructPix2Pix folder or cached id (default: {IP2P_ID})")
    parser.add_argument("--magicbrush", metavar="ID|DIR",
                        help=f"MagicBrush folder or cached id (default: {MAGICBRUSH_ID})")
    parser.add_argument("--out", type=folder_argument, required=True,
                        help="folder to write the ONNX files and manifest to")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true",
                           help="half-precision graphs: TensorRT builds fp16 engines from them (float32 in and out)")
    precision.add_argument("--bf16", action="store_true", help="not supported yet (needs ONNX opset 22)")
    parser.add_argument("--height", type=int,
                        help=f"image height, a multiple of 32 up to 2048 (default {DEFAULT_SIZE[0]})")
    parser.add_argument("--width", type=int,
                        help=f"image width, a multiple of 32 up to 2048 (default {DEFAULT_SIZE[1]})")
    parser.add_argument("--dynamic-shapes", metavar="MIN:OPT:MAX",
                        help="serve every image size in a range, e.g. 256x256:512x512:512x512 (HEIGHTxWIDTH, "
                        "multiples of 32); TensorRT tunes for OPT")
    parser.add_argument("--opset", type=int, default=19, help="ONNX opset, 14 to 20 (default: 19)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"export tiny random models (seed {TINY_SEED}) instead of checkpoints: tests and demos")
    _add_no_progress(parser)


def add_export_sam_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=file_argument,
                        help="SAM checkpoint .pth (e.g. sam_vit_h_4b8939.pth); required unless --tiny")
    parser.add_argument("--model-type", type=str.lower, choices=SAM_TYPES,
                        help="SAM size of --checkpoint (default: read from its file name)")
    parser.add_argument("--out", type=folder_argument, required=True,
                        help="folder to write the ONNX files and manifest to")
    parser.add_argument("--fp16", action="store_true", help="half-precision graphs (for GPUs; fp32 in and out)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 13 to 20 (default: 17)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"export the tiny random SAM of `zone edit --tiny` (seed {TINY_SEED}) instead of a "
                        "checkpoint: tests and demos")
    _add_no_progress(parser)


def _add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress lines on stderr (a line as each graph is traced and checked)")


def add_build_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=folder_argument,
                        help="a `zone export unet` folder (ONNX graphs and manifest.json)")
    parser.add_argument("--cache", type=folder_argument, help="where engines are kept (default: FOLDER/engines, "
                        "where `zone edit --engines FOLDER` looks for them)")
    parser.add_argument("--graph", action="append", dest="graphs", metavar="NAME",
                        help="build only this graph (dual_step, vae_encoder, vae_decoder); repeatable")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache holds a matching engine")
