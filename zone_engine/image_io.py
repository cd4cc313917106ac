"""Reading, writing and resizing images: every image enters the engine through `read_image` (its notes
returned, for a caller that reports them per request) or `load_image` (the same, the notes as warnings).

Images are uint8 RGB numpy arrays of shape (H, W, 3); masks are bool arrays of shape (H, W).

Working geometry (ZONE.md section 0): the reference shrinks the longest side to at most 512 and pads
with black, centred, to multiples of 32, then never removes the padding (a defect). The engine works
at the same padded size, then crops the padding away and maps results back to the input size.
"""

from __future__ import annotations

import contextlib
import io
import numbers
import os
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zone_engine.config import LATENT_SCALE, MAX_PIXELS, MAX_WORKING_SIDE, MIN_SIDE
from zone_engine.errors import InputImageError, OutputError, a_type, warn_caller, with_article
from zone_engine.paths import expanded, folder_problem, is_folder, name_problem, written_atomically, written_file

# What Pillow raises for a file it cannot decode: besides OSError ("truncated", "broken data stream") and
# SyntaxError ("not a TIFF file"), its plugins' own parsers fail on a corrupt or cut-off header or frame table with
# ValueError, IndexError, TypeError, KeyError, EOFError or struct.error (a fuzzed GIF, a truncated multi-page TIFF).
UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, IndexError, TypeError, KeyError, EOFError, struct.error)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_ACCEPTED_ARRAYS = (
    "arrays of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4): uint8, other integers in 0..65535 (16-bit "
    "unless all are at most 255) or floats in [0, 1]"
)

ImageSource = str | os.PathLike | Image.Image | np.ndarray


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def load_image(source: ImageSource, name: str | None = None) -> np.ndarray:
    """Load an image file, PIL image or numpy array as contiguous uint8 RGB of shape (H, W, 3).
    `name`: what messages call a PIL image or array (e.g. "the uploaded image"); a file is called by its path.

    Files and PIL images are decoded fully, turned upright by their EXIF orientation, and use their
    first frame (a PIL image: the frame it is at), with an `EditWarning` when there are more. A CMYK or gray image
    with its ICC profile is converted to sRGB by that profile (`_in_srgb`). Transparency is
    composited over black with an `EditWarning`; so is said a guess of 16-bit pixels' depth (`_integers_to_uint8`).
    Anything unusable raises `InputImageError` with a one-line message that says what is wrong and what to do.
    """
    pixels, notes = read_image(source, name)
    for note in notes:
        warn_caller(note)
    return pixels


def read_image(source: ImageSource, name: str | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """`load_image`'s pixels and, instead of warnings, its notes (what was dropped or guessed): for a caller
    that reports them per request (warnings are process-wide)."""
    if isinstance(source, np.ma.MaskedArray):  # its mask would be dropped unsaid: the caller says what it means
        raise InputImageError("a numpy masked array cannot be edited as it is: pass array.filled(value) (masked "
                              "pixels set to a colour) or array.data (the pixels under the mask as they are)")
    if isinstance(source, np.ndarray):
        rgb, notes = _array_to_rgb(np.asarray(source), name or "the given array")  # np.matrix: a plain array
    elif isinstance(source, Image.Image):
        rgb, notes = _pil_to_rgb(source, name or "the given PIL image")
    elif isinstance(source, str | os.PathLike):
        if not os.fspath(source):  # Path("") would be the current folder: ". is a directory"
            raise InputImageError("no image path given: pass the path of an image file")
        if isinstance(source, str) and "://" in source:  # Path() would fold it into "https:/host/x.png: not found"
            raise InputImageError(f"{source} is a URL: the engine reads local files only; download it first")
        rgb, notes = _load_file(expanded(source, InputImageError))
    else:
        raise InputImageError(f"cannot use {a_type(source)} as an image; pass a file path, a PIL image "
                              f"or a numpy array{_tensor_hint(source) if _is_tensor(source) else _bytes_hint(source)}")
    return rgb, tuple(notes)


def _bytes_hint(source: object) -> str:
    """Bytes are a path or a file's contents, and an open file (a BytesIO of a download, say) holds the contents,
    none read as such: which to pass instead."""
    if isinstance(source, io.IOBase):
        return " (an open file's image: PIL.Image.open(file))"
    if not isinstance(source, bytes | bytearray):
        return ""
    return " (a path in bytes as str: os.fsdecode(path); a file's contents: PIL.Image.open(io.BytesIO(data)))"


def _tensor_hint(tensor: Any) -> str:
    """How to pass this tensor's pixels: channels last, one image, on the host (floats in [0, 1] are scaled)."""
    shape, conversion = tuple(tensor.shape), "tensor"
    if len(shape) == 4 and shape[0] == 1:
        shape, conversion = shape[1:], "tensor[0]"
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4):
        conversion += ".permute(1, 2, 0)"
    return f" (this one as an array: {conversion}.cpu().numpy())"


def _is_tensor(source: object) -> bool:
    return type(source).__module__.split(".")[0] == "torch"  # without importing torch


