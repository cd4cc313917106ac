"""The HTTP edit service: FastAPI routes over one `EditService` (pipeline + batcher + metrics).

The routes reach the service through `request.app.state.service`, so the same app serves in one
process (`create_app`, uvicorn) and inside each Ray Serve replica (ray_serve.py), which installs its
own service. Errors are JSON `{"error": {"code", "message"}, "request_id"}` with the right status.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import copy
import dataclasses
import io
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

import numpy as np
import uvicorn
import uvicorn.config
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile as StarletteUploadFile  # what a form holds (FastAPI's subclasses it)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import parse_options_header  # as Starlette reads the form's charset
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from .. import __version__
from ..config import DECIMAL_INTEGER, MAX_SEED, SAMPLE_INSTRUCTION, Action, EditConfig, parse_action
from ..dual_step import padded_batch
from ..errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    EditCancelled,
    EditWarning,
    InputImageError,
    InstructionError,
    OutOfDeviceMemory,
    ZoneError,
    first_line,
)
from ..image_io import (
    UNREADABLE_IMAGE,
    decompression_bomb_pixels,
    encoded,
    icc_profile_of,
    make_sample_image,
    read_image,
)
from ..instruction import check_instruction
from ..pipeline import STAGES, BatchKey, EditRequest, EditResult, ZonePipeline, batch_key
from ..streams import in_colour
from .batcher import DynamicBatcher, QueueFull, ShuttingDown
from .metrics import ServeMetrics
from .settings import ServeSettings, dns_name, is_host_name

log = logging.getLogger("zone_engine.serving")
REPLICA = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (several under Ray)


# ---------------------------------------------------------------------------------------- errors


class EditTimedOut(Exception):
    """An edit that did not finish within the request timeout (its work was cancelled)."""


class ServeError(Exception):
    """A request that gets an error answer: HTTP status, a stable code, a message saying what to do."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(error: ServeError, request_id: str) -> JSONResponse:
    body = {"error": {"code": error.code, "message": error.message}, "request_id": request_id}
    headers = {**error.headers, "X-Request-Id": request_id}
    return JSONResponse(body, status_code=error.status, headers=headers)


# Setup problems of the server (a checkpoint or export that fails to load at the first edit, a device
# or TensorRT fault), never of the request: a 500, logged, not a 4xx blaming the client.
SERVER_SIDE = (CheckpointError, DeviceError)


def as_serve_error(error: BaseException, service: EditService) -> ServeError:
    """What the client is told about an edit that did not succeed."""
    if isinstance(error, ServeError):
        return error
    if isinstance(error, QueueFull):
        return ServeError(503, "queue_full", str(error), {"Retry-After": str(error.retry_after_s)})
    if isinstance(error, ShuttingDown):
        return ServeError(503, "unavailable", str(error), {"Retry-After": "5"})
    if isinstance(error, EditTimedOut):
        return ServeError(504, "timeout", f"the edit did not finish within {service.settings.timeout_s:g} s of its "
                          "upload (decoding and queueing included); it was cancelled. Retry later or with fewer steps")
    if isinstance(error, EditCancelled):
        return ServeError(503, "cancelled", str(error), {"Retry-After": "5"})
    if isinstance(error, InputImageError):
        return ServeError(400, "bad_image", str(error))
    if isinstance(error, OutOfDeviceMemory):  # the GPU's memory at that moment (a large batch, another process)
        return ServeError(503, "out_of_memory", str(error), {"Retry-After": "5"})
    if isinstance(error, InstructionError | ConfigError):
        return ServeError(422, "invalid_request", str(error))
    if isinstance(error, SERVER_SIDE):
        return ServeError(500, "server_error", f"the server cannot run this edit: {error}")
    if isinstance(error, ZoneError):
        return ServeError(400, "bad_request", str(error))
    return ServeError(500, "internal_error", "the edit failed inside the engine; the server log has the details")


OUTCOME_BY_STATUS = {503: "queue_full", 504: "timeout", 500: "error"}


def outcome_of(error: ServeError) -> str:
    if error.code in ("unavailable", "cancelled", "out_of_memory"):
        return error.code
    if error.code == "client_closed_request":  # not the client's mistake: it gave up (its load balancer did)
        return "cancelled"
    return OUTCOME_BY_STATUS.get(error.status, "bad_request")


# ---------------------------------------------------------------------------------------- service


