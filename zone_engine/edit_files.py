"""The files of `zone edit` and `zone batch` (and `zone demo`'s masks): where each edit and its masks go, all
checked before any work, and the loop that reads, edits and writes them, several at a time."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import stat
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, NoReturn

from . import __version__
from .config import MAX_BATCH, Action, EditConfig, command_line_spelling, error_line
from .errors import ConfigError, InputImageError, OutputError, ZoneError
from .paths import (
    check_output_file,
    check_output_folder,
    exclusive_lock,
    file_argument,
    ignores_case,
    is_folder,
    written_file,
    written_together,
)
from .streams import print_path

if TYPE_CHECKING:  # imported where used: numpy, and torch with the pipeline, take seconds `zone --help` needs not
    import numpy as np

    from .pipeline import EditResult, ZonePipeline


# What --save-masks writes, as NAME.png.
MASK_OUTPUTS = ("mask_b", "mask_f", "region", "styled", "heatmap", "difference")
COLOUR_OUTPUTS = ("styled", "heatmap")  # those in the input's colours: they carry its colour profile


class EditJob(NamedTuple):
    """One edit of `zone edit` or `zone batch`: the file read, the file its edit goes to, the folder of its masks
    (if asked), its instruction, the EditConfig fields it sets over the command's, how messages name it."""

    image: Path
    output: Path
    masks: Path | None
    instruction: str
    changes: tuple[tuple[str, Any], ...] = ()
    label: str = ""  # "" for the image's path

    def name(self) -> str:
        return self.label or str(self.image)

    def written(self) -> list[Path]:
        return [self.output, *(mask_files(self.masks) if self.masks else ())]


def mask_files(folder: Path) -> list[Path]:
    """What --save-masks writes in `folder`."""
    return [folder / f"{name}.png" for name in MASK_OUTPUTS]


class LoadedJob(NamedTuple):
    job: EditJob
    pixels: np.ndarray
    profile: bytes | None  # the input's colour profile, given to its output


class OutputArgument(NamedTuple):
    path: Path
    folder: bool  # said with a trailing slash: a folder, also for one image and for a name with a dot


def output_argument(text: str) -> OutputArgument:
    """argparse type of `zone edit -o` and `zone batch -o`."""
    return OutputArgument(file_argument(text), text.endswith(("/", os.sep)))


def report_argument(text: str) -> Path:
    """argparse type of --report: a file's name. `--report logs/` (as -o names a folder) made a file named logs."""
    if text.endswith(("/", os.sep)) and text.strip("/" + os.sep):
        raise argparse.ArgumentTypeError(f"{text} names a folder: give the report a file name in it, such as "
                                         f"{text}report.jsonl")
    return file_argument(text)


def suffix_argument(text: str) -> str:
    """argparse type of --suffix: ".png" (or "png")."""
    suffix = text if text.startswith(".") else f".{text}"
    if not re.fullmatch(r"\.[A-Za-z0-9]+", suffix):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file suffix, such as .png or .jpg")
    return suffix


def plan_jobs(args: argparse.Namespace, instruction: str) -> list[EditJob]:
    """`zone edit`'s: -o itself for one image (unless a folder), else each image's file name in the folder -o;
    each checked writable, none over an input or another's files."""
    images, (output, said_folder) = args.image, args.output
    check_batch_size(args.batch_size)
    if len(images) == 1 and not said_folder and not is_folder(output):
        if args.suffix:
            raise ConfigError(f"--suffix is read when -o is a folder; {output} names the file: write its suffix there")
        check_output_path(output, images[0])
        if args.save_masks:
            check_masks_folder(args.save_masks, {output: "the -o file", images[0]: "the input image"})
        job = EditJob(images[0], output, args.save_masks, instruction)
        _check_no_clash([job], repeats=False)  # the masks' files over -o by a link or a `..`
        return [job]
    files = _image_files(images)
    refuse_file_output(output, said_folder, f"with {len(files)} image{'s' * (len(files) > 1)} given")
    jobs = []
    for image in files:
        name = image.stem + output_suffix(image, args.suffix)
        # One image into a folder: its masks where --save-masks says, as for one into a file.
        masks = masks_folder_of(args.save_masks, name) if len(files) > 1 else args.save_masks
        jobs.append(EditJob(image, output / name, masks, instruction))
    return checked_jobs(jobs, output, repeats=False, skip_existing=args.skip_existing)


