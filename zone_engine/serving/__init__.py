"""`zone serve`: the edit service (FastAPI + uvicorn, or Ray Serve) with dynamic batching.

The app's names import on first use (PEP 562): `zone edit` reads `PipelineSpec` from `settings` without the
`[serve]` extra (FastAPI, uvicorn) installed."""

from __future__ import annotations

import importlib
from typing import Any

from .settings import PipelineSpec, ServeSettings

_FROM_APP = ("EditService", "LocalEditService", "create_app", "run_server")
__all__ = [*_FROM_APP, "PipelineSpec", "ServeSettings"]


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        return getattr(importlib.import_module(".app", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