def warmup_batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a padding denoiser runs for batches of 1..max_batch."""
    return sorted({padded_batch(edits) for edits in range(1, max_batch + 1)})


GIB = 1 << 30


def models_memory_line(pipeline: ZonePipeline) -> str:
    """The loaded models' weights and, on CUDA, the GPU's memory left: the server picks no precision or batch size
    by the card, so on a small or shared GPU this line says what room its defaults leave (README: GPU memory)."""
    import torch

    dtype = str(pipeline.dtype).removeprefix("torch.")
    sam = "" if pipeline.models.sam is None else ", SAM in float32"  # None: an exported SAM, on ONNX Runtime
    weights = pipeline.models.weight_bytes() / GIB
    line = f"models loaded on {pipeline.device} (diffusion models in {dtype}{sam}): {weights:.2f} GiB of weights"
    if pipeline.device.type != "cuda":
        return line
    free, total = torch.cuda.mem_get_info(pipeline.device)  # the device's: other processes' memory counted
    return f"{line}; {free / GIB:.1f} GiB of the GPU's {total / GIB:.1f} GiB free"


class EditService:
    """One model instance behind the routes: loads and warms the pipeline, runs edits in batches.

    Subclasses choose how requests are gathered into batches (`submit`): `LocalEditService` with
    this package's `DynamicBatcher`, the Ray Serve replica with `@serve.batch`.
    """

    def __init__(self, build_pipeline: Callable[[], ZonePipeline], settings: ServeSettings) -> None:
        self.build_pipeline, self.settings = build_pipeline, settings
        self.metrics = ServeMetrics()
        self.pipeline: ZonePipeline | None = None
        self.ready = self.stopping = False
        self.load_error: str | None = None
        self.starting = "the models are still loading"  # what `load` is doing, said by /readyz until ready
        # Decoding an upload and encoding an answer take CPU and memory (a 25 MP image: seconds, and 0.3 GB):
        # at most `image_threads` at once, and uploads being decoded hold their place in the queue.
        self.image_threads = asyncio.Semaphore(settings.image_threads)
        self.decoding = 0
        self.warmup_cancel = threading.Event()  # set on stopping: the warm-up's batches end at their next step
        # Each edit's notes go back with its request and its log line: the process-wide warnings could not say
        # whose they are.
        warnings.filterwarnings("ignore", category=EditWarning)

    @property
    def not_ready_because(self) -> str | None:
        """Why edits are not taken now (loading failed, shutting down, still loading or warming up), or None when
        they are."""
        if self.load_failure:
            return self.load_failure
        if self.stopping:
            return "the server is shutting down; retry (another replica will answer)"
        return None if self.ready else f"{self.starting}; retry shortly"

    def load(self) -> None:
        """Build the pipeline and run one warm-up edit (first-call costs: allocations, compilation),
        then, at each of `warmup_sizes`, one batch of every size the denoiser pads batches to. Stopping the
        server ends the warm-up at the running batch's next step (else SIGTERM would wait for all of it)."""
        self.pipeline = self.build_pipeline()
        if isinstance(self.pipeline, ZonePipeline):  # a stand-in (the tests') has no models to count
            log.info("%s", models_memory_line(self.pipeline))
        self.settings.check_default_steps(self.edit_config().steps)  # the pipeline's own default, if not the server's
        first = (make_sample_image(128, 128), self.edit_config().replace(steps=2), 1)
        batches = [first] if self.settings.warmup else []
        batches += [(make_sample_image(height, width), self.edit_config(), batch)
                    for height, width in self.settings.warmup_sizes
                    for batch in warmup_batch_sizes(self.settings.max_batch)]
        for number, (image, config, batch) in enumerate(batches, 1):
            log.info("warming up at %dx%d, batch of %d", *image.shape[:2], batch)
            self.starting = (f"the models are loaded and warming up ({number} of {len(batches)}: a batch of {batch} "
                             f"at {image.shape[0]}x{image.shape[1]})")
            request = EditRequest(image, SAMPLE_INSTRUCTION, config, cancel=self.warmup_cancel)
            try:
                self.pipeline.edit_batch([request] * batch)
            except EditCancelled:
                log.info("warm-up cut short: the server is stopping")
                return
            except OutOfDeviceMemory as error:  # this batch's size, not the models, may be what does not fit
                raise OutOfDeviceMemory(f"warming up with a batch of {batch} at {image.shape[0]}x{image.shape[1]}: "
                                        f"{error}; --max-batch and --warmup-size set the warm-up's batches") from error

    @property
    def load_failure(self) -> str | None:
        """What clients and probes are told once loading or the warm-up failed, else None."""
        return f"loading the models failed: {self.load_error}" if self.load_error else None

    def edit_config(self, changes: Mapping[str, Any] | None = None) -> EditConfig:
        """The server's settings (--steps, --seed, ...) over the pipeline's defaults, and a request's `changes` over
        those: what its edit runs with, and what its answer says it ran with."""
        return self.pipeline.default_config.replace(**dict(self.settings.edit_changes)).replace(**(changes or {}))

    def run_batch(self, requests: Sequence[EditRequest]) -> list[EditResult | Exception]:
        """Model thread: one batch through the pipeline; a failing request fails alone."""
        outcomes = self.pipeline.edit_batch(requests, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, OutOfDeviceMemory):  # the moment's memory, not a fault: a line, not a traceback each
                log.warning("an edit ran out of GPU memory (answered 503 out_of_memory): %s", first_line(outcome))
            elif isinstance(outcome, Exception) and (isinstance(outcome, SERVER_SIDE) or
                                                     not isinstance(outcome, ZoneError)):
                log.error("edit failed", exc_info=outcome)
        return outcomes

    @property
    def healthy(self) -> bool:
        """Able to run edits: always here; LocalEditService says whether its batcher's worker is alive."""
        return True

    async def submit(self, request: EditRequest, key: BatchKey) -> Any:
        raise NotImplementedError

    def check_room(self) -> None:
        """QueueFull when the edits queued and the uploads being decoded fill the queue: said before an upload is
        read or decoded. Here nothing: Ray Serve bounds its own queue (and a replica's requests under way)."""

    async def in_image_thread(self, work: Callable[..., Any], *args: Any) -> Any:
        """`work(*args)` in a thread once one of the `image_threads` is free. A caller that stops waiting leaves
        the work to finish (a thread cannot be stopped), holding its image thread until then."""
        await self.image_threads.acquire()
        running = asyncio.ensure_future(asyncio.to_thread(work, *args))
        running.add_done_callback(self._image_work_done)
        return await asyncio.shield(running)

    def _image_work_done(self, running: asyncio.Future) -> None:
        self.image_threads.release()
        if not running.cancelled():
            running.exception()  # retrieved: whoever asked may have stopped waiting (timed out, gone)

    async def decode(self, data: bytes, deadline: float) -> Upload:
        """The upload decoded (`decode_upload`) by `deadline` (the event loop's time), its place in the queue
        held meanwhile; else EditTimedOut."""
        self.check_room()
        self.decoding += 1
        try:
            return await asyncio.wait_for(self.in_image_thread(decode_upload, data, self.settings),
                                          deadline - asyncio.get_running_loop().time())
        except asyncio.TimeoutError:
            raise EditTimedOut from None
        finally:
            self.decoding -= 1

    async def edit(self, image: np.ndarray, instruction: str, config: EditConfig,
                   deadline: float | None = None) -> EditResult:
        """One edit with `config` (a request's: `edit_config(changes)`), done by `deadline` (the event loop's time;
        default: the request timeout from now); else its work is cancelled and EditTimedOut raised."""
        loop = asyncio.get_running_loop()
        timeout_s = self.settings.timeout_s if deadline is None else deadline - loop.time()
        request = EditRequest(image, instruction, config, cancel=threading.Event())

        async def submitted() -> Any:  # the edit's own failure as its outcome: a TimeoutError below is the wait's
            try:
                return await self.submit(request, batch_key(image.shape[:2], config))
            except Exception as error:
                return error

        try:
            outcome = await asyncio.wait_for(submitted(), timeout_s)
        except BaseException as error:  # timed out, or the handler cancelled (the client went away): stop its work
            request.cancel.set()
            if isinstance(error, asyncio.TimeoutError):
                raise EditTimedOut from None
            raise
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class LocalEditService(EditService):
    """The single-process service: `DynamicBatcher` and one model thread."""

    def __init__(self, build_pipeline: Callable[[], ZonePipeline], settings: ServeSettings) -> None:
        settings.check_local_batching()
        super().__init__(build_pipeline, settings)
        self.batcher = DynamicBatcher(
            self.run_batch, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
            queue_size=settings.queue_size, metrics=self.metrics,
        )

    async def start(self) -> None:
        """Start batching, load and warm up in the model thread, then be ready (or record why not)."""
        check_start_environment(self.settings)
        self.batcher.start()
        try:
            await self.batcher.run_in_model_thread(self.load)
        except Exception as error:
            self.load_error = str(error) if isinstance(error, ZoneError) else f"{type(error).__name__}: {error}"
            log.exception("loading the models failed; /readyz stays 503")
            return
        if self.stopping:  # asked to stop while loading: never ready
            return
        self.ready = True
        log.info("zone service ready")

    async def stop(self) -> None:
        """Shutting down: not ready, no more edits, the queued ones answered 503; the running batch goes on
        (a warm-up batch ends at its next step)."""
        self.ready, self.stopping = False, True
        self.warmup_cancel.set()
        await self.batcher.stop()

    async def close(self) -> None:
        self.ready = False
        await self.batcher.close()

    @property
    def healthy(self) -> bool:
        return self.batcher.healthy

    async def submit(self, request: EditRequest, key: BatchKey) -> Any:
        return await self.batcher.submit(request, key)

    def check_room(self) -> None:
        if self.batcher.queued + self.decoding >= self.settings.queue_size:
            raise QueueFull(self.batcher.retry_after_s(arriving=self.decoding))


