"""Refinement latency: segment-anything's `SamAutomaticMaskGenerator` in PyTorch vs the ONNX Runtime backend.

    python -m zone_benchmarks.bench_refine [--model-type vit_b] [--size 512] [--points-per-side 32]
    python -m zone_benchmarks.bench_refine --model-type vit_h --fp16    # on a GPU: TensorRT / CUDA providers
    python -m zone_benchmarks.bench_refine --model-type vit_h --no-onnx --sam-precision bf16   # PyTorch only

Builds a SAM of the given size with random weights, exports it to a temporary folder, and times both
backends on the same image in the same run (one warm-up, then the median of --repeats); with
`--sam-precision`, also the PyTorch generator with SAM's image encoder in bf16/fp16. Each row carries
its quality: mask count and IoU against the fp32 PyTorch masks. A second table times what the engine
asks of each PyTorch segmenter, the one segment that best overlaps M_b (`select`, the on-device
search of sam_torch.py), against listing every segment and choosing (`segment` + `choose_segment`),
and checks that both choose the same segment (the table gives the two segments' IoU where they
differ: the search's decoder is SAM's up to float rounding). The image-encoder share is timed inside
the same runs (SamPredictor.set_image), so no extra passes. Last, SAM's image encoder and its
decoder's two-way transformer (one batch of prompts), each as SAM's module runs it against the
engine's form (attention through SDPA: sam_encoder.py; factored: sam_decoder.py), with their largest
difference. The segmenter rows above use the engine's encoder (TorchSamPredictor).

Random weights give almost no masks at segment-anything's default thresholds, so both thresholds are
0 here by default (`SamConfig(pred_iou_thresh=0, stability_score_thresh=0)`): every decoded mask then
goes through stability scoring, box NMS and RLE encoding, as many do with real weights and real
thresholds. `--thresholds sam` keeps segment-anything's, as `zone bench` runs them: no mask survives.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from zone_engine.backends import DTYPES
from zone_engine.cli import CommandParser
from zone_engine.config import MAX_POINTS_PER_SIDE, MAX_WORKING_SIDE, SamConfig, check_backend_options, device_kind
from zone_engine.errors import ZoneError
from zone_engine.image_io import make_sample_image
from zone_engine.masks import iou
from zone_engine.models import SAM_SIZES, build_sam
from zone_engine.refine import Selection, choose_segment
from zone_engine.sam_decoder import two_way_transformer
from zone_engine.sam_encoder import encode_image
from zone_engine.sam_onnx import OnnxSamSegmenter, check_providers
from zone_engine.sam_torch import TorchSamSegmenter
from zone_engine.streams import stdout_kept
from zone_export.sam import export_sam

from .measure import guarded, on_named_device
from .options import device_name, refuse_first


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m zone_benchmarks.bench_refine", description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", type=str.lower, default="vit_b", choices=list(SAM_SIZES),
                        help="SAM size (default: vit_b)")
    parser.add_argument("--size", type=int, default=512, help="square image side in pixels (default: 512)")
    parser.add_argument("--points-per-side", type=int,
                        help="grid side (default: SAM's 32 on CUDA; 8 on the CPU, where one 64-prompt vit_b "
                        "decoder run takes ~10 s on 2 cores)")
    parser.add_argument("--points-per-batch", type=int, default=64, help="prompts per decoder run (default: 64)")
    parser.add_argument("--repeats", type=int, help="timed runs per backend after one warm-up (default: 3 on CUDA, "
                        "1 on the CPU)")
    parser.add_argument("--fp16", action="store_true", help="export the ONNX graphs in fp16 (GPU providers)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="PyTorch baseline device: auto, cpu, cuda or cuda:N")
    parser.add_argument("--providers", nargs="+", help="ONNX Runtime providers, in order of preference, by their "
                        "full names (default: TensorrtExecutionProvider CUDAExecutionProvider CPUExecutionProvider, "
                        "those this onnxruntime has)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the export and the ONNX Runtime row")
    parser.add_argument("--thresholds", type=str.lower, choices=("zero", "sam"), default="zero",
                        help="zero (default): keep every mask, as real weights keep many; sam: segment-anything's "
                        "0.88 / 0.95, which a random SAM never passes (times decoding and filtering alone)")
    parser.add_argument("--sam-precision", type=str.lower, choices=("bf16", "fp16"),
                        help="also time the PyTorch generator with SAM's image encoder in this precision")
    args = parser.parse_args(argv)
    refuse_first(parser, [  # 0 and below were tracebacks deep inside, or silently the defaults
        (32 <= args.size <= MAX_WORKING_SIDE, f"--size must be between 32 and {MAX_WORKING_SIDE}"),
        (args.repeats is None or args.repeats >= 1, "--repeats must be at least 1"),
        (args.points_per_side is None or 1 <= args.points_per_side <= MAX_POINTS_PER_SIDE,
         f"--points-per-side must be between 1 and {MAX_POINTS_PER_SIDE}"),
        (args.points_per_batch >= 1, "--points-per-batch must be at least 1"),
        # Options that would be silently ignored, or fail after the models are built.
        (not (args.fp16 and args.no_onnx), "--fp16 sets the ONNX export's precision: drop it with --no-onnx"),
        (not (args.providers and args.no_onnx), "--providers are ONNX Runtime's: drop them with --no-onnx"),
    ])
    try:
        SamConfig(points_per_side=8 if args.points_per_side is None else args.points_per_side,
                  points_per_batch=args.points_per_batch)
        # The PyTorch rows' SAM precision, checked as zone edit checks it (fp16 only on CUDA).
        check_backend_options(device_kind(args.device), sam_precision=args.sam_precision or "fp32")
        if args.providers:
            check_providers(args.providers)
    except ZoneError as error:
        parser.error(str(error))
    return args


def timed_runs(name: str, segment: Callable[[np.ndarray], list[np.ndarray]], predictor, image: np.ndarray,
               repeats: int):
    """One warm-up, then `repeats` runs: masks, median total seconds, median image-encoder seconds. Each
    run is logged to stderr as it ends (a device stage cut off at its limit still shows how far it got)."""
    encoder_seconds: list[float] = []
    set_image = predictor.set_image

    def timed_set_image(*args, **kwargs):
        start = time.perf_counter()
        set_image(*args, **kwargs)
        if predictor.features.is_cuda:
            torch.cuda.synchronize()
        encoder_seconds.append(time.perf_counter() - start)

    predictor.set_image = timed_set_image  # the generator calls it once per crop: once here
    masks = segment(image)
    encoder_seconds.clear()
    totals = []
    for index in range(repeats):
        start = time.perf_counter()
        masks = segment(image)  # bool numpy masks: the device work is done when it returns
        totals.append(time.perf_counter() - start)
        print(f"[refine] {name}: run {index + 1}/{repeats} {1e3 * totals[-1]:.1f} ms", file=sys.stderr, flush=True)
    del predictor.set_image
    return masks, statistics.median(totals), statistics.median(encoder_seconds)


def mask_agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float]:
    """Mean and smallest IoU of each reference mask with its best match among `other` (1.0 when both empty)."""
    if not reference or not other:
        return (1.0, 1.0) if len(reference) == len(other) else (0.0, 0.0)
    best = []
    for mask in reference:
        ious = [iou(mask, o) for o in other]
        best.append(max(ious))
    return float(np.mean(best)), float(np.min(best))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return on_named_device(args.device, lambda device: run(args, device))


def run(args: argparse.Namespace, device: torch.device) -> int:
    # Again on the device auto found (parse_args could check only a named one): fp16 SAM only on CUDA.
    check_backend_options(device.type, sam_precision=args.sam_precision or "fp32")
    args.device_type = device.type
    on_gpu = device.type == "cuda"
    if args.points_per_side is None:
        args.points_per_side = 32 if on_gpu else 8
    if args.repeats is None:
        args.repeats = 3 if on_gpu else 1
    config = SamConfig(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch)
    if args.thresholds == "zero":
        config = dataclasses.replace(config, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    image = make_sample_image(args.size, args.size)
    torch.manual_seed(0)
    sam = build_sam(args.model_type).eval().to(device)  # export traces on the device too: faster for vit_h

    onnx_rows = []  # (name, masks, total s, encoder s)
    export_seconds = None
    if not args.no_onnx:
        with tempfile.TemporaryDirectory(prefix="zone-bench-sam-") as folder:
            started = time.perf_counter()
            export_sam(sam, args.model_type, Path(folder), fp16=args.fp16)
            export_seconds = time.perf_counter() - started
            onnx_segmenter = OnnxSamSegmenter(Path(folder), config, providers=args.providers)
            name = f"onnx {'fp16' if args.fp16 else 'fp32'} ({onnx_segmenter.providers[0]})"
            onnx_rows.append((name, *timed_runs(name, onnx_segmenter.segment, onnx_segmenter.generator.predictor,
                                                image, args.repeats)))
            del onnx_segmenter

    threads = torch.get_num_threads()
    reference = TorchSamSegmenter(sam, config)
    name = f"torch SamAutomaticMaskGenerator fp32 ({device.type}, {threads} thr)"
    rows = [(name, *timed_runs(name, reference.segment, reference.generator.predictor, image, args.repeats))]
    segmenters = {rows[0][0]: reference}
    if args.sam_precision:  # a variant that fails loses its own rows only (as every part after the reference)
        name = f"torch, image encoder {args.sam_precision} (autocast)"
        variant = TorchSamSegmenter(sam, config, DTYPES[args.sam_precision])
        row = guarded(f"{name}: its runs",
                      lambda: timed_runs(name, variant.segment, variant.generator.predictor, image, args.repeats))
        if row is not None:
            segmenters[name] = variant
            rows.append((name, *row))
    searches = guarded("the search rows", lambda: search_rows(segmenters, rows, image, args.repeats)) or []
    print_report(args, sam, rows + onnx_rows, export_seconds, searches)
    if device.type == "cuda":
        guarded("the search's CUDA runs", lambda: print_search_batching(reference, image, args.repeats))
    half = DTYPES[args.sam_precision] if args.sam_precision else None
    guarded("the network rows", lambda: print_network_rows(sam, args.points_per_batch, max(args.repeats, 3), half))
    return 0


def centre_mask(size: tuple[int, int]) -> np.ndarray:
    """The M_b the search rows look for: the image's central quarter."""
    height, width = size
    mask = np.zeros(size, dtype=bool)
    mask[height // 4: height // 4 + height // 2, width // 4: width // 4 + width // 2] = True
    return mask


def search_rows(segmenters: dict, rows: list[tuple], image: np.ndarray, repeats: int) -> list[tuple]:
    """What the engine runs: each PyTorch segmenter's `select` (the on-device search for M_b's segment),
    timed like its `segment` row, against that row's time plus `choose_segment` on its masks, and
    whether both chose the same segment."""
    mask_b = centre_mask(image.shape[:2])
    searches = []
    for (name, segmenter), (_, masks, list_total, _) in zip(segmenters.items(), rows, strict=True):
        found: list[Selection] = []

        def select(image: np.ndarray, segmenter=segmenter, found=found) -> list[np.ndarray]:
            found.append(segmenter.select(image, mask_b))
            return [] if found[-1].segment is None else [found[-1].segment]

        choose_seconds = []
        for _ in range(3):
            start = time.perf_counter()
            expected = choose_segment(mask_b, masks)
            choose_seconds.append(time.perf_counter() - start)
        _, total, encoder = timed_runs(f"{name}, search", select, segmenter.generator.predictor, image, repeats)
        agreements = [selection_agreement(selection, expected) for selection in found]
        differing = [value for value in agreements if value != "same"]
        agreement = min(differing) if differing else "same"
        searches.append((name, list_total + statistics.median(choose_seconds), total, encoder, agreement))
    return searches


def selection_agreement(a: Selection, b: Selection) -> float | str:
    """"same" when both chose the same segment (pixels, IoU, count), else the IoU of the two segments."""
    if a.segment is None or b.segment is None:
        return "same" if a.segment is b.segment and a.segment_count == b.segment_count else 0.0
    if np.array_equal(a.segment, b.segment) and (a.iou, a.segment_count) == (b.iou, b.segment_count):
        return "same"
    return iou(a.segment, b.segment)


def print_report(
    args: argparse.Namespace, sam, rows: list[tuple], export_seconds: float | None, searches: list[tuple]
) -> None:
    """The table (first row: fp32 PyTorch, the reference) and each row's speed-up over it."""
    print(f"refinement: SAM {args.model_type} (random weights, input {sam.image_encoder.img_size}), image "
          f"{args.size}x{args.size}, {args.points_per_side}x{args.points_per_side} points, batch "
          f"{args.points_per_batch}; median of {args.repeats} after 1 warm-up")
    if args.thresholds == "zero":
        print("config: SamConfig(pred_iou_thresh=0, stability_score_thresh=0): random weights give few masks at "
              "the default thresholds; with none filtered the post-processing cost is realistic")
    else:
        print("config: segment-anything's thresholds (0.88 / 0.95): a random SAM keeps no mask, so this times the "
              "encoder, the decoder and the filtering alone")
    if export_seconds is not None:
        print(f"export (not timed below): {export_seconds:.1f} s, {'fp16' if args.fp16 else 'fp32'}")
    print()
    width = max(44, *(len(row[0]) for row in rows), *(len(search[0]) for search in searches))  # the names' column
    header = f"{'backend':<{width}} {'total ms':>10} {'encoder ms':>11} {'masks':>6} {'IoU mean/min vs torch':>22}"
    print(header)
    print("-" * len(header))
    reference_masks = rows[0][1]
    for index, (name, masks, total, encoder) in enumerate(rows):
        mean_iou, min_iou = mask_agreement(reference_masks, masks)
        quality = "reference" if index == 0 else f"{mean_iou:.4f} / {min_iou:.4f}"
        print(f"{name:<{width}} {1e3 * total:>10.1f} {1e3 * encoder:>11.1f} {len(masks):>6} {quality:>22}")
    print()
    _, _, base_total, base_encoder = rows[0]
    for name, _, total, encoder in rows[1:]:
        print(f"speed-up {name} vs torch fp32: {base_total / total:.2f}x total, {base_encoder / encoder:.2f}x image "
              f"encoder, {(base_total - base_encoder) / max(total - encoder, 1e-9):.2f}x decoding + post-processing")

    print()
    print("the engine's question, M_b = the central quarter: list every segment then choose (`segment` +")
    print("choose_segment) vs search on the device (`select`), same segmenter, same run")
    header = (f"{'segmenter':<{width}} {'list ms':>9} {'search ms':>10} {'speed-up':>9} {'encoder ms':>11} "
              f"{'chosen segment':>15}")
    print(header)
    print("-" * len(header))
    for name, list_total, total, encoder, agreement in searches:
        print(f"{name:<{width}} {1e3 * list_total:>9.1f} {1e3 * total:>10.1f} {list_total / total:>8.2f}x "
              f"{1e3 * encoder:>11.1f} {agreement if agreement == 'same' else f'IoU {agreement:.4f}':>15}")
    if any(agreement != "same" for *_, agreement in searches):
        print("the chosen segments differ: the two decoders round differently (the factored transformer; on CUDA "
              "also batch-size dependent kernels, TF32 convolutions), moving masks that sit at a threshold")


def print_search_batching(segmenter: TorchSamSegmenter, image: np.ndarray, repeats: int) -> None:
    """On CUDA: the search in the runs it takes there (as many prompts as half the free memory holds)
    against runs of points_per_batch, as on the CPU; the same segment either way is checked."""
    predictor, per_batch = segmenter.generator.predictor, segmenter.generator.points_per_batch
    mask_b, timings, found = centre_mask(image.shape[:2]), {}, {}
    prompts = len(segmenter.generator.point_grids[0])
    per_run = predictor.prompts_per_run(per_batch, prompts, image.shape[:2])
    for label, size in ((f"runs of {per_run} (default on CUDA)", per_run), (f"runs of {per_batch}", per_batch)):
        predictor.prompts_per_run = lambda *_, size=size: size
        segmenter.select(image, mask_b)  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            found[label] = segmenter.select(image, mask_b)
            seconds.append(time.perf_counter() - start)
        timings[label] = statistics.median(seconds)
    del predictor.prompts_per_run  # the class's method again
    (fast, fast_s), (slow, slow_s) = timings.items()
    agreement = selection_agreement(*found.values())
    print(f"search of {prompts} prompts, {fast} {1e3 * fast_s:.1f} ms vs {slow} {1e3 * slow_s:.1f} ms = "
          f"{slow_s / fast_s:.2f}x; chosen segment {agreement if agreement == 'same' else f'IoU {agreement:.4f}'}")


def print_network_rows(sam: torch.nn.Module, prompts: int, repeats: int, half: torch.dtype | None = None) -> None:
    """SAM's image encoder and its decoder's two-way transformer (one batch of prompts), each as SAM's
    module runs it and as the engine does (sam_encoder.py, sam_decoder.py): median seconds of `repeats`
    after a warm-up, and the largest difference of the outputs relative to their magnitude. `half`: the
    encoders also under autocast to it, as `--sam-precision` runs them (which form is faster can differ
    by precision: on an H200 the SDPA form was 0.93x SAM's in fp32)."""
    encoder, decoder, device = sam.image_encoder, sam.mask_decoder, sam.device
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, encoder.img_size, encoder.img_size, generator=generator).to(device)
    channels, (h, w) = decoder.transformer_dim, sam.prompt_encoder.image_embedding_size
    embedding, image_pe = (torch.randn(1, channels, h, w, generator=generator).to(device) for _ in range(2))
    tokens = torch.randn(prompts, 7, channels, generator=generator).to(device)
    print()
    print(f"SAM's networks, SAM's module vs the engine's; median of {repeats} after 1 warm-up")
    compare(f"image encoder, one {encoder.img_size}² image", repeats, device,
            ("SAM's ImageEncoderViT", lambda: encoder(image)),
            ("attention through SDPA (sam_encoder.py)", lambda: encode_image(encoder, image)))
    if half is not None:
        compare(f"image encoder under autocast to {half}, one {encoder.img_size}² image", repeats, device,
                ("SAM's ImageEncoderViT", autocast(half, device, lambda: encoder(image))),
                ("attention through SDPA (sam_encoder.py)",
                 autocast(half, device, lambda: encode_image(encoder, image))))
    compare(f"decoder transformer, {prompts} prompts on one {h}x{w} embedding", repeats, device,
            ("SAM's TwoWayTransformer", lambda: decoder.transformer(embedding, image_pe, tokens)[1]),
            ("factored (sam_decoder.py)", lambda: two_way_transformer(decoder.transformer, embedding, image_pe,
                                                                       tokens)[1]))


