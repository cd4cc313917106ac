"""The command line and the API on bad input: one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import errno
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import image_header, rgb_profile, smooth_image
from PIL import Image

import zone_engine
from zone_engine import ZonePipeline
from zone_engine.backends import check_backends, resolve_device
from zone_engine.cli import MASK_OUTPUTS, SERVE_MODULES, main
from zone_engine.config import Action, EditConfig, SamConfig, check_backend_options, device_kind
from zone_engine.errors import ConfigError, DeviceError, InputImageError, InstructionError, OutputError, ZoneError
from zone_engine.instruction import check_instruction
from zone_engine.manifest import EXAMPLE as MANIFEST_EXAMPLE
from zone_engine.pipeline import EditRequest


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(smooth_image(64, 96)).save(path)
    return path


def _copied(source: Path, destination: Path) -> str:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    return str(destination)


def _folder(path: Path) -> str:
    """`path` made a folder; its parent's name (a file name taken by a folder)."""
    path.mkdir(parents=True)
    return str(path.parent)


def _symlink_loop(path: Path) -> str:
    path.symlink_to(path.name)
    return str(path)


def _symlink_to(path: Path, target: Path) -> str:
    path.symlink_to(target)
    return str(path)


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


def _wide_image(path: Path) -> str:
    Image.new("RGB", (20000, 40)).save(path)
    return str(path)


def _fails_cleanly(capsys, argv, *words):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in "\n".join(err)
    said = "\n".join(err[err.index(errors[0]):])  # one error; several missing checkpoints get a line each
    for word in words:
        assert word in said, said
    return err


@pytest.mark.parametrize("relative", [True, False])
def test_a_run_from_a_deleted_folder_is_said(photo, tmp_path, capsys, monkeypatch, relative):
    """A cron job or a shell left in a folder removed under it: os.getcwd() in the output checks was a traceback,
    exit 1, even for absolute paths only."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    image, output = ("photo.png", "out.png") if relative else (str(photo), str(tmp_path / "out.png"))
    _fails_cleanly(capsys, ["edit", image, "-i", "make it gold", "-o", output, "--tiny"],
                   "the current folder was deleted", "cd to a folder that exists")


def test_no_progress_checks_the_torch_cache_folder_before_diffusers_loads(tmp_path, monkeypatch):
    """--no-progress imported diffusers (to hide its bars) before the models' check of TORCHINDUCTOR_CACHE_DIR: in a
    fresh process the import made the folder and failed as "error: [Errno 2] No such file or directory: ...",
    naming no variable. (Here diffusers is loaded already: the check must come before the build.)"""
    from zone_engine.cli import _without_library_progress_bars

    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    with pytest.raises(ConfigError, match="TORCHINDUCTOR_CACHE_DIR=.*set it to a folder you can write"):
        _without_library_progress_bars(lambda: pytest.fail("built before the check"))


def test_a_closed_stderr_sends_nothing_to_stdout(tmp_path, capsys, monkeypatch):
    """`2>&-`: Python's sys.stderr is None, and print(..., file=None) writes to stdout: the error line was on stdout,
    where a script reads the written paths."""
    monkeypatch.setattr(sys, "stderr", None)
    assert main(["edit", str(tmp_path / "missing.png"), "-i", "make it gold", "-o", str(tmp_path / "out.png")]) == 2
    assert capsys.readouterr().out == ""


def test_a_report_on_stdout_in_an_encoding_without_its_characters_is_escaped_not_a_traceback(monkeypatch):
    """LC_ALL=C with PYTHONUTF8=0, stdout ASCII: `zone bench`'s table ("64²") was an encode error's traceback, exit
    1, once its reports were written. Escaped as on stderr; the caller's stream as it was after."""
    from zone_engine.streams import stdout_kept

    written = io.BytesIO()
    ascii_stdout = io.TextIOWrapper(written, encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", ascii_stdout)
    with stdout_kept():
        print("64² " + os.fsdecode(b"caf\xe9.png"))
    sys.stdout.flush()
    assert written.getvalue() == b"64\\xb2 caf\xe9.png\n" and ascii_stdout.errors == "strict"


def test_the_dev_null_put_for_a_closed_stderr_is_closed_after_the_command(monkeypatch):
    """Left open when the command ended and sys.stderr was None again: a ResourceWarning per call of main()."""
    from zone_engine.streams import stderr_kept

    monkeypatch.setattr(sys, "stderr", None)
    with stderr_kept():
        opened = sys.stderr.stream
        assert not opened.closed and opened.name == os.devnull
    assert sys.stderr is None and opened.closed


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_a_closed_standard_descriptor_gets_dev_null_so_no_file_takes_it():
    """`>&-`: the next file opened took descriptor 1 (--report's, seen), where a child process writes its output."""
    from zone_engine.streams import null_on_closed

    reader, writer = os.pipe()
    os.close(writer)
    try:
        null_on_closed(writer)
        assert os.readlink(f"/proc/self/fd/{writer}") == os.devnull
    finally:
        os.close(reader)
        os.close(writer)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_a_command_started_with_stdout_closed_puts_dev_null_there(tmp_path):
    """`>&-`: main() fills the closed descriptor itself, before any file it opens (--report's) could take it."""
    kept = os.dup(1)
    os.close(1)
    try:
        code = main(["edit", str(tmp_path / "missing.png"), "-i", "make it gold", "-o", str(tmp_path / "out.png")])
        assert os.readlink("/proc/self/fd/1") == os.devnull
    finally:
        os.dup2(kept, 1)
        os.close(kept)
    assert code == 2


def test_a_reader_gone_from_stderr_stops_no_run(tmp_path, monkeypatch):
    """`2>&1 | head`: the next line on stderr raised BrokenPipeError, a run of edits stopped with exit 1 and no word
    (a traceback to nowhere). Its lines go nowhere instead and the command ends as it would."""
    (tmp_path / "photos").mkdir()
    reader, writer = os.pipe()
    os.close(reader)
    with open(writer, "w", buffering=1, encoding="utf-8") as gone:  # line-buffered, as sys.stderr
        monkeypatch.setattr(sys, "stderr", gone)
        code = main(["edit", str(tmp_path / "photos"), "-i", "make it gold", "-o", str(tmp_path / "out")])
        assert sys.stderr is gone  # the caller's own stream back after the command
    assert code == 2  # "warning: ... is a folder: left out", then "error: every input is a folder"


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="no pseudo-terminals here")
def test_a_terminal_hung_up_under_a_run_stops_it_not(photo, tmp_path, monkeypatch):
    """`zone batch ... &` disowned (or under setsid) and the SSH session ended: its terminal hung up, the next
    written path or progress line raised EIO, and the run stopped with exit 1, the edit just written missing from
    its --report. As for a reader gone from a pipe, its lines go nowhere and the edits go on."""
    controller, terminal = os.openpty()
    os.close(controller)  # the terminal hangs up: a write to it is EIO from now on
    report = tmp_path / "report.jsonl"
    with open(terminal, "w", buffering=1, encoding="utf-8") as gone:
        monkeypatch.setattr(sys, "stdout", gone)
        monkeypatch.setattr(sys, "stderr", gone)
        code = main(["edit", str(photo), "-i", "add a hat", "-o", f"{tmp_path}/out/", "--tiny", "--steps", "1",
                     "--report", str(report)])
    assert code == 0 and (tmp_path / "out" / "photo.png").exists() and len(report.read_text().splitlines()) == 1


def test_a_line_part_flushed_to_a_gone_reader_raises_nothing():
    """Text with no line end is sent by the flush, not the write (line buffering): the flush met the closed pipe.
    Closing the stream afterwards sends nothing more into it either."""
    from zone_engine.streams import OutlivingItsReader

    reader, writer = os.pipe()
    os.close(reader)
    with open(writer, "w", buffering=1, encoding="utf-8") as gone:
        stderr = OutlivingItsReader(gone)
        stderr.write("loading the models... ")
        stderr.flush()


