"""zone-engine: a fast, faithful inference engine for ZONE (zero-shot instruction-guided local editing)."""

from .config import Action, EditConfig, SamConfig
from .errors import ZoneError
from .pipeline import EditResult, ZonePipeline

__all__ = ["Action", "EditConfig", "EditResult", "SamConfig", "ZoneError", "ZonePipeline"]
__version__ = "0.1.0"
