"""Per-stage wall-clock timings that are honest on asynchronous devices."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.profiler import record_function

RANGE_PREFIX = "zone."  # each stage is a profiler range named zone.<stage> (benchmarks/profile_edit.py)


class Stopwatch:
    """Accumulates seconds per named stage; synchronises CUDA so a stage's queued work counts to it.

    Each stage is also a `torch.profiler` range, closed after the synchronisation, so a profile
    attributes the stage's device work to it (with no profiler running, 9-12 us a range on the idle
    2-core CPU: eight an edit).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def copy(self) -> Stopwatch:
        """A stopwatch that goes on from this one's seconds, leaving them as they are."""
        other = Stopwatch(self.device)
        other.seconds = dict(self.seconds)
        return other

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        with record_function(RANGE_PREFIX + stage):
            try:
                yield
            finally:
                self._sync()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
