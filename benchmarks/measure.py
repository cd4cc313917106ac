"""Measuring tools for the benchmarks: statistics, per-step clocks, peak memory, the machine, the floor.

Every clock here is honest on asynchronous devices: per-step marks are CUDA events on CUDA (read
after the edit's own synchronisation), host clocks elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import TypeVar

import numpy as np
import torch

from zone_engine.backends import current_device, resolve_device
from zone_engine.cli import error_line, signals_handled
from zone_engine.denoise import BatchDenoiser
from zone_engine.errors import ZoneError


def on_named_device(name: str, work: Callable[[torch.device], int]) -> int:
    """`work(device)`'s exit status, `name`'s device current while it runs (its streams, CUDA graphs and
    synchronisations are that GPU's, not cuda:0's); a device or provider this machine lacks is one `error:`
    line and 2. The micro-benchmarks' entry points."""
    try:
        device = resolve_device(name)
        with current_device(device):
            return work(device)
    except ZoneError as error:
        print(error_line(error), file=sys.stderr)
        return 2


def summarize(samples: list[float]) -> dict:
    """Median and spread of a list of seconds: median, min, max, q1, q3, n, and the samples."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None, "samples": []}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"n": int(values.size), "median": float(median), "min": float(values.min()),
            "max": float(values.max()), "q1": float(q1), "q3": float(q3), "samples": [float(v) for v in values]}


T = TypeVar("T")


def attempt(what: str, work: Callable[[], T],
            report: Callable[[str], None] = print) -> tuple[T | None, str | None]:
    """(work(), None), or (None, one line saying what failed) after giving `report` that line and the
    traceback: a part of a benchmark that fails (on a lent GPU, a path no CPU runs) costs its own rows,
    not the parts after it."""
    try:
        return work(), None
    except Exception as error:  # noqa: BLE001 - reported, and the benchmark goes on
        line = f"{what} failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        report(f"{line}\n{traceback.format_exc()}")
        return None, line


class OutOfTime(BaseException):
    """Raised inside a benchmark's work when its time is up (`Deadline.stop`). A BaseException, so that
    `attempt` never takes it for one row's failure."""


INTERRUPTED = "it was interrupted (Ctrl-C)"


class Deadline:
    """When a benchmark stops starting new work: once `seconds` have passed since it was made (None:
    never), or once `stop` was called (on SIGTERM or Ctrl-C, under `stopping_on_signals`). A device lease is short
    and a stage cut off by its `timeout` used to report nothing: now its finished edits are reported."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds
        self.reason: str | None = None  # why the time is up; None while it is not
        self._running = 0  # pieces of work under way (`run`), which `stop` interrupts

    def expired(self) -> bool:
        if self.reason is None and self.end is not None and time.monotonic() >= self.end:
            self.reason = f"its --time-limit of {self.seconds:g} s ran out"
        return self.reason is not None

    @property
    def ran_out(self) -> bool:
        """Whether its time limit is past (it may have been stopped by a signal before)."""
        return self.end is not None and time.monotonic() >= self.end

    def run(self, work: Callable[[], T]) -> T | None:
        """`work()`, or None: without running it once the time is up, or when the time ran out inside it."""
        if self.expired():
            return None
        try:
            self._running += 1  # inside the try: a signal just before it finds nothing running to interrupt
            return work()
        except OutOfTime as stop:
            self.reason = self.reason or str(stop)
            return None
        finally:
            self._running -= 1

    def stop(self, reason: str) -> None:
        """No work starts from now on; work under way is interrupted (OutOfTime, in this thread)."""
        self.reason = self.reason or reason
        if self._running:
            raise OutOfTime(reason)

    @contextlib.contextmanager
    def stopping_on_signals(self) -> Iterator[None]:
        """Inside, SIGTERM (what `timeout` sends first) and a first Ctrl-C call `stop`; a second Ctrl-C is
        a KeyboardInterrupt, as outside. Python runs the handler between two of its operations in the main
        thread, so work already launched (a kernel, a matmul) ends first. Elsewhere than in the main thread
        signals cannot be caught: nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        ctrl_c = []  # counted apart from `reason`: a time limit or SIGTERM may have set that first

        def interrupted(_signum: int, _frame: object) -> None:
            ctrl_c.append(True)
            if len(ctrl_c) > 1:
                raise KeyboardInterrupt
            self.stop(INTERRUPTED)

        with signals_handled({signal.SIGTERM: lambda _s, _f: self.stop("it was sent SIGTERM"),
                              signal.SIGINT: interrupted}):
            yield


def guarded(what: str, work: Callable[[], T]) -> T | None:
    """`work()`, or None after printing what failed and its traceback."""
    return attempt(what, work, lambda message: print(f"\n{message}", flush=True))[0]


