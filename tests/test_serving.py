"""The HTTP edit service (issue: serving), over real loopback HTTP against tiny models on the CPU."""

from __future__ import annotations

import pytest

from zone_engine.cli import SERVE_MODULES

for _module in (*SERVE_MODULES, "httpx"):
    pytest.importorskip(_module, reason="the service needs the serve extra: pip install -e '.[serve]'")

import asyncio
import base64
import contextlib
import importlib
import io
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import torch
import uvicorn
from conftest import damaged_image_files, rgb_profile, smooth_image
from PIL import Image

import zone_engine
from zone_benchmarks.load_test import parse_metrics
from zone_engine import ZonePipeline
from zone_engine.config import MAX_BATCH, MAX_PIXELS, MAX_STEPS, EditConfig, SamConfig
from zone_engine.errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    EditCancelled,
    InputImageError,
    InstructionError,
    OutOfDeviceMemory,
    ZoneError,
)
from zone_engine.pipeline import STAGES, EditRequest
from zone_engine.serving import LocalEditService, ServeSettings, create_app
from zone_engine.serving.app import (
    EXPOSED_HEADERS,
    FORM_FIELDS,
    HTTP_PARSER,
    MAX_JPEG_SCANS,
    WORKER_STOPPED,
    EditService,
    EditTimedOut,
    ServeError,
    ZoneServer,
    as_serve_error,
    check_form_fields,
    check_open_file_limit,
    check_request_fields,
    decode_upload,
    form_charset,
    models_memory_line,
    open_files_needed,
    outcome_of,
    run_server,
)
from zone_engine.serving.batcher import DynamicBatcher, QueueFull, ShuttingDown
from zone_engine.serving.metrics import ServeMetrics

STEPS = 3


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return ZonePipeline(tiny_models, device="cpu", denoiser="fused",
                        default_config=EditConfig(steps=STEPS, sam=SamConfig.for_random_weights()))


def wait_until(condition: Callable[[], object], timeout_s: float, message: str = "", poll_s: float = 0.02) -> None:
    """Poll `condition` until it is true; fail with `message` once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(poll_s)


@contextmanager
def serving_service(service: LocalEditService):
    """A real uvicorn server for `service` on a free loopback port, in a thread; yields (URL, server)
    once it accepts connections (the models may still be loading)."""
    config = uvicorn.Config(create_app(service), log_level="warning", timeout_graceful_shutdown=30, http=HTTP_PARSER)
    server = ZoneServer(config, service)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@contextmanager
def serving(pipeline, **settings):
    """`pipeline` served with these settings (no warm-up), once ready; yields (base URL, service)."""
    service = LocalEditService(lambda: pipeline, ServeSettings(**{"warmup": False, **settings}))
    with serving_service(service) as (base, _):
        wait_until(lambda: service.ready, 60, "the service did not become ready")
        yield base, service


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def post_edit(base: str, image: np.ndarray | bytes, instruction: str = "add a red hat", timeout: float = 120,
              headers: dict[str, str] | None = None, **fields) -> httpx.Response:
    data = image if isinstance(image, bytes) else png(image)
    form = {"instruction": instruction, **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{base}/v1/edit", files={"image": ("in.png", data, "image/png")}, data=form, timeout=timeout,
                      headers=headers)


def raw_answer(base: str, request: bytes) -> str:
    """The server's first bytes in answer to `request`, sent as is over a new connection (what httpx refuses to
    send: a Content-Length its body does not have, a body that stalls)."""
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=20) as client:
        client.sendall(request)
        answer = b""
        while True:  # until the head and its Content-Length of body are in (they may come in separate reads)
            chunk = client.recv(65536)
            answer += chunk
            head, blank_line, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if not chunk or (blank_line and len(body) >= (int(length[1]) if length else 0)):
                return answer.decode()


def answer_before_the_body(base: str, header: bytes = b"") -> tuple[str, str]:
    """Head and body of the answer to an edit whose upload never comes (`header` added): what the server says
    before reading it (waiting for the body would time out)."""
    request = (b"POST /v1/edit HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header
               + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n")
    head, _, body = raw_answer(base, request).partition("\r\n\r\n")
    return head, body


def post_chunked(base: str, data: bytes, instruction: str = "add a red hat") -> httpx.Response:
    """A multipart upload sent chunked: no Content-Length header."""
    head = (b'--b\r\nContent-Disposition: form-data; name="instruction"\r\n\r\n' + instruction.encode()
            + b'\r\n--b\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")

    def chunks():
        yield head
        for start in range(0, len(data), 4096):
            yield data[start:start + 4096]
        yield b"\r\n--b--\r\n"

    return httpx.post(f"{base}/v1/edit", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"},
                      timeout=60)


async def post_concurrently(base: str, jobs: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(job: dict) -> httpx.Response:
            form = {"instruction": job["instruction"], "seed": str(job["seed"]), "return": job.get("return", "png")}
            return await client.post(f"{base}/v1/edit", data=form,
                                     files={"image": ("in.png", png(job["image"]), "image/png")})

        return await asyncio.gather(*(one(job) for job in jobs))


def metric(text: str, name: str) -> float:
    """The value of one sample (`name` with its labels) of a Prometheus exposition."""
    samples = parse_metrics(text)
    assert name in samples, f"{name} not in /metrics"
    return samples[name]


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


class FailingPipeline:
    """Every edit fails with `error`, as `edit_batch(return_exceptions=True)` reports a failure."""

    def __init__(self, pipeline: ZonePipeline, error: Exception) -> None:
        self.default_config, self.error = pipeline.default_config, error

    def edit_batch(self, requests, **kwargs):
        return [self.error for _ in requests]


class GatedPipeline:
    """The real pipeline behind a gate: batches wait until `release` is set (to fill queues, force
    timeouts, inject faults); it records what it was asked."""

    def __init__(self, pipeline: ZonePipeline, fail_on: str | None = None) -> None:
        self.pipeline, self.fail_on = pipeline, fail_on
        self.release, self.entered = threading.Event(), threading.Event()
        self.seen: list[EditRequest] = []
        self.batch_sizes: list[int] = []  # one per edit_batch call
        self.outcomes: list = []
        self.default_config = pipeline.default_config

    def edit_batch(self, requests, **kwargs):
        self.seen += requests
        self.batch_sizes.append(len(requests))
        self.entered.set()
        assert self.release.wait(60)
        outcomes = self.pipeline.edit_batch(requests, **kwargs)
        outcomes = [RuntimeError("injected fault") if r.instruction == self.fail_on else o
                    for r, o in zip(requests, outcomes, strict=True)]
        self.outcomes += outcomes
        return outcomes


# ---------------------------------------------------------------------------------------- contract


def test_edit_returns_a_png_of_the_input_size_and_json_has_every_field(pipe):
    image = smooth_image(70, 90, seed=1)
    with serving(pipe) as (base, _):
        response = post_edit(base, image, seed=7)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        edited = decode_png(response.content)
        assert edited.shape == image.shape
        assert np.array_equal(edited, pipe.edit(image, "add a red hat", pipe.default_config.replace(seed=7)).image)

        body = post_edit(base, image, seed=7, **{"return": "json"}).json()
        assert set(body) >= {"request_id", "action", "width", "height", "image", "mask_b", "mask_f", "region",
                             "used_fallback", "instruction_truncated", "timings", "warnings"}
        assert (body["width"], body["height"], body["action"]) == (90, 70, "add")
        assert np.array_equal(decode_png(base64.b64decode(body["image"])), edited)
        expected = pipe.edit(image, "add a red hat", pipe.default_config.replace(seed=7))
        for name in ("mask_b", "mask_f", "region"):  # 0 and 255, as a viewer shows a mask (0/1 looked all black)
            assert np.array_equal(decode_png(base64.b64decode(body[name])), getattr(expected, name) * np.uint8(255))
        assert response.headers["X-Zone-Replica"]  # which replica answered: the log line to look for
        assert body["timings"]["denoise"] > 0 and body["timings"]["total"] >= body["timings"]["denoise"]

        traced = httpx.post(f"{base}/v1/edit", files={"image": ("in.png", png(image), "image/png")},
                            data={"instruction": "add a hat", "return": "json"}, headers={"X-Request-Id": "abc-123"},
                            timeout=120)
        assert traced.headers["X-Request-Id"] == traced.json()["request_id"] == "abc-123"
        forced = post_edit(base, image, action="remove", steps=2, **{"return": "json"})
        assert forced.json()["action"] == "remove" and forced.headers["X-Zone-Action"] == "remove"
        assert forced.json()["warnings"] == [] and "X-Zone-Warnings" not in forced.headers


def test_the_answer_says_the_seed_and_steps_its_edit_used_so_it_can_be_asked_for_again(pipe):
    """A request without a seed got the server's (`--seed`), which no answer said: a caller could not get that
    edit again from another server, or after the server's default changed."""
    image = smooth_image(48, 64, seed=2)
    with serving(pipe, edit_changes=(("seed", 5),)) as (base, _):
        unseeded = post_edit(base, image)
        assert (unseeded.headers["X-Zone-Seed"], unseeded.headers["X-Zone-Steps"]) == ("5", str(STEPS))
        # A page of an --allow-origin may read them too: CORS hides every header it does not expose
        assert {name for name in unseeded.headers if name.startswith("x-")} <= {
            name.lower() for name in EXPOSED_HEADERS}
        body = post_edit(base, image, seed=9, steps=2, **{"return": "json"})
        assert (body.json()["seed"], body.json()["steps"]) == (9, 2) and body.headers["X-Zone-Seed"] == "9"
    with serving(pipe) as (base, _):  # another server's default: the seed said back gives the same edit
        again = post_edit(base, image, seed=unseeded.headers["X-Zone-Seed"])
        assert again.headers["X-Zone-Seed"] == "5" and again.content == unseeded.content


def test_what_an_edit_did_not_take_as_given_goes_back_with_its_request(pipe):
    """Transparency dropped (found while decoding the upload) and a coarse region (found by the pipeline): in
    the JSON body and the PNG's header, not only as unattributed warnings in the server's log. A note quoting the
    file's own bytes (its profile's colour space) too: a CR there had broken the finished edit's answer."""
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([smooth_image(16, 200), np.full((16, 200), 128, np.uint8)])).save(
        buffer, format="PNG", icc_profile=P3_PROFILE[:16] + b"a\r\nb" + P3_PROFILE[20:])
    with serving(pipe) as (base, _):
        body = post_edit(base, buffer.getvalue(), steps=1, **{"return": "json"}).json()
        assert len(body["warnings"]) == 3
        assert body["warnings"][0].startswith("the uploaded image has an unknown colour profile")
        assert body["warnings"][1].startswith("the uploaded image has transparency")
        assert "32-pixel cell" in body["warnings"][2]
        header = post_edit(base, buffer.getvalue(), steps=1).headers["X-Zone-Warnings"]
        assert header == " | ".join(body["warnings"])


P3_PROFILE = rgb_profile()  # standing for a display's profile: any that loads is carried


def test_the_uploads_colour_profile_comes_back_with_the_edited_image(pipe):
    """The engine edits pixel values as they are: the untouched ones look as before only in the input's profile."""
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(64, 64)).save(buffer, format="PNG", icc_profile=P3_PROFILE)
    with serving(pipe) as (base, _):
        edited = post_edit(base, buffer.getvalue(), steps=1)
        assert Image.open(io.BytesIO(edited.content)).info["icc_profile"] == P3_PROFILE
        body = post_edit(base, buffer.getvalue(), steps=1, **{"return": "json"}).json()
        assert Image.open(io.BytesIO(base64.b64decode(body["image"]))).info["icc_profile"] == P3_PROFILE
        assert "icc_profile" not in Image.open(io.BytesIO(base64.b64decode(body["mask_f"]))).info
        plain = post_edit(base, smooth_image(64, 64), steps=1)
        assert "icc_profile" not in Image.open(io.BytesIO(plain.content)).info


