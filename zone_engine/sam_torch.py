"""The `torch` refinement backend: SAM's automatic masks, and the search for the one segment ZONE keeps.

ZONE asks segment-anything's `SamAutomaticMaskGenerator` for every segment of an image, then keeps
the one with the largest IoU with M_b (ZONE.md section 4). The generator answers a wider question
than that: it upscales the logits of all 3 masks of every point prompt to the image size before the
predicted-IoU filter drops most of them, run-length encodes each kept mask on the host, and the
caller decodes them all again to measure overlaps. `best_segment` asks the narrow question with the
generator's own settings, steps and functions, on the generator's device:

- the decoder runs its two-way transformer factored for prompts sharing one image (sam_decoder.py:
  no per-prompt projection of the image side is stored), and skips its output upscaling for prompts
  whose 3 masks all fail the predicted-IoU filter (`TorchSamPredictor.predict_passing`); the output
  upscaling runs channels last, its transposed convolutions as matmuls (`decode_masks`);
- only masks that pass that filter are upscaled to the image size (upscaling is per mask, so a
  mask's pixels do not depend on which others are upscaled with it), with segment-anything's two
  bilinear resizes composed into one matrix per axis (`_upscale`: no 1024² intermediate);
- each kept mask's intersection and union with M_b are counted where the mask is, 8 pixels a machine
  word (`count_true`), and only its low-resolution logits are kept (256², whatever the image size);
- box NMS runs on the same boxes and scores, in the same order, as the generator's;
- the chosen segment alone is upscaled again and copied to the host;
- on CUDA, the image is resized to SAM's input on the device, byte for byte as segment-anything's
  Pillow resize does it on the host (`TorchSamPredictor.resized_input`, pillow_resize.py).

It returns the segment, IoU and segment count that `choose_segment(mask_b, generator's masks)` does,
up to the decoder's and the upscaling's float rounding (~3e-7 of their outputs: a pixel at a threshold
within that could flip; tested mask for mask on random SAMs, where none does), for the settings it
supports: one crop (`crop_n_layers=0`) and no small-region post-processing (`min_mask_region_area=0`),
segment-anything's defaults and ZONE's. Other settings go through the generator itself.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from torchvision.ops.boxes import batched_nms
from tqdm.auto import tqdm

from .config import SamConfig
from .pillow_resize import resize_uint8
from .progress import progress_bar
from .refine import ListSegmenter, Selection, check_segment_inputs
from .sam_decoder import two_way_transformer
from .sam_encoder import encode_image


class TorchSamPredictor(SamPredictor):
    """segment-anything's `SamPredictor`, plus the decoder's raw outputs and an optional low-precision encoder;
    its image encoder runs SAM's weights with the attention through SDPA (sam_encoder.py).

    `encoder_dtype` fp16/bf16 runs SAM's image encoder (nearly all of its FLOPs: one ViT pass over a
    1024² input) under autocast; the embedding comes back as fp32, so prompt decoding, the predicted
    IoU and stability scores and every threshold stay in fp32 as segment-anything computes them.
    """

    def __init__(self, sam: torch.nn.Module, encoder_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(sam)
        self.encoder_dtype = encoder_dtype

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """`SamPredictor.set_image`; on CUDA SAM's input is resized on the device (`resized_input`)."""
        if self.device.type != "cuda":
            return super().set_image(image, image_format)
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be RGB or BGR, got {image_format!r}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        self.set_torch_image(self.resized_input(image), image.shape[:2])

    def resized_input(self, image: np.ndarray) -> torch.Tensor:
        """The (1, 3, h, w) uint8 input `SamPredictor.set_image` builds from a uint8 (H, W, 3) image with
        Pillow on the host, built on this predictor's device instead, identical to the byte
        (pillow_resize.py): no host resize and a 4x smaller copy. A shrinking height (an image over
        1,024 pixels high) goes through Pillow."""
        size = self.transform.get_preprocess_shape(*image.shape[:2], self.transform.target_length)
        if size[0] < image.shape[0]:
            resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
        else:
            resized = resize_uint8(torch.from_numpy(np.ascontiguousarray(image)).to(self.device), size, "bilinear")
        return resized.permute(2, 0, 1).contiguous()[None]

    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """`SamPredictor.set_torch_image`, the encoder's attention through SDPA (sam_encoder.py)."""
        size = self.model.image_encoder.img_size
        if transformed_image.ndim != 4 or transformed_image.shape[1] != 3 or max(transformed_image.shape[2:]) != size:
            raise ValueError(f"set_torch_image takes a (1, 3, H, W) image with long side {size}, got "
                             f"{tuple(transformed_image.shape)}")
        self.reset_image()
        self.original_size, self.input_size = original_image_size, tuple(transformed_image.shape[-2:])
        image = self.model.preprocess(transformed_image)
        with torch.autocast(image.device.type, dtype=self.encoder_dtype, enabled=self.encoder_dtype != torch.float32):
            self.features = encode_image(self.model.image_encoder, image).float()
        self.is_image_set = True

    def prompts_per_run(self, points_per_batch: int, prompts: int, image_size: tuple[int, int]) -> int:
        """Prompts the search decodes at a time: `points_per_batch` on a CPU, where the decoder is bound
        by memory traffic and a larger batch gains nothing; on CUDA as many as `SEARCH_MEMORY_SHARE` of
        the free memory holds (by `search_bytes_per_prompt`), from `points_per_batch` up to all of them.

        On a GPU a batch costs ~450 operator launches and ~15 host syncs (counted on the CPU for 64
        prompts) whatever its size, so ZONE's 1,024 prompts in batches of 64 would leave the device
        waiting on the host; the prompts are independent, so the batching changes no result.
        """
        if self.device.type != "cuda":
            return points_per_batch
        free, _ = torch.cuda.mem_get_info(self.device)
        channels = self.model.prompt_encoder.embed_dim
        fitting = int(free * SEARCH_MEMORY_SHARE) // search_bytes_per_prompt(
            channels, self.model.prompt_encoder.image_embedding_size, image_size)
        return max(points_per_batch, min(prompts, fitting))

    def predict_passing(
        self, point_coords: torch.Tensor, point_labels: torch.Tensor, min_score: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One point prompt each (B, 1, 2), (B, 1) -> the multimask outputs whose predicted IoU is over
        `min_score` (all of them when it is <= 0): low-res logits (M, S/4, S/4) and predicted IoUs (M,),
        prompt by prompt, as the generator flattens and filters `predict_torch`'s outputs.

        SAM's decoder (MaskDecoder.predict_masks) copies the image embedding once per prompt and
        projects every copy in every attention layer; here the transformer is factored for prompts
        that share the image (`decode_tokens`). The predicted IoUs come from the transformer's tokens
        alone, so the output upscaling (two transposed convolutions at 4x the embedding's size) runs
        only for prompts with a mask that passes. Same modules and weights: equal to `predict_torch` up
        to float rounding (tested within 1e-5 of the outputs' magnitude).
        """
        decoder, prompt_encoder = self.model.mask_decoder, self.model.prompt_encoder
        sparse, dense = prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        # Without a mask prompt the dense embedding is one learnt vector for every prompt.
        tokens_out, image_out, scores = decode_tokens(decoder, self.features + dense[:1],
                                                      prompt_encoder.get_dense_pe(), sparse)
        passing = passing_masks(scores, min_score)
        prompts = passing.any(1)
        masks = decode_masks(decoder, tokens_out[prompts], image_out[prompts], self.features.shape[1:])
        return masks[passing[prompts]], scores[passing]


SEARCH_MEMORY_SHARE = 0.5  # of the device's free memory, for one batch of the search on CUDA


def search_bytes_per_prompt(channels: int, embedding_size: tuple[int, int], image_size: tuple[int, int]) -> int:
    """An upper estimate of what one prompt holds at the peak of a search batch (fp32): six copies of
    its image side in the factored transformer, the output upscaling's activations (three of each
    size) and its 3 masks at the image size (logits, the upscaling's intermediate, comparisons).
    For SAM at 512²: ~72 MB."""
    pixels = embedding_size[0] * embedding_size[1]
    transformer = 6 * pixels * channels
    upscaling = 3 * (4 * pixels * channels // 4) + 3 * (16 * pixels * channels // 8)
    return 4 * (transformer + upscaling) + 3 * 12 * image_size[0] * image_size[1]


def passing_masks(scores: torch.Tensor, min_score: float) -> torch.Tensor:
    """The generator's predicted-IoU filter: bool, where a score is over `min_score` (everywhere when
    `min_score` <= 0, as the generator then skips the filter)."""
    return scores > min_score if min_score > 0.0 else torch.ones_like(scores, dtype=torch.bool)


def decode_tokens(
    decoder: torch.nn.Module, image: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` up to its output upscaling, the image side shared by the prompts.

    image: (1, C, h, w), the image embedding plus the dense prompt embedding; image_pe: (1, C, h, w);
    sparse: (B, P, C) prompt embeddings. Returns the transformer's tokens (B, T, C) and image side
    (B, hw, C), and the predicted IoUs of the 3 multimask outputs (B, 3). SAM's decoder repeats
    `image` once per prompt; here it enters the factored transformer (sam_decoder.py) once.
    """
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
    tokens = torch.cat((output_tokens.expand(sparse.shape[0], -1, -1), sparse), 1)
    tokens_out, image_out = two_way_transformer(decoder.transformer, image, image_pe, tokens)
    return tokens_out, image_out, decoder.iou_prediction_head(tokens_out[:, 0])[:, 1:]


def decode_masks(
    decoder: torch.nn.Module, tokens_out: torch.Tensor, image_out: torch.Tensor, embedding_shape: torch.Size
) -> torch.Tensor:
    """The rest of `MaskDecoder.predict_masks` for the 3 multimask outputs: upscale the image side
    (B, hw, C) 4x, dot it with each output token's hypernetwork -> logits (B, 3, 4h, 4w).
    embedding_shape: (C, h, w).

    SAM's upscaling is two 2x2 transposed convolutions of stride 2 with a LayerNorm2d and GELUs between:
    each output pixel is a linear map of one input pixel's channels, and the norm and GELUs act on each
    pixel's channels alone. So the image side stays as it comes, channels last: each convolution is one
    matmul into each pixel's 2x2 block (the blocks' pixels kept in block order), the norm one
    `layer_norm` over the channels, and only the 3 masks' logits are put into rows and columns at the
    end. SAM's module stores its (B, C/4, 2h, 2w) and (B, C/8, 4h, 4w) activations channels first and
    normalises over them in six elementwise passes; the products are the same up to float rounding.
    """
    conv1, norm, gelu1, conv2, gelu2 = decoder.output_upscaling
    batch, (_, h, w) = image_out.shape[0], embedding_shape
    upscaled = gelu1(F.layer_norm(_blockwise(conv1, image_out), norm.weight.shape, norm.weight, norm.bias, norm.eps))
    upscaled = gelu2(_blockwise(conv2, upscaled))  # (B, hw * 16, C/8): pixels (y, x, dy1, dx1, dy2, dx2)
    hyper = torch.stack([mlp(tokens_out[:, 2 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps[1:])], 2)
    logits = (upscaled @ hyper).reshape(batch, h, w, 2, 2, 2, 2, hyper.shape[-1])  # (B, 3) masks last
    # row 4y + 2 dy1 + dy2, column 4x + 2 dx1 + dx2
    return logits.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(batch, hyper.shape[-1], 4 * h, 4 * w)


def _blockwise(conv: torch.nn.ConvTranspose2d, pixels: torch.Tensor) -> torch.Tensor:
    """A 2x2, stride-2 transposed convolution on pixels (B, P, C_in), channels last -> (B, 4P, C_out):
    each input pixel's 2x2 output block, in the order (pixel, dy, dx)."""
    if conv.kernel_size != (2, 2) or conv.stride != (2, 2) or conv.padding != (0, 0) or conv.groups != 1:
        raise ValueError(f"expected SAM's 2x2 stride-2 output upscaling, got {conv}")
    weight = conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.in_channels)  # (dy * dx * C_out, C_in)
    blocks = F.linear(pixels, weight, conv.bias.repeat(4))  # (B, P, dy * dx * C_out)
    return blocks.reshape(pixels.shape[0], 4 * pixels.shape[1], conv.out_channels)


class TorchSamSegmenter(ListSegmenter):
    """SAM's automatic segments on a PyTorch SAM (`segment`: the generator's own list, the reference),
    and the segment ZONE keeps (`select`: `best_segment` where it applies, the list otherwise)."""

    def __init__(self, sam: torch.nn.Module, config: SamConfig, encoder_dtype: torch.dtype = torch.float32) -> None:
        self.generator = SamAutomaticMaskGenerator(sam, **dataclasses.asdict(config))
        self.generator.predictor = TorchSamPredictor(sam, encoder_dtype)

    def with_config(self, config: SamConfig) -> TorchSamSegmenter:
        """This segmenter's networks (its predictor: SAM, or ONNX Runtime's sessions) under `config`'s generator
        settings, for a config that differs in thresholds and grids only (the same `points_per_batch`, which
        TensorRT's profiles are built for): a new config made new sessions, each a copy of SAM's image encoder."""
        twin = copy.copy(self)
        twin.generator = SamAutomaticMaskGenerator(self.generator.predictor.model, **dataclasses.asdict(config))
        twin.generator.predictor = self.generator.predictor
        return twin

    def segment(self, image: np.ndarray) -> list[np.ndarray]:
        """uint8 RGB (H, W, 3) -> list of bool (H, W) segment masks, in the generator's order."""
        image = check_segment_inputs(image)
        with torch.inference_mode():
            records = self.generator.generate(image)
        return [np.asarray(record["segmentation"], dtype=bool) for record in records]

    def select(self, image: np.ndarray, mask_b: np.ndarray, *, progress: bool = False) -> Selection:
        """The segment with the largest IoU with M_b (bool (H, W)), as `choose_segment` finds it."""
        if not searchable(self.generator):
            return super().select(image, mask_b)
        image = check_segment_inputs(image, mask_b)
        with torch.inference_mode():
            return best_segment(self.generator, image, np.asarray(mask_b, dtype=bool), progress=progress)


def searchable(generator: SamAutomaticMaskGenerator) -> bool:
    """Whether `best_segment` reproduces this generator: one crop, no small-region post-processing."""
    return generator.crop_n_layers == 0 and generator.min_mask_region_area == 0


def best_segment(
    generator: SamAutomaticMaskGenerator, image: np.ndarray, mask_b: np.ndarray, *, progress: bool = False
) -> Selection:
    """`choose_segment(mask_b, masks of generator.generate(image))`, computed on the generator's device.

    image: uint8 RGB (H, W, 3); mask_b: bool (H, W). The generator's predictor must offer
    `predict_passing` and `prompts_per_run` (TorchSamPredictor, OnnxSamPredictor); `searchable(generator)`
    must hold.
    `progress`: "SAM image encoder: running" until the encoder is done (a minute or more on a CPU), then a bar
    over the prompt batches.
    """
    predictor = generator.predictor
    size = image.shape[:2]
    points = generator.point_grids[0] * np.array(size)[None, ::-1]  # (x, y) in pixels, as the generator
    per_run = predictor.prompts_per_run(generator.points_per_batch, len(points), size)
    # The encoder is one call with nothing to count: a "0/64 prompts" shown through it read as a stall.
    with progress_bar(desc="SAM image encoder", bar_format="{desc}: running", unit="prompt",
                      disable=not progress) as bar:
        predictor.set_image(image)
        bar.bar_format = None  # then the prompts, counted from here (the rate without the encoder's time)
        bar.set_description("segmenting", refresh=False)
        bar.reset(total=len(points))
        try:
            return _search(generator, points, size, mask_b, per_run, bar)
        finally:
            predictor.reset_image()


def _search(
    generator: SamAutomaticMaskGenerator, points: np.ndarray, size: tuple[int, int], mask_b: np.ndarray,
    per_run: int, bar: tqdm,
) -> Selection:
    """`best_segment` once the image is set: the prompts `per_run` at a time, NMS, the choice."""
    predictor = generator.predictor
    target = torch.from_numpy(np.ascontiguousarray(mask_b)).to(predictor.device)
    scored, start = [], 0
    while start < len(points):
        batch = points[start:start + per_run]
        try:
            scored.append(_score_batch(generator, batch, size, target))
        except torch.OutOfMemoryError:  # the free-memory estimate was wrong: smaller runs, down to SAM's
            if per_run <= generator.points_per_batch:
                raise
            per_run = max(per_run // 2, generator.points_per_batch)
            continue
        start += len(batch)
        bar.update(len(batch))
    candidates = {key: torch.cat([batch[key] for batch in scored]) for key in scored[0]}
    if not len(candidates["scores"]):
        return Selection(None, 0.0, 0)
    kept = batched_nms(candidates["boxes"].float(), candidates["scores"],
                       # one category, on the boxes' device as the generator makes it (torchvision's
                       # per-category path indexes the ids with device indices above ~25k boxes)
                       torch.zeros_like(candidates["scores"]),
                       iou_threshold=generator.box_nms_thresh)
    intersection, area = candidates["intersection"][kept].double(), candidates["area"][kept].double()
    union = area + float(count_true(target[None])) - intersection  # |A or M_b|, from the same integer counts
    ious = torch.where(union > 0, intersection / union.clamp(min=1), 0.0)
    best_iou = float(ious.max())
    if best_iou <= 0.0:
        return Selection(None, 0.0, len(kept))
    best = int(torch.nonzero(ious == best_iou)[0, 0])  # the first of equals, in the generator's order
    chosen = _upscale(predictor, candidates["low_res"][kept[best]][None])[0] > predictor.model.mask_threshold
    return Selection(chosen.cpu().numpy(), best_iou, len(kept))


def _score_batch(
    generator: SamAutomaticMaskGenerator, points: np.ndarray, size: tuple[int, int], target: torch.Tensor
) -> dict[str, torch.Tensor]:
    """`SamAutomaticMaskGenerator._process_batch` for one crop, keeping what the search needs.

    Returns, for each mask that passes both filters: its low-res logits, predicted IoU (the NMS
    score), box, and pixel counts of itself and of its intersection with `target`.
    """
    predictor, threshold = generator.predictor, generator.predictor.model.mask_threshold
    coords = torch.as_tensor(predictor.transform.apply_coords(points, size), device=predictor.device)
    labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
    low_res, scores = predictor.predict_passing(coords[:, None, :], labels[:, None], generator.pred_iou_thresh)
    logits = _upscale(predictor, low_res)
    if generator.stability_score_thresh > 0.0:
        keep = stability_score(logits, threshold, generator.stability_score_offset) >= \
            generator.stability_score_thresh
        low_res, scores, logits = low_res[keep], scores[keep], logits[keep]
    masks = logits > threshold
    # The generator's next filter drops boxes near a crop edge that is not an image edge: with one
    # crop, the whole image, it drops nothing.
    return {"low_res": low_res, "scores": scores, "boxes": mask_boxes(masks),
            "area": count_true(masks), "intersection": count_true(masks, within=target)}


# Counting set pixels 8 at a time: each int64 word of a bool mask holds 8 pixels, one byte (0 or 1)
# each. Summing up to 127 words adds each byte lane on its own (a lane reaches at most 127: no carry
# into the next lane, no signed overflow), then the lanes are unpacked and added. torch reduces bool
# tensors a byte at a time, about 15x slower on a CPU; the counts are the same integers.
WORDS_PER_SUM = 127
BYTE_SHIFTS = torch.arange(0, 64, 8)


def count_true(masks: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
    """Set pixels of each bool mask (M, H, W) -> int64 (M,); of `masks & within` when a bool (H, W)
    `within` is given (each mask's intersection with it). Exact."""
    words = _words(masks)  # (M, n)
    if within is not None:
        words = words & _words(within[None])
    chunks = words.shape[1] // WORDS_PER_SUM
    lanes = torch.cat([words[:, :chunks * WORDS_PER_SUM].unflatten(1, (chunks, WORDS_PER_SUM)).sum(-1),
                       words[:, chunks * WORDS_PER_SUM:].sum(-1, keepdim=True)], 1)  # (M, chunks + 1): lanes <= 127
    return ((lanes[..., None] >> BYTE_SHIFTS.to(lanes.device)) & 0xFF).sum((1, 2))


def _words(masks: torch.Tensor) -> torch.Tensor:
    """bool (M, H, W) -> int64 (M, ceil(HW / 8)): the masks' bytes, zero-padded to whole words."""
    flat = masks.flatten(1).view(torch.uint8)
    if flat.shape[1] % 8 or not flat.is_contiguous() or flat.storage_offset() % 8:  # words need whole, aligned rows
        whole = flat.new_zeros(len(flat), -(-flat.shape[1] // 8) * 8)
        whole[:, :flat.shape[1]] = flat
        flat = whole
    return flat.view(torch.int64)


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """segment-anything's `calculate_stability_score` for logits (M, H, W): the same integer counts
    (counted with `count_true`), the same float32 quotient."""
    inner, outer = count_true(logits > mask_threshold + offset), count_true(logits > mask_threshold - offset)
    return inner.int() / outer.int()


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """segment-anything's `batched_mask_to_box` for bool masks (M, H, W): XYXY int64 (M, 4) around
    each mask, [0, 0, 0, 0] for an empty one. Its row and column maxima over bool tensors are
    computed here over their uint8 view (vectorised; a bool max runs a byte at a time)."""
    as_bytes = masks.view(torch.uint8)
    rows, cols = as_bytes.amax(2), as_bytes.amax(1)  # uint8 (M, H), (M, W): 1 where any pixel is set
    top, bottom = _first_and_last(rows)
    left, right = _first_and_last(cols)
    boxes = torch.stack([left, top, right, bottom], -1)
    return boxes * rows.amax(1, keepdim=True)


def _first_and_last(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 0/1 (M, N) -> int64 (M,) indices of the first and the last 1 of each row (0 where none)."""
    first = present.argmax(1)
    last = present.shape[1] - 1 - present.flip(1).argmax(1)
    return first, last


def _upscale(predictor: SamPredictor, low_res: torch.Tensor) -> torch.Tensor:
    """Low-res logits (M, S/4, S/4) -> logits at the image size (M, H, W), as `Sam.postprocess_masks`
    upscales them, without its (M, S, S) intermediate (805 MB for 192 masks at S = 1024).

    postprocess_masks resizes bilinearly to the encoder's S x S, crops the padding and resizes to the
    image size: along each axis a linear map of the low-res logits, the same for every row or column.
    `_resize_map` composes the two steps into one matrix per axis, so the whole is two products.
    Equal up to float rounding (~2e-7 of the logits' magnitude; tested against postprocess_masks).
    """
    axes = zip(low_res.shape[-2:], predictor.input_size, predictor.original_size, strict=True)
    rows, columns = (_resize_map(low, predictor.model.image_encoder.img_size, kept, size, low_res.device)
                     for low, kept, size in axes)
    return rows @ (low_res @ columns.T)


@functools.lru_cache(maxsize=16)
def _resize_map(low: int, padded: int, kept: int, size: int, device: torch.device) -> torch.Tensor:
    """float32 (size, low): bilinear resize low -> padded, its first `kept` entries, resized to `size`.

    Each step's weights are F.interpolate's own: an identity resized in float32, as the logits are
    (its source positions are computed in the input's precision); composed in float64.
    """
    composed = _linear_resize(kept, size) @ _linear_resize(low, padded)[:kept]
    return composed.to(device, torch.float32)


def _linear_resize(length: int, size: int) -> torch.Tensor:
    """float64 (size, length): the weights of F.interpolate's 1-D linear resize (align_corners=False) of
    float32 data, the per-axis weights of its bilinear mode."""
    identity = torch.eye(length)[None]  # (1, length, length): the basis vectors as channels
    return F.interpolate(identity, size=size, mode="linear", align_corners=False)[0].T.double()
