"""`zone serve --ray`: a 2-replica Ray Serve deployment on the CPU answers the same HTTP contract."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import numpy as np
from conftest import smooth_image
from test_serving import decode_png, open_file_limits, post_concurrently, post_edit

from zone_engine.errors import ConfigError, ZoneError
from zone_engine.pipeline import EditRequest
from zone_engine.serving import PipelineSpec, ServeSettings, ray_serve
from zone_engine.serving.ray_serve import ZoneDeployment, ZoneReplica, replica_resources, run_ray


def test_sigterm_stops_zone_serve_ray_as_the_help_says_also_while_it_deploys(tmp_path):
    """ray.init sets Ray's own SIGTERM handler: a SIGTERM while deploying (an orchestrator giving up on a slow
    start) ended the process with a stack dump (status 15, or aborted), as no command's exit the help lists. Now:
    `terminated`, exit 143, after Serve and Ray are shut down, whenever it comes. (Before the module's cluster
    starts: its own.)"""
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a cluster of its own, also beside one `ray start` started
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "zone_engine.cli", "serve", "--ray", "--tiny", "--device",
                                   "cpu", "--no-warmup", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                  env=env)
    try:
        deadline = time.monotonic() + 120
        while "Started Serve" not in log.read_text():  # Ray is up, the replica not yet: deploying
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        code = server.wait(90)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    said = log.read_text()
    assert code == 128 + signal.SIGTERM and "terminated" in said, said
    assert "SIGTERM received" not in said and "Traceback" not in said, said


def test_a_full_queue_is_answered_503_with_retry_after_as_the_single_process_does(tmp_path):
    """Serve's own 503 beyond its queue said no Retry-After: clients had no cue when to come back. (Its body stays
    Serve's plain text.) Its own cluster, as the test above."""
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "zone_engine.cli", "serve", "--ray", "--tiny", "--device",
                                   "cpu", "--no-warmup", "--port", str(port), "--queue-size", "1", "--max-batch", "1",
                                   "--max-wait-ms", "0", "--steps", "10"], stdout=out, stderr=subprocess.STDOUT,
                                  env=env)
    try:
        deadline = time.monotonic() + 180
        while "zone: serving on" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        image = smooth_image(64, 64)
        jobs = [{"image": image, "instruction": "add a red hat", "seed": seed} for seed in range(12)]
        responses = asyncio.run(post_concurrently(f"http://127.0.0.1:{port}", jobs))  # 2 under way, 1 queued
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    refused = [response for response in responses if response.status_code == 503]
    assert refused and len(refused) + sum(response.status_code == 200 for response in responses) == len(jobs)
    assert {response.headers.get("Retry-After") for response in refused} == {str(ray_serve.QUEUE_FULL_RETRY_AFTER_S)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_base():
    import ray

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    application = ZoneDeployment()
    try:
        settings = ServeSettings(max_batch=4, max_wait_ms=200, warmup=False, edit_changes=(("steps", 3),))
        application.deploy(PipelineSpec(tiny=True, device="cpu"), settings, host="127.0.0.1", port=port, replicas=2)
        yield f"http://127.0.0.1:{port}"
    finally:
        application.shutdown()


def test_two_replicas_answer_the_same_contract(ray_base):
    image = smooth_image(70, 90, seed=1)
    assert httpx.get(f"{ray_base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{ray_base}/readyz").status_code == 200
    response = post_edit(ray_base, image, seed=7)
    assert response.status_code == 200 and decode_png(response.content).shape == image.shape
    body = post_edit(ray_base, image, seed=7, **{"return": "json"}).json()
    assert (body["width"], body["height"]) == (90, 70) and {"mask_b", "mask_f", "timings"} <= set(body)
    bad = post_edit(ray_base, b"not an image")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_image"
    assert "zone_requests_total" in httpx.get(f"{ray_base}/metrics").text
    assert "/v1/edit" in httpx.get(f"{ray_base}/openapi.json").json()["paths"]

    # Concurrent requests spread over both replicas; the same seed gives the same image on either, up to
    # the rounding of a larger batch (edit_batch's bound, tests/test_batching.py: one uint8 level).
    # Ray's router picks replicas at random between queue lengths it may not have seen yet, so a round of 8
    # can land on one replica (seen once, on a loaded machine): up to 4 rounds until both have answered.
    jobs = [{"image": image, "instruction": "add a red hat", "seed": 7} for _ in range(8)]
    responses: list[httpx.Response] = []
    for _ in range(4):
        responses += asyncio.run(post_concurrently(ray_base, jobs))
        if len({r.headers.get("X-Zone-Replica") for r in responses}) == 2:
            break
    assert all(r.status_code == 200 for r in responses)
    assert len({r.headers["X-Zone-Replica"] for r in responses}) == 2
    alone = decode_png(response.content).astype(int)
    assert all(np.abs(decode_png(r.content).astype(int) - alone).max() <= 1 for r in responses)


def test_replicas_get_one_gpu_each_where_the_cluster_has_them():
    cpu, gpu = PipelineSpec(tiny=True, device="cpu"), PipelineSpec(device="cuda")
    assert replica_resources(cpu, 2, {"CPU": 2.0, "GPU": 4.0}) == {"num_cpus": 1, "num_gpus": 0}
    assert replica_resources(PipelineSpec(device="auto"), 2, {"CPU": 2.0}) == {"num_cpus": 1, "num_gpus": 0}
    assert replica_resources(gpu, 4, {"CPU": 64.0, "GPU": 4.0}) == {"num_cpus": 1, "num_gpus": 1}
    # "auto" means CUDA where there is a GPU: its replicas need one each, as "cuda"'s do.
    assert replica_resources(PipelineSpec(device="auto"), 1, {"CPU": 2.0, "GPU": 1.0}) == {"num_cpus": 1, "num_gpus": 1}
    with pytest.raises(ConfigError, match="needs 5 GPUs \\(one each\\); the Ray cluster has 4$"):
        replica_resources(gpu, 5, {"CPU": 64.0, "GPU": 4.0})
    # On the CPU too: Serve waited for the missing CPUs forever (a warning every 30 s), never serving.
    with pytest.raises(ConfigError, match="--replicas 3 needs 3 CPUs \\(one each\\); the Ray cluster has 2$"):
        replica_resources(cpu, 3, {"CPU": 2.0})


def test_a_replica_batches_as_the_settings_say_and_is_ready_once_loaded(tiny_pipe):
    """Built as Serve builds it, without a cluster: `@serve.batch`'s own size and wait (4, 10 ms) were the
    replica's whatever --max-batch and --max-wait-ms said, and its batches must reach `zone_batch_size`."""
    replica = ZoneReplica.func_or_class.__wrapped__(SimpleNamespace(build=lambda: tiny_pipe),
                                                   ServeSettings(max_batch=8, max_wait_ms=50, warmup=False))
    assert (replica._edit_batch._get_max_batch_size(), replica._edit_batch._get_batch_wait_timeout_s()) == (8, 0.05)
    assert replica.service.ready and replica.__serve_build_asgi_app__().state.service is replica.service
    # A batch Serve gathered (its batching needs a replica's context: the method under it, called as Serve does).
    image, config = smooth_image(32, 32), tiny_pipe.default_config.replace(steps=2)
    batch = [EditRequest(image, "add a red hat", config), EditRequest(smooth_image(4, 4), "add a red hat", config)]
    edited, refused = asyncio.run(type(replica)._edit_batch.__wrapped__(replica, batch))
    assert edited.image.shape == image.shape and isinstance(refused, ZoneError)  # too small: it fails alone
    sample = replica.service.metrics.registry.get_sample_value
    assert (sample("zone_batch_size_count"), sample("zone_batch_size_sum")) == (1, 2)


def test_a_replicas_own_log_lines_go_to_serves_log_at_its_level(monkeypatch):
    """Under --ray the warm-up lines and a request's warnings were nowhere (the service's logger had no handler,
    Python's default level hid them), though the README says the log shows them at --log-level."""
    seen: list[str] = []
    serve_log, service_log = logging.getLogger("ray.serve"), ray_serve.log
    saved = [(logger, logger.handlers, logger.level, logger.propagate) for logger in (serve_log, service_log)]
    monkeypatch.setattr(ray_serve.serve, "get_replica_context", lambda: SimpleNamespace(replica_tag="r1"))
    try:
        serve_log.handlers = [SimpleNamespace(level=0, handle=lambda record: seen.append(record.getMessage()))]
        serve_log.setLevel(logging.INFO)
        ray_serve._log_through_serve()
        service_log.info("warming up at %dx%d, batch of %d", 64, 64, 2)
        service_log.debug("not at info")
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)  # also clears the loggers' cached levels
    assert seen == ["warming up at 64x64, batch of 2"]


