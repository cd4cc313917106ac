"""Where results go: checked before any work runs, so a bad output path never costs a finished edit,
benchmark or export."""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path

from .errors import OutputError, ZoneError

# What `zone export unet` and `zone export sam` write beside their graphs, each recognised by a key only its
# own manifest has: so an export, an engine build or `--sam-onnx` can say it was handed the other one's folder.
MANIFEST_FILE = "manifest.json"
EXPORT_KINDS = {"unet": "graphs", "sam": "model_type"}


def export_kind(manifest: object) -> str | None:
    """Which `zone export` wrote this parsed manifest.json ("unet" or "sam"), None when neither did."""
    return next((kind for kind, key in EXPORT_KINDS.items() if isinstance(manifest, dict) and key in manifest), None)


def export_manifest_path(folder: Path, kind: str, named: str, write_one: str,
                         error: type[ZoneError] = ZoneError) -> Path:
    """The manifest of a `zone export KIND` folder, once the folder is there and holds one (an export stopped
    before its end has none: the manifest is installed last). `named`: the folder as the messages name it;
    `write_one`: how to write a fresh folder."""
    if folder.is_file():
        raise error(f"{named} is a file: pass the folder `zone export {kind} --out` wrote")
    if not folder.is_dir():
        raise error(f"{named}: no such folder; {write_one}")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise error(f"{named}: no {MANIFEST_FILE}: not a `zone export {kind}` folder, or the export did not finish; "
                    f"{write_one}")
    return path


def listed_file_problem(folder: Path, name: str, expected_sha256: str) -> str | None:
    """What is wrong with a file an export's manifest lists, with the sha256 it records; None when nothing."""
    path = Path(folder) / name
    if not path.is_file():
        return f"{name} is missing"
    if file_sha256(path) != expected_sha256:
        return (f"{name} does not match its sha256 in {MANIFEST_FILE}: the file is corrupt, truncated or from "
                "another export")
    return None


def file_sha256(path: Path) -> str:
    """The file's sha256, computed once per version of the file in this process (a server checks its export
    when it starts and again for each segmenter; `zone build-engine` before and while building)."""
    status = os.stat(path)
    return _sha256(os.path.realpath(path), status.st_ino, status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as file:
        digest = hashlib.sha256()  # hashlib.file_digest would do this from Python 3.11 on; 3.10 is supported
        while chunk := file.read(1 << 20):
            digest.update(chunk)
        return digest.hexdigest()


def expanded(path: str | os.PathLike, error: type[Exception] = ZoneError) -> Path:
    """`path` with a leading `~` or `~user` expanded, as a shell does (not `./~/`, which pathlib would shorten to
    `~/`); `error` when that home folder is not known here (no such user, no HOME), where Path.expanduser raises a
    RuntimeError: a traceback for a typo."""
    text = os.fspath(path)
    if not text.startswith("~"):
        return literal(Path(text))
    try:
        return Path(text).expanduser()
    except (RuntimeError, ValueError):  # ValueError: a NUL in the user's name
        raise error(f"{text}: the home folder of {Path(text).parts[0]} is not known here (no such user, or HOME is "
                    "not set); write the path in full") from None


def literal(path: Path) -> Path:
    """`path`, absolute when its first part begins with `~` (`./~/x` or `~name` meant as a folder here, which pathlib
    writes `~/x`, `~name`): no later expanduser takes it for a home folder."""
    return path.absolute() if path.parts[:1] and path.parts[0].startswith("~") else path


def folder_argument(text: str) -> Path:
    """argparse type of a folder option: a blank one is refused (pathlib reads "" as the current folder, where
    `--out ""` wrote an export's files), `~` expanded."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: name a folder (. for the current one)")
    return expanded(text, argparse.ArgumentTypeError)


def file_argument(text: str) -> Path:
    """argparse type of a file option: a blank one is refused (pathlib reads "" as the current folder: `-o ""`
    was called a folder the user never named), `~` expanded."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: name a file")
    return expanded(text, argparse.ArgumentTypeError)


