"""What an edit of a photo costs the host at the photo's own size, beside the models' work at 512.

    python -m zone_benchmarks.bench_photo                    # a 12 MP photo (3000x4000), 3 repeats
    python -m zone_benchmarks.bench_photo --size 2160x3840 --repeats 5
    python -m zone_benchmarks.bench_photo --device cuda      # the pipeline on a GPU: its blend stage there

`zone bench` edits a 512² image, so none of this shows there: reading the file, shrinking it to the
working size, and after the edit the resizes back to the input size, the composite (the `blend` stage,
with the heatmap) and writing the result. The image is the built-in picture with sensor-like noise
(Gaussian, sigma 4 levels: flat areas compress as no photo does), saved as JPEG quality 95; the edit is
the tiny test models' at 1 step (its denoising is not what is measured) on `--device` (on CUDA the styled
image and heatmap are enlarged on the device: pillow_resize.py). Each figure is the median of
`--repeats` after one warm-up. Writing the edit's result (the decoded photo outside the edit) is timed
for each format `zone edit -o` writes as the engine writes it (PNG at zlib level 1, WebP lossless, JPEG
quality 95 without chroma subsampling), and PNG at Pillow's default level 6 beside it: the ratio says what
level 1 saves, the size what it costs.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from zone_engine.cli import CommandParser, error_line
from zone_engine.config import MAX_PIXELS
from zone_engine.errors import ZoneError
from zone_engine.image_io import encoded, load_image, make_sample_image, to_working, working_geometry
from zone_engine.streams import stdout_kept

T = TypeVar("T")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m zone_benchmarks.bench_photo", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=_size, default=(3000, 4000), metavar="HxW",
                        help="the photo's height x width (default 3000x4000: 12 MP)")
    parser.add_argument("--device", default="cpu", help="where the pipeline runs: cpu (default) or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=3, metavar="N",
                        help="timed runs of each figure after a warm-up, their median reported (1..100; default 3)")
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= 100:  # as choices=range(1, 101), whose refusal listed all 100
        parser.error("--repeats must be between 1 and 100")
    return args


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW, such as 3000x4000") from None
    if min(height, width) < 64 or height * width > MAX_PIXELS:
        raise argparse.ArgumentTypeError(f"{text}: each side at least 64, at most {MAX_PIXELS:,} pixels in all")
    return height, width


def photo(height: int, width: int) -> np.ndarray:
    """The built-in picture with sensor-like noise: what a photo's pixels cost to resize and compress."""
    noise = np.random.default_rng(0).normal(0.0, 4.0, size=(height, width, 3))
    return np.clip(make_sample_image(height, width) + noise, 0, 255).astype(np.uint8)


def median_seconds(work: Callable[[], T], repeats: int) -> tuple[float, T]:
    """The median seconds of `work()` over `repeats` calls after a warm-up (first-call costs: allocation, a thread
    pool), and what its last call returned (an encoding's bytes: their size, without encoding once more)."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def rows(size: tuple[int, int], repeats: int, device: str = "cpu") -> list[tuple[str, float, str]]:
    """(what, median seconds, note) for each figure."""
    from zone_engine import ZonePipeline

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "photo.jpg"
        Image.fromarray(photo(*size)).save(path, quality=95)
        read, pixels = median_seconds(lambda: load_image(path), repeats)  # what an edit of the file works on
    measured = [("read (JPEG q95 decode, checks)", read, "")]
    geometry = working_geometry(*size)
    measured.append(("shrink to the working size", median_seconds(lambda: to_working(pixels, geometry), repeats)[0],
                     f"{size[1]}x{size[0]} -> {geometry.padded_size[1]}x{geometry.padded_size[0]}"))
    pipe = ZonePipeline.tiny(seed=0, device=device)
    config = pipe.default_config.replace(steps=1)
    blend, result = [], pixels
    for _ in range(repeats + 1):  # one result kept at a time: a 12 MP one holds some 200 MB
        edit = pipe.edit(pixels, "add a hat", config)
        blend.append(edit.timings["blend"])
        result = edit.image  # what is written: the decoded photo outside the edit
    measured.append(("blend stage (resizes back, composite, heatmap)", statistics.median(blend[1:]), f"on {device}"))
    default_png, default_bytes = median_seconds(lambda: _png_at_pillows_default(result), repeats)
    for file_format in ("PNG", "WEBP", "JPEG"):
        seconds, data = median_seconds(lambda: encoded(result, file_format), repeats)  # noqa: B023 (called at once)
        note = f"{len(data) / 1e6:.1f} MB"
        if file_format == "PNG":
            note += (f"; Pillow's default level 6: {default_png:.3f} s ({default_png / seconds:.2f}x level 1's), "
                     f"{len(default_bytes) / 1e6:.1f} MB")
        measured.append((f"write {file_format} as the engine does", seconds, note))
    return measured


def _png_at_pillows_default(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    height, width = args.size
    try:
        measured = rows(args.size, args.repeats, args.device)
    except ZoneError as error:  # a device this machine lacks
        print(error_line(error), file=sys.stderr)
        return 2
    print(f"A {width}x{height} photo, median of {args.repeats}:\n")
    print("| work | seconds | note |\n|---|---|---|")
    for what, seconds, note in measured:
        print(f"| {what} | {seconds:.3f} | {note} |")
    return 0


if __name__ == "__main__":
    with stdout_kept():  # a closed pipe (`| head`) or an ASCII locale: the table goes on, not a traceback
        raise SystemExit(main())
