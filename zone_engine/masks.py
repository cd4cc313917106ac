"""Pure mask helpers shared by localization, refinement and blending.

Masks are boolean numpy arrays of shape (H, W).
"""

from __future__ import annotations

import cv2
import numpy as np


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 4-connected components with fewer than `min_area` pixels.

    The reference zeroes a small component's whole bounding box and measures label x area (a
    defect, ZONE.md); this drops exactly the small component's own pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    if min_area <= 0 or not mask.any():
        return mask.copy()
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # background label
    return keep[labels]


def dilate(mask: np.ndarray, kernel: int, iterations: int) -> np.ndarray:
    """Binary dilation with a kernel x kernel rectangle, as cv2.dilate does in the reference."""
    element = cv2.getStructuringElement(cv2.MORPH_RECT, (kernel, kernel))
    return cv2.dilate(np.asarray(mask, dtype=np.uint8), element, iterations=iterations).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0

