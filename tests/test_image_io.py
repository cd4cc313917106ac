"""zone_engine.image_io: every pixel mode, every kind of bad input, the working geometry, saving."""

from __future__ import annotations

import io
import os
import struct
import tempfile
import threading
import types
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import damaged_image_files, image_header, rgb_profile
from PIL import Image, PngImagePlugin

from zone_engine import image_io
from zone_engine.errors import InputImageError, OutputError
from zone_engine.image_io import (
    Geometry,
    crop_padding,
    levels_to_input_size,
    load_image,
    make_sample_image,
    read_image,
    save_image,
    to_input_size,
    to_working,
    working_geometry,
)
from zone_engine.paths import check_output_file, file_argument

RNG = np.random.default_rng(0)


def random_rgb(height: int, width: int, low: int = 0) -> np.ndarray:
    return RNG.integers(low, 256, size=(height, width, 3), dtype=np.uint8)


def load_quietly(source) -> np.ndarray:
    """Load and fail on any warning (transparency warnings must only come from alpha inputs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_image(source)


def load_refused(source) -> str:
    """Load, expect InputImageError, return its message (checked to be one line)."""
    with pytest.raises(InputImageError) as caught:
        load_image(source)
    message = str(caught.value)
    assert "\n" not in message
    return message


def assert_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert array.shape == (height, width, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous
    assert array.flags.writeable


# ---------------------------------------------------------------------------------------------------
# Pixel modes, from files
# ---------------------------------------------------------------------------------------------------


def test_rgb_png_loads_unchanged(tmp_path):
    pixels = random_rgb(12, 20)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    loaded = load_quietly(tmp_path / "rgb.png")
    assert_rgb(loaded, 12, 20)
    np.testing.assert_array_equal(loaded, pixels)


def test_path_may_be_a_string(tmp_path):
    pixels = random_rgb(9, 9)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_quietly(str(tmp_path / "rgb.png")), pixels)


def test_grayscale_png_is_repeated_over_channels(tmp_path):
    gray = RNG.integers(0, 256, size=(10, 14), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    loaded = load_quietly(tmp_path / "l.png")
    assert_rgb(loaded, 10, 14)
    np.testing.assert_array_equal(loaded, np.repeat(gray[:, :, None], 3, axis=2))


def test_one_bit_png_gives_black_and_white(tmp_path):
    bits = (np.indices((8, 12)).sum(axis=0) % 2).astype(bool)
    Image.fromarray(bits).save(tmp_path / "1.png")
    loaded = load_quietly(tmp_path / "1.png")
    assert_rgb(loaded, 8, 12)
    np.testing.assert_array_equal(loaded[:, :, 0], bits.astype(np.uint8) * 255)


def palette_image(indices: np.ndarray) -> Image.Image:
    img = Image.frombytes("P", indices.shape[::-1], indices.astype(np.uint8).tobytes())
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 * 3 - 9))
    return img


def test_palette_png_looks_up_colours(tmp_path):
    indices = RNG.integers(0, 3, size=(9, 11))
    palette_image(indices).save(tmp_path / "p.png")
    loaded = load_quietly(tmp_path / "p.png")
    colours = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(loaded, colours[indices])


def test_palette_png_with_transparency_warns_and_blackens(tmp_path):
    indices = RNG.integers(0, 3, size=(9, 11))
    indices[0, 0] = 1
    palette_image(indices).save(tmp_path / "pt.png", transparency=1)
    with pytest.warns(UserWarning, match="transparency"):
        loaded = load_image(tmp_path / "pt.png")
    np.testing.assert_array_equal(loaded[indices == 1], 0)
    assert (loaded[indices == 2] == [0, 255, 0]).all()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_rgb_and_gray_png_with_a_transparent_colour_warn_and_blacken_as_alpha_does(tmp_path, mode):
    """PNG tRNS: one colour of an RGB or L image marked transparent (was kept, silently)."""
    pixels = np.full((9, 11, 3), 200, np.uint8)
    pixels[:4] = 30
    image = Image.fromarray(pixels).convert(mode)
    image.save(tmp_path / "t.png", transparency=(30, 30, 30) if mode == "RGB" else 30)
    with pytest.warns(UserWarning, match="transparency"):
        loaded = load_image(tmp_path / "t.png")
    np.testing.assert_array_equal(loaded[:4], 0)
    assert (loaded[4:] == 200).all()


def png_file(header: bytes, *chunks: tuple[bytes, bytes]) -> bytes:
    """A PNG from its IHDR fields and its other chunks, as written by hand (what Pillow does not write)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(kind, data) for kind, data in ((b"IHDR", header), *chunks,
                                                                                 (b"IEND", b"")))