def test_health_readiness_metrics_and_openapi(pipe):
    with serving(pipe) as (base, _):
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert httpx.head(f"{base}/healthz").status_code == httpx.head(f"{base}/readyz").status_code == 200
        assert httpx.head(f"{base}/metrics").status_code == 200
        assert post_edit(base, smooth_image(64, 64)).status_code == 200
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, 'zone_requests_total{outcome="ok"}') == 1
        assert metric(text, "zone_batch_size_count") == 1
        assert metric(text, 'zone_stage_seconds_count{stage="refine"}') == 1
        assert metric(text, "zone_queue_depth") == metric(text, "zone_running") == 0
        assert metric(text, "zone_request_seconds_count") == metric(text, "zone_queue_wait_seconds_count") == 1
        schema = httpx.get(f"{base}/openapi.json").json()
        assert {"/v1/edit", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
        assert schema["info"]["version"] == zone_engine.__version__  # the one version, which pyproject reads too
        form = schema["components"]["schemas"][
            schema["paths"]["/v1/edit"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
            .rsplit("/", 1)[-1]]
        assert set(form["properties"]) == set(FORM_FIELDS)  # the fields an unknown one is told apart from
        assert {"413", "503", "504"} <= set(schema["paths"]["/v1/edit"]["post"]["responses"])


def edit_operation(schema: dict) -> tuple[dict, dict]:
    """POST /v1/edit in an OpenAPI document: its operation and its form's schema (what a generated client reads)."""
    operation = schema["paths"]["/v1/edit"]["post"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    return operation, schema["components"]["schemas"][form]


def field_schema(field: dict) -> dict:
    """An optional field's values' schema (`anyOf` it or null), a required one's as it is."""
    return next((choice for choice in field.get("anyOf", ()) if choice.get("type") != "null"), field)


JSON_TYPES = {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict}


def test_a_request_built_from_the_openapi_document_alone_gets_the_answer_it_documents(pipe):
    """A client generated from /openapi.json: its form's values taken from the schema's enums and bounds, and the
    answer read by it (the headers a 200 and an error carry, the JSON's fields and types). The headers, the form's
    values and bounds, and a 503's codes were in the README only."""
    rgba = np.dstack([smooth_image(64, 64), np.linspace(0, 255, 64 * 64).astype(np.uint8).reshape(64, 64)])
    with serving(pipe) as (base, _):
        schema = httpx.get(f"{base}/openapi.json").json()
        operation, form = edit_operation(schema)
        fields = {name: field_schema(field) for name, field in form["properties"].items()}
        assert fields["action"]["enum"] == ["auto", "change", "add", "remove"]
        assert fields["seed"]["minimum"] == 0 and fields["seed"]["maximum"] == 2**32 - 1
        values = {"action": fields["action"]["enum"][0], "steps": int(fields["steps"]["minimum"]),
                  "seed": int(fields["seed"]["maximum"]), "return": "json"}
        answer = post_edit(base, rgba, **values)  # transparency dropped: a warning
        assert answer.status_code == 200, answer.text
        documented = operation["responses"]["200"]
        headers = documented["headers"]
        assert set(headers) == set(EXPOSED_HEADERS) - {"Retry-After"}  # what a browser page may read, all said
        for name, header in headers.items():
            said, bounds = answer.headers[name], header["schema"]
            if bounds["type"] == "integer":
                assert bounds["minimum"] <= int(said) <= bounds.get("maximum", MAX_STEPS), name
            assert said in bounds.get("enum", [said]), name
        body = answer.json()
        model = schema["components"]["schemas"][
            documented["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]]
        assert set(body) == set(model["properties"]) == set(model["required"])
        for name, value in body.items():
            assert isinstance(value, JSON_TYPES[model["properties"][name]["type"]]), name
        assert (body["seed"], body["steps"]) == (values["seed"], values["steps"])
        assert answer.headers["X-Zone-Warnings"].split(" | ") == body["warnings"] and body["warnings"]
        refused = post_edit(base, rgba, steps=int(fields["steps"]["minimum"]) - 1)
        assert refused.status_code == 422
        assert all(name in refused.headers for name in operation["responses"]["422"]["headers"])


def test_the_openapi_document_names_each_error_code_under_its_status():
    """A client told by the schema which `error.code` values each status may carry, and when Retry-After comes:
    the 503's description said "queue full or shutting down", not out_of_memory or cancelled; the 500's and 400's
    named none of their codes."""
    service = types.SimpleNamespace(settings=ServeSettings())  # what a timeout's message reads
    answered = {(as_serve_error(error, service).status, as_serve_error(error, service).code) for error in (
        QueueFull(7), ShuttingDown("stopping"), EditTimedOut(), EditCancelled("stopped"), InputImageError("corrupt"),
        OutOfDeviceMemory("out of GPU memory"), InstructionError("empty"), DeviceError("no CUDA"),
        ZoneError("refused"), RuntimeError("a bug"))}
    answered |= {(403, "origin_not_allowed"), (413, "upload_too_large"), (413, "image_too_large"),
                 (415, "unsupported_media_type"), (421, "host_not_allowed")}  # said before the endpoint runs
    with local_client() as client:
        responses = edit_operation(client.get("/openapi.json").json())[0]["responses"]
    for status, code in answered:
        assert re.search(rf"\b{code}\b", responses[str(status)]["description"]), (status, code)
    for status, response in responses.items():
        assert "X-Request-Id" in response["headers"], status
        assert ("Retry-After" in response["headers"]) == (status == "503"), status


def test_not_ready_until_loaded_and_warmed_up(pipe):
    gate = threading.Event()

    def slow_load():
        assert gate.wait(60)
        return pipe

    service = LocalEditService(slow_load, ServeSettings(warmup=True))
    with serving_service(service) as (base, _):
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 503
        refused = post_edit(base, smooth_image(64, 64))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        assert refused.headers["Retry-After"] == "5"  # loading ends: worth coming back
        assert httpx.get(f"{base}/v1/edit").status_code == 405  # no edit: a wrong method whatever the state
        assert httpx.delete(f"{base}/v1/edit").status_code == 405
        counted = parse_metrics(httpx.get(f"{base}/metrics").text)  # not counted as edits: only the 503 is
        assert {name: value for name, value in counted.items() if name.startswith("zone_requests_total") and value} == {
            'zone_requests_total{outcome="unavailable"}': 1}
        gate.set()
        wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 60, poll_s=0.05)
        assert post_edit(base, smooth_image(64, 64)).status_code == 200


def test_readiness_says_warming_up_once_the_models_are_loaded(pipe):
    """During the warm-up /readyz and a refused edit said "the models are still loading"."""
    warming, release = threading.Event(), threading.Event()

    class HeldWarmUp:
        default_config = pipe.default_config

        def edit_batch(self, requests, **kwargs):
            warming.set()
            assert release.wait(60)
            return pipe.edit_batch(requests, **kwargs)

    with serving_service(LocalEditService(HeldWarmUp, ServeSettings(warmup=True))) as (base, _):
        try:
            assert warming.wait(60)
            readiness, refused = httpx.get(f"{base}/readyz"), post_edit(base, smooth_image(64, 64))
        finally:
            release.set()
    said = "the models are loaded and warming up (1 of 1: a batch of 1 at 128x128); retry shortly"
    assert readiness.status_code == refused.status_code == 503
    assert readiness.json()["error"]["message"] == refused.json()["error"]["message"] == said


def test_warmup_sizes_run_every_padded_batch_size_at_the_servers_steps_before_ready(pipe):
    """So the first requests of a warmed size pay no CUDA-graph capture or compilation."""
    warmed = []

    class Recording:
        default_config = pipe.default_config

        def edit_batch(self, requests, **kwargs):
            warmed.append((requests[0].image.shape[:2], len(requests), requests[0].config.steps))
            return pipe.edit_batch(requests, **kwargs)

    settings = dict(warmup=True, warmup_sizes=((64, 96),), max_batch=3, edit_changes=(("steps", 2),))
    with serving_service(LocalEditService(Recording, ServeSettings(**settings))) as (base, _):
        wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 120, poll_s=0.05)
        assert warmed == [((128, 128), 1, 2), ((64, 96), 1, 2), ((64, 96), 2, 2), ((64, 96), 4, 2)]
    with pytest.raises(ConfigError, match=r"warm-up size 4x4 \(--warmup-size, warmup_sizes\)"):
        ServeSettings(warmup_sizes=((4, 4),))


def test_the_models_weights_and_the_gpus_free_memory_are_logged_as_they_load(pipe, monkeypatch, caplog):
    """A small or shared GPU's operator sees at start what room the precision and SAM leave (the server picks
    neither by the card)."""
    caplog.set_level(logging.INFO, logger="zone_engine.serving")
    LocalEditService(lambda: pipe, ServeSettings(warmup=False)).load()
    weights = pipe.models.weight_bytes() / 2**30
    assert weights > 0
    said = f"models loaded on cpu (diffusion models in float32, SAM in float32): {weights:.2f} GiB of weights"
    assert said in caplog.messages
    on_a_gpu = types.SimpleNamespace(device=torch.device("cuda:0"), dtype=torch.float16,
                                     models=types.SimpleNamespace(sam=None, weight_bytes=lambda: 6 * 2**30))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (12 * 2**30, 22 * 2**30))
    assert models_memory_line(on_a_gpu) == ("models loaded on cuda:0 (diffusion models in float16): 6.00 GiB of "
                                            "weights; 12.0 GiB of the GPU's 22.0 GiB free")


def test_a_batch_that_could_never_fill_is_refused_by_the_local_service_only(pipe):
    settings = ServeSettings(max_batch=8, queue_size=4)  # valid under Ray Serve, whose queue counts differently
    with pytest.raises(ConfigError, match=r"--max-batch 8 \(max_batch=8\) is above --queue-size 4 \(queue_size=4\)"):
        LocalEditService(lambda: pipe, settings)
    ServeSettings(max_batch=4, queue_size=4).check_local_batching()  # one that fills the queue exactly can fill


def test_every_count_setting_is_at_least_one():
    for name in ("max_batch", "queue_size", "max_instruction_chars", "max_steps", "image_threads"):
        with pytest.raises(ConfigError, match=rf"--{name.replace('_', '-')} 0 \({name}=0\) must be at least 1"):
            ServeSettings(**{name: 0})
    # --max-pixels 10 served, warmed up at 128x128 past its own limit, then answered every image 413.
    with pytest.raises(ConfigError, match=r"--max-pixels 63 \(max_pixels=63\) is under 64 \(8x8, the smallest"):
        ServeSettings(max_pixels=63)
    ServeSettings(max_pixels=64, warmup_sizes=((8, 8),))


def test_every_serve_limit_itself_is_accepted():
    """From a mutation audit: each "at most" and "under" check could move by one unseen (--max-steps 999 refused
    as over 999, a 1 KiB upload limit as under 1 KiB, a wait a breath short of the timeout as too long)."""
    settings = ServeSettings(max_steps=MAX_STEPS, max_pixels=MAX_PIXELS, max_batch=MAX_BATCH, queue_size=MAX_BATCH,
                             edit_changes=(("steps", MAX_STEPS),), max_upload_mb=1 / 1024, timeout_s=5,
                             max_wait_ms=4999.5)
    settings.check_default_steps(MAX_STEPS)  # a default of --max-steps itself is one a request may ask for
    settings.check_local_batching()
    assert settings.max_upload_bytes == 1024


def test_stopping_ends_the_warm_up_at_its_running_batchs_next_step(pipe, monkeypatch):
    """SIGTERM during a long warm-up (a large --max-batch: every padded size): the server stops within a step,
    not after every batch (24 s on the CPU for batches up to 16 at 128x128; minutes for larger ones)."""
    batches, steps = [], []
    denoise = pipe.denoise

    def stopped_at_the_first_step(edits, *, progress=False, stop=None):
        def step_done() -> bool:
            steps.append(len(steps) + 1)
            if len(steps) == 1:
                asyncio.run(service.stop())  # what SIGTERM does, in the middle of this batch's denoising
            return stop()
        return denoise(edits, progress=progress, stop=step_done)

    class Recording:
        default_config = pipe.default_config

        def edit_batch(self, requests, **kwargs):
            batches.append(len(requests))
            return pipe.edit_batch(requests, **kwargs)

    monkeypatch.setattr(pipe, "denoise", stopped_at_the_first_step)
    settings = ServeSettings(warmup=True, warmup_sizes=((64, 64),), max_batch=8, edit_changes=(("steps", 5),))
    service = LocalEditService(Recording, settings)
    service.load()
    # Step 1 of the first batch's 2 was the last: not its step 2, nor the 4 batches of 64x64 (5 steps each) after it.
    assert batches == [1] and steps == [1] and service.stopping


def _one_running_one_queued(pool, base, service, gated, image):
    """Two edits in flight: the first running (held at the gate), the second queued behind it."""
    while not service.ready:
        time.sleep(0.02)
    running = pool.submit(post_edit, base, image)
    assert gated.entered.wait(30)
    queued = pool.submit(post_edit, base, image, seed=2)
    while service.batcher.queued < 1:
        time.sleep(0.01)
    return running, queued


def test_shutdown_finishes_the_running_batch_answers_the_queue_503_at_once_and_takes_no_new_edits(pipe):
    """uvicorn alone would keep running the queue (each edit up to its timeout: minutes, past an orchestrator's
    grace period); the queued edit is answered while the running one is still held at the gate."""
    gated = GatedPipeline(pipe)
    image = smooth_image(64, 64, seed=8)
    service = LocalEditService(lambda: gated, ServeSettings(warmup=False, max_batch=1, max_wait_ms=0))
    with ThreadPoolExecutor(2) as pool, serving_service(service) as (base, server):
        running, queued = _one_running_one_queued(pool, base, service, gated, image)
        server.should_exit = True  # what SIGTERM does
        answer = queued.result(timeout=30)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "unavailable"
        assert "not started" in answer.json()["error"]["message"] and answer.headers["Retry-After"]
        assert not running.done()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz")
        gated.release.set()
        assert running.result().status_code == 200
    assert len(gated.seen) == 1  # the queued edit never ran


def held_load(pipe: ZonePipeline):
    """A service's build that returns `pipe` once `release` is set; `loading` says it has begun."""
    loading, release = threading.Event(), threading.Event()

    def slow_build() -> ZonePipeline:
        loading.set()
        assert release.wait(30)
        return pipe

    return slow_build, loading, release


def test_a_server_stopped_while_loading_waits_for_the_load_then_closes_its_service(pipe):
    """The app's lifespan: the load under way ends (the model thread cannot be stopped mid-load), the service is
    never ready, and its batching worker and model thread are shut down."""
    slow_build, loading, release = held_load(pipe)
    service = LocalEditService(slow_build, ServeSettings(warmup=False))
    with serving_service(service) as (_, server):
        assert loading.wait(30)
        server.should_exit = True
        threading.Timer(0.3, release.set).start()
    assert release.is_set() and not service.ready and not service.batcher.healthy
    with pytest.raises(RuntimeError, match="after shutdown"):
        asyncio.run(service.batcher.run_in_model_thread(lambda: None))


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
def test_a_hangup_stops_the_server_as_sigterm_does_unless_it_is_ignored(pipe):
    """SIGHUP (the terminal that started the server closed: an SSH session ended) killed the server at once, its
    queued and running edits cut off with empty replies. Under nohup it is ignored, and stays so."""
    server = ZoneServer(uvicorn.Config(create_app()), LocalEditService(lambda: pipe, ServeSettings(warmup=False)))
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with server.capture_signals():
            assert signal.getsignal(signal.SIGHUP) == server.handle_exit == signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with server.capture_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_forced_quit_answers_the_running_edit_503_in_json_and_cancels_its_work(pipe, caplog):
    """uvicorn alone would answer it a bare 500 and log tracebacks (the app's shutdown cancelled mid-way)."""
    gated = GatedPipeline(pipe)
    image = smooth_image(64, 64, seed=8)
    service = LocalEditService(lambda: gated, ServeSettings(warmup=False, max_batch=1, max_wait_ms=0))
    with ThreadPoolExecutor(2) as pool, serving_service(service) as (base, server):
        # uvicorn's loggers do not propagate, and its Config resets their handlers: attached once it started.
        logging.getLogger("uvicorn.error").addHandler(caplog.handler)
        running, queued = _one_running_one_queued(pool, base, service, gated, image)
        server.should_exit = True
        assert queued.result(timeout=30).status_code == 503
        server.force_exit = True  # what a second Ctrl-C does
        answer = running.result(timeout=30)
        assert answer.status_code == 503 and "stopped before the edit finished" in answer.json()["error"]["message"]
        assert gated.seen[0].cancelled()  # its work stops at the next step
        gated.release.set()
    logging.getLogger("uvicorn.error").removeHandler(caplog.handler)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def open_file_limits(monkeypatch, soft: int, hard: int) -> list[tuple[int, int]]:
    """The process's open-file limits said to be (soft, hard), the real ones untouched: the limits set, in turn."""
    import resource

    set_to = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: set_to.append(limits))
    return set_to


def test_an_open_file_limit_too_low_for_the_queue_is_raised_to_the_hard_one(monkeypatch, caplog):
    """Under `ulimit -n 64` the server dropped connections under load, silently (uvicorn cannot accept them)."""
    caplog.set_level(logging.INFO, logger="zone_engine.serving")
    settings = ServeSettings(queue_size=32, max_batch=4)
    assert open_files_needed(ServeSettings(queue_size=1000, max_batch=4)) >= open_files_needed(settings) + 2 * 968
    set_to = open_file_limits(monkeypatch, 64, 100_000)
    check_open_file_limit(settings)
    assert set_to == [(100_000, 100_000)]
    assert "raised the open-file limit from 64 to 100000" in caplog.text and "ulimit" not in caplog.text
    set_to = open_file_limits(monkeypatch, 100_000, 100_000)  # enough: left as it is
    check_open_file_limit(settings)
    assert set_to == []


def test_an_open_file_limit_too_low_even_at_its_hard_one_is_said_at_start_with_the_ulimit_to_set(pipe, monkeypatch,
                                                                                                  caplog):
    set_to = open_file_limits(monkeypatch, 64, 100)
    service = LocalEditService(lambda: pipe, ServeSettings(warmup=False, queue_size=32))

    async def started_and_closed():
        await service.start()
        await service.close()

    run_batcher(started_and_closed)
    assert service.load_error is None and set_to == []  # started all the same
    said = [record.getMessage() for record in caplog.records if "open-file limit" in record.getMessage()]
    assert len(said) == 1 and "the open-file limit is 64 (hard limit 100)" in said[0], said
    assert int(re.search(r"`ulimit -n (\d+)`", said[0])[1]) > 2 * 32 + 64


def test_an_unlimited_open_file_limit_is_kept_and_an_unlimited_hard_one_is_not_asked_for(monkeypatch):
    """From a mutation audit: neither RLIM_INFINITY case was tested. An unlimited soft limit (RLIM_INFINITY is -1 on
    Linux, below any count) would be lowered to the count needed; an unlimited hard one is not asked for as the soft
    one (macOS refuses that), the count needed is."""
    import resource

    settings = ServeSettings(queue_size=32, max_batch=4)
    set_to = open_file_limits(monkeypatch, resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    check_open_file_limit(settings)
    assert set_to == []
    set_to = open_file_limits(monkeypatch, 64, resource.RLIM_INFINITY)
    check_open_file_limit(settings)
    assert len(set_to) == 1 and set_to[0][1] == resource.RLIM_INFINITY and 2 * 32 < set_to[0][0] < 100_000, set_to


def test_an_open_file_limit_the_system_refuses_to_raise_is_said_and_the_server_starts(monkeypatch, caplog):
    """From a mutation audit: setrlimit refused (macOS's kern.maxfilesperproc below the hard limit) was caught
    untested; uncaught, the server failed to start over a limit it only meant to raise."""
    import resource

    open_file_limits(monkeypatch, 64, 100_000)

    def refused(which, limits):
        raise ValueError("not allowed to raise maximum limit")
    monkeypatch.setattr(resource, "setrlimit", refused)
    check_open_file_limit(ServeSettings(queue_size=32, max_batch=4))
    assert "the open-file limit is 64 (hard limit 100000)" in caplog.text and "`ulimit -n " in caplog.text


@pytest.mark.skipif(not any(os.path.isdir(folder) for folder in ("/proc/self/fd", "/dev/fd")),
                    reason="counts the open files in /proc/self/fd or /dev/fd")
def test_the_open_files_needed_count_those_open_and_two_batches_beside_the_queue(tmp_path):
    """From a mutation audit: the files open at start and the batches' edits (the running one, the one whose answers
    are sent) went uncounted untested."""
    settings = ServeSettings(queue_size=32, max_batch=4)
    assert open_files_needed(ServeSettings(queue_size=32, max_batch=8)) >= open_files_needed(settings) + 2 * 4
    before = open_files_needed(settings)
    with contextlib.ExitStack() as files:
        for number in range(20):
            files.enter_context(open(tmp_path / str(number), "w"))  # noqa: SIM115 -- closed by the ExitStack
        assert open_files_needed(settings) > before


def test_a_service_stopped_while_loading_is_never_ready(pipe):
    """From a mutation audit: a load that ended after the stop could set the service ready (and log it so) while
    it shut down."""
    slow_build, loading, release = held_load(pipe)
    service = LocalEditService(slow_build, ServeSettings(warmup=False))

    async def scenario():
        started = asyncio.ensure_future(service.start())
        await asyncio.get_running_loop().run_in_executor(None, loading.wait)
        await service.stop()
        release.set()
        await started
        ready = service.ready
        await service.close()
        return ready

    assert run_batcher(scenario) is False


def test_why_edits_are_not_taken_says_shutting_down_not_loading(pipe):
    """During a drain, an edit still arriving on an open connection, and /readyz, hear the truth."""
    service = LocalEditService(lambda: pipe, ServeSettings(warmup=False))
    assert "still loading" in service.not_ready_because
    service.ready = True
    assert service.not_ready_because is None
    asyncio.run(service.stop())
    assert "shutting down" in service.not_ready_because and not service.ready
    with local_client() as client:  # its worker not running (never started here, or stopped): still the truth
        client.app.state.service = service
        readiness = client.get("/readyz")
    assert readiness.status_code == 503 and "shutting down" in readiness.json()["error"]["message"]
    service.load_error = "no such checkpoint"
    assert "loading the models failed: no such checkpoint" in service.not_ready_because


LOG_SCRIPT = """
import logging.config
from zone_engine.serving.app import server_log_config
logging.config.dictConfig(server_log_config("info"))
logging.getLogger("zone_engine.serving").info("zone service ready")
logging.getLogger("python_multipart.multipart").warning("Expected boundary character 45")
"""


def test_the_servers_log_shows_the_services_own_lines_at_its_level_and_not_the_multipart_parsers():
    """Without a handler of its own, the service's INFO lines (ready, warming up) were never shown, and the
    parser's complaint about a body the service answers 400 came as a bare line."""
    out = subprocess.run([sys.executable, "-c", LOG_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "INFO:     zone service ready" in out.stderr and "boundary" not in out.stderr


# ---------------------------------------------------------------------------------------- bad requests


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def coloured(config: dict, formatter: str) -> bool:
    """Whether the log line `formatter` of uvicorn's log configuration `config` writes carries ANSI colours."""
    settings = dict(config["formatters"][formatter])
    module, _, name = settings.pop("()").rpartition(".")
    made = getattr(importlib.import_module(module), name)(**settings)
    message, args = ('%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5", "GET", "/healthz", "1.1", 200)) if (
        formatter == "access") else ("zone service ready", None)
    return "\x1b[" in made.format(logging.LogRecord("uvicorn", logging.INFO, __file__, 1, message, args, None))


def test_the_servers_log_is_in_colour_only_on_a_terminal_that_allows_it(monkeypatch):
    """uvicorn coloured stderr's lines when stdout was a terminal: `zone serve 2> serve.log` typed in one wrote escape
    codes into the log (and `> access.log` left the terminal's lines plain); NO_COLOR and TERM=dumb were not read."""
    from zone_engine.serving.app import server_log_config

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    for out, err in ((Terminal(), io.StringIO()), (io.StringIO(), Terminal())):
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        config = server_log_config("info")
        assert (coloured(config, "default"), coloured(config, "access")) == (err.isatty(), out.isatty())
    monkeypatch.setattr(sys, "stdout", Terminal())
    for variable, value, colours in (("NO_COLOR", "1", False), ("NO_COLOR", "", True), ("TERM", "dumb", False)):
        with monkeypatch.context() as inside:
            inside.setenv(variable, value)
            config = server_log_config("info")
            assert (coloured(config, "default"), coloured(config, "access")) == (colours, colours), (variable, value)


def test_bad_requests_get_the_right_4xx_and_a_json_error_and_the_server_keeps_serving(pipe):
    image = smooth_image(64, 64)
    with serving(pipe, max_pixels=100 * 100, max_upload_mb=0.05, max_instruction_chars=200) as (base, _):
        cases = {
            "no image": (httpx.post(f"{base}/v1/edit", data={"instruction": "add a hat"},
                                    files={"other": ("x.txt", b"1", "text/plain")}), 422, "image"),
            "no instruction": (httpx.post(f"{base}/v1/edit", files={"image": ("in.png", png(image), "image/png")}),
                               422, "instruction"),
            "corrupt image": (post_edit(base, b"\x89PNG\r\n\x1a\n not really"), 400, "image"),
            "text as image": (post_edit(base, b"hello"), 400, "image"),
            "empty file": (post_edit(base, b""), 400, "empty"),
            "too many pixels": (post_edit(base, png(smooth_image(101, 100))), 413, "pixels"),
            "upload too large": (post_edit(base, np.random.default_rng(0).bytes(60_000)), 413, "bytes"),
            "blank instruction": (post_edit(base, image, instruction="   "), 422, "empty"),
            "empty instruction": (post_edit(base, image, instruction=""), 422, "empty"),
            "instruction too long": (post_edit(base, image, instruction="add a hat " * 30), 422, "characters"),
            "bad action": (post_edit(base, image, action="paint"), 422, "action"),
            "bad steps": (post_edit(base, image, steps=0), 422, "steps: 0 is outside 1.."),
            "bad seed": (post_edit(base, image, seed=2**32), 422, "seed: 4294967296 is outside 0..4294967295"),
            "bad return": (post_edit(base, image, **{"return": "gif"}), 422, "return"),
            "json body": (httpx.post(f"{base}/v1/edit", json={"instruction": "add a hat"}), 415, "multipart"),
            # No Content-Length to refuse it by: cut off as it arrives, not spooled whole to disk.
            "chunked upload too large": (post_chunked(base, np.random.default_rng(1).bytes(60_000)), 413,
                                         "passed 52,428 bytes before it had all arrived"),
            "unparsable multipart": (httpx.post(f"{base}/v1/edit", content=b"--x\r\nno headers\r\n",
                                                headers={"content-type": "multipart/form-data; boundary=x"}),
                                     400, "multipart/form-data"),
            "unknown field": (post_edit(base, image, guidance=9), 422, "unknown field guidance"),
            # Edited at the default steps before, with a 200: a client believed it had set them.
            "field in the query string": (httpx.post(f"{base}/v1/edit?steps=1", data={"instruction": "add a hat"},
                                                     files={"image": ("in.png", png(image), "image/png")}),
                                          422, "steps: in the query string"),
            # A media type's name is case-insensitive: this is a missing field (422), not a wrong type (415).
            "upper-case media type, no instruction": (
                httpx.post(f"{base}/v1/edit", content=b'--b\r\nContent-Disposition: form-data; name="image"; '
                           b'filename="in.png"\r\n\r\n' + png(image) + b"\r\n--b--\r\n",
                           headers={"content-type": "Multipart/Form-Data; boundary=b"}), 422, "instruction"),
            "field given twice": (httpx.post(f"{base}/v1/edit", files=[("image", ("in.png", png(image), "image/png"))],
                                             data={"instruction": ["add a hat", "add a cat"]}), 422, "more than once"),
            "text where the image goes": (httpx.post(f"{base}/v1/edit", data={"instruction": "add a hat"},
                                                     files={"image": (None, "dog.png")}), 422, "a file"),
            # Was "Input should be a valid string": a client that sent its instruction as a file did not see why.
            "a file where the instruction goes": (
                httpx.post(f"{base}/v1/edit", files={"image": ("in.png", png(image), "image/png"),
                                                     "instruction": ("i.txt", b"add a hat", "text/plain")}),
                422, "instruction: must be a text field"),
            "image too small": (post_edit(base, png(smooth_image(4, 64))), 400, "the uploaded image"),
            # Read by FastAPI as left out: edited at the default steps (seed, action, return) with a 200.
            # A blank action too (from a mutation audit: only "" was tried).
            "empty steps and seed": (post_edit(base, image, steps="", seed="", action=" "), 422,
                                     "steps, seed, action: empty"),
            # Read by pydantic as 10 and 7: a client that wrote them so meant something else, or made a slip.
            "steps and seed not in decimal digits": (post_edit(base, image, steps="1_0", seed="7.0"), 422,
                                                     "steps '1_0', seed '7.0': not a whole number in decimal digits"),
            "a media type that only begins as multipart's": (
                httpx.post(f"{base}/v1/edit", content=b"--b--\r\n",
                           headers={"content-type": "multipart/form-datax; boundary=b"}), 415, "multipart"),
        }
        for name, (response, status, word) in cases.items():
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert error["code"] and word in error["message"].lower(), (name, error)
            # Every error carries a request id for the logs, in the body and the header alike.
            assert response.json()["request_id"] and response.headers["X-Request-Id"] == response.json()["request_id"]
        traced = httpx.post(f"{base}/v1/edit", data={"instruction": "add a hat"}, headers={"X-Request-Id": "trace-7"},
                            files={"other": ("x.txt", b"1", "text/plain")})
        assert traced.status_code == 422 and traced.json()["request_id"] == "trace-7"
        unknown = httpx.get(f"{base}/v2/edit")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
        # The upload limit guards the edit endpoint only: neither a 413 elsewhere nor counted as an edit.
        for path, status in (("/nope", "404"), ("/healthz", "405")):  # 413 both, counted bad_request
            request = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999\r\n\r\n"
            answer = raw_answer(base, request.encode())
            assert answer.split()[1] == status, answer
        wrong_method = httpx.post(f"{base}/healthz")
        assert wrong_method.status_code == 405 and wrong_method.headers["Allow"] == "GET, HEAD"  # HEAD was left out
        assert post_edit(base, image).status_code == 200
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, 'zone_requests_total{outcome="bad_request"}') == len(cases) + 1


# ---------------------------------------------------------------------------------------- batching


def test_concurrent_requests_are_batched_and_each_gets_its_own_result(pipe):
    images = [smooth_image(64, 96, seed=2), smooth_image(96, 64, seed=3)]
    jobs = [{"image": images[i % 2], "instruction": text, "seed": seed}
            for i, (text, seed) in enumerate([("add a red hat", 1), ("make it gold", 2), ("remove the cup", 3),
                                              ("add a red hat", 4), ("make it gold", 5), ("add snow", 6)])]
    with serving(pipe, max_batch=3, max_wait_ms=500) as (base, _):
        responses = asyncio.run(post_concurrently(base, jobs))
        batches = metric(httpx.get(f"{base}/metrics").text, "zone_batch_size_count")
    assert all(response.status_code == 200 for response in responses)
    assert batches < len(jobs)  # some edits shared a batch
    for job, response in zip(jobs, responses, strict=True):
        alone = pipe.edit(job["image"], job["instruction"], pipe.default_config.replace(seed=job["seed"]))
        # One uint8 level of rounding, as tests/test_batching.py states; and at one CPU thread a borderline M_f pixel
        # may tip (seen: 1 pixel of 6,144, by 53 levels). A mix-up moves thousands.
        moved = np.abs(decode_png(response.content).astype(int) - alone.image.astype(int)).max(axis=-1)
        assert (moved > 1).sum() <= 4


def test_a_request_that_fails_inside_a_batch_fails_alone(pipe):
    gated = GatedPipeline(pipe, fail_on="explode")
    gated.release.set()
    image = smooth_image(64, 64, seed=4)
    jobs = [{"image": image, "instruction": text, "seed": 1} for text in ("add a hat", "explode", "add a scarf")]
    # A batch starts only when full (the 30 s wait, well under the 120 s timeout, is never reached): the three
    # requests share one batch, so the fault is shown to stay with its request inside a batch, not alone in its own.
    with serving(gated, max_batch=3, max_wait_ms=30_000) as (base, _):
        responses = asyncio.run(post_concurrently(base, jobs))
        assert gated.batch_sizes == [3]
        assert [r.status_code for r in responses] == [200, 500, 200]
        assert responses[1].json()["error"]["code"] == "internal_error"
        # And the service goes on (a full batch again: a lone request would wait out the 30 s).
        assert [r.status_code for r in asyncio.run(post_concurrently(base, [jobs[0]] * 3))] == [200] * 3


def test_an_edit_that_fails_inside_the_pipeline_fails_alone(pipe, monkeypatch):
    """The fault raised inside the pipeline's batch (the test above injects its fault after the pipeline ran):
    the service asks edit_batch to keep each request's fault with that request."""
    real_finish = pipe.finish

    def finish(edit, latents, **kwargs):
        if edit.config.seed == 13:
            raise RuntimeError("injected inside the pipeline")
        return real_finish(edit, latents, **kwargs)

    monkeypatch.setattr(pipe, "finish", finish)
    counted = GatedPipeline(pipe)  # no gate: it only records the batches the real pipeline was given
    counted.release.set()
    jobs = [{"image": smooth_image(64, 64, seed=4), "instruction": "add a hat", "seed": seed} for seed in (1, 13, 2)]
    # A batch starts only when full (the 30 s wait, well under the 120 s timeout, is never reached): one batch of 3.
    with serving(counted, max_batch=3, max_wait_ms=30_000) as (base, _):
        responses = asyncio.run(post_concurrently(base, jobs))
    assert counted.batch_sizes == [3]
    assert [r.status_code for r in responses] == [200, 500, 200]


def test_an_edit_over_its_timeout_is_cancelled_by_the_service_itself(pipe):
    """EditService.edit sets the request's cancel event when its time is up: the Ray replica has no batcher
    that would (the local one also does, so the 504 test above cannot tell who did)."""
    submitted = []

    class Stalled(EditService):
        async def submit(self, request, key):
            submitted.append(request)
            await asyncio.sleep(30)

    service = Stalled(lambda: pipe, ServeSettings(timeout_s=0.2, warmup=False))
    service.pipeline = pipe
    with pytest.raises(EditTimedOut):
        asyncio.run(service.edit(smooth_image(64, 64), "add a hat", service.edit_config()))
    assert submitted[0].cancel.is_set()
    # Given a deadline (the request's, its upload's decoding already spent), not a fresh timeout from now: from a
    # mutation audit, an edit that restarted the timeout after decoding went unseen.
    service.settings = ServeSettings(timeout_s=600, warmup=False)

    async def by_its_deadline():
        deadline = asyncio.get_running_loop().time() + 0.2
        edit = service.edit(smooth_image(64, 64), "add a hat", service.edit_config(), deadline)
        return await asyncio.wait_for(edit, 20)

    with pytest.raises(EditTimedOut):
        asyncio.run(by_its_deadline())
    assert submitted[1].cancel.is_set()


# ---------------------------------------------------------------------------------------- backpressure


def test_an_upload_of_exactly_the_limit_is_edited_with_or_without_a_content_length(pipe):
    """The limit is "at most": from a mutation audit, either check (the Content-Length, the bytes of a chunked
    body counted as they arrive) could refuse an upload of exactly that size unseen."""
    body = (b'--b\r\nContent-Disposition: form-data; name="instruction"\r\n\r\nadd a hat\r\n--b\r\n'
            b'Content-Disposition: form-data; name="image"; filename="in.png"\r\nContent-Type: image/png\r\n\r\n'
            + png(smooth_image(64, 64, seed=3)) + b"\r\n--b--\r\n")
    headers = {"content-type": "multipart/form-data; boundary=b"}
    with serving(pipe, max_upload_mb=len(body) / 2**20) as (base, service):
        assert service.settings.max_upload_bytes == len(body)
        sized = httpx.post(f"{base}/v1/edit", content=body, headers=headers, timeout=120)
        chunked = httpx.post(f"{base}/v1/edit", content=iter([body]), headers=headers, timeout=120)
        assert "content-length" in sized.request.headers and "content-length" not in chunked.request.headers
        assert sized.status_code == chunked.status_code == 200, (sized.text, chunked.text)


def test_an_instruction_over_a_mebibyte_is_said_to_be_too_long(pipe):
    """Past Starlette's 1 MiB for a text field (under the upload limit): was a 400, "Part exceeded maximum size"."""
    with serving(pipe) as (base, _):
        response = post_edit(base, smooth_image(64, 64), instruction="x" * (2**20 + 1))
    assert response.status_code == 422 and "instruction: at most 1000 characters" in response.json()["error"]["message"]


def test_a_stalled_upload_is_answered_503_as_soon_as_the_server_stops(pipe, monkeypatch):
    """It held the shutdown for uvicorn's whole grace period (the request timeout + 1 s), then got a bare 500."""
    import zone_engine.serving.app as app_module

    reading, read = threading.Event(), app_module._unless_stopping

    async def reading_the_upload(receive, service):
        reading.set()
        return await read(receive, service)

    monkeypatch.setattr(app_module, "_unless_stopping", reading_the_upload)
    service = LocalEditService(lambda: pipe, ServeSettings(warmup=False))
    stalled = (b"POST /v1/edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
               b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"instruction\"\r\n\r\n"
               b"add a hat\r\n")  # and no more
    with serving_service(service) as (base, server), ThreadPoolExecutor(1) as pool:
        while not service.ready:
            time.sleep(0.02)
        answered = pool.submit(raw_answer, base, stalled)
        assert reading.wait(30)  # the upload under way (a fixed sleep could stop the server before it was read)
        stopped = time.monotonic()
        server.should_exit = True  # what SIGTERM does
        answer = answered.result(timeout=30)
        waited = time.monotonic() - stopped
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503 ") and "retry-after: 5" in head.lower(), answer
    assert json.loads(body)["error"]["code"] == "unavailable" and waited < 10  # not the 30 s grace period


def test_retry_after_before_any_batch_ended_is_at_least_the_running_batchs_time_so_far(pipe):
    """It said 1 s until a first batch ended, however long that batch had been running."""
    gated = GatedPipeline(pipe)
    with serving(gated, max_batch=1, max_wait_ms=0, queue_size=1) as (base, service), ThreadPoolExecutor(1) as pool:
        running = pool.submit(post_edit, base, smooth_image(64, 64, seed=5))
        assert gated.entered.wait(30)
        time.sleep(2.2)
        assert service.batcher.retry_after_s() >= 3  # the running batch's 2.2 s (and more), rounded up
        gated.release.set()
        assert running.result().status_code == 200


def test_a_full_queue_answers_503_with_retry_after(pipe):
    gated = GatedPipeline(pipe)
    image = smooth_image(64, 64, seed=5)
    with (serving(gated, max_batch=1, max_wait_ms=0, queue_size=1) as (base, service),
          httpx.Client(timeout=120) as client, ThreadPoolExecutor(2) as pool):
        running = pool.submit(post_edit, base, image)
        assert gated.entered.wait(30)  # the first edit runs (blocked in the model thread)
        queued = pool.submit(post_edit, base, image, seed=2)
        while service.batcher.queued < 1:
            time.sleep(0.01)
        refused = post_edit(base, image)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["Retry-After"]) >= 1
        head, body = answer_before_the_body(base)  # the upload not waited for
        assert head.startswith("HTTP/1.1 503 ") and json.loads(body)["error"]["code"] == "queue_full"
        gated.release.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
        assert metric(client.get(f"{base}/metrics").text, 'zone_requests_total{outcome="queue_full"}') == 2


class HeldDecode:
    """decode_upload whose first call waits for `release` (an upload slow to decode), the others as they are."""

    def __init__(self) -> None:
        self.started, self.release, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self, data, settings):
        self.calls += 1
        if self.calls == 1:
            self.started.set()
            assert self.release.wait(60)
        return decode_upload(data, settings)


def test_uploads_being_decoded_hold_their_place_in_the_queue(pipe, monkeypatch):
    """Decoding came before the queue's bound: beyond it, uploads were all decoded (CPU, memory), then refused."""
    import zone_engine.serving.app as app_module

    held, gated, image = HeldDecode(), GatedPipeline(pipe), smooth_image(64, 64, seed=5)
    with (serving(gated, max_batch=1, max_wait_ms=0, queue_size=1) as (base, service),
          ThreadPoolExecutor(2) as pool):
        running = pool.submit(post_edit, base, image)
        assert gated.entered.wait(30)
        monkeypatch.setattr(app_module, "decode_upload", held)
        decoding = pool.submit(post_edit, base, image, seed=2)
        assert held.started.wait(30)
        refused = post_edit(base, image, seed=3)
        assert service.batcher.queued == 0 and held.calls == 1  # refused for the upload being decoded, undecoded
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
        held.release.set()
        gated.release.set()
        assert running.result().status_code == 200 and decoding.result().status_code == 200


def test_an_upload_admitted_before_the_queue_filled_is_refused_undecoded(pipe, monkeypatch):
    """Room is checked again once the upload has arrived, before decoding it: from a mutation audit, an upload
    admitted while there was room, then finished arriving into a full queue, was decoded (CPU, memory) first."""
    import zone_engine.serving.app as app_module

    gated, image, reading, decoded = GatedPipeline(pipe), smooth_image(64, 64, seed=5), threading.Event(), []
    read, decode = app_module._unless_stopping, app_module.decode_upload

    async def reading_the_upload(receive, service):
        reading.set()
        return await read(receive, service)

    upload = httpx.Request("POST", "http://x/v1/edit", data={"instruction": "add a hat"},
                           files={"image": ("in.png", png(image), "image/png")})
    body = upload.read()
    with (serving(gated, max_batch=1, max_wait_ms=0, queue_size=1) as (base, service),
          ThreadPoolExecutor(2) as pool):
        running = pool.submit(post_edit, base, image)
        assert gated.entered.wait(30)
        monkeypatch.setattr(app_module, "_unless_stopping", reading_the_upload)
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30) as client:
            client.sendall(b"POST /v1/edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                           + upload.headers["content-type"].encode()
                           + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:100])
            assert reading.wait(30)  # admitted: the queue was empty
            queued = pool.submit(post_edit, base, image, seed=2)
            while service.batcher.queued < 1:
                time.sleep(0.01)
            monkeypatch.setattr(app_module, "decode_upload", lambda data, settings: decoded.append(1) or decode(
                data, settings))
            client.sendall(body[100:])
            answer = b""
            while b"}" not in answer:
                chunk = client.recv(65536)
                assert chunk, answer
                answer += chunk
        gated.release.set()
        head, _, answer_body = answer.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 503 ") and json.loads(answer_body)["error"]["code"] == "queue_full", answer
        assert decoded == []
        assert running.result().status_code == 200 and queued.result().status_code == 200


