"""`zone batch`'s list of edits: a JSON Lines file, one object a line, each line read into an EditJob and every
mistake said with its line's number before any model loads."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from .config import EditConfig, parse_action
from .edit_files import EditJob, check_batch_size, checked_jobs, masks_folder_of, output_suffix, refuse_file_output
from .errors import ConfigError, ZoneError, refuse_unknown
from .instruction import check_instruction
from .paths import expanded, literal
from .streams import is_terminal

FIELDS = ("image", "instruction", "output", "action", "steps", "seed")
EXAMPLE = '{"image": "dog.jpg", "instruction": "make the dog a golden statue", "seed": 7}'
STDIN = "-"
LONGEST_SAID = 2000  # characters of a message: a line's value can be megabytes


def plan_manifest(args: argparse.Namespace, defaults: dict[str, Any]) -> list[EditJob]:
    """One edit a line of `args.manifest` (`-`: standard input), its image read relative to the file's folder (the
    current one for standard input or a pipe; ~/ is the home folder), its edit written under its "output" name
    (default: the image's) in the folder -o. `defaults`: the command's EditConfig fields, each line's own over them."""
    output, said_folder = args.output
    check_batch_size(args.batch_size)
    refuse_file_output(output, said_folder, "for a batch")
    source = str(args.manifest)
    # The current folder as "", not its absolute path: a report names the images as the lines give them, read from
    # standard input or from a list in the current folder alike.
    root = Path() if source == STDIN or source.startswith(("/dev/", "/proc/")) else args.manifest.parent
    jobs = []
    for number, line in enumerate(_lines(args.manifest), 1):
        if line.strip():
            try:
                jobs.append(_job(_parsed(line), args, defaults, root, f"line {number}"))
            except ZoneError as error:
                said = str(error) if len(str(error)) <= LONGEST_SAID else f"{str(error)[:LONGEST_SAID]}..."
                raise type(error)(f"{source} line {number}: {said}") from None
    if not jobs:
        raise ConfigError(f"{source} lists no edit: write one JSON object a line, such as {EXAMPLE}")
    try:
        return checked_jobs(jobs, output, repeats=True, skip_existing=args.skip_existing)
    except ZoneError as error:  # lines' clashes and outputs: the list named, as each line's own mistakes name it
        raise type(error)(f"{source}: {error}") from None


def _lines(manifest: Path) -> list[str]:
    """The file's lines, split at line feeds only: a JSON string may hold U+2028 and the like unescaped, where
    str.splitlines would cut it. A byte-order mark (some Windows editors write one) is dropped, a line's too."""
    if str(manifest) == STDIN:
        if sys.stdin is None:  # `zone batch - <&-`
            raise ConfigError("- reads the list of edits from standard input, which is closed here")
        if is_terminal(sys.stdin):  # it waited there, saying nothing
            print("reading the list of edits from the terminal: one JSON line per edit, then Ctrl-D (Ctrl-C stops)",
                  file=sys.stderr)
    try:  # standard input's bytes too: UTF-8 whatever the locale says
        data = sys.stdin.buffer.read() if str(manifest) == STDIN else manifest.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the list of edits {manifest}: {error.strerror or error}") from None
    try:
        # a line's own mark too: lists saved by such an editor and joined with `cat` ("Unexpected UTF-8 BOM")
        return [line.removeprefix("\ufeff") for line in data.decode("utf-8-sig").split("\n")]
    except UnicodeDecodeError as error:
        # Windows PowerShell 5's `>` and Notepad's "Unicode" write UTF-16, with its byte-order mark
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        found = "it is UTF-16" if utf16 else f"byte {data[error.start]:#04x} at offset {error.start} is not UTF-8"
        raise ConfigError(f"cannot read the list of edits {manifest}: {found}; save it as UTF-8") from None


def _parsed(line: str) -> dict[str, Any]:
    try:
        entry = json.loads(line, object_pairs_hook=_without_repeats)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, a number past Python's 4300 digits, nesting
        detail = f"{error.msg}, column {error.colno}" if isinstance(error, json.JSONDecodeError) else error
        hint = _spread_hint(line)
        raise ConfigError(f"not JSON ({detail}); each line is one object such as {EXAMPLE}{hint}") from None
    if not isinstance(entry, dict):
        hint = " (a JSON array of edits is written one object a line: JSON Lines)" if isinstance(entry, list) else ""
        raise ConfigError(f"{_json_kind(entry)}, not an object such as {EXAMPLE}{hint}")
    return entry


def _spread_hint(line: str) -> str:
    """What to do with a JSON file indented over lines (`json.dump(edits, f, indent=2)`), whose first line, `[` or
    `{`, was said as bare "not JSON (Expecting value, column 2)"."""
    if line.strip() in ("[", "{") or line.lstrip().startswith(("[{", "[ {")):
        return (" (this looks like JSON spread over lines: write one object a line, JSON Lines, such as "
                "pandas' to_json(orient=\"records\", lines=True) writes)")
    return ""


def _without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, a field given twice refused (json keeps the last, silently)."""
    entry: dict[str, Any] = {}
    for name, value in pairs:
        if name in entry:
            raise ConfigError(f"the field {name!r} is given twice")
        entry[name] = value
    return entry


def _job(entry: dict[str, Any], args: argparse.Namespace, defaults: dict[str, Any], root: Path, line: str) -> EditJob:
    from .image_io import check_image_path  # numpy and Pillow: not for `zone --help`

    refuse_unknown("a line", entry, FIELDS, noun="field")
    if missing := [name for name in ("image", "instruction") if name not in entry]:
        raise ConfigError(f"no {' and no '.join(missing)}: each line names both, such as {EXAMPLE}")
    if nulls := [name for name, value in entry.items() if value is None]:
        raise ConfigError(f"{', '.join(nulls)}: null; leave a field out for the command's value")
    _check_json_types(entry)
    image = _image_path(root, _path(entry["image"], "image"))
    check_image_path(image)  # a typo or a folder said before any work; its bytes are read later
    # JSON has one kind of number: 7.0 (pandas' float columns, JavaScript's 1e3) is 7, not "not a whole number"
    changes: dict[str, object] = {name: _whole(entry[name]) for name in ("steps", "seed") if name in entry}
    if "action" in entry:
        if entry["action"] == "":
            raise ConfigError('action "": write auto (classify), add, change or remove, or leave it out')
        changes["action"] = parse_action(entry["action"])
    EditConfig(**{**defaults, **changes})  # each field's mistake said now, not after the edits before it
    name = _path(entry.get("output", image.stem + output_suffix(image, args.suffix)), "output")
    return EditJob(image, args.output.path / name, masks_folder_of(args.save_masks, name),
                   check_instruction(entry["instruction"]), tuple(changes.items()), f"{line} ({entry['image']})")


def _check_json_types(entry: dict[str, Any]) -> None:
    """A value of the wrong JSON type said in JSON's words: the checks the Python API shares said Python's (`got
    True`, `got '3'`, `got int`). A number that is not whole is left to them (`got 2.5`)."""
    for name, wanted, kind in (("instruction", str, "text"), ("action", str, "text"),
                               ("steps", int | float, "a whole number"), ("seed", int | float, "a whole number")):
        value = entry.get(name)
        finite = not isinstance(value, float) or math.isfinite(value)  # json reads NaN and Infinity
        if name not in entry or (isinstance(value, wanted) and not isinstance(value, bool) and finite):
            continue
        shown = json.dumps(value) if isinstance(value, str | bool | int | float) else _json_kind(value)
        raise ConfigError(f"{name} must be {kind}, got {shown}")


def _whole(value: int | float) -> int | float:
    """A JSON number written with a fraction or exponent that is whole (7.0, 1e3) as the int it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _path(value: object, field: str) -> str:
    """A path a line gives: a string a file system can hold; an output's relative, its `..` taken away by name
    (`sub/../a.png` is `a.png`), refused where one would leave -o."""
    if not isinstance(value, str):
        raise ConfigError(f"{field} must be a path, a string, not {_json_kind(value)}")
    if not value.strip():
        raise ConfigError(f"{field} is empty: name a file")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        try:  # a file system encoding that cannot hold it (LC_ALL=C with PYTHONUTF8=0: ASCII): the list is UTF-8,
            value = os.fsdecode(value.encode("utf-8"))  # and so are the names, as a UTF-8 shell's argv gives them
        except UnicodeEncodeError:  # a lone surrogate (\ud800): no file name holds it
            raise ConfigError(f"{field} {value!r} holds a character no file name can (a lone surrogate)") from None
    if "\0" in value:
        raise ConfigError(f"{field} {value!r} holds a NUL character, which no file name can")
    if field != "output":
        return value
    # "sub/../a.png" (a path joined by a script) is a.png, its .. taken away by name, not through a link named sub
    normal = os.path.normpath(value) if ".." in Path(value).parts else value
    if Path(normal).is_absolute() or ".." in Path(normal).parts:
        raise ConfigError(f"output {value!r} must stay inside -o: a relative path whose .. leave no folder of it")
    if not Path(normal).name:  # "." or "./": was "-o out holds a folder named ., where ..."
        raise ConfigError(f"output {value!r} names -o itself, a folder: name a file inside it, such as edit.png")
    if _under_home(normal):  # a folder named ~ in -o, waiting for an `rm -rf ~`
        raise ConfigError(f"output {value!r} must stay inside -o: a relative path, not under ~")
    return normal


def _under_home(value: str) -> bool:
    """A path in a folder named `~`: `~`, `~/...`, also `./~/...` (pathlib drops the `./`, and a shell given the
    output's path would read it as the home folder)."""
    return Path(value).parts[:1] == ("~",)


def _image_path(root: Path, value: str) -> Path:
    """A line's image: `~` and `~/...` in the home folder, as a shell reads them (`~name`, `./~/` are names
    here), an absolute path as it is, else in `root`. Made absolute when it would begin with `~` (`~name/x.png`
    in the current folder): the reader expands a leading `~name` to that user's home."""
    home = value == "~" or value.startswith("~/")
    return expanded(value, ConfigError) if home else literal(root / value)


def _json_kind(value: object) -> str:
    """A value as JSON names it: "an array", "a string", ..."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kinds = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)