def gray_png(bits: int, values: np.ndarray, transparent: int) -> bytes:
    """A gray PNG of this bit depth (1, 2, 4 or 8), one value marked transparent (tRNS): Pillow writes no gray
    PNG under 8 bits but 1-bit."""
    height, width = values.shape
    pixel_bits = np.unpackbits(values.astype(np.uint8)[..., None], axis=-1)[..., 8 - bits:]  # (H, W, bits)
    rows = b"".join(b"\0" + np.packbits(row.ravel()).tobytes() for row in pixel_bits)  # filter 0, then the row
    header = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)  # gray, no interlace
    return png_file(header, (b"tRNS", struct.pack(">H", transparent)), (b"IDAT", zlib.compress(rows)))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_a_low_bit_gray_pngs_transparent_value_is_transparency_as_at_8_bits(bits):
    """Pillow scales a 1-, 2- or 4-bit gray PNG's pixels to 0..255, not its tRNS value (white is 3 at 2 bits):
    the transparent half was kept white, silently (and a 1-bit PNG's transparency was not looked for)."""
    top = 2**bits - 1
    values = np.full((8, 8), top // 2 if bits > 1 else 0)
    values[:, 4:] = top  # white, the transparent value
    rgb, notes = read_image(Image.open(io.BytesIO(gray_png(bits, values, top))))
    assert (rgb[:, 4:] == 0).all() and (rgb[:, :4] == (top // 2 if bits > 1 else 0) * 255 // top).all()
    assert any("has transparency" in note for note in notes)


def test_a_palette_image_with_alpha_in_its_palette_is_composited_as_rgba():
    """A PIL image quantized from RGBA holds its alpha in the palette, not in info: it was kept opaque, silently."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:, :4, 3] = 255, 255
    rgb, notes = read_image(Image.fromarray(rgba).quantize())
    assert (rgb[:, :4] == [255, 0, 0]).all() and (rgb[:, 4:] == 0).all()
    assert any("has transparency" in note for note in notes)


def test_colour_descriptions_the_engine_does_not_apply_or_carry_are_said():
    """A CMYK or gray profile is not applied, a damaged one not carried, a PNG gamma not carried: each was silent
    (the damaged profile went into the output, where viewers fail on it)."""
    def noted(image: Image.Image, fmt: str, **save) -> tuple[tuple[str, ...], bytes | None]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **save)
        with Image.open(buffer) as opened:
            return read_image(opened)[1], image_io.icc_profile_of(opened)

    srgb = rgb_profile()
    cmyk_header = srgb[:16] + b"CMYK" + srgb[20:]
    rgb = Image.fromarray(random_rgb(8, 8))
    notes, carried = noted(rgb.convert("CMYK"), "JPEG", icc_profile=cmyk_header)
    assert "has a CMYK colour profile, which is not applied" in " ".join(notes) and carried is None
    notes, _ = noted(rgb, "PNG", icc_profile=srgb[:16] + b"a\r\n\x00" + srgb[20:])  # the file's own bytes, unprintable
    assert "has an unknown colour profile" in " ".join(notes) and all(note.isprintable() for note in notes)
    damaged = srgb[:128] + b"\xff" * (len(srgb) - 128)  # the header says RGB; the tag table is garbage
    notes, carried = noted(rgb, "PNG", icc_profile=damaged)
    assert "has a damaged colour profile" in " ".join(notes) and carried is None
    notes, carried = noted(rgb, "PNG", icc_profile=srgb)
    assert notes == () and carried == srgb
    assert "PNG gamma of 1 " in " ".join(noted(rgb, "PNG", pnginfo=png_gamma(1.0))[0])
    assert "PNG gamma of 0.55556 " in " ".join(noted(rgb, "PNG", pnginfo=png_gamma(1 / 1.8))[0])  # old Macs'
    assert noted(rgb, "PNG", pnginfo=png_gamma(1 / 2.2))[0] == ()


def png_gamma(gamma: float) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", struct.pack(">I", round(gamma * 100000)))
    return info


def test_a_png_gamma_is_not_said_when_a_profile_stands_in_for_it():
    """Viewers that manage colour take the profile over the gamma: with the profile carried (RGB) or applied (gray),
    nothing is lost."""
    for pixels, profile in ((random_rgb(8, 8), rgb_profile()), (random_rgb(8, 8)[..., 0], linear_gray_profile())):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", icc_profile=profile, pnginfo=png_gamma(1.0))
        with Image.open(buffer) as opened:
            assert read_image(opened)[1] == ()


# ICC v2 profiles built byte by byte (ICC.1:2001-04): littlecms makes only RGB, Lab and XYZ ones, and a real
# press or gray profile is megabytes that no machine here has.
_D50 = (0.9642, 1.0, 0.8249)


def _s15fixed16(*values: float) -> bytes:
    return b"".join(struct.pack(">i", round(value * 65536)) for value in values)


def icc_profile(device_class: bytes, space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    description = b"a test profile\0"
    tags = {b"desc": b"desc" + bytes(4) + struct.pack(">I", len(description)) + description + bytes(78),
            b"wtpt": b"XYZ " + bytes(4) + _s15fixed16(*_D50), **tags}
    start = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags.items():
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", start + len(data), len(body))
        data += body
    header = (struct.pack(">I", start + len(data)) + bytes(4) + bytes([2, 0x10, 0, 0]) + device_class + space + pcs
              + bytes(12) + b"acsp" + bytes(28) + _s15fixed16(*_D50))
    return header + bytes(128 - len(header)) + table + data


def linear_gray_profile() -> bytes:
    """A gray profile of gamma 1: its values are linear light."""
    return icc_profile(b"mntr", b"GRAY", b"XYZ ", {b"kTRC": b"curv" + bytes(4) + struct.pack(">IH", 1, 256)})


def neutral_press_profile() -> bytes:
    """A CMYK profile (an 8-bit lookup table to Lab) under which every ink mix is a gray, lighter the less black."""
    return icc_profile(b"prtr", b"CMYK", b"Lab ", {b"A2B0": neutral_press_table(lighter_with_black=False)})


def neutral_press_table(*, lighter_with_black: bool) -> bytes:
    """A CMYK -> Lab lookup table (mft1) under which every ink mix is a gray, white or black by the black ink."""
    identity, matrix = bytes(range(256)), _s15fixed16(1, 0, 0, 0, 1, 0, 0, 0, 1)
    without_black, with_black = (0, 255) if lighter_with_black else (255, 0)
    grid = b"".join(bytes([without_black if black == 0 else with_black, 128, 128])  # L, a, b
                    for _ in range(8) for black in (0, 1))
    return b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + matrix + identity * 4 + grid + identity * 3


def srgb_encoded(linear: np.ndarray) -> np.ndarray:
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055) * 255


def test_a_gray_image_is_converted_to_srgb_by_its_profile():
    """Read as they are, linear gray values would show far too dark: each is sRGB-encoded (littlecms keeps 8-bit
    precision: within 1)."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG", icc_profile=linear_gray_profile())
    with Image.open(buffer) as opened:
        rgb, notes = read_image(opened)
        assert image_io.icc_profile_of(opened) is None  # the output is sRGB: it carries no gray profile
    assert notes == ()
    assert (rgb == rgb[..., :1]).all()
    assert np.abs(rgb[..., 0] - srgb_encoded(levels / 255)).max() <= 1


def test_a_16_bit_gray_image_is_converted_by_its_profile_at_16_bits():
    """Each 16-bit value converted, not its high byte: 225 of 65535 in linear light is 11 of 255 in sRGB, 0 once
    cut to 8 bits (a 16-bit gray PNG or TIFF opens as mode I;16, which was read without its profile). Values all at
    most 255 are 8-bit ones, as without a profile."""
    def read(values: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
        buffer = io.BytesIO()
        Image.fromarray(values).save(buffer, format="PNG", icc_profile=linear_gray_profile())
        with Image.open(buffer) as opened:
            assert opened.mode.startswith("I")
            return read_image(opened)

    squares = (np.arange(256, dtype=np.uint16) ** 2).reshape(16, 16)  # dense in the shadows: 0, 1, 4, 9, ...
    rgb, notes = read(squares)
    assert notes == () and (rgb == rgb[..., :1]).all()
    assert np.abs(rgb[..., 0] - srgb_encoded(squares / 65535)).max() <= 1
    eight_bit = np.arange(256, dtype=np.uint16).reshape(16, 16)
    rgb, notes = read(eight_bit)
    assert np.abs(rgb[..., 0] - srgb_encoded(eight_bit / 255)).max() <= 1
    assert notes == ("the given PIL image has 16-bit pixels all at most 255: read as 8-bit values",)
    buffer = io.BytesIO()  # exactly as the same values in an 8-bit file: one reading of 8-bit values, either way
    Image.fromarray(eight_bit.astype(np.uint8)).save(buffer, format="PNG", icc_profile=linear_gray_profile())
    np.testing.assert_array_equal(rgb, read_image(Image.open(buffer))[0])


@pytest.mark.parametrize("file_format", ["JPEG", "TIFF"])
def test_a_cmyk_image_is_converted_to_srgb_by_its_profile(file_format):
    """Under this profile, pure magenta without black is white and any ink with full black is black; converted
    without it, they would be magenta and black."""
    inks = np.zeros((8, 8, 4), dtype=np.uint8)
    inks[:, :, 1] = 255
    inks[4:, :, 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(inks, "CMYK").save(buffer, format=file_format, icc_profile=neutral_press_profile())
    rgb, notes = read_image(Image.open(buffer))
    assert notes == ()
    assert (rgb[:4] >= 250).all() and (rgb[4:] <= 5).all()


def test_a_cmyk_profile_is_applied_by_the_rendering_intent_it_declares():
    """A profile's header names the intent viewers convert by: relative colorimetric here, its A2B1 table. By its
    perceptual table (A2B0) instead, this image's white and black would come out swapped."""
    tables = {b"A2B0": neutral_press_table(lighter_with_black=False),
              b"A2B1": neutral_press_table(lighter_with_black=True)}
    profile = bytearray(icc_profile(b"prtr", b"CMYK", b"Lab ", tables))
    profile[64:68] = struct.pack(">I", 1)  # the header's rendering intent: relative colorimetric
    inks = np.zeros((8, 8, 4), dtype=np.uint8)
    inks[:, :, 1] = 255
    inks[4:, :, 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(inks, "CMYK").save(buffer, format="TIFF", icc_profile=bytes(profile))
    rgb, notes = read_image(Image.open(buffer))
    assert notes == ()
    assert (rgb[:4] <= 5).all() and (rgb[4:] >= 250).all()


def test_a_gray_profile_keeps_the_transparency():
    """Gray with alpha, and gray with a transparent value (PNG tRNS): converted, then composited over black."""
    gray = np.full((8, 8), 64, dtype=np.uint8)
    alpha = np.full((8, 8), 255, dtype=np.uint8)
    alpha[:, 4:] = 0
    gray_alpha, gray_transparent = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(gray_alpha, format="PNG", icc_profile=linear_gray_profile())
    gray[:, 4:] = 10
    Image.fromarray(gray).save(gray_transparent, format="PNG", icc_profile=linear_gray_profile(), transparency=10)
    for buffer in (gray_alpha, gray_transparent):
        rgb, notes = read_image(Image.open(buffer))
        assert any("has transparency" in note for note in notes)
        assert abs(int(rgb[0, 0, 0]) - srgb_encoded(64 / 255)) <= 1 and (rgb[:, 4:] == 0).all()


def test_rgba_png_composites_over_black_and_warns(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, :, 3] = 255
    rgba[1, :, 3] = 0
    rgba[2:, :, 3] = 128
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    with pytest.warns(UserWarning, match="transparency"):
        loaded = load_image(tmp_path / "rgba.png")
    assert_rgb(loaded, 8, 8)
    np.testing.assert_array_equal(loaded[0], np.broadcast_to([200, 100, 50], (8, 3)))
    np.testing.assert_array_equal(loaded[1], 0)
    np.testing.assert_array_equal(loaded[2], np.broadcast_to([100, 50, 25], (8, 3)))  # round(c*128/255)


def test_opaque_rgba_does_not_warn(tmp_path):
    rgba = np.dstack([random_rgb(8, 9), np.full((8, 9), 255, dtype=np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(load_quietly(tmp_path / "opaque.png"), rgba[..., :3])


def test_gray_alpha_png_composites(tmp_path):
    Image.new("LA", (9, 8), (100, 0)).save(tmp_path / "la.png")
    img = Image.open(tmp_path / "la.png")
    img.putpixel((0, 0), (100, 255))
    img.save(tmp_path / "la.png")
    with pytest.warns(UserWarning, match="transparency"):
        loaded = load_image(tmp_path / "la.png")
    assert_rgb(loaded, 8, 9)
    np.testing.assert_array_equal(loaded[0, 0], [100, 100, 100])
    np.testing.assert_array_equal(loaded[1:], 0)


@pytest.mark.parametrize("suffix", ["tif", "jpg"])
def test_cmyk_is_converted(tmp_path, suffix):
    Image.new("CMYK", (10, 8), (0, 255, 0, 0)).save(tmp_path / f"cmyk.{suffix}")
    loaded = load_quietly(tmp_path / f"cmyk.{suffix}")
    assert_rgb(loaded, 8, 10)
    tolerance = 0 if suffix == "tif" else 3  # JPEG is lossy
    assert np.abs(loaded.astype(int) - [255, 0, 255]).max() <= tolerance


def test_sixteen_bit_png_keeps_the_high_byte(tmp_path):
    values = np.array([[0, 255, 256, 1000], [32768, 65280, 65534, 65535]] * 4, dtype=np.uint16)
    values = np.tile(values, (1, 2))  # (8, 8)
    Image.fromarray(values).save(tmp_path / "i16.png")
    assert image_header(tmp_path / "i16.png").mode == "I;16"
    loaded = load_quietly(tmp_path / "i16.png")
    assert_rgb(loaded, 8, 8)
    np.testing.assert_array_equal(loaded[0, :4, 0], [0, 0, 1, 3])
    np.testing.assert_array_equal(loaded[1, :4, 0], [128, 255, 255, 255])


@pytest.mark.parametrize(
    ("high", "expected_high"),
    [(200, 200), (65535, 255)],
    ids=["8-bit range taken as is", "16-bit range shifted"],
)
def test_thirty_two_bit_integer_tiff_scales_by_actual_depth(tmp_path, high, expected_high):
    values = np.zeros((8, 8), dtype=np.int32)
    values[0, 0] = high
    Image.fromarray(values).save(tmp_path / "i.tif")
    assert image_header(tmp_path / "i.tif").mode == "I"
    loaded = load_quietly(tmp_path / "i.tif")
    assert_rgb(loaded, 8, 8)
    assert loaded[0, 0, 0] == expected_high
    assert loaded[1:].max() == 0


@pytest.mark.parametrize("bad", [70000, -1])
def test_thirty_two_bit_integer_out_of_range_is_refused(tmp_path, bad):
    values = np.zeros((8, 8), dtype=np.int32)
    values[0, 0] = bad
    Image.fromarray(values).save(tmp_path / "i.tif")
    message = load_refused(tmp_path / "i.tif")
    assert "0..65535" in message and "8-bit RGB" in message


def test_float_tiff_is_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    message = load_refused(tmp_path / "f.tif")
    assert "floating-point" in message and "convert it to 8-bit RGB" in message


def test_a_multi_page_file_is_noted_without_counting_its_pages(monkeypatch):
    """n_frames walks every page (a TIFF's in quadratic time: 9 s for an upload of 20,000 8x8 pages)."""
    from PIL import TiffImagePlugin

    pages, buffer = [Image.new("RGB", (8, 8), (value, 0, 0)) for value in range(3)], io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "n_frames", property(lambda _: pytest.fail("pages counted")))
    with Image.open(io.BytesIO(buffer.getvalue())) as tiff:
        _, notes = read_image(tiff, name="the upload")
    assert notes == ("the upload has several frames (an animation or a multi-page file); only the first is edited",)


@pytest.mark.parametrize("name", ["frames.tif", "anim.gif"])
def test_multi_frame_file_uses_first_frame_and_says_so(tmp_path, name):
    first, second = Image.new("RGB", (9, 8), (255, 0, 0)), Image.new("RGB", (9, 8), (0, 0, 255))
    first.save(tmp_path / name, save_all=True, append_images=[second])
    with pytest.warns(UserWarning, match="has several frames .* only the first is edited"):
        loaded = load_image(tmp_path / name)
    assert_rgb(loaded, 8, 9)
    np.testing.assert_array_equal(loaded[0, 0], [255, 0, 0])


def test_a_multi_page_sixteen_bit_tiff_says_its_other_pages_are_dropped(tmp_path):
    """The 16-bit path returned its own notes only: the frames note was lost."""
    pages = [Image.fromarray(np.full((8, 9), level, dtype=np.uint16)) for level in (65535, 0)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with pytest.warns(UserWarning, match="has several frames .* only the first is edited"):
        loaded = load_image(tmp_path / "pages.tif")
    np.testing.assert_array_equal(loaded[0, 0], [255, 255, 255])


def test_a_pil_animation_at_a_later_frame_edits_that_frame_and_says_which(tmp_path):
    first, second = Image.new("RGB", (9, 8), (255, 0, 0)), Image.new("RGB", (9, 8), (0, 0, 255))
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second])
    with Image.open(tmp_path / "anim.gif") as animation:
        animation.seek(1)
        with pytest.warns(UserWarning, match=r"has several frames .* only frame 2 \(the one it was at\) is edited"):
            loaded = load_image(animation)
    np.testing.assert_array_equal(loaded[0, 0], [0, 0, 255])


def test_single_frame_gif_loads_without_warning(tmp_path):
    Image.new("RGB", (9, 8), (255, 0, 0)).save(tmp_path / "still.gif")
    np.testing.assert_array_equal(load_quietly(tmp_path / "still.gif")[0, 0], [255, 0, 0])


# EXIF orientation: how the stored pixels are turned to be upright (1 as stored, 3 half a turn, 6 a quarter
# turn clockwise, 8 counter-clockwise), against numpy's rot90 (k counter-clockwise quarter turns).
@pytest.mark.parametrize(("orientation", "quarter_turns"), [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, quarter_turns):
    stored = np.zeros((10, 20, 3), dtype=np.uint8)
    stored[:5, :10] = (255, 0, 0)  # a red top-left quarter and a green bottom-right one: any turn shows
    stored[5:, 10:] = (0, 255, 0)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "phone.png", exif=exif)  # PNG: lossless, so the pixels can be compared exactly
    np.testing.assert_array_equal(load_quietly(tmp_path / "phone.png"), np.rot90(stored, quarter_turns))


def test_transparency_is_composited_over_black_rounded_to_nearest():
    """Every colour and alpha: colour x alpha / 255 to the nearest level (no pair falls halfway)."""
    colour, alpha = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([colour, colour, colour, alpha], axis=-1).astype(np.uint8)
    rgb, transparent = image_io._composite_over_black(rgba)
    expected = np.rint(colour * alpha / 255.0).astype(np.uint8)
    assert transparent
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=-1))


# ---------------------------------------------------------------------------------------------------
# PIL images passed directly
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB", "CMYK", "RGBX"])
def test_pil_colour_modes_convert_to_rgb(mode):
    img = Image.fromarray(random_rgb(8, 9)).convert(mode) if mode != "LAB" else Image.new("LAB", (9, 8))
    loaded = load_quietly(img)
    assert_rgb(loaded, 8, 9)
    np.testing.assert_array_equal(loaded, np.asarray(img.convert("RGB")))


def test_pil_palette_alpha_composites_and_warns():
    img = Image.new("PA", (9, 8))
    with pytest.warns(UserWarning, match="transparency"):
        assert_rgb(load_image(img), 8, 9)


def test_pil_premultiplied_gray_alpha_composites_as_la_does():
    """Mode La (luminance premultiplied by alpha): Pillow converts it to LA, not to RGBA, so it was refused."""
    straight = Image.new("LA", (9, 8), (100, 0))
    straight.putpixel((0, 0), (100, 255))
    with pytest.warns(UserWarning, match="transparency"):
        loaded, expected = load_image(straight.convert("La")), load_image(straight)
    np.testing.assert_array_equal(loaded, expected)
    np.testing.assert_array_equal(loaded[0, 0], [100, 100, 100])


def test_pil_float_image_is_refused():
    assert "floating-point" in load_refused(Image.new("F", (9, 9)))


# ---------------------------------------------------------------------------------------------------
# Files that are not usable images
# ---------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert load_refused(tmp_path / "nowhere.png") == f"image not found: {tmp_path / 'nowhere.png'}"


def test_directory(tmp_path):
    assert "is a directory" in load_refused(tmp_path)
    # An empty path would be the current folder, "is a directory": not what went wrong.
    assert load_refused("") == "no image path given: pass the path of an image file"


def test_empty_file(tmp_path):
    empty = tmp_path / "photo.jpg"
    empty.write_bytes(b"")
    assert load_refused(empty) == f"{empty} is empty (0 bytes): copy or export the image again"


def test_random_bytes_named_png(tmp_path):
    (tmp_path / "noise.png").write_bytes(RNG.integers(0, 256, 500, dtype=np.uint8).tobytes())
    message = load_refused(tmp_path / "noise.png")
    assert "cannot read" in message and "noise.png" in message and "PNG or JPEG" in message


def test_text_file(tmp_path):
    (tmp_path / "notes.txt").write_text("a photo of a cat\n")
    assert "not an image file" in load_refused(tmp_path / "notes.txt")


def test_truncated_png(tmp_path):
    Image.fromarray(random_rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    message = load_refused(tmp_path / "half.png")
    assert "truncated" in message and "re-export or re-download" in message


def test_a_file_that_may_not_be_read_is_said_so_not_called_corrupt(tmp_path, monkeypatch):
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / "locked.png")

    def refused(*_args, **_kwargs):  # as for a chmod 000 file (root reads it anyway: not made by chmod here)
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.png"))

    monkeypatch.setattr(Image, "open", refused)
    message = load_refused(tmp_path / "locked.png")
    assert "permission denied; make it readable (chmod u+r" in message and "corrupt" not in message


def test_corrupt_pixel_data_in_a_valid_header(tmp_path):
    Image.fromarray(random_rgb(32, 32)).save(tmp_path / "full.png")
    data = bytearray((tmp_path / "full.png").read_bytes())
    data[60:200] = bytes(140)  # inside the compressed IDAT stream
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert "cannot read" in load_refused(tmp_path / "bad.png")


def test_a_decoder_error_without_a_message_is_said_by_its_kind():
    """Some of Pillow's plugins raise a bare EOFError: its kind is said where the reason goes, not an empty "()"."""
    image = Image.fromarray(random_rgb(8, 8))

    def cut_off():
        raise EOFError

    image.load = cut_off
    assert "the image data is corrupt or truncated (EOFError); re-export" in load_refused(image)


def test_an_animation_closed_by_its_with_block_says_so(tmp_path):
    first, second = Image.new("RGB", (9, 8), (255, 0, 0)), Image.new("RGB", (9, 8), (0, 0, 255))
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second])
    with Image.open(tmp_path / "anim.gif") as animation:
        pass
    assert "closed" in load_refused(animation)  # was a raw ValueError from its frame count


def test_a_pil_image_closed_by_close_says_so(tmp_path):
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / "x.png")
    image = Image.open(tmp_path / "x.png")
    image.close()
    assert "was closed (.close()) before its pixels were read" in load_refused(image)


def test_a_png_with_a_corrupt_header_is_not_called_an_unknown_format_only(tmp_path):
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / "x.png")
    data = bytearray((tmp_path / "x.png").read_bytes())
    data[12:16] = b"XXXX"  # the IHDR chunk's name
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert "or one whose header is corrupt" in load_refused(tmp_path / "bad.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_a_named_pipe_is_refused_without_being_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # reading it would block until a writer came
    assert "is not a regular file" in load_refused(tmp_path / "pipe.png")


def test_unsupported_source_type():
    assert "file path, a PIL image or a numpy array" in load_refused(42)
    # Path() would fold a URL into "image not found: https:/example.com/x.png"; its mask would be dropped unsaid.
    assert load_refused("https://example.com/x.png") == ("https://example.com/x.png is a URL: the engine reads "
                                                         "local files only; download it first")
    masked = np.ma.masked_array(np.zeros((40, 40, 3), np.uint8), mask=False)
    assert "masked array" in load_refused(masked) and "filled" in load_refused(masked)


def test_a_path_from_the_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "photo.png")
    assert load_image("~/photo.png").shape == (30, 40, 3) and load_image(Path("~/photo.png")).shape == (30, 40, 3)
    # A folder named ~ here, as a shell reads ./~/: pathlib writes it ~/, which expanduser took for the home folder.
    (tmp_path / "here" / "~").mkdir(parents=True)
    Image.new("RGB", (40, 30), (4, 5, 6)).save(tmp_path / "here" / "~" / "photo.png")
    monkeypatch.chdir(tmp_path / "here")
    assert load_image("./~/photo.png")[0, 0].tolist() == [4, 5, 6]
    assert file_argument("./~/out.png") == tmp_path / "here" / "~" / "out.png"
    # Path.expanduser's RuntimeError was a traceback.
    assert load_refused("~no-such-user-zone/photo.png") == ("~no-such-user-zone/photo.png: the home folder of "
                                                             "~no-such-user-zone is not known here (no such user, or "
                                                             "HOME is not set); write the path in full")