def test_uploads_wait_for_an_image_thread_within_their_timeout(pipe, monkeypatch):
    """At most --image-threads decode at once; a decode its request stopped waiting for still holds its thread
    until it ends (a thread cannot be stopped), and a request waiting for a thread past its timeout gets 504."""
    import zone_engine.serving.app as app_module

    held, image = HeldDecode(), smooth_image(64, 64, seed=7)
    monkeypatch.setattr(app_module, "decode_upload", held)
    with serving(pipe, image_threads=1, timeout_s=3.0) as (base, service), ThreadPoolExecutor(2) as pool:
        slow = pool.submit(post_edit, base, image)
        assert held.started.wait(30)
        waiting = pool.submit(post_edit, base, image, seed=2)
        for response in (slow.result(), waiting.result()):
            assert response.status_code == 504 and "decoding and queueing included" in response.json()["error"][
                "message"]
        assert held.calls == 1  # the second waited for the thread the first still holds
        held.release.set()
        assert post_edit(base, image, seed=3).status_code == 200 and held.calls == 2
        assert service.decoding == 0
        assert metric(httpx.get(f"{base}/metrics").text, 'zone_requests_total{outcome="timeout"}') == 2


def test_a_request_over_its_timeout_gets_504_and_its_work_is_cancelled(pipe):
    image = smooth_image(64, 64, seed=6)
    # The edit must reach the model thread before its timeout (else it leaves the queue unrun, rightly, and there is
    # no work to see cancelled): 2 s, ample on an idle machine, and longer ones only if a loaded machine kept it from
    # the model thread that long (the window is not what this tests).
    for timeout_s in (2.0, 10.0, 40.0):
        gated = GatedPipeline(pipe)
        with serving(gated, timeout_s=timeout_s) as (base, _):
            response = post_edit(base, image)
            assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
            if not gated.entered.wait(1):  # timed out while queued
                gated.release.set()  # should it yet come to run, as it does cancelled, it must not hold the server
                continue
            assert gated.seen[0].cancelled()
            gated.release.set()
            wait_until(lambda gated=gated: gated.outcomes, 60)
            assert isinstance(gated.outcomes[0], EditCancelled)  # the pipeline stopped it and did no more work
            text = httpx.get(f"{base}/metrics").text
            assert metric(text, 'zone_requests_total{outcome="timeout"}') == 1
            break
    else:
        pytest.fail("the edit never reached the model thread within its timeout, even of 40 s")


