"""pillow_resize: Pillow's 8-bit resize as tensor arithmetic must equal Pillow's own to the byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_refine import tiny_random_sam

from zone_engine.image_io import to_input_size, working_geometry
from zone_engine.pillow_resize import pillow_coefficients, resize_uint8, to_input_size_on
from zone_engine.sam_torch import TorchSamPredictor

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# (in height, in width) -> (out height, out width): SAM's 512² -> 1024², non-square, one axis kept,
# the width shrinking while the height grows, extreme enlargements, a single pixel.
SHAPES = [((512, 512), (1024, 1024)), ((37, 91), (416, 1024)), ((500, 333), (1024, 682)),
          ((64, 48), (64, 97)), ((30, 200), (61, 70)), ((1, 5), (205, 1024)), ((1, 1), (3, 2))]


def pillow(image: np.ndarray, size: tuple[int, int], filter: str) -> np.ndarray:
    channels = image.shape[2]
    if channels == 1:
        return np.array(Image.fromarray(image[:, :, 0]).resize(size[::-1], FILTERS[filter]))[:, :, None]
    return np.array(Image.fromarray(image).resize(size[::-1], FILTERS[filter]))


@pytest.mark.parametrize("filter", list(FILTERS))
@pytest.mark.parametrize("source,size", SHAPES)
def test_resize_equals_pillow_to_the_byte(source, size, filter):
    rng = np.random.default_rng(sum(source) + sum(size))
    for channels in (3, 1):  # Pillow's L and RGB modes (RGBA it premultiplies by alpha first)
        image = rng.integers(0, 256, (*source, channels), dtype=np.uint8)
        if channels == 3:  # extremes, where clipping and the negative lobes of bicubic act
            image[:, ::2] = 255 * (rng.random((source[0], (source[1] + 1) // 2, 3)) > 0.5)
        expected = pillow(image, size, filter)
        got = resize_uint8(torch.from_numpy(image), size, filter).numpy()
        assert got.dtype == np.uint8 and np.array_equal(got, expected), (source, size, filter, channels)


def test_an_unchanged_size_is_the_identity_table():
    starts, weights = pillow_coefficients(7, 7, "bilinear")
    assert np.array_equal(starts, np.arange(7)) and np.array_equal(weights, np.full((7, 1), 1 << 22))
    image = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    assert torch.equal(resize_uint8(image, (5, 7)), image)


def test_resize_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="uint8"):
        resize_uint8(torch.zeros(4, 4, 3), (8, 8))
    with pytest.raises(ValueError, match="uint8"):
        resize_uint8(torch.zeros(4, 4, dtype=torch.uint8), (8, 8))
    with pytest.raises(ValueError, match="only enlarging the height"):
        resize_uint8(torch.zeros(8, 4, 3, dtype=torch.uint8), (4, 8))
    with pytest.raises(ValueError, match="at least 1x1, got 8x0"):  # not a ZeroDivisionError from the weights
        resize_uint8(torch.zeros(4, 4, 3, dtype=torch.uint8), (8, 0))


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pipeline enlarges on the device on CUDA: needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("input_size", [(120, 160), (97, 61), (64, 64), (513, 200)])
def test_an_edits_image_enlarged_on_the_device_is_pillows(input_size, device):
    """A photo's styled image and heatmap, back to its size on the device: the host's bytes (a 12 MP photo's
    too, checked once on the CPU: 1.3 s there against Pillow's 0.35 s, so the host keeps Pillow)."""
    geometry = working_geometry(*input_size, max_side=64)
    image = np.random.default_rng(sum(input_size)).integers(0, 256, (*geometry.padded_size, 3), dtype=np.uint8)
    got = to_input_size_on(torch.device(device), image, geometry)
    assert got.shape == (*input_size, 3) and np.array_equal(got, to_input_size(image, geometry, is_mask=False))


def sams_own_input(predictor: TorchSamPredictor, image: np.ndarray) -> torch.Tensor:
    """The tensor segment-anything's `SamPredictor.set_image` builds: Pillow on the host."""
    resized = torch.as_tensor(predictor.transform.apply_image(image), device=predictor.device)
    return resized.permute(2, 0, 1).contiguous()[None]


@pytest.mark.parametrize("size", [(40, 56), (23, 17), (64, 64), (80, 112)])  # tiny SAM: long side 64
def test_sams_input_built_by_the_predictor_is_segment_anythings(size, monkeypatch):
    """Enlarging: resized by pillow_resize (Pillow's host resize is not called); the last shrinks
    its height, which goes through Pillow."""
    predictor = TorchSamPredictor(tiny_random_sam())
    image = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = sams_own_input(predictor, image)
    if max(size) <= predictor.transform.target_length:
        monkeypatch.setattr(predictor.transform, "apply_image", lambda *_: pytest.fail("resized on the host"))
    assert torch.equal(predictor.resized_input(image), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-side resize is used on CUDA: needs CUDA")
def test_sams_input_on_cuda_is_segment_anythings_and_set_image_uses_it(monkeypatch):
    predictor = TorchSamPredictor(tiny_random_sam().to("cuda"))
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    expected = sams_own_input(predictor, image)
    assert torch.equal(predictor.resized_input(image), expected)
    seen = []
    monkeypatch.setattr(predictor.transform, "apply_image", lambda *_: seen.append("host resize"))
    predictor.set_image(image)
    assert seen == [] and predictor.is_image_set and predictor.input_size == tuple(expected.shape[-2:])