class FakeServe:
    """What ZoneDeployment asks of Ray Serve, recorded (and Ray's shutdown): no cluster is started."""

    def __init__(self) -> None:
        self.started: dict | None = None
        self.options: dict | None = None
        self.ran: dict | None = None
        self.deleted: list[str] = []
        self.ray_shut_down = False
        self.listening: tuple[str, int] | None = None  # the Serve already running on the cluster: its address
        self.applications: dict[str, SimpleNamespace] = {}  # serve.status()'s, as the shutdown finds them
        self.serve_shut_down = False

    def start(self, **options) -> None:
        self.started = options

    def run(self, bound, **options) -> None:
        self.ran = options

    def delete(self, name: str) -> None:
        self.deleted.append(name)

    def status(self) -> SimpleNamespace:
        return SimpleNamespace(applications=self.applications)

    def shutdown(self) -> None:
        if self.applications:
            raise AssertionError("serve.shutdown deletes every application of the cluster, not only zone")
        self.serve_shut_down = True


@pytest.fixture
def fake_serve(monkeypatch) -> FakeServe:
    fake = FakeServe()
    monkeypatch.setattr(ray_serve, "serve", fake)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    monkeypatch.setattr("ray.shutdown", lambda: setattr(fake, "ray_shut_down", True))
    monkeypatch.setattr(ray_serve, "_serve_listening", lambda: fake.listening)

    def options(**chosen):
        fake.options = chosen
        return SimpleNamespace(bind=lambda *args: args)
    monkeypatch.setattr(ray_serve.ZoneReplica, "options", options)
    return fake