def test_a_client_that_goes_away_cancels_its_edit(pipe):
    """Not held until the server's timeout: a client (or load balancer) that gives up frees its slot at once."""
    gated = GatedPipeline(pipe)
    upload = httpx.Request("POST", "http://x/v1/edit", data={"instruction": "add a red hat"},
                           files={"image": ("in.png", png(smooth_image(64, 64, seed=4)), "image/png")})
    body = upload.read()
    with serving(gated, timeout_s=120) as (base, _):
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30) as client:
            client.sendall(b"POST /v1/edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                           + upload.headers["content-type"].encode()
                           + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            # The client goes away once its edit runs (not after a fixed wait it might reach the model thread in).
            assert gated.entered.wait(30), "the edit did not reach the model thread"
        deadline = time.monotonic() + 30
        while not gated.seen[0].cancelled():
            assert time.monotonic() < deadline, "the edit of a client that went away was not cancelled"
            time.sleep(0.05)
        gated.release.set()
        while not gated.outcomes:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert isinstance(gated.outcomes[0], EditCancelled)
        assert metric(httpx.get(f"{base}/metrics").text, 'zone_requests_total{outcome="cancelled"}') == 1


def test_a_client_that_goes_away_while_its_upload_waits_for_a_decode_frees_its_slot_undecoded(pipe, monkeypatch):
    """An upload waiting for an image thread, abandoned, had held its queue slot until its turn, then been
    decoded (CPU, memory) for nobody, ahead of the clients still waiting."""
    import zone_engine.serving.app as app_module

    held, image = HeldDecode(), smooth_image(64, 64, seed=5)
    upload = httpx.Request("POST", "http://x/v1/edit", data={"instruction": "add a hat"},
                           files={"image": ("in.png", png(image), "image/png")})
    body = upload.read()
    monkeypatch.setattr(app_module, "decode_upload", held)
    with serving(pipe, image_threads=1) as (base, service), ThreadPoolExecutor(1) as pool:
        decoding = pool.submit(post_edit, base, image)
        assert held.started.wait(30)
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30) as client:
            client.sendall(b"POST /v1/edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                           + upload.headers["content-type"].encode()
                           + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 30
            while service.decoding < 2:  # its upload arrived and waits for the image thread
                assert time.monotonic() < deadline
                time.sleep(0.01)
        while service.decoding > 1:
            assert time.monotonic() < deadline, "the slot of an upload abandoned before its decode was held"
            time.sleep(0.01)
        held.release.set()
        assert decoding.result().status_code == 200 and held.calls == 1
        assert metric(httpx.get(f"{base}/metrics").text, 'zone_requests_total{outcome="cancelled"}') == 1


def test_a_client_that_goes_away_during_its_upload_is_counted_cancelled_not_a_bad_request(pipe):
    """An upload abandoned behind a load balancer is no client mistake: counted as a disconnect mid-edit is."""
    head = (b'--b\r\nContent-Disposition: form-data; name="instruction"\r\n\r\nadd a hat\r\n--b\r\n'
            b'Content-Disposition: form-data; name="image"; filename="in.png"\r\n\r\n')
    with serving(pipe) as (base, _):
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"POST /v1/edit HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                           + head + png(smooth_image(64, 64))[:200])
            time.sleep(0.3)  # the server is reading the body
        wait_until(lambda: parse_metrics(httpx.get(f"{base}/metrics").text).get(
            'zone_requests_total{outcome="cancelled"}'), 30, "the abandoned upload was not counted as cancelled", 0.1)
        assert metric(httpx.get(f"{base}/metrics").text, 'zone_requests_total{outcome="bad_request"}') == 0


def test_an_edit_whose_handler_is_cancelled_cancels_its_work(pipe):
    """A client that goes away cancels the handler (Ray Serve does so): the edit's work stops too."""
    service = LocalEditService(lambda: pipe, ServeSettings(warmup=False))
    service.pipeline, submitted = pipe, []

    async def never_answered(request, key):
        submitted.append(request)
        await asyncio.Event().wait()

    async def scenario():
        service.submit = never_answered
        task = asyncio.create_task(service.edit(smooth_image(64, 64), "add a hat", service.edit_config()))
        while not submitted:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert submitted[0].cancelled()


def test_an_edit_route_cancelled_mid_edit_is_counted_cancelled(pipe):
    """Ray Serve cancels the handler of a client that went away: from a mutation audit, that edit went uncounted
    in zone_requests_total unseen."""
    gated = GatedPipeline(pipe)
    service = LocalEditService(lambda: gated, ServeSettings(warmup=False, max_batch=1, max_wait_ms=0))
    app = create_app(settings=service.settings)
    upload = httpx.Request("POST", "http://127.0.0.1/v1/edit", data={"instruction": "add a hat"},
                           files={"image": ("in.png", png(smooth_image(64, 64)), "image/png")})
    body = upload.read()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/edit", "raw_path": b"/v1/edit", "query_string": b"", "root_path": "", "app": app,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", upload.headers["content-type"].encode()),
                         (b"content-length", str(len(body)).encode())]}

    async def scenario():
        app.state.service = service
        await service.start()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # connected, silent

        async def send(message):
            pass

        handler = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 30)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        gated.release.set()
        await service.close()

    run_batcher(scenario)
    assert gated.seen[0].cancelled()
    assert service.metrics.registry.get_sample_value("zone_requests_total", {"outcome": "cancelled"}) == 1


