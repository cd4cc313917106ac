"""zone-engine: a fast, faithful inference engine for ZONE (zero-shot instruction-guided local editing)."""

from typing import TYPE_CHECKING

from .config import Action, EditConfig, SamConfig
from .errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    EditCancelled,
    EditWarning,
    InputImageError,
    InstructionError,
    OutputError,
    ZoneError,
)

# PreparedEdit and BatchKey: the types of prepare / denoise / finish, for a caller's own scheduling.
_FROM_PIPELINE = ("EditRequest", "EditResult", "ZonePipeline", "PreparedEdit", "BatchKey")
if TYPE_CHECKING:  # imported lazily (__getattr__ below), whose `object` type checkers took for these names:
    # `ZonePipeline.tiny()` was '"object" has no attribute "tiny"'. `X as X`: re-exported, as __all__ says.
    from .pipeline import BatchKey as BatchKey
    from .pipeline import EditRequest as EditRequest
    from .pipeline import EditResult as EditResult
    from .pipeline import PreparedEdit as PreparedEdit
    from .pipeline import ZonePipeline as ZonePipeline
del TYPE_CHECKING  # the package's namespace is its API (dir(zone_engine))
__all__ = [  # the errors too, so a caller can catch the one it means without knowing the module
    "Action", "EditConfig", "SamConfig", "ZoneError", "ConfigError", "CheckpointError", "DeviceError",
    "InputImageError", "InstructionError", "OutputError", "EditCancelled", "EditWarning", *_FROM_PIPELINE,
]
__version__ = "0.1.0"


def _put_the_checkout_root_after_the_installed_packages() -> None:
    """`python -m ...` (pytest, the benchmark tools) run in this checkout puts its root first on sys.path, where the
    folder kernels/ (installed as zone_kernels) shadows Hugging Face's `kernels`, which transformers imports when it
    is installed: "cannot import name 'CUDAProperties' from 'kernels'". Moved last, the root still serves a module
    of the caller's there; the packages are installed (`pip install -e .`) under their own names."""
    import sys  # here: the package's namespace is its API (dir(zone_engine))
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "kernels" / "__init__.py").is_file() and (root / "pyproject.toml").is_file():  # a checkout
        at_root = [entry for entry in sys.path if Path(entry or ".").resolve() == root]
        sys.path[:] = [entry for entry in sys.path if entry not in at_root] + at_root


_put_the_checkout_root_after_the_installed_packages()


def __getattr__(name: str) -> object:
    # The pipeline pulls in torch, diffusers and segment-anything: import it only when asked for,
    # so `zone --help` and the pure-numpy stages stay light.
    if name in _FROM_PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'zone_engine' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too, for dir() and completion
    return sorted({*globals(), *_FROM_PIPELINE})