# ------------------------------------------------------------------------------------------ per step


class StepClock:
    """Marks the start of a denoising loop and the end of each step; `seconds()` after the edit.

    On CUDA the marks are events recorded on the current stream (no synchronisation inside the
    loop); read them only after the device was synchronised (the Stopwatch does, after `denoise`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list = []

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._mark()]

    def tick(self, _index: int | None = None) -> None:
        self.marks.append(self._mark())

    def seconds(self) -> list[float]:
        if self.device.type == "cuda":
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


class StepTimedDenoiser:
    """Wraps any engine denoiser (the `Denoiser` protocol) to mark each step through its `on_step`.

    `runs` lists the size of every denoising loop since the last `runs.clear()`: 1 for a lone edit,
    B for a batch, so a caller can tell a batched loop from edits run one after another. Build it
    with `step_timed`, which keeps a batch denoiser's `denoise_batch` (and so the pipeline's
    `isinstance(denoiser, BatchDenoiser)` answer).
    """

    def __init__(self, denoiser, clock: StepClock) -> None:
        self.denoiser = denoiser
        self.clock = clock
        self.runs: list[int] = []

    def _ticking(self, on_step):
        self.clock.start()

        def tick(index: int) -> None:
            self.clock.tick(index)
            if on_step is not None:
                on_step(index)

        return tick

    def __call__(self, *args, on_step=None, **kwargs):
        self.runs.append(1)
        return self.denoiser(*args, on_step=self._ticking(on_step), **kwargs)


class BatchStepTimedDenoiser(StepTimedDenoiser):
    """`StepTimedDenoiser` of a batch denoiser: one mark per batched step (all B edits' step)."""

    def denoise_batch(self, inputs, *args, on_step=None, **kwargs):
        self.runs.append(len(inputs))
        return self.denoiser.denoise_batch(inputs, *args, on_step=self._ticking(on_step), **kwargs)


def step_timed(denoiser, clock: StepClock) -> StepTimedDenoiser:
    """`denoiser` with its steps marked on `clock`; a batch denoiser stays one (zone_engine.denoise.BatchDenoiser)."""
    wrapper = BatchStepTimedDenoiser if isinstance(denoiser, BatchDenoiser) else StepTimedDenoiser
    return wrapper(denoiser, clock)


# -------------------------------------------------------------------------------------------- memory


def process_peak_rss_bytes() -> int:
    """The process's peak resident set size so far (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated, or on the CPU the sampled process RSS.

    The CPU figure is the largest resident set seen by a 20 ms sampler while the block ran: it
    includes everything the process holds (model weights of every implementation too), so compare
    rows by their difference, not their ratio.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.02) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            current = _current_rss_bytes()
            if current is not None:
                self.peak_bytes = max(self.peak_bytes or 0, current)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    def report(self) -> dict:
        if self.device.type == "cuda":
            return {"bytes": self.peak_bytes, "kind": "cuda_max_memory_allocated",
                    "label": "peak CUDA memory allocated by PyTorch during the timed edits"}
        return {"bytes": self.peak_bytes, "kind": "process_rss_sampled",
                "label": "peak process RSS sampled every 20 ms during the timed edits (whole process)"}


# ------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    """What ran the benchmark: CPU, cores, library versions, and the device."""
    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **{name: _version(name) for name in ("diffusers", "transformers", "segment-anything", "numpy",
                                             "opencv-python-headless", "triton", "onnxruntime", "tensorrt")},
        "device": str(device),
        "device_name": _cpu_model(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_name=properties.name, device_memory_bytes=properties.total_memory,
                    device_capability=f"{properties.major}.{properties.minor}")
    return info


# --------------------------------------------------------------------------------------------- floor


def unet_flops_per_row(unet_config: dict, latent_size: tuple[int, int], context_dim: int) -> float:
    """FLOPs (2 x MAC) of one UNet row at `latent_size`, counted on a meta-device copy (no compute).

    Same counter as ZONE.md's cost model: 803.4 GFLOP for SD1.5 at a 64x64 latent.
    """
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        sample = torch.empty(1, unet.config.in_channels, *latent_size)
        context = torch.empty(1, 77, context_dim)
        timestep = torch.tensor(999)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(sample, timestep, encoder_hidden_states=context)
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 10, size: int | None = None) -> dict:
    """Measured dense matmul rate in `dtype` on random data: the best and the median of `repeats` products of
    `size`² operands (8192² on CUDA, 2048² elsewhere: large enough to reach the peak).

    A ceiling is the best the machine did: the floor uses `flops_per_s` (best); the median is kept
    beside it, and a large gap between the two says the machine was busy.
    """
    n = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - started)
    flops = 2 * n**3
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "flops_per_s": flops / min(times),
            "median_flops_per_s": flops / float(np.median(times))}