def test_a_server_side_fault_is_a_500_not_the_clients_fault(pipe, caplog):
    """A checkpoint or device fault at edit time (e.g. an ONNX export that fails to load) is the server's."""
    broken_export = CheckpointError("the SAM export in sam_onnx/ cannot be read: re-run `zone export sam`")
    with serving(FailingPipeline(pipe, broken_export)) as (base, _):
        response = post_edit(base, smooth_image(64, 64))
        assert response.status_code == 500 and response.json()["error"]["code"] == "server_error"
        assert "zone export sam" in response.json()["error"]["message"]
        assert metric(httpx.get(f"{base}/metrics").text, 'zone_requests_total{outcome="error"}') == 1
    # Logged once, by the model thread, as failing in the edit (from a mutation audit: also "before its edit").
    logged = [record.getMessage() for record in caplog.records if record.name == "zone_engine.serving"]
    assert logged == ["edit failed"], logged
    assert any("edit failed" in record.message for record in caplog.records)


def test_browser_pages_of_the_allowed_origins_only_may_call_the_api():
    """--allow-origin: preflight answered and every answer (errors too) readable by those pages' scripts, with
    the X-Zone-* headers; without it no CORS header at all (a browser then refuses cross-origin calls)."""

    page, other = "https://app.example.com", "https://elsewhere.example"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "X-Request-Id"}
    with local_client(allow_origins=(page,)) as client:
        answer = client.options("/v1/edit", headers={"Origin": page, **preflight})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == page
        assert "POST" in answer.headers["access-control-allow-methods"]
        refused = client.post("/v1/edit", headers={"Origin": page}, json={})  # 415, and the page may read why
        assert refused.status_code == 415 and refused.headers["access-control-allow-origin"] == page
        assert {"X-Zone-Warnings", "Retry-After"} <= set(refused.headers["access-control-expose-headers"].split(", "))
        assert client.options("/v1/edit", headers={"Origin": other, **preflight}).status_code == 400
        assert "access-control-allow-origin" not in client.post("/v1/edit", headers={"Origin": other}).headers
    with local_client() as client:
        assert "access-control-allow-origin" not in client.post("/v1/edit", headers={"Origin": page}).headers
        assert client.options("/v1/edit", headers={"Origin": page, **preflight}).status_code == 405
    with pytest.raises(ConfigError, match="is not an origin"):
        ServeSettings(allow_origins=("app.example.com",))
    assert ServeSettings(allow_origins=("*", "http://localhost:3000")).allow_origins[0] == "*"


@pytest.mark.parametrize("origin, sent", [
    ("https://App.Example.com", "https://app.example.com"), ("https://app.example.com:443", "https://app.example.com"),
    ("http://app.example.com:80", "http://app.example.com"), ("http://localhost:", "http://localhost"),
    ("http://localhost:03000", "http://localhost:3000"), ("http://[0:0::1]:8080", "http://[::1]:8080"),
    ("http://café.example", "http://xn--caf-dma.example"),
    # A browser reads a host ending in a number as IPv4 in inet_aton's forms, and sends it in dotted decimal.
    ("http://127.000.000.001", "http://127.0.0.1"), ("http://127.1:8000", "http://127.0.0.1:8000"),
    ("http://0x7F.1", "http://127.0.0.1"), ("http://2130706433", "http://127.0.0.1"),
    ("http://127.0.0.1.", "http://127.0.0.1"), ("http://010.0xff.0", "http://8.255.0.0"),
])
def test_an_allowed_origin_not_written_as_browsers_send_it_is_refused_with_their_spelling(origin, sent):
    """The Origin header is compared as text: another spelling started the server, then failed every call of the
    page (a preflight 400, an edit 403)."""
    said = "is not written as browsers send it (lower case, no default port, a name in ASCII, IPv4 in dotted " \
        f"decimal), so no page would match it: write {sent}"
    with pytest.raises(ConfigError, match=re.escape(said)):
        ServeSettings(allow_origins=(origin,))
    assert ServeSettings(allow_origins=(sent,)).allow_origins == (sent,)


@pytest.mark.parametrize("origin", ["http://*.example.com", "https://user@app.example.com", "http://x:pw@host",
                                    "http://host:99999", "http://host:abc", "http://host:0", "http://[fe80::1%25eth0]",
                                    "http://a..example", "http://[::1", "http://1.2.3.08", "http://256.0.0.1",
                                    "http://1.2.3.4.5", "http://example.123", "http://1.2.3.256"])
def test_an_allowed_origin_no_browser_sends_is_refused(origin):
    with pytest.raises(ConfigError, match=re.escape("is not an origin: write scheme://host[:port] with no path, user "
                                                    "name or wildcard")):
        ServeSettings(allow_origins=(origin,))


def test_origins_as_browsers_send_them_are_allowed():
    origins = ("https://app.example.com", "http://localhost:3000", "http://127.0.0.1:8000", "http://[::1]:8080",
               "https://app.example.com.", "http://xn--caf-dma.example", "http://10.0.0.255", "http://1.example")
    assert ServeSettings(allow_origins=origins).allow_origins == origins


def test_an_edit_from_a_browser_page_of_an_origin_not_allowed_is_refused_before_its_upload_is_read(pipe):
    """A page elsewhere could make its visitors' browsers post edits to a local server (a form post needs no CORS
    preflight): 403, said before the body is read. Pages of allowed origins, this server's own (/docs) and
    clients that send no Origin are served."""
    image, page = smooth_image(64, 64, seed=8), "https://app.example.com"
    with serving(pipe, allow_origins=(page,), allow_hosts=("zone.example.com",)) as (base, service):
        assert answer_before_the_body(base, b"Origin: http://[::1\r\n")[0].startswith("HTTP/1.1 403 ")  # no 500
        head, body = answer_before_the_body(base, b"Origin: https://elsewhere.example\r\n")
        assert head.startswith("HTTP/1.1 403 ") and "access-control-allow-origin" not in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "origin_not_allowed" and "--allow-origin https://elsewhere.example" in error["message"]
        # A page whose own name was pointed at this server (DNS rebinding): its origin names the Host it posts to
        assert answer_before_the_body(base, b"Origin: http://x\r\n")[0].startswith("HTTP/1.1 403 ")
        allowed = post_edit(base, image, "add a hat", headers={"Origin": page})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == page
        own = post_edit(base, image, "add a hat", headers={"Origin": base.upper().replace("HTTP", "http")})
        assert own.status_code == 200
        # Served under the operator's own name (--allow-host), a page is this server's own: no --allow-origin needed
        named = post_edit(base, image, "add a hat",
                          headers={"Host": "zone.example.com", "Origin": "http://zone.example.com"})
        assert named.status_code == 200, named.text
        assert metric(httpx.get(f"{base}/metrics").text, 'zone_requests_total{outcome="bad_request"}') == 3
    with serving(pipe, allow_origins=("*",)) as (base, _):  # pages of any origin may call it
        anyone = post_edit(base, image, "add a hat", headers={"Origin": "https://elsewhere.example"})
        assert anyone.status_code == 200 and anyone.headers["access-control-allow-origin"] == "*"


