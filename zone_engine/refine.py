"""Mask refinement (ZONE.md section 4): SAM's segments -> fine mask M_f and its dilation D.

The segmentation backend sits behind the narrow `Segmenter` protocol (image and M_b in, the segment
that best overlaps M_b out), so the PyTorch SAM (sam_torch.py) and an exported one (sam_onnx.py) are
interchangeable; the mask math is plain numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .config import EditConfig
from .masks import dilate, iou, remove_small_regions


@dataclass(frozen=True)
class Selection:
    """What refinement needs from a segmentation: the segment chosen for M_b, and how it was chosen."""

    segment: np.ndarray | None  # bool (H, W): the segment with the largest IoU with M_b; None if none overlaps
    iou: float  # that IoU; 0.0 when segment is None
    segment_count: int  # segments the segmenter found


class Segmenter(Protocol):
    """Automatic segmentation backend: the segment that best overlaps M_b."""

    def select(self, image: np.ndarray, mask_b: np.ndarray, *, progress: bool = False) -> Selection:
        """uint8 RGB (H, W, 3) and bool (H, W) M_b -> the segment with the largest IoU with M_b;
        `progress`: show a progress bar where the work is long."""
        ...


class ListSegmenter:
    """A segmenter that lists every segment (`segment`); `select` chooses among them."""

    def segment(self, image: np.ndarray) -> list[np.ndarray]:
        """uint8 RGB (H, W, 3) -> list of bool (H, W) segment masks."""
        raise NotImplementedError

    def select(self, image: np.ndarray, mask_b: np.ndarray, *, progress: bool = False) -> Selection:
        """`choose_segment` among all of `segment(image)`'s segments (one call: no progress bar)."""
        check_segment_inputs(image, mask_b)
        return choose_segment(mask_b, self.segment(image))


def check_segment_inputs(image: np.ndarray, mask_b: np.ndarray | None = None) -> np.ndarray:
    """The image as a uint8 RGB array, after checking it (and M_b's shape, when given)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"SAM expects a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    if mask_b is not None and np.shape(mask_b) != image.shape[:2]:
        raise ValueError(f"M_b has shape {np.shape(mask_b)}, the image to segment {image.shape[:2]}")
    return image


@dataclass(frozen=True)
class Refinement:
    """Result of refining M_b."""

    mask_f: np.ndarray  # bool (H, W): the best-overlapping segment, small components dropped
    dilated: np.ndarray  # bool (H, W): D, M_f dilated
    iou: float  # IoU of the chosen segment with M_b; 0.0 on fallback
    used_fallback: bool  # no segment overlapped M_b, so M_b itself became M_f
    segment_count: int


def best_segment_index(mask_b: np.ndarray, segments: Sequence[np.ndarray]) -> tuple[int | None, float]:
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


def choose_segment(mask_b: np.ndarray, segments: Sequence[np.ndarray]) -> Selection:
    """The segment with the largest IoU with M_b (bool (H, W)) among `segments` (bool (H, W) each)."""
    index, best_iou = best_segment_index(mask_b, segments)
    chosen = None if index is None else np.asarray(segments[index], dtype=bool)
    return Selection(chosen, best_iou, len(segments))


def refine_mask(
    mask_b: np.ndarray,
    selection: Selection,
    *,
    min_area: int = 64,
    dilate_kernel: int = 3,
    dilate_iterations: int = 4,
) -> Refinement:
    """M_b and the segment chosen for it -> M_f (that segment, components < min_area dropped) and D.

    mask_b: bool (H, W); selection: `choose_segment`'s or a segmenter's `select`'s.
    """
    mask_b = np.asarray(mask_b, dtype=bool)
    if mask_b.ndim != 2:
        raise ValueError(f"M_b must be a mask of shape (H, W), got shape {mask_b.shape}")
    if selection.segment is not None and selection.segment.shape != mask_b.shape:
        raise ValueError(f"the chosen segment has shape {selection.segment.shape}, M_b has shape {mask_b.shape}")
    # The reference crashed when no segment overlapped M_b; M_b is the best mask there is then.
    chosen = mask_b if selection.segment is None else selection.segment
    mask_f = remove_small_regions(chosen, min_area)
    return Refinement(
        mask_f=mask_f,
        dilated=dilate(mask_f, dilate_kernel, dilate_iterations),
        iou=selection.iou,
        used_fallback=selection.segment is None,
        segment_count=selection.segment_count,
    )


def refine_with_sam(
    segmenter: Segmenter, image: np.ndarray, mask_b: np.ndarray, config: EditConfig, *, progress: bool = False
) -> Refinement:
    """Segment `image` (uint8 RGB (H, W, 3): I_sty, or I_G for REMOVE) and refine M_b (bool (H, W))."""
    return refine_mask(
        mask_b,
        segmenter.select(image, mask_b, progress=progress),
        min_area=config.min_region_area,
        dilate_kernel=config.dilate_kernel,
        dilate_iterations=config.dilate_iterations,
    )
