"""`zone export sam`: SAM's two networks as ONNX graphs for the `onnx` refinement backend.

One folder holds:
- image_encoder.onnx: image (1, 3, S, S) float32, already normalised and padded (`Sam.preprocess`)
  -> image_embeddings (1, C, S/16, S/16) float32.
- mask_decoder.onnx: image_embeddings (1, C, S/16, S/16), point_coords (B, P, 2) float32 in the S-scale
  input frame (`ResizeLongestSide.apply_coords`), point_labels (B, P) float32 (1 foreground, 0 background)
  -> low_res_logits (B, 3, S/4, S/4), iou_predictions (B, 3): `SamPredictor.predict_torch`'s multimask
  output before upscaling. B and P are dynamic, so a whole batch of grid points is one decoder run.
- manifest.json: what `zone_engine.sam_onnx.OnnxSamSegmenter` checks before it loads anything.

Inputs and outputs are float32 whatever the precision: with --fp16 the casts sit inside the graphs, so
the runtime and its post-processing do not change. Each graph is compared with PyTorch on ONNX Runtime
(CPU) before it is kept; nothing is written to the output folder unless both pass.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from zone_engine import __version__
from zone_engine.errors import ConfigError
from zone_engine.paths import MANIFEST_FILE, check_output_folder, expanded, file_sha256
from zone_engine.sam_onnx import DECODER_FILE, ENCODER_FILE, MANIFEST_FORMAT, TRT_CACHE
from zone_engine.sam_torch import decode_masks, decode_tokens

from .onnx_graph import (
    check_export_target,
    check_opset,
    compare,
    export_graph,
    install,
    installing,
    log,
    require,
    session,
    staging_folder,
)
from .options import TINY_SEED

# Export check, |onnxruntime - torch| <= atol + rtol * max|torch| on every output, against the fp32 model:
# - fp32: both sides compute in fp32 and differ only in fusion and summation order (ORT fuses LayerNorm,
#   attention, GELU). Measured max differences: tiny 2e-6 (encoder) / 1e-7 (decoder), random-weight
#   vit_b 5e-6 / 4e-7. 1e-4 absolute leaves room for other CPUs' kernels; the relative term for
#   real-weight logits of magnitude ~10-30.
# - fp16: weights and activations rounded to fp16 (eps 1e-3) through every block. Measured: tiny
#   2e-3 / 3e-4, vit_b 3e-3 / 5e-4. On the CPU, ONNX Runtime lacks most fp16 kernels and inserts casts
#   to fp32, so this checks the graph and its rounded weights, not a GPU's fp16 arithmetic: check fp16
#   masks on the GPU with `python -m zone_benchmarks.bench_refine --fp16` (it reports mask agreement).
TOLERANCES = {"fp32": dict(atol=1e-4, rtol=1e-4), "fp16": dict(atol=2e-2, rtol=2e-2)}
# What an export writes into its folder: each graph with the weights it may write beside it
# (onnx_graph.export_graph: a model over 2 GB's), the manifest last.
EXPORT_FILES = (ENCODER_FILE, f"{ENCODER_FILE}.data", DECODER_FILE, f"{DECODER_FILE}.data", MANIFEST_FILE)
ENCODER_OUTPUTS = ["image_embeddings"]
DECODER_OUTPUTS = ["low_res_logits", "iou_predictions"]
SAM_FIRST_OPSET, SAM_GRAPHS = 13, "SAM's graphs"  # 13: the first with every op SAM's graphs use (unflatten)


class ImageEncoderGraph(nn.Module):
    """`Sam.image_encoder` with float32 input and output."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.dtype = next(sam.image_encoder.parameters()).dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) float32, `Sam.preprocess`ed -> embeddings (1, C, S/16, S/16) float32."""
        return self.image_encoder(image.to(self.dtype)).float()