def test_a_form_in_punycode_is_refused_before_its_upload_is_read(pipe):
    """Starlette decodes a form's text fields on the event loop, and punycode's decoding is quadratic: a 1 MB field
    held every request and probe for 12 s. 415 before the body is read, however the charset is written (Python's
    codec lookup, as Starlette's, ignores case, a trailing "_" and a Latin-1 letter at either end); a charset Python
    decodes fast is read as before."""
    charsets = (b"punycode", b'"PunyCode"', b"punycode_", b"punycode\xe9")
    with serving(pipe) as (base, service):
        for charset in charsets:
            request = (b"POST /v1/edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b; "
                       b"charset=" + charset + b"\r\nContent-Length: 100000\r\n\r\n")  # the body never comes
            head, _, body = raw_answer(base, request).partition("\r\n\r\n")
            assert head.startswith("HTTP/1.1 415 "), head
            error = json.loads(body)["error"]
            assert error["code"] == "unsupported_media_type" and "UTF-8" in error["message"]
        assert metric(httpx.get(f"{base}/metrics").text, 'zone_requests_total{outcome="bad_request"}') == len(charsets)
        form = (b'--b\r\nContent-Disposition: form-data; name="instruction"\r\n\r\nadd a hat\r\n--b\r\n'
                b'Content-Disposition: form-data; name="image"; filename="in.png"\r\n\r\n'
                + png(smooth_image(64, 64, seed=8)) + b"\r\n--b--\r\n")
        for charset in ("shift_jis", "foo"):
            answer = httpx.post(f"{base}/v1/edit", content=form, timeout=120, headers={
                "Content-Type": f"multipart/form-data; boundary=b; charset={charset}"})
            assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("content_type, charset", [
    ("multipart/form-data; boundary=b; charset=PUNYCODE", "punycode"),
    ("multipart/form-data; boundary=b; charset=utf8", "utf-8"),
    ("multipart/form-data; boundary=b", None),  # Starlette's default, UTF-8
    ("multipart/form-data; boundary=b; charset=foo", None),  # not a codec: Starlette reads it as Latin-1
    ("multipart/form-data; boundary=b; charset=puny\x00code", None),  # a NUL: codecs.lookup's ValueError
])
def test_form_charset_names_the_codec_starlette_decodes_the_form_in(content_type, charset):
    assert form_charset(content_type) == charset


def test_run_server_parses_requests_with_h11(pipe, monkeypatch):
    """The served process's parser, not only the tests': httptools, uvicorn's choice where installed, keeps a
    request's headers whatever their size."""
    configs = []
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda config: None)  # this process's logging kept
    monkeypatch.setattr(ZoneServer, "run", lambda server, *_: configs.append(server.config))
    run_server(LocalEditService(lambda: pipe, ServeSettings(warmup=False)), port=0)
    assert [config.http for config in configs] == ["h11"] == [HTTP_PARSER]


def test_request_headers_past_16_kib_are_refused_not_kept(pipe):
    """httptools, uvicorn's parser where installed, kept a request's headers whatever their size (190 MiB on one
    connection); h11 answers 400 once they pass 16 KiB unfinished (one read, at most 256 KiB, may hold more), and
    the server goes on."""
    with serving(pipe) as (base, _):
        padding = b"".join(b"X-Pad-%d: %s\r\n" % (line, b"a" * 1000) for line in range(1000))
        answer = raw_answer(base, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + padding + b"\r\n")
        assert answer.startswith("HTTP/1.1 400 "), answer[:100]
        assert httpx.get(f"{base}/healthz").status_code == 200


@pytest.mark.parametrize("origin, host, same", [
    ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
    ("http://localhost:8000", "LOCALHOST:8000", True),
    ("http://[::1]:8000", "[::1]:8000", True),
    ("http://10.0.0.5", "10.0.0.5", True),  # served to the network by its address
    ("http://zone.example:8000", "zone.example:8000", False),  # a DNS name: rebinding could fake it
    ("http://127.0.0.1:8001", "127.0.0.1:8000", False),  # another port: another origin
    ("http://[::1", "[::1", False),  # no origin a browser sends
    ("http://gpu-box:8000", "gpu-box:8000", True),  # --allow-host gpu-box: the operator's own name
    ("http://gpu-box.:8000", "gpu-box.:8000", True),
    ("http://zone.example:8000", "gpu-box:8000", False),
])
def test_only_an_address_localhost_or_an_allowed_host_makes_a_page_this_servers_own(origin, host, same):
    from starlette.requests import Request

    from zone_engine.serving.app import same_origin

    request = Request({"type": "http", "headers": [(b"host", host.encode())]})
    assert same_origin(origin, request, frozenset({"gpu-box"})) is same
    for no_names in (None, frozenset()):  # --allow-host * proves no name; none allowed, none
        assert same_origin(origin, request, no_names) is (same and "gpu-box" not in host)


def local_client(**settings):
    """A test client of the app with no service, addressing it as 127.0.0.1 (TestClient's own "testserver" is a
    DNS name, which the Host check refuses)."""
    from fastapi.testclient import TestClient

    return TestClient(create_app(settings=ServeSettings(**settings)), base_url="http://127.0.0.1")


@pytest.mark.parametrize("host, answered", [
    ("127.0.0.1:8000", True), ("[::1]:8000", True), ("10.0.0.5", True), ("LOCALHOST.:8000", True),
    ("127.0.0.1:", True),  # an empty port is the default one (RFC 3986)
    ("", True),  # HTTP/1.0: no browser
    ("zone.example.com", True), ("Zone.Example.COM.:443", True),  # --allow-host zone.example.com
    ("app.example.com:8000", True),  # the allowed origin's name: a page there may be served by this server
    ("evil.example:8000", False),  # a page there whose name was pointed at this server (DNS rebinding)
    ("zone.example.com.evil.example", False), ("127.0.0.1.nip.io", False),
    # Names only beginning or ending as an allowed one, localhost or an address does
    ("localhost.evil.example:8000", False), ("notlocalhost", False), ("evilzone.example.com", False),
    ("www.127.0.0.1", False), ("gpu-box:8000", False),  # a name without dots is a DNS name too
    ("x@127.0.0.1", False), ("[::1", False), ("a b", False),  # no host a browser sends
    ("127.0.0.1@evil.example", False), ("localhost:8000@evil.example", False), ("127.0.0.1:x", False),
    ("[localhost]", False), ("[fe80::1%251]", False),  # brackets hold an IPv6 address, with no zone in a Host
    ("café.example".encode(), False),  # a name not in ASCII (its IDN, xn--caf-dma.example, is the name to allow)
    ("*", False), ("a..b", False), (".", False), ("a!b:80", False),  # no name --allow-host takes
])
def test_requests_addressed_to_a_dns_name_not_allowed_get_421_on_every_route(host, answered):
    """A page whose name was made to resolve to this server is of the same origin as its answers: it could
    read /metrics and /readyz without CORS. IP addresses and localhost name no DNS."""
    allowed = {"allow_hosts": ("zone.example.com",), "allow_origins": ("https://app.example.com",)}
    with local_client(**allowed) as client:
        for method, path in (("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/nowhere")):  # need no service
            answer = client.request(method, path, headers={"Host": host, "X-Request-Id": "r1"})
            assert (answer.status_code != 421) == answered, (method, path, answer.text)
        if not answered:
            assert answer.json()["error"]["code"] == "host_not_allowed" and answer.headers["X-Request-Id"] == "r1"
            said = answer.json()["error"]["message"]
            if isinstance(host, bytes):  # said as the client sent it, not its UTF-8 read as Latin-1 ("cafã©")
                assert f"addressed to {host.decode()!r}, which is no DNS name" in said
            if host == "evil.example:8000":  # the name to allow, without the port (which --allow-host refuses)
                assert said.endswith("start it with --allow-host evil.example")
            if (advised := re.search(r"--allow-host (.*)", said)) is not None:  # one it takes, not * (any name)
                assert advised[1] != "*" and ServeSettings(allow_hosts=(advised[1],)), said


def test_a_served_edit_addressed_to_a_name_not_allowed_is_refused_and_counted_but_healthz_answers_any(pipe):
    """/healthz says only "up": a liveness check by a DNS name (docker compose's) refused would restart the
    server in a loop. /readyz and /metrics say more: refused."""
    with serving(pipe) as (base, _):
        elsewhere = {"Host": "evil.example:8000"}
        assert httpx.get(f"{base}/healthz", headers=elsewhere).status_code == 200
        assert httpx.head(f"{base}/healthz", headers=elsewhere).status_code == 200
        assert httpx.get(f"{base}/readyz", headers=elsewhere).status_code == 421
        assert httpx.get(f"{base}/metrics", headers=elsewhere).status_code == 421
        assert metric(httpx.get(f"{base}/metrics").text, 'zone_requests_total{outcome="bad_request"}') == 0  # no edits
        refused = post_edit(base, smooth_image(64, 64), "add a hat", headers=elsewhere)
        assert refused.status_code == 421 and refused.json()["error"]["code"] == "host_not_allowed"
        assert metric(httpx.get(f"{base}/metrics").text, 'zone_requests_total{outcome="bad_request"}') == 1


def test_allowed_hosts_are_host_names_and_any_star_allows_every_name():
    for name in ("allow_hosts", "allow_origins"):  # a string's letters would be the names
        with pytest.raises(ConfigError, match=f"{name}='gpu-box' is one string: give a tuple"):
            ServeSettings(**{name: "gpu-box"})
    assert ServeSettings(allow_hosts=("*",)).host_names() is None
    assert ServeSettings(allow_origins=("*",)).host_names() is None  # any page may read every answer anyway
    assert ServeSettings(allow_hosts=("Zone.Example.",)).host_names() == {"zone.example"}
    assert ServeSettings(allow_hosts=("zone_engine",)).host_names() == {"zone_engine"}  # a docker compose service
    # An allowed origin's name, not its port: a page there may be served by this server
    assert ServeSettings(allow_origins=("https://app.example.com:8443",)).host_names() == {"app.example.com"}
    for star in ({"allow_hosts": ("*",)}, {"allow_origins": ("*",)}):
        with local_client(**star) as client:
            assert client.get("/openapi.json", headers={"Host": "evil.example:8000"}).status_code == 200, star
    for host in ("zone.example.com:8000", "gpu-box:8000", "https://zone.example.com", "zone example", ""):
        with pytest.raises(ConfigError, match="is not a host name: write the name clients put in the address"):
            ServeSettings(allow_hosts=(host,))
    with pytest.raises(ConfigError, match="is not an origin"):
        ServeSettings(allow_origins=("http://[::1",))
    with local_client() as client:  # refused without a name allowed, readable by no page
        answer = client.get("/readyz", headers={"Host": "zone.example.com:8000", "Origin": "http://x"})
        assert answer.status_code == 421 and "access-control-allow-origin" not in answer.headers
        assert "--allow-host zone.example.com" in answer.json()["error"]["message"]
    with local_client(allow_origins=("https://app.example.com",)) as client:  # the allowed page may read why
        answer = client.get("/readyz", headers={"Host": "zone.example.com", "Origin": "https://app.example.com"})
        assert answer.status_code == 421 and answer.headers["access-control-allow-origin"] == "https://app.example.com"


def test_a_wrong_path_or_method_names_what_the_api_takes():
    """A trailing slash was a bare 307 to a Location built from the client's Host header; 404 and 405 said only
    "Not Found" and "Method Not Allowed"."""

    with local_client() as client:
        slash = client.post("/v1/edit/", follow_redirects=False)
        assert slash.status_code == 404 and "location" not in slash.headers
        assert "the routes are POST /v1/edit, GET /healthz, GET /readyz, GET /metrics" in \
            slash.json()["error"]["message"]
        wrong = client.get("/v1/edit")
        assert wrong.status_code == 405 and wrong.json()["error"]["message"] == "GET is not taken at /v1/edit: use POST"
        assert client.put("/healthz").json()["error"]["message"] == "PUT is not taken at /healthz: use GET or HEAD"


