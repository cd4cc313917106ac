"""Layer blending (ZONE.md section 5): the FFT edit region R and the final composite.

Plain functions on numpy arrays: images are uint8 RGB (H, W, 3), masks bool (H, W), and every
function checks that its inputs share one size. The FFT of R's low-pass difference runs either in
numpy (`low_pass_energy`, the reference) or with torch on the pipeline's device
(`low_pass_energy_torch`: on a GPU the three 2-D FFTs in float64 take microseconds, against tens of
milliseconds on the host). Where the reference has a defect (ZONE.md's table), the comment at that
line says what the reference did.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

# The reference's gray image is OpenCV's 8-bit RGB->gray: ITU-R BT.601 weights for R, G, B in 15-bit
# fixed point, rounded to uint8 (round(0.299 * 2**15), ...); the torch path does the same integer sums.
LUMA_WEIGHTS_Q15 = (9798, 19235, 3735)
LUMA_SHIFT = 15
# E this close to a whole number is taken as whole (energy_levels): far above the FFTs' rounding of E
# (~1e-13 of its 0..~300 range), far below the gaps between E's values that are not whole.
WHOLE_TOLERANCE = 1e-6


def _check_image(image: np.ndarray, name: str) -> None:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be an RGB image of shape (H, W, 3), got shape {image.shape}")


def _check_same_size(images: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> None:
    """Every image (H, W, 3) and every mask (H, W) must share one (H, W)."""
    for name, image in images.items():
        _check_image(image, name)
    shapes = {name: image.shape[:2] for name, image in images.items()}
    for name, mask in masks.items():
        if mask.ndim != 2:
            raise ValueError(f"{name} must be a mask of shape (H, W), got shape {mask.shape}")
        shapes[name] = mask.shape
    if len(set(shapes.values())) > 1:
        sizes = ", ".join(f"{name} {height}x{width}" for name, (height, width) in shapes.items())
        raise ValueError(f"images and masks must have the same height and width, got {sizes}")


def luma(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an RGB image, as the reference's cv2.cvtColor computes it: (H, W, 3) uint8 ->
    (H, W) uint8, rounded.

    The reference ran cv2's RGB->gray on BGR-ordered data, swapping the R and B weights (a defect);
    this weights the channels as RGB.
    """
    image = np.asarray(image)
    _check_image(image, "image")
    return cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2GRAY)


def luma_torch(pixels: torch.Tensor) -> torch.Tensor:
    """`luma` on a device: (..., 3) uint8 RGB -> (...) int32, bit-identical to OpenCV's fixed point."""
    weights = torch.tensor(LUMA_WEIGHTS_Q15, dtype=torch.int32, device=pixels.device)
    return ((pixels.int() * weights).sum(-1) + (1 << (LUMA_SHIFT - 1))) >> LUMA_SHIFT