def masks_folder_of(save_masks: Path | None, name: str) -> Path | None:
    """Where --save-masks puts the masks of the edit written as `name`: a folder of that name less its suffix."""
    return save_masks / Path(name).with_suffix("") if save_masks else None


def check_batch_size(size: int) -> None:
    if not 1 <= size <= MAX_BATCH:
        raise ConfigError(f"--batch-size {size} must be 1..{MAX_BATCH}")


def refuse_file_output(output: Path, said_folder: bool, why: str) -> None:
    """OutputError when -o names a file (a suffix, not a folder there, no trailing slash) where a folder goes."""
    if output.suffix and not said_folder and not is_folder(output):
        raise OutputError(f"-o {output}: {why} -o names the folder the edits go to, each under its input's file "
                          f"name; give a folder, such as edited/ ({output}/ if its name is to have a dot)")


def checked_jobs(jobs: list[EditJob], output: Path, repeats: bool, skip_existing: bool = False) -> list[EditJob]:
    """`jobs`, once no file of one is written over an input or another's (`_check_no_clash`) and every one can
    be written (format, folders, permissions); with `skip_existing`, every one whose output is there is left out
    of the latter: it is not written (a read-only -o that holds them all is done, not unwritable)."""
    _check_no_clash(jobs, repeats)
    written = [job for job in jobs if not (skip_existing and job.output.is_file())]
    if not written:
        return jobs
    probed: set[Path] = set()  # each folder a file is made in once: thousands of edits, a few probe files
    check_output_folder(output, "-o", [str(job.output.relative_to(output)) for job in written], probed)
    for job in written:
        try:
            check_output_path(job.output, job.image, probed)
            if job.masks:
                check_output_folder(job.masks, "--save-masks", [path.name for path in mask_files(job.masks)], probed)
        except ZoneError as error:  # a batch's line named: its output is one of many
            raise type(error)(f"{job.label}: {error}" if job.label else str(error)) from None
    return jobs


def _image_files(paths: Sequence[Path]) -> list[Path]:
    """The paths less the folders (a glob such as photos/* takes them in), each said; a path that is not there
    (likely a typo) is refused before any work."""
    from .image_io import check_image_path

    for path in paths:
        if not is_folder(path):
            check_image_path(path)
    for folder in (path for path in paths if is_folder(path)):
        print(f"warning: {folder} is a folder: left out (its images: {folder / '*'})", file=sys.stderr)
    files = [path for path in paths if not is_folder(path)]
    if not files:
        raise InputImageError("every input is a folder: give the images in them, such as photos/*.jpg")
    return files


def output_suffix(image: Path, suffix: str | None) -> str:
    """--suffix, else the input's own where Pillow writes its format (not an icon's, scaled), else .png."""
    from .image_io import check_output_format

    if suffix or not image.suffix:
        return suffix or ".png"
    try:
        check_output_format(image)
    except OutputError:
        return ".png"
    return image.suffix


def _check_no_clash(jobs: Sequence[EditJob], repeats: bool) -> None:
    """InputImageError for an image given twice (unless `repeats`: a batch may edit one image several ways);
    OutputError for a file written over an input, one written for two edits, or one where another's files need a
    folder; paths compared with their links resolved."""
    inputs: dict[str, Path] = {}
    for job in jobs:
        if (key := os.path.realpath(job.image)) in inputs and not repeats:
            also = f" (also as {inputs[key]})" if inputs[key] != job.image else ""
            raise InputImageError(f"{job.image} is given twice{also}: give each image once")
        inputs[key] = job.image
    # A batch's edit is renamed by its "output" (its masks' folder too); another command's by its image's name.
    rename = 'give it another "output"' if jobs[0].label else "rename that image"
    written: dict[str, tuple[Path, EditJob]] = {}  # each file written, resolved: as given, and the edit it is of
    for job in jobs:
        for path in job.written():
            if (key := os.path.realpath(path)) in inputs:
                if inputs[key] == job.image and path is job.output:  # a mask over its own input: said below
                    raise OutputError(f"the edit of {job.name()} would go to {path}, over the input itself: choose "
                                      f"another -o, or --suffix, or {rename}")
                raise OutputError(f"{path}, written for {job.name()}, is the input {inputs[key]}: it would be "
                                  "overwritten; choose another -o or --save-masks")
            if key in written and written[key][1] is job:
                raise OutputError(f"{path} would be both the edit of {job.name()} and one of its masks: choose another "
                                  "-o or --save-masks")
            if key in written:
                raise OutputError(f"{path} would be written for both {written[key][1].name()} and {job.name()}: edit "
                                  f"them in separate runs, or {rename}")
            written[key] = path, job
    _check_case_clash(inputs, written, rename)
    folders = {str(parent) for key in written for parent in Path(key).parents}
    if both := sorted(folders & written.keys()):
        path, job = written[both[0]]
        raise OutputError(f"{path} would be a file written for {job.name()} and a folder of other files written: "
                          f"choose another -o or --save-masks, or {rename}")