def test_deploy_bounds_the_queue_and_lets_edits_finish_as_the_settings_say(fake_serve, monkeypatch):
    """--queue-size is Serve's queue (503 beyond it), a replica holds two batches under way, and a redeploy
    waits out --timeout-s; Serve listens where --host says (not every interface), logs at --log-level."""
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    settings = ServeSettings(max_batch=4, queue_size=40, timeout_s=30)
    # Serve's 503 beyond the queue says Retry-After, where this Ray can say it
    queue_full_answer = {} if ray_serve.BackpressureConfig is None else {
        "backpressure_config": ray_serve.BackpressureConfig(retry_after_s=5)}
    application = ZoneDeployment()
    application.deploy(PipelineSpec(tiny=True, device="cpu"), settings, host="127.0.0.1", port=8123, replicas=3,
                       log_level="info")
    assert fake_serve.started == {"http_options": {"host": "127.0.0.1", "port": 8123}}
    assert fake_serve.options == {"num_replicas": 3, "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
                                  "max_ongoing_requests": 8, "max_queued_requests": 40,
                                  "graceful_shutdown_timeout_s": 31, **queue_full_answer}
    assert fake_serve.ran["route_prefix"] == "/" and fake_serve.ran["logging_config"]["log_level"] == "INFO"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"  # no usage report sent from a server by default
    application.shutdown()
    assert fake_serve.deleted == [fake_serve.ran["name"]] == ["zone"] and fake_serve.ray_shut_down
    assert fake_serve.serve_shut_down  # the Serve it started, with no application left