# Descriptors an edit the server holds may take: its connection, and its upload's temporary file (Starlette keeps
# one over 1 MiB on disk while the form is open).
FILES_PER_EDIT = 2
# Beyond those and the ones open at start: probes, refused requests' and idle keep-alive connections, files the
# libraries open as they go.
SPARE_FILES = 64


def open_files_needed(settings: ServeSettings) -> int:
    """File descriptors the server may hold at once: those open now, each edit it holds (queued, the running batch,
    and the batch before it whose answers are being sent) times FILES_PER_EDIT, and SPARE_FILES."""
    held = settings.queue_size + 2 * settings.max_batch
    return _open_files_now() + FILES_PER_EDIT * held + SPARE_FILES


def _open_files_now() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):  # Linux's, and macOS's (the listing's own counted: one spare)
        with contextlib.suppress(OSError):
            return len(os.listdir(folder))
    return 0  # nowhere to count them: SPARE_FILES stands for them


def check_open_file_limit(settings: ServeSettings) -> None:
    """Raise the process's soft limit on open files to its hard one when the queue needs more than it allows
    (`open_files_needed`), else warn saying what to raise it to: past the limit uvicorn cannot accept a connection
    and clients are dropped, reset without an answer, and nothing is logged. Nothing where there is no such
    limit (Windows)."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = open_files_needed(settings)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        raised = needed if hard == resource.RLIM_INFINITY else hard  # an infinite soft one is refused (macOS)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        except (ValueError, OSError):  # the system's own ceiling below the hard limit (macOS's kern.maxfilesperproc)
            pass
        else:
            log.info("raised the open-file limit from %d to %d (the queue of %d needs about %d)", soft, raised,
                     settings.queue_size, needed)
            return
    log.warning("the open-file limit is %d (hard limit %s) and this server needs about %d (--queue-size %d, "
                "--max-batch %d): under load, connections past the limit are dropped without an answer; raise it "
                "before starting, e.g. `ulimit -n %d` (above the hard limit: as root, or LimitNOFILE= in a systemd "
                "unit, --ulimit nofile= in docker run), or lower --queue-size", soft,
                "unlimited" if hard == resource.RLIM_INFINITY else hard, needed, settings.queue_size,
                settings.max_batch, needed)


def check_start_environment(settings: ServeSettings) -> None:
    """What a server process checks of its environment as it starts (the single process, each Ray replica): the
    open-file limit its queue needs, and a temporary folder for the uploads."""
    check_open_file_limit(settings)
    warn_if_no_temporary_folder()


def warn_if_no_temporary_folder() -> None:
    """A warning at start where no temporary folder can be written (a read-only filesystem, TMPDIR unset): the
    server started and was ready, then answered every upload over 1 MiB 500, which Starlette keeps in a file there."""
    from ..models import check_temporary_folder

    try:
        check_temporary_folder("uploads over 1 MiB, which are kept in a temporary file as they arrive, will be "
                               "answered 500; set TMPDIR to a folder you can write (a small tmpfs will do)")
    except ConfigError as error:
        log.warning("%s", error)


# ---------------------------------------------------------------------------------------- inputs


class Upload(NamedTuple):
    pixels: np.ndarray  # uint8 RGB
    notes: tuple[str, ...]  # what was dropped or guessed (`read_image`)
    icc_profile: bytes | None  # its colour profile, given back with the edited image


# The formats an upload may be in: photos' and the web's. Pillow opens some thirty more, several with little
# hardening against hostile files, and EPS by running Ghostscript on the PostScript it holds.
# (Pillow's JPEG opener also opens cameras' multi-picture JPEGs, MPO.)
SERVED_FORMATS = ("PNG", "JPEG", "WEBP", "AVIF", "GIF", "BMP", "TIFF", "PPM")
# A progressive JPEG has about 10 scans, and each is a pass over the whole image: a file repeating its last scan
# took 11 s of CPU for 246 KB in a security review (about two hours for 20 MiB, extrapolated; RESULTS.md: ~1 ms a
# scan at 4 MP).
MAX_JPEG_SCANS = 100


def served_formats() -> tuple[str, ...]:
    """SERVED_FORMATS that this Pillow reads (AVIF is in newer builds only)."""
    Image.init()
    return tuple(name for name in SERVED_FORMATS if name in Image.OPEN)


def decode_upload(data: bytes, settings: ServeSettings) -> Upload:
    """The uploaded file as uint8 RGB, its notes and colour profile; its pixel count checked from the header
    before decoding, a JPEG's scans counted first, and only SERVED_FORMATS opened."""
    if not data:
        raise ServeError(400, "bad_image", "the image file is empty")
    if len(data) > settings.max_upload_bytes:  # a chunked upload has no Content-Length to check first
        raise ServeError(413, "upload_too_large", f"the upload is {len(data):,} bytes; this server takes at most "
                         f"{settings.max_upload_bytes:,}")
    # FF DA starts a scan; inside one, a data byte FF is followed by 00, so the count is exact (an EXIF thumbnail's
    # scans included).
    if data[:2] == b"\xff\xd8" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        raise ServeError(400, "bad_image", f"the JPEG has {scans:,} scans; this server decodes at most "
                         f"{MAX_JPEG_SCANS} (a progressive JPEG has about 10): re-encode it")
    try:
        with Image.open(io.BytesIO(data), formats=served_formats()) as header:
            pixels = header.width * header.height
            if pixels > settings.max_pixels:
                raise ServeError(413, "image_too_large", f"the image has {pixels:,} pixels "
                                 f"({header.width}x{header.height}); this server takes at most "
                                 f"{settings.max_pixels:,}: downscale it first")
            return Upload(*read_image(header, name="the uploaded image"), icc_profile_of(header))
    except UnidentifiedImageError:
        raise ServeError(400, "bad_image", "the upload is not an image in a format this server reads ("
                         f"{', '.join(served_formats())}); send a PNG, JPEG or WebP file") from None
    except Image.DecompressionBombError as error:  # Pillow's own limit, met before the header's size is read here
        pixels = decompression_bomb_pixels(error)
        counted = f"{pixels:,}" if pixels else f"more than {2 * Image.MAX_IMAGE_PIXELS:,}"
        raise ServeError(413, "image_too_large", f"the image has {counted} pixels; this server takes at most "
                         f"{settings.max_pixels:,}: downscale it first") from None
    except UNREADABLE_IMAGE as error:
        raise ServeError(400, "bad_image", f"the image data is corrupt or truncated ({first_line(error)}); "
                         "re-export it as PNG or JPEG") from None


