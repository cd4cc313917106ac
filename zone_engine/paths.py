"""Where results go: checked before any work runs, so a bad output path never costs a finished edit,
benchmark or export."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ZoneError


def _folder_problem(folder: Path) -> str | None:
    """Why nothing could be written in `folder` (created if missing), or None if it could."""
    folder = Path(folder).absolute()
    existing = next((candidate for candidate in (folder, *folder.parents) if candidate.exists()), Path.cwd())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing} (read-only or not yours)"
    try:  # os.access answers yes to root everywhere, also on a read-only mount or in /proc: try it
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".zone-probe-"):
            pass
    except OSError as error:
        return f"cannot write in {existing} ({error.strerror or error})"
    return None


def check_output_folder(path: Path, what: str) -> None:
    """ZoneError unless `path` is a folder, or can be created as one, that this process may write into."""
    problem = _folder_problem(path)
    if problem:
        raise ZoneError(f"{what} {path}: {problem}; choose another path")


def check_output_file(path: Path, what: str) -> None:
    """ZoneError unless a file can be written (or overwritten) at `path`."""
    path = Path(path)
    if path.is_dir():
        raise ZoneError(f"{what} {path} is a folder: give a file name inside it")
    problem = _folder_problem(path.parent)
    if problem is None and path.exists() and not os.access(path, os.W_OK):
        problem = "it exists and cannot be overwritten"
    if problem:
        raise ZoneError(f"{what} {path}: {problem}; choose another path")


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix: writers that go by it pick the same format) to
    write to, moved over `path` only once the writing succeeded: a failed or interrupted write (a
    full disk, a size limit) leaves the old file as it was, never a truncated one."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