def _check_case_clash(inputs: dict[str, Path], written: dict[str, tuple[Path, EditJob]], rename: str) -> None:
    """OutputError for a file written whose path differs from an input's or another written file's only in case,
    where the file system ignores case (macOS's and Windows' do by default): both name one file, which the later
    write would replace. Keys as _check_no_clash's: paths with their links resolved. Names compared in lower case
    (as those file systems fold them; casefold's ß = ss they do not)."""
    seen: dict[str, str] = {key.lower(): key for key in inputs}
    for key, (path, job) in written.items():
        other = seen.setdefault(key.lower(), key)
        if other == key or not ignores_case(Path(key).parent):
            continue
        if other in inputs:
            raise OutputError(f"{path}, written for {job.name()}, is the input {inputs[other]} on this file system, "
                              "which ignores case: it would be overwritten; choose another -o or --save-masks")
        if written[other][1] is job:
            raise OutputError(f"{path} and {written[other][0]} would be both the edit of {job.name()} and one of its "
                              "masks on this file system, which ignores case: choose another -o or --save-masks")
        raise OutputError(f"{path} and {written[other][0]}, written for {job.name()} and {written[other][1].name()}, "
                          f"are one file on this file system, which ignores case: edit them in separate runs, or "
                          f"{rename}")


def check_list_kept(jobs: Sequence[EditJob], list_file: Path) -> None:
    """OutputError for an edit's file written over `list_file`, zone batch's list of edits (a list named like an
    image, which a line's "output" can name)."""
    for job in jobs:
        if path := next((path for path in job.written() if same_file(path, list_file)), None):
            raise OutputError(f"{path}, written for {job.name()}, is the list of edits {list_file}: it would be "
                              'overwritten; give that edit another "output"')


def check_report_path(report: Path, jobs: Sequence[EditJob], list_file: Path | None = None) -> None:
    """OutputError unless --report's file can be written, over no input (nor `list_file`, zone batch's list of
    edits) and no edit's file."""
    if str(report) == "-":  # a shell's "standard output", as zone batch's - is its input: it made a file named -
        raise OutputError("--report -: the report is written to a file, not standard output, where the command's own "
                          "lines go: name one, such as report.jsonl (a script can read it after the run, or from a "
                          "named pipe)")
    if stream := _standard_stream(report):  # /dev/stdout: a file `>` made was overwritten, a pipe refused obscurely
        raise OutputError(f"--report {report} is the command's {stream}, where its own lines go: write the report to "
                          "a file of its own (a script can read it after the run, or from a named pipe)")
    check_output_file(report, "--report", replaced=False)  # written as the edits end: a named pipe takes it
    if list_file is not None and (same_file(report, list_file) or report.absolute() == list_file.absolute()):
        raise OutputError(f"--report {report} is the list of edits {list_file}: write the report to another file")
    files = {os.path.realpath(path): job for job in jobs for path in (job.image, *job.written())}
    if (job := files.get(key := os.path.realpath(report))) is not None:
        raise OutputError(f"--report {report} is a file of the edit of {job.name()}: choose another name")
    # A hard link of an input is the input under another name, which realpath does not show: the report, written
    # in place (an edit's files replace theirs), emptied the image. Only a report there already can be one.
    if report.exists() and (job := next((job for job in jobs if same_file(job.image, report)), None)):
        raise OutputError(f"--report {report} is the input {job.image} of the edit of {job.name()} (a hard link of "
                          "it): choose another name")
    if any(key in map(str, Path(path).parents) for path in files):
        raise OutputError(f"--report {report} is a folder the edits' files go in: name a file beside them")