class _FullDisk:
    """A stream on a full disk: each write and flush is ENOSPC (its descriptor a file of the test's own)."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor, self.buffer = descriptor, self

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        self.write(b"")

    def fileno(self) -> int:
        return self.descriptor


def test_a_full_disk_under_stdout_or_stderr_is_said_not_taken_for_a_reader_gone(tmp_path, monkeypatch):
    """From a mutation audit: only a reader gone (EPIPE, a hung-up terminal's EIO) sends the lines to /dev/null;
    a full disk under `> paths.txt` or `2> log` is an error, not a run that says it wrote paths nobody kept."""
    from zone_engine.streams import OutlivingItsReader, print_path

    with open(tmp_path / "log", "wb") as file:
        stream = _FullDisk(file.fileno())
        for write in (lambda: OutlivingItsReader(stream).write("a line\n"), OutlivingItsReader(stream).flush):
            with pytest.raises(OSError) as said:
                write()
            assert said.value.errno == errno.ENOSPC
        monkeypatch.setattr(sys, "stdout", stream)
        with pytest.raises(OSError) as said:
            print_path(tmp_path / "out.png")
        assert said.value.errno == errno.ENOSPC


def test_a_folder_option_left_blank_or_a_dangling_link_is_said(capsys, tmp_path):
    """pathlib reads "" as the current folder: `zone export unet --tiny --out ""` wrote its graphs there, exit 0.
    A link to nowhere was mkdir's "[Errno 17] File exists", after the models were built."""
    for argv in (["demo", "--out", ""], ["export", "unet", "--tiny", "--out", " "], ["bench", "--out", ""]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and "--out: empty: name a folder" in capsys.readouterr().err
    # A file option alike: `-o ""` was "output . is a folder", a folder the user never named.
    for argv, option in ((["edit", "in.png", "-i", "x", "-o", "", "--tiny"], "-o/--output"),
                         (["edit", " ", "-i", "x", "-o", "o.png", "--tiny"], "image"),
                         (["profile", "--trace", ""], "--trace"),
                         (["export", "sam", "--checkpoint", ""], "--checkpoint")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and f"{option}: empty: name a file" in capsys.readouterr().err
    # A home folder not known (a shell leaves ~nobody as it is): Path.expanduser's RuntimeError was a traceback.
    with pytest.raises(SystemExit) as stop:
        main(["edit", "in.png", "-i", "x", "-o", "~no-such-user-zone/out.png", "--tiny"])
    assert stop.value.code == 2 and "the home folder of ~no-such-user-zone is not known" in capsys.readouterr().err
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out in (tmp_path / "dangling", tmp_path / "dangling" / "sub"):  # the link itself, or a folder above
        _fails_cleanly(capsys, ["export", "unet", "--tiny", "--out", str(out)], "--out",
                       f"{tmp_path / 'dangling'} is a symbolic link to", "which is not there")


HELP_SCRIPT = """
import sys
from PIL import Image
from zone_engine.cli import main
Image.new("RGB", (64, 64)).save("photo.png")
for command in ([], ["edit"], ["demo"], ["serve"], ["export", "unet"], ["export", "sam"], ["build-engine"], ["bench"],
                ["profile"]):
    try:
        main([*command, "--help"])
    except SystemExit as stop:
        assert stop.code == 0, command
    else:
        raise AssertionError(f"{command} --help did not answer")
for argv in (["edit", "missing.png", "-i", "x", "-o", "out.png"], ["edit", "in.png", "-i", "x", "-o", "out.txt"],
             ["edit", "in.png", "-i", "x", "-o", "out.png", "--steps", "0"], ["demo", "--out", "d", "--steps", "0"],
             ["edit", "photo.png", "-i", " ", "-o", "out.png"], ["demo", "--out", "d", "-i", ""],
             ["edit", "photo.png", "-i", "x", "-o", "out.png", "--device", "tpu"],
             ["edit", "photo.png", "-i", "x", "-o", "out.png", "--device", "cpu", "--dtype", "fp16"],
             ["demo", "--out", "d", "--segmenter", "onnx"], ["serve", "--tiny", "--denoiser", "tensorrt"],
             ["edit", "photo.png", "-i", "x", "-o", "out.png", "--tiny", "--sam-type", "vit_b"],
             ["serve", "--tiny", "--sam-type", "vit_b"]):
    assert main(argv) == 2, argv
for argv in (["bench", "--resolution", "100000"], ["profile", "--steps", "0"]):
    try:
        main(argv)
    except SystemExit as stop:
        assert stop.code == 2, argv
    else:
        raise AssertionError(f"{argv} was not refused")
print("torch imported:", "torch" in sys.modules)
"""


def test_the_distribution_installs_no_top_level_name_of_another_project():
    """kernels/, export/ and benchmarks/ install as zone_kernels, zone_export and zone_benchmarks: as `kernels`
    the wheel overwrote Hugging Face's `kernels` package (which transformers imports when it is installed) and,
    uninstalled, deleted its __init__.py; PyPI's `export` would have fared the same."""
    top_level = importlib.metadata.distribution("zone-engine").read_text("top_level.txt").split()
    assert sorted(top_level) == ["zone_benchmarks", "zone_engine", "zone_export", "zone_kernels"]


def test_python_m_zone_engine_is_the_zone_command(tmp_path):
    """For an environment whose scripts folder is not on PATH: it said "No module named zone_engine.__main__"."""
    out = subprocess.run([sys.executable, "-m", "zone_engine", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"zone-engine {zone_engine.__version__}", out.stderr
    out = subprocess.run([sys.executable, "-m", "zone_engine", "edit", "--tinny"], capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean --tiny?" in out.stderr and "(see zone edit --help)" in out.stderr
    # A run's own failure, past the parser, keeps its exit status too (a shell's `&&` went on after it).
    out = subprocess.run([sys.executable, "-m", "zone_engine", "edit", str(tmp_path / "missing.png"), "-i", "x", "-o",
                          str(tmp_path / "o.png")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: image not found: "), out.stderr


def test_help_and_input_errors_answer_without_importing_torch(tmp_path):
    """Every command's --help answers at once: nothing behind the parser imports torch (3 s on this machine),
    diffusers or segment-anything's torchvision (3 s more); the benchmark tools' too (`zone bench --help` took 6 s
    when its options lived beside the harness). Nor do the input errors of `zone edit` (an image that is not
    there, an output that is not an image file, a step count out of range, an empty instruction, a device that is
    none, backend options that contradict each other), those of `zone demo` and `zone serve`, and the benchmark
    tools' values out of range."""
    out = subprocess.run([sys.executable, "-m", "zone_engine.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "edit" in out.stdout and "demo" in out.stdout
    assert "130 interrupted (Ctrl-C), 143 stopped by SIGTERM" in " ".join(out.stdout.split())  # as main returns
    out = subprocess.run([sys.executable, "-m", "zone_engine.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"zone-engine {zone_engine.__version__}"
    out = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sum(line.startswith("error: ") for line in out.stderr.splitlines()) == 14, out.stderr
    assert out.stdout.rstrip().endswith("torch imported: False")
    for option in ("--ip2p", "--magicbrush", "--sam", "--action", "--steps", "--seed", "--device", "--save-masks",
                   "--max-batch", "--dynamic-shapes", "--model-type", "--force"):
        assert option in out.stdout


WITHOUT_SERVE_SCRIPT = """
import sys
for module in ("fastapi", "uvicorn", "multipart", "python_multipart", "prometheus_client", "ray"):
    sys.modules[module] = None  # as on an install without the [serve] extra
from zone_engine.cli import _pipeline_spec, build_parser
args = build_parser().parse_args(["edit", "in.png", "-i", "x", "-o", "out.png", "--tiny"])
print(type(_pipeline_spec(args)).__name__)
"""


@pytest.mark.parametrize(("argv", "usage"), [
    (["help"], "usage: zone [-h]"), (["help", "edit"], "usage: zone edit [-h]"),
    (["help", "export", "unet"], "usage: zone export unet [-h]"), (["help", "bench"], "usage: zone bench [-h]"),
])
def test_zone_help_prints_the_help_of_the_command_named(capsys, argv, usage):
    """`zone help` and `zone help edit` were "invalid choice: 'help'", exit 2."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0 and capsys.readouterr().out.startswith(usage)


def test_zones_own_help_says_where_a_commands_options_are(capsys):
    """From a mutation audit: the epilog's pointer to `zone COMMAND --help` and `zone help COMMAND` went untested."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "A command's options: `zone COMMAND --help`, or `zone help COMMAND`." in text


def test_demo_help_says_its_masks_are_in_out_and_save_masks_writes_them_again(capsys):
    """zone demo --help had zone edit's --save-masks words: "also write" masks it writes to --out anyway, and where
    those "of several edits" go, of a command that makes one."""
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0 and "which --out gets in any case, to DIR as well" in text
    assert "of several edits" not in text and "DIR/NAME" not in text


def test_a_word_near_no_command_is_told_the_commands_alone(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["xyzzy"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "invalid choice: 'xyzzy'" in err and "did you mean" not in err


@pytest.mark.parametrize(("argv", "words"), [
    (["edit", "x.png", "-i", "a", "-o", "y.png", "--bogus"], "unrecognized arguments: --bogus (see zone edit --help)"),
    (["edit", "x.png", "-i", "a", "-o", "y.png", "--ste", "2"], "unrecognized arguments: --ste 2"),  # no abbreviation
    # Unrecognized ones named with the nearest option of the command they were given to (a subcommand's too).
    (["edit", "x.png", "-i", "a", "-o", "y.png", "--tinny"], "unrecognized arguments: --tinny (did you mean --tiny?) "
     "(see zone edit --help)"),
    (["export", "unet", "--tiny", "--out", "x", "--heigth", "64", "--widht=64"], "unrecognized arguments: --heigth 64 "
     "--widht=64 (--heigth: did you mean --height?; --widht: did you mean --width?) (see zone export unet --help)"),
    # zone edit's switch, as the benchmark tools write it
    (["profile", "--tiny"], "unrecognized arguments: --tiny (did you mean --models tiny?) (see zone profile --help)"),
    (["bench", "--tiny"], "unrecognized arguments: --tiny (did you mean --models tiny?) (see zone bench --help)"),
    (["export", "sam", "--out", "x", "--opset"], "--opset: expected one argument (see zone export sam --help)"),
    (["serve", "--log-level", "loud"], "invalid choice: 'loud'"),
    # A mistyped command had the list of commands alone, the one meant left to find in it.
    (["edti", "x.png", "-i", "a"], "invalid choice: 'edti' (choose from 'edit', "),
    (["edti", "x.png", "-i", "a"], "; did you mean 'edit'? (see zone --help)"),
    (["bnech"], "did you mean 'bench'?"),
    (["export", "unte"], "; did you mean 'unet'? (see zone export --help)"),
    # argparse says the missing -i first: the typo that left it missing went unnamed.
    (["edit", "x.png", "--instrucion", "a", "-o", "y.png"], "required: -i/--instruction (--instrucion is not an "
     "option: did you mean --instruction?) (see zone edit --help)"),
    (["edit", "x.png", "-i", "a", "--out=y.png", "--zzz"], "required: -o/--output (--out is not an option: did you "
     "mean --output?; --zzz is not an option)"),
    # Named by the words alone: the shared "--" made --bogus "near" --out.
    (["export", "sam", "--bogus"], "required: --out (--bogus is not an option) (see zone export sam --help)"),
])
def test_argument_errors_are_one_line_from_the_command_they_were_given_to(capsys, argv, words):
    """argparse printed a 20-line usage block first, and an unknown option under `zone`'s usage, not the command's."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err


@pytest.mark.parametrize(("argv", "words"), [
    (["edit", "-1.png", "-i", "a", "-o", "y.png"], "required: image (-1.png is read as an option: for the file, "
     "write ./-1.png) (see zone edit --help)"),
    (["edit", "x.png", "-1.png", "-i", "a", "-o", "y.png"], "unrecognized arguments: -1.png (-1.png is read as an "
     "option: for the file, write ./-1.png) (see zone edit --help)"),
    (["edit", "x.png", "-i", "a", "-o", "-1.png"], "expected one argument (-1.png is read as an option"),
    # A link to an output not made yet (a shell's `>` writes through it): a file given, though it is not there.
    (["edit", "x.png", "-i", "a", "-o", "-latest.png"], "expected one argument (-latest.png is read as an option"),
    # Two dashes: a file, not a misspelt option.
    (["edit", "--1.png", "-i", "a", "-o", "y.png"], "required: image (--1.png is read as an option: for the file, "
     "write ./--1.png) (see zone edit --help)"),
    # After `--` every token is an argument: -i and -o went with the images, and `--` is no mistyped option.
    (["edit", "--", "x.png", "-i", "a", "-o", "y.png"], "required: -i/--instruction, -o/--output (see zone edit"),
])
def test_a_file_whose_name_begins_with_a_dash_is_named(tmp_path, monkeypatch, capsys, argv, words):
    """`zone edit -1.png ...` was told that no image was given (`--` called "not an option"), never why."""
    monkeypatch.chdir(tmp_path)
    for name in ("-1.png", "--1.png", "-i"):  # -i: where a file has an option's name, the option is meant
        (tmp_path / name).touch()
    (tmp_path / "-latest.png").symlink_to("results/latest.png")
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and words in err, err


def test_a_missing_image_whose_name_begins_with_a_dash_is_not_taken_for_standard_input(tmp_path, capsys,
                                                                                        monkeypatch):
    """`./-gone.png`, as the test above says to write such a file, is the path -gone.png: only `-` is stdin's."""
    monkeypatch.chdir(tmp_path)
    assert main(["edit", "./-gone.png", "-i", "x", "-o", "o.png", "--tiny"]) == 2
    assert capsys.readouterr().err == "error: image not found: -gone.png\n"


def test_names_from_a_list_take_any_case():
    from zone_engine.cli import build_parser

    args = build_parser().parse_args(["edit", "x.png", "-i", "a", "-o", "y.png", "--dtype", "FP16", "--denoiser",
                                      "Eager", "--action", "ADD", "--threshold-rule", "Paper"])
    assert (args.dtype, args.denoiser, args.action, args.threshold_rule) == ("fp16", "eager", "add", "paper")


def test_zone_edit_needs_no_serving_extra():
    """`zone edit` builds its pipeline from the serving package's PipelineSpec: that must not import the app."""
    out = subprocess.run([sys.executable, "-c", WITHOUT_SERVE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "PipelineSpec", out.stderr[-2000:]


def test_demo_writes_every_file(tmp_path, capsys):
    """--save-masks writes the masks there *also*, as its help says: the demo's folder keeps its own."""
    argv = ["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--no-progress", "--save-masks",
            str(tmp_path / "masks")]
    assert main(argv) == 0
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    masks = {f"{name}.png" for name in MASK_OUTPUTS}
    assert {"input.png", "output.png", "timings.json"} | masks <= names
    assert {p.name for p in (tmp_path / "masks").iterdir()} == masks
    summary = json.loads((tmp_path / "demo" / "timings.json").read_text())
    assert summary["random_weights"] is True and "denoise" in summary["timings"]
    assert (summary["steps"], summary["seed"], summary["instruction"]) == (2, 42, "make the house a golden statue")
    assert "RANDOM" in capsys.readouterr().err
    assert image_header(tmp_path / "demo" / "output.png").size == image_header(tmp_path / "demo" / "input.png").size


def _full_disk_at(name: str, monkeypatch) -> None:
    """save_image, or a text file's write (timings.json's), fails as a full disk would at the file called `name`,
    after the files before it were written."""
    import zone_engine.image_io as image_io
    from zone_engine.errors import OutputError

    save_image, write_text = image_io.save_image, Path.write_text

    def full_there(array, path, **kwargs):
        if Path(path).name == name:
            raise OutputError(f"cannot write {path}: No space left on device")
        return save_image(array, path, **kwargs)

    def text_full_there(path: Path, *args, **kwargs):
        if path.name.startswith(f".{Path(name).stem}.") and path.suffix == Path(name).suffix:  # its temporary
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(image_io, "save_image", full_there)
    monkeypatch.setattr(Path, "write_text", text_full_there)


def _contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize("full_at", ["heatmap.png", "timings.json"])
def test_a_demo_that_cannot_write_every_file_leaves_the_earlier_demo_whole(tmp_path, capsys, monkeypatch, full_at):
    """A full disk at the demo's last mask left its input, output and first masks over an earlier demo's others:
    a folder of two runs. Now every file is the earlier run's, and no temporary file is left; at timings.json,
    written last, too (from a mutation audit: written after the images moved, it would describe the earlier run)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "1", "--no-progress"]) == 0
    earlier = _contents(out)
    _full_disk_at(full_at, monkeypatch)
    _fails_cleanly(capsys, ["demo", "--out", str(out), "--steps", "1", "--no-progress", "-i", "make it red",
                            "--seed", "7"], "No space left on device")
    assert _contents(out) == earlier


def test_an_edit_whose_mask_cannot_be_written_keeps_the_earlier_output(photo, tmp_path, capsys, monkeypatch):
    """The masks are written before the edit: a full disk at one left an earlier run's edit beside this run's
    first masks. Now the edit and its masks are written all or none."""
    out, masks = tmp_path / "run" / "edited.png", tmp_path / "run" / "masks"
    argv = ["edit", str(photo), "-i", "add a hat", "-o", str(out), "--tiny", "--steps", "1", "--save-masks",
            str(masks), "--no-progress"]
    assert main(argv) == 0
    earlier = _contents(masks) | {"edit": out.read_bytes()}
    _full_disk_at("styled.png", monkeypatch)
    _fails_cleanly(capsys, [*argv, "--seed", "9"], "No space left on device")
    assert _contents(masks) | {"edit": out.read_bytes()} == earlier
    assert sorted(path.name for path in out.parent.iterdir()) == ["edited.png", "masks"]


def test_the_report_and_the_demo_record_the_threshold_rule_beta_and_version_the_edit_used(photo, tmp_path):
    """Edits that differ only by --threshold-rule had identical report lines: nothing said which M_b rule made them.
    The beta is the action's own (from a mutation audit: remove's alone passed for every action). The version
    names the defaults of the settings the command line does not set."""
    from zone_engine import __version__

    common = ["--steps", "1", "--no-progress"]
    for rule, action, beta in (("reference", "remove", 0.2), ("paper", "add", 0.01)):
        report = tmp_path / f"{rule}.jsonl"
        assert main(["edit", str(photo), "-i", "x", "-o", str(tmp_path / f"{rule}.png"), "--threshold-rule", rule,
                     "--action", action, "--report", str(report), "--tiny", *common]) == 0
        (record,) = [json.loads(line) for line in report.read_text().splitlines()]
        assert (record["threshold_rule"], record["beta"], record["action"]) == (rule, beta, action)
        assert record["version"] == __version__
    assert main(["demo", "--out", str(tmp_path / "demo"), "--threshold-rule", "paper", "--action", "add",
                 *common]) == 0
    summary = json.loads((tmp_path / "demo" / "timings.json").read_text())
    assert (summary["threshold_rule"], summary["beta"], summary["action"]) == ("paper", 0.01, "add")
    assert (summary["version"], summary["steps"], summary["seed"]) == (__version__, 1, 42)


def test_edit_with_tiny_models_and_masks(photo, tmp_path):
    out, masks = tmp_path / "out" / "edited.png", tmp_path / "masks"
    argv = ["edit", str(photo), "-i", "add a hat", "-o", str(out), "--tiny", "--steps", "2", "--seed", "3",
            "--save-masks", str(masks), "--no-progress"]
    assert main(argv) == 0
    assert image_header(out).size == (96, 64)
    expected = {f"{n}.png" for n in ("mask_b", "mask_f", "region", "styled", "heatmap", "difference")}
    assert {p.name for p in masks.iterdir()} == expected
    assert image_header(masks / "difference.png").mode == "L" and image_header(masks / "mask_b.png").mode == "L"
    first = np.asarray(Image.open(out))
    assert main(argv) == 0 and np.array_equal(first, np.asarray(Image.open(out)))  # same seed, same file


def test_several_images_load_the_models_once_and_go_to_a_folder_under_their_names(photo, tmp_path, capsys,
                                                                                monkeypatch):
    """A bad image is said and skipped, the others edited (exit 2 at the end); each edit is the one `zone edit`
    makes of its image alone, exactly at --batch-size 1 and up to float rounding in a batch."""
    import zone_engine.pipeline as pipeline

    other, unreadable = tmp_path / "other.jpg", tmp_path / "broken.png"
    Image.fromarray(smooth_image(64, 96, seed=5)).save(other, quality=95)
    unreadable.write_bytes(b"\x89PNG\r\n\x1a\nbroken" * 10)
    builds = []
    monkeypatch.setattr(pipeline.ZonePipeline, "tiny", _counted(pipeline.ZonePipeline.tiny, builds))
    common = ["-i", "add a hat", "--tiny", "--steps", "2", "--no-progress"]
    alone = tmp_path / "alone.png"
    assert main(["edit", str(photo), "-o", str(alone), *common]) == 0
    capsys.readouterr()
    out, masks = tmp_path / "edited", tmp_path / "masks"
    assert main(["edit", str(photo), str(unreadable), str(other), "-o", str(out), "--save-masks", str(masks),
                 *common]) == 2
    err = capsys.readouterr().err
    assert "error: cannot read" in err and "error: 1 of 3 edits not done (said above): " in err
    assert {p.name for p in out.iterdir()} == {"photo.png", "other.jpg"} and len(builds) == 2
    assert {p.name for p in masks.iterdir()} == {"photo", "other"}
    assert {p.name for p in (masks / "other").iterdir()} == {f"{name}.png" for name in MASK_OUTPUTS}
    assert np.array_equal(np.asarray(Image.open(out / "photo.png")), np.asarray(Image.open(alone)))
    assert main(["edit", str(photo), str(other), "-o", str(tmp_path / "batched"), "--batch-size", "2",
                 "--suffix", "png", *common]) == 0
    batched = np.asarray(Image.open(tmp_path / "batched" / "photo.png")).astype(int)
    assert np.abs(batched - np.asarray(Image.open(alone))).mean() < 0.5
    assert (tmp_path / "batched" / "other.png").exists()
    capsys.readouterr()
    assert main(["edit", str(other), str(photo), "-o", str(tmp_path / "jpegs"), "--suffix", "jpg", *common]) == 0
    assert capsys.readouterr().err.count("JPEG is lossy") == 1  # said once for the run, not once an image


def _counted(build, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return build(*args, **kwargs)

    return counted


def test_one_image_with_a_folder_as_output_keeps_its_name(photo, tmp_path):
    (tmp_path / "out").mkdir()
    assert main(["edit", str(photo), "-i", "add a hat", "-o", str(tmp_path / "out"), "--suffix", ".webp", "--tiny",
                 "--steps", "1", "--no-progress"]) == 0
    assert image_header(tmp_path / "out" / "photo.webp").format == "WEBP"


@pytest.mark.parametrize("extra, words", [
    (["-o", "edited.png"], ("with 2 images given -o names the folder",)),
    (["-o", "out", "--batch-size", "0"], ("--batch-size 0 must be 1..",)),
    (["-o", "out", "--suffix", ".ico"], ("ICO icons come in fixed sizes",)),
    (["-o", "."], ("the edit of photo.png would go to photo.png, over the input itself",)),
    (["-o", "out", "--report", "second.png"], ("--report second.png is a file of the edit of second.png",)),
    (["-o", "out/edits", "--report", "out/edits"], ("--report out/edits is a folder the edits' files go in",)),
    (["-o", "out", "--report", "."], ("--report . is a folder: give a file name inside it",)),
    (["-o", "out", "--report", "photo.png/report.jsonl"], ("--report photo.png/report.jsonl: ",
                                                            "photo.png is a file, not a folder")),
])
def test_several_images_with_impossible_outputs_fail_before_any_work(photo, tmp_path, capsys, monkeypatch, extra,
                                                                     words):
    monkeypatch.chdir(tmp_path)
    Image.open(photo).save(tmp_path / "second.png")
    _fails_cleanly(capsys, ["edit", "photo.png", "second.png", "-i", "add a hat", "--tiny", *extra], *words)


def test_the_largest_batch_size_is_taken_and_one_more_refused(photo, capsys, monkeypatch):
    """1..256, as --help says: the limit itself is a batch size."""
    from zone_engine.cli import build_parser
    from zone_engine.edit_files import plan_jobs

    monkeypatch.chdir(photo.parent)
    Image.open(photo).save("second.png")
    argv = ["edit", "photo.png", "second.png", "-i", "x", "-o", "out", "--tiny"]
    assert len(plan_jobs(build_parser().parse_args([*argv, "--batch-size", "256"]), "x")) == 2
    _fails_cleanly(capsys, [*argv, "--batch-size", "257"], "--batch-size 257 must be 1..256")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_a_folder_the_system_refuses_files_in_is_said_before_any_work_also_to_root(photo, capsys, monkeypatch):
    """os.access answers yes to root everywhere, in /proc too (pretended here, whoever runs the tests): a file
    made there says it cannot be, before the models load (not the write after the edit)."""
    import zone_engine.pipeline as pipeline

    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    monkeypatch.setattr(pipeline.ZonePipeline, "tiny", lambda *args, **kwargs: pytest.fail("the models were built"))
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", "/proc/zone-edit/o.png", "--tiny"],
                   "output /proc/zone-edit/o.png: cannot write in /proc (")


def test_images_of_one_name_or_unreadable_all_are_refused_before_the_models_load(photo, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    Image.open(photo).save(tmp_path / "sub" / "photo.png")
    _fails_cleanly(capsys, ["edit", str(photo), str(tmp_path / "sub" / "photo.png"), "-i", "x", "-o",
                            str(tmp_path / "out"), "--tiny"], "photo.png would be written for both ",
                   "edit them in separate runs")
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", str(tmp_path / "one.png"), "--suffix", "png",
                            "--tiny"], "--suffix is read when -o is a folder")
    for suffix in ("a b", "."):  # "." would name every edit `photo.`: a file without a suffix
        with pytest.raises(SystemExit):
            main(["edit", str(photo), "-i", "x", "-o", str(tmp_path / "out"), "--suffix", suffix])
        assert f"{suffix!r} is not a file suffix, such as .png" in capsys.readouterr().err
    _fails_cleanly(capsys, ["edit", str(photo), str(tmp_path / "gone.jpg"), "-i", "x", "-o", str(tmp_path / "out"),
                            "--tiny"], "image not found: ", "gone.jpg")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["edit", str(tmp_path / "broken.png"), str(tmp_path / "broken.jpg"), "-i", "x", "-o",
                 str(tmp_path / "out"), "--ip2p", "no-such-model"]) == 2
    err = capsys.readouterr().err  # the models load once an image is read: none here, at any batch size
    assert "2 of 2 edits not done (said above)" in err and "checkpoint" not in err


def test_a_report_line_of_an_edit_not_done_keeps_its_settings(photo, tmp_path, monkeypatch):
    """A failed edit's --report line had its error alone, without the seed, steps, action (forced) and threshold rule
    a done one's line keeps: the record to reproduce it by. Failed as its image is read (the models not built) or
    in the engine."""
    from zone_engine import __version__, pipeline

    (tmp_path / "broken.png").write_bytes(b"not a png")
    report = tmp_path / "report.jsonl"
    common = ["-i", "x", "--action", "REMOVE", "--seed", "5", "--steps", "3", "--threshold-rule", "paper",
              "--report", str(report), "--no-progress", "--tiny"]
    settings = {"action": "remove", "seed": 5, "steps": 3, "beta": 0.2, "threshold_rule": "paper",
                "version": __version__}
    assert main(["edit", str(tmp_path / "broken.png"), str(photo), "-o", str(tmp_path / "out"), *common]) == 2
    unread, done = [json.loads(line) for line in report.read_text().splitlines()]
    assert unread["error"].startswith("cannot read") and unread.items() >= settings.items()
    assert {name: done[name] for name in settings} == settings

    def failed(self, requests, **kwargs):
        return [InputImageError("too dark to edit") for _ in requests]

    monkeypatch.setattr(pipeline.ZonePipeline, "edit_batch", failed)
    shutil.copy(photo, tmp_path / "second.png")
    assert main(["edit", str(photo), str(tmp_path / "second.png"), "-o", str(tmp_path / "again"), *common]) == 2
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(records) == 2 and all(record["error"] == "too dark to edit" and record.items() >= settings.items()
                                     for record in records)


def test_one_edit_not_done_is_reported_as_one_of_several_is(photo, tmp_path, capsys, monkeypatch):
    """`zone edit IMAGE --report FILE`: an edit done wrote its line, one not done none at all (several images, or
    `zone batch`, wrote its error line): a script reading the report saw no failure. Exit code as before."""
    from zone_engine import __version__, pipeline

    (tmp_path / "broken.png").write_bytes(b"not a png")
    report = tmp_path / "report.jsonl"
    common = ["-i", "add a hat", "-o", str(tmp_path / "out.png"), "--seed", "5", "--report", str(report), "--tiny"]
    _fails_cleanly(capsys, ["edit", str(tmp_path / "broken.png"), *common], "cannot read")
    (unread,) = [json.loads(line) for line in report.read_text().splitlines()]
    assert unread == {"name": str(tmp_path / "broken.png"), "image": str(tmp_path / "broken.png"),
                      "output": str(tmp_path / "out.png"), "instruction": "add a hat", "seed": 5,
                      "steps": EditConfig.steps, "threshold_rule": "reference", "version": __version__,
                      "error": unread["error"]} and unread["error"].startswith("cannot read")

    def failed(self, requests, return_exceptions=False, **kwargs):  # as the engine fails: raised, or in its place
        if not return_exceptions:
            raise InputImageError("too dark to edit")
        return [InputImageError("too dark to edit") for _ in requests]

    monkeypatch.setattr(pipeline.ZonePipeline, "edit_batch", failed)
    _fails_cleanly(capsys, ["edit", str(photo), *common, "--action", "remove"], "too dark to edit")
    (dark,) = [json.loads(line) for line in report.read_text().splitlines()]
    assert dark["error"] == "too dark to edit" and (dark["action"], dark["beta"], dark["seed"]) == ("remove", 0.2, 5)
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("several", [False, True])
def test_an_edit_whose_file_cannot_be_written_is_reported(photo, tmp_path, capsys, monkeypatch, several):
    """A full disk under -o: the edit that could not be written got no --report line (the run stopped), a script
    reading the report saw nothing fail. Its line has the settings it was edited with, and the error."""
    from zone_engine import __version__

    Image.open(photo).save(tmp_path / "second.png")
    _full_disk_at("second.png", monkeypatch)
    report = tmp_path / "report.jsonl"
    images = [str(photo), str(tmp_path / "second.png")] if several else [str(tmp_path / "second.png")]
    output = str(tmp_path / "o") if several else str(tmp_path / "o" / "second.png")
    _fails_cleanly(capsys, ["edit", *images, "-i", "x", "-o", output, "--tiny", "--steps", "1", "--no-progress",
                            "--report", str(report)], "No space left on device")
    *done, failed = [json.loads(line) for line in report.read_text().splitlines()]
    assert [Path(record["output"]).name for record in done] == (["photo.png"] if several else [])
    assert failed == {"name": str(tmp_path / "second.png"), "image": str(tmp_path / "second.png"),
                      "output": str(tmp_path / "o" / "second.png"), "instruction": "x", "action": "add", "seed": 42,
                      "steps": 1, "beta": 0.01, "threshold_rule": "reference", "version": __version__,
                      "error": f"cannot write {tmp_path / 'o' / 'second.png'}: No space left on device"}


@pytest.mark.parametrize("append", [[], ["--skip-existing"]])
def test_a_report_that_is_a_hard_link_of_an_input_is_refused_the_input_kept(photo, tmp_path, capsys, append):
    """`--report copy.png`, copy.png a hard link of the input (another name of the file, which realpath does not
    resolve): the report was opened over it, the image emptied (or a JSON line added to it) before it was read."""
    os.link(photo, tmp_path / "copy.png")
    data = photo.read_bytes()
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", str(tmp_path / "out.png"), "--tiny",
                            "--report", str(tmp_path / "copy.png"), *append],
                   f"--report {tmp_path / 'copy.png'} is the input {photo} of the edit of {photo} (a hard link")
    assert photo.read_bytes() == data


@pytest.mark.parametrize("command", ["edit", "batch"])
def test_a_report_named_as_a_folder_is_refused_not_made_a_file(photo, tmp_path, capsys, monkeypatch, command):
    """`--report logs/`, a folder not there yet as -o would take it: the report was written to a file named logs,
    where a later step of the job put its files (exit 0)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edits.jsonl").write_text('{"image": "photo.png", "instruction": "x"}\n')
    given = ["photo.png", "-i", "x"] if command == "edit" else ["edits.jsonl"]
    with pytest.raises(SystemExit) as stop:
        main([command, *given, "-o", "out", "--tiny", "--report", "logs/"])
    assert stop.value.code == 2 and ("--report: logs/ names a folder: give the report a file name in it, such as "
                                     "logs/report.jsonl") in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_main_leaves_a_python_callers_warnings_as_they_were(tmp_path, capsys):
    """main() set the command's warning printer (`warning: ...` lines) and hid deprecations for the whole process:
    a program that ran a command in-process had its own warnings printed the command's way ever after."""
    printer, filters = warnings.showwarning, list(warnings.filters)
    assert main(["edit", str(tmp_path / "missing.png"), "-i", "x", "-o", str(tmp_path / "out.png")]) == 2
    assert warnings.showwarning is printer and warnings.filters == filters
    with pytest.raises(SystemExit):
        main(["--version"])
    assert warnings.showwarning is printer and warnings.filters == filters


def test_no_image_writes_over_another_images_input_or_files_whatever_the_links_say(photo, tmp_path, capsys,
                                                                                 monkeypatch):
    """The clash checks compared each image's files with its own input and output only: an input reached through a
    link, another's mask or edit, a file where another's masks need a folder were written over (exit 0)."""
    monkeypatch.chdir(tmp_path)
    for folder in ("src", "X", "mm/a"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("src/a.png", "X/a.png", "mm/a/mask_b.png", "a.png.png"):
        Image.open(photo).save(tmp_path / name)
    (tmp_path / "link.png").symlink_to(tmp_path / "X" / "a.png")
    common = ["-i", "x", "--tiny"]
    _fails_cleanly(capsys, ["edit", "src/a.png", "link.png", "-o", "X", *common],
                   "X/a.png, written for src/a.png, is the input link.png: it would be overwritten")
    _fails_cleanly(capsys, ["edit", "src/a.png", "mm/a/mask_b.png", "-o", "e", "--save-masks", "mm", *common],
                   "is the input mm/a/mask_b.png: it would be overwritten")
    _fails_cleanly(capsys, ["edit", "mm/a/mask_b.png", "-o", "e/", "--save-masks", "mm/a", *common],
                   "mm/a/mask_b.png, written for mm/a/mask_b.png, is the input mm/a/mask_b.png: it would be "
                   "overwritten; choose another -o or --save-masks")  # a mask over its own input, not the edit
    (tmp_path / "ml").symlink_to(tmp_path / "mm")  # the masks' folder a link: their files compared as resolved
    _fails_cleanly(capsys, ["edit", "src/a.png", "mm/a/mask_b.png", "-o", "e", "--save-masks", "ml", *common],
                   "ml/a/mask_b.png, written for src/a.png, is the input mm/a/mask_b.png: it would be overwritten")
    _fails_cleanly(capsys, ["edit", "src/a.png", "mm/a/mask_b.png", "-o", "M/a", "--save-masks", "M", *common],
                   "M/a/mask_b.png would be written for both src/a.png and mm/a/mask_b.png")
    _fails_cleanly(capsys, ["edit", "src/a.png", "a.png.png", "-o", "m5", "--save-masks", "m5", *common],
                   "m5/a.png would be a file written for src/a.png and a folder of other files written")
    _fails_cleanly(capsys, ["edit", "photo.png", "./photo.png", "-o", "twice", *common], "photo.png is given twice")
    _fails_cleanly(capsys, ["edit", "photo.png", "-o", "m/../m/mask_b.png", "--save-masks", "m", *common],
                   "m/mask_b.png would be both the edit of photo.png and one of its masks")  # one image too
    assert not any((tmp_path / name).exists() for name in ("e", "M", "m5", "twice"))  # nothing made either


def test_files_whose_names_differ_only_in_case_clash_where_the_file_system_ignores_case(photo, tmp_path, capsys,
                                                                                      monkeypatch):
    """On macOS's or Windows' file systems out/Dog.png and out/dog.png are one file: the second edit replaced the
    first, or an input. Refused there (case blindness stood in for here); where case counts they are two files."""
    from zone_engine import edit_files
    from zone_engine.cli import build_parser

    monkeypatch.chdir(tmp_path)
    for name in ("a/Dog.png", "b/dog.png", "m/Dog/Mask_B.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(photo).save(tmp_path / name)
    two_dogs = ["edit", "a/Dog.png", "b/dog.png", "-o", "out", "-i", "x", "--tiny"]
    mask_over_input = ["edit", "a/Dog.png", "m/Dog/Mask_B.png", "-o", "out", "--save-masks", "m", "-i", "x", "--tiny"]
    assert not edit_files.ignores_case(tmp_path)  # Linux: these run (the edits themselves are not needed here)
    assert [job.output.name for job in edit_files.plan_jobs(build_parser().parse_args(two_dogs), "x")] == [
        "Dog.png", "dog.png"]
    monkeypatch.setattr(edit_files, "ignores_case", lambda folder: True)
    _fails_cleanly(capsys, two_dogs, "out/dog.png and out/Dog.png, written for b/dog.png and a/Dog.png, are one "
                   "file on this file system, which ignores case")
    _fails_cleanly(capsys, mask_over_input, "m/Dog/mask_b.png, written for a/Dog.png, is the input m/Dog/Mask_B.png "
                   "on this file system, which ignores case: it would be overwritten")
    _fails_cleanly(capsys, ["edit", "a/Dog.png", "-o", "m/Dog/Mask_B.png", "--save-masks", "m/Dog", "-i", "x",
                            "--tiny"], "m/Dog/mask_b.png and m/Dog/Mask_B.png would be both the edit of a/Dog.png and "
                   "one of its masks on this file system, which ignores case")
    (tmp_path / "s").mkdir()
    # casefold makes them one; the file systems keep them two. As a UTF-8 shell's argv gives them, whatever the
    # locale (under LC_ALL=C with PYTHONUTF8=0, "Straße.png" itself is no file name Python can encode).
    street, upper, out = (os.fsdecode(name.encode()) for name in ("s/Straße.png", "s/STRASSE.png", "ß"))
    for name in (street, upper):
        Image.open(photo).save(tmp_path / name)
    assert len(edit_files.plan_jobs(build_parser().parse_args(["edit", street, upper, "-o", out, "-i", "x"]),
                                    "x")) == 2


def test_the_case_probe_looks_its_file_up_in_upper_case_and_leaves_nothing(tmp_path, monkeypatch):
    from zone_engine import edit_files

    real, looked_up = os.path.exists, []

    def case_blind(path):
        looked_up.append(os.path.basename(path))
        return real(path) or real(os.path.join(os.path.dirname(path), os.path.basename(path).lower()))

    monkeypatch.setattr(os.path, "exists", case_blind)
    assert edit_files.ignores_case(tmp_path / "not" / "yet")  # probed in the nearest folder there
    assert looked_up[-1].startswith(".ZONE-CASE-") and not list(tmp_path.iterdir())


def test_folders_among_the_inputs_are_left_out_and_edits_keep_writable_formats(photo, tmp_path, capsys,
                                                                               monkeypatch):
    """A glob such as photos/* takes folders in, and files of formats Pillow reads but cannot write as they are
    (or without a suffix: PNG); a trailing slash makes -o a folder for one image too (and for a name with a dot),
    as a folder there is without one. Each warning of an edit names its image."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thumbs").mkdir()
    Image.open(photo).save(tmp_path / "icon.ico")
    Image.open(photo).save(tmp_path / "scan", format="PNG")
    Image.fromarray(smooth_image(16, 64)).save(tmp_path / "thin.png")  # coarse: a warning of the edit's
    common = ["-i", "add a hat", "--tiny", "--steps", "1", "--no-progress"]
    assert main(["edit", "photo.png", "thumbs", "icon.ico", "scan", "thin.png", "-o", "results.v2/", *common]) == 0
    out = capsys.readouterr()
    assert "warning: thumbs is a folder: left out" in out.err and "warning: thin.png: the image is 64x16" in out.err
    assert {p.name for p in (tmp_path / "results.v2").iterdir()} == {"photo.png", "icon.png", "scan.png", "thin.png"}
    # results.v2 is there now: a folder without its slash too (its edits there, so none runs again).
    assert main(["edit", "photo.png", "scan", "-o", "results.v2", "--skip-existing", *common]) == 0
    assert "--skip-existing: all 2 edits done already" in capsys.readouterr().err
    # One image into a folder: its masks in --save-masks itself, not in a folder of its name; ~ is the home folder.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["edit", "photo.png", "-o", "single/", "--save-masks", "~/masks", *common]) == 0
    assert (tmp_path / "single" / "photo.png").exists()
    assert {p.name for p in (tmp_path / "home" / "masks").iterdir()} == {f"{name}.png" for name in MASK_OUTPUTS}


def test_a_batch_runs_each_lines_edit_as_zone_edit_would_and_says_a_bad_line_by_its_number(photo, tmp_path, capsys):
    """One image edited two ways, a line's seed, steps and action over the command's; the edit equals `zone edit`'s
    of the same settings; an unreadable image is said and skipped (exit 2)."""
    Image.open(photo).save(tmp_path / "second.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken" * 10)
    lines = [{"image": "photo.png", "instruction": "add a hat", "seed": 3},
             {"image": "photo.png", "instruction": "remove the hat", "output": "sub/removed.webp", "action": "remove"},
             {"image": "broken.png", "instruction": "add a hat", "seed": 5},
             {"image": "second.png", "instruction": "add a hat", "steps": 1}]
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n\n"
                        + "\n".join(json.dumps(line) for line in lines[2:]) + "\n")
    common = ["--tiny", "--steps", "2", "--no-progress"]
    report = tmp_path / "reports" / "report.jsonl"  # its folder made, as -o's
    assert main(["batch", str(manifest), "-o", str(tmp_path / "out"), "--save-masks", str(tmp_path / "masks"),
                 "--report", str(report), *common]) == 2
    records = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert [record["name"] for record in records] == ["line 1 (photo.png)", "line 2 (photo.png)",
                                                      "line 4 (broken.png)", "line 5 (second.png)"]
    assert [(r.get("seed"), r.get("steps"), r.get("action")) for r in records] == [
        (3, 2, "add"), (42, 2, "remove"), (5, 2, None), (42, 1, "add")]
    assert records[2]["error"].startswith("cannot read") and set(records[0]["seconds"]) >= {"denoise", "total"}
    # Every line names its edit as the list gave it and its settings; a done one says its outcome, one not done its
    # error (its action left to the classifier: unknown, as its beta).
    assert set(records[0]) == {"name", "image", "output", "instruction", "action", "seed", "steps", "beta",
                               "threshold_rule", "version", "seconds", "edited_pixels", "used_fallback", "warnings"}
    assert [(r.get("beta"), r.get("threshold_rule")) for r in records] == [
        (0.01, "reference"), (0.2, "reference"), (None, "reference"), (0.01, "reference")]  # remove's beta, ZONE.md
    assert set(records[2]) == {"name", "image", "output", "instruction", "seed", "steps", "threshold_rule", "version",
                               "error"}
    assert [(r["image"], r["output"], r["instruction"]) for r in records[1:3]] == [
        (str(photo), str(tmp_path / "out" / "sub" / "removed.webp"), "remove the hat"),
        (str(tmp_path / "broken.png"), str(tmp_path / "out" / "broken.png"), "add a hat")]
    assert type(records[0]["edited_pixels"]) is int and type(records[0]["used_fallback"]) is bool
    assert records[0]["warnings"] == []
    err = capsys.readouterr().err
    assert "error: line 4 (broken.png): cannot read" in err and "1 of 4 edits not done (said above): line 4" in err
    assert "line 2 (photo.png): action: remove" in err
    out = tmp_path / "out"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.*")) == ["photo.png", "second.png", "sub/removed.webp"]
    assert {p.name for p in (tmp_path / "masks" / "sub" / "removed").iterdir()} == {f"{m}.png" for m in MASK_OUTPUTS}
    assert main(["edit", str(photo), "-i", "add a hat", "-o", str(tmp_path / "alone.png"), "--seed", "3",
                 *common]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "photo.png")), np.asarray(Image.open(tmp_path / "alone.png")))


@pytest.mark.parametrize("line, words", [
    ('{"image": "photo.png"}', "edits.jsonl line 1: no instruction: each line names both"),
    ('{"seed": 3}', "line 1: no image and no instruction: each line names both"),
    ('{"image": true, "instruction": "x"}', "line 1: image must be a path, a string, not true"),  # not "an int"
    ('{"image": "  ", "instruction": "x"}', "line 1: image is empty: name a file"),  # not "not a string"
    ('{"image": "photo.png", "instruction": "x", "sed": 3}', "line 1: a line has no field 'sed': did you mean seed?"),
    # Said in JSON's words: "got '3'", "got True", "got int" were Python's.
    ('{"image": "photo.png", "instruction": "x", "steps": "3"}', 'line 1: steps must be a whole number, got "3"'),
    ('{"image": "photo.png", "instruction": "x", "seed": true}', "line 1: seed must be a whole number, got true"),
    ('{"image": "photo.png", "instruction": "x", "steps": [3]}', "line 1: steps must be a whole number, got an array"),
    ('{"image": "photo.png", "instruction": "x", "steps": 2.5}', "line 1: steps must be a whole number, got 2.5"),
    ('{"image": "photo.png", "instruction": "x", "seed": -Infinity}', "seed must be a whole number, got -Infinity"),
    # 1e30 is whole: out of range, not "must be a whole number, got 1e+30"
    ('{"image": "photo.png", "instruction": "x", "seed": 1e30}', "line 1: seed must be between 0 and 4294967295"),
    ('{"image": "photo.png", "instruction": "x", "output": "./"}', "line 1: output './' names -o itself, a folder"),
    ('{"image": "photo.png", "instruction": "x"}\n\ufeff{"image": "gone.png", "instruction": "x"}',
     "line 2: image not found"),  # two lists joined with cat: the second's mark was "Unexpected UTF-8 BOM"
    ('{"image": "photo.png", "instruction": 5}', "line 1: instruction must be text, got 5"),
    ('{"image": "photo.png", "instruction": "x", "action": false}', "line 1: action must be text, got false"),
    ('{"image": "photo.png", "instruction": "x", "action": "paint"}', "line 1: unknown action 'paint'"),
    ('{"image": "photo.png", "instruction": "  "}', "line 1: the instruction is empty"),
    ('{"image": "gone.png", "instruction": "x"}', "line 1: image not found"),
    ('{"image": "photo.png", "instruction": "x", "output": "../x.png"}', "must stay inside -o"),
    ('{"image": "photo.png", "instruction": "x", "output": "sub/../../x.png"}', "output 'sub/../../x.png' must stay"),
    ('{"image": "photo.png", "instruction": "x", "output": "sub/.."}', "output 'sub/..' names -o itself"),
    ('{"image": "photo.png", "instruction": "x", "output": "sub/../~/x.png"}', "not under ~"),
    ('{"image": "photo.png", "instruction": "x", "output": "/tmp/x.png"}', "must stay inside -o"),
    ('{"image": "photo.png", "instruction": "x", "output": "~/x.png"}', "not under ~"),
    ('{"image": "photo.png", "instruction": "x", "output": "./~/x.png"}', "not under ~"),  # pathlib: ~/x.png
    ('{"image": "photo.png", "instruction": "x", "output": "x.ico"}', "edits.jsonl: line 1 (photo.png): cannot write"),
    ('"photo.png"', "line 1: a string, not an object such as"),
    ('[{"image": "photo.png", "instruction": "x"}]', "a JSON array of edits is written one object a line"),
    # json.dump(edits, f, indent=2): was a bare "not JSON (Expecting value, column 2)"
    ('[\n  {\n    "image": "photo.png",\n    "instruction": "x"\n  }\n]', "line 1: not JSON (Expecting value, "
     "column 2); each line is one object such as " + MANIFEST_EXAMPLE + " (this looks like JSON spread over lines"),
    ('{\n  "image": "photo.png"\n}', "(this looks like JSON spread over lines: write one object a line"),
    ('[{"image": "photo.png", "instruction": "x"},\n{"image": "photo.png", "instruction": "y"}]',
     "(this looks like JSON spread over lines"),
    ('[ {"image": "photo.png", "instruction": "x"},\n  {"image": "photo.png", "instruction": "y"} ]',
     "(this looks like JSON spread over lines"),
    ('{"image": "photo.png", "instruction": "x", "seed": ' + "9" * 5000 + "}", "line 1: not JSON (Exceeds"),
    ('{"image": ' + "[" * 100000 + "]" * 100000 + "}", "line 1: not JSON (maximum recursion depth"),
    ('{"image": "photo.png", "instruction": "x", "output": "a\\u0000.png"}', "holds a NUL character"),
    ('{"image": "photo.png", "instruction": "x", "output": "\\ud800.png"}', "a lone surrogate"),
    ('{"image": "' + "d" * 300 + '.png", "instruction": "x"}', "over the 255 a file system takes"),
    ('{"image": ".", "instruction": "x"}', "is a directory; pass the path of an image file"),
    ('{"image": "photo.png", "instruction": "x", "action": null}', "line 1: action: null; leave a field out"),
    ('{"image": "photo.png", "instruction": "x", "action": ""}', 'action "": write auto'),
    ('{"image": "photo.png", "image": "other.png", "instruction": "x"}', "the field 'image' is given twice"),
    ('{"image": "photo.png", "instruction": "x", "' + "x" * 5000 + '": 1}', "xxx..."),
    ('{"image": "photo.png"', "line 1: not JSON"),
    ('{"image": "photo.png" "instruction": "x"}', "line 1: not JSON (Expecting ',' delimiter, column 23)"),
    ("", "lists no edit"),
    ('{"image": "photo.png", "instruction": "x"}\n{"image": "photo.png", "instruction": "y"}',
     'out/photo.png would be written for both line 1 (photo.png) and line 2 (photo.png): edit them in '
     'separate runs, or give it another "output"'),
])
def test_a_batch_line_that_cannot_run_is_refused_before_any_work(photo, tmp_path, capsys, monkeypatch, line, words):
    monkeypatch.chdir(tmp_path)  # the folder image "." is the manifest's
    (tmp_path / "edits.jsonl").write_text(line + "\n", encoding="utf-8")  # as the engine reads it, whatever LC_ALL
    _fails_cleanly(capsys, ["batch", str(tmp_path / "edits.jsonl"), "-o", str(tmp_path / "out"), "--tiny"], words)
    assert not (tmp_path / "out").exists()


def test_a_batch_line_takes_a_whole_number_written_as_json_floats_write_it(photo, tmp_path):
    """JSON has one kind of number: pandas' float column writes a seed as 7.0, which was refused as "seed must be a
    whole number, got 7.0"."""
    from zone_engine.cli import build_parser
    from zone_engine.manifest import plan_manifest

    (tmp_path / "edits.jsonl").write_text('{"image": "photo.png", "instruction": "x", "seed": 7.0, "steps": 1e1}\n')
    args = build_parser().parse_args(["batch", str(tmp_path / "edits.jsonl"), "-o", str(tmp_path / "out"), "--tiny"])
    [job] = plan_manifest(args, {})
    assert job.changes == (("steps", 10), ("seed", 7)) and all(type(value) is int for _, value in job.changes)


def test_a_batch_output_whose_dots_stay_inside_o_is_taken_by_name(photo, tmp_path):
    """An output a script joined, "./sub/../a.png", is a.png in -o (its masks' folder too), "sub/b/../c.png" is
    sub/c.png: it was refused as leaving -o ("a relative path without .."); one that leaves -o still is (above)."""
    from zone_engine.cli import build_parser
    from zone_engine.manifest import plan_manifest

    (tmp_path / "edits.jsonl").write_text('{"image": "photo.png", "instruction": "x", "output": "./sub/../a.png"}\n'
                                          '{"image": "photo.png", "instruction": "y", "output": "sub/b/../c.png"}\n')
    out = tmp_path / "out"
    args = build_parser().parse_args(["batch", str(tmp_path / "edits.jsonl"), "-o", str(out), "--tiny",
                                      "--save-masks", str(tmp_path / "masks")])
    first, second = plan_manifest(args, {})
    assert (first.output, first.masks) == (out / "a.png", tmp_path / "masks" / "a")
    assert second.output == out / "sub" / "c.png"


def test_a_report_is_refused_where_it_is_the_commands_own_output(tmp_path, capfd):
    """--report /dev/stdout with stdout a file (`> out.txt`): the report, opened again from the file's start, and the
    written paths overwrote each other; a pipe was refused as "/proc/N/fd/pipe:[...]: cannot write in ..."."""
    from zone_engine.edit_files import check_report_path

    for stream, name in (("/dev/stdout", "standard output"), ("/dev/stderr", "standard error")):
        with pytest.raises(OutputError, match=f"--report {stream} is the command's {name}, where its own lines go"):
            check_report_path(Path(stream), [])
    check_report_path(tmp_path / "report.jsonl", [])  # a file of its own


def test_a_report_to_a_dash_is_refused_not_written_to_a_file_named_dash(photo, tmp_path, capsys, monkeypatch):
    """`--report -`, as `zone batch -` reads standard input, wrote the report to a file named `-` in the current
    folder, unsaid; `-o -` was refused already."""
    monkeypatch.chdir(tmp_path)
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "add a hat", "-o", "out.png", "--tiny", "--report", "-"],
                   "--report -: the report is written to a file, not standard output")
    assert not (tmp_path / "-").exists() and not (tmp_path / "out.png").exists()


def test_a_batch_refuses_a_file_as_o_a_bad_batch_size_and_a_list_it_cannot_read_before_any_work(photo, tmp_path,
                                                                                              capsys, monkeypatch):
    """From a mutation audit: `zone batch`'s own checks of the command (not of a line) were never run; a line's
    field is checked over the command's, not hidden by it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edits.jsonl").write_text('{"image": "photo.png", "instruction": "x", "steps": "3"}\n')
    for extra, words in ((["-o", "edited.png"], "-o edited.png: for a batch -o names the folder the edits go to"),
                         (["-o", "out", "--batch-size", "0"], "--batch-size 0 must be 1.."),
                         (["-o", "out", "--steps", "2"], "edits.jsonl line 1: steps must be a whole number")):
        _fails_cleanly(capsys, ["batch", "edits.jsonl", *extra, "--tiny"], *words)
    _fails_cleanly(capsys, ["batch", "gone.jsonl", "-o", "out", "--tiny"],
                   "cannot read the list of edits gone.jsonl: No such file or directory")
    assert not (tmp_path / "out").exists()


def test_a_batch_list_not_in_utf8_is_said_with_what_to_do(tmp_path, capsys, monkeypatch):
    """Windows PowerShell 5's `>` writes UTF-16: that was "'utf-8' codec can't decode byte 0xff in position 0"."""
    monkeypatch.chdir(tmp_path)
    line = '{"image": "photo.png", "instruction": "x"}\n'
    (tmp_path / "utf16.jsonl").write_bytes(line.encode("utf-16"))  # with its byte-order mark
    (tmp_path / "utf16be.jsonl").write_bytes(b"\xfe\xff" + line.encode("utf-16-be"))  # the other byte order's mark
    (tmp_path / "latin1.jsonl").write_bytes(line.replace("x", "café").encode("latin-1"))
    _fails_cleanly(capsys, ["batch", "utf16.jsonl", "-o", "out", "--tiny"],
                   "cannot read the list of edits utf16.jsonl: it is UTF-16; save it as UTF-8")
    _fails_cleanly(capsys, ["batch", "utf16be.jsonl", "-o", "out", "--tiny"], "utf16be.jsonl: it is UTF-16")
    _fails_cleanly(capsys, ["batch", "latin1.jsonl", "-o", "out", "--tiny"],
                   "byte 0xe9 at offset 42 is not UTF-8; save it as UTF-8")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("report", ["edits.jsonl", "sub/../edits.jsonl", "link.jsonl"])
def test_a_batch_report_is_not_written_over_its_list_of_edits(photo, tmp_path, capsys, monkeypatch, report):
    monkeypatch.chdir(tmp_path)
    listed = '{"image": "photo.png", "instruction": "add a hat"}\n'
    (tmp_path / "edits.jsonl").write_text(listed)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "edits.jsonl")
    _fails_cleanly(capsys, ["batch", "edits.jsonl", "-o", "out", "--tiny", "--report", report],
                   f"--report {report} is the list of edits edits.jsonl: write the report to another file")
    assert (tmp_path / "edits.jsonl").read_text() == listed and not (tmp_path / "out").exists()


@pytest.mark.parametrize("absolute", [False, True])
def test_a_batch_edit_is_not_written_over_its_list_of_edits(photo, tmp_path, capsys, monkeypatch, absolute):
    """A list named like an image (a line's "output" may name any file): the list was overwritten by the edit. The
    same file however spelt: the list given as edits.png, the output in -o's full path."""
    monkeypatch.chdir(tmp_path)
    listed = '{"image": "photo.png", "instruction": "add a hat", "output": "edits.png"}\n'
    (tmp_path / "edits.png").write_text(listed)
    out = str(tmp_path) if absolute else "."
    _fails_cleanly(capsys, ["batch", "edits.png", "-o", out, "--tiny"], "is the list of edits edits.png: it would be "
                   'overwritten; give that edit another "output"')
    assert (tmp_path / "edits.png").read_text() == listed


def test_a_report_may_be_a_named_pipe(tmp_path):
    """--report is written into as the edits end, not moved into place as an output is (a pipe as -o is refused):
    a named pipe a script reads takes it."""
    from zone_engine.edit_files import check_report_path

    check_report_path(Path(_fifo(tmp_path / "report.jsonl")), [])


@pytest.mark.parametrize("append", [True, False])
def test_a_reports_lines_land_after_those_another_run_writes_meanwhile(tmp_path, append):
    """Two runs writing one --report: the one started over wrote from its own offset, over the other's lines (seen
    with two processes). Opened with O_APPEND, each line lands at the end; started over, the file is emptied once."""
    from zone_engine.edit_files import open_report

    report = tmp_path / "report.jsonl"
    report.write_bytes(b"before\n")
    with open_report(report, append) as ours, open(report, "ab", buffering=0) as other:
        other.write(b"other 1\n")
        ours.write(b"ours\n")
        other.write(b"other 2\n")
    assert report.read_bytes() == (b"before\n" if append else b"") + b"other 1\nours\nother 2\n"
    # A new report is made as open() makes a file (0o666 less the umask): readable by whom the user's files are.
    open_report(tmp_path / "new.jsonl", append).close()
    (tmp_path / "plain").touch()
    assert (tmp_path / "new.jsonl").stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.parametrize("several", [True, False])
def test_a_report_line_that_cannot_be_written_is_said_and_taken_back(tmp_path, several):
    """A full disk under --report: the buffered line's flush was a traceback, exit 1, and the file's close raised
    again. Now an OutputError saying what was done and how to go on; the line's part written taken back."""
    import errno

    from zone_engine.edit_files import EditJob, _Run

    class FillsUp(io.FileIO):
        fits = 1

        def write(self, data):  # one byte fits, then the disk is full
            if not self.fits:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.fits -= 1
            return super().write(bytes(data[:1]))

    report = tmp_path / "report.jsonl"
    report.write_bytes(b"earlier\n")
    job = EditJob(Path("a.png"), Path("out/a.png"), None, "make it gold")
    with FillsUp(report, "ab") as opened:
        with open(report, "ab") as other:  # another run's line, after ours began: taking ours back keeps it
            other.write(b"another run's\n")
        run = _Run(total=3, several=several, in_flight=1, written=1, report=opened)
        with pytest.raises(OutputError, match="cannot write --report .*report.jsonl: No space left on dev") as said:
            run.record(job, action="add")
        run.record(job, action="add")  # the run stops: no more lines tried
    assert ("2 of 3 edits not done; mend it, then run the same command with --skip-existing" in str(said.value)
            if several else str(said.value).endswith("the edit was written to out/a.png"))
    assert report.read_bytes() == b"earlier\nanother run's\n"
    if not several:  # one edit not done: its line could not say so, nor may this say it written
        with FillsUp(report, "ab") as opened, pytest.raises(OutputError) as said:
            _Run(total=1, several=False, in_flight=1, report=opened).record(job, error="cannot read a.png")
        assert str(said.value).endswith("; the edit was not done: cannot read a.png")


def test_a_report_line_is_written_under_an_exclusive_lock(tmp_path):
    """Another run writing the same report waits while a line is written: its line could land between the start of
    ours and our take-back of it on a full disk, and be cut with it."""
    import fcntl

    from zone_engine.edit_files import EditJob, _Run

    report = tmp_path / "report.jsonl"
    held = []

    class Watched(io.FileIO):
        def write(self, data):
            with open(report, "ab") as other:  # another run's open of the same file
                try:
                    fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.append(True)
                else:
                    held.append(False)
            return super().write(data)

    with Watched(report, "ab") as opened:
        _Run(total=1, several=False, in_flight=1, written=1, report=opened).record(
            EditJob(Path("a.png"), Path("out/a.png"), None, "make it gold"), action="add")
        with open(report, "ab") as other:  # released after the line
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert held == [True] and json.loads(report.read_text())["action"] == "add"


def test_a_batch_line_reads_an_image_under_the_home_folder_as_a_shell_would(photo, tmp_path, monkeypatch, capsys):
    """~/ is the home folder; ~draft.png and ~nobody-zone/ are names beside the list, here the current folder
    (expanduser raised on the first; the reader took the second for a user's home, and raised)."""
    monkeypatch.setenv("HOME", str(photo.parent))
    lists = tmp_path / "lists"
    (lists / "~nobody-zone").mkdir(parents=True)
    Image.open(photo).save(lists / "~draft.png")
    Image.open(photo).save(lists / "~nobody-zone" / "kept.png")
    lines = [{"image": f"~/{photo.name}", "instruction": "x"}, {"image": "~draft.png", "instruction": "x"},
             {"image": "~nobody-zone/kept.png", "instruction": "x"}]
    (lists / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    monkeypatch.chdir(lists)
    assert main(["batch", "edits.jsonl", "-o", str(tmp_path / "out"), "--tiny", "--steps", "1",
                 "--no-progress"]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {photo.name, "~draft.png", "kept.png"}
    (lists / "edits.jsonl").write_text('{"image": ".", "instruction": "x"}\n')  # no part to begin with ~: IndexError
    _fails_cleanly(capsys, ["batch", "edits.jsonl", "-o", str(tmp_path / "out"), "--tiny"], "line 1", "directory")


def test_a_batch_names_a_file_in_utf8_under_an_ascii_locale(photo, tmp_path):
    """LC_ALL=C with PYTHONUTF8=0 (the file system encoding ASCII): a list's "café.png" was refused before any work,
    as if it held a lone surrogate; the name is its UTF-8 bytes, as a UTF-8 shell's argv gives it."""
    name = os.fsdecode("café.png".encode())
    shutil.copy(photo, tmp_path / name)
    (tmp_path / "edits.jsonl").write_text('{"image": "café.png", "instruction": "add a hat"}\n', encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    run = subprocess.run([sys.executable, "-m", "zone_engine.cli", "batch", "edits.jsonl", "-o", "out", "--tiny",
                          "--steps", "1", "--no-progress"], cwd=tmp_path, env=env, capture_output=True, timeout=240)
    assert run.returncode == 0 and (tmp_path / "out" / name).exists(), run.stderr.decode(errors="replace")[-2000:]


def test_a_batch_reads_what_json_writers_write_and_standard_input(photo, tmp_path, capsys, monkeypatch):
    """json.dumps(ensure_ascii=False) leaves U+2028 unescaped (str.splitlines cut the line there); Windows editors
    write a byte-order mark; `-` reads standard input, its images relative to the current folder (and so named).
    """
    line = json.dumps({"image": "photo.png", "instruction": "add a hat\u2028please"}, ensure_ascii=False)
    (tmp_path / "edits.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n")
    common = ["--tiny", "--steps", "1", "--no-progress"]
    assert main(["batch", str(tmp_path / "edits.jsonl"), "-o", str(tmp_path / "out"), *common]) == 0
    assert (tmp_path / "out" / "photo.png").exists()
    monkeypatch.chdir(tmp_path)
    piped = b"\xef\xbb\xbf" + '{"image": "photo.png", "instruction": "add a café hat"}\n'.encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped), encoding="latin-1"))  # not the locale's
    assert main(["batch", "-", "-o", "piped", "--report", "piped.jsonl", *common]) == 0
    assert (tmp_path / "piped" / "photo.png").exists()
    # named as the line gives it, as from a list in this folder (it was the current folder's absolute path)
    assert json.loads((tmp_path / "piped.jsonl").read_text(encoding="utf-8"))["image"] == "photo.png"
    monkeypatch.setattr(sys, "stdin", None)  # `zone batch - <&-`
    _fails_cleanly(capsys, ["batch", "-", "-o", "piped", *common], "standard input, which is closed here")


def test_a_batch_read_from_a_terminal_says_how_to_end_the_list(tmp_path, monkeypatch, capsys):
    """`zone batch -` typed at a terminal waited there for the list, saying nothing."""
    class Typed(io.TextIOWrapper):
        def isatty(self):
            return True

    typed = json.dumps({"image": "missing.png", "instruction": "add a hat"}).encode() + b"\n"
    for stream, said in ((Typed(io.BytesIO(typed)), True), (io.TextIOWrapper(io.BytesIO(typed)), False)):
        monkeypatch.setattr(sys, "stdin", stream)
        main(["batch", "-", "-o", str(tmp_path / "out"), "--tiny", "--no-progress"])
        assert ("one JSON line per edit, then Ctrl-D" in capsys.readouterr().err) is said


def test_a_batch_skips_blank_lines_of_any_kind_and_takes_a_suffix_without_its_dot(photo, tmp_path):
    """A list saved on Windows has CRLF blank lines, one edited by hand lines of spaces: each skipped, not "not JSON".
    --suffix jpg is --suffix .jpg, for the edits without an "output" (a line's own output keeps its suffix)."""
    lines = [json.dumps({"image": "photo.png", "instruction": "add a hat"}), "", "   ",
             json.dumps({"image": "photo.png", "instruction": "add a hat", "output": "kept.png"}), ""]
    (tmp_path / "edits.jsonl").write_bytes("\r\n".join(lines).encode())
    assert main(["batch", str(tmp_path / "edits.jsonl"), "-o", str(tmp_path / "out"), "--suffix", "jpg", "--tiny",
                 "--steps", "1", "--no-progress"]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"photo.jpg", "kept.png"}
    assert image_header(tmp_path / "out" / "photo.jpg").format == "JPEG"


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd")
def test_an_image_or_a_list_of_edits_given_as_an_open_file_is_read(photo, tmp_path, monkeypatch):
    """/dev/fd/N, as a caller's open file or a shell's <(...) passes it: the image read through the link; the list's
    images found in the current folder (as for standard input), not in /dev/fd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "edits.jsonl").write_text('{"image": "photo.png", "instruction": "add a hat"}\n')
    common = ["--tiny", "--steps", "1", "--no-progress"]
    with open(photo, "rb") as image, open(tmp_path / "lists" / "edits.jsonl", "rb") as listed:
        assert main(["edit", f"/dev/fd/{image.fileno()}", "-i", "add a hat", "-o", "edited.png", *common]) == 0
        assert main(["batch", f"/dev/fd/{listed.fileno()}", "-o", "out", *common]) == 0
    assert image_header(tmp_path / "edited.png").size == (96, 64) and (tmp_path / "out" / "photo.png").exists()


def test_a_librarys_warning_on_reading_an_image_is_said_once_with_its_name(photo, tmp_path, capsys):
    """Pillow warns "Corrupt EXIF data" twice, naming no file: among many images, which one was it?"""
    exif = Image.Exif()
    exif[0x0112] = 6  # an orientation, so there is an IFD to damage
    buffer = io.BytesIO()
    Image.open(photo).save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    start = data.find(b"Exif\x00\x00") + 6
    data[start + 8:start + 10] = b"\xff\xff"  # the IFD's entry count, past the data
    (tmp_path / "damaged.jpg").write_bytes(bytes(data))
    assert main(["edit", str(tmp_path / "damaged.jpg"), str(photo), "-i", "add a hat", "-o", str(tmp_path / "out"),
                 "--tiny", "--steps", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("Corrupt EXIF data") == 1 and f"warning: {tmp_path / 'damaged.jpg'}: Corrupt EXIF data" in err


def test_a_result_that_cannot_be_written_stops_a_run_saying_how_to_go_on(photo, tmp_path, capsys, monkeypatch):
    """A full disk fails every edit after it: the run stops there, saying how many are not written."""
    Image.open(photo).save(tmp_path / "second.png")
    _full_disk_at("second.png", monkeypatch)
    _fails_cleanly(capsys, ["edit", str(photo), str(tmp_path / "second.png"), "-i", "x", "-o", str(tmp_path / "o"),
                            "--tiny", "--steps", "1", "--no-progress"],
                   "No space left on device (the run stopped: 1 of 2 edits not written", "--skip-existing")
    assert (tmp_path / "o" / "photo.png").exists()


def test_an_edits_files_are_written_while_the_next_is_edited_and_said_in_order(photo, tmp_path, capsys,
                                                                              monkeypatch):
    """A 12 MP PNG takes seconds of a core to write: the first edit's write waits here until the second edit has
    begun, which it can only do if the write runs beside it (else the wait times out, and the test fails)."""
    import threading

    import zone_engine.image_io as image_io
    import zone_engine.pipeline as pipeline

    second_begun, begun_while_writing = threading.Event(), []
    edit_batch, save_image = pipeline.ZonePipeline.edit_batch, image_io.save_image

    def edit_marked(self, requests, **kwargs):
        if requests[0].image.shape[0] == 72:  # the second image
            second_begun.set()
        return edit_batch(self, requests, **kwargs)

    def slow_save(array, path, **kwargs):
        if Path(path).name == "photo.png":
            begun_while_writing.append(second_begun.wait(timeout=20))
        return save_image(array, path, **kwargs)

    monkeypatch.setattr(pipeline.ZonePipeline, "edit_batch", edit_marked)
    monkeypatch.setattr(image_io, "save_image", slow_save)
    Image.fromarray(smooth_image(72, 96, seed=1)).save(tmp_path / "second.png")
    report = tmp_path / "report.jsonl"
    assert main(["edit", str(photo), str(tmp_path / "second.png"), "-i", "x", "-o", str(tmp_path / "o"), "--tiny",
                 "--steps", "1", "--no-progress", "--report", str(report)]) == 0
    assert begun_while_writing == [True]
    err = capsys.readouterr().err
    assert err.index("photo.png: action") < err.index("second.png: action")
    names = [Path(json.loads(line)["name"]).name for line in report.read_text().splitlines()]
    assert names == ["photo.png", "second.png"]


def test_a_run_cut_short_says_and_reports_the_edits_whose_files_were_written(photo, tmp_path, capsys,
                                                                            monkeypatch):
    """Ctrl-C while the second image is edited, the first's write under way: it finishes and is said and
    reported (its line was lost with the queue); the third is not written."""
    import time

    import zone_engine.image_io as image_io
    import zone_engine.pipeline as pipeline

    edit_batch, save_image, edits = pipeline.ZonePipeline.edit_batch, image_io.save_image, []

    def interrupted_at_the_second(self, requests, **kwargs):
        edits.append(1)
        if len(edits) == 2:
            raise KeyboardInterrupt
        return edit_batch(self, requests, **kwargs)

    def slow_save(array, path, **kwargs):
        time.sleep(0.5)  # still writing when the interrupt comes
        return save_image(array, path, **kwargs)

    monkeypatch.setattr(pipeline.ZonePipeline, "edit_batch", interrupted_at_the_second)
    monkeypatch.setattr(image_io, "save_image", slow_save)
    images = []
    for name in ("a.png", "b.png", "c.png"):
        Image.open(photo).save(tmp_path / name)
        images.append(str(tmp_path / name))
    report = tmp_path / "report.jsonl"
    assert main(["edit", *images, "-i", "x", "-o", str(tmp_path / "o"), "--tiny", "--steps", "1", "--no-progress",
                 "--report", str(report)]) == 130
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["a.png"]
    assert [Path(json.loads(line)["name"]).name for line in report.read_text().splitlines()] == ["a.png"]
    said = capsys.readouterr()
    assert str(tmp_path / "o" / "a.png") in said.out
    # how to go on: a run cut short said only "interrupted"
    assert said.err.strip().splitlines()[-2:] == [
        "2 of 3 edits not done; to do them, run the same command with --skip-existing", "interrupted"]


@pytest.mark.parametrize("images", [1, 2])
def test_a_run_cut_short_with_no_edit_left_says_none_to_resume(photo, tmp_path, capsys, monkeypatch, images):
    """One edit (its models loading) has nothing to resume, and several cut short as the last file written is
    said have none left: only "interrupted", no "1 of 1" or "0 of 2 edits not done" line to run again."""
    import zone_engine.edit_files as edit_files
    from zone_engine.serving.settings import PipelineSpec

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def said_until_the_last(path):
        if path.name == f"{images}.png":
            interrupted()

    monkeypatch.setattr(*(PipelineSpec, "build", interrupted) if images == 1 else
                        (edit_files, "print_path", said_until_the_last))
    names = [f"{number}.png" for number in range(1, images + 1)]
    for name in names:
        Image.open(photo).save(tmp_path / name)
    output = tmp_path / ("o.png" if images == 1 else "o")
    assert main(["edit", *(str(tmp_path / name) for name in names), "-i", "x", "-o", str(output), "--tiny",
                 "--steps", "1", "--no-progress"]) == 130
    assert "not done" not in capsys.readouterr().err


def test_after_a_write_fails_no_later_edit_is_written(photo, tmp_path, capsys, monkeypatch):
    """A batch of two: both edits' writes are queued at once; the second is not tried after the first fails. The
    first fails only once the second is queued (else the run could stop before queueing it, the check untried)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import zone_engine.edit_files as edit_files
    import zone_engine.image_io as image_io
    from zone_engine.errors import OutputError

    tried, queued, held = [], threading.Event(), []

    class Writer(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args, **kwargs):
            future = super().submit(*args, **kwargs)
            Writer.submitted += 1
            if Writer.submitted == 2:
                queued.set()
            return future

    def full(array, path, **kwargs):
        tried.append(Path(path).name)
        held.append(queued.wait(timeout=20))
        raise OutputError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(edit_files, "ThreadPoolExecutor", Writer)
    monkeypatch.setattr(image_io, "save_image", full)
    for name in ("second.png", "third.png"):
        Image.open(photo).save(tmp_path / name)
    images = [str(photo), str(tmp_path / "second.png"), str(tmp_path / "third.png")]
    err = _fails_cleanly(capsys, ["edit", *images, "-i", "x", "-o", str(tmp_path / "o"), "--tiny", "--steps", "1",
                                  "--no-progress", "--batch-size", "2"], "(the run stopped: 3 of 3 edits not written")
    assert tried == ["photo.png"] and held == [True]
    assert not [line for line in err if "edits not done" in line], err  # the error says how to go on, not Ctrl-C's


def test_each_batch_is_said_as_it_is_read_and_none_after_a_write_failed(photo, tmp_path, capsys, monkeypatch):
    """Several images: a line `[n/N] names` says which are read now, the progress bars on too. A write that failed
    is noticed before the next image is read: the run stops there, the next image's line not said."""
    from concurrent.futures import ThreadPoolExecutor, wait

    import zone_engine.edit_files as edit_files
    import zone_engine.image_io as image_io
    from zone_engine.errors import OutputError

    monkeypatch.chdir(tmp_path)
    Image.fromarray(smooth_image(64, 96, seed=5)).save("second.png")
    argv = ["edit", "photo.png", "second.png", "-i", "add a hat", "--tiny", "--steps", "1"]  # no --no-progress
    assert main([*argv, "-o", "out"]) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")] == [
        "[1/2] photo.png", "[2/2] second.png"]

    class Writer(ThreadPoolExecutor):  # each write over before the run goes on, as on a disk that fails at once
        def submit(self, *args, **kwargs):
            future = super().submit(*args, **kwargs)
            wait([future])
            return future

    def full(array, path, **kwargs):
        raise OutputError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(edit_files, "ThreadPoolExecutor", Writer)
    monkeypatch.setattr(image_io, "save_image", full)
    assert main([*argv, "-o", "full"]) == 2
    err = capsys.readouterr().err
    assert "[1/2] photo.png" in err and "[2/2]" not in err and "(the run stopped: 2 of 2 edits not written" in err


def test_progress_written_to_a_log_is_whole_lines_not_redrawn_bars(photo, tmp_path, capsys, monkeypatch):
    """stderr not a terminal (`2> log`, nohup, systemd): tqdm's bars were redrawn there with carriage returns, a
    few KB of CR-joined redraws an edit; now whole lines (every LOG_INTERVAL_S, here every step), and diffusers' and
    transformers' loading bars hidden as with --no-progress."""
    import zone_engine.cli as cli
    import zone_engine.progress as progress

    hidden = []
    monkeypatch.setattr(cli, "_without_library_progress_bars", lambda build: hidden.append(True) or build())
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    assert main(["edit", str(photo), "-i", "add a hat", "-o", str(tmp_path / "out.png"), "--tiny", "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert [line.split(" in ")[0] for line in lines if line.startswith("denoising")] == [
        "denoising: 50% (1/2 steps)", "denoising: 100% (2/2 steps)"]
    assert any(line.startswith("segmenting: 100% (") for line in lines)
    assert hidden == [True]


def test_a_progress_bar_ended_within_the_interval_writes_no_line_to_a_log_and_a_terminal_keeps_tqdms():
    """A log gets no line of a bar that ended within LOG_INTERVAL_S (an edit on a GPU: its [k/N] and summary lines
    say it); a terminal keeps tqdm's bar, redrawn in place."""
    from zone_engine.progress import progress_bar

    log = io.StringIO()
    with progress_bar(total=3, desc="denoising", unit="step", file=log) as bar:
        bar.update(3)
    assert log.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    with progress_bar(total=3, desc="denoising", unit="step", file=terminal) as bar:
        bar.update(3)
    assert "\rdenoising: 100%|" in terminal.getvalue()


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's id is a process id kill can ask about on Linux only")
def test_a_rerun_removes_the_partial_file_a_killed_run_left_and_says_so(photo, tmp_path, capsys):
    """`kill -9` of `zone batch` while it wrote left `.photo.TID.partial.png` beside the outputs for good; the rerun
    (--skip-existing or not) removes it, in a line, before any model loads."""
    from zone_engine.paths import _temporary_name

    killed = subprocess.Popen([sys.executable, "-c", ""])  # its main thread's id: a thread that is gone
    killed.wait()
    out = tmp_path / "out"
    out.mkdir()
    partial = out / _temporary_name(out / "photo.png", killed.pid)
    partial.write_bytes(b"\x89PNG half")
    assert main(["edit", str(photo), "-i", "add a hat", "-o", f"{out}/", "--tiny", "--steps", "1", "--no-progress",
                 "--skip-existing"]) == 0
    assert not partial.exists() and (out / "photo.png").exists()
    assert f"removed 1 partial file(s) left by an earlier run killed while writing them: {partial}" in (
        capsys.readouterr().err)


def test_an_edit_that_fell_back_to_the_attention_mask_is_warned_of_by_name_and_reported(photo, tmp_path, capsys,
                                                                                      monkeypatch):
    """No SAM segment overlapped M_b (here the first edit's segmenter finds none): M_b was used, which the summary
    says with the edit's name and the report records; the edit that found one says nothing of it."""
    import zone_engine.pipeline as pipeline
    from zone_engine import refine

    refined, calls = pipeline.refine_with_sam, []

    def none_found_first(segmenter, image, mask_b, config, *, progress=False):
        calls.append(1)
        if len(calls) > 1:
            return refined(segmenter, image, mask_b, config, progress=progress)
        return refine.refine_mask(mask_b, refine.Selection(None, 0.0, 0), min_area=config.min_region_area,
                                  dilate_kernel=config.dilate_kernel, dilate_iterations=config.dilate_iterations)

    monkeypatch.setattr(pipeline, "refine_with_sam", none_found_first)
    monkeypatch.chdir(tmp_path)
    Image.fromarray(smooth_image(64, 96, seed=5)).save("second.png")
    assert main(["edit", "photo.png", "second.png", "-i", "add a hat", "-o", "out", "--tiny", "--steps", "1",
                 "--no-progress", "--report", "report.jsonl"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "no SAM segment" in line]
    assert warned == ["warning: photo.png: no SAM segment overlapped the attention mask; the attention mask was used"]
    assert [json.loads(line)["used_fallback"] for line in Path("report.jsonl").read_text().splitlines()] == [
        True, False]


def test_skip_existing_resumes_a_run_without_loading_the_models_for_what_is_done(photo, tmp_path, capsys,
                                                                                 monkeypatch):
    import zone_engine.pipeline as pipeline

    Image.open(photo).save(tmp_path / "second.png")
    out, images = tmp_path / "out", [str(photo), str(tmp_path / "second.png")]
    common = ["-i", "add a hat", "-o", str(out), "--tiny", "--steps", "1", "--no-progress"]
    report = ["--report", str(tmp_path / "report.jsonl")]  # the resumed run's lines added to the first's

    def reported() -> list[str]:
        return [Path(json.loads(line)["name"]).name for line in Path(report[1]).read_text().splitlines()]

    assert main(["edit", images[0], "-o", f"{out}/", *common[:2], *common[4:], *report]) == 0  # an interrupted run's
    before = (out / "photo.png").stat().st_mtime_ns
    builds = []
    monkeypatch.setattr(pipeline.ZonePipeline, "tiny", _counted(pipeline.ZonePipeline.tiny, builds))
    capsys.readouterr()
    assert main(["edit", *images, *common, "--skip-existing", *report]) == 0
    assert "--skip-existing: 1 of 2 edits left out" in capsys.readouterr().err and len(builds) == 1
    assert (out / "photo.png").stat().st_mtime_ns == before and (out / "second.png").exists()
    assert reported() == ["photo.png", "second.png"]
    assert main(["edit", *images, *common, "--skip-existing", *report]) == 0 and len(builds) == 1  # all done: no model
    assert reported() == ["photo.png", "second.png"]
    assert main(["edit", images[1], "-o", str(tmp_path / "again.png"), *common[:2], *common[4:], *report]) == 0
    assert reported() == ["second.png"]  # without --skip-existing a report starts anew


def test_the_output_is_written_after_the_masks_so_its_presence_means_the_edit_is_whole(photo, tmp_path,
                                                                                     monkeypatch, capsys):
    import zone_engine.image_io as image_io

    out, masks, save_image = tmp_path / "edited.png", tmp_path / "masks", image_io.save_image

    def disk_full_at_masks(array, path, **kwargs):
        if path.parent == masks:
            raise OSError(28, "No space left on device", str(path))
        return save_image(array, path, **kwargs)

    monkeypatch.setattr(image_io, "save_image", disk_full_at_masks)
    argv = ["edit", str(photo), "-i", "add a hat", "-o", str(out), "--tiny", "--steps", "1", "--no-progress",
            "--save-masks", str(masks)]
    assert main(argv) == 2 and "No space left on device" in capsys.readouterr().err
    assert not out.exists()


RGB_PROFILE = rgb_profile()


def test_edit_to_bmp_warns_that_the_colour_profile_is_lost(photo, tmp_path, capsys):
    profiled, out = tmp_path / "profiled.png", tmp_path / "edited.bmp"
    Image.open(photo).save(profiled, icc_profile=RGB_PROFILE)
    assert main(["edit", str(profiled), "-i", "add a hat", "-o", str(out), "--tiny", "--steps", "1",
                 "--no-progress"]) == 0
    assert "BMP cannot carry the input's colour profile" in capsys.readouterr().err  # Pillow's BMP drops it
    assert "icc_profile" not in image_header(out).info


def test_the_output_path_is_printed_as_its_bytes_and_a_closed_pipe_is_no_error(photo, tmp_path, capsysbinary):
    """A name that is not UTF-8 was a UnicodeEncodeError after the edit; `| head -0` a BrokenPipeError (exit 1)."""
    out = tmp_path / "o_\udcff.png"  # the byte 0xff, as Python holds a name that is not UTF-8
    assert main(["edit", str(photo), "-i", "add a hat", "-o", str(out), "--tiny", "--steps", "1", "--no-progress"]) == 0
    assert capsysbinary.readouterr().out == os.fsencode(out) + b"\n"
    command = [sys.executable, "-m", "zone_engine.cli", "edit", str(photo), "-i", "add a hat", "-o",
               str(tmp_path / "p.png"), "--tiny", "--steps", "1", "--no-progress"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        process.stdout.close()  # the reader gone before the path is written
        assert process.wait(120) == 0 and b"Traceback" not in process.stderr.read()
    assert (tmp_path / "p.png").exists()


def test_edit_to_jpeg_warns_that_it_is_lossy_and_keeps_the_colour_profile(photo, tmp_path, capsys):
    profiled, out, masks = tmp_path / "profiled.png", tmp_path / "edited.jpg", tmp_path / "masks"
    Image.open(photo).save(profiled, icc_profile=RGB_PROFILE)
    argv = ["edit", str(profiled), "-i", "add a hat", "-o", str(out), "--tiny", "--steps", "1", "--no-progress",
            "--save-masks", str(masks)]
    assert main(argv) == 0
    assert "JPEG is lossy" in capsys.readouterr().err
    assert image_header(out).info["icc_profile"] == RGB_PROFILE
    # The colour images beside it are in the input's colours too; the masks are not colours.
    profiles = {path.stem: image_header(path).info.get("icc_profile") for path in masks.iterdir()}
    assert profiles == {"styled": RGB_PROFILE, "heatmap": RGB_PROFILE, "mask_b": None, "mask_f": None, "region": None,
                        "difference": None}


def test_edit_writes_every_format_pillow_writes_saying_what_it_loses(photo, tmp_path, capsys):
    """A list of seven suffixes refused .gif, .qoi, .tga, .jp2 and .avif, which save_image writes (the notes for
    GIF and AVIF could not be reached from the command line)."""
    out = tmp_path / "edited.gif"
    assert main(["edit", str(photo), "-i", "add a hat", "-o", str(out), "--tiny", "--steps", "1",
                 "--no-progress"]) == 0
    assert "GIF keeps at most 256 colours" in capsys.readouterr().err
    assert image_header(out).format == "GIF"


def test_every_entry_point_defaults_to_the_fused_denoiser(tiny_models):
    from zone_engine.cli import build_parser
    from zone_engine.dual_step import FusedDualDenoiser
    from zone_engine.serving.settings import PipelineSpec

    parser = build_parser()
    for command in (["edit", "x.png", "-i", "add a hat", "-o", "y.png"], ["demo", "--out", "d"], ["serve"]):
        assert parser.parse_args(command).denoiser == "fused", command
    assert PipelineSpec().denoiser == "fused"
    assert isinstance(ZonePipeline(tiny_models, device="cpu").denoiser, FusedDualDenoiser)


def test_the_backend_options_are_named_alike_everywhere():
    """The command line, a server's PipelineSpec and the early checks pass ZonePipeline's backend options by the
    names in config.BACKEND_OPTIONS: an option added to one but not the list would be dropped silently."""
    import dataclasses
    import inspect

    from zone_engine.cli import build_parser
    from zone_engine.config import BACKEND_OPTIONS
    from zone_engine.serving.settings import PipelineSpec

    pipeline_options = set(inspect.signature(ZonePipeline).parameters) - {"models", "device", "dtype", "default_config"}
    assert set(BACKEND_OPTIONS) == pipeline_options
    assert set(BACKEND_OPTIONS) <= {field.name for field in dataclasses.fields(PipelineSpec)}
    assert set(BACKEND_OPTIONS) <= set(inspect.signature(check_backend_options).parameters)
    for command in (["edit", "x.png", "-i", "add a hat", "-o", "y.png"], ["demo", "--out", "d"], ["serve"]):
        assert set(BACKEND_OPTIONS) <= set(vars(build_parser().parse_args(command))), command


def test_group_norm_option_reaches_the_pipeline_from_every_entry_point(monkeypatch):
    from zone_engine.cli import _backend_options, _pipeline_spec, build_parser

    built = []
    monkeypatch.setattr(ZonePipeline, "tiny", classmethod(lambda cls, **kwargs: built.append(kwargs["group_norm"])))
    parser = build_parser()
    for command in (["edit", "x.png", "-i", "add a hat", "-o", "y.png"], ["demo", "--out", "d"], ["serve"]):
        assert parser.parse_args(command).group_norm == "auto", command
        args = parser.parse_args([*command, "--group-norm", "torch"])
        assert _backend_options(args)["group_norm"] == "torch"  # what edit and demo build their pipeline with
    _pipeline_spec(parser.parse_args(["serve", "--tiny", "--group-norm", "torch"])).build()
    assert built == ["torch"]
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--group-norm", "apex"])


def test_channels_last_option_reaches_the_models(photo, tmp_path, monkeypatch):
    from zone_engine.models import ZoneModels

    layouts, move = [], ZoneModels.to
    monkeypatch.setattr(ZoneModels, "to", lambda self, *args: layouts.append(args[2:]) or move(self, *args))
    outputs = []
    for option in ([], ["--channels-last"]):
        out = tmp_path / f"edited{len(option)}.png"
        assert main(["edit", str(photo), "-i", "add a hat", "-o", str(out), "--tiny", "--steps", "2",
                     "--no-progress", *option]) == 0
        outputs.append(np.asarray(Image.open(out)).astype(int))
    assert layouts == [(None,), (True,)]  # None: the default layout (models.unets_channels_last)
    assert np.abs(outputs[1] - outputs[0]).max() <= 1  # a layout: the same edit up to convolution rounding


def test_rgba_input_is_converted_with_a_warning(tmp_path, capsys):
    path = tmp_path / "rgba.png"
    rgba = np.dstack([smooth_image(64, 64), np.full((64, 64), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(path)
    assert main(["edit", str(path), "-i", "make it red", "-o", str(tmp_path / "o.png"), "--tiny", "--steps", "1",
                 "--no-progress"]) == 0
    assert "transparen" in capsys.readouterr().err.lower()


def test_a_warning_names_the_option_as_the_command_line_writes_it(photo, tmp_path, capsys, monkeypatch):
    """The Python spelling, shared with the library's message, came along: `(kernels='triton')`."""
    monkeypatch.setenv("ZONE_DISABLE_TRITON", "1")
    assert main(["edit", str(photo), "-i", "add a hat", "-o", str(tmp_path / "o.png"), "--tiny", "--steps", "1",
                 "--no-progress", "--kernels", "triton"]) == 0
    warning = next(line for line in capsys.readouterr().err.splitlines() if "cannot run" in line)
    assert warning.startswith("warning: --kernels triton cannot run on cpu here") and "kernels=" not in warning


@pytest.mark.parametrize(
    "make_argv,words",
    [
        (lambda p, t: ["edit", str(t / "missing.png"), "-i", "x", "-o", str(t / "o.png"), "--tiny"], ["not found"]),
        (lambda p, t: ["edit", str(p), "-i", "   ", "-o", str(t / "o.png"), "--tiny"], ["empty"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.txt"), "--tiny"], ["suffix"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o"), "--tiny"], ["has no suffix", "o.png"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.ico"), "--tiny"], ["icons come in fixed sizes"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.xbm"), "--tiny"], ["RGB pixels as XBM"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--tiny", "--steps", "0"],
         ["--steps must be between 1 and 999"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--sam", str(t / "sam_vit_h.pth")],
         ["SAM checkpoint not found", "--sam"]),
        # Bytes the terminal could not decode reach Python as lone surrogates.
        (lambda p, t: ["edit", str(p), "-i", "make the caf\udce9 red", "-o", str(t / "o.png"), "--tiny"],
         ["not valid Unicode", "terminal's encoding"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(p), "--tiny"], ["is the input image"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(p / "o.png"), "--tiny"], ["is a file, not a folder"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--tiny", "--save-masks", str(p)],
         ["--save-masks", "is the input image"]),
        (lambda p, t: ["demo", "--out", str(p)], ["--out", "is a file"]),
        (lambda p, t: ["export", "unet", "--tiny", "--out", str(p)], ["--out", "is a file"]),
        (lambda p, t: ["export", "sam", "--tiny", "--out", str(p)], ["--out", "is a file"]),
        (lambda p, t: ["export", "sam", "--checkpoint", str(t / "nope_vit_b.pth"), "--out", str(t / "x")],
         ["not found", "--checkpoint"]),
        (lambda p, t: ["export", "sam", "--checkpoint", str(p), "--out", str(t / "x")], ["--model-type"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--tiny", "--segmenter", "onnx",
                       "--sam-onnx", str(p)], ["the SAM export", "is a file"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--tiny", "--ip2p", str(t), "--sam", str(p)],
         ["--tiny builds random models", "drop --ip2p, --sam"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--random-weights", "sd15",
                       "--action-classifier", str(p)], ["--random-weights sd15", "drop --action-classifier"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--tiny", "--seed", str(2**32)],
         ["--seed must be between 0 and 4294967295"]),
        # Options their backend would not read: refused, not silently ignored; those of the real-checkpoint
        # runs before any weights load (the missing IP2P would be said otherwise).
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--tiny", "--sam-type", "vit_h"],
         ["--tiny builds its own tiny SAM", "drop --sam-type vit_h"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--engines", str(t)],
         ["--engines DIR is read by --denoiser tensorrt only"]),
        (lambda p, t: ["demo", "--out", str(t / "d"), "--sam-onnx", str(t)],
         ["--sam-onnx DIR is read by --segmenter onnx only"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--segmenter", "onnx", "--sam-onnx", str(t),
                       "--sam", str(p), "--sam-type", "vit_b"],
         ["reads no SAM checkpoint", "drop --sam PATH and --sam-type TYPE"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--action-classifier", str(t / "ac.pth")],
         ["action classifier not found", "4 checkpoints are missing", "--ip2p"]),  # all at once, before any load
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "m" / "region.png"), "--tiny", "--save-masks",
                       str(t / "m")], ["--save-masks", "would write over the -o file"]),
        (lambda p, t: ["edit", _copied(p, t / "in" / "heatmap.png"), "-i", "x", "-o", str(t / "o.png"), "--tiny",
                       "--save-masks", str(t / "in")], ["would write over the input image"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--tiny", "--save-masks", str(t / "o.png")],
         ["is the -o file"]),
        # Found only after the edit (or as a traceback) before: each said before any model loads.
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "new" / ("a" * 256 + ".png")), "--tiny"],
         ["output", "260 bytes long, over the 255 a file system takes"]),
        (lambda p, t: ["edit", str(t / ("a" * 256 + ".png")), "-i", "x", "-o", str(t / "o.png"), "--tiny"],
         ["cannot read", "over the 255"]),
        # In a folder that is there the system says ENAMETOOLONG, not ENOENT: pathlib's is_dir() raised it raw
        # ("[Errno 36] File name too long: ..."), with no word of what to do.
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / ("a" * 256 + ".png")), "--tiny"],
         ["output", "260 bytes long, over the 255 a file system takes; choose another path"]),
        (lambda p, t: ["edit", str(p), str(t / ("a" * 256 + ".png")), "-i", "x", "-o", str(t / "out"), "--tiny"],
         ["cannot read", "260 bytes long, over the 255"]),
        (lambda p, t: ["edit", str(p), _copied(p, t / "b.png"), "-i", "x", "-o", str(t / ("a" * 256 + ".png")),
                       "--tiny"], ["-o", "names the folder the edits go to"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--sam", str(t / ("a" * 256 + ".pth"))],
         ["a name in it is 260 bytes long, over the 255 a file system takes; shorten it"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", str(t / "o.png"), "--tiny", "--save-masks",
                       _folder(t / "m" / "heatmap.png")], ["--save-masks", "holds a folder named heatmap.png"]),
        (lambda p, t: ["demo", "--out", _folder(t / "d" / "timings.json")], ["--out", "a folder named timings.json"]),
        (lambda p, t: ["demo", "--out", str(t / "d"), "--save-masks", str(t / "d" / "output.png")],
         ["is the demo's output.png"]),
        (lambda p, t: ["edit", _wide_image(t / "wide.png"), "-i", "x", "-o", str(t / "w.webp"), "--tiny"],
         ["WEBP holds at most 16383 pixels a side", "20000x40"]),
        (lambda p, t: ["demo", "--out", str(t / "d"), "--save-masks", str(t / "d" / "mask_b.png")],
         ["is the demo's mask_b.png"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", _symlink_loop(t / "loop.png"), "--tiny"],
         ["is a symlink that loops"]),
        # Written through to a folder that is not there: "No such file or directory", once the edit had run.
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", _symlink_to(t / "link.png", t / "gone" / "o.png"),
                       "--tiny"], ["link.png is a symbolic link to", "gone", "in a folder that is not there"]),
        # Moved into place over it as root: a named pipe (or a device node) became a regular file, exit 0.
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", _fifo(t / "pipe.png"), "--tiny"],
         ["pipe.png is a pipe or a device, not a file"]),
        # A shell's "-" for standard input and output was "image not found: -" and "output - has no suffix".
        (lambda p, t: ["edit", "-", "-i", "x", "-o", str(t / "o.png"), "--tiny"],
         ["image not found: - (images are read from files, not standard input"]),
        (lambda p, t: ["edit", str(p), "-i", "x", "-o", "-", "--tiny"],
         ["output -: edits are written to files, not standard output"]),
    ],
    ids=["missing-image", "empty-instruction", "bad-output", "output-without-suffix", "output-is-an-icon",
         "output-format-without-rgb", "zero-steps",
         "missing-sam", "undecodable-instruction",
         "output-is-input", "output-under-a-file", "masks-into-a-file", "demo-into-a-file", "export-unet-into-a-file",
         "export-sam-into-a-file", "export-sam-missing-checkpoint", "export-sam-unknown-type", "onnx-folder-is-file",
         "tiny-with-checkpoints", "random-weights-with-classifier", "seed-too-large", "tiny-with-sam-type",
         "engines-without-tensorrt", "sam-onnx-without-onnx", "onnx-with-sam-checkpoint",
         "classifier-missing", "masks-over-the-output", "masks-over-the-input",
         "masks-folder-is-the-output", "output-name-too-long", "image-name-too-long",
         "output-name-too-long-in-a-folder-there", "image-name-too-long-among-several",
         "several-into-a-file-name-too-long", "checkpoint-name-too-long", "mask-name-is-a-folder",
         "demo-file-is-a-folder", "demo-masks-over-its-output", "webp-too-wide", "demo-masks-over-its-mask",
         "output-symlink-loop", "output-symlink-into-a-missing-folder", "output-is-a-pipe",
         "image-from-standard-input", "output-to-standard-output"],
)
def test_cli_bad_input(capsys, photo, tmp_path, make_argv, words):
    _fails_cleanly(capsys, make_argv(photo, tmp_path), *words)


def test_corrupt_sam_checkpoint_is_one_line_naming_the_download(capsys, photo, tmp_path):
    fake = tmp_path / "sam_vit_b_fake.pth"
    fake.write_bytes(photo.read_bytes())
    (tmp_path / "model_index.json").write_text("{}")  # a pipeline folder, as far as the first checks look
    folders = ["--ip2p", str(tmp_path), "--magicbrush", str(tmp_path)]  # there: SAM, the smallest, loads first
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", str(tmp_path / "o.png"), "--sam", str(fake),
                            *folders], "cannot read the SAM checkpoint", "sam_vit_b_01ec64.pth")


@pytest.mark.parametrize("argv, words", [
    (["bench", "--preset", "tiny-smoke", "--backends", ","], "--backends names no denoiser"),
    (["bench", "--preset", "tiny-smoke", "--sam-points", "0"], "--sam-points must be between 1 and 256"),
    (["bench", "--preset", "tiny-smoke", "--out", "{photo}"], "is a file, not a folder"),
    (["profile", "--models", "tiny", "--trace", "{folder}"], "is a folder"),
], ids=["no-backends", "no-sam-points", "bench-out-is-a-file", "trace-is-a-folder"])
def test_benchmark_tools_refuse_bad_options_before_running(capsys, photo, tmp_path, argv, words):
    argv = [arg.format(photo=photo, folder=tmp_path) for arg in argv]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and words in err and "Traceback" not in err


def test_cli_corrupt_image(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    _fails_cleanly(capsys, ["edit", str(bad), "-i", "x", "-o", str(tmp_path / "o.png"), "--tiny"], "bad.png")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_cuda_without_gpu(capsys, photo, tmp_path):
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", str(tmp_path / "o.png"), "--tiny",
                            "--device", "cuda"], "no CUDA", "--device cpu")


def test_cli_half_precision_on_the_cpu_is_refused_for_tiny_models_too(capsys, photo, tmp_path):
    """--tiny used to drop --dtype and run fp32 without a word."""
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", str(tmp_path / "o.png"), "--tiny", "--device", "cpu",
                            "--dtype", "fp16"], "runs only on CUDA", "fp32")


def test_cli_missing_ip2p_names_the_model(capsys, photo, tmp_path):
    sam = tmp_path / "sam_vit_b.pth"
    from zone_engine.models import build_sam

    torch.save(build_sam("vit_b").state_dict(), sam)
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", str(tmp_path / "o.png"), "--sam", str(sam),
                            "--ip2p", str(tmp_path / "no-ip2p")], "InstructPix2Pix", "hf download")


def test_serve_ray_says_missing_checkpoints_before_ray_starts(capsys, tmp_path, monkeypatch):
    """Each replica loads its own checkpoints: a missing one was a replica's traceback, after Ray had started."""
    def deployed(*_args, **_kwargs):
        raise AssertionError("Ray Serve was started")

    monkeypatch.setitem(sys.modules, "zone_engine.serving.ray_serve", types.SimpleNamespace(run_ray=deployed))
    _fails_cleanly(capsys, ["serve", "--ray", "--ip2p", str(tmp_path / "no-ip2p"), "--magicbrush",
                            str(tmp_path / "no-mb"), "--sam", str(tmp_path / "no-sam.pth")],
                   "3 checkpoints are missing", "InstructPix2Pix", "MagicBrush", "hf download")


def test_edit_warnings_point_at_the_callers_line(tiny_pipe):
    """They pointed inside the engine (a fixed stacklevel, wrong for edit or for edit_batch): a filter by
    module never matched the caller, and the default once-per-place rule said one note for every caller."""
    import warnings

    from zone_engine.errors import EditWarning
    from zone_engine.pipeline import EditRequest

    config, coarse = tiny_pipe.default_config.replace(steps=1), smooth_image(16, 40)  # a coarse-grid note
    for call in (lambda: tiny_pipe.edit(coarse, "add a hat", config),
                 lambda: tiny_pipe.edit_batch([EditRequest(coarse, "add a hat", config)]),
                 lambda: tiny_pipe.edit(smooth_image(64, 64), "add a hat " * 40, config)):  # truncated
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        said = [warning for warning in caught if warning.category is EditWarning]
        assert said and all(warning.filename == __file__ for warning in said), [w.filename for w in said]


def test_results_and_requests_are_equal_and_hashed_by_identity(tiny_pipe):
    """== compared their arrays (a ValueError: "the truth value of an array is ambiguous"); hash() raised."""
    import dataclasses

    from zone_engine.pipeline import EditRequest

    result = tiny_pipe.edit(smooth_image(64, 64), "add a hat", tiny_pipe.default_config.replace(steps=1))
    request = EditRequest(smooth_image(64, 64), "add a hat")
    for item in (result, request):
        assert item == item and item != dataclasses.replace(item) and len({item, item}) == 1


def test_api_bad_input(tiny_pipe):
    image = smooth_image(64, 64)
    with pytest.raises(InputImageError):
        tiny_pipe.edit(np.zeros((4, 4, 3), np.uint8), "x")
    with pytest.raises(InputImageError):
        tiny_pipe.edit(np.zeros((64, 64, 5), np.uint8), "x")
    with pytest.raises(InstructionError, match="empty"):
        tiny_pipe.edit(image, "")
    with pytest.raises(InstructionError, match="text"):
        tiny_pipe.edit(image, 42)
    for invisible in ("\u200b\u200b", "\x01\x02"):  # zero-width spaces, control characters: were edits without a prompt
        with pytest.raises(InstructionError, match="no visible characters"):
            tiny_pipe.edit(image, invisible)
    with pytest.raises(InstructionError, match="is 10,001 characters long, over 10,000"):
        tiny_pipe.edit(image, "a" * 10_001)
    assert check_instruction(" " + "a" * 10_000 + "\n") == "a" * 10_000  # the limit itself, after the strip
    with pytest.raises(ConfigError):
        tiny_pipe.default_config.replace(seam_alpha=2.0)
    with pytest.raises(ConfigError, match="config must be an EditConfig"):
        tiny_pipe.edit(image, "x", {"steps": 2})
    with pytest.raises(DeviceError, match="fp32"):
        ZonePipeline(tiny_pipe.models, device="cpu", dtype="fp16")
    with pytest.raises(DeviceError, match="unknown dtype"):
        ZonePipeline(tiny_pipe.models, device="cpu", dtype="int8")
    with pytest.raises(DeviceError, match="is not one the engine runs on"):
        ZonePipeline(tiny_pipe.models, device="tpu")
    with pytest.raises(ConfigError, match="takes the loaded ZoneModels, not a str: load checkpoints with "
                       "ZonePipeline.from_pretrained"):
        ZonePipeline("timbrooks/instruct-pix2pix")  # was an AttributeError: 'str' object has no attribute 'sam'
    assert issubclass(DeviceError, ZoneError)


@pytest.mark.parametrize("name, kind", [("auto", "auto"), (" CUDA:0 ", "cuda"), ("cuda:12", "cuda"), ("cpu", "cpu"),
                                        ("cpu:0", "cpu"), ("Cpu", "cpu")])
def test_device_names_the_engine_takes(name, kind):
    assert device_kind(name) == kind


@pytest.mark.parametrize("name", ["tpu", "mps", "", "cuda:01", "cuda:00", "cuda:\u0661", "cuda:-1", "cpu:1", "cuda0"])
def test_device_names_that_are_none_are_one_error_before_and_after_torch(name):
    """Checked by the CLI before torch loads and by resolve_device after: names torch.device rejects too
    (a leading zero, a non-ASCII digit) are a DeviceError, not torch's RuntimeError."""
    with pytest.raises(DeviceError, match="is not one the engine runs on"):
        device_kind(name)
    with pytest.raises(DeviceError, match="is not one the engine runs on"):
        resolve_device(name)


def test_a_cuda_index_past_the_machines_devices_is_said_before_any_work(monkeypatch):
    """The GPU machines lent have one device, so the real check never meets a cuda:1; here one is pretended."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(" CUDA:0 ") == torch.device("cuda", 0) and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(DeviceError, match=r"^cuda:1 does not exist: this machine has 1 CUDA device\(s\)$"):
        resolve_device("cuda:1")


def test_auto_device_is_cuda_where_there_is_one(monkeypatch):
    """device="auto", every builder's default, runs on the GPU when CUDA is there and on the CPU otherwise."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device(" AUTO ") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("option", ["attention", "group_norm", "kernels", "sam_precision", "segmenter"])
def test_a_backend_option_that_is_no_name_is_refused(option):
    """Python callers pass anything: None is no attention backend (not 'xformers on the CPU')."""
    with pytest.raises(ConfigError, match="unknown"):
        check_backend_options("cpu", **{option: None})
    check_backend_options("cpu", denoiser=object())  # a Denoiser instance comes configured (make_denoiser checks it)


def test_backend_options_that_do_not_go_together_are_config_errors_on_any_device():
    """What a GPU would not mend is a ConfigError (the server answers a DeviceError as its own fault)."""
    for kind in ("cuda", "auto"):
        with pytest.raises(ConfigError, match=r"no CUDA-graph path: use --denoiser fused \(denoiser='fused'\)"):
            check_backend_options(kind, denoiser="eager", cuda_graphs=True)
        with pytest.raises(ConfigError, match=r"needs --engines DIR \(engines=DIR\)"):
            check_backend_options(kind, denoiser="tensorrt")
        with pytest.raises(ConfigError, match=r"needs --sam-onnx DIR \(sam_onnx=DIR\)"):
            check_backend_options(kind, segmenter="onnx")


@pytest.mark.parametrize("option", ["cuda_graphs", "channels_last"])
@pytest.mark.parametrize("value", ["no", 1, 0])
def test_an_on_off_option_takes_only_a_bool_or_none(tiny_models, option, value):
    """A truthy "no" would turn CUDA graphs on (here: 'need a CUDA device', a misleading reason)."""
    with pytest.raises(ConfigError, match=f"{option} must be True, False or None"):
        ZonePipeline(tiny_models, device="cpu", **{option: value})


@pytest.mark.parametrize("changes,words", [
    ({"steps": "20"}, "steps must be a whole number"), ({"steps": 2.5}, "steps must be a whole number"),
    ({"seed": 1.5}, "seed must be a whole number"), ({"steps": True}, "steps must be a whole number"),
    ({"text_guidance": float("nan")}, "text_guidance must be a finite number"),
    ({"text_guidance": 10**400}, "text_guidance must be a finite number"),  # was an OverflowError from math
    ({"dilate_iterations": -2}, "dilate_iterations and fft_radius must be >= 0"),
    ({"fft_radius": -1}, "dilate_iterations and fft_radius must be >= 0"),
    ({"fft_threshold": 300}, "8-bit levels"), ({"action": 3}, "action must be None"),
    ({"sam": {}}, "sam must be a SamConfig"),
    ({"step": 3}, "EditConfig has no field 'step': did you mean steps\\? its fields: steps, "),
    ({"seed": 2**32}, "seed must be between 0 and 4294967295"),
    # Accepted up to float32's overflow: the edit then diverged, its message blaming the default guidance.
    ({"beta_remove": 1e38}, "beta_remove and beta_add_change must be between 0 and 1000"),
    ({"beta_add_change": -0.1}, "beta_remove and beta_add_change must be between 0 and 1000"),
    ({"image_guidance": -1}, "text_guidance and image_guidance must be >= 0"),  # edited away from the image
    ({"action_rule": "intend"}, "action_rule must be 'intended' or 'reference'"),
])
def test_edit_config_says_what_is_wrong_with_a_value(changes, words):
    """Said at once, not as a TypeError deep in numpy/torch or a broken image (guidance nan) later."""
    with pytest.raises(ConfigError, match=words):
        EditConfig().replace(**changes)


def test_edit_config_reads_its_names_in_any_case():
    config = EditConfig(action="ADD", action_rule="Reference", threshold_rule="PAPER")
    assert (config.action, config.action_rule, config.threshold_rule) == (Action.ADD, "reference", "paper")


def test_sam_config_refuses_what_would_fail_inside_segment_anything():
    for changes, words in (({"points_per_side": 0}, "points_per_side"), ({"box_nms_thresh": 2.0}, "between 0 and 1"),
                           ({"pred_iou_thresh": float("inf")}, "finite"), ({"crop_n_layers": -1}, "crop_n_layers"),
                           ({"crop_n_layers": 8}, "crop_n_layers must be at most 3"),
                           ({"pred_iou_thresh": 1.5}, "pred_iou_thresh and stability_score_thresh must be between"),
                           ({"stability_score_thresh": -0.1}, "between 0 and 1"),
                           ({"stability_score_offset": -1.0}, "stability_score_offset must be >= 0")):
        with pytest.raises(ConfigError, match=words):
            SamConfig().replace(**changes)
    for config_class in (EditConfig, SamConfig):  # the constructor, as replace: not a TypeError
        with pytest.raises(ConfigError, match=f"{config_class.__name__} has no field 'strength'"):
            config_class(strength=0.5)
    numpy_values = EditConfig(steps=np.int64(5), text_guidance=np.float32(7.5))
    assert type(numpy_values.steps) is int and type(numpy_values.text_guidance) is float


def test_export_and_build_engine_commands_fail_cleanly(capsys, tmp_path, photo):
    _fails_cleanly(capsys, ["export", "unet", "--tiny", "--bf16", "--out", str(tmp_path / "x")], "bf16")
    _fails_cleanly(capsys, ["export", "unet", "--tiny", "--height", "50", "--out", str(tmp_path / "x")], "32")
    # 0 was taken as "not given": a 512x512 export; the options are named (it said "size 0x512")
    _fails_cleanly(capsys, ["export", "unet", "--tiny", "--height", "0", "--out", str(tmp_path / "x")],
                   "--height/--width size 0x512 is not a positive multiple of 32")
    _fails_cleanly(capsys, ["export", "unet", "--tiny", "--height", "1000000", "--out", str(tmp_path / "x")],
                   "over 2048 pixels a side")  # was an allocator's traceback, or the process killed
    _fails_cleanly(capsys, ["export", "sam", "--tiny", "--opset", "5", "--out", str(tmp_path / "x")],
                   "writes opsets 13 to 20 for SAM's graphs")  # was torch's traceback
    _fails_cleanly(capsys, ["export", "sam", "--tiny", "--model-type", "vit_h", "--out", str(tmp_path / "x")],
                   "leave out --checkpoint and --model-type")  # was silently ignored
    assert not (tmp_path / "x").exists()
    # The folder first: without TensorRT here its message alone would leave a mistyped folder unsaid.
    _fails_cleanly(capsys, ["build-engine", str(tmp_path / "nothing")], "nothing: no such folder")  # "no manifest"
    (tmp_path / "empty").mkdir()
    _fails_cleanly(capsys, ["build-engine", str(tmp_path / "empty")], "no manifest.json")
    _fails_cleanly(capsys, ["build-engine", str(photo)], "is a file: pass the folder")


def test_tensorrt_denoiser_without_engines_folder(capsys, photo, tmp_path):
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", str(tmp_path / "o.png"), "--tiny",
                            "--denoiser", "tensorrt"], "--engines")
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", str(tmp_path / "o.png"), "--tiny", "--device",
                            "cpu", "--denoiser", "tensorrt", "--engines", str(tmp_path)], "needs a CUDA GPU")
    # On a GPU, a mistyped folder is said before TensorRT's absence (check_backends reads only the device's type).
    with pytest.raises(ZoneError, match="nothing: no such folder"):
        check_backends(torch.device("cuda"), denoiser="tensorrt", engines=tmp_path / "nothing")


def test_onnx_segmenter_without_export_folder(capsys, photo, tmp_path):
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", str(tmp_path / "o.png"), "--tiny",
                            "--segmenter", "onnx", "--steps", "1", "--no-progress"], "--sam-onnx")
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "x", "-o", str(tmp_path / "o.png"), "--tiny",
                            "--segmenter", "onnx", "--sam-onnx", str(tmp_path / "none"), "--steps", "1",
                            "--no-progress"], "zone export sam")