# ---------------------------------------------------------------------------------------------------
# Size limits
# ---------------------------------------------------------------------------------------------------


def test_tiny_file_is_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    message = load_refused(tmp_path / "tiny.png")
    assert "image is 4x4; at least 8 pixels per side are needed" in message


def test_tiny_array_reports_width_by_height():
    assert "image is 9x5" in load_refused(np.zeros((5, 9, 3), dtype=np.uint8))


def test_over_limit_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(image_io, "MAX_PIXELS", 100)
    Image.new("RGB", (16, 16)).save(tmp_path / "big.png")
    message = load_refused(tmp_path / "big.png")
    assert "16x16" in message and "downscale" in message


def test_an_image_of_exactly_the_limit_is_taken(monkeypatch):
    monkeypatch.setattr(image_io, "MAX_PIXELS", 16 * 16)
    assert load_quietly(np.zeros((16, 16, 3), dtype=np.uint8)).shape == (16, 16, 3)
    assert "16x17" in load_refused(np.zeros((17, 16, 3), dtype=np.uint8))


def test_a_name_of_exactly_the_file_systems_limit_is_taken():
    from zone_engine.paths import NAME_MAX, name_problem

    assert name_problem(Path("a" * NAME_MAX)) is None
    assert "256 bytes long, over the 255" in name_problem(Path("a" * (NAME_MAX + 1)))