def _standard_stream(path: Path) -> str | None:
    """"standard output" or "standard error" where `path` is the file or pipe one of them goes to (a terminal or
    /dev/null may take both): opened again, a file is written from its start, over the other's lines."""
    for descriptor, stream in ((1, "standard output"), (2, "standard error")):
        try:
            found, opened = os.stat(path), os.fstat(descriptor)
        except (OSError, ValueError):  # no such path, or the stream closed
            continue
        if os.path.samestat(found, opened) and (stat.S_ISREG(found.st_mode) or stat.S_ISFIFO(found.st_mode)):
            return stream
    return None


def check_output_path(path: Path, image: Path, probed: set[Path] | None = None) -> None:
    """OutputError unless the edit of `image` can be written at `path` (as check_output_file, `probed` too): a
    suffix of a format Pillow writes, not the input."""
    from .image_io import check_output_format

    check_output_file(path, "output", probed)  # first: a folder given as -o is said as one, not as a missing suffix
    if str(path) == "-":  # a shell's "standard output": `-o -`
        raise OutputError("output -: edits are written to files, not standard output: name one, such as out.png")
    # save_image would write PNG to a name without one (a link's target's): say it, the user may have meant .jpg
    if not written_file(path).suffix:
        raise OutputError(f"output {path} has no suffix: name the format, such as {path}.png")
    check_output_format(path)
    if same_file(path, image):
        raise OutputError(f"output {path} is the input image: write the edit to another file, the input stays as it is")


def check_masks_folder(folder: Path, others: dict[Path, str]) -> None:
    """OutputError unless --save-masks' files can be written in `folder` without writing over `others` (the
    command's other files, by what they are: "-o", "the input image"), each said before any work runs."""
    written = mask_files(folder)
    for path, what in others.items():
        if folder.absolute() == path.absolute():
            raise OutputError(f"--save-masks {folder} is {what}: give the masks a folder of their own")
        if any(mask.absolute() == path.absolute() or same_file(mask, path) for mask in written):
            raise OutputError(f"--save-masks {folder} would write over {what} {path} (it writes "
                              f"{', '.join(n + '.png' for n in MASK_OUTPUTS)}): choose another folder or file name")
    check_output_folder(folder, "--save-masks", [mask.name for mask in written])


def same_file(path: Path, other: Path) -> bool:
    try:
        return path.exists() and other.exists() and path.samefile(other)
    except OSError:  # a name the system refuses (too long): no file, said where it is read or written
        return False


def edit_all(jobs: Sequence[EditJob], build: Callable[[], ZonePipeline], changes: dict[str, Any], batch_size: int,
             progress: bool, several: bool, report: Path | None = None, append: bool = False) -> None:
    """Edit every job, `batch_size` at a time, with the pipeline `build` makes once an image is read (a bad one is
    said in seconds, before the weights load; none read, none load) and the EditConfig fields `changes` (each
    job's own over them). One edit (not `several`): its error is the command's. Several: an edit that fails is
    said, the others go on, and a ZoneError lists those not done; a result that cannot be written stops the run.
    `report`: a JSON Lines file written as the edits end, one line each (`_Run.record`), added to its lines if
    `append` (a run resumed with --skip-existing keeps those of the edits done before). A batch's files are
    written in a second thread while the next batch is read and edited (a 12 MP PNG takes 2 s of a core); a run
    cut short (Ctrl-C, SIGTERM, an error) lets the write under way finish, drops those queued, and says and
    reports the edits whose files were written."""
    run = _Run(len(jobs), several, batch_size, config=EditConfig().replace(**changes))
    pipe = None
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)  # checked creatable (check_report_path), as -o's folders
    with (open_report(report, append) if report else contextlib.nullcontext() as out,
          ThreadPoolExecutor(1, thread_name_prefix="zone-write") as run.writer):
        run.report = out
        try:
            for start in range(0, len(jobs), batch_size):
                loaded = run.load(jobs[start:start + batch_size], start)
                if loaded and pipe is None:
                    pipe = build()
                    run.config = pipe.default_config.replace(**changes)
                if loaded:
                    run.edit(pipe, loaded, run.config, progress)
            run.settle()
        except BaseException as stop:
            run.cut_short()
            if run.several and isinstance(stop, KeyboardInterrupt) and run.written < len(jobs):  # Ctrl-C, SIGTERM
                print(f"{len(jobs) - run.written} of {len(jobs)} edits not done; to do them, run the same command "
                      "with --skip-existing", file=sys.stderr)
            raise
    if run.failed:
        raise ZoneError(f"{len(run.failed)} of {len(jobs)} edits not done (said above): {', '.join(run.failed)}")


