"""User-facing errors.

Every mistake a user can make (a bad image, a missing checkpoint, an impossible option) raises a
`ZoneError` subclass with a message that says what is wrong and what to do. The CLI prints that one
line and exits with code 2; anything else is a bug and keeps its traceback.
"""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (a library's may run to a list of keys), or its type's name."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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


class ConfigError(ZoneError):
    """An option has an impossible value."""


class EditCancelled(ZoneError):
    """The edit was cancelled (its caller gave up on it, e.g. a server request timed out)."""


class EditWarning(UserWarning):
    """The edit ran, but not quite on what was given (transparency dropped, frames after the first skipped,
    an instruction truncated, a mask coarser than the image). Each is also in `EditResult.notes`, so a
    server can report it with its request and silence the warning (`warnings.filterwarnings`)."""
