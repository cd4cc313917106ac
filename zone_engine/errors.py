"""User-facing errors.

Every mistake a user can make (a bad image, a missing checkpoint, an impossible option) raises a
`ZoneError` subclass with a message that says what is wrong and what to do. The CLI prints that one
line and exits with code 2; anything else is a bug and keeps its traceback.
"""

import difflib
import functools
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (a library's may run to a list of keys), or its type's name."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def a_type(value: object) -> str:
    """A value's type with its article, for messages: "an int", "a str" (by its first letter)."""
    return with_article(type(value).__name__)


def with_article(name: str) -> str:
    """`name` after "a" or "an", by its first letter: "an unknown", "a CMYK"."""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


class ZoneError(Exception):
    """Base class: a problem with the user's input or setup, never a bug in the engine."""


class InputImageError(ZoneError):
    """The image cannot be read or is not usable (corrupt, unsupported mode, too small or too large)."""


class InstructionError(ZoneError):
    """The instruction is empty or not text."""


class CheckpointError(ZoneError):
    """A model checkpoint is missing, unreadable or does not match what was expected."""


class DeviceError(ZoneError):
    """The requested device or dtype is not available on this machine."""


class OutOfDeviceMemory(DeviceError):
    """The device ran out of memory for an edit: the machine's limit, not a bug (the message says what to try)."""


OUT_OF_MEMORY_HINT = ("edit fewer images at once (--batch-size, a server's --max-batch), in half precision (--dtype "
                      "fp16, --sam-precision bf16, or fp16 on a GPU without bf16 such as a T4), smaller images (a "
                      "server's --max-pixels), or free the GPU's memory (other processes on it)")
# Moving the models onto the GPU: no edit's size to lower yet.
MODELS_OUT_OF_MEMORY_HINT = ("load them in half precision (--dtype fp16), free the GPU's memory (other processes on "
                             "it), or choose a GPU with more free memory (--device cuda:N)")


class ConfigError(ZoneError):
    """An option has an impossible value."""


class OutputError(ZoneError):
    """A result cannot be written where asked: its path, its format, or what was given to write."""


class EditCancelled(ZoneError):
    """The edit was cancelled (its caller gave up on it, e.g. a server request timed out)."""


class EditWarning(UserWarning):
    """The edit ran, but not quite on what was given (transparency dropped, frames after the first skipped,
    an instruction truncated, a mask coarser than the image). Each is also in `EditResult.notes`, so a
    server can report it with its request and silence the warning (`warnings.filterwarnings`)."""


# Frames a warning is never the user's: the engine's own, and the decorators between them (torch.inference_mode's
# wrapper, contextlib's, functools').
_ENGINE_FRAMES = (__name__.partition(".")[0], "torch", "contextlib", "functools")


def warn_caller(message: str, category: type[Warning] = EditWarning) -> None:
    """`warnings.warn` at the first frame outside the engine: the user's call, however deep inside it (a fixed
    stacklevel pointed into the engine for `edit` or for `edit_batch`, so a filter by module and the default
    once-per-place rule never saw the caller)."""
    frame, level = sys._getframe(1), 2  # level 2: warn_caller's caller
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _ENGINE_FRAMES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# Diffusers' InstructPix2Pix pipeline's names for what the engine calls otherwise: a caller coming from it types
# them, and none is close enough in spelling to be guessed (`EditConfig(guidance_scale=7)` named no field).
DIFFUSERS_NAMES = {"num_inference_steps": "steps", "guidance_scale": "text_guidance",
                   "image_guidance_scale": "image_guidance", "generator": "seed", "prompt": "instruction"}


def nearest(name: str, known: Iterable[str]) -> str | None:
    """The known name `name` most likely misspells (or diffusers' name of), if any is close."""
    known = list(known)
    if DIFFUSERS_NAMES.get(name) in known:
        return DIFFUSERS_NAMES[name]
    near = difflib.get_close_matches(name, known, n=1)
    return near[0] if near else None


def refuse_unknown(owner: str, names: Iterable[str], known: Sequence[str], noun: str = "option") -> None:
    """A misspelt keyword as a ConfigError naming it, its nearest known name and all of them (not a TypeError):
    "EditConfig has no field 'step': did you mean steps? its fields: ..."."""
    for name in names:
        if name not in known:
            near = nearest(name, known)
            guess = f"did you mean {near}? " if near else ""
            raise ConfigError(f"{owner} has no {noun} {name!r}: {guess}its {noun}s: {', '.join(known)}")


def unknown_keywords_refused(method: Callable[P, T], owner: str, known: Sequence[str],
                             noun: str = "option") -> Callable[P, T]:
    """The method (a constructor) `method`, saying a misspelt keyword as `refuse_unknown` does before it runs. Its
    signature kept (P), for type checkers and editors (`Callable[..., T]` left them no parameter to check)."""
    @functools.wraps(method)
    def checked(*args: P.args, **kwargs: P.kwargs) -> T:
        refuse_unknown(owner, kwargs, known, noun)
        return method(*args, **kwargs)

    return checked