def open_report(report: Path, append: bool) -> BinaryIO:
    """--report's file, unbuffered (a line that cannot be written, on a full disk, is said at once, none left for
    the close to raise), emptied unless `append`. O_APPEND either way: each line lands at the file's end even while
    another run writes it too (a run from the file's start wrote over the other's lines)."""
    emptied = 0 if append else os.O_TRUNC  # the kernel ignores it for a named pipe
    return open(report, "ab", buffering=0, opener=lambda path, flags: os.open(path, flags | emptied, 0o666))


def reported_outputs(report: Path) -> set[str] | None:
    """The outputs (links resolved) of the edits --report's file has a line of, done; None where it is not a file
    that can be read (not there: a first report; a named pipe: reading it would wait). A relative one is read from
    the current folder and from the report's (a run resumed from another folder: `-o mb/out --report mb/r.jsonl`
    after `cd mb`'s `-o out --report r.jsonl`)."""
    try:
        if not report.is_file():
            return None
        lines = report.read_bytes().splitlines()
    except OSError:
        return None
    outputs = set()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash, or not ours
            continue
        if isinstance(record, dict) and isinstance(record.get("output"), str) and "error" not in record:
            outputs.update({os.path.realpath(record["output"]), os.path.realpath(report.parent / record["output"])})
    return outputs


RESULT_FIELDS = ("seconds", "edited_pixels", "used_fallback", "warnings")  # a report line's of an edit written


def settings_record(config: EditConfig, action: Action | None) -> dict[str, Any]:
    """What a report line and the demo's timings.json keep of an edit's settings to reproduce it: those the
    command line sets, the β its action blended with, and the engine's version (whose defaults are the rest).
    `action` None (an edit not done, its action left to the classifier): neither the action nor its β."""
    record = {"action": None if action is None else action.value, "seed": config.seed, "steps": config.steps,
              "beta": None if action is None else config.beta_for(action), "threshold_rule": config.threshold_rule,
              "version": __version__}
    return {name: value for name, value in record.items() if value is not None}