def folder_problem(folder: Path, probed: set[Path] | None = None) -> str | None:
    """Why nothing could be written in `folder` (created if missing), or None if it could. `probed`: folders a
    file was made in already (filled in here), so that a caller checking thousands of files probes each once."""
    folder = Path(folder).absolute()
    if problem := name_problem(folder):
        return problem
    dangling = next((p for p in (folder, *folder.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:  # mkdir would say "[Errno 17] File exists"
        return f"{dangling} is a symbolic link to {os.readlink(dangling)}, which is not there"
    existing = nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing} (read-only or not yours)"
    if probed is not None and existing in probed:
        return None
    try:  # os.access answers yes to root everywhere, also on a read-only mount or in /proc: try it
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".zone-probe-"):
            pass
    except OSError as error:  # ENOENT in a folder that is there: /proc, sysfs and the like make no files
        reason = "no new file can be made there" if error.errno == errno.ENOENT else error.strerror or error
        return f"cannot write in {existing} ({reason})"
    if probed is not None:
        probed.add(existing)
    return None


def check_output_folder(path: Path, what: str, files: Sequence[str] = (), probed: set[Path] | None = None) -> None:
    """OutputError unless `path` is a folder, or can be created as one, that this process may write into, with
    `files` (names) writable in it: none a folder, none a read-only file (`probed`: as folder_problem's)."""
    if problem := folder_problem(path, probed):
        raise OutputError(f"{what} {path}: {problem}; choose another path")
    for name in files:
        if (Path(path) / name).is_dir():
            raise OutputError(f"{what} {path} holds a folder named {name}, where the file {name} goes: move it or "
                              "choose another folder")
        check_output_file(Path(path) / name, what, probed)


NAME_MAX = 255  # the bytes a file or folder name may have on Linux's file systems (ext4, xfs, btrfs, tmpfs)


def name_problem(path: Path) -> str | None:
    """Why the system refuses `path` as a name, or None. Lengths are counted (a folder not yet there would hide
    them from the lookup); the lookup says the rest, where pathlib would raise it from deep inside."""
    if too_long := _name_too_long(path):
        return too_long
    try:
        Path(path).exists()
    except OSError as error:
        return error.strerror or str(error)
    return None


def refused_path_line(error: OSError) -> str:
    """The line for a path the system refused past the checks: a name over NAME_MAX bytes (a checkpoint's, an
    export folder's) said as the checks say it, with what to do, not as "[Errno 36] File name too long"; the open
    files limit reached, with how to raise it."""
    if error.errno == errno.ENAMETOOLONG and error.filename is not None:
        path = Path(os.fsdecode(error.filename))
        if too_long := _name_too_long(path):
            return f"{path}: {too_long}; shorten it"
    if error.errno == errno.EMFILE:  # `ulimit -n` set low: "[Errno 24]" and a library's file, nothing to do said
        import resource

        allowed = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (f"too many open files: this process may have {allowed} open at once (ulimit -n); raise the limit, "
                "such as ulimit -n 1024, and run the command again")
    return str(error)


def _name_too_long(path: Path) -> str | None:
    """That a name in `path` is over NAME_MAX bytes, or None."""
    longest = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
    if longest <= NAME_MAX:
        return None
    return f"a name in it is {longest} bytes long, over the {NAME_MAX} a file system takes"


def is_folder(path: Path) -> bool:
    """`path.is_dir()`, False where the system refuses the name (over 255 bytes: ENAMETOOLONG, which pathlib
    raises when the folder above is there), so the checks after it say why."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def check_output_file(path: Path, what: str, probed: set[Path] | None = None, *, replaced: bool = True) -> None:
    """OutputError unless a file can be written (or overwritten) at `path` (`probed`: as folder_problem's).
    `replaced`: the file is written beside `path` and moved into place (`written_atomically`), so a named pipe or a
    device there would be replaced; else (a report written as it goes) one is written into."""
    path = Path(path)
    if problem := name_problem(path):
        raise OutputError(f"{what} {path}: {problem}; choose another path")
    if replaced and path.exists() and not path.is_file() and not path.is_dir():  # through links: /dev/stdout too
        raise OutputError(f"{what} {path} is a pipe or a device, not a file: the result, written beside it and moved "
                          "into place, would replace it; choose another path")
    if path.is_symlink():  # its target is what gets written
        try:
            target = path.resolve()
        except (RuntimeError, OSError):  # Python 3.11 says a loop as a RuntimeError
            raise OutputError(f"{what} {path} is a symlink that loops: choose another path") from None
        if not target.parent.exists():  # written through, as a shell's `>`: the folder made would be -o's own
            raise OutputError(f"{what} {path} is a symbolic link to {os.readlink(path)}, in a folder that is not "
                              "there; choose another path")
        path = target
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder: give a file name inside it")
    problem = folder_problem(path.parent, probed)
    if problem is None and path.exists() and not os.access(path, os.W_OK):
        problem = "it exists and cannot be overwritten"
    if problem:
        raise OutputError(f"{what} {path}: {problem}; choose another path")


def nearest_existing(folder: Path) -> Path:
    """`folder`, or the nearest of its parents that exists (the current folder when none does)."""
    found = next((candidate for candidate in (folder, *folder.parents) if candidate.exists()), None)
    return Path.cwd() if found is None else found  # not asked for the current folder (gone?) unless needed


def ignores_case(folder: Path) -> bool:
    """Whether the file system `folder` is on (its nearest existing folder's) takes names differing only in case
    for one file: a file made there is looked up by its name in upper case. False where nothing can be made."""
    existing = nearest_existing(folder)
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".zone-case-") as probe:
            return os.path.exists(os.path.join(existing, os.path.basename(probe.name).upper()))
    except OSError:  # not a folder, not writable: said by check_output_folder
        return False


def written_file(path: Path) -> Path:
    """The file a write to `path` changes: a symlink's target (written through, as a shell's `>` does: replacing
    the link would leave its target as it was), else `path`. A loop stays as it is, and its write fails as an
    OSError."""
    try:
        linked = path.is_symlink()
    except OSError:  # a name the system refuses (over 255 bytes; pathlib raises it): no link, said where written
        linked = False
    return Path(os.path.realpath(path)) if linked else path


# The files written_atomically wrote inside written_together, by the path each moves over once all are written.
_held_back: ContextVar[dict[Path, Path] | None] = ContextVar("_held_back", default=None)


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix: writers that go by it pick the same format) to
    write to, moved over `path` only once the writing succeeded: a failed or interrupted write (a
    full disk, a size limit) leaves the old file as it was, never a truncated one. Inside
    `written_together`, moved when that block ends."""
    path = written_file(Path(path))
    temporary, held = path.with_name(_temporary_name(path)), _held_back.get()
    written = False
    try:
        yield temporary
        if held is None:
            os.replace(temporary, path)
        else:
            held[path] = temporary  # a second write of the path: the same temporary, rewritten
            written = True
    finally:
        if not written:
            temporary.unlink(missing_ok=True)


@contextmanager
def written_together() -> Iterator[None]:
    """The files written_atomically writes in this block move over their paths only once the block ends without
    an error: a failed write of one (a full disk at the third of a demo's eight files, an edit's mask) leaves
    every older file as it was, not a mix of this run's files and an earlier one's."""
    held: dict[Path, Path] = {}
    token = _held_back.set(held)
    try:
        try:
            yield
        finally:
            _held_back.reset(token)
        for path, temporary in held.items():
            os.replace(temporary, path)
    finally:  # the temporaries of a block that failed (or of a move that did)
        for temporary in held.values():
            temporary.unlink(missing_ok=True)


def _temporary_name(path: Path, thread: int | None = None) -> str:
    """`.STEM.TID.partial.SUFFIX`, TID the writing thread's system-wide id (its process's id for the main thread:
    two threads of one process writing one path shared a temporary, one's edit in the other's file, and the later
    move failed as "No such file or directory"), its stem shortened to fit NAME_MAX bytes: a name the checks passed
    (up to 255 bytes) failed its write after the edit, as "File name too long", the temporary name being longer.
    `thread`: another thread's id than the caller's."""
    thread = threading.get_native_id() if thread is None else thread
    stem, tail = path.stem, f".{thread}.partial{path.suffix}"
    while len(os.fsencode(f".{stem}{tail}")) > NAME_MAX:
        stem = stem[:-1]
    return f".{stem}{tail}"


_TEMPORARY = re.compile(r"\.(?P<stem>.*)\.(?P<thread>[0-9]+)\.partial(?P<suffix>.*)")


def remove_stale_partials(paths: Iterable[Path]) -> list[Path]:
    """The temporaries `written_atomically` left beside `paths` (the files a run is about to write) where a process
    died writing them (`kill -9`, the OOM killer, a power cut: no `finally` ran), removed; returned. Only a name
    this engine gives a temporary of one of `paths`, and only where the thread that wrote it is gone: a live
    run's, writing the same files, stays. Only on Linux, where a thread's id is one `kill` can ask about."""
    if sys.platform != "linux":
        return []
    by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        path = written_file(Path(path))
        by_folder.setdefault(path.parent, []).append(path)
    removed = []
    for folder, planned in by_folder.items():
        try:
            names = [entry.name for entry in os.scandir(folder)]
        except OSError:  # not made yet (or not readable): nothing of ours left there
            continue
        for name in names:
            if (match := _TEMPORARY.fullmatch(name)) and _is_stale(match, planned):
                with suppress(FileNotFoundError):  # another rerun removed it first
                    (folder / name).unlink()
                    removed.append(folder / name)
    return removed


def _is_stale(temporary: re.Match, planned: list[Path]) -> bool:
    """Whether the file name `temporary` matched is the temporary of one of `planned` by a thread that is gone."""
    thread = int(temporary["thread"])
    candidates = (path for path in planned if path.stem.startswith(temporary["stem"])
                  and path.suffix == temporary["suffix"])
    return any(_temporary_name(path, thread) == temporary.string for path in candidates) and not _thread_alive(thread)


def _thread_alive(thread: int) -> bool:
    """Whether a thread of that system-wide id runs (Linux's kill takes a thread's id as its process's)."""
    try:
        os.kill(thread, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's (PermissionError): alive
        return True
    return True


@contextmanager
def exclusive_lock(descriptor: int, wait: bool = True) -> Iterator[None]:
    """An exclusive flock on the open file or folder `descriptor` while the block runs (the system releases it when
    the process dies); `wait`: until another process's is released, else none taken while another holds it. None
    where there are no such locks (Windows, some network file systems)."""
    locked = False
    with suppress(ImportError, OSError):
        import fcntl

        fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = True
    try:
        yield
    finally:
        if locked:  # before a close: a descriptor kept open (--report's) would hold it between lines
            with suppress(OSError):
                fcntl.flock(descriptor, fcntl.LOCK_UN)