def check_image_path(path: Path) -> None:
    """InputImageError unless `path` names something there that is not a folder: what reading it checks first, so
    that a typo among many paths can be said before any work."""
    if problem := name_problem(path):
        raise InputImageError(f"cannot read {path}: {problem}")
    if not path.exists():
        stdin = " (images are read from files, not standard input: give the image's path)" if str(path) == "-" else ""
        raise InputImageError(f"image not found: {path}{stdin}")
    if path.is_dir():
        raise InputImageError(f"{path} is a directory; pass the path of an image file")


def _load_file(path: Path) -> tuple[np.ndarray, list[str]]:
    check_image_path(path)
    if not path.is_file():  # a FIFO or a device: reading it could block, and it has no size to check
        raise InputImageError(f"{path} is not a regular file; pass the path of an image file")
    if path.stat().st_size == 0:  # e.g. an interrupted copy: say so, not "not an image"
        raise InputImageError(f"{path} is empty (0 bytes): copy or export the image again")
    try:
        with _opened(path) as img:
            return _pil_to_rgb(img, str(path))
    except Image.DecompressionBombError as error:
        raise InputImageError(_too_large_message(str(path), decompression_bomb_pixels(error))) from None
    except UnidentifiedImageError:
        raise InputImageError(
            f"cannot read {path}: not an image file in a format Pillow can read, or one whose header is "
            "corrupt; convert it to PNG or JPEG"
        ) from None
    except PermissionError:  # the file may be sound: not "corrupt, re-download it"
        raise InputImageError(f"cannot read {path}: permission denied; make it readable (chmod u+r {path}) or run "
                              "as a user who may read it") from None
    except UNREADABLE_IMAGE as error:
        raise InputImageError(
            f"cannot read {path}: the file is unreadable, corrupt or truncated ({_one_line(error)}); "
            "re-export or re-download it"
        ) from None


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator[Image.Image]:
    """`Image.open`, PIL's decompression-bomb warning silenced: `_check_size` applies our own MAX_PIXELS before
    decoding, above PIL's (lower) warning threshold; its hard limit (DecompressionBombError) is our error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            yield img


def _decoded_upright(img: Image.Image, name: str) -> tuple[Image.Image, list[str]]:
    """The image's pixels read (a huge one refused from its header, undecoded) and turned upright by its EXIF
    orientation; with the notes on frames dropped. Every way the file can fail to read is an InputImageError."""
    _check_size(img.height, img.width, name=name)
    try:
        notes = _frames_notes(img, name)  # n_frames reads the file: closed already, it raises as load() would
        img.load()
        img = ImageOps.exif_transpose(img)
    except AssertionError:  # PIL's word for a file closed (its `with` block left) before its pixels were read
        raise InputImageError(f"{name} was closed before its pixels were read: pass it inside its `with "
                              "Image.open(...)` block, or call .load() before closing it") from None
    except Image.DecompressionBombError as error:
        raise InputImageError(_too_large_message(name, decompression_bomb_pixels(error))) from None
    except UNREADABLE_IMAGE as error:
        if "closed image" in str(error):  # .close() called before its pixels were read
            raise InputImageError(f"{name} was closed (.close()) before its pixels were read: pass it "
                                  "before closing it, or call .load() first") from None
        if "Ghostscript" in str(error):  # a sound EPS file: Pillow reads it by running gs, which is not there
            raise InputImageError(f"cannot read {name}: reading EPS needs Ghostscript (gs), which is not "
                                  "installed; convert the file to PNG") from None
        raise InputImageError(
            f"cannot read {name}: the image data is corrupt or truncated ({_one_line(error)}); "
            "re-export or re-download it"
        ) from None
    return img, notes


def _pil_to_rgb(img: Image.Image, name: str) -> tuple[np.ndarray, list[str]]:
    """Decode a PIL image (its current frame: the first of a file), make it upright, convert to uint8 RGB
    (H, W, 3); with the notes on what was dropped or guessed."""
    transparent_gray = _low_bit_gray_transparency(img)  # read before decoding: the file's bit depth goes with it
    img, notes = _decoded_upright(img, name)
    img = _with_transparency(img, transparent_gray)
    in_srgb = _in_srgb(img)
    integer_gray = img.mode in _INTEGER_GRAY
    levels = _gray_levels(img) if integer_gray else None
    notes += _colour_notes(img, name, profile_applied=in_srgb is not None or levels is not None)
    img = img if in_srgb is None else in_srgb
    mode = img.mode
    # A palette, RGB, L or 1-bit image can mark one colour transparent (PNG tRNS), a palette hold alpha: as much
    # transparency as an alpha channel (16-bit gray's below).
    if mode in _ALPHA_MODES or (mode in ("P", "RGB", "L", "1") and img.has_transparency_data):
        straight = img.convert("LA") if mode == "La" else img  # Pillow has no La -> RGBA; LA un-premultiplies
        rgb, had_alpha = _composite_over_black(np.asarray(straight.convert("RGBA")))
        return rgb, notes + _alpha_notes(had_alpha, name)
    if mode == "RGB":
        return np.array(img, dtype=np.uint8, order="C"), notes  # a writable copy
    if mode == "F":
        raise InputImageError(
            f"{name} has floating-point pixels (mode F), which have no standard 8-bit meaning; "
            "convert it to 8-bit RGB first"
        )
    if integer_gray:
        rgb, gray_notes = _integer_gray_to_rgb(np.asarray(img), img.info.get("transparency"), name,
                                               sixteen_bit=mode != "I", levels=levels)
        return rgb, notes + gray_notes
    try:
        return np.array(img.convert("RGB"), dtype=np.uint8, order="C"), notes
    except UNREADABLE_IMAGE as error:
        raise InputImageError(
            f"{name} has pixel mode {mode}, which cannot be converted to RGB ({_one_line(error)}); "
            "convert it to 8-bit RGB first"
        ) from None


# Pillow reads a 1-, 2- or 4-bit gray PNG's pixels scaled to 0..255 but keeps its tRNS value as written (3 for
# 2-bit white): no pixel would match it.
_LOW_BIT_GRAY = {"L;1": 1, "L;2": 2, "L;4": 4}


def _low_bit_gray_transparency(img: Image.Image) -> int | None:
    """A low-bit gray PNG's transparent value scaled as its pixels are, else None."""
    rawmode = img.tile[0].args if img.format == "PNG" and img.tile else None
    value = img.info.get("transparency")
    if not (isinstance(rawmode, str) and rawmode in _LOW_BIT_GRAY and isinstance(value, int)):
        return None
    return value * 255 // (2 ** _LOW_BIT_GRAY[rawmode] - 1)