def test_a_file_that_cannot_be_overwritten_is_said_before_the_edit(tmp_path, monkeypatch):
    from zone_engine import paths

    (tmp_path / "edited.png").write_bytes(b"")
    real_access = os.access
    monkeypatch.setattr(paths.os, "access", lambda path, mode: Path(path).name != "edited.png" and real_access(
        path, mode))  # read-only for this process (root may write anything, so the test says it)
    with pytest.raises(OutputError, match="edited.png: it exists and cannot be overwritten"):
        check_output_file(tmp_path / "edited.png", "output")


def test_only_formats_that_drop_it_are_said_to_lose_the_colour_profile(tmp_path):
    profile = bytes(16) + b"RGB " + b"a camera's profile"
    for suffix in (".png", ".jpg", ".webp", ".tif", ".xyz"):  # .xyz: no format at all, nothing to say
        assert not [note for note in image_io.output_notes(tmp_path / f"x{suffix}", profile) if "profile" in note]
    assert "BMP cannot carry the input's colour profile" in image_io.output_notes(tmp_path / "x.bmp", profile)[0]


def test_over_limit_pil_image_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    monkeypatch.setattr(image_io, "MAX_PIXELS", 100)
    Image.new("RGB", (16, 16)).save(tmp_path / "big.png")
    with Image.open(tmp_path / "big.png") as image:
        monkeypatch.setattr(image, "load", lambda: pytest.fail("decoded before its size was checked"))
        assert "16x16" in load_refused(image)


def test_over_limit_array_is_refused(monkeypatch):
    monkeypatch.setattr(image_io, "MAX_PIXELS", 100)
    assert "downscale" in load_refused(np.zeros((16, 16, 3), dtype=np.uint8))


def test_pil_decompression_bomb_becomes_our_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL refuses above 2 x 50
    Image.new("RGB", (16, 16)).save(tmp_path / "bomb.png")
    assert "downscale" in load_refused(tmp_path / "bomb.png")


def test_pil_bomb_warning_does_not_leak_below_our_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL warns at 81 > 50; ours is 100 M
    Image.new("RGB", (9, 9)).save(tmp_path / "fine.png")
    assert_rgb(load_quietly(tmp_path / "fine.png"), 9, 9)


# ---------------------------------------------------------------------------------------------------
# Numpy inputs
# ---------------------------------------------------------------------------------------------------


def test_uint8_rgb_array_is_copied():
    pixels = random_rgb(8, 10)
    loaded = load_quietly(pixels)
    np.testing.assert_array_equal(loaded, pixels)
    loaded[0, 0] = 7
    assert not np.shares_memory(loaded, pixels)


@pytest.mark.parametrize("shape", [(8, 10), (8, 10, 1)])
def test_uint8_gray_array(shape):
    gray = RNG.integers(0, 256, size=shape, dtype=np.uint8)
    loaded = load_quietly(gray)
    assert_rgb(loaded, 8, 10)
    np.testing.assert_array_equal(loaded, np.repeat(gray.reshape(8, 10, 1), 3, axis=2))


