"""zone-engine: a fast, faithful inference engine for ZONE (zero-shot instruction-guided local editing)."""

from .config import Action, EditConfig, SamConfig
from .errors import ZoneError

__all__ = ["Action", "EditConfig", "EditResult", "SamConfig", "ZoneError", "ZonePipeline"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline pulls in torch, diffusers and segment-anything: import it only when asked for,
    # so `zone --help` and the pure-numpy stages stay light.
    if name in ("ZonePipeline", "EditResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'zone_engine' has no attribute {name!r}")