def test_request_limits_hold_at_their_exact_values():
    """From a mutation audit: --max-steps was unguarded (a client could ask for 999 steps), and every "at most"
    limit could move by one unseen."""
    settings = ServeSettings(max_instruction_chars=20, max_steps=7)
    check_form_fields([("steps", " 7 "), ("seed", "+0")])  # decimal digits, spaced or signed: read as pydantic does
    assert check_request_fields("x" * 20, None, 7, 4294967295, settings) == ("x" * 20, {"steps": 7, "seed": 4294967295})
    assert check_request_fields("x", None, 1, 0, settings) == ("x", {"steps": 1, "seed": 0})  # the lower ends too
    for fields, words in (((("x" * 21), None, None, None), "instruction: 21 characters"),
                          (("x", None, 8, None), "steps: 8 is outside 1..7"),
                          (("x", None, None, 2**32), "seed: 4294967296 is outside")):
        with pytest.raises(ServeError) as refused:
            check_request_fields(*fields, settings)
        assert refused.value.status == 422 and words in refused.value.message
    assert ServeSettings().max_upload_bytes == 20 * 2**20 and ServeSettings(max_upload_mb=1).max_upload_bytes == 2**20
    for size, answer in ((2**20 + 1, (413, "upload_too_large")), (2**20, (400, "bad_image"))):  # at the limit: read
        with pytest.raises(ServeError) as refused:
            decode_upload(b"x" * size, ServeSettings(max_upload_mb=1))
        assert (refused.value.status, refused.value.code) == answer, size
    assert decode_upload(png(smooth_image(100, 100)), ServeSettings(max_pixels=100 * 100)).pixels.shape == (100, 100, 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    huge = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")  # past Pillow's own bomb limit, met as it opens the header
    with pytest.raises(ServeError) as refused:
        decode_upload(huge, ServeSettings())
    assert (refused.value.status, refused.value.code) == (413, "image_too_large")
    # The image's own count, as `zone edit` says it: not Pillow's limit, which a client would read as the size.
    assert refused.value.message.startswith("the image has 400,000,000 pixels; this server takes at most 25,000,000")


def test_each_engine_error_maps_to_its_status_code_and_outcome():
    """From a mutation audit: the outcomes counted in zone_requests_total, and a ZoneError of no closer kind
    (a client's 400, not the server's 500), were not pinned."""
    for error, status, code, outcome in ((EditCancelled("stopped"), 503, "cancelled", "cancelled"),
                                         (InstructionError("empty"), 422, "invalid_request", "bad_request"),
                                         (ConfigError("steps"), 422, "invalid_request", "bad_request"),
                                         (InputImageError("corrupt"), 400, "bad_image", "bad_request"),
                                         (ZoneError("refused"), 400, "bad_request", "bad_request"),
                                         (DeviceError("no CUDA"), 500, "server_error", "error"),
                                         (OutOfDeviceMemory("out of GPU memory in finish"), 503, "out_of_memory",
                                          "out_of_memory"),
                                         (ShuttingDown("stopping"), 503, "unavailable", "unavailable"),
                                         (QueueFull(7), 503, "queue_full", "queue_full"),
                                         (RuntimeError("a bug"), 500, "internal_error", "error")):
        answer = as_serve_error(error, None)
        assert (answer.status, answer.code, outcome_of(answer)) == (status, code, outcome), error
    cancelled = as_serve_error(EditCancelled("stopped"), None)
    assert cancelled.headers["Retry-After"] and outcome_of(cancelled) == "cancelled"
    assert as_serve_error(QueueFull(7), None).headers["Retry-After"] == "7"
    assert as_serve_error(OutOfDeviceMemory("out of GPU memory"), None).headers["Retry-After"] == "5"


def test_a_damaged_upload_of_any_format_is_a_400_bad_image():
    """A truncated multi-page TIFF or a fuzzed GIF was a 500 internal_error (Pillow raised TypeError,
    IndexError): a client's bad file counted as the server's fault."""
    settings, files, refused = ServeSettings(), damaged_image_files(), set()
    for name, data in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a file that still decodes may warn (EXIF, frames)
                decode_upload(data, settings)
        except Exception as error:
            assert as_serve_error(error, None).code == "bad_image", f"{name}: {type(error).__name__}: {error}"
            refused.add(name)
    # Most are refused (the damage is real; a decode_upload that took every file would pass the loop above), and
    # some of every format (each format's parser was reached, none waved through whole).
    assert len(refused) > len(files) // 2, f"{len(refused)} of {len(files)} damaged uploads refused"
    assert {name.split()[0] for name in refused} == {name.split()[0] for name, _ in files}


def test_an_upload_in_a_format_outside_the_served_ones_is_refused_unopened():
    """Every format Pillow knows was opened: EPS by running Ghostscript on the upload's PostScript."""
    eps, bmp = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8)).save(eps, format="EPS")
    Image.fromarray(smooth_image(16, 16)).save(bmp, format="BMP")
    assert Image.open(io.BytesIO(eps.getvalue())).format == "EPS"  # Pillow would have opened it
    with pytest.raises(ServeError, match="not an image in a format this server reads \\(PNG, JPEG, WEBP"):
        decode_upload(eps.getvalue(), ServeSettings())
    assert decode_upload(bmp.getvalue(), ServeSettings()).pixels.shape == (16, 16, 3)  # a served one still is


def test_a_jpeg_of_over_a_hundred_scans_is_refused_before_decoding():
    """Its last scan repeated: 246 KB took 11 s of CPU to decode (every scan is a pass over the whole image). One of
    exactly a hundred is decoded (from a mutation audit: the bound could move by one unseen)."""
    progressive = io.BytesIO()
    Image.fromarray(smooth_image(16, 16)).save(progressive, format="JPEG", progressive=True)
    data = progressive.getvalue()
    last_scan = data[data.rindex(b"\xff\xda"):-2]  # up to the end-of-image marker
    assert decode_upload(data, ServeSettings()).pixels.shape == (16, 16, 3)
    at_most = data[:-2] + last_scan * (MAX_JPEG_SCANS - data.count(b"\xff\xda")) + data[-2:]
    assert at_most.count(b"\xff\xda") == MAX_JPEG_SCANS and decode_upload(at_most, ServeSettings()).pixels.shape == (
        16, 16, 3)
    repeated = data[:-2] + last_scan * (MAX_JPEG_SCANS - data.count(b"\xff\xda") + 1) + data[-2:]
    with pytest.raises(ServeError, match=f"the JPEG has {MAX_JPEG_SCANS + 1} scans; this server decodes at most"):
        decode_upload(repeated, ServeSettings())


def test_a_fault_before_the_edit_is_logged_as_its_500_says(pipe, monkeypatch, caplog):
    """The 500's message sends the operator to the server log: a fault outside the model thread was not there."""
    def broken_decoder(data, settings):
        raise RuntimeError("a bug in the upload's decoding")

    monkeypatch.setattr("zone_engine.serving.app.decode_upload", broken_decoder)
    with serving(pipe) as (base, _):
        response = post_edit(base, smooth_image(64, 64))
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    request_id = response.json()["request_id"]
    logged = [record for record in caplog.records if "failed before its edit" in record.getMessage()]
    assert len(logged) == 1 and request_id in logged[0].getMessage() and logged[0].exc_info is not None


def test_an_upload_the_servers_temporary_folder_cannot_hold_is_a_logged_500_not_the_clients_fault(
        pipe, monkeypatch, tmp_path, caplog):
    """Starlette keeps an upload over 1 MiB in a file of the temporary folder while it arrives: that folder full (a
    small tmpfs on an edge box) was a 400 bad_request, "send multipart/form-data", counted against the client and
    logged nowhere."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "a_file"))  # no file can be made there, as on a full disk
    with serving(pipe) as (base, service):
        response = post_edit(base, b"\x89PNG" + bytes(2**20 + 1))
        metrics = httpx.get(f"{base}/metrics").text
    error = response.json()["error"]
    assert response.status_code == 500 and error["code"] == "server_error", response.text
    assert "could not store the upload (Not a directory)" in error["message"]
    assert metric(metrics, 'zone_requests_total{outcome="error"}') == 1
    assert metric(metrics, 'zone_requests_total{outcome="bad_request"}') == 0
    logged = [record for record in caplog.records if "could not be stored" in record.getMessage()]
    assert len(logged) == 1 and response.json()["request_id"] in logged[0].getMessage()


def test_a_timeout_error_inside_the_engine_is_a_500_not_the_requests_timeout(pipe):
    with serving(FailingPipeline(pipe, TimeoutError("a lock inside the engine")), timeout_s=60) as (base, _):
        response = post_edit(base, smooth_image(64, 64))
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"


def test_a_failed_load_fails_liveness_and_every_edit_says_why():
    def missing_weights():
        raise CheckpointError("InstructPix2Pix weights not found at 'ip2p/'")

    service = LocalEditService(missing_weights, ServeSettings(warmup=False))
    with serving_service(service) as (base, _):
        wait_until(lambda: service.load_error is not None, 60)
        for response in (httpx.get(f"{base}/healthz"), httpx.get(f"{base}/readyz"), post_edit(base, b"x")):
            assert response.status_code == 503 and "weights not found" in response.json()["error"]["message"]
            assert "retry-after" not in response.headers  # retrying cannot mend missing weights


def out_of_memory_in_decoding(monkeypatch, failing: set[int]) -> None:
    """The VAE decoder's calls numbered in `failing` (from 1) raise CUDA's out-of-memory error."""
    from zone_engine import pipeline

    real_decode, calls = pipeline.decode_latents, []

    def decode_latents(*args, **kwargs):
        calls.append(1)
        if len(calls) in failing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_latents", decode_latents)


def test_a_warm_up_out_of_gpu_memory_names_its_batch_and_the_server_stays_up_not_ready(pipe, monkeypatch):
    """Said as "loading the models failed: out of GPU memory in finish": the models had loaded, and the operator was
    not told that the warm-up's shape (--warmup-size, --max-batch) was what did not fit. Liveness fails too, as
    for any failed start: a restart may find the GPU's memory free."""
    out_of_memory_in_decoding(monkeypatch, {2})  # the sample edit passes; the --warmup-size batch does not
    service = LocalEditService(lambda: pipe, ServeSettings(warmup=True, warmup_sizes=((64, 96),), max_batch=1))
    with serving_service(service) as (base, _):
        wait_until(lambda: service.load_error is not None, 120)
        for response in (httpx.get(f"{base}/healthz"), httpx.get(f"{base}/readyz"), post_edit(base, b"x")):
            message = response.json()["error"]["message"]
            assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
            assert message.startswith("loading the models failed: warming up with a batch of 1 at 64x96: out of GPU "
                                      "memory in finish (CUDA out of memory. Tried to allocate 2.00 GiB)"), message
            assert "--warmup-size" in message
    assert not service.ready


def test_an_edit_out_of_gpu_memory_leaves_the_server_ready_and_is_counted(pipe, monkeypatch, caplog):
    """Out of memory is the moment's (a large batch, another process on the GPU), not the server's state: logged
    in a line, not a traceback each (under memory pressure those flooded the log)."""
    out_of_memory_in_decoding(monkeypatch, {1})
    with caplog.at_level("WARNING", logger="zone_engine"), serving(pipe) as (base, _):
        refused = post_edit(base, smooth_image(64, 64))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "out_of_memory"
        assert refused.headers["Retry-After"] == "5"
        assert httpx.get(f"{base}/readyz").status_code == httpx.get(f"{base}/healthz").status_code == 200
        assert post_edit(base, smooth_image(64, 64)).status_code == 200
        text = httpx.get(f"{base}/metrics").text
    assert metric(text, 'zone_requests_total{outcome="out_of_memory"}') == 1
    assert metric(text, 'zone_requests_total{outcome="ok"}') == 1
    assert metric(text, 'zone_requests_total{outcome="error"}') == 0
    said = [record for record in caplog.records if "out of GPU memory" in record.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING" and said[0].exc_info is None
    assert said[0].getMessage().startswith("an edit ran out of GPU memory (answered 503 out_of_memory): out of GPU "
                                           "memory in finish (CUDA out of memory.")


def test_a_pipeline_whose_own_default_steps_pass_max_steps_fails_to_load(pipe):
    """Requests that ask for no steps get the pipeline's default: above --max-steps, refused at load, not run."""
    service = LocalEditService(lambda: pipe, ServeSettings(max_steps=STEPS - 1, warmup=False))
    said = rf"default --steps {STEPS} \(steps={STEPS}\) is above --max-steps {STEPS - 1}"
    with pytest.raises(ConfigError, match=said):
        service.load()


def test_a_dead_batching_worker_fails_readiness_and_liveness_so_the_server_is_restarted(pipe):
    with serving(pipe) as (base, service):
        service.batcher.run_batch = lambda requests: []  # one outcome short: a bug that kills the worker
        assert post_edit(base, smooth_image(64, 64)).status_code == 503
        for probe in ("readyz", "healthz"):
            response = httpx.get(f"{base}/{probe}")
            assert response.status_code == 503 and response.json()["error"]["message"] == WORKER_STOPPED


def test_a_sane_request_id_is_kept_and_any_other_replaced():
    """A caller's X-Request-Id joins its logs across proxies; one that could forge log lines (spaces, newlines)
    or bloat them is replaced by a fresh one."""

    with local_client() as client:
        for given, kept in (("trace-1.a:b_C", True), ("x" * 128, True), ("x" * 129, False), ("a b", False),
                            ("", False)):
            answer = client.get("/nowhere", headers={"X-Request-Id": given})
            request_id = answer.json()["request_id"]
            assert answer.headers["X-Request-Id"] == request_id
            assert (request_id == given) == kept and (kept or re.fullmatch("[0-9a-f]{32}", request_id)), given


# ---------------------------------------------------------------------------------------- the batcher


def run_batcher(coroutine_factory):
    return asyncio.run(coroutine_factory())


def test_batcher_buckets_by_key_respects_max_batch_and_keeps_order():
    calls: list[list[str]] = []

    def run_batch(requests):
        calls.append([r.instruction for r in requests])
        return [f"done {r.instruction}" for r in requests]

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch=2, max_wait_s=0.2, queue_size=10)
        batcher.start()
        keys = ["a", "b", "a", "a", "b"]
        results = await asyncio.gather(*(
            batcher.submit(EditRequest(None, f"{key}{i}"), key) for i, key in enumerate(keys)
        ))
        await batcher.close()
        return results

    results = run_batcher(scenario)
    assert results == ["done a0", "done b1", "done a2", "done a3", "done b4"]
    assert sorted(calls) == [["a0", "a2"], ["a3"], ["b1", "b4"]]


def held_first_batch(calls: list[str]):
    """A batcher's run_batch that records the instructions it runs and holds the first batch ("first") until
    `release` is set; `started` says it is running."""
    started, release = threading.Event(), threading.Event()

    def run_batch(requests):
        calls.extend(r.instruction for r in requests)
        if requests[0].instruction == "first":
            started.set()
            assert release.wait(10)
        return ["ok"] * len(requests)

    return run_batch, started, release


async def batcher_running_first(run_batch, started: threading.Event, **options):
    """A started DynamicBatcher of one edit a batch, none waited for, running its held batch "first" (see
    held_first_batch); returns it and the first edit's future."""
    batcher = DynamicBatcher(run_batch, max_batch=1, max_wait_s=0, **options)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(EditRequest(None, "first"), "k"))
    await asyncio.get_running_loop().run_in_executor(None, started.wait)
    return batcher, first


