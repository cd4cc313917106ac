"""`zone serve --ray`: the same HTTP app as a Ray Serve deployment, one replica per GPU.

Each replica loads its own pipeline and builds the app of app.py (`__serve_build_asgi_app__`), so
routes, limits, errors and metrics are the single-process ones. Batching is Ray Serve's own
`@serve.batch` (its size and wait set from `ServeSettings` at start); the queue bound is Serve's
`max_queued_requests` (Serve answers 503 beyond it). Needs `pip install 'ray[serve]'`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from ..errors import ConfigError, ZoneError
from ..pipeline import BatchKey, EditRequest, ZonePipeline
from .app import EditService, check_start_environment, create_app, log
from .settings import PipelineSpec, ServeSettings

try:  # how Serve answers beyond its queue (a Retry-After); not in every Ray this runs on
    from ray.serve.config import BackpressureConfig
except ImportError:
    BackpressureConfig = None

# Serve's proxy refuses knowing no batch's duration, so no estimate as the single process's: the wait of the
# server's other retry-later answers.
QUEUE_FULL_RETRY_AFTER_S = 5


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
        _log_through_serve()
        # As the single process at start. ray.init raises the soft limit only to min(hard, 65536) and warns below
        # 4096 whatever the queue; this says the `ulimit -n` --queue-size needs, in each replica's own process.
        check_start_environment(settings)
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


class _ToServeLog(logging.Handler):
    """Hands a record to the replica's Serve logger, whose handlers Serve sets (and resets on a redeploy)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("ray.serve").handle(record)


def _log_through_serve() -> None:
    """The service's own lines (warm-up, a request's warnings, failed edits) at Serve's level (--log-level), in
    the replica's Serve log and the terminal of `zone serve --ray`: Python's defaults had dropped all but warnings
    and errors, those printed bare. Outside a replica (built by hand, in tests) the logger stays as it was."""
    try:
        serve.get_replica_context()
    except RayServeException:
        return
    log.setLevel(logging.getLogger("ray.serve").level)
    log.handlers = [_ToServeLog()]
    log.propagate = False


def replica_resources(spec: PipelineSpec, replicas: int, cluster: dict[str, float]) -> dict[str, float]:
    """One GPU per replica when the pipeline runs on CUDA, else one CPU. `cluster`: Ray's resource
    totals (this machine's, or the cluster's in RAY_ADDRESS), so GPUs on other nodes count too."""
    gpus = int(cluster.get("GPU", 0))
    if spec.device == "cpu" or (spec.device == "auto" and gpus == 0):
        cpus = int(cluster.get("CPU", 0))
        if replicas > cpus:  # Serve would wait for the missing CPUs forever, saying only a warning every 30 s
            raise ConfigError(f"--replicas {replicas} needs {replicas} CPUs (one each); the Ray cluster has {cpus}")
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
        self.started_serve = False  # Serve (its controller, and the HTTP proxy holding the port) is this process's

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
        listening = _serve_listening()
        if listening is None:
            self.started_serve = True
        elif listening != (host, port):  # serve.start would only warn, and the application answer there
            raise ConfigError(f"Ray Serve already runs on this Ray cluster, listening on {listening[0]}:"
                              f"{listening[1]}, and cannot move to {host}:{port} while it runs: stop it (`serve "
                              "shutdown`, which deletes its applications) or start zone on a Ray of its own "
                              "(RAY_ADDRESS=local)")
        serve.start(http_options={"host": host, "port": port})
        deployment = ZoneReplica.options(
            num_replicas=replicas, ray_actor_options=resources,
            max_ongoing_requests=2 * settings.max_batch, max_queued_requests=settings.queue_size,
            # Serve's default (20 s) would kill edits under way on a redeploy or scale-down: let them finish.
            graceful_shutdown_timeout_s=settings.timeout_s + 1, **_queue_full_answer(),
        )
        self.deployed = True
        try:
            serve.run(deployment.bind(spec, settings), name=APPLICATION, route_prefix="/",
                      logging_config={"log_level": log_level.upper(), "enable_access_log": False})
        except RuntimeError as error:  # Serve's "Deploying application zone failed", its cause only in the log
            raise _replica_error() or error from None

    def shutdown(self) -> None:
        """Delete the application if this process deployed it (its edits under way finish first), and Serve if this
        process started it and no application is left, then leave Ray: a local cluster ray.init started ends with
        it, a joined one goes on as it was."""
        import ray

        if not ray.is_initialized():  # refused before Ray started: serve.shutdown would start it to find nothing
            return
        if self.deployed:
            serve.delete(APPLICATION)
        if self.started_serve and not serve.status().applications:  # else its proxy held the port after exit
            serve.shutdown()
        ray.shutdown()


def _queue_full_answer() -> dict[str, Any]:
    """The deployment option that makes Serve's 503 for a full queue say when to retry, as the single process's
    does (its body stays Serve's plain text: Serve's proxy answers before the app sees the request); none where
    this Ray has no such option."""
    if BackpressureConfig is None:
        return {}
    return {"backpressure_config": BackpressureConfig(retry_after_s=QUEUE_FULL_RETRY_AFTER_S)}


def _serve_listening() -> tuple[str, int] | None:
    """The host and port of the Serve already running on the Ray cluster, or None where none runs (Serve has no
    public call for its HTTP options)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else (client.http_config.host, client.http_config.port)


def _replica_error() -> ZoneError | None:
    """The error that kept the zone application's replicas from starting (a checkpoint that fails to load), as
    raised in them: Serve's own says only that the deployment failed, the replicas' tracebacks are in the log."""
    application = serve.status().applications.get(APPLICATION)
    messages = [] if application is None else [status.message for status in application.deployments.values()]
    said = re.findall(r"^zone_engine\.errors\.\w+: (.*)$", "\n".join(messages), re.MULTILINE)
    return ZoneError(said[-1]) if said else None


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