EDIT_PATH = "/v1/edit"
LIVENESS_PATH = "/healthz"
FORM_FIELDS = ("image", "instruction", "action", "steps", "seed", "return")
OPTIONAL_FIELDS = ("action", "steps", "seed", "return")  # an empty instruction is said by FastAPI's check
INTEGER_FIELDS = ("steps", "seed")


def check_form_fields(fields: Sequence[tuple[str, object]], query: Sequence[str] = ()) -> None:
    """A 422 for a form field the endpoint does not read (a client that believes it set `guidance` would get
    the default silently), one given twice (one of them would be picked silently), an optional one given empty
    (FastAPI reads `steps=` as left out: the default, silently), an integer one written otherwise than in decimal
    digits (pydantic reads `1_0` as 10 and `10.0` as 10), or any in the query string (`/v1/edit?steps=1` would
    edit at the default steps)."""
    names = [name for name, _ in fields]
    if query:
        raise ServeError(422, "invalid_request", f"{', '.join(sorted(set(query)))}: in the query string, which this "
                         "endpoint does not read; send every field in the multipart form")
    unknown = sorted(set(names) - set(FORM_FIELDS))
    if unknown:
        raise ServeError(422, "invalid_request", f"unknown field {', '.join(unknown)}: this endpoint reads "
                         f"{', '.join(FORM_FIELDS)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ServeError(422, "invalid_request", f"{', '.join(repeated)}: given more than once; send each field once")
    empty = [name for name, value in fields if name in OPTIONAL_FIELDS and isinstance(value, str) and not value.strip()]
    if empty:
        raise ServeError(422, "invalid_request", f"{', '.join(empty)}: empty; leave a field out for the server's "
                         "default")
    loose = [f"{name} {value!r}" for name, value in fields
             if name in INTEGER_FIELDS and isinstance(value, str) and not DECIMAL_INTEGER.fullmatch(value)]
    if loose:
        raise ServeError(422, "invalid_request", f"{', '.join(loose)}: not a whole number in decimal digits")


def check_request_fields(instruction: str, action: str | None, steps: int | None, seed: int | None,
                         settings: ServeSettings) -> tuple[str, dict[str, Any]]:
    """The instruction and the EditConfig changes of one request, or a 422 naming the field."""
    if len(instruction) > settings.max_instruction_chars:
        raise ServeError(422, "invalid_request", f"instruction: {len(instruction)} characters; at most "
                         f"{settings.max_instruction_chars} are accepted (and only 77 tokens are read)")
    try:
        instruction = check_instruction(instruction)
    except InstructionError as error:
        raise ServeError(422, "invalid_request", f"instruction: {error}") from None
    changes: dict[str, Any] = {}
    if action is not None:
        try:
            changes["action"] = parse_action(action)
        except ZoneError as error:
            raise ServeError(422, "invalid_request", f"action: {error}") from None
    if steps is not None:
        if not 1 <= steps <= settings.max_steps:
            raise ServeError(422, "invalid_request", f"steps: {steps} is outside 1..{settings.max_steps}")
        changes["steps"] = steps
    if seed is not None:
        if not 0 <= seed <= MAX_SEED:  # said as the other fields are, not as EditConfig's check inside the edit
            raise ServeError(422, "invalid_request", f"seed: {seed} is outside 0..{MAX_SEED}")
        changes["seed"] = seed
    return instruction, changes


# ---------------------------------------------------------------------------------------- outputs


def png_bytes(array: np.ndarray, icc_profile: bytes | None = None) -> bytes:
    """PNG of an image or a bool mask, as `zone edit` writes it; `icc_profile`: the upload's, so the untouched
    pixels look as they did."""
    return encoded(array, "PNG", icc_profile)


def png_base64(array: np.ndarray, icc_profile: bytes | None = None) -> str:
    return base64.b64encode(png_bytes(array, icc_profile)).decode("ascii")


class EditResponse(BaseModel):
    request_id: str = Field(description="this request's id (the caller's X-Request-Id when sane, else a new one); "
                            "also in the header X-Request-Id")
    action: Literal["change", "add", "remove"] = Field(description="the action the edit used (beta follows it)")
    seed: int = Field(description="the seed the edit used (the request's, else the server's): send it to get this "
                      "edit again; also in the header X-Zone-Seed")
    steps: int = Field(description="the denoising steps the edit used; also in the header X-Zone-Steps")
    width: int = Field(description="the edited image's width in pixels (the input's)")
    height: int = Field(description="the edited image's height in pixels (the input's)")
    image: str = Field(description="the edited image, base64 PNG, the input's size")
    mask_b: str = Field(description="attention edit mask M_b, base64 PNG (white = edit)")
    mask_f: str = Field(description="SAM-refined mask M_f, base64 PNG")
    region: str = Field(description="where pixels changed (R), base64 PNG")
    used_fallback: bool = Field(description="no SAM segment overlapped M_b, so M_f = M_b")
    instruction_truncated: bool = Field(description="the instruction was longer than CLIP's 77 tokens")
    warnings: list[str] = Field(description="what the edit did not take as given: transparency dropped, frames "
                                "after the first skipped, the instruction truncated, an image under one cell of "
                                "the attention grid (a coarse region); also in the header X-Zone-Warnings")
    timings: dict[str, float] = Field(description=f"seconds per pipeline stage ({', '.join(STAGES)}), and total")


class ErrorBody(BaseModel):
    code: str = Field(description="a stable code for what went wrong (each status's description lists its codes)")
    message: str = Field(description="what went wrong and what to do, for people: its wording may change")


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str = Field(description="this request's id, also in the header X-Request-Id")


def header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OpenAPI response header."""
    return {"description": description, "schema": schema or {"type": "string"}}


def optional_field(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional form field's schema (json_schema_extra): its values' `schema`, or left out (null, never sent).
    Its checks stay the endpoint's own (check_request_fields), which say them in this API's words."""
    return {"anyOf": [schema, {"type": "null"}]}


DEFAULTS = ServeSettings()  # the limits the schema names: a server's own options may set others
ACTIONS = [action.value for action in Action]
ACTION_NAMES = ["auto", *ACTIONS]  # what parse_action takes (in any case)
REQUEST_ID_HEADER = {"X-Request-Id": header("this request's id: the caller's when it sent a sane one "
                                            "([A-Za-z0-9._:-], at most 128), else a new one; in the logs too")}
# What an edit's answer says beside its body, PNG or JSON alike (`answer`).
EDIT_HEADERS = {
    **REQUEST_ID_HEADER,
    "X-Zone-Action": header("the action the edit used", {"type": "string", "enum": ACTIONS}),
    "X-Zone-Seed": header("the seed the edit used (the request's, else the server's): send it to get this edit "
                          "again", {"type": "integer", "minimum": 0, "maximum": MAX_SEED}),
    "X-Zone-Steps": header("the denoising steps the edit used (the request's, else the server's)",
                           {"type": "integer", "minimum": 1}),
    "X-Zone-Warnings": header("only when there are any: what the edit did not take as given (the JSON's "
                              "`warnings`), joined by ' | '"),
    "X-Zone-Replica": header("which server process answered (host:pid)"),
}
# Each error status with the codes its body may hold (the JSON's `error.code`).
ERROR_STATUSES = {
    400: "bad_image: the image cannot be read (empty, not in a format served, corrupt or truncated, a JPEG of too "
         "many scans); bad_request: the body does not parse as multipart (or another "
         "fault of the request)",
    403: "origin_not_allowed: a browser page of an origin not allowed (--allow-origin)",
    413: "upload_too_large: the upload is over --max-upload-mb; image_too_large: the image is over --max-pixels",
    415: "unsupported_media_type: not multipart/form-data, or a charset whose fields are not read (punycode)",
    421: "host_not_allowed: addressed to a host name not allowed (--allow-host)",
    422: "invalid_request: a field missing, unknown, repeated, empty, out of range or not valid",
    500: "internal_error: the edit failed inside the engine; server_error: the server cannot run it (a model that "
         "fails to load, a device fault, no room to store the upload); the server log has the details",
    503: "retry later, after Retry-After seconds where it is sent. queue_full: too many edits waiting; unavailable: "
         "not ready (loading, warming up), shutting down, or its batching worker stopped (no Retry-After once loading "
         "failed: /readyz says why); cancelled: the edit was stopped before it finished; out_of_memory: the GPU's "
         "memory ran out for this edit",
    504: "timeout: the edit did not finish within --timeout-s of its upload; it was cancelled",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description,
             "headers": {**REQUEST_ID_HEADER, **({"Retry-After": header(
                 "seconds to wait before retrying", {"type": "integer", "minimum": 1})} if status == 503 else {})}}
    for status, description in ERROR_STATUSES.items()
}