SERVE_MISSING = [m for m in (*SERVE_MODULES, "httpx") if importlib.util.find_spec(m) is None]
requires_serve = pytest.mark.skipif(bool(SERVE_MISSING), reason=f"needs the serve extra (missing {SERVE_MISSING})")


@requires_serve
def test_listening_beyond_this_machine_is_warned_of(capsys):
    """--host 0.0.0.0 opened an unauthenticated API to the network without a word."""
    from zone_engine.cli import _check_listen_address

    _check_listen_address("127.0.0.1", 0)
    assert capsys.readouterr().err == ""
    _check_listen_address("0.0.0.0", 0)
    assert capsys.readouterr().err.startswith("warning: --host 0.0.0.0 takes requests from other machines, and the "
                                              "API has no authentication")


def test_serve_help_and_bad_settings_fail_before_loading(capsys, tmp_path, monkeypatch):
    def started(*_args, **_kwargs):  # a check that let bad settings through fails here, not by serving forever
        raise AssertionError("the server started")

    monkeypatch.setattr("zone_engine.serving.run_server", started)
    out = subprocess.run([sys.executable, "-m", "zone_engine.cli", "serve", "--help"], capture_output=True, text=True)
    for option in ("--port", "--max-batch", "--max-wait-ms", "--queue-size", "--timeout-s", "--ray", "--replicas",
                   "--tiny", "--ip2p", "--allow-host"):
        assert option in out.stdout
    # Each option as the command line writes it, its Python spelling left out.
    _fails_cleanly(capsys, ["serve", "--tiny", "--max-batch", "0"], "--max-batch 0 must be at least 1")
    _fails_cleanly(capsys, ["serve", "--tiny", "--image-threads", "0"], "--image-threads 0 must be at least 1")
    _fails_cleanly(capsys, ["serve", "--tiny", "--max-steps", "10"],
                   "the server's default --steps 20 is above --max-steps 10")
    _fails_cleanly(capsys, ["serve", "--tiny", "--timeout-s", "0"], "timeout-s")
    _fails_cleanly(capsys, ["serve", "--tiny", "--timeout-s", "inf"], "--timeout-s inf must be a finite number, more "
                   "than 0")
    _fails_cleanly(capsys, ["serve", "--tiny", "--max-wait-ms", "inf"], "--max-wait-ms inf must be a finite number, "
                   "0 or more")
    _fails_cleanly(capsys, ["serve", "--tiny", "--max-upload-mb", "1e-9"], "--max-upload-mb 1e-09 is under 1 KiB")
    _fails_cleanly(capsys, ["serve", "--tiny", "--max-wait-ms", "5000", "--timeout-s", "5"],
                   "--max-wait-ms 5000 must be shorter than --timeout-s 5: ")  # as typed, not 5000.0
    _fails_cleanly(capsys, ["serve", "--tiny", "--max-batch", "100000", "--queue-size", "100000"],
                   "--max-batch 100000 must be at most 256")
    _fails_cleanly(capsys, ["serve", "--tiny", "--max-batch", "64"], "--max-batch 64 is above --queue-size 32: ")
    _fails_cleanly(capsys, ["serve", "--tiny", "--port", "0", "--max-steps", "1000"],
                   "--max-steps 1000 must be at most 999")
    # Options that would be silently ignored or contradict each other.
    _fails_cleanly(capsys, ["serve", "--tiny", "--port", "0", "--replicas", "2"], "--replicas is read with --ray only")
    _fails_cleanly(capsys, ["serve", "--tiny", "--port", "0", "--replicas", "0"], "--replicas is read with --ray only")
    _fails_cleanly(capsys, ["serve", "--tiny", "--port", "0", "--steps", "500"], "default --steps 500 is above "
                   "--max-steps 100, which")
    _fails_cleanly(capsys, ["serve", "--tiny", "--port", "0", "--max-pixels", "200000000"],
                   "--max-pixels 200000000 must be at most 100,000,000")
    _fails_cleanly(capsys, ["serve", "--tiny", "--port", "0", "--allow-origin", "https://app.example.com/ui"],
                   "allowed origin 'https://app.example.com/ui' (--allow-origin) is not an origin")
    _fails_cleanly(capsys, ["serve", "--tiny", "--port", "0", "--allow-host", "zone.example.com:8000"],
                   "allowed host 'zone.example.com:8000' (--allow-host) is not a host name")
    _fails_cleanly(capsys, ["serve", "--tiny", "--port", "70000"], "port")
    _fails_cleanly(capsys, ["serve", "--tiny", "--port", "65536"], "--port 65536 is not a TCP port (0..65535)")
    _fails_cleanly(capsys, ["serve", "--tiny", "--host", "999.1.1.1"], "--host 999.1.1.1")
    _fails_cleanly(capsys, ["serve", "--tiny", "--host", "[::1]"], "--host [::1]: write the IPv6 address without "
                   "brackets, --host ::1")  # was an --allow-host '[::1]' "is not a host name", none being given
    _fails_cleanly(capsys, ["serve", "--tiny", "--host", ""], "--host '' is neither an IP address nor a host name")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _fails_cleanly(capsys, ["serve", "--tiny", "--port", str(port)], f"cannot listen on 127.0.0.1:{port}")
        # The options' mistakes before the port: a busy port said first hid them until it was freed.
        _fails_cleanly(capsys, ["serve", "--tiny", "--port", str(port), "--max-pixels", "10"],
                       "--max-pixels 10 is under")
        _fails_cleanly(capsys, ["serve", "--tiny", "--port", str(port), "--max-batch", "16", "--queue-size", "8"],
                       "--max-batch 16 is above --queue-size 8")
        # So are a missing GPU and missing checkpoints (a busy port 8000 failed the tests below that gave none).
        _fails_cleanly(capsys, ["serve", "--tiny", "--port", str(port), "--device", "cuda"], "no CUDA")
        for ray in ([], ["--ray"]):
            _fails_cleanly(capsys, ["serve", "--port", str(port), *ray, "--ip2p", str(tmp_path / "no-ip2p"), "--sam",
                                    str(tmp_path / "no-sam.pth")], "not found")


