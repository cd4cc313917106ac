"""ZONE.md section 5: the FFT edit region and the composites, against independent numpy versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from zone_engine.blend import (
    composite,
    energy_levels,
    fft_edit_region,
    frequency_disc,
    low_pass_energy,
    low_pass_energy_torch,
    luma,
    luma_torch,
    seam,
)

SIZES = [(64, 96), (80, 48), (64, 64)]  # (H, W), non-square both ways

# Where fft_edit_region computes its FFTs: numpy (None, the reference) or torch on a device.
FFT_DEVICES = [
    None,
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="torch's CUDA FFT: needs CUDA")]),
]


@pytest.fixture(params=FFT_DEVICES, ids=["numpy", "torch-cpu", "torch-cuda"])
def fft_device(request):
    return request.param


# ---------------------------------------------------------------------------------------------------
# Independent reference implementations
# ---------------------------------------------------------------------------------------------------


def reference_luma(image: np.ndarray) -> np.ndarray:
    """BT.601 luma rounded to uint8 the way OpenCV's 8-bit RGB->gray rounds: 15-bit fixed point."""
    red, green, blue = (image[..., c].astype(np.int64) for c in range(3))
    return ((red * 9798 + green * 19235 + blue * 3735 + 2**14) >> 15).astype(np.uint8)


def brute_force_disc(rows: int, cols: int, radius: int, centre: tuple[int, int]) -> np.ndarray:
    """Pixels whose distance to centre = (row, col) is at most radius, one by one."""
    disc = np.zeros((rows, cols), dtype=bool)
    for row in range(rows):
        for col in range(cols):
            disc[row, col] = (row - centre[0]) ** 2 + (col - centre[1]) ** 2 <= radius**2
    return disc


def _window_op(mask: np.ndarray, kernel: int, pad_value: bool, reduce) -> np.ndarray:
    half = kernel // 2
    padded = np.pad(mask, half, constant_values=pad_value)
    return reduce(sliding_window_view(padded, (kernel, kernel)), axis=(-2, -1))


