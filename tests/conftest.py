"""Shared fixtures: tiny random models built in code, offline, once per session."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny_pipe():
    from zone_engine import ZonePipeline

    return ZonePipeline.tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_pipe):
    return tiny_pipe.models


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (uint8): random low-resolution colours upsampled."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