class MaskDecoderGraph(nn.Module):
    """Prompt encoder + mask decoder for a batch of point prompts, no box or mask input, multimask output.

    Computes `SamPredictor.predict_torch(points, labels, multimask_output=True)`'s low-res outputs, the
    decoder as the engine runs it (sam_torch.decode_tokens / decode_masks); the point embedding is
    `PromptEncoder._embed_points` without boolean-index assignment, as segment-anything's own
    `SamOnnxModel._embed_points`, which takes one prompt set with an orig_im_size instead of a batch.
    The prompt encoder stays fp32 under --fp16: its Fourier features of pixel coordinates need fp32.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.img_size = sam.image_encoder.img_size
        self.dtype = next(sam.mask_decoder.parameters()).dtype

    def embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """(B, P, 2), (B, P) -> sparse prompt embeddings (B, P + 1, C)."""
        prompts = self.prompt_encoder
        # Point-only prompts get one padding point (label -1), as PromptEncoder adds when boxes is None.
        point_coords = torch.cat([point_coords, torch.zeros_like(point_coords[:, :1])], dim=1)
        point_labels = torch.cat([point_labels, -torch.ones_like(point_labels[:, :1])], dim=1)
        embedding = prompts.pe_layer._pe_encoding((point_coords + 0.5) / self.img_size)  # (B, P + 1, C)
        labels = point_labels.unsqueeze(-1)  # (B, P + 1, 1)
        embedding = embedding * (labels != -1) + prompts.not_a_point_embed.weight * (labels == -1)
        embedding = embedding + prompts.point_embeddings[0].weight * (labels == 0)
        return embedding + prompts.point_embeddings[1].weight * (labels == 1)

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, h, w), (B, P, 2), (B, P) -> low-res logits (B, 3, 4h, 4w), IoU predictions (B, 3)."""
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # the same for every prompt
        image = (image_embeddings + dense).to(self.dtype)
        # The engine's decoding (zone_engine.sam_torch): the image side enters the factored transformer
        # (sam_decoder.py) once, where MaskDecoder.predict_masks repeats it per prompt; outputs 1..3 only
        # (multimask_output=True drops the single-mask output 0).
        tokens_out, image_out, iou_predictions = decode_tokens(
            self.mask_decoder, image, self.prompt_encoder.get_dense_pe().to(self.dtype), sparse.to(self.dtype))
        masks = decode_masks(self.mask_decoder, tokens_out, image_out, image.shape[1:])
        return masks.float(), iou_predictions.float()


def export_sam(
    sam: nn.Module,
    model_type: str,
    out_dir: Path,
    *,
    fp16: bool = False,
    opset: int = 17,
    checkpoint: Path | None = None,
) -> Path:
    """Write image_encoder.onnx, mask_decoder.onnx and manifest.json to `out_dir`; returns `out_dir`.

    `sam`: a segment-anything `Sam` on any device (put in eval mode, weights untouched); `checkpoint`:
    the .pth it was loaded from, whose sha256 goes into the manifest (None: "random:<model_type>").
    Raises ZoneError when an exported graph does not match PyTorch; `out_dir` then keeps whatever it
    held before (and is removed if this call created it).
    """
    check_opset(opset, SAM_FIRST_OPSET, SAM_GRAPHS)
    out_dir = Path(out_dir)
    check_export_target(out_dir, "sam")  # before the tracing; again as the files are moved in (`installing`)
    precision = "fp16" if fp16 else "fp32"
    reference = sam.eval()
    if fp16:
        sam = copy.deepcopy(reference)
        sam.image_encoder.half()
        sam.mask_decoder.half()
    with staging_folder(out_dir) as staging:
        generator = torch.Generator().manual_seed(0)
        size = sam.image_encoder.img_size
        image = torch.randn(1, 3, size, size, generator=generator).to(sam.device)
        embeddings = _trace(sam, reference, staging, image, generator, opset,
                            {"zone.model_type": model_type, "zone.precision": precision, "zone.version": __version__})
        report = _validate(reference, staging, image, embeddings, generator, TOLERANCES[precision])
        files = sorted(path.name for path in staging.iterdir())
        manifest = {**_manifest(sam, model_type, precision, opset, embeddings, checkpoint),
                    "files": {name: file_sha256(staging / name) for name in files}, "validation": report}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        with installing(out_dir, "sam"):  # the moves all done, or none
            shutil.rmtree(out_dir / TRT_CACHE, ignore_errors=True)  # engines of the graphs replaced: never read again
            for name in [*files, MANIFEST_FILE]:  # the manifest last: it vouches for the files before it
                install(staging, out_dir, name)
        for name in (f"{ENCODER_FILE}.data", f"{DECODER_FILE}.data"):  # a vit_h export's weights, under vit_b's
            if name not in files:
                try:
                    (out_dir / name).unlink(missing_ok=True)
                except OSError as error:  # the export is whole and installed: said, not failed
                    warnings.warn(f"{out_dir / name} is no longer used but could not be removed ({error})",
                                  stacklevel=2)
    return out_dir


def _trace(sam: nn.Module, reference: nn.Module, staging: Path, image: torch.Tensor, generator: torch.Generator,
           opset: int, metadata: dict[str, str]) -> torch.Tensor:
    """Both graphs of `sam` into `staging`; the fp32 `reference`'s embeddings of `image` (the decoder's
    trace input, and the validation's)."""
    export_graph(ImageEncoderGraph(sam), (image,), staging / ENCODER_FILE, opset,
                 input_names=["image"], output_names=ENCODER_OUTPUTS, dynamic_axes=None,
                 metadata={**metadata, "zone.part": "image_encoder"})
    with torch.inference_mode():
        embeddings = reference.image_encoder(image)
    points, labels = _sample_points(2, 1, sam.image_encoder.img_size, generator, image.device)
    export_graph(MaskDecoderGraph(sam), (embeddings, points, labels), staging / DECODER_FILE, opset,
                 input_names=["image_embeddings", "point_coords", "point_labels"], output_names=DECODER_OUTPUTS,
                 dynamic_axes={"point_coords": {0: "batch", 1: "points"}, "point_labels": {0: "batch", 1: "points"},
                               "low_res_logits": {0: "batch"}, "iou_predictions": {0: "batch"}},
                 metadata={**metadata, "zone.part": "mask_decoder"})
    return embeddings