# ---------------------------------------------------------------------------------------- the app

# What a browser page may read of an answer beyond the body (CORS hides other headers from its script).
EXPOSED_HEADERS = (*EDIT_HEADERS, "Retry-After")


def create_app(service: LocalEditService | None = None, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app. With `service` it also owns the service's start and close (single process):
    the models load in the background, so /healthz answers at once and /readyz once they are warm.
    Without, whoever hosts the app installs `app.state.service` (a Ray Serve replica does) and passes its
    `settings` here. Their `allow_origins` get CORS answers (preflight included); none: no CORS headers."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if service is None:
            yield
            return
        app.state.service = service
        loading = asyncio.create_task(service.start())
        try:
            yield
        finally:
            await loading
            await service.close()

    app = FastAPI(
        title="zone-engine", version=__version__, lifespan=lifespan,
        # `/v1/edit/` is a 404 naming the routes, not a bare 307 to a Location built from the client's Host header
        redirect_slashes=False,
        description="ZONE zero-shot instruction-guided local image editing as a service: only the region "
        "the instruction is about changes. Concurrent edits of one size are denoised together.",
    )
    add_routes(app)
    settings = service.settings if service is not None else settings or ServeSettings()
    app.add_middleware(HostCheck, names=settings.host_names())
    if origins := settings.allow_origins:  # outside HostCheck: its refusals readable by the allowed pages too
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "HEAD", "POST"],
                           allow_headers=["X-Request-Id"], expose_headers=list(EXPOSED_HEADERS), max_age=600)
    return app