def test_uint8_rgba_array_composites():
    rgba = np.dstack([np.full((8, 8, 3), 200, dtype=np.uint8), np.full((8, 8), 255, dtype=np.uint8)])
    np.testing.assert_array_equal(load_quietly(rgba), 200)
    rgba[0, 0, 3] = 254  # the least transparency there is: still some
    with pytest.warns(UserWarning, match="transparency"):
        load_image(rgba)
    rgba[..., 3] = 0
    with pytest.warns(UserWarning, match="transparency"):
        np.testing.assert_array_equal(load_image(rgba), 0)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1), (8, 8, 3), (8, 8, 4)])
def test_uint16_array_keeps_the_high_byte(shape):
    values = np.full(shape, 65535, dtype=np.uint16)
    values[0, 0] = 511
    if shape[-1] == 4:
        values[0, 0, 3] = 65535  # keep the alpha channel opaque
    loaded = load_quietly(values)
    assert_rgb(loaded, 8, 8)
    np.testing.assert_array_equal(loaded[0, 0], [1, 1, 1])
    assert (loaded[1:] == 255).all()


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_uint16_array_of_eight_bit_values_is_read_as_such_and_says_so(dtype):
    values = RNG.integers(0, 256, size=(8, 8, 3)).astype(dtype)  # e.g. np.array(img, dtype=np.uint16)
    with pytest.warns(UserWarning, match="16-bit pixels all at most 255: read as 8-bit values"):
        np.testing.assert_array_equal(load_image(values), values)
    np.testing.assert_array_equal(load_quietly(np.zeros((8, 8, 3), dtype)), 0)  # black at any depth: no guess


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint32])
def test_integer_arrays_of_eight_bit_values_are_read_quietly(dtype):
    values = RNG.integers(0, 128, size=(8, 8, 3)).astype(dtype)  # e.g. np.array(img).astype(int)
    np.testing.assert_array_equal(load_quietly(values), values)


@pytest.mark.parametrize("bad", [-1, 65536])
def test_integer_arrays_beyond_sixteen_bits_are_refused(bad):
    values = np.zeros((8, 8, 3), dtype=np.int64)
    values[0, 0, 0] = bad
    assert f"integer pixels in {min(bad, 0)}..{max(bad, 0)}, outside 0..65535" in load_refused(values)


def test_twelve_bit_values_are_read_as_sixteen_bit_and_called_nearly_black():
    values = np.full((8, 8), 4095, dtype=np.uint16)
    with pytest.warns(UserWarning, match="at most 4095: read as 16-bit values, the image is nearly black"):
        np.testing.assert_array_equal(load_image(values), 15)
    np.testing.assert_array_equal(load_quietly(np.full((8, 8), 4096, dtype=np.uint16)), 16)  # 13 bits: said nothing


def test_one_rule_for_a_sixteen_bit_image_in_modes_i_and_i16():
    """Pillow opens a 16-bit gray PNG in mode I;16 or I by version: both read alike, and like the array."""
    for high in (200, 65535):
        values = np.zeros((8, 8), dtype=np.uint16)
        values[0, 0] = high
        as_i16 = Image.fromarray(values)
        as_i = Image.fromarray(values.astype(np.int32), "I")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = [load_image(source) for source in (as_i16, as_i, values)]
        assert as_i16.mode == "I;16" and loaded[0][0, 0, 0] == (200 if high == 200 else 255)
        for other in loaded[1:]:
            np.testing.assert_array_equal(other, loaded[0])


def test_sixteen_bit_gray_png_with_a_transparent_value_drops_it(tmp_path):
    values = np.full((8, 8), 65535, dtype=np.uint16)
    values[0, 0] = 4096
    Image.fromarray(values).save(tmp_path / "t16.png", transparency=4096)
    assert image_header(tmp_path / "t16.png").info["transparency"] == 4096
    with pytest.warns(UserWarning, match="transparency"):
        loaded = load_image(tmp_path / "t16.png")
    assert loaded[0, 0].max() == 0 and loaded[1:].min() == 255


@pytest.mark.parametrize(
    ("array", "hint"),
    [(np.zeros((3, 16, 16), dtype=np.uint8), "array.transpose(1, 2, 0)"),
     (np.zeros((3, 16, 5), dtype=np.uint8), "array.transpose(1, 2, 0)"),
     (np.zeros((1, 16, 16), dtype=np.uint8), "array.transpose(1, 2, 0)"),
     (np.zeros((1, 16, 16, 3), dtype=np.uint8), "array[0]"),
     (np.zeros((16, 16), dtype=bool), "mask.astype(np.uint8) * 255")],
    ids=["channels first", "channels first, 5 wide", "one channel first", "batch of one", "bool mask"],
)
def test_arrays_in_other_libraries_layouts_are_refused_with_what_to_do(array, hint):
    assert hint in load_refused(array)


def test_a_torch_tensor_is_refused_with_how_to_convert_it():
    """The conversion for its own layout: following the (3, H, W) one for another layout was another error."""
    torch = pytest.importorskip("torch")
    for shape, conversion in (((3, 16, 16), "tensor.permute(1, 2, 0).cpu().numpy()"),
                              ((1, 16, 16), "tensor.permute(1, 2, 0).cpu().numpy()"),
                              ((16, 16, 3), "tensor.cpu().numpy()"), ((1, 3, 16, 16), "tensor[0].permute(1, 2, 0)")):
        tensor = torch.rand(shape)
        said = load_refused(tensor)
        assert conversion in said, (shape, said)
        conversion = said.split("as an array: ")[1].removesuffix(")")
        load_image(eval(conversion, {"tensor": tensor}))  # what it says works


def test_bytes_are_refused_with_how_to_pass_a_path_or_a_files_contents(tmp_path):
    """b"photo.png" (a path, as os functions take it) and a file's bytes were both told to "pass a file path"."""
    save_image(random_rgb(8, 8), tmp_path / "x.png")
    for source in (os.fsencode(tmp_path / "x.png"), (tmp_path / "x.png").read_bytes()):
        said = load_refused(source)
        assert "os.fsdecode(path)" in said and "PIL.Image.open(io.BytesIO(data))" in said
    load_image(os.fsdecode(os.fsencode(tmp_path / "x.png")))
    load_image(Image.open(io.BytesIO((tmp_path / "x.png").read_bytes())))  # what it says works


def test_an_open_file_is_refused_with_how_to_read_it(tmp_path):
    """A download's BytesIO or an open() file: told only to "pass a file path, a PIL image or a numpy array"."""
    save_image(random_rgb(8, 8), tmp_path / "x.png")
    with open(tmp_path / "x.png", "rb") as file:
        for source in (file, io.BytesIO(file.read())):
            assert "(an open file's image: PIL.Image.open(file))" in load_refused(source)
            source.seek(0)
            load_image(Image.open(source))  # what it says works


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # numpy's about np.matrix itself
def test_numpy_matrix_is_read_as_a_plain_array():
    gray = RNG.integers(0, 256, size=(8, 8)).astype(np.uint8)
    np.testing.assert_array_equal(load_quietly(np.asmatrix(gray))[..., 0], gray)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_array_in_unit_range(dtype):
    values = np.zeros((8, 8, 3), dtype=dtype)
    values[0, 0] = (1.0, 0.5, 0.25)
    loaded = load_quietly(values)
    assert_rgb(loaded, 8, 8)
    np.testing.assert_array_equal(loaded[0, 0], [255, 128, 64])


def test_non_contiguous_array_gives_contiguous_result():
    pixels = random_rgb(10, 12)
    assert_rgb(load_quietly(pixels.transpose(1, 0, 2)), 12, 10)
    assert_rgb(load_quietly(pixels[::-1, ::-1]), 10, 12)


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros(64, dtype=np.uint8), "shape (64,)"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "shape (2, 8, 8, 3)"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "shape (8, 8, 2)"),
        (np.zeros((8, 8, 5), dtype=np.uint8), "shape (8, 8, 5)"),
        (np.zeros((8, 8), dtype=bool), "dtype bool"),
        (np.full((8, 8, 3), -0.1, dtype=np.float32), "[0, 1]"),
        (np.full((8, 8, 3), 1.5, dtype=np.float32), "[0, 1]"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), "finite"),
        (np.full((8, 8, 3), 255.0, dtype=np.float64), "[0, 1]"),
    ],
    ids=["1d", "4d", "2ch", "5ch", "bool", "negative", "above-one", "nan", "0-255-float"],
)
def test_rejected_arrays_name_what_was_received(array, words):
    message = load_refused(array)
    assert words in message and "accepted" in message


# ---------------------------------------------------------------------------------------------------
# Working geometry
# ---------------------------------------------------------------------------------------------------