def _manifest(sam: nn.Module, model_type: str, precision: str, opset: int, embeddings: torch.Tensor,
              checkpoint: Path | None) -> dict:
    """What OnnxSamSegmenter checks and needs besides the graphs: SAM's pre- and post-processing
    constants, and where the graphs came from."""
    return {
        "format": MANIFEST_FORMAT,
        "model_type": model_type,
        "input_size": sam.image_encoder.img_size,
        "embedding_shape": list(embeddings.shape[1:]),  # (C, S/16, S/16)
        "low_res_size": 4 * embeddings.shape[-1],
        "opset": opset,
        "precision": precision,
        "pixel_mean": sam.pixel_mean.flatten().tolist(),
        "pixel_std": sam.pixel_std.flatten().tolist(),
        "mask_threshold": float(sam.mask_threshold),
        "image_format": sam.image_format,
        "checkpoint": checkpoint.name if checkpoint else None,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else f"random:{model_type}",
        "zone_engine_version": __version__,
        "torch_version": torch.__version__,
        "onnxruntime_version": require("onnxruntime").__version__,
    }


def _validate(reference: nn.Module, folder: Path, image: torch.Tensor, embeddings: torch.Tensor,
              generator: torch.Generator, tolerance: dict[str, float]) -> dict:
    """Both graphs in `folder` against the fp32 model run as SamPredictor.predict_torch runs it
    (segment-anything's own prompt encoder, not the graph's rewrite), the decoder at other batch and point
    counts than traced with; the largest difference of each check, for the manifest."""
    size, device = image.shape[-1], image.device
    encoder, decoder = session(folder / ENCODER_FILE), session(folder / DECODER_FILE)
    report = {"tolerance": tolerance, ENCODER_FILE: max(compare(
        encoder, ENCODER_FILE, {"image": image}, [embeddings], ENCODER_OUTPUTS, tolerance).values())}
    for batch, count in ((5, 1), (3, 3)):
        points, labels = _sample_points(batch, count, size, generator, device)
        with torch.inference_mode():
            sparse, dense = reference.prompt_encoder(points=(points, labels.int()), boxes=None, masks=None)
            expected = reference.mask_decoder(
                image_embeddings=embeddings, image_pe=reference.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            )
        inputs = {"image_embeddings": embeddings, "point_coords": points, "point_labels": labels}
        where = f" for {batch} prompts of {count} point(s)"
        report[f"{DECODER_FILE} B={batch} P={count}"] = max(compare(
            decoder, DECODER_FILE, inputs, list(expected), DECODER_OUTPUTS, tolerance, where).values())
    return report  # the sessions close here: ONNX Runtime holds the files open until then


def _sample_points(
    batch: int, count: int, size: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random point prompts: coords (B, P, 2) in [0, size), labels (B, P) in {0, 1}, the first foreground."""
    points = torch.rand(batch, count, 2, generator=generator) * size
    labels = torch.randint(0, 2, (batch, count), generator=generator).float()
    labels[:, 0] = 1.0
    return points.to(device), labels.to(device)


# --------------------------------------------------------------------------------------------------
# Command line: `zone export sam` (its options: export/options.py).


def run_export_sam(args: argparse.Namespace) -> Path:
    """`zone export sam`: load (or build, with --tiny) SAM and export it; returns the output folder."""
    from zone_engine.models import build_tiny_components, load_sam, sam_type_from_path

    check_output_folder(args.out, "--out", list(EXPORT_FILES))
    check_export_target(args.out, "sam")
    check_opset(args.opset, SAM_FIRST_OPSET, SAM_GRAPHS)  # before a checkpoint of gigabytes loads
    if args.tiny:
        if args.checkpoint is not None or args.model_type is not None:
            raise ConfigError("--tiny exports its own tiny random SAM: leave out --checkpoint and --model-type")
        with torch.random.fork_rng(devices=[]):  # a fixed seed without touching the caller's RNG
            # The tiny set's own SAM (built after its other models): `zone edit --tiny --segmenter onnx` then
            # refines with the very SAM `zone edit --tiny` runs in PyTorch, so the two can be compared.
            sam = build_tiny_components(TINY_SEED).sam
        model_type, checkpoint = "tiny", None
    else:
        if args.checkpoint is None:
            raise ConfigError("zone export sam needs --checkpoint SAM.pth (or --tiny for a random test model)")
        checkpoint = expanded(args.checkpoint, ConfigError)
        log.info("loading SAM from %s", checkpoint)
        sam = load_sam(checkpoint, args.model_type, flags=("--checkpoint PATH", "--model-type TYPE"))
        model_type = args.model_type or sam_type_from_path(checkpoint)
    return export_sam(sam, model_type, args.out, fp16=args.fp16, opset=args.opset, checkpoint=checkpoint)