def close_square(mask: np.ndarray, kernel: int) -> np.ndarray:
    """Binary closing with a kernel x kernel square; outside the image never dilates nor erodes."""
    dilated = _window_op(mask, kernel, False, np.any)
    return _window_op(dilated, kernel, True, np.all)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background pixels not 4-connected to the image border become foreground (flood fill)."""
    rows, cols = mask.shape
    outside = np.zeros_like(mask)
    stack = [(r, c) for r in range(rows) for c in (0, cols - 1)]
    stack += [(r, c) for r in (0, rows - 1) for c in range(cols)]
    while stack:
        r, c = stack.pop()
        if 0 <= r < rows and 0 <= c < cols and not mask[r, c] and not outside[r, c]:
            outside[r, c] = True
            stack.extend(((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)))
    return ~outside


def reference_energy(styled, original, dilated, radius, centre=None) -> np.ndarray:
    """E = |ifft(disc * (fft(S) - fft(G)))| as float64, the disc at `centre` (row, col)."""
    rows, cols = dilated.shape
    centre = (rows // 2, cols // 2) if centre is None else centre
    s = reference_luma(styled * dilated[..., None])
    g = reference_luma(original * dilated[..., None])
    spectrum = np.fft.fftshift(np.fft.fft2(s)) - np.fft.fftshift(np.fft.fft2(g))
    spectrum = spectrum * brute_force_disc(rows, cols, radius, centre)
    return np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum)))


def reference_region(styled, original, dilated, radius=200, threshold=30, close_kernel=21, *, wrap=False,
                     centre=None) -> np.ndarray:
    """R the intended way; wrap=True / centre=(cols//2, rows//2) reproduce the reference's defects."""
    energy = reference_energy(styled, original, dilated, radius, centre)
    energy = np.round(energy, 6)  # whole numbers to within the FFT's rounding are whole
    energy = np.floor(energy) % 256 if wrap else np.floor(np.minimum(energy, 255))
    return fill_holes(close_square(energy > threshold, close_kernel))


def reference_composite(original, styled, region, fine_mask, alpha=0.6) -> np.ndarray:
    out = np.empty_like(original)
    rows, cols = region.shape
    for r in range(rows):
        for c in range(cols):
            for ch in range(3):
                o, s = float(original[r, c, ch]), float(styled[r, c, ch])
                if region[r, c] and not fine_mask[r, c]:
                    out[r, c, ch] = int(alpha * s + (1 - alpha) * o)  # int() truncates toward zero
                elif region[r, c]:
                    out[r, c, ch] = styled[r, c, ch]
                else:
                    out[r, c, ch] = original[r, c, ch]
    return out


# ---------------------------------------------------------------------------------------------------
# Synthetic inputs
# ---------------------------------------------------------------------------------------------------


def rectangle(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def edited_pair(height: int, width: int, seed: int = 0):
    """Random original; styled differs from it only inside a central rectangle. Returns both and the box."""
    rng = np.random.default_rng(seed)
    original = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    box = rectangle(height, width, height // 4, width // 4, height // 2 + 4, width // 2 + 6)
    styled = original.copy()
    styled[box] = rng.integers(0, 256, size=(int(box.sum()), 3), dtype=np.uint8)
    return original, styled, box


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Square growth by `pixels`, written without cv2."""
    return _window_op(mask, 2 * pixels + 1, False, np.any)


# ---------------------------------------------------------------------------------------------------
# luma and the frequency disc
# ---------------------------------------------------------------------------------------------------


def test_luma_uses_rgb_weights():
    red = np.zeros((2, 3, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((2, 3, 3), np.uint8)
    blue[..., 2] = 255
    assert luma(red).dtype == np.uint8
    np.testing.assert_array_equal(luma(red), 76)  # 0.299 * 255 = 76.2
    np.testing.assert_array_equal(luma(blue), 29)  # 0.114 * 255 = 29.1


def test_luma_rounds_as_the_references_opencv_call_on_every_colour():
    """All 2**24 colours: luma (cv2), its torch twin and the fixed-point formula agree bit for bit (a
    float 0.299 R + 0.587 G + 0.114 B rounded half up differs from OpenCV on ~22,000 of them)."""
    levels = np.arange(256, dtype=np.uint8)
    colours = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(4096, 4096, 3)
    expected = reference_luma(colours)
    np.testing.assert_array_equal(luma(colours), expected)
    np.testing.assert_array_equal(luma_torch(torch.from_numpy(colours)).numpy(), expected)
    rounded = np.floor(colours.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) + 0.5)
    assert (rounded != expected).sum() > 1000  # the formula matters: the float one would not pass


@pytest.mark.parametrize("size", SIZES + [(33, 47)])
@pytest.mark.parametrize("radius", [0, 3, 10, 25, 200])
def test_frequency_disc_is_centred_at_rows_cols_half(size, radius):
    rows, cols = size
    expected = brute_force_disc(rows, cols, radius, (rows // 2, cols // 2))
    np.testing.assert_array_equal(frequency_disc(size, radius), expected)


def test_red_edit_is_found_blue_edit_is_not(fft_device):
    """Pure blue has luma 29.07 (<= 30) and pure red 76.2: with BGR weights the two would swap."""
    height, width = 64, 80
    box = rectangle(height, width, 22, 24, 42, 56)  # over 21 px from the border: closing keeps it a box
    dilated = grow(box, 4)
    original = np.zeros((height, width, 3), np.uint8)
    for channel, found in ((0, True), (2, False)):
        styled = original.copy()
        styled[box, channel] = 255
        # radius 200 keeps every frequency here
        region = fft_edit_region(styled, original, dilated, device=fft_device)
        np.testing.assert_array_equal(region, box if found else np.zeros_like(box))


# ---------------------------------------------------------------------------------------------------
# fft_edit_region
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_region_matches_independent_implementation(size, fft_device):
    original, styled, box = edited_pair(*size)
    dilated = grow(box, 4)
    region = fft_edit_region(styled, original, dilated, device=fft_device)
    assert region.dtype == bool and region.shape == size
    np.testing.assert_array_equal(region, reference_region(styled, original, dilated))
    assert region[box].mean() > 0.95  # the edit is found


def test_the_default_disc_and_closing_are_the_references_where_they_matter(fft_device):
    """At 320x320 the default disc (radius 200) drops frequencies (the images above are too small to lose any),
    and two edits 15 px apart are closed into one region by the default 21x21 kernel (not by an 11x11)."""
    rng = np.random.default_rng(7)
    original = rng.integers(0, 256, size=(320, 320, 3), dtype=np.uint8)
    left, right = rectangle(320, 320, 100, 80, 220, 140), rectangle(320, 320, 100, 155, 220, 215)  # 15 px apart
    styled = original.copy()
    for box in (left, right):
        styled[box] = rng.integers(0, 256, size=(int(box.sum()), 3), dtype=np.uint8)
    dilated = grow(left | right, 4)
    region = fft_edit_region(styled, original, dilated, device=fft_device)
    np.testing.assert_array_equal(region, reference_region(styled, original, dilated))
    assert region[130:200, 145:150].all()  # the gap between the two edits is inside R


def test_default_threshold_is_e_over_30_and_default_close_bridges_a_20_px_gap(fft_device):
    """ZONE.md step 3 on gray blocks, where the disc keeps every frequency so E = |S - G| (a gray's luma is its
    level): two blocks 31 levels up (E = 31 > 30) 20 px apart are closed into one box by the 21x21 square (a
    19x19 bridges 18 px at most); a block 30 levels up (E = 30) is not an edit."""
    height, width = 64, 136
    left, right = rectangle(height, width, 20, 16, 44, 36), rectangle(height, width, 20, 56, 44, 76)
    faint = rectangle(height, width, 20, 100, 44, 120)
    original = np.full((height, width, 3), 100, np.uint8)
    styled = original.copy()
    styled[left | right] = 131
    styled[faint] = 130
    region = fft_edit_region(styled, original, np.ones((height, width), bool), device=fft_device)
    np.testing.assert_array_equal(region, rectangle(height, width, 20, 16, 44, 76))


@pytest.mark.parametrize("size", [(64, 96), (96, 64)])
def test_low_pass_disc_is_centred_on_non_square_images(size, fft_device):
    """A small disc at the spectrum's true centre; the reference's (row, col) centre gives another R."""
    rows, cols = size
    original, styled, box = edited_pair(rows, cols, seed=3)
    dilated = grow(box, 4)
    radius = 12
    region = fft_edit_region(styled, original, dilated, radius=radius, threshold=10, close_kernel=3,
                             device=fft_device)
    expected = reference_region(styled, original, dilated, radius, threshold=10, close_kernel=3)
    swapped = reference_region(styled, original, dilated, radius, threshold=10, close_kernel=3,
                               centre=(cols // 2, rows // 2))
    assert expected.any()
    assert not np.array_equal(expected, swapped)  # the test can tell the two centres apart
    np.testing.assert_array_equal(region, expected)


def test_energy_above_255_is_clipped_not_wrapped(fft_device):
    """Bright stripes against black, low-passed to DC + fundamental, overshoot 255 (E up to ~290).

    A wrapping cast maps E in (255, 286] to 0..30 and loses those pixels; with no closing
    (close_kernel=1) the loss cuts each stripe in three, which the contour fill does not repair.
    """
    height, width, period = 48, 128, 64
    stripes = np.zeros((height, width), dtype=bool)
    stripes[:, (np.arange(width) % period) < period // 2] = True
    original = np.zeros((height, width, 3), np.uint8)
    styled = np.where(stripes[..., None], np.uint8(255), original)
    dilated = np.ones((height, width), dtype=bool)
    radius = 3  # keeps DC and the stripes' fundamental (2 cycles across), drops the 3rd harmonic

    energy = reference_energy(styled, original, dilated, radius)
    assert energy.max() > 280
    clipped = reference_region(styled, original, dilated, radius, close_kernel=1)
    wrapped = reference_region(styled, original, dilated, radius, close_kernel=1, wrap=True)
    lost = clipped & ~wrapped
    assert lost.any() and np.all(energy[lost] > 255)  # only overshooting pixels tell the two apart

    region = fft_edit_region(styled, original, dilated, radius=radius, close_kernel=1, device=fft_device)
    np.testing.assert_array_equal(region, clipped)
    assert region[lost].all()


def test_bright_block_overshoot_is_inside_region(fft_device):
    """A large white block on black: E overshoots 255 inside it, and all of it is in R."""
    height, width = 64, 64
    box = rectangle(height, width, 13, 13, 51, 51)
    original = np.zeros((height, width, 3), np.uint8)
    styled = np.where(box[..., None], np.uint8(255), original)
    dilated = grow(box, 4)
    energy = reference_energy(styled, original, dilated, 14)
    assert energy.max() > 255
    region = fft_edit_region(styled, original, dilated, radius=14, device=fft_device)
    np.testing.assert_array_equal(region, reference_region(styled, original, dilated, 14))
    assert region[energy > 255].all()


@pytest.mark.parametrize("size", SIZES)
def test_identical_images_give_empty_region_and_unchanged_output(size, fft_device):
    original, _, box = edited_pair(*size)
    region = fft_edit_region(original, original.copy(), grow(box, 4), device=fft_device)
    assert not region.any()
    out = composite(original, original.copy(), region, box)
    np.testing.assert_array_equal(out, original)


@pytest.mark.parametrize("device", [d for d in FFT_DEVICES if d is not None])
@pytest.mark.parametrize(("size", "radius"), [((64, 96), 200), ((81, 47), 9), ((33, 128), 20), ((1, 5), 1)])
def test_low_pass_energy_torch_agrees_with_numpy(device, size, radius):
    """Same float64 arithmetic, another FFT library (pocketfft/MKL/cuFFT): E within 1e-9 (its range
    is 0..~300; the libraries' rounding is ~1e-13 of it), and the levels R is cut from equal. With
    every frequency kept (radius 200 here), E = |S - G| is a whole number at every pixel: without
    energy_levels' snapping, truncation would split many of them between two levels by rounding noise."""
    rng = np.random.default_rng(sum(size) + radius)
    original = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    styled = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    dilated = rng.random(size) < 0.6
    expected = low_pass_energy(styled, original, dilated, radius)
    energy = low_pass_energy_torch(styled, original, dilated, radius, device)
    assert energy.dtype == np.float64 and energy.shape == size
    np.testing.assert_allclose(energy, expected, rtol=0, atol=1e-9)
    assert expected.max() > 30  # the test compares energies that matter to R
    np.testing.assert_array_equal(energy_levels(energy), energy_levels(expected))


def test_energy_levels_keep_whole_numbers_whole_and_clip():
    energy = np.array([[30.999999999999, 31.0000000001, 30.5, 300.0, -1e-12, 254.9999999]])
    np.testing.assert_array_equal(energy_levels(energy), [[31, 31, 30, 255, 0, 255]])
    assert energy_levels(energy).dtype == np.uint8


def test_region_of_flipped_views_on_the_device_path():
    """Views with negative strides (a flipped image or mask) are accepted as numpy accepts them."""
    original, styled, box = edited_pair(64, 96, seed=4)
    dilated = grow(box, 4)
    expected = fft_edit_region(styled, original, dilated)[::-1, ::-1]
    region = fft_edit_region(styled[::-1, ::-1], original[::-1, ::-1], dilated[::-1, ::-1], device="cpu")
    np.testing.assert_array_equal(region, expected)


# ---------------------------------------------------------------------------------------------------
# composite and seam
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_composite_end_to_end(size, fft_device):
    """R from the FFT, then the composite: styled in R minus the seam, 0.6/0.4 on the seam, else original."""
    original, styled, box = edited_pair(*size, seed=5)
    height, width = size
    fine_mask = box.copy()
    fine_mask[height // 4] = False  # the box's top row left to the seam
    fine_mask[height - 3:, width - 5:] = True  # M_f pixels outside R: must stay the original's
    region = fft_edit_region(styled, original, grow(box, 4), device=fft_device)
    assert not region[height - 3:, width - 5:].any()

    out = composite(original, styled, region, fine_mask)
    assert out.dtype == np.uint8 and out.shape == original.shape
    np.testing.assert_array_equal(out, reference_composite(original, styled, region, fine_mask))

    border = region & ~fine_mask
    assert border.any()
    np.testing.assert_array_equal(out[~region], original[~region])
    np.testing.assert_array_equal(out[region & fine_mask], styled[region & fine_mask])
    mix = np.trunc(0.6 * styled[border].astype(float) + 0.4 * original[border].astype(float))
    np.testing.assert_array_equal(out[border], mix.astype(np.uint8))


def test_seam_is_region_and_not_fine_mask_not_xor():
    region = rectangle(20, 30, 5, 5, 15, 20)
    fine_mask = rectangle(20, 30, 8, 10, 18, 28)  # sticks out of R below and to the right
    expected = region.copy()
    expected[8:15, 10:20] = False
    np.testing.assert_array_equal(seam(region, fine_mask), expected)
    assert not seam(region, fine_mask)[fine_mask & ~region].any()  # xor would include these

    rng = np.random.default_rng(7)
    original = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    styled = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    out = composite(original, styled, region, fine_mask)
    np.testing.assert_array_equal(out[fine_mask & ~region], original[fine_mask & ~region])
    np.testing.assert_array_equal(out, reference_composite(original, styled, region, fine_mask))


def test_composite_of_flipped_views_as_of_the_arrays_themselves():
    """OpenCV's masked copy takes contiguous arrays only: views with negative strides work all the same."""
    original, styled, box = edited_pair(48, 64, seed=8)
    region, fine_mask = grow(box, 3), box
    expected = composite(original, styled, region, fine_mask)[::-1, ::-1]
    flipped = composite(original[::-1, ::-1], styled[::-1, ::-1], region[::-1, ::-1], fine_mask[::-1, ::-1])
    np.testing.assert_array_equal(flipped, expected)
    with pytest.raises(ValueError, match="must be uint8 images"):
        composite(original.astype(np.float32), styled, region, fine_mask)


@pytest.mark.parametrize("corner", [np.s_[0:5, 0:7], np.s_[9:12, 12:17], np.s_[0:12, 16:17]])
def test_composite_works_in_the_box_of_r_wherever_it_lies(corner):
    """The composite is made in R's bounding box: an R on the image's edges, or none at all, gives the same."""
    rng = np.random.default_rng(12)
    original = rng.integers(0, 256, size=(12, 17, 3), dtype=np.uint8)
    styled = rng.integers(0, 256, size=(12, 17, 3), dtype=np.uint8)
    region, fine_mask = np.zeros((12, 17), bool), rng.random((12, 17)) < 0.5
    out = composite(original, styled, region, fine_mask)
    np.testing.assert_array_equal(out, original)
    assert out is not original
    region[corner] = rng.random(region[corner].shape) < 0.7
    np.testing.assert_array_equal(composite(original, styled, region, fine_mask),
                                  reference_composite(original, styled, region, fine_mask))


@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.6, 1.0])
def test_composite_alpha(alpha):
    rng = np.random.default_rng(11)
    original = rng.integers(0, 256, size=(12, 17, 3), dtype=np.uint8)
    styled = rng.integers(0, 256, size=(12, 17, 3), dtype=np.uint8)
    region = rectangle(12, 17, 2, 3, 10, 14)
    fine_mask = rectangle(12, 17, 4, 5, 8, 12)
    out = composite(original, styled, region, fine_mask, alpha=alpha)
    np.testing.assert_array_equal(out, reference_composite(original, styled, region, fine_mask, alpha))


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------


def test_shape_mismatch_raises():
    image = np.zeros((16, 24, 3), np.uint8)
    other = np.zeros((24, 16, 3), np.uint8)
    mask = np.zeros((16, 24), bool)
    wrong_mask = np.zeros((16, 25), bool)
    with pytest.raises(ValueError, match="same height and width"):
        fft_edit_region(image, other, mask)
    with pytest.raises(ValueError, match="same height and width"):
        fft_edit_region(image, image, wrong_mask)
    with pytest.raises(ValueError, match="same height and width"):
        composite(image, image, mask, wrong_mask)
    with pytest.raises(ValueError, match="same height and width"):
        composite(image, other, mask, mask)
    with pytest.raises(ValueError, match="same height and width"):
        seam(mask, wrong_mask)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        composite(image[..., 0], image[..., 0], mask, mask)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        composite(image, image, image, mask)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        luma(image[..., :2])
