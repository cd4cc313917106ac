"""`zone serve --ray`: a 2-replica Ray Serve deployment on the CPU answers the same HTTP contract."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from conftest import smooth_image
from test_serving import decode_png, post_concurrently, post_edit

from zone_engine.errors import ConfigError
from zone_engine.serving import PipelineSpec, ServeSettings
from zone_engine.serving.ray_serve import deploy, replica_resources, shutdown


def test_sigterm_stops_zone_serve_ray_as_the_help_says_also_while_it_deploys(tmp_path):
    """ray.init sets Ray's own SIGTERM handler: a SIGTERM while deploying (an orchestrator giving up on a slow
    start) ended the process with a stack dump (status 15, or aborted), as no command's exit the help lists. Now:
    `terminated`, exit 143, after Serve and Ray are shut down, whenever it comes. (Before the module's cluster
    starts: its own.)"""
    port, log = free_port(), tmp_path / "serve.log"
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # a cluster of its own
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_base():
    import ray

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        deploy(PipelineSpec(tiny=True, device="cpu"), ServeSettings(max_batch=4, max_wait_ms=200, warmup=False,
                                                                    edit_changes=(("steps", 3),)),
               host="127.0.0.1", port=port, replicas=2)
        yield f"http://127.0.0.1:{port}"
    finally:
        shutdown()


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
    with pytest.raises(ConfigError, match="needs 5 GPUs"):
        replica_resources(gpu, 5, {"CPU": 64.0, "GPU": 4.0})