def test_batcher_survives_a_runner_that_raises_and_frees_a_withdrawn_edits_slot():
    """From a mutation audit: without its guard a raising run_batch killed the worker (every later edit a 503
    until a restart); a caller that gave up while queued kept its queue slot and still reached the model."""
    calls: list[str] = []

    def run_batch(requests):
        calls.extend(r.instruction for r in requests)
        if requests[0].instruction == "boom":
            raise RuntimeError("the runner failed")
        return [f"done {r.instruction}" for r in requests]

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch=1, max_wait_s=0, queue_size=10)
        batcher.start()
        with pytest.raises(RuntimeError, match="the runner failed"):
            await batcher.submit(EditRequest(None, "boom"), "a")
        assert batcher.healthy and await batcher.submit(EditRequest(None, "next"), "a") == "done next"
        gone = EditRequest(None, "gone", cancel=threading.Event())
        waiting = asyncio.ensure_future(batcher.submit(gone, "b"))
        await asyncio.sleep(0)  # queued (the worker is not past its wait yet), then given up
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        queued_after = batcher.queued
        await batcher.close()
        return queued_after, gone

    queued_after, gone = run_batcher(scenario)
    assert queued_after == 0 and gone.cancelled()  # out of the queue, or its work stopped


def test_an_edit_withdrawn_behind_a_running_batch_frees_its_queue_slot_at_once():
    """From a mutation audit: a caller that gave up while queued behind a running batch could keep counting in
    the queue (refusing others QueueFull) and in zone_queue_depth until the worker reached it."""
    calls: list[str] = []
    run_batch, started, release = held_first_batch(calls)
    metrics = ServeMetrics()

    async def scenario():
        batcher, first = await batcher_running_first(run_batch, started, queue_size=1, metrics=metrics)
        gone = asyncio.ensure_future(batcher.submit(EditRequest(None, "gone"), "k"))
        await asyncio.sleep(0.05)
        assert batcher.queued == 1
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        freed = batcher.queued, metrics.registry.get_sample_value("zone_queue_depth")
        after = asyncio.ensure_future(batcher.submit(EditRequest(None, "after"), "k"))  # the slot is free
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, after)
        await batcher.close()
        return freed

    assert run_batcher(scenario) == (0, 0)
    assert calls == ["first", "after"]


def test_batcher_serves_the_bucket_whose_oldest_request_waited_longest():
    calls: list[str] = []
    run_batch, started, release = held_first_batch(calls)

    async def scenario():
        batcher, first = await batcher_running_first(run_batch, started, queue_size=10)
        queued = []
        for name, key in (("a1", "a"), ("b1", "b"), ("a2", "a")):  # queued in this order while "first" runs
            queued.append(asyncio.ensure_future(batcher.submit(EditRequest(None, name), key)))
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(first, *queued)
        await batcher.close()

    run_batcher(scenario)
    assert calls == ["first", "a1", "b1", "a2"]


def test_batcher_close_rejects_queued_jobs_and_finishes_the_running_one():
    run_batch, started, release = held_first_batch([])
    metrics = ServeMetrics()

    async def scenario():
        batcher, running = await batcher_running_first(run_batch, started, queue_size=10, metrics=metrics)
        waiting = asyncio.ensure_future(batcher.submit(EditRequest(None, "second"), "k"))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        release.set()
        await closing
        with pytest.raises(ShuttingDown):
            await batcher.submit(EditRequest(None, "late"), "k")
        return await running, await asyncio.gather(waiting, return_exceptions=True)

    first, (second,) = run_batcher(scenario)
    assert first == "ok" and isinstance(second, ShuttingDown)
    assert metrics.registry.get_sample_value("zone_queue_depth") == 0  # what was queued was answered


def test_an_abandoned_batch_is_answered_at_once_and_close_does_not_wait_for_its_work():
    """A forced quit: the running edit hears ShuttingDown and `close` returns while its work still runs (from a
    mutation audit: close waiting for the abandoned batch, and a second abandon failing the answered edits again,
    InvalidStateError out of the server's shutdown, went unseen)."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def run_batch(requests):
        started.set()
        release.wait(10)
        finished.set()
        return ["ok"] * len(requests)

    async def scenario():
        batcher, running = await batcher_running_first(run_batch, started, queue_size=10)
        batcher.abandon()
        batcher.abandon()  # again, harmless: a forced quit's watch and ZoneServer.shutdown both abandon
        await batcher.close()
        return finished.is_set(), (await asyncio.gather(running, return_exceptions=True))[0]

    try:
        finished_before_close, outcome = run_batcher(scenario)
    finally:
        release.set()
    assert not finished_before_close and isinstance(outcome, ShuttingDown)


class ManualClock:
    """A batcher clock the test moves, for exact batch and queue times."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_batcher_metrics_show_the_running_batch_and_each_edits_queue_wait():
    clock, metrics = ManualClock(), ServeMetrics()
    run_batch, started, release = held_first_batch([])
    sample = metrics.registry.get_sample_value

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch=2, max_wait_s=3600, queue_size=10, metrics=metrics, clock=clock)
        batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit(EditRequest(None, name), "k")) for name in ("first", "second")]
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        clock.now = 1.0  # queued at 1 s: a wait is from then, not from the clock's zero
        jobs += [asyncio.ensure_future(batcher.submit(EditRequest(None, f"w{i}"), "k")) for i in range(4)]
        await asyncio.sleep(0)  # queued behind the running batch
        during = sample("zone_running"), sample("zone_queue_depth")
        clock.now = 8.0  # the four waited 7 s
        release.set()
        await asyncio.gather(*jobs)
        await batcher.close()
        return during

    assert run_batcher(scenario) == (2, 4)
    assert sample("zone_running") == sample("zone_queue_depth") == 0
    assert (sample("zone_queue_wait_seconds_count"), sample("zone_queue_wait_seconds_sum")) == (6, 4 * 7.0)
    assert (sample("zone_batch_size_count"), sample("zone_batch_size_sum")) == (3, 6)


def test_every_pipeline_stage_is_observed_with_its_own_seconds():
    """From a mutation audit: one stage's count alone was pinned (refine), never the seconds observed, so a stage
    left out or another's time recorded passed; a timing that is no stage (the total) is not one."""
    metrics = ServeMetrics()
    metrics.observe_stages({**{stage: 0.25 * (i + 1) for i, stage in enumerate(STAGES)}, "total": 99.0})
    sample = metrics.registry.get_sample_value
    assert [sample("zone_stage_seconds_sum", {"stage": stage}) for stage in STAGES] == [
        0.25 * (i + 1) for i in range(len(STAGES))]
    assert sample("zone_stage_seconds_count", {"stage": "total"}) is None


def test_retry_after_is_the_batches_ahead_times_a_batchs_time_or_the_running_ones_if_longer():
    """Batches ahead: the queued ones (3 edits, 2 a batch: 1.5, not rounded down) and the running one; a batch's
    time: a moving average (0.8 old, 0.2 new) of the batches run, or the running batch's time so far when longer;
    at least 1 s, before any batch has run too. An idle batcher's estimate does not grow with the time since its
    last batch (from a mutation audit: none ran, so no running batch's time counts)."""
    clock = ManualClock()
    started, release = threading.Event(), threading.Event()

    def run_batch(requests):
        if requests[0].instruction == "timed":
            clock.now += 10.0  # the first batch takes 10 s
        elif requests[0].instruction == "held":
            started.set()
            assert release.wait(10)
        return ["ok"] * len(requests)

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch=2, max_wait_s=0, queue_size=10, clock=clock)
        batcher.start()
        estimates = [batcher.retry_after_s()]  # nothing run yet, nothing queued: 1 s, not 0
        await batcher.submit(EditRequest(None, "timed"), "k")
        jobs = [asyncio.ensure_future(batcher.submit(EditRequest(None, "held"), "k"))]
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        jobs += [asyncio.ensure_future(batcher.submit(EditRequest(None, f"q{i}"), "k")) for i in range(3)]
        await asyncio.sleep(0)
        estimates.append(batcher.retry_after_s())  # 2.5 batches x 10 s
        clock.now += 40.0
        estimates.append(batcher.retry_after_s())  # the running batch has run 40 s: 2.5 x 40 s
        release.set()
        await asyncio.gather(*jobs)  # batches of 40, 0 and 0 s: 0.8 x (0.8 x (0.8 x 10 + 0.2 x 40)) = 10.24 s
        estimates.append(batcher.retry_after_s())
        clock.now += 100.0  # idle since
        estimates.append(batcher.retry_after_s())
        await batcher.close()
        return estimates

    assert run_batcher(scenario) == [1, 25, 100, 11, 11]


def test_retry_after_counts_the_uploads_being_decoded_among_the_edits_ahead():
    """They fill the queue (it is said full for them) and are queued next: a client refused for them was told to come
    back after one batch's time, into the same full queue (a burst of 12 against --queue-size 4: 41 s where the
    edits ahead took 91 s)."""
    service = LocalEditService(lambda: None, ServeSettings(warmup=False, max_batch=2, queue_size=4))
    service.batcher._batch_seconds = 10.0  # as if the batches run so far took 10 s
    service.decoding = 4
    with pytest.raises(QueueFull) as refused:
        service.check_room()
    assert refused.value.retry_after_s == 30  # 4 uploads in 2 batches, and the one running: 3 x 10 s
    # 2 queued and 2 decoding: each counted once (from a mutation audit: the queued twice passed the above).
    service.batcher._buckets["k"] = deque([None, None])
    service.decoding = 2
    with pytest.raises(QueueFull) as refused:
        service.check_room()
    assert refused.value.retry_after_s == 30


def test_a_full_bucket_starts_at_once_and_a_lone_edit_when_its_wait_is_up():
    sizes: list[int] = []

    def run_batch(requests):
        sizes.append(len(requests))
        return ["ok"] * len(requests)

    async def scenario():
        full = DynamicBatcher(run_batch, max_batch=2, max_wait_s=3600, queue_size=10)
        full.start()
        pair = (full.submit(EditRequest(None, name), "k") for name in "ab")
        await asyncio.wait_for(asyncio.gather(*pair), 30)  # not the hour its oldest may wait
        await full.close()
        lone = DynamicBatcher(run_batch, max_batch=4, max_wait_s=0.05, queue_size=10)
        lone.start()
        await asyncio.wait_for(lone.submit(EditRequest(None, "c"), "k"), 30)
        await lone.close()

    run_batcher(scenario)
    assert sizes == [2, 1]


def test_batcher_refuses_beyond_its_queue_bound_and_before_it_starts():
    """Before `start` there is no worker to run an edit: ShuttingDown, nothing queued (from a mutation audit)."""
    release = threading.Event()

    async def scenario():
        batcher = DynamicBatcher(lambda rs: [release.wait(10)] * len(rs), max_batch=1, max_wait_s=0, queue_size=1)
        with pytest.raises(ShuttingDown):
            await batcher.submit(EditRequest(None, "early"), "k")
        assert batcher.queued == 0
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(EditRequest(None, "1"), "k"))
        await asyncio.sleep(0.05)  # the first is running, so the queue is empty again
        second = asyncio.ensure_future(batcher.submit(EditRequest(None, "2"), "k"))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit(EditRequest(None, "3"), "k")
        release.set()
        results = await asyncio.gather(first, second)
        await batcher.close()
        return results

    assert run_batcher(scenario) == [True, True]


def test_a_worker_that_dies_delivering_a_batch_fails_that_batch_at_once():
    """Not left to their timeout: the running batch's requests learn it with the queued ones."""
    async def scenario():
        batcher = DynamicBatcher(lambda rs: [], max_batch=1, max_wait_s=0, queue_size=10)  # a wrong count: a bug
        batcher.start()
        outcome = await asyncio.wait_for(asyncio.gather(batcher.submit(EditRequest(None, "a"), "k"),
                                                        return_exceptions=True), 30)
        assert not batcher.healthy
        await batcher.close()
        return outcome[0]

    assert isinstance(run_batcher(scenario), ShuttingDown)


def test_an_edit_raising_stop_iteration_fails_alone_and_the_worker_goes_on():
    async def scenario():
        batcher = DynamicBatcher(lambda rs: [StopIteration() if r.instruction == "a" else "ok" for r in rs],
                                 max_batch=1, max_wait_s=0, queue_size=10)
        batcher.start()
        first = await asyncio.gather(batcher.submit(EditRequest(None, "a"), "k"), return_exceptions=True)
        second = await batcher.submit(EditRequest(None, "b"), "k")
        healthy = batcher.healthy
        await batcher.close()
        return first[0], second, healthy

    first, second, healthy = run_batcher(scenario)
    assert isinstance(first, RuntimeError) and "StopIteration" in str(first) and second == "ok" and healthy


def test_a_worker_that_dies_fails_waiting_and_new_jobs_at_once():
    async def scenario():
        batcher = DynamicBatcher(lambda rs: ["ok"] * len(rs), max_batch=2, max_wait_s=5, queue_size=10)

        def broken_take(key):
            raise RuntimeError("a bug in the worker")

        batcher._take = broken_take
        batcher.start()
        waiting = asyncio.ensure_future(batcher.submit(EditRequest(None, "a"), "k"))
        outcome = (await asyncio.gather(asyncio.wait_for(waiting, 30), return_exceptions=True))[0]
        assert not batcher.healthy
        with pytest.raises(ShuttingDown):
            await batcher.submit(EditRequest(None, "b"), "k")
        await batcher.close()
        return outcome

    assert isinstance(run_batcher(scenario), ShuttingDown)


def test_no_temporary_folder_is_warned_at_start(tmp_path, monkeypatch, caplog):
    """Uploads over 1 MiB are kept in a temporary file as they arrive: with none writable (a read-only filesystem,
    TMPDIR unset) the server started and said ready, then answered each such upload 500, with nothing said before."""
    from zone_engine.serving.app import check_start_environment

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr("tempfile.tempdir", None)  # looked for again, among these folders only: none writable
    monkeypatch.setattr("tempfile._candidate_tempdir_list", lambda: [str(tmp_path / "a_file")])
    check_start_environment(ServeSettings())  # what the single process and each Ray replica run as they start
    assert "No usable temporary directory found in" in caplog.text
    assert "uploads over 1 MiB, which are kept in a temporary file as they arrive, will be answered 500" in caplog.text
    assert "set TMPDIR to a folder you can write" in caplog.text
