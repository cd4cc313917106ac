"""zone-engine: a fast, faithful inference engine for ZONE (zero-shot instruction-guided local editing)."""

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
__all__ = [  # the errors too, so a caller can catch the one it means without knowing the module
    "Action", "EditConfig", "SamConfig", "ZoneError", "ConfigError", "CheckpointError", "DeviceError",
    "InputImageError", "InstructionError", "OutputError", "EditCancelled", "EditWarning", *_FROM_PIPELINE,
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The pipeline pulls in torch, diffusers and segment-anything: import it only when asked for,
    # so `zone --help` and the pure-numpy stages stay light.
    if name in _FROM_PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'zone_engine' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too, for dir() and completion
    return sorted({*globals(), *_FROM_PIPELINE})