def autocast(dtype: torch.dtype, device: torch.device, run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`run` under torch.autocast to `dtype`, its output as fp32 (as TorchSamPredictor runs the encoder)."""
    def autocast_run() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return run().float()
    return autocast_run


def compare(what: str, repeats: int, device: torch.device, *variants: tuple[str, Callable[[], torch.Tensor]]) -> None:
    """Time SAM's variant (first) and the engine's; print both, the ratio and their largest difference."""
    outputs, seconds = [], []
    with torch.inference_mode():
        for _, run in variants:
            outputs.append(run())
            if device.type == "cuda":  # the warm-up's queued work stays out of the first timing
                torch.cuda.synchronize()
            timings = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - start)
            seconds.append(statistics.median(timings))
    (plain, engine), (reference, result) = (name for name, _ in variants), outputs
    difference = float((result - reference).abs().max() / reference.abs().max())
    print(f"{what}: {plain} {1e3 * seconds[0]:.1f} ms, {engine} {1e3 * seconds[1]:.1f} ms = "
          f"{seconds[0] / seconds[1]:.2f}x; max |difference| {difference:.1e} of the output's magnitude")


if __name__ == "__main__":
    with stdout_kept():  # a closed pipe (`| head`) or an ASCII locale: the tables go on, not a traceback
        sys.exit(main())
