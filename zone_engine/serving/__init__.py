"""`zone serve`: the edit service (FastAPI + uvicorn, or Ray Serve) with dynamic batching."""

from .app import EditService, LocalEditService, create_app, run_server
from .settings import PipelineSpec, ServeSettings

__all__ = ["EditService", "LocalEditService", "PipelineSpec", "ServeSettings", "create_app", "run_server"]