def frequency_disc(shape: tuple[int, int], radius: int) -> np.ndarray:
    """Bool (rows, cols): the filled disc of `radius` px centred at (rows // 2, cols // 2), inclusive.

    cv2.circle takes its centre as (x, y) = (col, row); the reference passed (row, col), which puts
    the disc off-centre on non-square images (a defect).
    """
    rows, cols = shape
    disc = np.zeros((rows, cols), np.uint8)
    cv2.circle(disc, (cols // 2, rows // 2), int(radius), 1, thickness=-1)
    return disc.astype(bool)


def fft_edit_region(
    styled: np.ndarray,
    original: np.ndarray,
    dilated: np.ndarray,
    *,
    radius: int = 200,
    threshold: int = 30,
    close_kernel: int = 21,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Region R where the edit really changed the image, from a low-passed luma difference.

    styled, original: uint8 (H, W, 3) RGB (I_sty, I_G); dilated: bool (H, W), D.
    `device`: None computes the FFTs in numpy, a torch device there (`low_pass_energy_torch`).
    Returns bool (H, W): R, filled external contours of the closed |low-pass(S - G)| > threshold.
    """
    styled, original, dilated = np.asarray(styled), np.asarray(original), np.asarray(dilated, dtype=bool)
    _check_same_size({"styled": styled, "original": original}, {"dilated": dilated})
    if device is None:
        energy = low_pass_energy(styled, original, dilated, radius)
    else:
        energy = low_pass_energy_torch(styled, original, dilated, radius, device)
    return changed_region(energy, threshold, close_kernel)


def low_pass_energy(styled: np.ndarray, original: np.ndarray, dilated: np.ndarray, radius: int) -> np.ndarray:
    """E = |ifft(disc * (fft(S) - fft(G)))|, S and G the lumas of styled and original inside D.

    styled, original: uint8 (H, W, 3); dilated: bool (H, W). Returns float64 (H, W). The reference,
    written as ZONE.md has it (spectra shifted so that the disc sits at their centre).
    """
    inside = dilated[..., None]
    styled_luma = luma(np.where(inside, styled, 0))  # S (H, W)
    original_luma = luma(np.where(inside, original, 0))  # G (H, W)
    spectrum = np.fft.fftshift(np.fft.fft2(styled_luma)) - np.fft.fftshift(np.fft.fft2(original_luma))
    spectrum *= frequency_disc(dilated.shape, radius)
    return np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum)))


def low_pass_energy_torch(
    styled: np.ndarray, original: np.ndarray, dilated: np.ndarray, radius: int, device: torch.device | str
) -> np.ndarray:
    """`low_pass_energy` computed with torch on `device`, in float64 as numpy computes it.

    The disc is shifted once instead of both spectra twice (a permutation: the same products), and
    the two forward FFTs run as one batched call. Only the FFT library's rounding differs from the
    reference (about 1e-13 of E's range), below what `energy_levels` resolves.
    """
    pair = torch.from_numpy(np.stack([styled, original])).to(device)  # (2, H, W, 3) uint8
    inside = torch.from_numpy(np.ascontiguousarray(dilated)).to(pair.device)  # from_numpy refuses negative strides
    lumas = luma_torch(pair).double() * inside  # (2, H, W): S, G
    spectra = torch.fft.fft2(lumas)
    disc = torch.from_numpy(np.fft.ifftshift(frequency_disc(dilated.shape, radius))).to(pair.device)
    return torch.fft.ifft2((spectra[0] - spectra[1]) * disc).abs().cpu().numpy()


def energy_levels(energy: np.ndarray) -> np.ndarray:
    """float64 E (H, W) -> uint8 levels, truncated as the reference's astype(uint8) did, with two changes.

    - Clipped to 0..255 first: the reference's cast wrapped values above 255 (a defect).
    - A value within WHOLE_TOLERANCE of a whole number is that number. S and G are whole (uint8
      lumas), so where the disc keeps every frequency (half-diagonal <= 200 px: up to 282 x 282)
      E = |S - G|, and the FFT's rounding (~1e-13) would put it a hair above or below: truncation
      would then choose between two levels by noise, differently in numpy and cuFFT.
    """
    whole = np.rint(energy)
    energy = np.where(np.abs(energy - whole) < WHOLE_TOLERANCE, whole, energy)
    return np.clip(energy, 0, 255).astype(np.uint8)


def changed_region(energy: np.ndarray, threshold: int, close_kernel: int) -> np.ndarray:
    """float64 E (H, W) -> bool R (H, W): E's levels > threshold, closed, external contours filled."""
    changed = (energy_levels(energy) > threshold).astype(np.uint8) * 255
    kernel = np.ones((close_kernel, close_kernel), np.uint8)
    changed = cv2.morphologyEx(changed, cv2.MORPH_CLOSE, kernel)
    contours, _ = cv2.findContours(changed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    region = np.zeros_like(changed)
    cv2.drawContours(region, contours, -1, 255, thickness=cv2.FILLED)
    return region > 0


def seam(region: np.ndarray, fine_mask: np.ndarray) -> np.ndarray:
    """Seam B = R and not M_f: bool (H, W), where styled and original are mixed.

    The reference computed R - M_f in uint8, so 0 - 255 wrapped to 1 and the seam became R xor M_f
    (a defect): pixels of M_f outside R must stay the original's.
    """
    region, fine_mask = np.asarray(region, dtype=bool), np.asarray(fine_mask, dtype=bool)
    _check_same_size({}, {"region": region, "fine_mask": fine_mask})
    return region & ~fine_mask


def composite(
    original: np.ndarray,
    styled: np.ndarray,
    region: np.ndarray,
    fine_mask: np.ndarray,
    *,
    alpha: float = 0.6,
) -> np.ndarray:
    """The engine's final image: styled inside R, an alpha mix on the seam, the original elsewhere.

    original, styled: uint8 (H, W, 3) RGB; region (R), fine_mask (M_f): bool (H, W).
    Returns uint8 (H, W, 3); every pixel outside R is exactly the original's.
    """
    original, styled = np.asarray(original), np.asarray(styled)
    region, fine_mask = np.asarray(region, dtype=bool), np.asarray(fine_mask, dtype=bool)
    _check_same_size({"original": original, "styled": styled}, {"region": region, "fine_mask": fine_mask})
    if original.dtype != np.uint8 or styled.dtype != np.uint8:  # OpenCV's copy would otherwise skip the paste
        raise ValueError(f"original and styled must be uint8 images, got {original.dtype} and {styled.dtype}")

    out = np.ascontiguousarray(original).copy()
    # Only R changes: the work is done in its bounding box (on a 12 MP photo the whole-image masks took 0.17 s).
    if (box := _bounding_box(region)) is None:
        return out
    original, styled, region, fine_mask = original[box], styled[box], region[box], fine_mask[box]
    # Styled inside R: OpenCV's masked copy, 0.08 ms at 512² against numpy's where 2.3 ms (2-core AMD CPU).
    changed = np.ascontiguousarray(original).copy()
    cv2.copyTo(np.ascontiguousarray(styled), np.ascontiguousarray(region).view(np.uint8), changed)
    border = seam(region, fine_mask)
    mix = alpha * styled[border].astype(np.float64) + (1.0 - alpha) * original[border].astype(np.float64)
    # Truncate toward zero, as the reference's float64 -> uint8 assignment did.
    changed[border] = mix.astype(np.uint8)
    out[box] = changed
    return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The rows and columns holding every True pixel of a bool (H, W) mask; None when it has none."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)
