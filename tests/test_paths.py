"""paths: the checks of what an export folder holds and how a path option is read, called directly."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from zone_engine.edit_files import check_output_path
from zone_engine.errors import OutputError, ZoneError
from zone_engine.paths import (
    _temporary_name,
    check_output_file,
    expanded,
    export_kind,
    remove_stale_partials,
    written_atomically,
    written_together,
)
from zone_engine.streams import to_dev_null


def test_export_kind_reads_only_a_manifest_object():
    """A manifest.json that parses to a list or a string naming the key is no export's: a bare `key in
    manifest` would call ["graphs"] a UNet export and "model_type" a SAM one."""
    assert export_kind({"graphs": {}}) == "unet" and export_kind({"model_type": "vit_b"}) == "sam"
    for manifest in (["graphs"], "model_type", {}, None):
        assert export_kind(manifest) is None, manifest


def test_a_nul_in_a_home_folders_user_name_is_said_not_raised():
    """Path.expanduser raises ValueError for a NUL in `~user`: told as the error asked for, not a traceback."""
    with pytest.raises(ZoneError, match="the home folder of .* is not known here"):
        expanded("~no\0user/out.png")


def test_an_output_symlink_is_checked_where_it_points(tmp_path):
    """Its target is what gets written: one not made yet, in a folder that is there, is fine (a shell's `>` writes
    it); one inside a file, which no folder can be made at, is said before any work."""
    (tmp_path / "to-new.png").symlink_to("new.png")
    check_output_file(tmp_path / "to-new.png", "output")
    (tmp_path / "latest").symlink_to("shot.jpg")  # no suffix of its own: its target's names the format written
    check_output_path(tmp_path / "latest", tmp_path / "photo.png")
    (tmp_path / "notes.txt").touch()
    (tmp_path / "into-a-file.png").symlink_to("notes.txt/o.png")
    with pytest.raises(OutputError, match=r"output .*notes\.txt/o\.png: .*notes\.txt is a file, not a folder"):
        check_output_file(tmp_path / "into-a-file.png", "output")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_to_dev_null_points_the_descriptor_there_and_leaves_no_other_open():
    """A stdout whose reader went away, put on /dev/null: the /dev/null opened to copy from is closed again."""
    reader, writer = os.pipe()
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        to_dev_null(writer)
        assert os.readlink(f"/proc/self/fd/{writer}") == os.devnull and sorted(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(reader)
        os.close(writer)


def _write(path: Path, text: str) -> None:
    with written_atomically(path) as temporary:
        temporary.write_text(text)


def test_files_written_together_move_over_the_old_ones_only_when_all_are_written(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    _write(first, "old first")
    _write(second, "old second")
    with pytest.raises(OSError, match="full"), written_together():
        _write(first, "new first")
        assert first.read_text() == "old first"  # held back until the block ends
        with written_atomically(second):
            raise OSError("full")
    assert (first.read_text(), second.read_text()) == ("old first", "old second")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first.txt", "second.txt"]
    with written_together():
        _write(first, "new first")
        _write(second, "a draft")
        _write(second, "new second")  # the same path twice: the last write, as without the block
    assert (first.read_text(), second.read_text()) == ("new first", "new second")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first.txt", "second.txt"]
    _write(first, "after")  # outside the block, moved at once
    assert first.read_text() == "after"


def _gone_thread_id() -> int:
    """The system-wide id of a thread that ran and is gone: an ended process's main thread (a thread of this one,
    once joined, may not have left the system yet)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's id is a process id kill can ask about on Linux only")
def test_the_partials_a_killed_run_left_beside_its_outputs_are_removed_and_nothing_else(tmp_path):
    """`kill -9` of a run mid-write left `.a.TID.partial.png` beside its outputs for good: a rerun removes those of
    the files it writes whose thread is gone; a live thread's (a run writing them now), another file's and a
    look-alike stay."""
    gone, alive = _gone_thread_id(), threading.get_native_id()
    long_name = tmp_path / ("x" * 250 + ".png")  # its temporary's stem shortened to fit 255 bytes
    planned = [tmp_path / "a.png", tmp_path / "masks" / "mask_b.png", long_name]
    (tmp_path / "masks").mkdir()
    stale = [path.with_name(_temporary_name(path, gone)) for path in planned]
    kept = [tmp_path / f".a.{alive}.partial.png", tmp_path / f".b.{gone}.partial.png",
            tmp_path / f".a.{gone}.partial.jpg", tmp_path / ".a.png.partial", tmp_path / "a.png"]
    for path in stale + kept:
        path.write_bytes(b"")
    assert sorted(remove_stale_partials([*planned, tmp_path / "missing" / "c.png"])) == sorted(stale)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's id is a process id kill can ask about on Linux only")
def test_the_partial_of_another_users_live_run_and_one_written_through_a_link_are_told_apart(tmp_path, monkeypatch):
    """From a mutation audit: a thread `kill` may not ask about (PermissionError: another user's run, writing the
    same shared folder) is alive, its partial kept; an output that is a symlink has its partial beside the link's
    target, where `written_atomically` writes it, and that one is found there and removed."""
    target_folder, gone = tmp_path / "real", _gone_thread_id()
    target_folder.mkdir()
    link = tmp_path / "out.png"
    link.symlink_to(target_folder / "edit.png")
    linked_partial = target_folder / _temporary_name(target_folder / "edit.png", gone)
    others = tmp_path / _temporary_name(tmp_path / "b.png", 4242)
    for path in (linked_partial, others):
        path.write_bytes(b"")
    assert remove_stale_partials([link]) == [linked_partial] and not linked_partial.exists()

    def not_permitted(pid: int, signal_number: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_permitted)
    assert remove_stale_partials([tmp_path / "b.png"]) == [] and others.exists()