def _with_transparency(img: Image.Image, transparent: int | None) -> Image.Image:
    """`img` with this transparent value (None: as it is), on a copy: not the caller's image changed."""
    if transparent is None:
        return img
    img = img.copy()
    img.info["transparency"] = transparent
    return img


# Pillow opens a 16-bit gray PNG or TIFF as one or another of these by version and byte order.
_INTEGER_GRAY = ("I", "I;16", "I;16L", "I;16B", "I;16N")
# An ICC profile's data colour space (bytes 16..20 of its header) -> the PIL modes whose pixels it describes and
# the engine converts by it (`_in_srgb`, `_gray_levels`).
_CONVERTED_BY_PROFILE = {b"CMYK": ("CMYK",), b"GRAY": ("L", "LA", *_INTEGER_GRAY)}


def _in_srgb(img: Image.Image) -> Image.Image | None:
    """A CMYK or 8-bit gray image converted to sRGB (RGB, or RGBA from LA or a transparent gray) by its embedded
    ICC profile, as a colour-managed viewer shows it; None as `_by_profile`. Why: converted without it, a press
    CMYK photo's colours come out far too saturated."""
    if img.mode == "CMYK":
        # littlecms' optimised transform, as viewers convert: a few levels from the unoptimised one for smooth
        # profiles, more for steep curves; each of 2^32 inks once, as gray's levels below, is out of reach.
        return _by_profile(img, img, exact=False)
    if img.mode not in ("L", "LA") or (levels := _gray_levels(img)) is None:
        return None
    if img.mode == "L" and img.has_transparency_data:  # a transparent gray value becomes alpha, kept below
        img = img.convert("LA")
    rgb = Image.fromarray(levels[np.asarray(img.getchannel("L"))])
    if img.mode == "LA":
        rgb.putalpha(img.getchannel("A"))
    return rgb


def _gray_levels(img: Image.Image) -> np.ndarray | None:
    """(N, 3) uint8: the sRGB colour of each value a gray image holds (N = 256; 65536 for 16-bit) by its gray ICC
    profile; None as `_by_profile`. Each value converted once, unoptimised: exact and fast (littlecms' optimised
    8-bit transform is off by up to 10 levels in the shadows; unoptimised on every pixel, 3.6 s for 12 MP)."""
    if img.mode in _INTEGER_GRAY:
        ramp = Image.frombytes("I;16", (256, 256), np.arange(65536, dtype="<u2").tobytes())
    else:
        ramp = Image.frombytes("L", (256, 1), bytes(range(256)))
    levels = _by_profile(img, ramp, exact=True)
    return None if levels is None else np.asarray(levels).reshape(-1, 3)


def _by_profile(img: Image.Image, pixels: Image.Image, *, exact: bool) -> Image.Image | None:
    """`pixels` (`img`'s, or values of its mode) converted to sRGB RGB by `img`'s embedded ICC profile, by the
    profile's own intent as viewers do (`exact`: unoptimised); None when `img` has no profile of its colour space
    (`_CONVERTED_BY_PROFILE`), or littlecms is missing or cannot use the profile."""
    profile = img.info.get("icc_profile")
    if not profile or img.mode not in _CONVERTED_BY_PROFILE.get(profile[16:20], ()):
        return None
    try:
        from PIL import ImageCms
    except ImportError:  # a Pillow built without littlecms
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        flags = ImageCms.Flags.NOOPTIMIZE if exact else ImageCms.Flags.NONE
        return ImageCms.profileToProfile(pixels, source, ImageCms.createProfile("sRGB"), outputMode="RGB",
                                         renderingIntent=ImageCms.getDefaultIntent(source), flags=flags)
    except (OSError, ValueError, ImageCms.PyCMSError):  # a damaged profile, or one without the tables this needs
        return None