@dataclass
class _Run:
    """`edit_all`'s work across its batches: reading, editing and writing, and what it has said."""

    total: int  # edits in all
    several: bool  # False: one edit, whose error is the command's
    in_flight: int  # edits whose files may wait to be written: a batch's, while the next is edited
    failed: list[str] = field(default_factory=list)  # the edits not done, by name
    written: int = 0
    said: set[str] = field(default_factory=set)  # the output warnings said, less their paths: once each in a run
    report: BinaryIO | None = None  # --report's file, unbuffered
    # The command's settings, each job's own over them in its report line: EditConfig()'s defaults until the
    # pipeline is built (an image that cannot be read fails before), then its default_config's.
    config: EditConfig = field(default_factory=EditConfig)
    writer: ThreadPoolExecutor | None = None  # writes the files, in order
    writing: deque[tuple[Future, LoadedJob, dict[str, Any]]] = field(default_factory=deque)  # and what to say of each
    stop_writing: threading.Event = field(default_factory=threading.Event)  # a write failed, or the run was cut short

    def load(self, chunk: Sequence[EditJob], done: int) -> list[LoadedJob]:
        """The chunk's images read, each checked to fit its output's format; one that cannot be is said and left
        out (or raises, for one edit). With several, a line first says which these are."""
        from .image_io import check_output_size, colour_profile, load_image

        self.settle(wait=False)  # the edits written by now said before this batch's lines; a failed write stops here
        if self.several:
            print(f"[{done + 1}/{self.total}] {', '.join(job.name() for job in chunk)}", file=sys.stderr)
        loaded = []
        for job in chunk:
            try:
                pixels, profile = _read_naming_warnings(job.image, load_image, colour_profile)
                check_output_size(job.output, *pixels.shape[:2])
            except ZoneError as error:
                self._fail(job, error, named=bool(job.label))  # the image's own errors name its file
                continue
            self._say_output_notes(job.output, profile)
            loaded.append(LoadedJob(job, pixels, profile))
        return loaded

    def edit(self, pipe: ZonePipeline, loaded: Sequence[LoadedJob], config: EditConfig, progress: bool) -> None:
        """Edit the loaded images (those of one size as one batch) and queue each edit's files for the writer
        thread (`_write`). With several, an edit's warnings are said with its name (a batch's would name none)."""
        from .errors import EditWarning
        from .pipeline import EditRequest

        requests = [EditRequest(item.pixels, item.job.instruction, config.replace(**dict(item.job.changes)))
                    for item in loaded]
        with warnings.catch_warnings():
            if self.several:
                warnings.simplefilter("ignore", EditWarning)
            # One edit's error too comes back, not raised: `_fail` reports it before it becomes the command's.
            results = pipe.edit_batch(requests, progress=progress, return_exceptions=True)
        for item, request, result in zip(loaded, requests, results, strict=True):
            if isinstance(result, ZoneError):
                self._fail(item.job, result, named=True)
            elif isinstance(result, Exception):  # not the user's: a bug, its traceback kept
                raise result
            else:
                for note in result.notes if self.several else ():
                    print(f"warning: {item.job.name()}: {note}", file=sys.stderr)
                self.settle(keep=self.in_flight - 1)  # a batch's results in hand at most, while the next is edited
                outcome = dict(settings_record(request.config, result.action), seconds=result.timings,
                               edited_pixels=int(result.region.sum()), used_fallback=result.used_fallback,
                               warnings=list(result.notes))
                self.writing.append((self.writer.submit(self._write, item, result), item, outcome))

    def settle(self, keep: int = 0, *, wait: bool = True) -> None:
        """Say each edit whose files are written, in order: waiting for the queued writes until `keep` are left
        (without `wait`, none: those done so far). A write that failed stops the run, saying how to go on."""
        while self.writing and ((wait and len(self.writing) > keep) or self.writing[0][0].done()):
            written, item, outcome = self.writing[0]
            try:
                result = written.result()
            except ZoneError as error:
                with contextlib.suppress(OutputError):  # the report on the same full disk: the write's error said
                    self.record(item.job, **{name: value for name, value in outcome.items()
                                             if name not in RESULT_FIELDS}, error=command_line_spelling(str(error)))
                if not self.several:
                    raise
                left = self.total - self.written
                raise type(error)(f"{error} (the run stopped: {left} of {self.total} edits not written; mend it, "
                                  "then run the same command with --skip-existing)") from None
            self.writing.popleft()  # after its result: an interrupt in the wait leaves it to `cut_short`
            self._say_written(result, item, outcome)

    def cut_short(self) -> None:
        """The run stops (Ctrl-C, SIGTERM, an error): the write under way finishes, those queued are dropped, and
        the edits whose files were written are said and reported, as a run that ended would."""
        self.stop_writing.set()
        self.writer.shutdown(wait=True, cancel_futures=True)
        for written, item, outcome in self.writing:
            if not written.cancelled() and written.exception() is None:
                self._say_written(written.result(), item, outcome)
        self.writing.clear()

    def _say_written(self, result: EditResult, item: LoadedJob, outcome: dict[str, Any]) -> None:
        self.written += 1
        print_summary(result, item.job.name() if self.several else None)
        print_path(item.job.output)
        self.record(item.job, **outcome)

    def record(self, job: EditJob, **outcome: Any) -> None:
        """One line of --report, written at once (a run cut short keeps the lines of the edits it ended): the
        edit's name, image, output and instruction, then its outcome (or its error)."""
        if self.report is not None:
            line = {"name": job.name(), "image": str(job.image), "output": str(job.output),
                    "instruction": job.instruction, **outcome}
            try:
                encoded = json.dumps(line, ensure_ascii=False).encode()
            except UnicodeEncodeError:  # a file name not in UTF-8 (caf\xe9.png) is text with lone surrogates:
                encoded = json.dumps(line).encode()  # as \u escapes, which os.fsencode turns back into its bytes
            data = memoryview(encoded + b"\n")
            # Another run writing the report waits: its line cannot land between ours' start and its take-back.
            with exclusive_lock(self.report.fileno()):
                end = self.report.seek(0, os.SEEK_END) if self.report.seekable() else None  # a failed line's start
                try:
                    while data:  # a raw write may take part of it
                        data = data[self.report.write(data):]
                except OSError as error:  # a traceback, exit 1, was said on a full disk
                    self._report_failed(job, end, error, outcome.get("error"))

    def _report_failed(self, job: EditJob, end: int | None, error: OSError, failed: str | None = None) -> NoReturn:
        """An OutputError for --report's line of `job` that could not be written, its part written taken back (to
        `end`, in a file); `failed`: the error of the edit the line was of, not done."""
        report, self.report = self.report, None  # no more lines: the run stops
        with contextlib.suppress(OSError):
            if end is not None:
                report.truncate(end)
        said = f"cannot write --report {report.name}: {error.strerror or error}"
        if not self.several:
            raise OutputError(f"{said}; " + (f"the edit was not done: {failed}" if failed else
                                             f"the edit was written to {job.output}"))
        raise OutputError(f"{said} (the run stopped, {job.name()}'s line missing: {self.total - self.written} of "
                          f"{self.total} edits not done; mend it, then run the same command with --skip-existing)")

    def _fail(self, job: EditJob, error: ZoneError, named: bool) -> None:
        """`job` not done, said and reported with its settings (the command's, the job's own over them), as a done
        one's line has them: its action and β where forced; left to the classifier, they are unknown. One edit's
        error is reported too (a script reading --report saw no line of it), then raised: the command's."""
        if self.several:
            self.settle()  # the edits before it said first, as they came
            print(error_line(f"{job.name()}: {error}" if named else error), file=sys.stderr)
            self.failed.append(job.name())
        config = self.config.replace(**dict(job.changes))
        self.record(job, **settings_record(config, config.action), error=command_line_spelling(str(error)))
        if not self.several:
            raise error

    def _say_output_notes(self, output: Path, profile: bytes | None) -> None:
        from .image_io import output_notes

        for note in output_notes(output, profile):
            if (kind := note.replace(str(output), "")) not in self.said:  # 80 JPEGs: one lossy warning
                self.said.add(kind)
                more = " (said once for every such edit)" if self.several else ""
                print(f"warning: {note}{more}", file=sys.stderr)

    def _write(self, item: LoadedJob, result: EditResult) -> EditResult:
        """In the writer thread: the edit's masks and the edit, all or none (an earlier run's files stay whole
        when one fails: a file there is always its run's); none after a write that failed (a full disk would fail
        every edit after it)."""
        from .image_io import save_image

        if self.stop_writing.is_set():
            raise ZoneError("not written: the run stopped before it")  # never said: the run stops with its reason
        try:
            with written_together():
                if item.job.masks:
                    save_masks(result, item.job.masks, item.profile)
                save_image(result.image, item.job.output, icc_profile=item.profile)
        except BaseException:
            self.stop_writing.set()
            raise
        return result