GEOMETRY_CASES = [
    # (H, W) -> scaled (H, W), padded (H, W), pad_top, pad_left
    ((512, 512), (512, 512), (512, 512), 0, 0),
    ((600, 400), (512, 341), (512, 352), 0, 5),
    ((400, 600), (341, 512), (352, 512), 5, 0),
    ((100, 37), (100, 37), (128, 64), 14, 13),
    ((1024, 2048), (256, 512), (256, 512), 0, 0),
    ((33, 33), (33, 33), (64, 64), 15, 15),
    ((513, 513), (512, 512), (512, 512), 0, 0),
    ((767, 1023), (383, 512), (384, 512), 0, 0),
    ((1000, 8), (512, 4), (512, 32), 0, 14),
    ((300, 500), (300, 500), (320, 512), 10, 6),
    ((8, 8), (8, 8), (32, 32), 12, 12),
    ((8, 10000), (1, 512), (32, 512), 15, 0),  # 8 * 512 / 10000 truncates to 0 rows: kept at 1
]
GEOMETRY_IDS = [f"{h}x{w}" for (h, w), *_ in GEOMETRY_CASES]


@pytest.mark.parametrize(("size", "scaled", "padded", "top", "left"), GEOMETRY_CASES, ids=GEOMETRY_IDS)
def test_working_geometry(size, scaled, padded, top, left):
    assert working_geometry(*size) == Geometry(size, scaled, padded, top, left)


@pytest.mark.parametrize(("size", "scaled", "padded", "top", "left"), GEOMETRY_CASES, ids=GEOMETRY_IDS)
def test_geometry_invariants(size, scaled, padded, top, left):
    geometry = working_geometry(*size)
    assert max(geometry.scaled_size) == min(max(size), 512)
    for axis, pad_before in enumerate((geometry.pad_top, geometry.pad_left)):
        total = geometry.padded_size[axis] - geometry.scaled_size[axis]
        assert geometry.padded_size[axis] % 32 == 0 and 0 <= total < 32
        assert pad_before == total // 2  # an odd pixel goes after


@pytest.mark.parametrize(("size", "scaled", "padded", "top", "left"), GEOMETRY_CASES, ids=GEOMETRY_IDS)
def test_a_threshold_of_the_levels_at_the_input_size_is_the_mask_at_the_input_size(size, scaled, padded, top, left):
    """EditResult.difference: thresholding it at the input size gives what thresholding at the working size and
    enlarging the mask gives (M_b), for every threshold -- a bicubic enlargement would not."""
    geometry = working_geometry(*size)
    levels = np.random.default_rng(1).integers(0, 256, size=padded, dtype=np.uint8)
    at_input = levels_to_input_size(levels, geometry)
    assert at_input.shape == size and at_input.dtype == np.uint8
    assert at_input.flags.writeable  # an array of its own, as to_input_size's (numpy's view of a Pillow image is not)
    for threshold in (1, 54, 128, 255):
        np.testing.assert_array_equal(at_input < threshold,
                                      to_input_size(levels < threshold, geometry, is_mask=True))


def test_geometry_options():
    geometry = working_geometry(600, 400, max_side=256, multiple=8)
    assert geometry.scaled_size == (256, 170) and geometry.padded_size == (256, 176)
    with pytest.raises(ValueError):
        working_geometry(0, 10)