def test_serve_passes_every_allowed_host_and_origin_to_the_server(monkeypatch):
    """--allow-host and --allow-origin are repeatable: every one given reaches the server, not the first (or last)
    alone, else requests addressed to the other names get 421 and edits from the other origins' pages 403."""
    hosts = ("zone.example.com", "gpu-box", "zone_engine")
    origins = ("https://app.example.com", "http://localhost:3000", "https://admin.example.com:8443")
    options = [*(arg for host in hosts for arg in ("--allow-host", host)),
               *(arg for origin in origins for arg in ("--allow-origin", origin))]
    settings, _ = _served(monkeypatch, ["serve", "--tiny", "--port", "0", *options])
    assert settings.allow_hosts == hosts and settings.allow_origins == origins
    assert settings.host_names() == {*hosts, "app.example.com", "localhost", "admin.example.com"}


def test_serve_answers_requests_addressed_to_the_name_it_listens_on(monkeypatch):
    """--host NAME: clients address the server by that name, so it is an allowed host beside --allow-host's."""
    for host, names in (("localhost", ("zone.example.com", "localhost")), ("127.0.0.1", ("zone.example.com",))):
        settings, _ = _served(monkeypatch, ["serve", "--tiny", "--host", host, "--allow-host", "zone.example.com"])
        assert settings.allow_hosts == names