def _read_naming_warnings(image: Path, *readers: Callable[[Path], Any]) -> list[Any]:
    """What each reader returns for `image`, a library's warnings on the way (Pillow's "Corrupt EXIF data", said
    once per field it cannot read) said once each with the image's name; the engine's own name it already.
    Warnings are caught for the whole process: the command line's main thread only, never a server's threads."""
    from .errors import EditWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # each image's, not the first's alone
            for quiet in (DeprecationWarning, FutureWarning):  # as the command line keeps them (cli._quiet_libraries)
                warnings.simplefilter("ignore", quiet)
            return [read(image) for read in readers]
    finally:  # out of the block: the command's own way of saying a warning back
        for message in dict.fromkeys(str(w.message).strip() for w in caught if w.category is not EditWarning):
            print(f"warning: {image}: {message}", file=sys.stderr)
        for said in caught:
            if said.category is EditWarning:
                warnings.showwarning(said.message, said.category, said.filename, said.lineno)


def save_masks(result: EditResult, folder: Path, icc_profile: bytes | None = None) -> None:
    """What --save-masks writes (`mask_files`), those in the input's colours with its profile."""
    from .image_io import save_image

    for name, path in zip(MASK_OUTPUTS, mask_files(folder), strict=True):
        save_image(getattr(result, name), path, icc_profile=icc_profile if name in COLOUR_OUTPUTS else None)


def print_summary(result: EditResult, name: str | None = None) -> None:
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    named = f"{name}: " if name is not None else ""
    print(f"{named}action: {result.action.value}; edited pixels: {int(result.region.sum())}; {stages}",
          file=sys.stderr)
    if result.used_fallback:
        print(f"warning: {named}no SAM segment overlapped the attention mask; the attention mask was used",
              file=sys.stderr)
