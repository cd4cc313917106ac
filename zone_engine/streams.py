"""The standard streams as a `zone` command uses them: written paths on stdout as the file system's bytes, progress
lines and errors on stderr, and both outliving a reader that goes away or a descriptor closed before the start."""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from typing import Any


def to_dev_null(descriptor: int) -> None:
    """/dev/null on `descriptor`: what is written there from now on goes nowhere (its reader gone, or it was
    closed and a file opened later would take it)."""
    null = os.open(os.devnull, os.O_WRONLY)
    if null != descriptor:
        os.dup2(null, descriptor)
        os.close(null)


def print_path(path: os.PathLike) -> None:
    """A written file's path on stdout, for scripts: the bytes the file system has (a name that is not UTF-8
    could not be printed as text)."""
    buffer = getattr(sys.stdout, "buffer", None)
    try:
        if buffer is None:  # a text-only stream (a caller's io.StringIO)
            print(path)
            return
        sys.stdout.flush()
        buffer.write(os.fsencode(path) + b"\n")
        buffer.flush()
    except OSError as error:  # the reader went away (`| head -0`, a terminal hung up): the work is done, its path
        if not _is_reader_gone(error):  # unread
            raise
        to_dev_null(sys.stdout.fileno())  # so the exit's flush raises nothing


def in_colour(stream: Any) -> bool:
    """Whether log lines written to `stream` may carry ANSI colours: a terminal's, unless NO_COLOR (no-color.org,
    any value but empty) or TERM=dumb says otherwise. uvicorn asked stdout alone, for stderr's lines too: `zone
    serve 2> serve.log` from a terminal wrote escape codes into the log, and NO_COLOR was not read."""
    return not (os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb") and is_terminal(stream)


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is a terminal's; False for a caller's stream without isatty, or a closed one."""
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _undecodable_as_bytes(error: UnicodeError) -> tuple[bytes | str, int]:
    """An encoding-error handler: the bytes of a file name that were not UTF-8 (which Python holds as U+DC80..U+DCFF,
    PEP 383) written back as those bytes; any other character escaped, as Python's default for stderr does."""
    if isinstance(error, UnicodeDecodeError):  # a stream given it that is read back too (a test's capture of
        return codecs.lookup_error("surrogateescape")(error)  # `main`'s stderr): those bytes as PEP 383's text
    written = (bytes([ord(character) - 0xDC00]) if 0xDC80 <= ord(character) <= 0xDCFF
               else character.encode("ascii", "backslashreplace") for character in error.object[error.start:error.end])
    return b"".join(written), error.end


codecs.register_error("zone_file_names", _undecodable_as_bytes)


def file_names_on_stderr_as_their_bytes() -> None:
    """The progress lines and errors name a file as stdout's paths do (its bytes, as `cat` shows them): Python's
    default wrote "caf\\udce9.png", a name that is nowhere."""
    _set_errors(sys.stderr, "zone_file_names")


class OutlivingItsReader:
    """sys.stderr (or a report's sys.stdout) whose reader may leave (`2>&1 | head`, a log pipe closed): the next
    progress line raised BrokenPipeError, and the run stopped unsaid with exit 1, its edits undone. As stdout's
    paths (print_path): the lines go to /dev/null from then on, and the work goes on."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as error:
            if not _is_reader_gone(error):
                raise
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as error:
            if not _is_reader_gone(error):
                raise
            self._reader_gone()

    def _reader_gone(self) -> None:
        to_dev_null(self.stream.fileno())  # what the stream still holds is flushed there

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _is_reader_gone(error: OSError) -> bool:
    """Whether a write failed as its reader is gone: a pipe's (EPIPE), or a terminal's that hung up (EIO: a run
    disowned or under setsid outliving its SSH session; its next path or line was a traceback, exit 1, the edit just
    written missing from --report)."""
    return isinstance(error, BrokenPipeError) or error.errno == errno.EIO


def null_on_closed(descriptor: int) -> None:
    """/dev/null on `descriptor` if it was closed (`>&-`, `2>&-`, a daemon's), so that no file this process opens
    takes it: a closed stdout's descriptor was --report's file, where a child process's output would go."""
    try:
        os.fstat(descriptor)
    except OSError:
        to_dev_null(descriptor)


def _outliving_its_reader(stream: Any) -> Any:
    """`stream` as an `OutlivingItsReader`; itself where it has no descriptor (a caller's io.StringIO: no reader to
    lose)."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream
    return OutlivingItsReader(stream)


@contextlib.contextmanager
def stderr_kept() -> Iterator[None]:
    """stderr for a command, outliving its reader (`OutlivingItsReader`); /dev/null where it was closed
    (`2>&-`: Python's None made print(..., file=sys.stderr) write the errors and progress lines to stdout, among the
    paths a script reads), and on a closed stdout's descriptor. The caller's streams back after."""
    null_on_closed(1)
    previous = stream = sys.stderr
    opened = None
    if stream is None:
        null_on_closed(2)
        stream = opened = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 -- closed after the command
    sys.stderr = _outliving_its_reader(stream)
    try:
        yield
    finally:
        sys.stderr = previous
        if opened is not None:  # left to the collector, an in-process caller's ResourceWarning per command
            opened.close()


@contextlib.contextmanager
def stdout_kept() -> Iterator[None]:
    """stdout outliving its reader (`OutlivingItsReader`), for a command that prints its report there: `zone profile
    | head -1` was a BrokenPipeError's traceback, exit 1, once the edit was profiled. The caller's stream back after.
    A character its encoding lacks is escaped, as on stderr: under LC_ALL=C (ASCII) `zone bench`'s "64²" was an
    encode error's traceback once its reports were written."""
    previous = sys.stdout
    errors = getattr(previous, "errors", None)
    _set_errors(previous, "zone_file_names")
    sys.stdout = _outliving_its_reader(previous)
    try:
        yield
    finally:
        sys.stdout = previous
        _set_errors(previous, errors)


def _set_errors(stream: Any, errors: str | None) -> None:
    """`stream`'s encoding-error handler set to `errors`; nothing for a stream without one (a caller's io.StringIO) or
    one closed (its reconfigure flushes)."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None and errors is not None:
        with contextlib.suppress(OSError, ValueError):
            reconfigure(errors=errors)