@requires_serve
def test_serve_runs_answers_and_stops_on_sigterm(tmp_path):
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "zone_engine.cli", "serve", "--tiny", "--device", "cpu", "--port", str(port),
         "--steps", "2", "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server was not ready within 120 s"  # stderr: open until it ends
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            time.sleep(0.2)
        path = tmp_path / "in.png"
        Image.fromarray(smooth_image(48, 80)).save(path)
        response = httpx.post(f"{base}/v1/edit", files={"image": ("in.png", path.read_bytes(), "image/png")},
                              data={"instruction": "add a hat"}, timeout=120)
        assert response.status_code == 200
        assert Image.open(io.BytesIO(response.content)).size == (80, 48)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()  # not left serving beside the rest of the suite
            server.wait()
            raise
    # uvicorn shuts down gracefully, then re-raises the signal it caught, as a killed process would exit.
    errors = server.communicate()[1]  # both pipes read to their end and closed (not left to the collector)
    assert code in (0, -signal.SIGTERM) and "Traceback" not in errors, errors


def test_random_weights_build_real_size_architectures_with_the_reference_settings(monkeypatch, capsys):
    import zone_engine.models
    from zone_engine.config import EditConfig
    from zone_engine.serving.settings import PipelineSpec

    calls = []

    def fake_build(preset, seed, sam_type):  # the real one allocates ~4 GB: same call, tiny models
        calls.append((preset, seed, sam_type))
        return zone_engine.models.build_tiny_components(seed)

    monkeypatch.setattr(zone_engine.models, "build_random_components", fake_build)
    pipe = PipelineSpec(random_weights="sd15", device="cpu", denoiser="fused").build()
    assert calls == [("sd15", 0, "vit_b")]
    PipelineSpec(random_weights="sd15", ip2p="/nonexistent/ip2p").check_checkpoints()  # reads none: looks for none
    assert pipe.default_config == EditConfig()  # the reference SAM settings: a load test pays real costs
    if not SERVE_MISSING:
        monkeypatch.setattr("zone_engine.serving.run_server", lambda *_: pytest.fail("the server started"))
        _fails_cleanly(capsys, ["serve", "--tiny", "--random-weights", "sd15"], "exclude each other")


