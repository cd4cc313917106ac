"""The serving load test (benchmarks/load_test.py): against an in-process server of tiny models its record
adds up, it stops by itself, counts what fails, and stops the servers it starts."""

from __future__ import annotations

import pytest

from zone_engine.cli import SERVE_MODULES

for _module in (*SERVE_MODULES, "httpx"):
    pytest.importorskip(_module, reason="the service needs the serve extra: pip install -e '.[serve]'")

import asyncio
import json
import sys
import time

import httpx
from test_serving import serving

from zone_benchmarks.load_test import (
    LoadConfig,
    LoadTestError,
    free_port,
    local_server,
    main,
    measure_level,
    parse_args,
    scrape,
    seeded_png,
    server_command,
)
from zone_engine import ZonePipeline
from zone_engine.config import EditConfig, SamConfig
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
    (["--out", "/etc/passwd"], "--out /etc/passwd: /etc/passwd is a file"),
])
def test_a_value_the_servers_would_refuse_is_said_by_its_option_first(tmp_path, capsys, option, words):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--out", str(tmp_path / "out"), *option])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_the_servers_queue_holds_a_whole_batch_and_every_client():
    """The server's default queue (32) refuses a larger --max-batch at start, and 503s clients beyond it."""
    config = parse_args(["--out", "x", "--max-batch", "64", "--concurrency", "80,1,80", "--requests", "80"])
    assert config.concurrency == (1, 80)  # the report and chart are keyed by concurrency: in order, each once
    command = server_command(config, "batching", 8000)
    assert command[command.index("--queue-size") + 1] == "80" and command[command.index("--max-batch") + 1] == "64"
    # Warmed up at the load test's size and steps (every padded batch size) before ready; its steps admitted.
    many_steps = server_command(parse_args(["--out", "x", "--size", "96x64", "--steps", "150"]), "batching", 8000)
    assert [many_steps[many_steps.index(flag) + 1] for flag in ("--warmup-size", "--steps", "--max-steps")] == \
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
