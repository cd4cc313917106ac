"""Progress bars on stderr: tqdm's, redrawn in place, on a terminal; elsewhere (`2> log`, nohup, systemd, cron) whole
lines now and then, as a log wants them. tqdm redrew its bar there too, with carriage returns: a log of a night's
batch held a few KB of CR-joined redraws per edit, one line to `less` and `grep`."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm

from .streams import is_terminal

# Seconds between two lines of a bar written to a log; a bar that ends sooner writes none (an edit on a GPU: its
# `[k/N]` and summary lines say it).
LOG_INTERVAL_S = 30.0
# tqdm.auto's bar is a notebook's widget under Jupyter, whose stderr is no terminal but shows the widget.
IN_NOTEBOOK = any(base.__module__ == "tqdm.notebook" for base in tqdm.__mro__)


def progress_bar(**options: Any) -> tqdm:
    """tqdm(**options) on a terminal or in a notebook (tqdm.auto's widget, not text on stderr); elsewhere a
    `LoggedProgress`, which writes whole lines."""
    if IN_NOTEBOOK or is_terminal(options.get("file") or sys.stderr):
        return tqdm(**options)
    return LoggedProgress(**options)


class LoggedProgress(text_tqdm):
    """A bar as lines for a log (`denoising: 40% (8/20 steps) in 01:02, 01:33 left, 0.13step/s`): one each
    LOG_INTERVAL_S at most while it runs, and its last when it ends, if it wrote any; none as it starts (or is
    reset), where nothing is done yet to say; never a carriage return."""

    def __init__(self, **options: Any) -> None:
        # miniters=1: the clock alone spaces the lines (tqdm's adaptive count would have its monitor thread print too).
        super().__init__(**{**options, "delay": LOG_INTERVAL_S, "mininterval": LOG_INTERVAL_S, "miniters": 1,
                            "smoothing": 0})

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None or not self.n:  # tqdm clearing its line (msg ""), or the bar's start
            return False
        self.fp.write(self._line() + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        if not self.disable and self.last_print_t >= self.start_t + self.delay and self.n != self.last_print_n:
            with self._lock:
                self.display()  # how it ended, where a line said how it went
        self.leave = False  # tqdm's own last line: its display clears nothing, and no newline follows
        super().close()

    def _line(self) -> str:
        shown = self.format_dict
        desc = shown["prefix"].removesuffix(": ")
        counted = "{n_fmt}/{total_fmt} {unit}s" if shown["total"] else "{n_fmt} {unit}s"
        percent = "{percentage:.0f}% (" + counted + ")" if shown["total"] else counted
        left = ", {remaining} left" if shown["total"] else ""
        return self.format_meter(**{**shown, "prefix": f"{desc}: " if desc else "",
                                    "bar_format": "{desc}" + percent + " in {elapsed}" + left + ", {rate_fmt}"})