def add_routes(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(EditAdmission)
    _add_edit_route(app)
    _add_probe_routes(app)


def _add_edit_route(app: FastAPI) -> None:
    # `model` puts EditResponse in the schema's components (a generated client's named type) for application/json.
    @app.post(EDIT_PATH, responses={200: {"model": EditResponse, "content": {"image/png": {}},
                                          "description": "the edited image (return=png) or its details (return=json)",
                                          "headers": EDIT_HEADERS},
                                    **ERROR_RESPONSES}, summary="Edit an image as an instruction says")
    async def edit(
        request: Request,
        image: Annotated[UploadFile, File(description=f"the image to edit, a file ({', '.join(SERVED_FORMATS)}), "
                                          f"at most --max-upload-mb (default {DEFAULTS.max_upload_mb:g} MiB) and "
                                          f"--max-pixels (default {DEFAULTS.max_pixels:,}) pixels")],
        instruction: Annotated[str, Form(description='what to do, e.g. "make the dog a golden statue"; at most '
                                         f"{DEFAULTS.max_instruction_chars:,} characters "
                                         "(ServeSettings.max_instruction_chars)",
                                         json_schema_extra={"minLength": 1})],
        action: Annotated[str | None, Form(description="auto: classified from the instruction (the default), or "
                                           "force change, add or remove",
                                           json_schema_extra=optional_field({"type": "string",
                                                                             "enum": ACTION_NAMES}))] = None,
        # The ranges checked below, not by Form(ge=1): a 0 said as a 1000 is ("steps: 0 is outside 1..100"); the
        # schema says them all the same. Integers in decimal digits (check_form_fields).
        steps: Annotated[int | None, Form(description="denoising steps, 1 to the server's --max-steps "
                                          f"({DEFAULTS.max_steps} unless set) (default: the server's --steps)",
                                          json_schema_extra=optional_field({"type": "integer", "minimum": 1}))] = None,
        seed: Annotated[int | None, Form(description="seed of the initial noise (default: the server's --seed)",
                                         json_schema_extra=optional_field(
                                             {"type": "integer", "minimum": 0, "maximum": MAX_SEED}))] = None,
        return_: Annotated[Literal["png", "json"], Form(alias="return", description="png: the edited image; "
                           "json: EditResponse (image and masks as base64 PNG, action, seed, steps, timings, "
                           "warnings)")] = "png",
    ) -> Response:
        service: EditService = request.app.state.service
        request_id, started = request_id_of(request), time.perf_counter()
        editing = False  # once the edit is handed over, its faults are the model thread's to log (run_batch)
        try:  # admitted before its upload was read (EditAdmission)
            check_form_fields((await request.form()).multi_items(), list(request.query_params))
            text, changes = check_request_fields(instruction, action, steps, seed, service.settings)
            config = service.edit_config(changes)  # what the edit runs with, and what its answer says it ran with
            deadline = asyncio.get_running_loop().time() + service.settings.timeout_s
            # Watched too: an upload waiting for an image thread, abandoned, had held its queue slot, then been decoded
            upload = await unless_disconnected(request, asyncio.ensure_future(service.decode(await image.read(),
                                                                                             deadline)))
            editing = True
            result = await unless_disconnected(request, asyncio.ensure_future(service.edit(upload.pixels, text,
                                                                                          config, deadline)))
            result = dataclasses.replace(result, notes=upload.notes + result.notes)
        except ClientGone:
            service.metrics.count("cancelled")
            return error_response(ServeError(499, "client_closed_request", "the client went away; the edit was "
                                             "cancelled"), request_id)
        except asyncio.CancelledError:  # the client went away, or the server is stopping
            service.metrics.count("cancelled")
            raise
        except Exception as error:
            serve_error = as_serve_error(error, service)
            if serve_error.status == 500 and not editing:  # the answer says the log has the details: it has
                log.error("request %s failed before its edit", request_id, exc_info=error)
            service.metrics.count(outcome_of(serve_error))
            return error_response(serve_error, request_id)
        service.metrics.count("ok")
        service.metrics.latency.observe(time.perf_counter() - started)
        service.metrics.observe_stages(result.timings)
        return await answer(result, config, upload.icc_profile, request_id, service, as_json=return_ == "json")


async def answer(result: EditResult, config: EditConfig, icc_profile: bytes | None, request_id: str,
                 service: EditService, *, as_json: bool) -> Response:
    """A finished edit's response: the PNG, or the JSON with its masks, encoded in one of the service's image
    threads (not cut off by the timeout: the edit is done); what it says in headers (the notes logged too, with
    the request's id)."""
    # The seed and steps said either way: a request that sent none got the server's, which a caller could not see.
    headers = {"X-Request-Id": request_id, "X-Zone-Action": result.action.value, "X-Zone-Seed": str(config.seed),
               "X-Zone-Steps": str(config.steps), "X-Zone-Replica": REPLICA}
    for note in result.notes:
        log.info("request %s: %s", request_id, note)
    if result.notes:
        headers["X-Zone-Warnings"] = " | ".join(result.notes)
    if not as_json:
        return Response(await service.in_image_thread(png_bytes, result.image, icc_profile), media_type="image/png",
                        headers=headers)
    body = await service.in_image_thread(edit_response, result, config, request_id, icc_profile)
    return JSONResponse(body.model_dump(), headers=headers)


DISCONNECT_POLL_S = 0.25


T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its edit finished."""


async def unless_disconnected(request: Request, edit: asyncio.Future[T]) -> T:
    """`edit`'s result; cancelled, its work with it (EditService.edit), once the client disconnects:
    nobody would read the answer, and an abandoned edit would hold its queue slot and the GPU until
    its timeout (a client or load balancer that gives up first and retries would pile edits up). The same
    for an upload's decoding (EditService.decode): one waiting for an image thread is never decoded."""
    try:
        while True:
            done, _ = await asyncio.wait({edit}, timeout=DISCONNECT_POLL_S)
            if done:
                return edit.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:  # gone, or this handler cancelled (Ray Serve does so when the client goes): the edit too
        if not edit.done():
            edit.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await edit


WORKER_STOPPED = "the batching worker stopped; restart the server"


def _add_probe_routes(app: FastAPI) -> None:
    """Liveness, readiness and metrics: what an orchestrator and Prometheus poll."""

    @app.get(LIVENESS_PATH, summary="The process is up and can serve (loading counts as up)",
             responses={503: {"model": ErrorResponse}})
    async def healthz(request: Request) -> Response:
        # 503 only for what a restart may mend: a failed load or a dead worker (a liveness probe's cue).
        service: EditService | None = getattr(request.app.state, "service", None)
        if service is not None and service.load_failure:
            problem = service.load_failure
        elif service is not None and not service.healthy:
            problem = WORKER_STOPPED
        else:
            return JSONResponse({"status": "ok"})
        return error_response(ServeError(503, "unavailable", problem), request_id_of(request))

    @app.get("/readyz", summary="Models loaded and warmed up", responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> Response:
        service: EditService | None = getattr(request.app.state, "service", None)
        if service is not None and service.ready and not service.healthy:
            return error_response(ServeError(503, "unavailable", WORKER_STOPPED), request_id_of(request))
        if service is None or service.not_ready_because:
            message = service.not_ready_because if service is not None else "the models are still loading"
            return error_response(ServeError(503, "unavailable", message), request_id_of(request))
        return JSONResponse({"status": "ready"})

    for path, probe in ((LIVENESS_PATH, healthz), ("/readyz", readyz)):  # some load balancers' checks send HEAD
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        service: EditService = request.app.state.service
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4")

    app.add_api_route("/metrics", metrics, methods=["HEAD"], include_in_schema=False)  # as the probes answer HEAD


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(request: Request) -> str:
    """The caller's X-Request-Id when it is a sane token (so logs can be joined across proxies), else a new one."""
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def edit_response(result: EditResult, config: EditConfig, request_id: str,
                  icc_profile: bytes | None = None) -> EditResponse:
    height, width = result.image.shape[:2]
    return EditResponse(
        request_id=request_id, action=result.action.value, seed=config.seed, steps=config.steps, width=width,
        height=height,
        image=png_base64(result.image, icc_profile), mask_b=png_base64(result.mask_b), mask_f=png_base64(result.mask_f),
        region=png_base64(result.region), used_fallback=result.used_fallback,
        instruction_truncated=result.instruction_truncated, timings=result.timings, warnings=list(result.notes),
    )


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's field errors in this API's error shape; a non-multipart body is a 415."""
    service = getattr(request.app.state, "service", None)
    content_type = request.headers.get("content-type", "")
    if request.url.path == EDIT_PATH and content_type.partition(";")[0].strip().lower() != "multipart/form-data":
        problem = ServeError(415, "unsupported_media_type", f"got content type {content_type or 'none'!r}; send "
                             "multipart/form-data with an `image` file and an `instruction` field")
    else:
        fields = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'] if part != 'body')}: {_field_problem(item)}"
            for item in error.errors()
        )
        problem = ServeError(422, "invalid_request", fields)
    if service is not None:
        service.metrics.count("bad_request")
    return error_response(problem, request_id_of(request))


def _field_problem(item: dict[str, Any]) -> str:
    # An empty form field arrives as missing, so "Field required" also answers instruction="".
    if item["type"] == "missing":
        return "missing or empty"
    if "UploadFile" in item["msg"]:  # pydantic's words for a text field where a file belongs
        return "must be a file (a multipart part with a filename), not a text field"
    if isinstance(item.get("input"), StarletteUploadFile):  # a file where text belongs (pydantic: "a valid string")
        return "must be a text field (a multipart part without a filename), not a file"
    return item["msg"]


class UploadTooLarge(Exception):
    """A request body that grew past the upload limit while it was read."""


class EditAdmission:
    """An edit refused before its upload is read (`refused_unread`), and one without a Content-Length (chunked)
    as its bytes pass the upload limit, before more is read or spooled to disk. While the upload arrives, the
    server stopping ends it (ShuttingDown: a 503): a stalled upload would otherwise hold the shutdown for its
    whole grace period, then get uvicorn's bare 500. Only the edit endpoint takes a body; other paths and methods
    pass as they are (an unknown one is a 404, a GET here a 405)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        service = getattr(scope["app"].state, "service", None) if is_edit(scope) else None
        if service is None:
            return await self.app(scope, receive, send)
        request = Request(scope)  # its headers only: the body is read below, through `counted`
        if (refusal := refused_unread(request, service)) is not None:
            service.metrics.count(outcome_of(refusal))
            return await error_response(refusal, request_id_of(request))(scope, receive, send)
        limit, received, arrived = service.settings.max_upload_bytes, 0, False

        async def counted() -> dict:
            nonlocal received, arrived
            if arrived:  # after the body: the disconnect polls of a running edit, which shutting down lets finish
                return await receive()
            message = await _unless_stopping(receive, service)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise UploadTooLarge(f"over {limit:,} bytes")
                arrived = not message.get("more_body", False)
            return message

        await self.app(scope, counted, send)


STOPPING_POLL_S = 0.25  # how soon an upload under way learns that the server is stopping


async def _unless_stopping(receive: Callable, service: EditService) -> dict:
    """The request's next message, or ShuttingDown once the service is stopping (its edit would be refused)."""
    pending = asyncio.ensure_future(receive())
    try:
        while not service.stopping:
            done, _ = await asyncio.wait({pending}, timeout=STOPPING_POLL_S)
            if done:
                return pending.result()
    finally:
        pending.cancel()  # nothing when it is done; else the wait for bytes that may never come
    raise ShuttingDown("the server is shutting down before the upload had arrived; retry (another replica will "
                       "answer)")


def refused_unread(request: Request, service: EditService) -> ServeError | None:
    """Why an edit is refused before its upload is read, if it is: a browser page of an origin not allowed (a
    page elsewhere could make its visitors' browsers post edits to this server, unseen), the service not ready,
    the queue full, a Content-Length over the upload limit, a form charset too slow to decode (SLOW_CHARSETS)."""
    origin, allowed = request.headers.get("origin"), service.settings.allow_origins
    if origin is not None and "*" not in allowed and origin not in allowed and \
            not same_origin(origin, request, service.settings.host_names()):
        return ServeError(403, "origin_not_allowed", f"browser pages of {origin} may not call this API; "
                          f"to let them, start the server with --allow-origin {origin}")
    if service.not_ready_because:
        return ServeError(503, "unavailable", service.not_ready_because,
                          {} if service.load_failure else {"Retry-After": "5"})
    try:
        service.check_room()
    except QueueFull as error:
        return as_serve_error(error, service)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > service.settings.max_upload_bytes:
        return _too_large(int(length), service.settings.max_upload_bytes)
    if (charset := form_charset(request.headers.get("content-type", ""))) in SLOW_CHARSETS:
        return ServeError(415, "unsupported_media_type", f"charset={charset}: this server does not read form fields "
                          "in it (decoding it takes time quadratic in a field's length); send them in UTF-8")
    return None


# Charsets whose decoding is pure Python and quadratic: Starlette decodes the form's text fields on the event loop,
# and one 1 MB field in punycode held it (every request and probe) for 12 s in a security review. The others
# Python knows decode 200 KB in under 2 ms.
SLOW_CHARSETS = ("punycode",)


def form_charset(content_type: str) -> str | None:
    """The codec Starlette reads a multipart form's text in, by its `charset` parameter (None: none named, or none
    Python knows, which Starlette reads as Latin-1)."""
    charset = parse_options_header(content_type)[1].get(b"charset")
    try:
        return codecs.lookup(charset.decode("latin-1")).name if charset else None
    except (LookupError, ValueError):  # not a codec's name ("foo", a NUL in it)
        return None


def same_origin(origin: str, request: Request, names: frozenset[str] | None = frozenset()) -> bool:
    """A page this server served itself (/docs) calling it: its origin names the host the request was sent to, by
    an address, as localhost or as one of the DNS `names` allowed (--allow-host: the operator's own). Any other
    DNS name is no proof: a page elsewhere can point its own name at this server (DNS rebinding), and its origin
    then names the Host its posts go to (with --allow-host *, `names` None, too)."""
    try:
        parts = urllib.parse.urlsplit(origin)
        host, name = parts.netloc, dns_name(parts.hostname or "")
    except ValueError:  # no origin a browser sends ("http://[::1"): not this server's
        return False
    return host.lower() == request.headers.get("host", "").lower() and _named_by_operator(name, names)


def _named_by_operator(name: str, names: frozenset[str] | None) -> bool:
    """An IP address, localhost or one of the DNS `names` allowed (None: none proven, any being allowed)."""
    return _names_no_dns(name) or (names is not None and name in names)


def _names_no_dns(name: str) -> bool:
    """An IP address or localhost: a name no page elsewhere can make resolve to this server."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name == "localhost"
    return True


class HostCheck:
    """A request addressed (its Host header) to a DNS name not among `names` gets 421, on every route: a page
    elsewhere can point its own name at this server (DNS rebinding), and being then of the same origin, read its
    answers (/metrics, /readyz) without CORS. IP addresses and localhost name no DNS; a request without a Host
    (HTTP/1.0) comes from no browser. /healthz answers any name: it says only "up", and a liveness check by a
    DNS name (docker compose's `curl http://zone:8000/healthz`) refused would restart the server in a loop. A
    refused edit counts in the requests' metrics as the origin rule's do. `names` None: any name."""

    def __init__(self, app: Callable, names: frozenset[str] | None) -> None:
        self.app, self.names = app, names

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and self.names is not None and scope["path"] != LIVENESS_PATH:
            request = Request(scope)
            if (refusal := self.refusal(as_sent(request.headers.get("host", "")))) is not None:
                if is_edit(scope) and (service := getattr(scope["app"].state, "service", None)):
                    service.metrics.count(outcome_of(refusal))
                return await error_response(refusal, request_id_of(request))(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, host: str) -> ServeError | None:
        if not host:
            return None
        if (match := _HOST.fullmatch(host)) is None:
            return ServeError(421, "host_not_allowed", f"the Host header {host[:100]!r} names no host")
        name = dns_name(match[1].removeprefix("[").removesuffix("]"))
        if _named_by_operator(name, self.names):
            return None
        if not is_host_name(name):  # "*", "a..b", "café.example" (browsers send "xn--caf-dma.example"): none to allow
            return ServeError(421, "host_not_allowed", f"this server answers no requests addressed to {name!r}, "
                              "which is no DNS name: address it by an allowed name, an IP address or localhost")
        return ServeError(421, "host_not_allowed", f"this server answers no requests addressed to {name!r}; to let "
                          f"it, start it with --allow-host {name}")


def as_sent(header: str) -> str:
    """A header's text as its client wrote it: Starlette reads the bytes as Latin-1, and a name sent in UTF-8
    ("café.example") was said back as "cafã©.example"; bytes that are not UTF-8 stay as Latin-1 read them."""
    try:
        return header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return header


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/@\[\]]+)(:[0-9]*)?")  # name or [IPv6 address], then a port


def _too_large(size: int | None, limit: int) -> ServeError:
    said = f"is {size:,} bytes" if size is not None else f"passed {limit:,} bytes before it had all arrived"
    return ServeError(413, "upload_too_large", f"the upload {said}; this server takes at most {limit:,} bytes")


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (an unknown path, a body that does not parse, one cut off
    at the upload limit while parsed) in this API's error shape, with the request id, counted."""
    service, request_id = getattr(request.app.state, "service", None), request_id_of(request)
    if isinstance(error.__cause__, UploadTooLarge):
        problem = _too_large(None, service.settings.max_upload_bytes)
    elif isinstance(error.__cause__, ShuttingDown):
        problem = as_serve_error(error.__cause__, service)
    elif error.status_code == 400 and "exceeded maximum size" in str(error.detail):  # Starlette's 1 MiB text field
        problem = ServeError(422, "invalid_request", f"a text field is over 1 MiB; instruction: at most "
                             f"{service.settings.max_instruction_chars} characters are accepted (and the image goes "
                             "as a file: a part with a filename)")
    elif isinstance(error.__cause__, ClientDisconnect):  # gone during the upload: as a disconnect during the edit
        problem = ServeError(499, "client_closed_request", "the client went away during the upload")
    elif isinstance(error.__cause__, OSError):  # the server's temporary folder, where uploads over 1 MiB are kept
        problem = _upload_not_stored(error.__cause__, request_id)
    elif error.status_code == 400:  # the body did not parse
        cause = f": {error.__cause__}" if error.__cause__ is not None else ""
        problem = ServeError(400, "bad_request", f"the request body could not be read ({error.detail}{cause}); "
                             "send multipart/form-data with an `image` file and an `instruction` field")
    else:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
        headers = dict(error.headers or {})
        message = str(error.detail)
        if error.status_code == 405:  # Starlette's names the first route's methods only (GET, not its HEAD twin)
            headers["Allow"] = ", ".join(_methods_at(request))
            message = f"{request.method} is not taken at {request.url.path}: use {' or '.join(_methods_at(request))}"
        elif error.status_code == 404:
            message = (f"no route {request.url.path}: the routes are {', '.join(_route_list(request))} (the API's "
                       "documentation at /docs)")
        problem = ServeError(error.status_code, code, message, headers)
    if service is not None and is_edit(request.scope):
        service.metrics.count(outcome_of(problem))
    return error_response(problem, request_id)


def _upload_not_stored(error: OSError, request_id: str) -> ServeError:
    """An upload the server could not keep while it arrived (its temporary folder full, not writable, or no file
    left to open): the server's own fault, logged, not a body that "could not be read" blamed on the client."""
    log.error("request %s: its upload could not be stored in the temporary folder (TMPDIR, else /tmp)", request_id,
              exc_info=error)
    return ServeError(500, "server_error", f"the server could not store the upload ({error.strerror or error}); "
                      "retry later or elsewhere: the server log has the details")


def is_edit(scope: dict) -> bool:
    """Whether an ASGI request is an edit (POST /v1/edit): those alone count in zone_requests_total."""
    return scope["type"] == "http" and scope["path"] == EDIT_PATH and scope["method"] == "POST"


def _route_list(request: Request) -> list[str]:
    """The API's routes as "POST /v1/edit", "GET /healthz", ... (the docs' own pages left out)."""
    return [f"{'/'.join(sorted(route.methods - {'HEAD'}))} {route.path}" for route in request.app.router.routes
            if getattr(route, "methods", None) and getattr(route, "include_in_schema", False)]


def _methods_at(request: Request) -> list[str]:
    """Every method some route takes at the request's path."""
    methods = {method for route in request.app.router.routes if getattr(route, "methods", None)
               and route.matches(request.scope)[0] is not Match.NONE for method in route.methods}
    return sorted(methods)


FORCED_QUIT_ANSWER_S = 2.0  # how long a forced quit waits for the abandoned edits' 503s to go out


class ZoneServer(uvicorn.Server):
    """uvicorn's server, shutting the service down its way: on SIGTERM or Ctrl-C the edits still queued are
    answered 503 (Retry-After) at once, so their clients retry elsewhere, and only the running batch is waited
    for (uvicorn alone would run the whole queue, each edit up to its timeout: minutes, past an orchestrator's
    grace period). A second Ctrl-C (forced quit) answers the running batch's edits 503 too and cancels their
    work, where uvicorn alone would cut them off with bare 500s."""

    def __init__(self, config: uvicorn.Config, service: LocalEditService) -> None:
        super().__init__(config)
        self.service = service

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's SIGINT and SIGTERM, and SIGHUP taken as SIGTERM: the terminal that started the server closing
        (an SSH session ended) killed it at once, its queued and running edits cut off with empty replies. A
        SIGHUP ignored (nohup) stays ignored."""
        hangup = getattr(signal, "SIGHUP", None)  # none on Windows
        with super().capture_signals():
            if hangup is None or threading.current_thread() is not threading.main_thread() or \
                    signal.getsignal(hangup) is not signal.SIG_DFL:
                yield
                return
            signal.signal(hangup, self.handle_exit)  # re-raised once shut down, as uvicorn does its own signals
            try:
                yield
            finally:
                signal.signal(hangup, signal.SIG_DFL)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.service.stop()
        watch = asyncio.create_task(self._abandon_on_forced_quit())
        try:
            await super().shutdown(sockets)
        finally:
            watch.cancel()
        if self.force_exit:
            self.service.batcher.abandon()
            deadline = time.monotonic() + FORCED_QUIT_ANSWER_S
            while self.server_state.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            # uvicorn skips the app's shutdown when the quit was forced before it (its task would be cancelled
            # later, mid-close: a traceback in the log). Run here, it does not wait for the abandoned batch (but
            # for a load under way: the model thread cannot be stopped mid-load).
            done = getattr(self.lifespan, "shutdown_event", None)
            if done is not None and not done.is_set():
                await self.lifespan.shutdown()

    async def _abandon_on_forced_quit(self) -> None:
        # Polled as uvicorn polls its own flags; at once, for a super().shutdown that waits for connections to close.
        while not self.force_exit:
            await asyncio.sleep(0.1)
        self.service.batcher.abandon()


def server_log_config(log_level: str) -> dict[str, Any]:
    """uvicorn's log configuration, with this package's log (readiness, warm-up, failed edits) beside its own at
    the same level, python-multipart's complaints about a malformed body (answered 400) left out, and colours only
    where the stream is a terminal and NO_COLOR or TERM=dumb does not forbid them."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["zone_engine"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    # Each handler's colours as its own stream is (uvicorn's default formatter asked stdout, writing to stderr).
    config["formatters"]["default"]["use_colors"] = in_colour(sys.stderr)
    config["formatters"]["access"]["use_colors"] = in_colour(sys.stdout)
    for parser in ("python_multipart", "multipart"):  # its logger's name since 0.0.13, and before
        config["loggers"][parser] = {"level": "ERROR"}
    return config


# uvicorn's h11 parser, not httptools (its choice where installed): httptools keeps a request's headers whatever their
# size (190 MiB on one connection in a security review, the server's memory growing with them); h11 answers 400 to
# headers still unfinished past 16 KiB (one read, at most 256 KiB, may hold more).
HTTP_PARSER = "h11"


def run_server(service: LocalEditService, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve in this process until SIGINT/SIGTERM, then shut down as `ZoneServer` does: queued edits answered 503,
    the running batch finished (its edits end within the request timeout, so the grace period is that)."""
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                            log_config=server_log_config(log_level), http=HTTP_PARSER,
                            timeout_graceful_shutdown=int(service.settings.timeout_s) + 1)
    ZoneServer(config, service).run()
