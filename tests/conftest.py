"""Shared fixtures: tiny random models built in code, offline, once per session."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch

# Before a test module imports diffusers: zone_engine moves this checkout's root (`python -m pytest` puts it first
# on sys.path) after the installed packages, where kernels/ no longer shadows Hugging Face's `kernels`.
import zone_engine  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# onnxruntime writes a device id and a telemetry database under ~/.cache/Microsoft as it is imported (by the ONNX
# tests, by diffusers as a model loads): the suite left them in the contributor's home. `zone` turns it off itself
# (cli._quiet_libraries); set before any test module imports it. A 0 of yours is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# A ZONE_DISABLE_TRITON=1 left in a contributor's shell failed 12 kernel tests (the tests that need it set it).
os.environ.pop("ZONE_DISABLE_TRITON", None)
if not torch.cuda.is_available():
    # Without CUDA, Triton runs only interpreted: set before any test module imports the kernels, so a bare
    # `pytest` runs them as the README's command does (test modules collected early import them too). Set, not
    # defaulted: under a TRITON_INTERPRET=0 left in the shell 85 kernel tests failed with Triton's "0 active drivers".
    os.environ["TRITON_INTERPRET"] = "1"
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny_pipe():
    from zone_engine import ZonePipeline

    return ZonePipeline.tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_pipe):
    return tiny_pipe.models


def rgb_profile() -> bytes:
    """A real RGB ICC profile (littlecms' sRGB): the engine carries an input's profile only when it loads."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def image_header(path: str | os.PathLike):
    """The image file at `path` opened and closed again: its size, mode, format and info, read without its pixels
    (a bare `Image.open(path).size` left the file open, a ResourceWarning)."""
    from PIL import Image

    with Image.open(path) as image:
        return image


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (uint8): random low-resolution colours upsampled."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def damaged_image_files(count: int = 40) -> list[tuple[str, bytes]]:
    """Image files cut off or with a byte changed, `count` of each kind per format: what a failed download or a
    fuzzer sends. The formats whose parsers fail in their own ways (a multi-page TIFF's frame table, an animated
    GIF's, PNG's chunks, PPM's header, JPEG's markers)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(7)
    frames = [Image.fromarray(smooth_image(24, 32, seed)) for seed in range(3)]
    files = []
    for format, options in (("TIFF", {"save_all": True}), ("GIF", {"save_all": True}), ("PNG", {}),
                            ("PPM", {}), ("JPEG", {})):
        buffer = io.BytesIO()
        frames[0].save(buffer, format=format, append_images=frames[1:] if options else [], **options)
        whole = buffer.getvalue()
        for length in np.linspace(1, len(whole) - 1, count).astype(int):
            files.append((f"{format} cut at {length}", whole[:length]))
        for position in rng.integers(0, min(len(whole), 512), count):  # the headers and frame tables
            changed = bytearray(whole)
            changed[position] ^= int(rng.integers(1, 256))
            files.append((f"{format} byte {position} changed", bytes(changed)))
    return files


def assert_same_selection(found, expected) -> None:
    """Two `refine.Selection`s are the same: segment pixel for pixel, IoU exactly, segment count."""
    assert (found.iou, found.segment_count) == (expected.iou, expected.segment_count)
    assert (found.segment is None) == (expected.segment is None)
    if expected.segment is not None:
        assert found.segment.dtype == bool and np.array_equal(found.segment, expected.segment)


def dispatched_ops(call: Callable[[], object]) -> list[str]:
    """The names of the operators `call()` dispatches (aten and custom ops alike)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        call()
    return seen


def spy_calls(monkeypatch, module, *names: str) -> list[str]:
    """Replace `module`'s functions `names` by wrappers that record each call's name, then call through."""
    calls: list[str] = []
    for name in names:
        original = getattr(module, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def compiled_graph(function: Callable, *args) -> str:
    """The FX graph that torch.compile (fullgraph) traces from `function(*args)`, as text; the call runs."""
    graphs: list[str] = []

    def backend(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module

    torch.compile(function, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def rerun_compiled(test_file: str, class_name: str):
    """Run `class_name` of `test_file` again in a process with TRITON_INTERPRET=0 (kernels compiled).

    Under the interpreter a kernel module cannot also compile; the GPU classes check this run. The shell's
    PYTEST_ADDOPTS is not passed on: a `-k` there (meant for the session) deselected the class, and the rerun failed
    with "no tests ran"; a path there ran more than the class, a `--junitxml` replaced the session's report.
    """
    import subprocess
    import sys
    from pathlib import Path

    inherited = {name: value for name, value in os.environ.items() if name != "PYTEST_ADDOPTS"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{test_file}::{class_name}"],
        env={**inherited, "TRITON_INTERPRET": "0"}, cwd=Path(test_file).parents[1], capture_output=True, text=True,
    )


@pytest.fixture(scope="class")
def compiled_run(request):
    """Under the interpreter, run the requesting GPU class once more with the kernels compiled."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    return rerun_compiled(str(request.path), request.cls.__name__)


@pytest.fixture
def skip_if_compiled_elsewhere(compiled_run):
    """A GPU class in an interpreting process: its compiled rerun must pass, then this copy skips."""
    if compiled_run is not None:
        assert compiled_run.returncode == 0, compiled_run.stdout[-6000:] + compiled_run.stderr[-2000:]
        pytest.skip("this process interprets: the class passed compiled in a TRITON_INTERPRET=0 subprocess")