@pytest.mark.skipif(SERVE_MISSING, reason="the serve extra is not installed")
def test_serve_says_models_too_large_for_the_gpu_in_a_line_before_the_port_opens(capsys, monkeypatch):
    """Weights that do not fit the GPU (a 16 GB card, another process on it) were torch's traceback, exit 1."""
    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(zone_engine.models.ZoneModels, "to", out_of_memory)
    monkeypatch.setattr("zone_engine.serving.run_server", lambda *_: pytest.fail("the server started"))
    _fails_cleanly(capsys, ["serve", "--tiny", "--port", "0"], "out of GPU memory moving the models to cpu",
                   "Tried to allocate 2.00 GiB", "--dtype fp16", "--device cuda:N")  # no edit's batch to lower yet


def test_zone_profile_and_zone_bench_hand_their_options_to_the_benchmark_tools(capsys):
    assert main(["profile", "--models", "tiny", "--device", "cpu", "--resolution", "64", "--steps", "2",
                 "--warmup", "0", "--rows", "0"]) == 0
    assert "| denoise |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--help"])
    assert exited.value.code == 0 and "zone bench" in capsys.readouterr().out


# ------------------------------------------------------------------ the Python API on what an integrator may pass


def test_api_arguments_of_the_wrong_kind_are_clear_errors(tiny_pipe):
    """Found by a black-box audit: each of these was an AttributeError, a TypeError or a bare AssertionError
    from deep inside, or (huge kernels, points) a MemoryError after the whole denoise."""
    with pytest.raises(DeviceError, match="device must be a name"):
        ZonePipeline(tiny_pipe.models, device=None)
    with pytest.raises(ConfigError, match="default_config must be an EditConfig"):
        ZonePipeline(tiny_pipe.models, device="cpu", default_config={"steps": 2})
    with pytest.raises(ConfigError, match="list of EditRequest"):
        tiny_pipe.edit_batch([("photo.png", "add a hat")])
    with pytest.raises(ConfigError, match="list of EditRequest"):
        tiny_pipe.edit_batch(None)
    with pytest.raises(ConfigError, match="threading.Event"):
        EditRequest(smooth_image(64, 64), "add a hat", cancel=True)
    for changes in ({"close_kernel": 10**6}, {"dilate_kernel": 10**6}, {"dilate_iterations": 10**6}):
        with pytest.raises(ConfigError, match="at most 1023|between 1 and 1023"):
            EditConfig(**changes)
    with pytest.raises(ConfigError, match="points_per_side must be at most 256"):
        SamConfig(points_per_side=10**5)
    with Image.open(io.BytesIO(_png_bytes())) as closed:
        pass
    with pytest.raises(InputImageError, match="closed before its pixels were read"):
        tiny_pipe.edit(closed, "add a hat")
    with pytest.raises(InputImageError, match="no image path given"):
        tiny_pipe.edit("", "add a hat")