@pytest.mark.parametrize(("size", "scaled", "padded", "top", "left"), GEOMETRY_CASES, ids=GEOMETRY_IDS)
def test_to_working_pads_black_around_the_shrunk_image(size, scaled, padded, top, left):
    image = random_rgb(*size, low=1)  # no black pixels, so padding is recognisable
    geometry = working_geometry(*size)
    working = to_working(image, geometry)
    assert working.shape == (*padded, 3) and working.dtype == np.uint8

    expected = image
    if scaled != size:
        expected = np.asarray(Image.fromarray(image).resize(scaled[::-1], Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(crop_padding(working, geometry), expected)
    np.testing.assert_array_equal(working[top : top + scaled[0], left : left + scaled[1]], expected)

    padding = np.ones(padded, dtype=bool)
    padding[top : top + scaled[0], left : left + scaled[1]] = False
    assert (working[padding] == 0).all()


@pytest.mark.parametrize(("size", "scaled", "padded", "top", "left"), GEOMETRY_CASES, ids=GEOMETRY_IDS)
def test_to_input_size_returns_input_shape(size, scaled, padded, top, left):
    geometry = working_geometry(*size)
    working = to_working(random_rgb(*size), geometry)
    image = to_input_size(working, geometry, is_mask=False)
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    mask = to_input_size(working[..., 0] > 127, geometry, is_mask=True)
    assert mask.shape == size and mask.dtype == bool


@pytest.mark.parametrize("size", [(100, 37), (33, 33), (512, 512), (300, 500)])
def test_round_trip_is_exact_without_shrink(size):
    image = random_rgb(*size)
    geometry = working_geometry(*size)
    back = to_input_size(to_working(image, geometry), geometry, is_mask=False)
    np.testing.assert_array_equal(back, image)
    mask = image[..., 0] > 127
    padded_mask = np.zeros(geometry.padded_size, dtype=bool)
    padded_mask[geometry.pad_top :, geometry.pad_left :][: size[0], : size[1]] = mask
    np.testing.assert_array_equal(to_input_size(padded_mask, geometry, is_mask=True), mask)


def test_mask_upscale_is_nearest():
    geometry = working_geometry(1024, 1024)  # exactly 2x shrink, no padding
    small = RNG.random((512, 512)) > 0.5
    big = to_input_size(small, geometry, is_mask=True)
    np.testing.assert_array_equal(big, np.repeat(np.repeat(small, 2, axis=0), 2, axis=1))
    # At 1.5x a bilinear resize thresholded at half differs (at 2x it cannot): Pillow's nearest, its own
    # rounding of the source positions included (a position computed exactly is off by one in 99 of 768).
    nearest = Image.fromarray(small.astype(np.uint8)).resize((768, 768), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(to_input_size(small, working_geometry(768, 768), is_mask=True),
                                  np.asarray(nearest).astype(bool))


def test_uint8_mask_counts_nonzero_as_true():
    geometry = working_geometry(32, 32)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[3, 4] = 255
    mask[5, 6] = 1
    back = to_input_size(mask, geometry, is_mask=True)
    assert back.dtype == bool and back.sum() == 2
    # Any dtype's nonzero: a float mask's 0.5 and 256 in 16 bits too (a cast to uint8 made them 0).
    for other in (mask * 0.5 / 255, mask.astype(np.uint16) * 256):
        assert to_input_size(other, geometry, is_mask=True).sum() == 2


def test_shape_mismatches_are_bugs():
    geometry = working_geometry(100, 37)
    with pytest.raises(ValueError):
        to_working(random_rgb(37, 100), geometry)
    with pytest.raises(ValueError):
        to_working(random_rgb(100, 37).astype(np.float32), geometry)
    with pytest.raises(ValueError):
        crop_padding(np.zeros((100, 37)), geometry)
    with pytest.raises(ValueError, match="expected a uint8 image"):
        to_input_size(np.zeros((128, 64, 3), np.float32), geometry, is_mask=False)


# ---------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------


def test_save_rgb_round_trip_creates_folders(tmp_path):
    pixels = random_rgb(9, 13)
    path = tmp_path / "out" / "nested" / "edited.png"
    save_image(pixels, path)
    np.testing.assert_array_equal(load_quietly(path), pixels)


def test_save_masks(tmp_path):
    mask = RNG.random((9, 13)) > 0.5
    save_image(mask, tmp_path / "mask.png")
    saved = Image.open(tmp_path / "mask.png")
    assert saved.mode == "L"
    np.testing.assert_array_equal(np.asarray(saved), mask.astype(np.uint8) * 255)
    save_image(mask.astype(np.uint8) * 7, tmp_path / "labels.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "labels.png")), mask * 7)


def test_png_is_written_at_zlibs_fastest_level(tmp_path):
    """Level 1, not Pillow's default 6: a 12 MP photo's edit is written several times as fast (RESULTS.md)."""
    save_image(random_rgb(8, 8), tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    zlib_header = data[data.index(b"IDAT") + 4 :][:2]
    assert zlib_header[1] >> 6 == 0  # FLEVEL (RFC 1950): 0 for zlib's levels 0 and 1, 2 for its default 6


def test_save_without_suffix_writes_png(tmp_path):
    save_image(random_rgb(8, 8), tmp_path / "result")
    assert image_header(tmp_path / "result").format == "PNG"


@pytest.mark.parametrize("name", ["file.txt/out.png", "out.unknownext"])
def test_unwritable_path_is_a_zone_error(tmp_path, name):
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write") as caught:
        save_image(random_rgb(8, 8), tmp_path / name)
    assert not isinstance(caught.value, InputImageError)


def test_a_failed_write_keeps_the_old_file_whole_and_leaves_no_partial_one(tmp_path, monkeypatch):
    """A full disk or a size limit mid-write: the file that was there stays, not a truncated PNG."""
    target = tmp_path / "edited.png"
    old = random_rgb(16, 16)
    save_image(old, target)

    real_save = Image.Image.save

    def write_half_then_fail(image, path, format=None, **options):
        if isinstance(path, io.BytesIO):  # check_output_format's one-pixel probe
            return real_save(image, path, format=format, **options)
        with open(path, "wb") as file:
            file.write(b"\x89PNG\r\n\x1a\n half")
        raise OSError(27, "File too large", str(path))

    monkeypatch.setattr(Image.Image, "save", write_half_then_fail)
    with pytest.raises(OutputError, match="cannot write .*File too large") as caught:
        save_image(random_rgb(16, 16), target)
    assert "partial" not in str(caught.value)  # the temporary file is ours, not the user's to hear of
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(Image.open(target)), old)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["edited.png"]


@pytest.mark.parametrize("stem", ["a" * 251, "é" * 125])
def test_an_output_named_up_to_255_bytes_is_written(tmp_path, stem):
    """The checks pass a name of 255 bytes; its temporary file, 15 bytes longer, was "File name too long" after
    the edit. Its stem is shortened (whole characters), the file written under the name asked."""
    target = tmp_path / os.fsdecode(f"{stem}.png".encode())  # as argv gives it (LC_ALL=C: its UTF-8 bytes escaped)
    assert len(os.fsencode(target.name)) in (254, 255)
    save_image(random_rgb(8, 8), target)
    assert [path.name for path in tmp_path.iterdir()] == [target.name]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_refuses_files_is_refused_before_any_work():
    """/proc: os.access says root may write there, creating a file fails; found by trying, not after an edit."""
    with pytest.raises(OutputError, match=r"cannot write in /proc \(no new file can be made there\);"):
        check_output_file(Path("/proc/edited.png"), "output")


def test_a_folder_that_permissions_allow_but_refuses_files_is_found_by_the_probe(tmp_path, monkeypatch):
    """A read-only mount as root: os.access says yes, creating a file says no (EROFS)."""
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "access", lambda *args: True)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(OutputError, match="cannot write in .*Read-only file system"):
        check_output_file(tmp_path / "edited.png", "output")


@pytest.mark.parametrize(
    ("array", "words"),
    [(np.zeros((8, 8, 3), dtype=np.float32), "shape (8, 8, 3) and dtype float32"),
     (np.zeros((8, 8, 4), dtype=np.uint8), "shape (8, 8, 4)"),
     (np.zeros((8, 8, 3), dtype=bool), "dtype bool"),
     (None, "a NoneType"), (7, "an int"),
     (types.SimpleNamespace(image=np.zeros((8, 8, 3), dtype=np.uint8)), "(an edit's result: pass its .image)")],
    ids=["float", "rgba", "bool rgb", "none", "int", "result"],
)
def test_save_refuses_what_is_not_an_image_and_writes_nothing(tmp_path, array, words):
    with pytest.raises(OutputError, match="cannot save") as caught:
        save_image(array, tmp_path / "x.png")
    assert words in str(caught.value) and not list(tmp_path.iterdir())


class _BytesPath:
    """A path-like whose os.fspath is bytes, as the entries of os.scandir(b".") are."""

    def __fspath__(self) -> bytes:
        return b"x.png"


@pytest.mark.parametrize(
    ("name", "words"),
    [("", "no output path given"), ("input.png/x.png", "input.png is a file, not a folder"),
     ("x.xyz", ".xyz is no image format's suffix"), (b"x.png", "a str or pathlib.Path, not a bytes"),
     (_BytesPath(), "a str or pathlib.Path, not a _BytesPath"),
     (None, "not a NoneType"), (".", "names a folder; name the file to write in it, such as edited.png"),
     ("new/", "new/: it names a folder"), ("a" * 300 + ".png", "a name in it is 304 bytes long")],
    ids=["empty", "under a file", "unknown suffix", "bytes", "bytes path-like", "none", "a folder", "trailing slash",
         "name over 255 bytes"],
)
def test_save_to_an_unusable_path_says_why(tmp_path, monkeypatch, name, words):
    """A bytes or None path was a TypeError from pathlib, "." an OSError's "empty name", and "new/" a file `new`."""
    monkeypatch.chdir(tmp_path)
    save_image(random_rgb(8, 8), "input.png")
    with pytest.raises(OutputError, match="no output path|cannot write|save_image writes") as caught:
        save_image(random_rgb(8, 8), name)
    assert words in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.png"]


def test_save_expands_the_home_folder_as_reading_does(tmp_path, monkeypatch):
    """edit() reads `~/x.png` from the home folder; save_image wrote it into a new folder named `~` here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    save_image(random_rgb(8, 8), "~/out/x.png")
    assert (tmp_path / "home" / "out" / "x.png").is_file() and not (tmp_path / "~").exists()


def test_save_under_a_dangling_link_says_where_it_points(tmp_path):
    """save_image checks its folder as the command line checks an output's: it said "File exists"."""
    (tmp_path / "masks").symlink_to(tmp_path / "gone")
    with pytest.raises(OutputError, match=r"cannot write .*masks is a symbolic link to .*gone, which is not there"):
        save_image(random_rgb(8, 8), tmp_path / "masks" / "x.png")


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tiff", ".bmp", ".jp2", ".qoi", ".tga"])
def test_lossless_formats_keep_every_pixel(tmp_path, suffix):
    pixels = random_rgb(24, 40)  # noise: the worst case for a lossy encoder
    save_image(pixels, tmp_path / f"x{suffix}")
    np.testing.assert_array_equal(load_quietly(tmp_path / f"x{suffix}"), pixels)
    assert image_io.output_notes(tmp_path / f"x{suffix}") == []


def test_jpeg_is_written_at_high_quality_and_said_to_be_lossy(tmp_path):
    pixels = make_sample_image(64, 64)
    save_image(pixels, tmp_path / "x.JPG")
    error = np.abs(load_quietly(tmp_path / "x.JPG").astype(int) - pixels).mean()
    assert error < 2.0  # quality 95 without chroma subsampling: 0.95; Pillow's defaults (75, 4:2:0): 5.4
    assert "JPEG is lossy" in image_io.output_notes(tmp_path / "x.JPG")[0]


def test_the_input_colour_profile_is_carried_to_the_output(tmp_path):
    profile = rgb_profile()
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / "in.png", icc_profile=profile)
    assert image_io.colour_profile(tmp_path / "in.png") == profile
    for suffix in (".png", ".jpg", ".webp", ".tiff"):
        save_image(random_rgb(8, 8), tmp_path / f"out{suffix}", icc_profile=profile)
        assert image_header(tmp_path / f"out{suffix}").info.get("icc_profile") == profile, suffix
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / "plain.png")
    assert image_io.colour_profile(tmp_path / "plain.png") is None


def test_a_colour_profile_that_does_not_describe_rgb_is_not_carried(tmp_path):
    """A CMYK JPEG's profile (or a gray or Lab one) in the RGB output: invalid (PNG forbids it), misread."""
    Image.new("CMYK", (8, 8)).save(tmp_path / "cmyk.jpg", icc_profile=bytes(16) + b"CMYK" + b"a press profile")
    assert image_io.colour_profile(tmp_path / "cmyk.jpg") is None


@pytest.mark.parametrize(("suffix", "words"), [(".gif", "GIF keeps at most 256 colours"), (".avif", "AVIF is lossy"),
                                               (".mpo", "MPO is JPEG")])
def test_formats_that_change_the_pixels_are_said_to(tmp_path, suffix, words):
    pixels = random_rgb(24, 40)
    save_image(pixels, tmp_path / f"x{suffix}")
    assert not np.array_equal(load_quietly(tmp_path / f"x{suffix}"), pixels)  # the note's reason, measured
    assert words in image_io.output_notes(tmp_path / f"x{suffix}")[0]


def test_a_name_too_long_is_an_input_error_not_an_os_error(tmp_path):
    assert "over the 255 a file system takes" in load_refused(tmp_path / ("a" * 256 + ".png"))


def test_saving_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    """os.replace over the link replaced the link with the file and left its target as it was."""
    target, link = tmp_path / "target.png", tmp_path / "link.png"
    save_image(random_rgb(8, 8), target)
    link.symlink_to(target)
    pixels = random_rgb(8, 8)
    save_image(pixels, link)
    assert link.is_symlink() and np.array_equal(load_quietly(target), pixels)


def test_a_symlinks_format_is_its_targets(tmp_path):
    """`-o latest.png` linked to a .jpg wrote PNG bytes into the .jpg; its notes and checks now say the JPEG's."""
    link = tmp_path / "latest.png"
    link.symlink_to("shot.jpg")
    save_image(random_rgb(8, 8), link)
    assert image_header(tmp_path / "shot.jpg").format == "JPEG" and link.is_symlink()
    assert "JPEG is lossy" in image_io.output_notes(link)[0]
    # A name the system refuses is no link (pathlib's is_symlink raised ENAMETOOLONG): its notes are its suffix's.
    assert "JPEG is lossy" in image_io.output_notes(tmp_path / ("a" * 300 + ".jpg"))[0]
    (tmp_path / "mask.png").symlink_to("mask.pbm")
    with pytest.raises(OutputError, match=r"mask.png: \.pbm names a bitmap"):
        image_io.check_output_format(tmp_path / "mask.png")


@pytest.mark.parametrize(("suffix", "words"), [(".xbm", "cannot write RGB pixels as XBM"),
                                               (".h5", "HDF5 save handler not installed"),
                                               (".pbm", "names a bitmap or graymap"), (".PGM", "use .ppm")])
def test_a_format_pillow_lists_but_cannot_write_rgb_in_is_refused_up_front(tmp_path, suffix, words):
    """Pillow lists a writer for XBM (1-bit only) and HDF5 (a stub): zone edit ran the whole edit, then failed."""
    with pytest.raises(OutputError, match=words):
        image_io.check_output_format(tmp_path / f"x{suffix}")
    image_io.check_output_format(tmp_path / "x.xbm", mode="1")  # what it does hold
    image_io.check_output_format(tmp_path / "mask.pgm", mode="L")  # a mask is a graymap
    assert not list(tmp_path.iterdir())


def test_a_header_past_pillows_own_limit_is_said_with_its_size(tmp_path):
    """Pillow refuses it on opening, before its size can be read: the error said only "too large"."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # RGB; no pixel data needed
    (tmp_path / "huge.png").write_bytes(png_file(header, (b"IDAT", zlib.compress(b""))))
    assert "has 10,000,000,000 pixels; at most 100,000,000" in load_refused(tmp_path / "huge.png")


def test_an_eps_file_without_ghostscript_is_said_to_need_it_not_to_be_corrupt(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", False)  # as where Ghostscript is not installed
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: False)
    (tmp_path / "a.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n")
    said = load_refused(tmp_path / "a.eps")
    assert "reading EPS needs Ghostscript" in said and "corrupt" not in said


@pytest.mark.parametrize(("suffix", "largest"), [(".tga", 65535), (".pcx", 65534), (".pdf", 65500),
                                                  (".jpg", 65500), (".gif", 65535), (".webp", 16383)])
def test_each_formats_largest_side_is_said_before_the_edit(tmp_path, suffix, largest):
    """Measured with Pillow: one pixel more failed to encode (an OverflowError's traceback, for TGA and PCX)."""
    image_io.check_output_size(tmp_path / f"x{suffix}", 8, largest)
    with pytest.raises(OutputError, match=f"holds at most {largest} pixels a side"):
        image_io.check_output_size(tmp_path / f"x{suffix}", 8, largest + 1)


def test_the_small_helpers_say_an_argument_of_the_wrong_type(tmp_path):
    """A profile's name for its bytes and a size read as text were Pillow's and Python's TypeErrors ("a bytes-like
    object is required", "'>' not supported between 'int' and 'str'"); numpy's ints, as shapes give them, are ints."""
    for profile, named in (("srgb", "a str"), (tmp_path / "srgb.icc", "a PosixPath")):  # its file's path too
        with pytest.raises(OutputError, match=f"icc_profile is a colour profile's bytes .* not {named}"):
            save_image(random_rgb(8, 8), tmp_path / "x.png", icc_profile=profile)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(OutputError, match="takes the height and width as ints, got a str and an int"):
        image_io.check_output_size(tmp_path / "x.webp", "512", 512)
    # Each side, and a bool is no size (from a mutation audit: the height alone was checked, True taken for 1).
    for sides, named in (((512, "512"), "an int and a str"), ((True, 512), "a bool and an int")):
        with pytest.raises(OutputError, match=f"takes the height and width as ints, got {named}"):
            image_io.check_output_size(tmp_path / "x.webp", *sides)
    image_io.check_output_size(tmp_path / "x.webp", np.int64(512), 512)
    with pytest.raises(OutputError, match="holds at most"):
        image_io.check_output_size(tmp_path / "x.webp", np.int64(16384), 512)


def test_an_encoders_own_refusal_is_a_zone_error(tmp_path, monkeypatch):
    """A limit the checks do not know: the encoder's error (OverflowError here), said as the image's, no traceback."""
    real_save = Image.Image.save

    def overflow(image, path, *args, **kwargs):
        if isinstance(path, io.BytesIO):  # check_output_format's one-pixel probe
            return real_save(image, path, *args, **kwargs)
        raise OverflowError("size does not fit in an unsigned short")

    monkeypatch.setattr(Image.Image, "save", overflow)
    with pytest.raises(OutputError, match="cannot write .*x.tga: size does not fit"):
        save_image(random_rgb(8, 8), tmp_path / "x.tga")
    assert not list(tmp_path.iterdir())


def test_an_icon_is_refused_as_an_output_for_it_would_be_scaled(tmp_path):
    with pytest.raises(OutputError, match="ICO icons come in fixed sizes"):
        save_image(random_rgb(300, 280), tmp_path / "x.ico")  # Pillow wrote a 239x256 icon
    assert list(tmp_path.iterdir()) == []


def test_a_format_pillow_only_reads_is_refused_as_an_output(tmp_path):
    with pytest.raises(OutputError, match=r"\.psd is no image format's suffix Pillow writes"):
        save_image(random_rgb(8, 8), tmp_path / "x.psd")  # was Pillow's KeyError: 'PSD'


def test_reading_the_colour_profile_raises_no_bomb_warning_below_our_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL warns at 81 > 50; ours is 100 M
    Image.new("RGB", (9, 9)).save(tmp_path / "x.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_io.colour_profile(tmp_path / "x.png") is None


# ---------------------------------------------------------------------------------------------------
# Built-in sample
# ---------------------------------------------------------------------------------------------------


def test_sample_image_is_deterministic_and_varied():
    sample = make_sample_image()
    assert_rgb(sample, 256, 256)
    np.testing.assert_array_equal(sample, make_sample_image())
    assert len(np.unique(sample.reshape(-1, 3), axis=0)) > 50
    assert ((sample == (250, 210, 60)).all(axis=2)).any()  # the sun
    assert ((sample == (180, 50, 40)).all(axis=2)).any()  # the roof


@pytest.mark.parametrize("size", [(100, 300), (300, 100), (8, 8)])
def test_sample_image_any_size(size):
    sample = make_sample_image(*size)
    assert_rgb(sample, *size)
    np.testing.assert_array_equal(load_quietly(sample), sample)


def test_a_damaged_file_of_any_format_is_an_input_image_error_never_pillows_own(tmp_path):
    """A truncated multi-page TIFF was a TypeError, a fuzzed GIF an IndexError, a struct.error: tracebacks for a
    bad file (Pillow's parsers raise more than OSError)."""
    path, refused = tmp_path / "damaged", 0
    for name, data in damaged_image_files():
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a file that still decodes may warn (EXIF, frames)
                load_image(path)
        except InputImageError:
            refused += 1
        except Exception as error:
            pytest.fail(f"{name}: {type(error).__name__}: {error}")
    assert refused > len(damaged_image_files()) // 2  # most are refused: the damage is real


def test_two_threads_writing_one_path_at_once_both_succeed(tmp_path, monkeypatch):
    """save_image from two threads of one process (a service's "latest.png"): both wrote the same temporary file
    (named by the process alone), one's image in the other's file, and the later move failed, `cannot write
    latest.png: No such file or directory`. Each thread has its own temporary now."""
    target, meeting, real_save = tmp_path / "latest.png", threading.Barrier(2), Image.Image.save
    temporaries, failures = [], []

    def both_writing_at_once(image, path, format=None, **options):
        if not isinstance(path, io.BytesIO):  # not check_output_format's one-pixel probe
            temporaries.append(Path(path).name)
            meeting.wait(timeout=60)
        return real_save(image, path, format=format, **options)

    def write(pixels):
        try:
            save_image(pixels, target)
        except OutputError as error:
            failures.append(str(error))

    monkeypatch.setattr(Image.Image, "save", both_writing_at_once)
    threads = [threading.Thread(target=write, args=(np.full((8, 8, 3), value, np.uint8),)) for value in (10, 200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(set(temporaries)) == 2
    assert np.unique(np.asarray(Image.open(target))).tolist() in ([10], [200])  # one image, whole
    assert [path.name for path in tmp_path.iterdir()] == ["latest.png"]
