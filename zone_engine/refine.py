"""Mask refinement (ZONE.md section 4): SAM's segments -> fine mask M_f and its dilation D.

The segmentation backend sits behind the narrow `Segmenter` protocol (image in, bool masks out), so
the PyTorch SAM here and an exported one are interchangeable; the mask math is plain numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .config import EditConfig, SamConfig
from .masks import dilate, iou, remove_small_regions


class Segmenter(Protocol):
    """Automatic segmentation backend."""

    def segment(self, image: np.ndarray) -> list[np.ndarray]:
        """uint8 RGB (H, W, 3) -> list of bool (H, W) segment masks."""
        ...


class TorchSamSegmenter:
    """segment-anything's `SamAutomaticMaskGenerator` on a PyTorch SAM model.

    `encoder_dtype` fp16/bf16 runs SAM's image encoder (nearly all of its FLOPs: one ViT pass over a
    1024² input) under autocast; the embedding comes back as fp32, so prompt decoding, the predicted
    IoU and stability scores and every threshold stay in fp32 as segment-anything computes them.
    """

    def __init__(self, sam: torch.nn.Module, config: SamConfig, encoder_dtype: torch.dtype = torch.float32) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        self.generator = SamAutomaticMaskGenerator(sam, **dataclasses.asdict(config))
        if encoder_dtype != torch.float32:
            self.generator.predictor = autocast_encoder_predictor(sam, encoder_dtype)

    def segment(self, image: np.ndarray) -> list[np.ndarray]:
        """uint8 RGB (H, W, 3) -> list of bool (H, W) segment masks, in the generator's order."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"SAM expects a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
        with torch.inference_mode():
            records = self.generator.generate(image)
        return [np.asarray(record["segmentation"], dtype=bool) for record in records]


def autocast_encoder_predictor(sam: torch.nn.Module, dtype: torch.dtype):
    """A `SamPredictor` whose image encoder runs under autocast in `dtype`, its embedding cast to fp32."""
    from segment_anything import SamPredictor

    class AutocastEncoderPredictor(SamPredictor):
        def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
            with torch.autocast(transformed_image.device.type, dtype=dtype):
                super().set_torch_image(transformed_image, original_image_size)
            self.features = self.features.float()

    return AutocastEncoderPredictor(sam)


@dataclass(frozen=True)
class Refinement:
    """Result of refining M_b."""

    mask_f: np.ndarray  # bool (H, W): the best-overlapping segment, small components dropped
    dilated: np.ndarray  # bool (H, W): D, M_f dilated
    iou: float  # IoU of the chosen segment with M_b; 0.0 on fallback
    used_fallback: bool  # no segment overlapped M_b, so M_b itself became M_f
    segment_count: int


def select_best_segment(mask_b: np.ndarray, segments: Sequence[np.ndarray]) -> tuple[int | None, float]:
    """Index of the segment with the largest IoU with M_b (the first on ties) and that IoU.

    mask_b: bool (H, W); segments: bool (H, W) each. (None, 0.0) when no segment overlaps M_b.
    """
    mask_b = np.asarray(mask_b, dtype=bool)
    best_index, best_iou = None, 0.0
    for index, segment in enumerate(segments):
        segment = np.asarray(segment, dtype=bool)
        if segment.shape != mask_b.shape:
            raise ValueError(f"segment {index} has shape {segment.shape}, M_b has shape {mask_b.shape}")
        overlap = iou(mask_b, segment)
        if overlap > best_iou:  # strict, as the reference: the first of equal segments wins
            best_index, best_iou = index, overlap
    return best_index, best_iou


def refine_mask(
    mask_b: np.ndarray,
    segments: Sequence[np.ndarray],
    *,
    min_area: int = 64,
    dilate_kernel: int = 3,
    dilate_iterations: int = 4,
) -> Refinement:
    """M_b and SAM's segments -> M_f (best segment, components < min_area dropped) and D.

    mask_b: bool (H, W); segments: bool (H, W) each.
    """
    mask_b = np.asarray(mask_b, dtype=bool)
    if mask_b.ndim != 2:
        raise ValueError(f"M_b must be a mask of shape (H, W), got shape {mask_b.shape}")
    index, best_iou = select_best_segment(mask_b, segments)
    # The reference crashed when no segment overlapped M_b; M_b is the best mask there is then.
    chosen = mask_b if index is None else np.asarray(segments[index], dtype=bool)
    mask_f = remove_small_regions(chosen, min_area)
    return Refinement(
        mask_f=mask_f,
        dilated=dilate(mask_f, dilate_kernel, dilate_iterations),
        iou=best_iou,
        used_fallback=index is None,
        segment_count=len(segments),
    )


def refine_with_sam(
    segmenter: Segmenter, image: np.ndarray, mask_b: np.ndarray, config: EditConfig
) -> Refinement:
    """Segment `image` (uint8 RGB (H, W, 3): I_sty, or I_G for REMOVE) and refine M_b (bool (H, W))."""
    segments = segmenter.segment(image)
    return refine_mask(
        mask_b,
        segments,
        min_area=config.min_region_area,
        dilate_kernel=config.dilate_kernel,
        dilate_iterations=config.dilate_iterations,
    )