def test_a_misspelt_from_pretrained_option_is_said_before_any_checkpoint_loads(monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded checkpoints before checking the options")

    monkeypatch.setattr("zone_engine.pipeline.load_pretrained", must_not_load)
    with pytest.raises(ConfigError, match="segmentr"):
        ZonePipeline.from_pretrained(device="cpu", segmentr="torch")
    with pytest.raises(ConfigError, match=r"from_pretrained\(\) builds the models itself: drop models="):
        ZonePipeline.from_pretrained(device="cpu", models=None)  # ZonePipeline's first parameter: passed already


def test_from_pretrained_checks_its_own_arguments_before_any_checkpoint_loads(monkeypatch):
    monkeypatch.setattr("zone_engine.pipeline.load_pretrained", lambda *a, **k: pytest.fail("loaded checkpoints"))
    monkeypatch.setattr("zone_engine.models.locate_model", lambda *a, **k: pytest.fail("looked for checkpoints"))
    for arguments, words in (({"ip2p": None}, "ip2p must be a model id or a path, got None"),
                             ({"magicbrush": 3}, "magicbrush must be a model id or a path, got 3"),
                             ({"sam": 1.0}, "sam must be a model id or a path"),
                             ({"ip2p": ""}, "ip2p is empty: pass a model id or a path, or leave it out"),
                             ({"sam": " "}, "sam is empty"),
                             ({"magicbrush": ""}, "magicbrush is empty"),
                             ({"action_classifier": ""}, "action_classifier is empty"),
                             ({"sam_type": "vit_x"}, "unknown SAM type 'vit_x'")):
        with pytest.raises(ZoneError, match=words):
            ZonePipeline.from_pretrained(device="cpu", **arguments)


@pytest.mark.parametrize("seed", [1.5, True, -1, 2**32, "0"])
def test_tiny_checks_its_seed_and_options(seed):
    """A float or bool seed was taken as another one's weights; 2**40 and '0' failed inside torch."""
    with pytest.raises(ConfigError, match="seed must be a whole number between 0 and 4294967295"):
        ZonePipeline.tiny(seed=seed)
    with pytest.raises(ConfigError, match=r"tiny\(\) has no option 'denoisr': did you mean denoiser\? its options: "
                                          "seed"):
        ZonePipeline.tiny(denoisr="fused")
    with pytest.raises(ConfigError, match=r"has no option 'magicbrsh': did you mean magicbrush\? its options: ip2p, "):
        ZonePipeline.from_pretrained(magicbrsh="x")  # before any checkpoint is looked for
    with pytest.raises(ConfigError, match="has no option 'zzz': its options:"):
        ZonePipeline.tiny(zzz=1)
    # The constructor alike (it was Python's TypeError), before its models are looked at; its signature kept.
    with pytest.raises(ConfigError, match=r"^ZonePipeline\(\) has no option 'denoisr': did you mean denoiser\? its "
                                          "options: models, device"):
        ZonePipeline(None, denoisr="fused")
    assert list(inspect.signature(ZonePipeline).parameters)[:2] == ["models", "device"]
    with pytest.raises(ConfigError, match=r"tiny\(\) builds tiny random models and reads no checkpoint: drop ip2p"):
        ZonePipeline.tiny(ip2p="x", sam_type="vit_b")
    with pytest.raises(ConfigError, match=r"tiny\(\) builds the models itself"):
        ZonePipeline.tiny(models=None)


def test_building_random_models_leaves_the_callers_random_state_alone(monkeypatch):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    # torch.manual_seed reseeds every CUDA device too, which fork_rng(devices=[]) does not restore.
    monkeypatch.setattr(torch, "manual_seed", lambda seed: pytest.fail("reseeded CUDA's generators too"))
    ZonePipeline.tiny(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_on_off_arguments_of_edit_take_only_a_bool(tiny_pipe):
    """A truthy "no" showed progress bars, or returned exceptions instead of raising them."""
    with pytest.raises(ConfigError, match="progress must be True or False, got 'no'"):
        tiny_pipe.edit(smooth_image(64, 64), "add a hat", progress="no")
    with pytest.raises(ConfigError, match="return_exceptions must be True or False, got 'no'"):
        tiny_pipe.edit_batch([], return_exceptions="no")


@pytest.mark.parametrize(("steps", "why"), [(2, "inf/NaN latents"), (1, "latents too large to decode")])
def test_a_diverging_denoise_is_an_error_not_a_black_image(tiny_pipe, steps, why):
    """One step leaves finite latents of about 1e30, which the decoder turned into a black I_sty, unsaid."""
    config = tiny_pipe.default_config.replace(steps=steps, text_guidance=1e30)
    with pytest.raises(ConfigError, match=f"diverged \\({why}\\): lower the guidance"):
        tiny_pipe.edit(smooth_image(64, 64), "add a hat", config)


def test_a_float_array_too_large_is_refused_before_it_is_converted(monkeypatch):
    """The size check came after the float64 x 255 copy: 16 bytes a value to learn an image is too large."""
    import tracemalloc

    from zone_engine import image_io

    monkeypatch.setattr(image_io, "MAX_PIXELS", 100 * 100)
    huge = np.broadcast_to(np.float32(0.5), (2000, 2000, 3))  # no memory of its own
    tracemalloc.start()
    with pytest.raises(InputImageError, match="too large|at most"):
        image_io.load_image(huge)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10_000_000, peak  # the conversion would have taken 192 MB


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def _terminated_midway(args) -> None:
    """A command's work that SIGTERM (`timeout`'s) interrupts: the command's handler raises at once."""
    import time

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the handler's exception ends it at once


def test_sigterm_ends_a_command_as_ctrl_c_does_running_its_cleanups(tmp_path, capsys, monkeypatch):
    """`timeout`'s SIGTERM killed the process where it was: an export's scratch files and the folder it had
    created stayed. Now it unwinds as Ctrl-C does (staging_folder's cleanup runs), exit 128 + 15."""
    from zone_engine import cli

    monkeypatch.setattr(cli, "run_export", _terminated_midway)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["export", "unet", "--tiny", "--out", str(tmp_path / "x")]) == 143
    assert capsys.readouterr().err.strip() == "terminated" and signal.getsignal(signal.SIGTERM) is before


def test_the_partials_removed_are_counted_and_the_first_three_named(capsys):
    """From a mutation audit: past three, the line named three and said nothing of the others."""
    from zone_engine.cli import _say_removed_partials

    _say_removed_partials([])
    assert capsys.readouterr().err == ""
    _say_removed_partials([Path(f".p{index}.1.partial.png") for index in range(4)])
    assert capsys.readouterr().err == ("removed 4 partial file(s) left by an earlier run killed while writing them: "
                                       ".p0.1.partial.png, .p1.1.partial.png, .p2.1.partial.png, ...\n")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_sighup_ends_a_command_as_sigterm_does_and_stays_ignored_under_nohup(tmp_path, capsys, monkeypatch):
    """The terminal that started `zone batch ... 2> log &` closing (an SSH session ended) killed it at once: the
    write under way left as a partial file, the log silent on the edits not done. Now SIGHUP unwinds as SIGTERM
    does, `hung up`, exit 128 + 1; a SIGHUP ignored (nohup) stays ignored."""
    import time

    from zone_engine import cli

    def hung_up_midway(args):
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)  # else the signal would end pytest
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(30)  # the handler's exception ends it at once

    monkeypatch.setattr(cli, "run_export", hung_up_midway)
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        assert main(["export", "unet", "--tiny", "--out", str(tmp_path / "x")]) == 129
        assert capsys.readouterr().err.strip() == "hung up" and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup's
        monkeypatch.setattr(cli, "run_export", lambda args: print(signal.getsignal(signal.SIGHUP), file=sys.stderr))
        assert main(["export", "unet", "--tiny", "--out", str(tmp_path / "y")]) == 0
        assert capsys.readouterr().err.strip() == str(signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGHUP, before)


