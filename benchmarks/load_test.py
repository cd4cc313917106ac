"""`python -m zone_benchmarks.load_test`: throughput and latency of `zone serve` under concurrent load, with and
without dynamic batching, over loopback HTTP.

    python -m zone_benchmarks.load_test --out /tmp/loadrun                  # two tiny-model CPU servers, ~2 min
    python -m zone_benchmarks.load_test --url http://127.0.0.1:8000 --out results/   # a server already running

By default it starts `zone serve` as a child process twice, one after the other, on a free loopback
port: "batching" (--max-batch 8 --max-wait-ms 20) and "no-batching" (--max-batch 1 --max-wait-ms 0).
After warm-up edits, for each concurrency level that many client workers send edits of one seeded
random image, each edit with its own seed, until --requests were sent or --duration-s has passed: no
request starts after that, those in flight finish (each within --timeout-s). Writes load.json and
load.png to --out and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from importlib import metadata
from pathlib import Path
from typing import Any

try:
    import httpx
except ModuleNotFoundError:  # the [bench] extra's: said in a line (--help too), not as an import's traceback
    if __name__ != "__main__":
        raise
    print("load test: needs httpx: pip install 'zone-engine[bench]'", file=sys.stderr)
    sys.exit(2)
import numpy as np
from PIL import Image

from zone_engine.cli import CommandParser, parse_size, signals_handled
from zone_engine.config import MAX_BATCH, MAX_SEED, MAX_STEPS, MIN_SIDE, SAMPLE_INSTRUCTION
from zone_engine.errors import ZoneError
from zone_engine.paths import check_output_folder, folder_argument
from zone_engine.serving.settings import ServeSettings

from .options import device_name, refuse_first
from .report import NO_MATPLOTLIB, has_matplotlib

MODES = ("batching", "no-batching")
SETTLE_S = 10.0  # longest wait, after a level, for the server to finish what its clients gave up on
SCRAPE_TIMEOUT_S = 10.0  # a /metrics scrape's own: --timeout-s is the edits', and may be far shorter
MAX_RETRY_AFTER_S = 60.0  # longest a client heeds a Retry-After (a server's estimate for a long queue: minutes)
SERVER_OPTIONS = ("max_batch", "max_wait_ms", "tiny", "device", "server_args")  # LoadConfig's
_HTTP_URL = re.compile(r"https?://[^\s/?#]+(/\S*)?", re.IGNORECASE)  # a server to measure: scheme and host

Progress = Callable[[str], None]


class LoadTestError(Exception):
    """The load test cannot go on (a server did not start, a warm-up edit failed); the message says why."""


@dataclass(frozen=True)
class LoadConfig:
    """Everything one load test needs (the command line's options)."""

    out: Path
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    requests: int = 32
    duration_s: float = 60.0
    size: tuple[int, int] = (64, 64)  # height, width
    steps: int = 4
    timeout_s: float = 120.0
    warmup: int = 2
    seed: int = 0
    instruction: str = SAMPLE_INSTRUCTION
    url: str | None = None  # measure this server instead of starting two
    max_batch: int = 8
    max_wait_ms: float = 20.0
    tiny: bool = True
    device: str = "cpu"
    server_args: tuple[str, ...] = ()
    ready_timeout_s: float = 300.0


# ------------------------------------------------------------------------------------------ servers


def server_command(config: LoadConfig, mode: str, port: int) -> list[str]:
    """`zone serve` for one mode; --server-arg values come last, so they override ours. The queue holds every
    level's clients and a whole batch (the server's default, 32, would refuse a larger --max-batch), so the
    load test measures edits, not 503s. Before it is ready the server warms up at the load test's size and steps,
    every batch size it pads to: a first batch of a size (CUDA graphs, a compiled step) pays no capture in a
    level. Its --max-steps admits the load test's --steps."""
    batching = {"batching": ["--max-batch", str(config.max_batch), "--max-wait-ms", f"{config.max_wait_ms:g}"],
                "no-batching": ["--max-batch", "1", "--max-wait-ms", "0"]}[mode]
    queue_size = max(ServeSettings.queue_size, config.max_batch, *config.concurrency)
    return [sys.executable, "-m", "zone_engine.cli", "serve", *(["--tiny"] if config.tiny else []),
            "--device", config.device, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            *batching, "--queue-size", str(queue_size), "--steps", str(config.steps),
            "--max-steps", str(max(ServeSettings.max_steps, config.steps)),
            "--warmup-size", "{}x{}".format(*config.size), *config.server_args]


def free_port() -> int:
    """A loopback port that is free now (another process could take it before the server binds: rare)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(base: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    """Poll /readyz until it answers 200; fail early if the server exits, or at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LoadTestError(f"the server exited with status {process.returncode} before it was ready; "
                                f"end of {log_path}:\n{_log_tail(log_path)}")
        with suppress(httpx.TransportError):  # not listening yet
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise LoadTestError(f"the server was not ready within {timeout_s:g} s (--ready-timeout-s); "
                        f"end of {log_path}:\n{_log_tail(log_path)}")


def stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM (uvicorn finishes open requests and exits), then SIGKILL if it is still there after `grace_s`."""
    if process.poll() is None:
        process.terminate()
    try:
        with suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
    finally:  # past the grace period, or a second Ctrl-C while waiting
        if process.poll() is None:
            process.kill()
            process.wait()


@contextmanager
def local_server(command: list[str], port: int, log_path: Path, ready_timeout_s: float) -> Iterator[str]:
    """Run a server command until its /readyz answers; yields its base URL; always stops it on the way out."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, process, ready_timeout_s, log_path)
            yield base
        finally:
            stop(process)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Unwind on SIGTERM (`timeout`, a job manager) as on Ctrl-C, so the child servers are stopped too."""
    def interrupt(signum, frame) -> None:
        on_sigint = signal.getsignal(signal.SIGINT)
        if callable(on_sigint):  # Python's (raises KeyboardInterrupt) or asyncio.run's (cancels its task first)
            on_sigint(signum, frame)
        else:  # SIGINT ignored, as in a background job
            raise KeyboardInterrupt

    with signals_handled({signal.SIGTERM: interrupt}):
        yield


# ------------------------------------------------------------------------------------------- client


def seeded_png(height: int, width: int, seed: int) -> bytes:
    """A smooth random RGB image as PNG: seeded colours on a 4x4 grid, upsampled (photo-like, compresses)."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition as {sample name with its labels: value}; lines that are not samples skipped."""
    samples = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#"):
            with suppress(ValueError):
                samples[name] = float(value)
    return samples


async def scrape(client: httpx.AsyncClient, base: str) -> dict[str, float] | None:
    """The server's metrics now; None when it has none to give (then no batch sizes are reported)."""
    try:
        response = await client.get(f"{base}/metrics", timeout=SCRAPE_TIMEOUT_S)
    except httpx.HTTPError:
        return None
    return parse_metrics(response.text) if response.status_code == 200 else None


async def settled(client: httpx.AsyncClient, base: str, limit_s: float) -> dict[str, float] | None:
    """The server's metrics once it has no edit running or queued, two scrapes in a row (or after `limit_s`):
    a request its client gave up on (--timeout-s) still ends on the server, and is counted in its own level, not
    in the next one's."""
    deadline, idle = time.perf_counter() + limit_s, 0
    while True:
        metrics = await scrape(client, base)
        busy = metrics is not None and metrics.get("zone_running", 0) + metrics.get("zone_queue_depth", 0) > 0
        idle = 0 if busy else idle + 1
        if metrics is None or idle == 2 or time.perf_counter() > deadline:
            return metrics
        await asyncio.sleep(0.05)


def server_side(before: dict[str, float] | None, after: dict[str, float] | None) -> dict:
    """Batches run and outcomes counted by the server between two scrapes (others' requests included)."""
    if before is None or after is None:
        return {"batches": None, "mean_batch_size": None, "server_outcomes": None}
    delta = {name: value - before.get(name, 0.0) for name, value in after.items()}
    batches = int(delta.get("zone_batch_size_count", 0))
    outcomes = {name.split('"')[1]: int(value) for name, value in delta.items()
                if name.startswith('zone_requests_total{outcome="')}
    return {"batches": batches, "mean_batch_size": delta["zone_batch_size_sum"] / batches if batches else None,
            "server_outcomes": outcomes}


async def post_edit(client: httpx.AsyncClient, base: str, image: bytes, config: LoadConfig,
                    seed: int) -> httpx.Response:
    form = {"instruction": config.instruction, "seed": str(seed), "steps": str(config.steps), "return": "png"}
    return await client.post(f"{base}/v1/edit", data=form, files={"image": ("load.png", image, "image/png")})


@dataclass
class Tally:
    sent: int = 0
    latencies_s: list[float] = field(default_factory=list)  # successful edits only
    errors: Counter = field(default_factory=Counter)  # "HTTP 503 queue_full", or the exception's name when no answer
    waited_s: float = 0.0  # the clients' waits on Retry-After, together


def error_kind(response: httpx.Response) -> str:
    """An answer other than 200 as its status and the server's error code ("HTTP 503 queue_full"): the code tells a
    refusal (a full queue) from a failure (a 503 `unavailable` while stopping, `cancelled`, `internal_error`), which
    share a status; the status alone for a body without one (a proxy's)."""
    try:
        code = response.json()["error"]["code"]
    except (ValueError, LookupError, TypeError):  # not JSON, or not the service's error shape
        code = None
    return f"HTTP {response.status_code}" + (f" {code}" if isinstance(code, str) else "")


def retry_after_s(response: httpx.Response) -> float:
    """How long a 503 or 429 asks its client to wait before the next request (its Retry-After, in seconds or as an
    HTTP date); 0 for another answer, or one without a Retry-After this reads."""
    said = response.headers.get("retry-after", "").strip()
    if response.status_code not in (429, 503) or not said:
        return 0.0
    if said.isdigit():
        return float(said)
    try:
        return max(0.0, (parsedate_to_datetime(said) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):  # not a date, or one without a time zone
        return 0.0


async def send_one(client: httpx.AsyncClient, base: str, image: bytes, config: LoadConfig, seed: int,
                   tally: Tally) -> float:
    """One edit, counted in `tally`; returns the wait its answer asks for before the next request (Retry-After)."""
    started = time.perf_counter()
    try:
        response = await post_edit(client, base, image, config, seed)
    except httpx.HTTPError as error:  # refused, reset, or over --timeout-s
        tally.errors[type(error).__name__] += 1
        return 0.0
    if response.status_code == 200:
        tally.latencies_s.append(time.perf_counter() - started)
    else:
        tally.errors[error_kind(response)] += 1
    return retry_after_s(response)


def _percentiles_ms(latencies_s: list[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    values = np.asarray(latencies_s) * 1e3
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(values.mean()),
            "max": float(values.max())}


async def measure_level(base: str, concurrency: int, config: LoadConfig, image: bytes) -> dict:
    """`concurrency` closed-loop workers until `config.requests` are sent or `config.duration_s` has passed."""
    tally = Tally()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=config.timeout_s, limits=limits) as client:
        before = await scrape(client, base)
        started = time.perf_counter()
        deadline = started + config.duration_s

        async def worker() -> None:
            while tally.sent < config.requests and time.perf_counter() < deadline:
                seed = config.seed + tally.sent  # the same seeds at every level and mode: the same work
                tally.sent += 1
                advised_s = await send_one(client, base, image, config, seed, tally)
                # A refused client waits as told before its next edit, as a well-behaved one would: sent at once, it
                # is refused again, and the level's requests go in refusals of an overloaded server in a blink.
                wait_s = min(advised_s, MAX_RETRY_AFTER_S, deadline - time.perf_counter())
                if wait_s > 0 and tally.sent < config.requests:
                    tally.waited_s += wait_s
                    await asyncio.sleep(wait_s)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
        after = await settled(client, base, SETTLE_S)
    return {
        "concurrency": concurrency,
        "sent": tally.sent,
        "ok": len(tally.latencies_s),
        "errors": dict(sorted(tally.errors.items())),
        "waited_s": tally.waited_s,
        "stopped_by": "requests" if tally.sent >= config.requests else "duration",
        "wall_s": wall_s,
        "edits_per_s": len(tally.latencies_s) / wall_s,
        "latency_ms": _percentiles_ms(tally.latencies_s),
        **server_side(before, after),
    }


async def warm_up(base: str, config: LoadConfig, image: bytes, progress: Progress = lambda _: None) -> None:
    """Untimed edits at the measured size and steps, so first-call costs land on no level. One refused with a
    Retry-After (a 503 of a server still loading or with its queue full, a 429) is sent again after that wait, as
    the levels' clients do, for --ready-timeout-s in all (the first such answer had ended the run); the first
    refusal said, so the wait is not taken for a hang."""
    deadline, said_waiting = time.monotonic() + config.ready_timeout_s, False
    async with httpx.AsyncClient(timeout=config.timeout_s) as client:
        for index in range(config.warmup):
            while (response := await _warm_up_edit(client, base, image, config, index)).status_code != 200:
                wait_s = min(retry_after_s(response), MAX_RETRY_AFTER_S)
                said = f"HTTP {response.status_code} {response.text[:500]}"
                if wait_s <= 0:  # no cue to retry: a failure, not a refusal
                    raise LoadTestError(f"the warm-up edit at {base} failed: {said}")
                if time.monotonic() + wait_s > deadline:
                    raise LoadTestError(f"the server at {base} still refused the warm-up edit after "
                                        f"{config.ready_timeout_s:g} s (--ready-timeout-s; raise it for a server that "
                                        f"takes longer to be ready): {said}")
                if not said_waiting:
                    progress(f"the warm-up edit was refused ({error_kind(response)}): sending it again as its "
                             f"Retry-After says, for up to {config.ready_timeout_s:g} s (--ready-timeout-s)")
                    said_waiting = True
                await asyncio.sleep(wait_s)


async def _warm_up_edit(client: httpx.AsyncClient, base: str, image: bytes, config: LoadConfig,
                        index: int) -> httpx.Response:
    """One warm-up edit; one not answered within --timeout-s said so, with what to change: it had ended the run as
    "no answer from the server (ReadTimeout: )"."""
    try:
        return await post_edit(client, base, image, config, seed=config.seed + config.requests + index)
    except httpx.TimeoutException as error:
        raise LoadTestError(f"the warm-up edit at {base} got no answer within --timeout-s {config.timeout_s:g} s "
                            f"({type(error).__name__}): raise --timeout-s, or lower --steps or --size") from None


async def measure_server(base: str, result: dict, config: LoadConfig, progress: Progress) -> None:
    """Warm-up, then one measurement per concurrency level against the server at `base`, each appended to
    result["levels"] as it finishes (an interrupted run keeps the finished ones)."""
    image = seeded_png(*config.size, config.seed)
    result["url"] = base
    await warm_up(base, config, image, progress)
    for concurrency in config.concurrency:
        level = await measure_level(base, concurrency, config, image)
        progress(f"{result['mode']} concurrency {concurrency}: {level['ok']}/{level['sent']} ok, "
                 f"{level['edits_per_s']:.2f} edits/s, p95 {_ms(level['latency_ms']['p95'])} ms")
        result["levels"].append(level)


# -------------------------------------------------------------------------------------------- a run


def _cpu_model() -> str:
    with suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(config: LoadConfig) -> dict:
    """The client's machine (also the servers' when this script starts them); torch is not imported here."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(), "torch": torch_version,
            "server_device": config.device if config.url is None else "unknown (external server)"}


def throughput_ratio(results: list[dict]) -> dict[str, float | None]:
    """Batching ÷ no-batching edits/s at each concurrency both measured."""
    by_mode = {result["mode"]: {level["concurrency"]: level["edits_per_s"] for level in result["levels"]}
               for result in results}
    if not set(MODES) <= set(by_mode):
        return {}
    batching, alone = by_mode["batching"], by_mode["no-batching"]
    return {str(c): batching[c] / alone[c] if alone[c] else None for c in batching if c in alone}


def measure_local(config: LoadConfig, result: dict, progress: Progress) -> None:
    """Start result["mode"]'s server, measure it into `result`, stop it: one server at a time, as they would
    share the device."""
    port = free_port()
    command = server_command(config, result["mode"], port)
    log_path = config.out / f"server-{result['mode']}.log"
    result.update(server_command=command, server_log=str(log_path))
    progress(f"{result['mode']}: starting {' '.join(command[1:])}")
    with local_server(command, port, log_path, config.ready_timeout_s) as base:
        asyncio.run(measure_server(base, result, config, progress))


def run_load_test(config: LoadConfig, progress: Progress = lambda _: None) -> dict:
    """Measure the external server, or start, measure and stop each mode's server in turn; returns the record.
    Interrupted (Ctrl-C, SIGTERM) after a level finished, the record holds the levels measured and says so
    ("interrupted"); before any, KeyboardInterrupt goes on up."""
    started, load_before = time.perf_counter(), os.getloadavg()
    config.out.mkdir(parents=True, exist_ok=True)
    modes = ["external"] if config.url is not None else list(MODES)
    url = config.url and config.url.rstrip("/")
    results: list[dict[str, Any]] = [{"mode": mode, "url": url, "levels": []} for mode in modes]
    interrupted = None
    try:
        for result in results:
            if config.url is not None:
                asyncio.run(measure_server(result["url"], result, config, progress))
            else:
                measure_local(config, result, progress)
    except KeyboardInterrupt:
        if not any(result["levels"] for result in results):
            raise
        interrupted = "interrupted (Ctrl-C or SIGTERM): the levels that finished before it are reported"
    results = [result for result in results if result["levels"]]
    return {
        "schema": 1,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(config),
        # With --url, only the client's: the server options were not this run's to set.
        "settings": {**{name: value for name, value in asdict(config).items()
                        if config.url is None or name not in SERVER_OPTIONS}, "out": str(config.out)},
        "results": results,
        "throughput_ratio": throughput_ratio(results),
        "interrupted": interrupted,
        # Client and servers share this machine's cores, and so does anything else running on it.
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------ reports


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def table(record: dict) -> str:
    """The results as a markdown table, and the batching ÷ no-batching throughput line."""
    settings = record["settings"]
    lines = [
        f"zone serve load test: {settings['size'][0]}x{settings['size'][1]} image, {settings['steps']} steps, "
        f"up to {settings['requests']} requests or {settings['duration_s']:g} s per level; "
        f"{record['machine']['cpu_model']}, {record['machine']['cpu_count']} cores",
        "",
        "| mode | concurrency | sent | ok | errors | edits/s | p50 ms | p95 ms | p99 ms | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in record["results"]:
        for level in result["levels"]:
            errors = ", ".join(f"{kind}: {count}" for kind, count in level["errors"].items()) or "0"
            latency, batch = level["latency_ms"], level["mean_batch_size"]
            lines.append(
                f"| {result['mode']} | {level['concurrency']} | {level['sent']} | {level['ok']} | {errors} "
                f"| {level['edits_per_s']:.2f} | {_ms(latency['p50'])} | {_ms(latency['p95'])} "
                f"| {_ms(latency['p99'])} | {'–' if batch is None else f'{batch:.2f}'} |"
            )
    if record.get("interrupted"):
        lines += ["", f"**{record['interrupted']}**"]
    if record["throughput_ratio"]:
        ratios = ", ".join(f"{c}: {'–' if r is None else f'{r:.2f}×'}" for c, r in record["throughput_ratio"].items())
        lines += ["", f"batching ÷ no-batching throughput by concurrency: {ratios}"]
    failing = [f"{result['mode']} at {level['concurrency']} ({level['sent'] - level['ok']} of {level['sent']})"
               for result in record["results"] for level in result["levels"] if level["ok"] < level["sent"]]
    if failing:
        lines += ["", f"**Requests failed**: {', '.join(failing)}; edits/s, latencies and ratios there count the "
                  "successful edits only."]
    return "\n".join(lines) + "\n"


def write_plot(record: dict, path: Path) -> bool:
    """Throughput and p95 latency against concurrency, one line per mode; False without matplotlib."""
    if not has_matplotlib():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for result in record["results"]:
        measured = sorted(result["levels"], key=lambda level: level["concurrency"])  # a record's own order aside
        levels = [level["concurrency"] for level in measured]
        p95 = [level["latency_ms"]["p95"] for level in measured]
        for axes, values in ((speed, [level["edits_per_s"] for level in measured]),
                             (latency, [np.nan if v is None else v for v in p95])):
            axes.plot(levels, values, marker="o", label=result["mode"])
            _mark_failures(axes, measured, values)
    levels = sorted({level["concurrency"] for result in record["results"] for level in result["levels"]})
    for axes, label in ((speed, "successful edits/s"), (latency, "p95 latency, ms")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.minorticks_off()
        axes.set_ylim(bottom=0)
        axes.set_xlabel("concurrent clients")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    settings = record["settings"]
    figure.suptitle(f"zone serve: {settings['size'][0]}x{settings['size'][1]}, {settings['steps']} steps, "
                    f"server device {record['machine']['server_device']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _mark_failures(axes, levels: list[dict], values: list[float]) -> None:
    """A red cross and "N failed" on each point of a level whose requests did not all succeed: its figures are of
    the successful edits alone."""
    for level, value in zip(levels, values, strict=True):
        failed = level["sent"] - level["ok"]
        if failed and not np.isnan(value):
            axes.plot(level["concurrency"], value, marker="x", color="red", markersize=10)
            axes.annotate(f"{failed} failed", (level["concurrency"], value), textcoords="offset points", xytext=(5, 5),
                          color="red", fontsize=8)


# ---------------------------------------------------------------------------------------------- CLI


def _levels(text: str) -> tuple[int, ...]:
    """Concurrency levels, in increasing order (the report and chart are keyed by them); an empty entry (`1,,4`) or
    a repeated one refused, as `zone bench --backends` refuses them, not left out or collapsed unsaid."""
    parts = [part.strip() for part in text.split(",")]
    if "" in parts:
        raise argparse.ArgumentTypeError(f"{text!r}: entry {parts.index('') + 1} is empty (a comma too many?); give "
                                         "the numbers of clients between commas, e.g. 1,2,4,8")
    try:
        named = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,2,4,8, got {text!r}") from None
    if min(named) < 1:
        raise argparse.ArgumentTypeError(f"every concurrency must be at least 1, got {text!r}")
    if repeated := [level for level in dict.fromkeys(named) if named.count(level) > 1]:
        raise argparse.ArgumentTypeError(f"{text!r} names {', '.join(map(str, repeated))} more than once: name each "
                                         "level once, e.g. 1,2,4,8")
    return tuple(sorted(named))


def parse_args(argv: list[str] | None) -> LoadConfig:
    parser = _load_test_parser(LoadConfig(out=Path()))  # its defaults in one place: a load test configured in
    args = parser.parse_args(argv)                       # Python gets the same
    _check_load_args(parser, args)
    return LoadConfig(
        out=args.out, concurrency=args.concurrency, requests=args.requests, duration_s=args.duration_s,
        size=args.size, steps=args.steps, timeout_s=args.timeout_s, warmup=args.warmup, seed=args.seed,
        instruction=args.instruction, url=args.url, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        tiny=args.tiny, device=args.device, server_args=tuple(args.server_arg), ready_timeout_s=args.ready_timeout_s,
    )


def _load_test_parser(defaults: LoadConfig) -> CommandParser:
    parser = CommandParser(
        prog="python -m zone_benchmarks.load_test",
        description="Throughput and latency of `zone serve` under concurrent load, with dynamic batching and "
                    "without: starts two servers (tiny models on the CPU by default), or measures --url.",
        epilog="Real checkpoints on a GPU: --no-tiny --device cuda --server-arg=--ip2p=DIR "
               "--server-arg=--magicbrush=DIR --server-arg=--sam=FILE.pth (write --server-arg=VALUE when the value "
               "starts with a dash). Exit codes: 0 done, 1 a level had no successful edit (the server down, or every "
               "request refused or failed; the report is still written), 2 a server did not start or a warm-up edit "
               "failed, 130 interrupted (Ctrl-C or SIGTERM; the levels that finished are still reported).",
    )
    parser.add_argument("--out", type=folder_argument, required=True, metavar="DIR",
                        help="folder for load.json, load.png and server logs")
    parser.add_argument("--url", metavar="URL",
                        help="measure this running server (label 'external') instead of starting two")
    parser.add_argument("--concurrency", type=_levels, default=defaults.concurrency, metavar="LIST",
                        help="comma-separated numbers of concurrent clients, measured in increasing order, at most "
                        f"--requests (default: {','.join(map(str, defaults.concurrency))})")
    parser.add_argument("--requests", type=int, default=defaults.requests, metavar="N",
                        help="requests per level at most (default: %(default)s)")
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s,
                        help="no request starts after this many seconds of a level (default: %(default)g)")
    parser.add_argument("--size", type=parse_size, default=defaults.size, metavar="HxW",
                        help="image height x width (default: {}x{})".format(*defaults.size))
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="denoising steps per edit (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s,
                        help="client limit per request (default: %(default)g)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup,
                        help="untimed edits per server first (default: %(default)s)")
    parser.add_argument("--ready-timeout-s", type=float, default=defaults.ready_timeout_s,
                        help="longest wait for a server to be ready: a started one's /readyz, then warm-up edits "
                        "refused with a Retry-After (still loading, queue full), sent again (default: %(default)g)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="image seed and first edit seed (default: %(default)s)")
    parser.add_argument("--instruction", default=defaults.instruction,
                        help="edit instruction (default: %(default)r)")
    server = parser.add_argument_group("servers started by the load test (ignored with --url)")
    server.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="the batching server's --max-batch (default: %(default)s)")
    server.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="the batching server's --max-wait-ms (default: %(default)g)")
    server.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=defaults.tiny,
                        help="tiny random models (default); --no-tiny for real checkpoints via --server-arg")
    server.add_argument("--device", type=device_name, default=defaults.device,
                        help="the servers' --device: auto, cpu, cuda or cuda:N (default: %(default)s)")
    server.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more `zone serve` argument, repeatable, after the load test's own")
    return parser


def _check_load_args(parser: CommandParser, args: argparse.Namespace) -> None:
    """Each bad option named (parser.error, exit 2) before any server starts."""
    refuse_first(parser, [
        (args.requests >= 1, "--requests must be at least 1"),
        (1 <= args.steps <= MAX_STEPS, f"--steps must be between 1 and {MAX_STEPS}"),
        (max(args.concurrency) <= args.requests, f"--concurrency {max(args.concurrency)} is above --requests "
         f"{args.requests}: a level sends --requests edits in all, so only {args.requests} clients would ever send"),
        (args.warmup >= 0, "--warmup must be 0 or more"),
        *((0 < seconds < math.inf, f"{name} must be a finite number of seconds above 0") for name, seconds in (
            ("--duration-s", args.duration_s), ("--timeout-s", args.timeout_s),
            ("--ready-timeout-s", args.ready_timeout_s))),
        (min(args.size) >= MIN_SIDE, f"--size {args.size[0]}x{args.size[1]}: at least {MIN_SIDE} pixels a side (the "
         "server refuses smaller images)"),
        (args.url is None or _HTTP_URL.fullmatch(args.url) is not None,
         f"--url {args.url!r} is not an http:// or https:// address, e.g. http://127.0.0.1:8000"),
    ])
    last_seed = MAX_SEED - args.requests - args.warmup + 1  # edits take seeds seed..seed+requests+warmup-1
    if not 0 <= args.seed <= last_seed:
        parser.error(f"--seed must be between 0 and {last_seed} (the edits take seeds from it up)")
    try:  # before any server starts: the results must have somewhere to go
        check_output_folder(args.out, "--out", ["load.json", "load.png", *(f"server-{mode}.log" for mode in MODES)])
    except ZoneError as error:
        parser.error(str(error))
    longest_wait_ms = ServeSettings.timeout_s * 1000
    if not 1 <= args.max_batch <= MAX_BATCH or not 0 <= args.max_wait_ms < longest_wait_ms:
        parser.error(f"need 1 <= --max-batch <= {MAX_BATCH} and 0 <= --max-wait-ms < {longest_wait_ms:g} (what the "
                     "batching server takes)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m zone_benchmarks.load_test`; returns the exit status."""
    config = parse_args(argv)

    def progress(message: str) -> None:
        print(f"[load] {message}", file=sys.stderr, flush=True)

    try:
        with sigterm_as_interrupt():
            record = run_load_test(config, progress)
    except LoadTestError as error:
        print(f"load test: {error}", file=sys.stderr)
        return 2
    except httpx.HTTPError as error:
        print(f"load test: no answer from the server ({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("load test: interrupted", file=sys.stderr)
        return 130
    record["command"] = " ".join(["python -m zone_benchmarks.load_test", *(sys.argv[1:] if argv is None else argv)])
    (config.out / "load.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))
    print(f"json: {config.out / 'load.json'}")
    if write_plot(record, config.out / "load.png"):
        print(f"chart: {config.out / 'load.png'}")
    else:
        print(f"chart: {NO_MATPLOTLIB}")
    if record["interrupted"]:
        print(f"load test: {record['interrupted']}", file=sys.stderr)
        return 130
    if empty := no_edit_succeeded(record):
        print(f"load test: no edit succeeded at {', '.join(empty)} (see the errors column): those levels measured "
              "nothing", file=sys.stderr)
        return 1
    return 0


def no_edit_succeeded(record: dict) -> list[str]:
    """The levels ("external at 2") without one successful edit: the server down, or every request refused or
    failed. Their 0 edits/s is no measurement; a script or CI job must not take the run for one."""
    return [f"{result['mode']} at {level['concurrency']}" for result in record["results"]
            for level in result["levels"] if level["ok"] == 0]


if __name__ == "__main__":
    sys.exit(main())