def _colour_notes(img: Image.Image, name: str, *, profile_applied: bool) -> list[str]:
    """What of the file's colour description the engine does not apply or carry: a CMYK, gray or Lab ICC profile
    not applied (`_by_profile`: its pixels are read without it), a damaged RGB one (left out), a PNG
    gamma other than sRGB's when no profile stands in for it."""
    notes, profile, carried = [], img.info.get("icc_profile"), icc_profile_of(img)
    if profile and profile[16:20] == b"RGB " and carried is None:
        notes.append(f"{name} has a damaged colour profile; it is left out of the output")
    elif profile and profile[16:20] != b"RGB " and not profile_applied:
        # The file's own bytes: printable ASCII (an ICC colour space is "CMYK", "GRAY", "Lab ") or not said, as a
        # note goes into a log line and the server's X-Zone-Warnings header, where a CR or NUL breaks the answer.
        space = profile[16:20].decode("latin-1").strip()
        space = space if space.isascii() and space.isprintable() and space else "unknown"
        notes.append(f"{name} has {with_article(space)} colour profile, which is not applied: its colours may differ "
                     "from what a colour-managed viewer shows; convert the image to sRGB first")
    gamma = img.info.get("gamma")
    # Viewers that manage colour take a PNG's profile over its gamma (PNG spec, iCCP): with one carried or
    # applied, the gamma changes nothing.
    if carried is None and not profile_applied and isinstance(gamma, float) and abs(gamma - 1 / 2.2) > 0.01:
        notes.append(f"{name} has a PNG gamma of {gamma:g} (sRGB's is 0.455), which the output does not carry: "
                     "viewers that apply it show the input's colours otherwise")
    return notes


def _frames_notes(img: Image.Image, name: str) -> list[str]:
    # Whether there is a second frame, not how many: n_frames walks every frame (a TIFF's in quadratic time:
    # 9 s for 20,000 pages of 8x8 in a 3.8 MB upload).
    if not getattr(img, "is_animated", False):
        return []
    frame = img.tell()
    edited = "the first is edited" if frame == 0 else f"frame {frame + 1} (the one it was at) is edited"
    return [f"{name} has several frames (an animation or a multi-page file); only {edited}"]


