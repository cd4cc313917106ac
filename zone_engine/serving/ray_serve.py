"""`zone serve --ray`: the same HTTP app as a Ray Serve deployment, one replica per GPU.

Each replica loads its own pipeline and builds the app of app.py (`__serve_build_asgi_app__`), so
routes, limits, errors and metrics are the single-process ones. Batching is Ray Serve's own
`@serve.batch` (its size and wait set from `ServeSettings` at start); the queue bound is Serve's
`max_queued_requests` (Serve answers 503 beyond it). Needs `pip install 'ray[serve]'`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ray import serve

from ..errors import ConfigError
from ..pipeline import BatchKey, EditRequest, ZonePipeline
from .app import EditService, create_app
from .settings import PipelineSpec, ServeSettings


class RayEditService(EditService):
    """Requests go through the replica's `@serve.batch` method; Serve gathers them into batches."""

    def __init__(self, build_pipeline: Callable[[], ZonePipeline], settings: ServeSettings,
                 batched: Callable[[EditRequest], Awaitable[Any]]) -> None:
        super().__init__(build_pipeline, settings)
        self.batched = batched

    async def submit(self, request: EditRequest, key: BatchKey) -> Any:
        # A batch may mix batch keys; `edit_batch` denoises each key's edits together.
        return await self.batched(request)


@serve.deployment(graceful_shutdown_wait_loop_s=0.5, health_check_period_s=5)
@serve.ingress()
class ZoneReplica:
    def __init__(self, spec: PipelineSpec, settings: ServeSettings) -> None:
        self._edit_batch.set_max_batch_size(settings.max_batch)
        self._edit_batch.set_batch_wait_timeout_s(settings.max_wait_ms / 1000)
        self.service = RayEditService(spec.build, settings, self._edit_batch)
        self.service.load()  # the replica is healthy (routed to) only once this returns
        self.service.ready = True

    def __serve_build_asgi_app__(self):
        app = create_app(settings=self.service.settings)
        app.state.service = self.service
        return app

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _edit_batch(self, requests: list[EditRequest]) -> list[Any]:
        # Outcomes are returned, exceptions included, so one failing request fails alone.
        self.service.metrics.batch_size.observe(len(requests))
        return await asyncio.to_thread(self.service.run_batch, requests)


def replica_resources(spec: PipelineSpec, replicas: int, cluster: dict[str, float]) -> dict[str, float]:
    """One GPU per replica when the pipeline runs on CUDA, else one CPU. `cluster`: Ray's resource
    totals (this machine's, or the cluster's in RAY_ADDRESS), so GPUs on other nodes count too."""
    gpus = int(cluster.get("GPU", 0))
    if spec.device == "cpu" or (spec.device == "auto" and gpus == 0):
        return {"num_cpus": 1, "num_gpus": 0}
    if replicas > gpus:
        raise ConfigError(f"--replicas {replicas} needs {replicas} GPUs (one each); the Ray cluster has {gpus}")
    return {"num_cpus": 1, "num_gpus": 1}


APPLICATION = "zone"  # the Serve application's name


class ZoneDeployment:
    """`zone serve --ray`'s Serve application: `deploy` brings it up, `shutdown` takes down only what this process
    brought up. On a cluster joined through RAY_ADDRESS, Serve's other applications stay (serve.shutdown would
    delete them all), and so does a zone application another process serves when this one is refused first."""

    def __init__(self) -> None:
        self.deployed = False  # serve.run under way or done: the zone application is this process's

    def deploy(self, spec: PipelineSpec, settings: ServeSettings, *, host: str, port: int, replicas: int,
               log_level: str = "warning") -> None:
        """Start Ray (or join the cluster in RAY_ADDRESS) and Serve, and deploy; returns once replicas are up."""
        import ray

        if replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {replicas}")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            _init_keeping_sigterm(ray)
        resources = replica_resources(spec, replicas, ray.cluster_resources())
        serve.start(http_options={"host": host, "port": port})
        deployment = ZoneReplica.options(
            num_replicas=replicas, ray_actor_options=resources,
            max_ongoing_requests=2 * settings.max_batch, max_queued_requests=settings.queue_size,
            # Serve's default (20 s) would kill edits under way on a redeploy or scale-down: let them finish.
            graceful_shutdown_timeout_s=settings.timeout_s + 1,
        )
        self.deployed = True
        serve.run(deployment.bind(spec, settings), name=APPLICATION, route_prefix="/",
                  logging_config={"log_level": log_level.upper(), "enable_access_log": False})

    def shutdown(self) -> None:
        """Delete the application if this process deployed it (its edits under way finish first), then leave Ray:
        a local cluster ray.init started ends with it, a joined one goes on."""
        import ray

        if not ray.is_initialized():  # refused before Ray started: serve.shutdown would start it to find nothing
            return
        if self.deployed:
            serve.delete(APPLICATION)
        ray.shutdown()


def _init_keeping_sigterm(ray: Any) -> None:
    """ray.init, the caller's SIGTERM handler kept: Ray's own exits with status 15 and a stack dump, where the
    caller's (`zone serve --ray`: take its application down, leave Ray, exit 143) would go unused. Ray's processes
    (GCS, raylet, and the workers the raylet starts) inherit SIGTERM blocked, as Ray starts them with SIGINT
    blocked: a SIGTERM to the whole process group (`timeout`, systemd's default KillMode=control-group) killed
    them under this process, whose shutdown then hung 60 s on the lost GCS and exited 1. ray.shutdown kills them
    with SIGKILL."""
    main = threading.current_thread() is threading.main_thread()  # elsewhere no handler can be set or read
    ours = signal.getsignal(signal.SIGTERM) if main else None
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # this thread's, which starts them
    try:
        ray.init(include_dashboard=False, logging_level="WARNING")
    finally:  # a SIGTERM that came meanwhile is delivered now, to the handler below
        if ours is not None:  # None: a handler not set from Python, which Python cannot put back
            signal.signal(signal.SIGTERM, ours)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def run_ray(spec: PipelineSpec, settings: ServeSettings, *, host: str, port: int, replicas: int,
            log_level: str = "warning") -> None:
    """Deploy and serve until interrupted (KeyboardInterrupt: Ctrl-C, or SIGTERM where the caller raises it so),
    then take the application down and leave Ray (ZoneDeployment.shutdown), also when that comes while deploying."""
    application = ZoneDeployment()
    try:
        application.deploy(spec, settings, host=host, port=port, replicas=replicas, log_level=log_level)
        print(f"zone: serving on http://{host}:{port} with {replicas} Ray Serve replica(s); Ctrl-C stops", flush=True)
        threading.Event().wait()  # a signal's exception ends it
    finally:
        if threading.current_thread() is threading.main_thread():  # a second SIGTERM must not cut the shutdown short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        application.shutdown()
