"""`zone serve`: the edit service (FastAPI + uvicorn, or Ray Serve) with dynamic batching.

The app's names import on first use (PEP 562): `zone edit` reads `PipelineSpec` from `settings` without the
`[serve]` extra (FastAPI, uvicorn) installed."""

from __future__ import annotations

import importlib
from typing import Any

from .settings import PipelineSpec, ServeSettings

_FROM_APP = ("EditService", "LocalEditService", "create_app", "run_server")
__all__ = [*_FROM_APP, "PipelineSpec", "ServeSettings"]

# What the app imports of the [serve] extra (module names, not package names); the tests skip without them.
SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "prometheus_client")


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        try:
            app = importlib.import_module(".app", __name__)
        except ModuleNotFoundError as error:  # said with the extra that brings it, not as a module deep inside
            if (error.name or "").partition(".")[0] not in SERVE_MODULES:
                raise
            raise ModuleNotFoundError(f"zone_engine.serving.{name} needs {error.name}: pip install "
                                      "'zone-engine[serve]'", name=error.name) from None
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