@pytest.mark.parametrize("others", [False, True], ids=["alone", "other-applications"])
def test_a_serve_already_running_stays_and_one_this_process_started_goes(fake_serve, others):
    """On a cluster joined (`ray start`, RAY_ADDRESS), the Serve `zone serve --ray` started outlived it, its proxy
    holding the port: the next `zone serve --ray --port P` printed P but served on the old port (Serve only
    warned). Now Serve goes with the zone application unless others use it; one already running stays, and one
    listening elsewhere is refused before anything is deployed."""
    application = ZoneDeployment()
    application.deploy(PipelineSpec(tiny=True, device="cpu"), ServeSettings(), host="127.0.0.1", port=8123, replicas=1)
    fake_serve.applications = {"ops": SimpleNamespace()} if others else {}
    application.shutdown()
    assert fake_serve.serve_shut_down is not others

    fake_serve.serve_shut_down, fake_serve.started, fake_serve.deleted = False, None, []
    fake_serve.listening = ("127.0.0.1", 8123)  # already running where asked: used, and left running
    application = ZoneDeployment()
    application.deploy(PipelineSpec(tiny=True, device="cpu"), ServeSettings(), host="127.0.0.1", port=8123, replicas=1)
    application.shutdown()
    assert fake_serve.deleted == ["zone"] and not fake_serve.serve_shut_down

    fake_serve.started, fake_serve.deleted, fake_serve.listening = None, [], ("127.0.0.1", 8000)
    application = ZoneDeployment()
    with pytest.raises(ConfigError, match="already runs on this Ray cluster, listening on 127.0.0.1:8000, and "
                                          "cannot move to 127.0.0.1:8123"):
        application.deploy(PipelineSpec(tiny=True, device="cpu"), ServeSettings(), host="127.0.0.1", port=8123,
                           replicas=1)
    application.shutdown()
    assert fake_serve.started is None and fake_serve.deleted == [] and not fake_serve.serve_shut_down


def test_a_replica_that_fails_to_load_is_said_as_its_own_error(fake_serve):
    """A corrupt checkpoint under --ray: each replica's traceback in the log, then Serve's RuntimeError ("Deploying
    application zone failed: Failed to update the deployments ['ZoneReplica'].") as a traceback, exit 1. Now the
    replicas' own error, which `zone` says in one `error:` line, exit 2."""
    said = ("The deployment failed to start 3 times in a row. Error:\nTraceback (most recent call last):\n"
            '  File "models.py", line 380, in load_sam\n'
            "zone_engine.errors.CheckpointError: cannot read the SAM checkpoint sam.pth: not a PyTorch checkpoint\n")

    def failed(bound, **options) -> None:
        fake_serve.applications = {"zone": SimpleNamespace(deployments={"ZoneReplica": SimpleNamespace(message=said)})}
        raise RuntimeError("Deploying application zone failed: Failed to update the deployments ['ZoneReplica'].")

    fake_serve.run = failed
    application = ZoneDeployment()
    with pytest.raises(ZoneError, match="^cannot read the SAM checkpoint sam.pth: not a PyTorch checkpoint$"):
        application.deploy(PipelineSpec(device="cpu"), ServeSettings(), host="127.0.0.1", port=8123, replicas=1)