def test_ctrl_c_ends_a_command_with_130(tmp_path, capsys, monkeypatch):
    from zone_engine import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_export", interrupted)
    assert main(["export", "unet", "--tiny", "--out", str(tmp_path / "x")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


@pytest.mark.parametrize(("stop", "status"), [("KeyboardInterrupt", 130), ("Terminated", 143), ("HungUp", 129)])
def test_a_stopped_console_command_ignores_the_ctrl_c_that_follow(tmp_path, capsys, monkeypatch, stop, status):
    """Ctrl-C hammered on a `zone batch` cut short: after `interrupted`, the next ones were KeyboardInterrupt
    tracebacks (restoring the streams, torch's atexit finalizers). The console script's process now ignores them as
    it ends; main() called with its arguments, from Python, leaves the caller's handlers. A run hung up too (from a
    mutation audit: its 129 was left out, and a second SIGHUP as it ended was a traceback)."""
    from zone_engine import cli

    error = getattr(cli, stop, KeyboardInterrupt)

    def stopped(args):
        raise error

    monkeypatch.setattr(cli, "run_export", stopped)
    monkeypatch.setattr(sys, "argv", ["zone", "export", "unet", "--tiny", "--out", str(tmp_path / "x")])
    numbers = (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))
    before = {number: signal.getsignal(number) for number in numbers}
    try:
        assert main(sys.argv[1:]) == status and signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
        assert main() == status
        assert all(signal.getsignal(number) is signal.SIG_IGN for number in numbers)
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_the_edit_options_reach_the_pipeline(photo, tmp_path, monkeypatch):
    """Parsing them was tested; passing them on was not (a dropped --threshold-rule edited by the default)."""
    seen = {}
    real_edit_batch = ZonePipeline.edit_batch

    def edit_batch(self, requests, *, progress=False, return_exceptions=False):
        (request,) = requests
        seen.update(config=request.config, progress=progress, instruction=request.instruction)
        return real_edit_batch(self, requests, progress=progress, return_exceptions=return_exceptions)

    monkeypatch.setattr(ZonePipeline, "edit_batch", edit_batch)
    assert main(["edit", str(photo), "-i", "add a hat", "-o", str(tmp_path / "o.png"), "--tiny", "--steps", "1",
                 "--seed", "5", "--action", "remove", "--threshold-rule", "paper", "--no-progress"]) == 0
    config = seen["config"]
    assert (config.steps, config.seed, config.action, config.threshold_rule) == (1, 5, Action.REMOVE, "paper")
    assert seen["progress"] is False and seen["instruction"] == "add a hat"


def test_an_os_error_without_a_path_is_a_bug_and_keeps_its_traceback(monkeypatch):
    """One line, exit 2, is for a path the system refused; a broken pipe on stderr mid-edit is not success."""
    from zone_engine import cli

    for error in (OSError("an internal fault"), BrokenPipeError()):
        def failing(args, error=error):
            raise error
        monkeypatch.setattr(cli, "run_demo", failing)
        with pytest.raises(type(error)):
            main(["demo", "--out", "d"])


HELP_PAGES = [["zone", *command] for command in (
    [], ["edit"], ["batch"], ["demo"], ["serve"], ["export"], ["export", "unet"], ["export", "sam"], ["build-engine"],
    ["bench"], ["profile"])] + [
    ["benchmarks", tool] for tool in ("bench_dual_unet", "bench_kernels", "bench_refine", "graph_breaks",
                                      "graph_memory", "load_test")]


@pytest.mark.parametrize("page", HELP_PAGES, ids=" ".join)
def test_help_wraps_at_spaces_so_a_wrapped_option_or_command_can_be_copied(page, capsys, monkeypatch):
    """argparse wrapped at hyphens: `--no-channels-` / `last`, `zone build-` / `engine` on two lines."""
    monkeypatch.setenv("COLUMNS", "80")
    kind, *command = page
    if kind == "zone":
        run = functools.partial(main, [*command, "--help"])
    else:
        run = functools.partial(importlib.import_module(f"zone_benchmarks.{command[0]}").parse_args, ["--help"])
    with pytest.raises(SystemExit) as stop:
        run()
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "usage:" in out
    assert not [line for line in out.splitlines() if re.search(r"[A-Za-z]-$", line)], out
    # Every zone command says its exit codes (export, build-engine, demo, bench and profile did not).
    assert kind != "zone" or "Exit codes: " in out, out


@pytest.mark.parametrize("command", [["edit"], ["build-engine"]])
def test_help_says_the_tensorrt_paths_have_not_run(command, capsys, monkeypatch):
    """The README says TensorRT's build and denoiser have run on no machine of ours; --help said nothing of it."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = " ".join(capsys.readouterr().out.split()).lower()  # unwrapped
    assert "written for tensorrt 10" in out and "not yet run on a gpu" in out


def _github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation (backquotes, dashes other than '-') dropped,
    spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_the_readme_s_contents_and_in_page_links_name_its_headings():
    """The table of contents lists the README's sections in order, and every `](#...)` link lands on a heading
    (one added by hand, such as the GPU memory section's, could name an id GitHub does not give it)."""
    text = re.sub(r"^```.*?^```", "", (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8"),
                  flags=re.M | re.S)  # a `# comment` in a shell block is no heading
    headings = [(len(marks), _github_anchor(title)) for marks, title in re.findall(r"^(##+) (.+)$", text, re.M)]
    assert len({anchor for _, anchor in headings}) == len(headings)  # no -1 suffixes to follow
    contents = [(len(indent) // 2 + 2, anchor) for indent, anchor in
                re.findall(r"^( *)- \[.*\]\(#(.+)\)$", text.split("\n## ", 1)[0], re.M)]
    assert contents == headings
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= {anchor for _, anchor in headings}


# --- What a command line means beyond parsing: defaults, values passed on, exit codes (found by mutation testing) ---


def _edits_asked(monkeypatch, argv) -> dict:
    """main(argv) with edit_all replaced: what `zone edit` / `zone batch` would run, no model built."""
    from zone_engine import cli

    asked = {}

    def edit_all(jobs, build, changes, batch_size, progress, several, report=None, append=False):
        asked.update(outputs=[job.output.name for job in jobs], changes=changes, batch_size=batch_size,
                     progress=progress, several=several, report=report, append=append)

    monkeypatch.setattr(cli, "edit_all", edit_all)
    assert main(argv) == 0
    return asked


def test_edit_defaults_are_those_its_help_names(photo, tmp_path, monkeypatch):
    """No option given: the engine's own steps and seed, the classified action, the reference M_b rule, one edit
    at a time with a progress bar, and a pipeline of PipelineSpec's defaults (a default drifting in argparse alone,
    e.g. --cuda-graphs off or --sam-precision bf16, would change every edit without a word)."""
    from zone_engine.cli import _pipeline_spec, build_parser
    from zone_engine.serving.settings import PipelineSpec

    asked = _edits_asked(monkeypatch, ["edit", str(photo), "-i", "add a hat", "-o", str(tmp_path / "o.png"), "--tiny"])
    assert asked == {"outputs": ["o.png"], "changes": {"action": None, "threshold_rule": "reference"},
                     "batch_size": 1, "progress": True, "several": False, "report": None, "append": False}
    for command in (["edit", "x.png", "-i", "x", "-o", "y.png"], ["serve"]):
        assert _pipeline_spec(build_parser().parse_args(command)) == PipelineSpec(), command


def test_edit_options_given_reach_the_run_and_the_pipeline(photo, tmp_path, monkeypatch):
    """--seed 0 is a seed (not "none given": the default 42 ran instead); two images are several edits (each one's
    failure said, the others written); --device, --dtype and --sam-type reach the pipeline built."""
    from zone_engine.cli import _pipeline_spec, build_parser

    Image.open(photo).save(tmp_path / "second.png")
    asked = _edits_asked(monkeypatch, ["edit", str(photo), str(tmp_path / "second.png"), "-i", "add a hat", "-o",
                                       str(tmp_path / "out"), "--tiny", "--seed", "0", "--steps", "3", "--action",
                                       "remove", "--batch-size", "2", "--no-progress"])
    assert asked["changes"] == {"action": Action.REMOVE, "threshold_rule": "reference", "steps": 3, "seed": 0}
    assert (asked["outputs"], asked["batch_size"], asked["progress"], asked["several"]) == (
        ["photo.png", "second.png"], 2, False, True)
    spec = _pipeline_spec(build_parser().parse_args(["edit", "x.png", "-i", "x", "-o", "y.png", "--device", "cuda:1",
                                                     "--dtype", "fp16", "--random-weights", "sd15", "--sam-type",
                                                     "vit_h"]))
    assert (spec.device, spec.dtype, spec.random_weights, spec.sam_type) == ("cuda:1", "fp16", "sd15", "vit_h")


def test_skip_existing_says_what_it_left_out_and_keeps_the_reports_lines(photo, tmp_path, monkeypatch, capsys):
    """The edits whose output is there are left out and said in one line (none said when none is there); the
    report is added to, not written over, so the lines of the edits done before stay."""
    names = ["photo.png", "second.png", "third.png"]
    for name in names[1:]:
        Image.open(photo).save(tmp_path / name)
    argv = ["edit", *(str(tmp_path / name) for name in names), "-i", "add a hat", "-o", str(tmp_path / "out"),
            "--tiny", "--skip-existing"]
    assert _edits_asked(monkeypatch, argv)["outputs"] == names
    assert "--skip-existing" not in capsys.readouterr().err
    (tmp_path / "out").mkdir(exist_ok=True)
    for name in names[1:]:
        Image.open(photo).save(tmp_path / "out" / name)
    asked = _edits_asked(monkeypatch, argv)
    assert asked["outputs"] == ["photo.png"] and asked["append"] is True
    assert capsys.readouterr().err.strip() == "--skip-existing: 2 of 3 edits left out, their outputs there"


def test_skip_existing_with_a_report_does_again_an_edit_written_but_not_reported(photo, tmp_path, monkeypatch, capsys):
    """A run killed (`kill -9`) after writing an edit's file but before its report line: the resumed run left it
    out as done, and the report, the evaluation's record, lacked that edit, unsaid. Now only an output with its
    line (not an error's) is done; a cut line is no line; without the report there, the outputs alone say it."""
    names = ["photo.png", "second.png", "third.png"]
    for name in names[1:]:
        Image.open(photo).save(tmp_path / name)
    out, report = tmp_path / "out", tmp_path / "report.jsonl"
    out.mkdir()
    for name in names:
        Image.open(photo).save(out / name)
    # a line's relative output read from the report's folder too: a run resumed from another folder
    report.write_text(json.dumps({"name": "photo.png", "output": "out/photo.png", "seconds": {}}) + "\n" +
                      json.dumps({"name": "second.png", "output": str(out / "second.png"), "error": "x"}) + "\n" +
                      '{"name": "third.png", "output": "' + str(out / "third.png"))
    argv = ["edit", *(str(tmp_path / name) for name in names), "-i", "add a hat", "-o", str(out), "--tiny",
            "--skip-existing"]
    assert _edits_asked(monkeypatch, [*argv, "--report", str(report)])["outputs"] == ["second.png", "third.png"]
    assert capsys.readouterr().err.splitlines() == [
        "--skip-existing: 1 of 3 edits left out, their outputs there",
        f"--skip-existing: 2 edit(s) done again, their outputs there but no line of them in {report} (a run killed "
        f"between the two): {tmp_path / 'second.png'}, ..."]
    assert _edits_asked(monkeypatch, [*argv, "--report", str(tmp_path / "new.jsonl")])["outputs"] == []


def test_skip_existing_finds_a_reported_output_however_its_path_was_written(photo, tmp_path, monkeypatch, capsys):
    """The report's output and -o compared as files, not as strings: a relative -o's lines say relative outputs,
    read from the current folder too (not only the report's, here another)."""
    monkeypatch.chdir(tmp_path)
    Path("out").mkdir()
    Path("runs").mkdir()
    Image.open(photo).save("out/photo.png")
    Path("runs/report.jsonl").write_text(json.dumps({"name": "photo.png", "output": "out/photo.png",
                                                     "seconds": {}}) + "\n")
    argv = ["edit", str(photo), "-i", "add a hat", "-o", "out", "--tiny", "--skip-existing", "--report",
            "runs/report.jsonl"]
    assert _edits_asked(monkeypatch, argv)["outputs"] == []
    assert capsys.readouterr().err.strip() == ("--skip-existing: all 1 edits done already, their outputs there: "
                                               "nothing to do")


def test_skip_existing_reads_a_reports_lines_past_one_that_is_not_an_edits(photo, tmp_path, monkeypatch, capsys):
    """A line cut by a kill, or one not ours (JSON but no object), is no line of an edit; the lines after it, a
    resumed run's, still are."""
    out, report = tmp_path / "out", tmp_path / "report.jsonl"
    out.mkdir()
    Image.open(photo).save(out / "photo.png")
    report.write_text('{"name": "second.png", "output": "out/sec\n[1, 2]\n3\n{"output": null}\n' +
                      json.dumps({"name": "photo.png", "output": str(out / "photo.png"), "seconds": {}}) + "\n")
    argv = ["edit", str(photo), "-i", "add a hat", "-o", str(out), "--tiny", "--skip-existing", "--report",
            str(report)]
    assert _edits_asked(monkeypatch, argv)["outputs"] == []
    assert "all 1 edits done already" in capsys.readouterr().err


def test_skip_existing_checks_only_the_outputs_it_writes(photo, tmp_path, monkeypatch):
    """An output there (left out) is not written: one made read-only (kept as it is) does not refuse the run."""
    out = tmp_path / "out"
    out.mkdir()
    Image.open(photo).save(out / "photo.png")
    (out / "photo.png").chmod(0o444)
    Image.open(photo).save(tmp_path / "second.png")
    if os.access(out / "photo.png", os.W_OK):  # root writes anywhere: denied here as for another user
        monkeypatch.setattr("os.access", lambda path, mode: Path(path) != out / "photo.png")
    argv = ["edit", str(photo), str(tmp_path / "second.png"), "-i", "add a hat", "-o", str(out), "--tiny",
            "--skip-existing"]
    assert _edits_asked(monkeypatch, argv)["outputs"] == ["second.png"]


def test_skip_existing_refuses_a_folder_where_an_output_goes(photo, tmp_path, capsys):
    """A folder named as an output is no edit done: refused as without --skip-existing, not left out as done."""
    (tmp_path / "out" / "photo.png").mkdir(parents=True)
    _fails_cleanly(capsys, ["edit", str(photo), "-i", "add a hat", "-o", str(tmp_path / "out"), "--tiny",
                            "--skip-existing"], "holds a folder named photo.png")


def test_skip_existing_with_every_output_there_writes_nothing_so_a_read_only_folder_is_done(photo, tmp_path,
                                                                                            monkeypatch, capsys):
    """With --skip-existing, an -o that holds every output (a finished run's folder, made read-only or mounted so)
    is done: said, exit 0; one output missing, the folder is refused as before. It said "cannot write in" (exit 2):
    the write checks ran before the skip."""
    from zone_engine import paths

    out = tmp_path / "out"
    out.mkdir()
    Image.open(photo).save(out / "photo.png")
    Image.open(photo).save(tmp_path / "second.png")
    Image.open(photo).save(out / "second.png")
    # root writes anywhere, also where chmod says no: the folder read-only as a read-only mount is to the probe
    folder_problem = paths.folder_problem
    monkeypatch.setattr(paths, "folder_problem", lambda folder, probed=None: "read-only" if Path(folder).absolute()
                        == out else folder_problem(folder, probed))
    (tmp_path / "edits.jsonl").write_text('{"image": "photo.png", "instruction": "add a hat"}\n'
                                          '{"image": "second.png", "instruction": "add a hat"}\n')
    for command in (["edit", str(photo), str(tmp_path / "second.png"), "-i", "add a hat"],
                    ["batch", str(tmp_path / "edits.jsonl")]):
        argv = [*command, "-o", str(out), "--tiny", "--skip-existing"]
        assert _edits_asked(monkeypatch, argv)["outputs"] == []
        assert capsys.readouterr().err.strip() == ("--skip-existing: all 2 edits done already, their outputs there: "
                                                   "nothing to do")
    (out / "second.png").unlink()
    assert main(argv) == 2
    assert f"-o {out}: read-only; choose another path" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "words"), [
    (["export", "unet", "--tiny", "--out", "x", "--bogus"], "unrecognized arguments: --bogus (see zone export unet "
     "--help)"),
    ([], "required: COMMAND (see zone --help)"),
    (["edit", "x.png", "-i", "a", "-o", "y.png", "--random-weights", "tiny"], "invalid choice: 'tiny'"),
    (["serve", "--warmup-size", "0x512"], "height and width must be positive, got '0x512'"),
    (["serve", "--warmup-size", "big"], "cannot read size 'big'"),
    (["edit", "x.png", "-i", "a", "-o", "y.png", "--seed", "4_2"], "--seed: invalid value '4_2': write a whole number"),
    (["serve", "--port", "\uff18\uff10"], "--port: invalid value '\uff18\uff10': write a whole number"),
])
def test_more_argument_errors_are_one_line_naming_the_help_to_read(capsys, argv, words):
    """An export's unknown option points to `zone export unet --help`, not `zone export`'s; no command at all is
    argparse's error, not an IndexError; --random-weights takes no `tiny` (that is --tiny); a --warmup-size that is
    no size is said at parsing, not as a traceback or a zero-pixel warm-up; an integer in other than decimal digits
    (int() reads "4_2" and full-width digits) is refused, as the server's form fields refuse it."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_a_required_option_missing_names_no_stdin_dash_as_an_option(capsys, tmp_path, monkeypatch):
    """`zone batch -` reads the list of edits from standard input: `-` is no misspelt option, nor a file read as
    one where a file is named `-`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-").touch()
    with pytest.raises(SystemExit):
        main(["batch", "-", "--tiny"])
    err = capsys.readouterr().err
    assert "required: -o/--output (see zone batch --help)" in err and "not an option" not in err, err


def _served(monkeypatch, argv):
    """main(argv) for `zone serve`, the server replaced: what it would listen on and serve with."""
    from zone_engine import cli
    from zone_engine.serving.settings import PipelineSpec

    served = []
    monkeypatch.setattr(cli, "_check_listen_address", lambda host, port: None)  # binds nothing
    monkeypatch.setattr(PipelineSpec, "build", lambda spec: None)  # no model built
    monkeypatch.setattr("zone_engine.serving.run_server", lambda service, *where: served.append((service.settings,
                                                                                                 where)))
    assert main(argv) == 0
    return served.pop()


def test_serve_defaults_listen_on_this_machine_only(monkeypatch):
    """--host's default is the loopback address (an unauthenticated API opened to the network by default would be
    a hole), port 8000 and log level info as --help says; the limits are ServeSettings' defaults, the edits the
    engine's default steps."""
    from zone_engine.serving.settings import ServeSettings

    settings, where = _served(monkeypatch, ["serve", "--tiny"])
    assert where == ("127.0.0.1", 8000, "info")
    assert settings == ServeSettings(edit_changes=(("action", None), ("threshold_rule", "reference"),
                                                   ("steps", EditConfig.steps)))


def test_serve_options_reach_the_server(monkeypatch):
    """Each limit and edit default given to `zone serve` is the server's (a dropped one served the default)."""
    settings, where = _served(monkeypatch, [
        "serve", "--tiny", "--host", "127.0.0.2", "--port", "8123", "--log-level", "warning", "--max-batch", "2",
        "--max-wait-ms", "5", "--queue-size", "8", "--timeout-s", "30", "--max-upload-mb", "2", "--max-pixels",
        "1000000", "--max-steps", "50", "--image-threads", "3", "--no-warmup", "--warmup-size", "64x96",
        "--warmup-size", "32X32", "--steps", "7", "--seed", "0", "--action", "add", "--threshold-rule", "paper",
        "--allow-origin", "https://app.example.com"])
    assert where == ("127.0.0.2", 8123, "warning")
    assert (settings.max_batch, settings.max_wait_ms, settings.queue_size, settings.timeout_s, settings.max_upload_mb,
            settings.max_pixels, settings.max_steps, settings.image_threads) == (2, 5.0, 8, 30.0, 2.0, 1000000, 50, 3)
    assert settings.warmup is False and settings.warmup_sizes == ((64, 96), (32, 32))
    assert settings.allow_origins == ("https://app.example.com",)
    assert dict(settings.edit_changes) == {"action": Action.ADD, "threshold_rule": "paper", "steps": 7, "seed": 0}


def test_serve_refuses_a_batch_its_queue_cannot_fill_before_the_models_load(capsys, monkeypatch):
    """Said at once, not after minutes of loading checkpoints (the service checks it again when made)."""
    from zone_engine.serving.settings import PipelineSpec

    monkeypatch.setattr(PipelineSpec, "build", lambda spec: pytest.fail("the models were loaded"))
    _fails_cleanly(capsys, ["serve", "--tiny", "--max-batch", "16", "--queue-size", "8"],
                   "--max-batch 16 is above --queue-size 8: such a batch could never fill")


@pytest.mark.parametrize(("module", "argv", "extra"), [
    ("prometheus_client", ["serve", "--tiny"], "serve"), ("ray", ["serve", "--tiny", "--ray"], "ray"),
    ("fastapi", ["serve", "--tiny", "--ray"], "ray"), ("multipart", ["serve", "--tiny"], "serve")])
def test_serve_without_its_extra_names_the_install_command(capsys, monkeypatch, module, argv, extra):
    # The app imported first (the setattr does), as it needs the modules: alone, this test failed in the import.
    monkeypatch.setattr("zone_engine.serving.run_server", lambda *_: pytest.fail("the server started"))
    monkeypatch.setitem(sys.modules, module, None)  # as on an install without it: find_spec finds nothing
    _fails_cleanly(capsys, argv, f"`zone serve` needs {module}: pip install 'zone-engine[{extra}]'")


@pytest.mark.parametrize(("module", "said"), [
    ("uvicorn", r"^zone_engine.serving.create_app needs uvicorn: pip install 'zone-engine\[serve\]'$"),
    ("fastapi.responses", r"^zone_engine.serving.create_app needs fastapi.responses: pip install 'zone-engine\[serve"),
    ("PIL", r"^import of PIL halted")])  # not the extra's: said as Python says it, no install command
def test_the_python_servings_app_without_its_extra_names_the_install_command(monkeypatch, module, said):
    """`from zone_engine.serving import create_app` was a ModuleNotFoundError from inside serving/app.py."""
    import zone_engine.serving

    monkeypatch.delitem(sys.modules, "zone_engine.serving.app", raising=False)
    monkeypatch.setitem(sys.modules, module, None)  # as on an install without it
    with pytest.raises(ModuleNotFoundError, match=said) as missing:
        zone_engine.serving.create_app  # noqa: B018 -- the lazy attribute's import is the test
    assert missing.value.name == module  # for a caller that asks which, as of Python's own
    if "pip install" in said:  # one error said, not the import's inside it as well
        assert missing.value.__suppress_context__ and missing.value.__cause__ is None


@pytest.mark.parametrize("kind", ["sam", "unet"])
def test_export_without_onnx_names_an_install_command_that_works_outside_the_checkout(capsys, monkeypatch, tmp_path,
                                                                                     kind):
    """It said `pip install -e '.[onnx]'`, which a wheel's user, in a folder of their own, is refused by pip."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # as on an install without it
    _fails_cleanly(capsys, ["export", kind, "--tiny", "--out", str(tmp_path / "x"), "--no-progress"],
                   "exporting needs onnx and onnxruntime: pip install 'zone-engine[onnx]'")


def test_serve_leaves_sigterm_to_the_server_and_demo_ends_on_it_with_143(capsys, monkeypatch):
    """uvicorn handles SIGTERM itself (a graceful shutdown): `zone serve` must not have replaced its handler;
    every other command, `zone demo` too, unwinds on it as on Ctrl-C (exit 128 + 15)."""
    from zone_engine import cli
    from zone_engine.serving.settings import PipelineSpec

    def unhandled(*_args):  # stands for the default action, which would end the test run itself
        raise AssertionError("SIGTERM reached the handler from before the command")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        handlers = []
        monkeypatch.setattr(cli, "_check_listen_address", lambda host, port: None)
        monkeypatch.setattr(PipelineSpec, "build", lambda spec: None)
        monkeypatch.setattr("zone_engine.serving.run_server",
                            lambda *_: handlers.append(signal.getsignal(signal.SIGTERM)))
        assert main(["serve", "--tiny"]) == 0 and handlers == [unhandled]
        monkeypatch.setattr(cli, "run_demo", _terminated_midway)
        assert main(["demo", "--out", "d"]) == 143 and capsys.readouterr().err.strip() == "terminated"
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_path_the_system_refuses_past_the_checks_is_one_error_line_and_exit_2(capsys, monkeypatch):
    from zone_engine import cli

    def refused(error):
        def run(args):
            raise error
        return run

    # A name over 255 bytes said as the checks say it, with what to do; another refusal as the system words it.
    monkeypatch.setattr(cli, "run_demo", refused(OSError(36, "File name too long", "d/" + "a" * 300)))
    assert main(["demo", "--out", "d"]) == 2
    assert capsys.readouterr().err == (f"error: d/{'a' * 300}: a name in it is 300 bytes long, over the 255 a file "
                                       "system takes; shorten it\n")
    monkeypatch.setattr(cli, "run_demo", refused(OSError(13, "Permission denied", "d/x")))
    assert main(["demo", "--out", "d"]) == 2
    assert capsys.readouterr().err == "error: [Errno 13] Permission denied: 'd/x'\n"
    # The open files limit (`ulimit -n`), reached at a library's file or at a pipe (no file named): how to raise it.
    for error in (OSError(24, "Too many open files", "site-packages/x.py"), OSError(24, "Too many open files")):
        monkeypatch.setattr(cli, "run_demo", refused(error))
        assert main(["demo", "--out", "d"]) == 2
        assert "error: too many open files: this process may have" in capsys.readouterr().err


def test_the_libraries_log_level_set_by_the_user_is_kept(monkeypatch, capsys, tmp_path):
    """DIFFUSERS_VERBOSITY / TRANSFORMERS_VERBOSITY given: kept (the user asked for that log); else errors only."""
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "0"]) == 2  # a command that stops at its checks
    assert "--steps must be between" in capsys.readouterr().err
    assert (os.environ["DIFFUSERS_VERBOSITY"], os.environ["TRANSFORMERS_VERBOSITY"]) == ("info", "error")


def test_onnxruntime_telemetry_is_off_unless_the_user_says(monkeypatch, capsys, tmp_path):
    """onnxruntime 1.32, imported by diffusers as a checkpoint loads, wrote a device id and a telemetry database
    under ~/.cache/Microsoft, and with a read-only home (a container) printed, coloured, on every `zone edit`:
    `[W:onnxruntime:Default, telemetry_1ds.cc:613 operator()] Failed to persist telemetry device ID`."""
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "0"]) == 2  # a command that stops at its checks
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "0"
    assert capsys.readouterr().err.count("--steps must be between") == 2


def test_a_file_name_that_is_not_utf8_is_said_on_stderr_as_its_bytes(capsysbinary, tmp_path):
    """As stdout prints paths: Python's default for stderr wrote "caf\\udce9.png", a name that is nowhere."""
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old archive's names are
    assert main(["edit", str(tmp_path / name), "-i", "x", "-o", str(tmp_path / "out.png"), "--tiny"]) == 2
    err = capsysbinary.readouterr().err
    assert err == b"error: image not found: " + os.fsencode(tmp_path / name) + b"\n"
    # A lone surrogate that no byte decoded to (text from elsewhere) is escaped, as Python's default does.
    assert "x\udce9\ud800\u00e9".encode("ascii", "zone_file_names") == b"x\xe9\\ud800\\xe9"
    # A stream given the handler that is read back as well (pytest's capture of `main`'s stderr): those bytes as
    # Python holds them, not a TypeError in the handler at the capture's next read.
    assert b"caf\xe9.png".decode("utf-8", "zone_file_names") == name


def test_a_report_names_a_file_that_is_not_utf8_by_its_bytes(photo, tmp_path, capsysbinary):
    """Its line was an encode error's traceback, exit 1, after the first edit: the other images were never edited."""
    name = os.fsdecode(b"caf\xe9.png")
    shutil.copy(photo, tmp_path / name)
    report, out = tmp_path / "report.jsonl", tmp_path / "out"
    assert main(["edit", str(tmp_path / name), str(photo), "-i", "a café hat", "-o", str(out), "--report",
                 str(report), "--tiny", "--steps", "1", "--no-progress"]) == 0
    records = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    outputs = [os.fsencode(record["output"]) for record in records]
    assert outputs == [os.fsencode(out / name), os.fsencode(out / photo.name)]
    assert '"instruction": "a café hat"'.encode() in report.read_bytes().splitlines()[1]  # the others as UTF-8 still


def _library_bars_at_build(monkeypatch) -> tuple[list[tuple[bool, bool]], Callable[[bool], None]]:
    """PipelineSpec.build stopped where the models would load, recording whether diffusers' and transformers'
    loading bars were on then, in the list returned; the function returned turns them on again and makes stderr
    a terminal or not, before each command."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    import zone_engine.cli as cli
    from zone_engine.serving.settings import PipelineSpec

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module: the package's `tqdm` is a class
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", dict(hub_tqdm.progress_bar_states))
    shown = []

    def build(spec):
        shown.append((diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()))
        raise ZoneError("stopped where the models would load")

    def before_command(terminal: bool) -> None:
        for library in (diffusers_logging, transformers_logging):
            monkeypatch.setattr(library, "_tqdm_active", True)  # put back after the test, as is the hub's state
        monkeypatch.setattr(cli, "is_terminal", lambda stream: terminal)

    monkeypatch.setattr(PipelineSpec, "build", build)
    return shown, before_command


def test_no_progress_hides_the_libraries_loading_bars_too(monkeypatch, tmp_path):
    """diffusers' `Loading pipeline components...` and transformers' `Loading weights` bars still showed; with
    --no-progress, and where stderr is no terminal (a log, where they were redrawn with carriage returns)."""
    shown, before_command = _library_bars_at_build(monkeypatch)
    Image.fromarray(smooth_image(32, 32)).save(tmp_path / "in.png")
    for terminal, flags in ((True, []), (True, ["--no-progress"]), (False, [])):
        before_command(terminal)
        assert main(["edit", str(tmp_path / "in.png"), "-i", "make it red", "-o", str(tmp_path / "out.png"), "--tiny",
                     *flags]) == 2
    assert shown == [(True, True), (False, False), (False, False)]


@requires_serve
def test_serve_hides_the_libraries_loading_bars_where_its_log_is_no_terminal(monkeypatch):
    """`zone serve`'s log (a file under systemd or docker) got diffusers' and transformers' loading bars, redrawn with
    carriage returns, as the checkpoints loaded: `zone edit` hid them there, the server did not."""
    shown, before_command = _library_bars_at_build(monkeypatch)
    for terminal in (True, False):
        before_command(terminal)
        assert main(["serve", "--tiny", "--port", "0", "--device", "cpu"]) == 2
    assert shown == [(True, True), (False, False)]


def test_demo_says_its_random_models_note_only_once_its_setup_passed(tmp_path, monkeypatch, capsys):
    """The note on random weights came first, then the setup's `error:` line (a cache folder, a device)."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("error: TORCHINDUCTOR_CACHE_DIR=") and "RANDOM" not in said