def _integer_gray_to_rgb(values: np.ndarray, transparent: object, name: str, *, sixteen_bit: bool,
                         levels: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """A PIL mode I or I;16 image's (H, W) values -> uint8 RGB, its transparent value (PNG tRNS) made black.
    `levels`: each 16-bit value's sRGB colour by the image's gray profile (`_gray_levels`), else gray as read."""
    if levels is None:
        gray, notes = _integers_to_uint8(values, name, sixteen_bit=sixteen_bit)
        rgb = _gray_to_rgb(gray)
    else:  # 8-bit values (as `_integers_to_uint8` reads them) are the 16-bit values v * 257
        wide, notes = _integer_depth(values, name, sixteen_bit=sixteen_bit)
        rgb = levels[values if wide else values * 257]
    if isinstance(transparent, int) and (hidden := values == transparent).any():
        rgb[hidden] = 0
        notes += _alpha_notes(True, name)
    return rgb, notes


def _integers_to_uint8(values: np.ndarray, name: str, *, sixteen_bit: bool) -> tuple[np.ndarray, list[str]]:
    """Integer pixels in 0..65535 -> new uint8 by the depth they use (`_integer_depth`): 8-bit values as they are,
    16-bit ones by their high byte."""
    wide, notes = _integer_depth(values, name, sixteen_bit=sixteen_bit)
    return ((values >> 8) if wide else values).astype(np.uint8), notes


def _integer_depth(values: np.ndarray, name: str, *, sixteen_bit: bool) -> tuple[bool, list[str]]:
    """Whether integer pixels in 0..65535 are 16-bit values: not when all are at most 255 (8-bit ones), with the
    notes on that guess. One rule for numpy arrays and PIL's I and I;16 modes, so one 16-bit PNG reads the same
    whichever mode a Pillow version opens it in. `sixteen_bit`: their type says 16 bits."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise InputImageError(
            f"{name} has integer pixels in {low}..{high}, outside 0..65535; convert it to 8-bit RGB first"
        )
    notes = []
    if high <= 255:
        if sixteen_bit and high > 0:  # 8-bit values kept in 16 bits, or a 16-bit image all but black: a guess
            notes.append(f"{name} has 16-bit pixels all at most 255: read as 8-bit values")
        return False, notes
    if high < 4096:  # e.g. 12-bit sensor data: at most 15 of 255 once read as 16-bit
        notes.append(f"{name} has 16-bit pixels all at most {high}: read as 16-bit values, the image is nearly "
                     "black; scale them to 0..65535 first")
    return True, notes


def _array_to_rgb(array: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
    """Numpy image (see `_ACCEPTED_ARRAYS`) -> new contiguous uint8 RGB (H, W, 3), with notes."""
    received = f"{name} (shape {array.shape}, dtype {array.dtype})"
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InputImageError(f"cannot use {received} as an image{_layout_hint(array.shape)}; "
                              f"accepted: {_ACCEPTED_ARRAYS}")
    # Before any conversion: a float array's is 16 bytes a value, too much to find out an image is too large.
    _check_size(array.shape[0], array.shape[1], name=name)

    notes: list[str] = []
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.integer):  # uint16 of either byte order, int32 from PIL, ...
        sixteen_bit = array.dtype.kind == "u" and array.dtype.itemsize == 2
        pixels, notes = _integers_to_uint8(array, name, sixteen_bit=sixteen_bit)
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise InputImageError(
                f"cannot use {received} as an image: float pixels must be finite and in [0, 1] "
                f"(scale them, or pass uint8); accepted: {_ACCEPTED_ARRAYS}"
            )
        pixels = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        hint = " (a mask? pass mask.astype(np.uint8) * 255)" if array.dtype == bool else ""
        raise InputImageError(f"cannot use {received} as an image{hint}; accepted: {_ACCEPTED_ARRAYS}")

    if pixels.ndim == 2 or pixels.shape[2] == 1:
        return _gray_to_rgb(pixels.reshape(pixels.shape[:2])), notes
    if pixels.shape[2] == 4:
        rgb, had_alpha = _composite_over_black(pixels)
        return rgb, notes + _alpha_notes(had_alpha, name)
    return np.array(pixels, dtype=np.uint8, order="C"), notes


def _layout_hint(shape: tuple[int, ...]) -> str:
    """What to do with an array in a layout of another library: channels first, or a batch of one."""
    if len(shape) == 4 and shape[0] == 1:
        return ": a batch of one? pass array[0]"
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] > 4:
        return ": its channels come first; pass array.transpose(1, 2, 0)"
    return ""


def _alpha_notes(had_alpha: bool, name: str) -> list[str]:
    return [f"{name} has transparency; it was dropped (transparent areas become black)"] if had_alpha else []


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8."""
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _composite_over_black(rgba: np.ndarray) -> tuple[np.ndarray, bool]:
    """(H, W, 4) uint8 -> (H, W, 3) uint8 colour x alpha (rounded), and whether any pixel was transparent."""
    alpha = rgba[:, :, 3:].astype(np.uint16)
    rgb = (rgba[:, :, :3].astype(np.uint16) * alpha + 127) // 255
    return np.ascontiguousarray(rgb, dtype=np.uint8), bool((alpha < 255).any())


def _check_size(height: int, width: int, *, name: str) -> None:
    if min(height, width) < MIN_SIDE:
        raise InputImageError(
            f"{name}: image is {width}x{height}; at least {MIN_SIDE} pixels per side are needed"
        )
    if height * width > MAX_PIXELS:
        raise InputImageError(_too_large_message(name, (height, width)))


def _too_large_message(name: str, size: tuple[int, int] | int | None) -> str:
    """`size`: (height, width), or the pixel count alone (all Pillow says of a decompression bomb)."""
    if isinstance(size, tuple):
        shown = f"is {size[1]}x{size[0]} ({size[0] * size[1]:,} pixels)"
    else:
        shown = f"has {size:,} pixels" if size else "is too large"
    return (
        f"{name}: image {shown}; at most {MAX_PIXELS:,} pixels are accepted "
        f"(the engine works at 512 px by default, {MAX_WORKING_SIDE} at most), so downscale it first"
    )


def decompression_bomb_pixels(error: Image.DecompressionBombError) -> int | None:
    """The pixel count Pillow's refusal names ("Image size (10000000000 pixels) exceeds limit of ...")."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return int(found[1]) if found else None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# ---------------------------------------------------------------------------------------------------
# Working geometry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """How an input image maps onto the padded working canvas. All sizes are (H, W)."""

    input_size: tuple[int, int]
    scaled_size: tuple[int, int]  # after shrinking the longest side to at most max_side
    padded_size: tuple[int, int]  # scaled_size rounded up to multiples of `multiple`
    pad_top: int
    pad_left: int

    @property
    def latent_size(self) -> tuple[int, int]:
        """The padded canvas in the VAE's latent space, 8 times smaller a side (SD's VAE)."""
        return self.padded_size[0] // LATENT_SCALE, self.padded_size[1] // LATENT_SCALE


def working_geometry(height: int, width: int, max_side: int = 512, multiple: int = 32) -> Geometry:
    """The reference's shrink (longest side -> max_side, truncating; never enlarges) and centred pad."""
    if min(height, width, max_side, multiple) < 1:
        raise ValueError(f"sizes must be positive, got {height=}, {width=}, {max_side=}, {multiple=}")
    scaled_h, scaled_w = height, width
    if max(height, width) > max_side:
        # Same expressions as the reference (float product, then int()), so sizes match exactly.
        if width > height:
            scaled_h, scaled_w = max(1, int(height * max_side / width)), max_side
        else:
            scaled_h, scaled_w = max_side, max(1, int(width * max_side / height))
    padded_h = -(-scaled_h // multiple) * multiple
    padded_w = -(-scaled_w // multiple) * multiple
    return Geometry(
        input_size=(height, width),
        scaled_size=(scaled_h, scaled_w),
        padded_size=(padded_h, padded_w),
        pad_top=(padded_h - scaled_h) // 2,
        pad_left=(padded_w - scaled_w) // 2,
    )


def to_working(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """uint8 RGB (H, W, 3) at the input size -> uint8 (padded_h, padded_w, 3), black padding."""
    if image.shape != (*geometry.input_size, 3) or image.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 image of shape {(*geometry.input_size, 3)}, got {image.dtype} {image.shape}"
        )
    scaled_h, scaled_w = geometry.scaled_size
    if geometry.scaled_size != geometry.input_size:
        image = np.asarray(
            Image.fromarray(image).resize((scaled_w, scaled_h), resample=Image.Resampling.BICUBIC)
        )
    canvas = np.zeros((*geometry.padded_size, 3), dtype=np.uint8)
    canvas[_scaled_region(geometry)] = image
    return canvas


def crop_padding(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(padded_h, padded_w[, C]) -> (scaled_h, scaled_w[, C]), a contiguous copy."""
    if array.shape[:2] != geometry.padded_size:
        raise ValueError(f"expected an array of size {geometry.padded_size}, got shape {array.shape}")
    return array[_scaled_region(geometry)].copy()


def to_input_size(array: np.ndarray, geometry: Geometry, *, is_mask: bool) -> np.ndarray:
    """Crop the padding, then undo the shrink.

    Masks (padded_h, padded_w), nonzero = True -> bool (H, W), resized with NEAREST.
    Images uint8 (padded_h, padded_w, 3) -> uint8 (H, W, 3), resized with BICUBIC.
    """
    if is_mask:  # NEAREST keeps every level, a mask's 0 and 1 as they are
        return levels_to_input_size((array != 0).astype(np.uint8), geometry).astype(bool)
    cropped = crop_padding(array, geometry)
    height, width = geometry.input_size
    if cropped.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {cropped.dtype}")
    if geometry.scaled_size == geometry.input_size:
        return cropped
    resized = Image.fromarray(cropped).resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized).copy()


def levels_to_input_size(levels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A uint8 (padded_h, padded_w) map of levels -> uint8 (H, W): cropped, then resized with NEAREST as masks are,
    so a threshold of the result is the threshold, resized (the attention difference d against M_b)."""
    cropped = crop_padding(levels, geometry)  # a copy already
    if geometry.scaled_size == geometry.input_size:
        return cropped
    height, width = geometry.input_size
    return np.asarray(Image.fromarray(cropped).resize((width, height), resample=Image.Resampling.NEAREST)).copy()


def _scaled_region(geometry: Geometry) -> tuple[slice, slice]:
    scaled_h, scaled_w = geometry.scaled_size
    return (
        slice(geometry.pad_top, geometry.pad_top + scaled_h),
        slice(geometry.pad_left, geometry.pad_left + scaled_w),
    )


# ---------------------------------------------------------------------------------------------------
# Saving and the built-in sample
# ---------------------------------------------------------------------------------------------------


# Options per format: JPEG (and MPO, JPEG inside) as near lossless as it goes (no chroma subsampling), WebP
# lossless, so the pixels outside the edit stay the input's (JPEG's still move a little: `output_notes`). PNG at
# zlib's fastest level, as OpenCV writes it: a 12 MP photo's edit 1.7-4.8 times as fast as at Pillow's default
# level 6, the file larger by what the content allows: 14-22% for a photo, 60% for a smooth picture (RESULTS.md).
_NEAR_LOSSLESS_JPEG = {"quality": 95, "subsampling": 0}
_SAVE_OPTIONS = {"JPEG": _NEAR_LOSSLESS_JPEG, "MPO": _NEAR_LOSSLESS_JPEG, "WEBP": {"lossless": True},
                 "PNG": {"compress_level": 1}}
# What the formats do to an edit, measured (random pixels and a profile written at these options and read back,
# Pillow 13): _LOSSY_FORMATS change the pixels (PNG, WebP, TIFF, BMP, JPEG 2000, QOI, TGA keep them); only
# _PROFILE_FORMATS carry a colour profile (BMP, GIF, TGA, JPEG 2000, ... drop it); _LARGEST_SIDE: their limits.
_LOSSY_FORMATS = {"JPEG": "JPEG is lossy", "MPO": "MPO is JPEG, lossy", "AVIF": "AVIF is lossy here",
                  "PDF": "a PDF holds the image as JPEG, lossy", "GIF": "GIF keeps at most 256 colours"}
_PROFILE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "TIFF", "AVIF")
_LARGEST_SIDE = {"WEBP": 16383, "JPEG": 65500, "MPO": 65500, "PDF": 65500, "GIF": 65535, "TGA": 65535,
                 "SGI": 65535, "PCX": 65534, "AVIF": 65536}  # libjpeg's 65500, not 65535; 16-bit sizes
# Icons come in the format's own sizes: Pillow scales the image to them (ICO at most 256 a side).
_RESIZING_FORMATS = ("ICO", "ICNS")


def save_image(array: np.ndarray, path: str | os.PathLike, icc_profile: bytes | None = None) -> None:
    """Write uint8 RGB (H, W, 3), a bool mask (H, W) as 0/255, or a uint8 (H, W) mask as is.

    The format follows the file's suffix (a symlink's target's; PNG when it has none); parent folders are
    created. `icc_profile`: the input's colour profile (`colour_profile`), so the output's untouched pixels look
    as the input's did.
    """
    pixels = _savable_pixels(array)
    if icc_profile is not None and not isinstance(icc_profile, bytes):  # Pillow's TypeError, after the checks
        raise OutputError(f"icc_profile is a colour profile's bytes (colour_profile(path) reads an image's) or None, "
                          f"not {a_type(icc_profile)}")
    if not isinstance(path, str | os.PathLike) or not isinstance(os.fspath(path), str):  # pathlib: a TypeError
        raise OutputError(f"save_image writes to a path given as a str or pathlib.Path, not {a_type(path)}")
    if not os.fspath(path):
        raise OutputError("no output path given: pass the file name to write, such as edited.png")
    given, path = path, expanded(path, OutputError)  # `~/x.png` as edit() reads it, not a folder named ~ here
    if problem := name_problem(path):  # a name over 255 bytes, said as the command line's checks say it
        raise OutputError(f"cannot write {path}: {problem}")
    if os.fspath(given).endswith(("/", os.sep)) or is_folder(path):  # a file named as the folder, or rename's error
        raise OutputError(f"cannot write {given}: it names a folder; name the file to write in it, such as "
                          f"{path / 'edited.png'}")
    if problem := folder_problem(path.parent):  # a file where a folder goes, a dangling link, no permission
        raise OutputError(f"cannot write {path}: {problem}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_one_line(error)}") from None
    image = Image.fromarray(np.ascontiguousarray(pixels))
    file_format = check_output_format(path, image.mode)
    try:
        with written_atomically(path) as temporary:
            image.save(temporary, format=file_format, **_save_options(file_format, icc_profile))
    # An encoder's own refusal (OverflowError, struct.error, RuntimeError: a side past a limit not listed above)
    # is the image's, not a bug; an OSError's reason alone: the file it names is the temporary one.
    except (OSError, ValueError, OverflowError, RuntimeError, struct.error) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else _one_line(error)
        raise OutputError(f"cannot write {path}: {reason}") from None


def check_output_format(path: str | os.PathLike, mode: str = "RGB") -> str:
    """The format Pillow writes for `path`'s suffix (PNG without one), else an OutputError: a suffix no format
    Pillow writes has, an icon's (scaled to the format's sizes), or a format that cannot hold a `mode` image
    here (XBM, Palm: not RGB; HDF5, WMF: listed, no writer installed). Said before an edit runs, not after it."""
    path = Path(path)
    file_format, suffix = _writable_format(path), written_file(path).suffix
    if file_format is None:
        raise OutputError(f"cannot write {path}: {suffix} is no image format's suffix Pillow writes; use .png, say")
    if file_format == "PPM" and mode == "RGB" and suffix.lower() in (".pbm", ".pgm"):
        raise OutputError(f"cannot write {path}: {suffix} names a bitmap or graymap, and the edit is in colour; "
                          "use .ppm (or .png)")
    if file_format in _RESIZING_FORMATS:
        raise OutputError(f"cannot write {path}: {file_format} icons come in fixed sizes, so the image would be "
                          "scaled; use .png, say")
    try:  # one pixel, in memory: what Pillow's writer for the format takes, found by asking it
        Image.new(mode, (1, 1)).save(io.BytesIO(), format=file_format, **_SAVE_OPTIONS.get(file_format, {}))
    except Exception as error:  # each writer refuses in its own way (OSError, ValueError, KeyError, ...)
        raise OutputError(f"cannot write {path}: Pillow cannot write {mode} pixels as {file_format} here "
                          f"({_one_line(error)}); use .png, say") from None
    return file_format


def encoded(array: np.ndarray, file_format: str, icc_profile: bytes | None = None) -> bytes:
    """The bytes `save_image` writes for `array` in `file_format` ("PNG", "WEBP", ...): a server's response."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(_savable_pixels(array)))
    image.save(buffer, format=file_format, **_save_options(file_format, icc_profile))
    return buffer.getvalue()


def _save_options(file_format: str, icc_profile: bytes | None) -> dict[str, Any]:
    return {**_SAVE_OPTIONS.get(file_format, {}), **({"icc_profile": icc_profile} if icc_profile else {})}


def _savable_pixels(array: object) -> np.ndarray:
    if isinstance(array, np.ndarray) and array.ndim == 2 and array.dtype == bool:
        return array.astype(np.uint8) * 255
    if isinstance(array, np.ndarray) and array.dtype == np.uint8 and (
            array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        return array
    received = (f"an array of shape {array.shape} and dtype {array.dtype}" if isinstance(array, np.ndarray)
                else a_type(array))
    hint = " (an edit's result: pass its .image)" if isinstance(getattr(array, "image", None), np.ndarray) else ""
    raise OutputError(f"cannot save {received} as an image{hint}: save_image writes uint8 RGB (H, W, 3) or a mask "
                      "(H, W) of bool or uint8")


def colour_profile(path: str | os.PathLike) -> bytes | None:
    """The RGB colour profile embedded in an image file, if any (`icc_profile_of`)."""
    with _opened(path) as img:
        return icc_profile_of(img)


def icc_profile_of(img: Image.Image) -> bytes | None:
    """An image's ICC profile when it describes RGB (for `save_image`): the engine edits pixel values as they are,
    so the output keeps the input's profile to be shown in the input's colours. A CMYK, gray or Lab profile
    (bytes 16..20 of the header: the data colour space) does not describe the RGB output: left out."""
    profile = img.info.get("icc_profile")
    return profile if profile and profile[16:20] == b"RGB " and _profile_loads(profile) else None


def _profile_loads(profile: bytes) -> bool:
    """Whether littlecms reads the profile (a damaged one, carried, would be the output's: left out instead)."""
    try:
        from PIL import ImageCms
    except ImportError:  # a Pillow built without littlecms: nothing to check with
        return True
    try:
        ImageCms.ImageCmsProfile(io.BytesIO(profile))
    except (OSError, ImageCms.PyCMSError):
        return False
    return True


def _writable_format(path: Path) -> str | None:
    """The format Pillow writes for `path`'s suffix (PNG without one), or None (unknown, or read-only: PSD). A
    symlink's target's suffix: the file written is the target."""
    path = written_file(path)
    if not path.suffix:
        return "PNG"
    file_format = Image.registered_extensions().get(path.suffix.lower())
    return file_format if file_format in Image.SAVE else None


def output_notes(path: str | os.PathLike, icc_profile: bytes | None = None) -> list[str]:
    """What writing an edit to `path` loses: the pixels outside the edit (a lossy format: JPEG, GIF, ...), the
    input's colour profile `icc_profile` (a format without one: BMP, ...). Empty when nothing is lost."""
    file_format, notes = _writable_format(Path(path)), []
    if file_format in _LOSSY_FORMATS:
        notes.append(f"{path}: {_LOSSY_FORMATS[file_format]}, so the pixels outside the edit change too; write .png "
                     "or .webp (lossless here) to keep them exactly")
    if icc_profile and file_format is not None and file_format not in _PROFILE_FORMATS:
        notes.append(f"{path}: {file_format} cannot carry the input's colour profile, so the output's colours may "
                     "look different; write .png, .webp or .tif to keep it")
    return notes


def check_output_size(path: str | os.PathLike, height: int, width: int) -> None:
    """OutputError when `path`'s format cannot hold an image this large (WebP: 16383 a side): said before an edit
    runs, not after it."""
    if not all(isinstance(side, numbers.Integral) and not isinstance(side, bool) for side in (height, width)):
        raise OutputError(f"check_output_size takes the height and width as ints, got {a_type(height)} and "
                          f"{a_type(width)}")
    file_format = _writable_format(Path(path))
    largest = _LARGEST_SIDE.get(file_format)
    if largest is not None and max(height, width) > largest:
        raise OutputError(f"cannot write {path}: {file_format} holds at most {largest} pixels a side and the image is "
                          f"{width}x{height}; write .png or .tif")


def make_sample_image(height: int = 256, width: int = 256) -> np.ndarray:
    """A built-in test picture, uint8 RGB (height, width, 3): sky, grass, a sun and a red-roofed house.

    Deterministic and drawn in code, so `zone demo` needs no files.
    """
    rows = np.linspace(0.0, 1.0, height, dtype=np.float64)[:, None, None]  # (H, 1, 1)
    y, x = np.mgrid[0:height, 0:width]
    horizon = 0.62
    sky = (1 - rows) * np.array([70, 130, 220]) + rows * np.array([190, 220, 250])
    grass = (1 - rows) * np.array([90, 170, 70]) + rows * np.array([40, 110, 40])
    image = np.where(rows < horizon, sky, grass) * np.ones((1, width, 1))

    sun_y, sun_x, sun_r = 0.2 * height, 0.78 * width, 0.1 * min(height, width)
    image[(y - sun_y) ** 2 + (x - sun_x) ** 2 <= sun_r**2] = (250, 210, 60)

    wall_top, wall_bottom = int(0.45 * height), int(0.8 * height)
    wall_left, wall_right = int(0.2 * width), int(0.5 * width)
    image[wall_top:wall_bottom, wall_left:wall_right] = (225, 200, 160)
    roof_peak, centre, half = int(0.3 * height), (wall_left + wall_right) / 2, (wall_right - wall_left) * 0.6
    rise = np.clip((y - roof_peak) / max(wall_top - roof_peak, 1), 0.0, 1.0)
    image[(y >= roof_peak) & (y < wall_top) & (np.abs(x - centre) <= half * rise)] = (180, 50, 40)
    door_w = max(1, (wall_right - wall_left) // 5)
    door_left = int(centre) - door_w // 2
    image[int(0.62 * height) : wall_bottom, door_left : door_left + door_w] = (110, 70, 40)
    return np.ascontiguousarray(np.rint(image).astype(np.uint8))