def test_each_replica_checks_its_own_open_file_limit(monkeypatch, caplog, tiny_pipe):
    """`zone serve` checks its open-file limit against its queue at start (raised to the hard one, else a warning
    naming the `ulimit -n` to set); a replica did not: under `ulimit -n 300` and --queue-size 500 only Ray's own
    warning (below 4096, whatever the queue) was said. Now each replica, as the single process."""
    set_to = open_file_limits(monkeypatch, 64, 100_000)
    ZoneReplica.func_or_class.__wrapped__(SimpleNamespace(build=lambda: tiny_pipe), ServeSettings(warmup=False))
    assert set_to == [(100_000, 100_000)]
    set_to = open_file_limits(monkeypatch, 64, 100)  # the hard one too low: said, with the ulimit to set
    with caplog.at_level(logging.WARNING, logger=ray_serve.log.name):
        ZoneReplica.func_or_class.__wrapped__(SimpleNamespace(build=lambda: tiny_pipe), ServeSettings(warmup=False))
    assert set_to == [] and "the open-file limit is 64 (hard limit 100)" in caplog.text


@pytest.mark.parametrize(("device", "replicas", "words"), [
    ("cpu", 0, "--replicas must be at least 1, got 0"), ("cuda", 2, "--replicas 2 needs 2 GPUs"),
])
def test_replicas_that_cannot_run_are_refused_before_serve_starts(fake_serve, device, replicas, words):
    """...and the shutdown after deletes no application: on a cluster joined through RAY_ADDRESS, serve.shutdown
    deleted every application there, a zone one another process serves too."""
    application = ZoneDeployment()
    with pytest.raises(ConfigError, match=words):
        application.deploy(PipelineSpec(device=device), ServeSettings(), host="127.0.0.1", port=8123,
                           replicas=replicas)
    application.shutdown()
    assert fake_serve.started is None and fake_serve.deleted == [] and fake_serve.ray_shut_down


def test_a_usage_mistake_said_before_ray_starts_starts_no_ray(fake_serve, monkeypatch):
    """`zone serve --ray --replicas 0`: serve.shutdown, on the way out, started a local Ray (41 s here) to find
    nothing to shut down, before the error was said."""
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    application = ZoneDeployment()
    with pytest.raises(ConfigError, match="--replicas must be at least 1"):
        application.deploy(PipelineSpec(device="cpu"), ServeSettings(), host="127.0.0.1", port=8123, replicas=0)
    application.shutdown()
    assert fake_serve.deleted == [] and not fake_serve.ray_shut_down


@pytest.mark.parametrize("starts", [True, False], ids=["ray-starts", "ray-fails-to-start"])
def test_rays_processes_start_with_sigterm_blocked_and_the_callers_handler_is_kept(starts):
    """A SIGTERM to the process group (`timeout`, systemd) killed the GCS and raylet under `zone serve --ray`,
    whose shutdown then hung 60 s and exited 1; they start as Ray starts them for SIGINT: with it blocked. A
    ray.init that raises leaves neither SIGTERM blocked nor the caller's handler lost."""
    seen = []

    def init(**kwargs):
        seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        if not starts:
            raise ConnectionError("could not start Ray")

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        with contextlib.nullcontext() if starts else pytest.raises(ConnectionError):
            ray_serve._init_keeping_sigterm(SimpleNamespace(init=init))
        assert signal.SIGTERM in seen[0] and signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def test_an_interrupted_deploy_still_shuts_down_and_a_second_sigterm_cannot_cut_it_short(monkeypatch):
    """Ctrl-C or SIGTERM while deploying: Serve and Ray are shut down, with SIGTERM ignored meanwhile."""
    def interrupted(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    during_shutdown = []
    monkeypatch.setattr(ZoneDeployment, "deploy", interrupted)
    monkeypatch.setattr(ZoneDeployment, "shutdown",
                        lambda self: during_shutdown.append(signal.getsignal(signal.SIGTERM)))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_ray(PipelineSpec(tiny=True, device="cpu"), ServeSettings(), host="127.0.0.1", port=8123, replicas=1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert during_shutdown == [signal.SIG_IGN]
