"""The `torch` refinement backend: SAM's automatic masks, and the search for the one segment ZONE keeps.

ZONE asks segment-anything's `SamAutomaticMaskGenerator` for every segment of an image, then keeps
the one with the largest IoU with M_b (ZONE.md section 4). The generator answers a wider question
than that: it upscales the logits of all 3 masks of every point prompt to the image size before the
predicted-IoU filter drops most of them, run-length encodes each kept mask on the host, and the
caller decodes them all again to measure overlaps. `best_segment` asks the narrow question with the
generator's own settings, steps and functions, on the generator's device:

- the decoder runs its two-way transformer factored for prompts sharing one image (sam_decoder.py:
  no per-prompt projection of the image side is stored), and skips its output upscaling for prompts
  whose 3 masks all fail the predicted-IoU filter (`TorchSamPredictor.predict_passing`);
- only masks that pass that filter are upscaled to the image size (upscaling is per mask, so a
  mask's pixels do not depend on which others are upscaled with it);
- each kept mask's intersection and union with M_b are counted where the mask is, and only its
  low-resolution logits are kept (256², whatever the image size);
- box NMS runs on the same boxes and scores, in the same order, as the generator's;
- the chosen segment alone is upscaled again and copied to the host.

It returns the segment, IoU and segment count that `choose_segment(mask_b, generator's masks)` does,
up to the decoder's float rounding (~3e-7 of its outputs: a mask at a threshold within that could
flip; tested mask for mask on random SAMs, where none does), for the settings it supports: one crop
(`crop_n_layers=0`) and no small-region post-processing (`min_mask_region_area=0`), segment-anything's
defaults and ZONE's. Other settings go through the generator itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils.amg import batch_iterator, batched_mask_to_box, calculate_stability_score
from torchvision.ops.boxes import batched_nms
from tqdm.auto import tqdm

from .config import SamConfig
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
    (B, hw, C) to (B, C', 4h, 4w), dot it with each output token's hypernetwork -> logits (B, 3, 4h, 4w).
    embedding_shape: (C, h, w)."""
    upscaled = decoder.output_upscaling(image_out.transpose(1, 2).reshape(-1, *embedding_shape))
    hyper = torch.stack([mlp(tokens_out[:, 2 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps[1:])], 1)
    return (hyper @ upscaled.flatten(2)).unflatten(2, upscaled.shape[2:])


class TorchSamSegmenter(ListSegmenter):
    """SAM's automatic segments on a PyTorch SAM (`segment`: the generator's own list, the reference),
    and the segment ZONE keeps (`select`: `best_segment` where it applies, the list otherwise)."""

    def __init__(self, sam: torch.nn.Module, config: SamConfig, encoder_dtype: torch.dtype = torch.float32) -> None:
        self.generator = SamAutomaticMaskGenerator(sam, **dataclasses.asdict(config))
        self.generator.predictor = TorchSamPredictor(sam, encoder_dtype)

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
    `predict_passing` (TorchSamPredictor, OnnxSamPredictor); `searchable(generator)` must hold.
    `progress`: a bar over the image encoder and the prompt batches (a minute or more on a CPU).
    """
    predictor = generator.predictor
    size = image.shape[:2]
    points = generator.point_grids[0] * np.array(size)[None, ::-1]  # (x, y) in pixels, as the generator
    batches = -(-len(points) // generator.points_per_batch)
    with tqdm(total=1 + batches, desc="segmenting", unit="pass", disable=not progress) as bar:
        predictor.set_image(image)
        bar.update()
        try:
            return _search(generator, points, size, mask_b, bar)
        finally:
            predictor.reset_image()


def _search(
    generator: SamAutomaticMaskGenerator, points: np.ndarray, size: tuple[int, int], mask_b: np.ndarray, bar: tqdm
) -> Selection:
    """`best_segment` once the image is set: the prompt batches, NMS, the choice."""
    predictor = generator.predictor
    target = torch.from_numpy(np.ascontiguousarray(mask_b)).to(predictor.device)
    scored = []
    for (batch,) in batch_iterator(generator.points_per_batch, points):
        scored.append(_score_batch(generator, batch, size, target))
        bar.update()
    candidates = {key: torch.cat([batch[key] for batch in scored]) for key in scored[0]}
    if not len(candidates["scores"]):
        return Selection(None, 0.0, 0)
    kept = batched_nms(candidates["boxes"].float(), candidates["scores"],
                       torch.zeros(len(candidates["boxes"])),  # one category, as the generator passes it
                       iou_threshold=generator.box_nms_thresh)
    intersection, union = candidates["intersection"][kept].double(), candidates["union"][kept].double()
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
    score), box, and pixel counts of its intersection and union with `target`.
    """
    predictor, threshold = generator.predictor, generator.predictor.model.mask_threshold
    coords = torch.as_tensor(predictor.transform.apply_coords(points, size), device=predictor.device)
    labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
    low_res, scores = predictor.predict_passing(coords[:, None, :], labels[:, None], generator.pred_iou_thresh)
    logits = _upscale(predictor, low_res)
    if generator.stability_score_thresh > 0.0:
        keep = calculate_stability_score(logits, threshold, generator.stability_score_offset) >= \
            generator.stability_score_thresh
        low_res, scores, logits = low_res[keep], scores[keep], logits[keep]
    masks = logits > threshold
    # The generator's next filter drops boxes near a crop edge that is not an image edge: with one
    # crop, the whole image, it drops nothing.
    return {"low_res": low_res, "scores": scores, "boxes": batched_mask_to_box(masks),
            "intersection": (masks & target).flatten(1).sum(1), "union": (masks | target).flatten(1).sum(1)}


def _upscale(predictor: SamPredictor, low_res: torch.Tensor) -> torch.Tensor:
    """Low-res logits (M, S/4, S/4) -> logits at the image size (M, H, W), as predict_torch upscales them."""
    if not len(low_res):  # interpolate refuses empty batches
        return low_res.new_empty(0, *predictor.original_size)
    return predictor.model.postprocess_masks(low_res[None], predictor.input_size, predictor.original_size)[0]
