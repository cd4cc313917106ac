"""The serving load test (benchmarks/load_test.py): against an in-process server of tiny models its record
adds up, it stops by itself, counts what fails, and stops the servers it starts."""

from __future__ import annotations

import pytest

from zone_engine.cli import SERVE_MODULES

for _module in (*SERVE_MODULES, "httpx"):
    pytest.importorskip(_module, reason="the service needs the serve extra: pip install -e '.[serve]'")

import asyncio
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
from PIL import Image
from test_serving import serving

import zone_benchmarks.load_test as load_test
from zone_benchmarks.load_test import (
    LoadConfig,
    LoadTestError,
    free_port,
    local_server,
    main,
    measure_level,
    parse_args,
    parse_metrics,
    run_load_test,
    scrape,
    seeded_png,
    server_command,
    server_side,
    settled,
    stop,
)
from zone_engine import ZonePipeline
from zone_engine.config import MAX_SEED, EditConfig, SamConfig
from zone_engine.serving.settings import ServeSettings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return ZonePipeline(tiny_models, device="cpu", denoiser="fused",
                        default_config=EditConfig(steps=2, sam=SamConfig.for_random_weights()))


def test_against_a_running_server_the_record_adds_up(pipe, tmp_path):
    with serving(pipe, max_batch=4, max_wait_ms=20) as (base, _):
        status = main(["--url", base, "--concurrency", "1,2", "--requests", "4", "--steps", "2", "--warmup", "1",
                       "--out", str(tmp_path)])
    assert status == 0
    record = json.loads((tmp_path / "load.json").read_text())
    assert {"settings", "machine", "created_utc", "results", "command"} <= set(record)
    assert record["machine"]["cpu_count"] and record["settings"]["url"] == base
    assert not {"max_batch", "tiny", "device"} & set(record["settings"])  # not this run's to set: not recorded
    (result,) = record["results"]
    assert result["mode"] == "external" and [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["sent"] == level["ok"] + sum(level["errors"].values()) == 4
        assert level["ok"] == 4 and level["stopped_by"] == "requests" and level["edits_per_s"] > 0
        latency = level["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert level["server_outcomes"]["ok"] == 4  # the server counted what the client sent, nothing else
        assert level["batches"] >= 1 and 1 <= level["mean_batch_size"] <= level["concurrency"]
    assert record["throughput_ratio"] == {}  # one mode only
    assert (tmp_path / "load.png").read_bytes()[:8] == PNG_SIGNATURE


def test_an_interrupted_run_reports_the_levels_that_finished(pipe, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) during the second level: the first is written and printed, the exit status is 130;
    during the first, nothing was measured and nothing is written."""
    import zone_benchmarks.load_test as load_test

    def interrupting_at(call: int):
        calls, measure = [], load_test.measure_level

        async def measure_or_interrupt(*args):
            calls.append(args)
            if len(calls) == call:
                raise KeyboardInterrupt
            return await measure(*args)
        return measure_or_interrupt

    argv = ["--concurrency", "1,2", "--requests", "2", "--steps", "2", "--warmup", "0"]
    with serving(pipe) as (base, _):
        monkeypatch.setattr(load_test, "measure_level", interrupting_at(2))
        assert main([*argv, "--url", base, "--out", str(tmp_path / "second")]) == 130
        monkeypatch.setattr(load_test, "measure_level", interrupting_at(1))
        assert main([*argv, "--url", base, "--out", str(tmp_path / "first")]) == 130
    record = json.loads((tmp_path / "second" / "load.json").read_text())
    (result,) = record["results"]
    assert [level["concurrency"] for level in result["levels"]] == [1] and result["levels"][0]["ok"] == 2
    assert record["interrupted"].startswith("interrupted") and "| external | 1 | 2 | 2 |" in capsys.readouterr().out
    assert not (tmp_path / "first" / "load.json").exists()


def test_the_client_stops_by_duration_when_requests_are_many(pipe, tmp_path):
    config = LoadConfig(out=tmp_path, requests=10_000, duration_s=1.0, steps=2)
    with serving(pipe) as (base, _):
        started = time.monotonic()
        level = asyncio.run(measure_level(base, 2, config, seeded_png(64, 64, 0)))
        elapsed = time.monotonic() - started
    assert level["stopped_by"] == "duration" and 0 < level["sent"] < 10_000
    assert level["sent"] == level["ok"] + sum(level["errors"].values())
    # The deadline, plus the edits in flight then (seconds); 10,000 edits would take an hour. Not a timing claim:
    # a loaded machine may take several times the 1 s.
    assert elapsed < 60


def test_no_answer_is_counted_by_exception_type(tmp_path):
    config = LoadConfig(out=tmp_path, requests=3, timeout_s=5)
    level = asyncio.run(measure_level(f"http://127.0.0.1:{free_port()}", 1, config, seeded_png(8, 8, 0)))
    assert level["sent"] == 3 and level["ok"] == 0 and level["errors"] == {"ConnectError": 3}
    assert level["edits_per_s"] == 0 and level["latency_ms"]["p95"] is None and level["mean_batch_size"] is None


def test_a_started_server_is_waited_for_and_always_stopped(tmp_path):
    (tmp_path / "readyz").write_text("ready")  # http.server answers GET /readyz from this file
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with local_server(command, port, tmp_path / "server.log", ready_timeout_s=30) as base:
        assert httpx.get(f"{base}/readyz").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/readyz")

    crashing = [sys.executable, "-c", "import sys; print('no models here'); sys.exit(3)"]
    with (pytest.raises(LoadTestError, match="status 3(.|\n)*no models here"),
          local_server(crashing, free_port(), tmp_path / "crash.log", ready_timeout_s=30)):
        pass


def test_options_parse_and_help_exits_cleanly(tmp_path, capsys):
    config = parse_args(["--out", str(tmp_path), "--size", "96x64", "--concurrency", "1,3",
                         "--server-arg=--denoiser=eager", "--no-tiny", "--device", "cuda"])
    assert (config.size, config.concurrency, config.server_args, config.tiny) == ((96, 64), (1, 3),
                                                                                   ("--denoiser=eager",), False)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--server-arg" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--out", str(tmp_path), "--size", "64"])
    assert exit_.value.code == 2


@pytest.mark.parametrize(("option", "words"), [
    (["--max-batch", "0"], "1 <= --max-batch <= 256"), (["--max-wait-ms", "nan"], "--max-wait-ms < 120000"),
    (["--duration-s", "nan"], "--duration-s must be a finite number of seconds above 0"),
    (["--ready-timeout-s", "inf"], "--ready-timeout-s must be a finite number"),
    (["--steps", "0"], "--steps must be between 1 and 999"),  # was a list of six rules, the broken one unsaid
    (["--concurrency", "1,40"], "--concurrency 40 is above --requests 32"),  # was measured as 32 clients
    (["--size", "7x7"], "--size 7x7: at least 8 pixels a side"),  # was said once a server had started
    (["--url", "notaurl"], "--url 'notaurl' is not an http:// or https:// address"),  # was "no answer"
    (["--seed", "-1"], "--seed must be between 0 and"),  # were tracebacks, once a server had started
    (["--concurrency", "0,2"], "every concurrency must be at least 1"),
    # Were measured as 1,4 and 1,2, the typo unsaid, as `zone bench --backends` refuses them.
    (["--concurrency", "1,,4"], "'1,,4': entry 2 is empty (a comma too many?); give the numbers of clients between "
                                "commas, e.g. 1,2,4,8"),
    (["--concurrency", ","], "entry 1 is empty"),  # was "every concurrency must be at least 1"
    (["--concurrency", "2,1,2"], "'2,1,2' names 2 more than once: name each level once"),
    (["--requests", "0"], "--requests must be at least 1"),
    (["--timeout-s", "0"], "--timeout-s must be a finite number of seconds above 0"),
    (["--out", "/etc/passwd"], "--out /etc/passwd: /etc/passwd is a file"),
])
def test_a_value_the_servers_would_refuse_is_said_by_its_option_first(tmp_path, capsys, option, words):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--out", str(tmp_path / "out"), *option])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def option_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_servers_queue_holds_a_whole_batch_and_every_client():
    """The server's default queue (32) refuses a larger --max-batch at start, and 503s clients beyond it."""
    config = parse_args(["--out", "x", "--max-batch", "64", "--concurrency", "80,1", "--requests", "80"])
    assert config.concurrency == (1, 80)  # the report and chart are keyed by concurrency: in order
    command = server_command(config, "batching", 8000)
    assert option_value(command, "--queue-size") == "80" and option_value(command, "--max-batch") == "64"
    # Warmed up at the load test's size and steps (every padded batch size) before ready; its steps admitted.
    many_steps = server_command(parse_args(["--out", "x", "--size", "96x64", "--steps", "150"]), "batching", 8000)
    assert [option_value(many_steps, flag) for flag in ("--warmup-size", "--steps", "--max-steps")] == \
        ["96x64", "150", "150"]
    ServeSettings(max_batch=64, queue_size=80).check_local_batching()  # what that server builds: valid
    override = parse_args(["--out", "x", "--server-arg=--queue-size=100"])
    assert server_command(override, "no-batching", 8000)[-1] == "--queue-size=100"  # after ours: it wins


def test_latency_percentiles_and_the_batching_ratio_by_their_definitions():
    """p50 <= p95 <= p99 held for any increasing percentiles; a ratio inverted passed "> 0"."""
    from zone_benchmarks.load_test import _percentiles_ms, throughput_ratio

    percentiles = _percentiles_ms([0.001 * i for i in range(1, 101)])  # 1..100 ms
    assert percentiles == pytest.approx({"p50": 50.5, "p95": 95.05, "p99": 99.01, "mean": 50.5, "max": 100.0})
    results = [{"mode": "batching", "levels": [{"concurrency": 1, "edits_per_s": 2.0},
                                               {"concurrency": 4, "edits_per_s": 8.0}]},
               {"mode": "no-batching", "levels": [{"concurrency": 1, "edits_per_s": 2.0},
                                                  {"concurrency": 4, "edits_per_s": 2.0}]}]
    assert throughput_ratio(results) == {"1": 1.0, "4": 4.0}
    # No edit succeeded without batching: no ratio, not a ZeroDivisionError that loses the whole record.
    results[0]["levels"].append({"concurrency": 8, "edits_per_s": 1.0})
    results[1]["levels"].append({"concurrency": 8, "edits_per_s": 0.0})
    assert throughput_ratio(results)["8"] is None


def test_requests_a_level_gave_up_on_are_counted_in_that_level_not_the_next(pipe, tmp_path):
    """The next level's "before" scrape came while the server still ran the edits whose clients had timed out:
    their `cancelled` outcomes were counted in the next level."""
    image = seeded_png(64, 64, 0)
    with serving(pipe) as (base, _):
        # 50 steps (a few seconds; cancelled at the step after the server sees the client gone, polled every
        # 0.25 s) outlast a 0.5 s timeout on any machine: 2 steps and 0.05 s could end before the server looked,
        # counted ok, or time out connecting on a loaded one.
        impatient = asyncio.run(measure_level(base, 2, LoadConfig(out=tmp_path, requests=2, steps=50, timeout_s=0.5),
                                              image))
        patient = asyncio.run(measure_level(base, 2, LoadConfig(out=tmp_path, requests=2, steps=2), image))
        # The level's scrapes are not held to the edits' timeout: under load one took over 50 ms, and the
        # level's server-side figures were lost.
        async def scraped_by_an_impatient_client() -> dict | None:
            async with httpx.AsyncClient(timeout=1e-6) as client:
                return await scrape(client, base)

        assert "zone_queue_depth" in asyncio.run(scraped_by_an_impatient_client())
    assert impatient["errors"] == {"ReadTimeout": 2} and impatient["server_outcomes"]["cancelled"] == 2
    assert patient["ok"] == 2 and {outcome: n for outcome, n in patient["server_outcomes"].items() if n} == {"ok": 2}


def test_a_level_with_failed_requests_is_said_in_the_table_and_marked_on_the_chart(tmp_path):
    """Its edits/s and p95 (of the successes alone) were drawn and ratioed as if every request had succeeded."""
    from zone_benchmarks.load_test import table, write_plot

    def level(concurrency, ok):
        return {"concurrency": concurrency, "sent": 8, "ok": ok, "errors": {"ReadTimeout": 8 - ok} if ok < 8 else {},
                "edits_per_s": ok / 2, "mean_batch_size": None,
                "latency_ms": {"p50": 100.0, "p95": 200.0, "p99": 300.0, "mean": 120.0, "max": 300.0}}

    record = {"settings": {"size": [64, 64], "steps": 2, "requests": 8, "duration_s": 60},
              "machine": {"cpu_model": "cpu", "cpu_count": 2, "server_device": "cpu"},
              "results": [{"mode": "batching", "levels": [level(4, 8), level(1, 8)]},  # out of order: drawn in order
                          {"mode": "no-batching", "levels": [level(1, 8), level(4, 2)]}],
              "throughput_ratio": {"1": 1.0, "4": 2.0}}
    assert "**Requests failed**: no-batching at 4 (6 of 8); edits/s, latencies and ratios there count the " \
        "successful edits only." in table(record)
    assert write_plot(record, tmp_path / "load.png") and (tmp_path / "load.png").read_bytes()[:8] == PNG_SIGNATURE


def test_each_server_runs_its_mode_with_the_load_tests_options():
    """Only the batching command was checked: a no-batching server that batched, a --device or --no-tiny not
    passed on, or a --max-batch above every level and the server's 32 (a server that refuses to start) passed."""
    config = parse_args(["--out", "x", "--max-batch", "64", "--concurrency", "1,2", "--no-tiny", "--device", "cuda:1"])
    batching, alone = server_command(config, "batching", 8000), server_command(config, "no-batching", 8000)
    assert (option_value(alone, "--max-batch"), option_value(alone, "--max-wait-ms")) == ("1", "0")
    assert option_value(batching, "--queue-size") == "64" and option_value(batching, "--device") == "cuda:1"
    assert "--tiny" not in batching and "--tiny" in server_command(parse_args(["--out", "x"]), "batching", 8000)
    # The server's own --max-steps is kept: a --server-arg=--steps up to it still starts.
    assert option_value(batching, "--max-steps") == str(ServeSettings.max_steps)


def test_a_server_answering_but_not_200_is_not_ready_and_has_no_metrics(tmp_path):
    """A loading server answers /readyz 503: only a 200 is ready. A /metrics that is not 200 gives no server-side
    figures (None), not figures of zero."""
    (tmp_path / "readyz").write_text("ready")  # http.server: /readyz 200, /metrics 404
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]

    async def scraped(base: str) -> dict[str, float] | None:
        async with httpx.AsyncClient() as client:
            return await scrape(client, base)

    with local_server(command, port, tmp_path / "server.log", ready_timeout_s=30) as base:
        assert asyncio.run(scraped(base)) is None
    (tmp_path / "readyz").unlink()  # /readyz 404 now
    with (pytest.raises(LoadTestError, match="not ready within 1 s"),
          local_server(command, port, tmp_path / "server.log", ready_timeout_s=1)):
        pass


def test_a_server_is_asked_to_stop_and_killed_only_when_it_does_not():
    """SIGTERM first (uvicorn finishes the open requests); SIGKILL once the grace period is over."""
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop(polite)
    assert polite.returncode == -signal.SIGTERM
    ignoring = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ignoring', flush=True); " \
               "time.sleep(60)"
    stubborn = subprocess.Popen([sys.executable, "-c", ignoring], stdout=subprocess.PIPE)
    try:
        stubborn.stdout.readline()  # its SIGTERM is ignored from here on
        stop(stubborn, grace_s=0.5)
        assert stubborn.returncode == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()
        stubborn.stdout.close()


def test_metrics_comment_lines_are_not_samples():
    """A # HELP text ending in a number would otherwise be read as a sample of that value."""
    text = ("# HELP zone_running Edits in the batch being run, up to 2\n# TYPE zone_running gauge\nzone_running 1.0\n"
            'zone_requests_total{outcome="ok"} 4.0\n')
    assert parse_metrics(text) == {"zone_running": 1.0, 'zone_requests_total{outcome="ok"}': 4.0}


def scrapes_in_turn(monkeypatch, states: list[tuple[int, int]]) -> None:
    """The server's metrics, one (running, queued) state a scrape, each numbered ("scrape")."""
    metrics = iter([{"zone_running": running, "zone_queue_depth": queued, "scrape": number}
                    for number, (running, queued) in enumerate(states)])

    async def scrape(client, base) -> dict[str, float]:
        return next(metrics)
    monkeypatch.setattr(load_test, "scrape", scrape)


def test_a_server_has_settled_after_two_idle_scrapes_in_a_row(monkeypatch):
    """A queued edit keeps it busy as a running one does; an idle scrape between busy ones is not settled."""
    scrapes_in_turn(monkeypatch, [(0, 0), (1, 0), (0, 0), (0, 1), (0, 0), (0, 0), (1, 0)])
    assert asyncio.run(settled(None, "http://server", limit_s=60))["scrape"] == 5
    scrapes_in_turn(monkeypatch, [(1, 0), (1, 0)])  # never idle: the limit ends the wait
    assert asyncio.run(settled(None, "http://server", limit_s=0))["scrape"] == 0


def test_server_side_figures_are_the_difference_between_the_scrapes():
    """An outcome first counted in the level is new in its second scrape; a level without batches has no mean."""
    before = {"zone_batch_size_count": 2.0, "zone_batch_size_sum": 5.0}
    after = {**before, 'zone_requests_total{outcome="queue_full"}': 3.0}
    assert server_side(before, after) == {"batches": 0, "mean_batch_size": None, "server_outcomes": {"queue_full": 3}}


def answering(monkeypatch, status: int) -> list[int]:
    """Every edit answered with `status` and no server: the seeds the edits were sent with, in order."""
    seeds = []

    async def post_edit(client, base, image, config, seed) -> httpx.Response:
        seeds.append(seed)
        return httpx.Response(status)
    monkeypatch.setattr(load_test, "post_edit", post_edit)
    return seeds


def test_each_edit_has_a_seed_of_its_own_and_the_warm_up_none_of_the_measured_ones(monkeypatch, tmp_path):
    """One seed for all would measure the same edit over and over; the --seed check bounds seeds
    seed..seed+requests+warmup-1, the warm-up's after the measured ones."""
    seeds = answering(monkeypatch, 200)
    config, base = LoadConfig(out=tmp_path, requests=3, warmup=2, seed=10), f"http://127.0.0.1:{free_port()}"
    asyncio.run(load_test.warm_up(base, config, b""))
    assert asyncio.run(measure_level(base, 1, config, b""))["ok"] == 3
    assert seeds == [13, 14, 10, 11, 12]


def test_an_answer_other_than_200_is_an_error_named_by_its_status(monkeypatch, tmp_path):
    answering(monkeypatch, 400)
    level = asyncio.run(measure_level(f"http://127.0.0.1:{free_port()}", 1, LoadConfig(out=tmp_path, requests=2), b""))
    assert level["ok"] == 0 and level["errors"] == {"HTTP 400": 2} and level["latency_ms"]["p50"] is None


def test_a_refusal_is_told_from_a_failure_by_the_servers_error_code(monkeypatch, tmp_path):
    """A full queue's 503 (backpressure working) and a stopping server's 503 were both "HTTP 503"; an answer
    without the service's error body (a proxy's, FastAPI's own 404, a code that is no string) keeps its status
    alone."""
    answers = iter([httpx.Response(503, json={"error": {"code": "queue_full", "message": "..."}}),
                    httpx.Response(503, json={"error": {"code": "unavailable", "message": "..."}}),
                    httpx.Response(502, text="Bad Gateway"), httpx.Response(503, json=["no", "error", "shape"]),
                    httpx.Response(404, json={"detail": "Not Found"}),
                    httpx.Response(500, json={"error": {"code": 7}})])

    async def post_edit(client, base, image, config, seed) -> httpx.Response:
        return next(answers)
    monkeypatch.setattr(load_test, "post_edit", post_edit)
    level = asyncio.run(measure_level(f"http://127.0.0.1:{free_port()}", 1, LoadConfig(out=tmp_path, requests=6), b""))
    assert level["errors"] == {"HTTP 503 queue_full": 1, "HTTP 503 unavailable": 1, "HTTP 502": 1, "HTTP 503": 1,
                               "HTTP 404": 1, "HTTP 500": 1}


def _served(monkeypatch, answer: Callable[[], httpx.Response]) -> list[float]:
    """The load test's edits answered `answer()`, and its asyncio.sleep not waiting but recording the waits asked
    for, in the list returned."""
    waits = []

    async def post_edit(client, base, image, config, seed) -> httpx.Response:
        return answer()

    async def sleep(seconds, *args):
        waits.append(seconds)
    monkeypatch.setattr(load_test, "post_edit", post_edit)
    monkeypatch.setattr(asyncio, "sleep", sleep)
    return waits


def test_a_refused_client_waits_as_its_retry_after_says_before_its_next_edit(monkeypatch, tmp_path):
    """Each client sent its next edit at once after a 503 or 429, whatever its Retry-After: an overloaded server's
    level was over in a blink of refusals. The wait is capped (MAX_RETRY_AFTER_S), read as seconds or an HTTP date,
    and not taken after the level's last request."""
    in_30_s = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    answers = iter([httpx.Response(503, headers={"Retry-After": "2"}), httpx.Response(429, headers={"Retry-After":
                    "3600"}), httpx.Response(503, headers={"Retry-After": in_30_s}), httpx.Response(503),
                    httpx.Response(500, headers={"Retry-After": "9"}), httpx.Response(200),
                    httpx.Response(503, headers={"Retry-After": "7"})])
    waits = _served(monkeypatch, lambda: next(answers))
    config = LoadConfig(out=tmp_path, requests=7, duration_s=1000)
    level = asyncio.run(measure_level(f"http://127.0.0.1:{free_port()}", 1, config, b""))
    assert level["sent"] == 7 and level["ok"] == 1
    assert len(waits) == 3 and waits[0] == 2 and 25 < waits[2] <= 30, waits
    assert waits[1] == load_test.MAX_RETRY_AFTER_S  # 3600 s asked
    assert level["waited_s"] == sum(waits)


def test_a_retry_after_past_the_levels_end_is_waited_until_its_end_only(monkeypatch, tmp_path):
    """From a mutation audit: the wait's cap at the level's deadline went untested; without it a Retry-After of 30 s
    held a level of --duration-s 5 half a minute past its end."""
    waits = _served(monkeypatch, lambda: httpx.Response(503, headers={"Retry-After": "30"}))
    level = asyncio.run(measure_level(f"http://127.0.0.1:{free_port()}", 1, LoadConfig(out=tmp_path, requests=2,
                                                                                          duration_s=5), b""))
    assert level["sent"] == 2 and len(waits) == 1 and 0 < waits[0] <= 5, waits


def test_a_request_without_an_answer_is_counted_and_no_wait_follows(monkeypatch, tmp_path):
    """From a mutation audit: a refused connection (the server down or restarting) has no Retry-After to heed, and
    the client goes on at once; a wait there went unseen."""
    waits = []

    def refused() -> httpx.Response:
        raise httpx.ConnectError("refused")

    waits = _served(monkeypatch, refused)
    level = asyncio.run(measure_level(f"http://127.0.0.1:{free_port()}", 1, LoadConfig(out=tmp_path, requests=3,
                                                                                          duration_s=1000), b""))
    assert level["errors"] == {"ConnectError": 3} and level["waited_s"] == 0 and waits == []


@pytest.mark.parametrize("said", ["soon", "1.5", "-3", "Wed, 21 Oct 2015 07:28:00 -0000"])
def test_a_retry_after_the_client_cannot_read_is_no_wait_not_an_error(said):
    """From a mutation audit: a Retry-After neither whole seconds nor an HTTP date with its time zone (a ValueError,
    or a TypeError for the naive date) was caught untested; uncaught, it ended the client's worker and the level."""
    assert load_test.retry_after_s(httpx.Response(503, headers={"Retry-After": said})) == 0.0


def test_a_level_without_a_successful_edit_exits_1_after_its_report(tmp_path, capsys):
    """The server down (no warm-up to find it so) or every edit refused exited 0 with a table of 0 edits/s: a
    script or CI job took that for a measurement."""
    argv = ["--url", f"http://127.0.0.1:{free_port()}", "--concurrency", "1", "--requests", "2", "--warmup", "0",
            "--out", str(tmp_path)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "| external | 1 | 2 | 0 | ConnectError: 2 |" in captured.out
    assert "load test: no edit succeeded at external at 1" in captured.err
    assert json.loads((tmp_path / "load.json").read_text())["results"][0]["levels"][0]["ok"] == 0


def test_every_level_without_a_successful_edit_is_named_and_an_interrupt_still_exits_130(monkeypatch, tmp_path,
                                                                                          capsys):
    """Levels 1 and 3 refused every edit, level 2 two of its three: the first and the third are named, not the second
    (from a mutation audit: naming the first level alone, or a level of one success, passed). Ctrl-C after such a
    level exits 130, as any interrupted run does."""
    statuses, seen = [503] * 3 + [200, 503, 503] + [503] * 3, []

    async def post_edit(client, base, image, config, seed) -> httpx.Response:
        return httpx.Response(statuses.pop(0))
    monkeypatch.setattr(load_test, "post_edit", post_edit)
    argv = ["--url", f"http://127.0.0.1:{free_port()}", "--concurrency", "1,2,3", "--requests", "3", "--warmup", "0"]
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 1
    assert "no edit succeeded at external at 1, external at 3 (see" in capsys.readouterr().err
    measure = load_test.measure_level

    async def interrupted_at_the_second(*args):
        seen.append(args)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return await measure(*args)
    statuses += [503] * 3
    monkeypatch.setattr(load_test, "measure_level", interrupted_at_the_second)
    assert main([*argv, "--out", str(tmp_path / "interrupted")]) == 130
    assert "no edit succeeded" not in capsys.readouterr().err


def test_no_server_or_a_failed_warm_up_exits_2_saying_why(monkeypatch, tmp_path, capsys):
    """Exit 2, as the help says, with the reason; not a traceback, nor levels measured against a broken server."""
    base = f"http://127.0.0.1:{free_port()}"
    argv = ["--url", base, "--concurrency", "1", "--requests", "1", "--out", str(tmp_path)]
    assert main(argv) == 2 and "no answer from the server (ConnectError" in capsys.readouterr().err
    answering(monkeypatch, 500)
    assert main(argv) == 2 and f"the warm-up edit at {base} failed: HTTP 500" in capsys.readouterr().err
    assert not (tmp_path / "load.json").exists()


def test_a_warm_up_edit_refused_with_retry_after_is_sent_again_after_that_wait(monkeypatch, tmp_path, capsys):
    """A server still loading (503 `unavailable`, Retry-After 5) or with a full queue failed the run at its first
    warm-up edit (exit 2), where the levels' clients wait and retry. Waits as told, capped; within
    --ready-timeout-s in all, then said with the option to raise; a 503 without Retry-After (a failed load) still
    fails at once."""
    refused = httpx.Response(503, headers={"Retry-After": "5"}, json={"error": {"code": "unavailable"}})
    answers = [refused, httpx.Response(429, headers={"Retry-After": "3600"}), httpx.Response(200),
               httpx.Response(200)]
    waits = _served(monkeypatch, lambda: answers.pop(0))
    base = f"http://127.0.0.1:{free_port()}"
    said = []
    asyncio.run(load_test.warm_up(base, LoadConfig(out=tmp_path, warmup=2), b"", said.append))
    assert waits == [5, load_test.MAX_RETRY_AFTER_S] and answers == []
    # said once, not at every retry: a silent wait of minutes looks like a hang
    assert said == ["the warm-up edit was refused (HTTP 503 unavailable): sending it again as its Retry-After says, "
                    "for up to 300 s (--ready-timeout-s)"]
    answers[:] = [refused] * 3
    with pytest.raises(LoadTestError, match=r"still refused the warm-up edit after 4 s \(--ready-timeout-s; raise"):
        asyncio.run(load_test.warm_up(base, LoadConfig(out=tmp_path, warmup=1, ready_timeout_s=4), b""))
    answers[:] = [httpx.Response(503, json={"error": {"code": "unavailable"}})]
    with pytest.raises(LoadTestError, match="the warm-up edit at .* failed: HTTP 503"):
        asyncio.run(load_test.warm_up(base, LoadConfig(out=tmp_path, warmup=1), b""))
    assert len(waits) == 2  # neither of those waited


def test_a_measured_servers_refused_warm_up_is_said_and_its_ready_timeout_kept_with_url(monkeypatch, tmp_path,
                                                                                        capsys):
    """From a mutation audit: the run itself (not warm_up called alone) says the wait for a refused warm-up edit,
    and with --url keeps --ready-timeout-s among its settings, as that wait is now this run's to set."""
    answers = [httpx.Response(503, headers={"Retry-After": "1"}, json={"error": {"code": "unavailable"}})]
    waits = _served(monkeypatch, lambda: answers.pop(0) if answers else httpx.Response(200, content=b"edited"))
    argv = ["--url", f"http://127.0.0.1:{free_port()}", "--concurrency", "1", "--requests", "1", "--warmup", "1",
            "--ready-timeout-s", "7", "--out", str(tmp_path)]
    assert main(argv) == 0 and answers == []
    assert "the warm-up edit was refused (HTTP 503 unavailable): sending it again" in capsys.readouterr().err
    assert json.loads((tmp_path / "load.json").read_text())["settings"]["ready_timeout_s"] == 7
    assert waits == [1]


def test_a_warm_up_edit_past_timeout_s_says_to_raise_it(monkeypatch, tmp_path, capsys):
    """`--steps 20 --timeout-s 0.5` on a CPU ended as "no answer from the server (ReadTimeout: )", exit 2: as if the
    server were down, and nothing said which option to change."""
    async def post_edit(client, base, image, config, seed) -> httpx.Response:
        raise httpx.ReadTimeout("")
    monkeypatch.setattr(load_test, "post_edit", post_edit)
    argv = ["--url", f"http://127.0.0.1:{free_port()}", "--concurrency", "1", "--requests", "1", "--timeout-s", "0.5",
            "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "got no answer within --timeout-s 0.5 s (ReadTimeout): raise --timeout-s" in capsys.readouterr().err


def test_a_run_stopped_between_its_servers_reports_the_first_with_its_server_options(monkeypatch, tmp_path):
    """The server that never started is left out (no empty result), and the options it was started with are
    recorded, as they were this run's to set."""
    def measure_local(config: LoadConfig, result: dict, progress) -> None:
        if result["mode"] == "no-batching":
            raise KeyboardInterrupt
        result["levels"].append({"concurrency": 1, "edits_per_s": 1.0})
    monkeypatch.setattr(load_test, "measure_local", measure_local)
    record = run_load_test(LoadConfig(out=tmp_path, max_batch=16))
    assert [result["mode"] for result in record["results"]] == ["batching"] and record["interrupted"]
    assert record["settings"]["max_batch"] == 16 and record["throughput_ratio"] == {}


def test_a_url_ending_in_a_slash_is_measured_at_its_own_paths(monkeypatch, tmp_path):
    """http://host:8000/ + /v1/edit was //v1/edit: every edit a 404."""
    bases = []

    async def measure_server(base: str, result: dict, config: LoadConfig, progress) -> None:
        bases.append(base)
        result["levels"].append({"concurrency": 1, "edits_per_s": 1.0})
    monkeypatch.setattr(load_test, "measure_server", measure_server)
    run_load_test(LoadConfig(out=tmp_path, url="http://127.0.0.1:8000/"))
    assert bases == ["http://127.0.0.1:8000"]


def test_every_limit_itself_is_accepted(tmp_path, capsys):
    """Each check's bound is the server's own: 8x8 images, --max-batch 256, --max-wait-ms 0, and the last --seed
    whose edits (32 measured, 2 warm-up) all have seeds."""
    last_seed = MAX_SEED - 32 - 2 + 1
    config = parse_args(["--out", str(tmp_path), "--size", "8x8", "--max-batch", "256", "--max-wait-ms", "0",
                         "--seed", str(last_seed)])
    assert (config.size, config.max_batch, config.max_wait_ms, config.seed) == ((8, 8), 256, 0.0, last_seed)
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--seed", str(last_seed + 1)])
    assert f"--seed must be between 0 and {last_seed}" in capsys.readouterr().err


def test_the_image_is_height_by_width():
    assert Image.open(io.BytesIO(seeded_png(16, 24, 0))).size == (24, 16)  # PIL's size: width, height
