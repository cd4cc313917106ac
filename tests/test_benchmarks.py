"""The benchmark harness on tiny models: it runs end to end, writes its reports, and its baseline
computes what the engine computes (ZONE.md), by the reference's road."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from zone_benchmarks import harness, measure
from zone_benchmarks.baseline import (
    STORED_MAX_QUERIES,
    AttentionStore,
    ReferenceStyleZone,
    drop_small_components,
    get_finemask_everything,
    subtract_fft_images,
)
from zone_benchmarks.harness import run_benchmark
from zone_benchmarks.measure import Deadline, OutOfTime
from zone_benchmarks.options import PRESETS
from zone_benchmarks.options import bench_main as main
from zone_benchmarks.options import parse_bench_args as parse_args
from zone_benchmarks.report import (
    REST_OF_TOTAL,
    agreement_table,
    batched_table,
    chart_segments,
    floor_lines,
    format_bytes,
    format_seconds,
    layout,
    markdown,
    stage_table,
    write_reports,
)
from zone_engine import Action, EditConfig, SamConfig, ZonePipeline, backends, pipeline
from zone_engine.denoise import BatchDenoiser
from zone_engine.errors import ZoneError
from zone_engine.image_io import make_sample_image, working_geometry
from zone_engine.pipeline import STAGES
from zone_engine.sam_onnx import TRT_CACHE
from zone_engine.timing import Stopwatch

INSTRUCTION = "make the dog a golden statue"


@pytest.fixture(scope="module", autouse=True)
def small_matmul_ceiling():
    """The harness's ceiling from 256² products: 2048² ones, 13 at the start and 13 at the end, are 5 s of each
    run on 2 cores, and what the floor makes of a ceiling does not depend on its size. Module-wide: before the
    module's own fixtures' runs (batched_record)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "matmul_peak", lambda device, dtype: measure.matmul_peak(device, dtype, size=256))
        yield


@pytest.fixture(scope="module")
def pipe():
    # Tiny models seed 2: its attention maps give a partial M_b once the threshold is lowered, so
    # mask equality below is a real check, not two all-true masks.
    return ZonePipeline.tiny(seed=2)


@pytest.fixture(scope="module")
def baseline(pipe):
    return ReferenceStyleZone(pipe.models, pipe.device)


def test_a_charts_bar_is_as_tall_as_its_total_and_the_layout_line_says_what_ran():
    """The bars stacked the stages alone under the total's label (182.2 ms over a 164.4 ms bar); a CPU run's
    layout line told CUDA's default."""
    run = {"stages": {**{stage: {"median": 0.1} for stage in STAGES}, "total": {"median": 1.0}}}
    segments = chart_segments(run)
    assert list(segments) == [*STAGES, REST_OF_TOTAL] and segments[REST_OF_TOTAL] == pytest.approx(0.2)
    assert sum(segments.values()) == pytest.approx(1.0)
    run["stages"]["total"]["median"] = 0.7  # medians need not add up: a total's below the stages' sum
    assert chart_segments(run)[REST_OF_TOTAL] == 0
    assert layout({"channels_last": None, "unets_channels_last": True}) == " (default layout: the UNets channels-last)"
    assert layout({"channels_last": False, "unets_channels_last": False}) == " (contiguous layout)"


def test_harness_runs_end_to_end_and_writes_reports(tmp_path):
    assert main(["--preset", "tiny-smoke", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench-tiny-smoke.json").read_text())
    timed = [run for run in record["runs"] if "skipped" not in run]
    assert [run["name"] for run in timed][0] == "baseline" and len(timed) >= 2
    for run in timed:
        assert set(run["stages"]) == {*STAGES, "total"}
        assert all(run["stages"][stage]["median"] >= 0 for stage in STAGES)
        assert run["per_step"]["n"] >= 1 and run["per_step_source"]
        assert run["peak_memory"]["bytes"] > 0 and run["throughput"]["edits_per_s"] > 0
    eager = next(run for run in timed if run["name"] == "engine:eager")
    assert eager["per_step"]["n"] == 2  # one mark per step of the 2 steps
    assert eager["group_norms"] == {"unets": "pytorch", "vae": "pytorch"}  # the CPU's auto
    assert all("group_norms" not in run for run in timed if run["name"] == "baseline")
    assert record["parity"]["mask_b_identical"] and record["parity"]["max_pixel_diff_styled"] <= 1
    assert record["floor"]["unet_gflop_per_row"] > 0 and record["machine"]["torch"]
    # The figures from the timings, by their definitions (a ratio inverted or a constant changed passed "> 0").
    base_total = timed[0]["stages"]["total"]["median"]
    assert record["speedup"] == pytest.approx({run["name"]: base_total / run["stages"]["total"]["median"]
                                               for run in timed})
    assert record["speedup"]["baseline"] == 1.0
    for run in timed:
        throughput = run["throughput"]
        assert throughput["edits_per_s"] == pytest.approx(throughput["requests"] / throughput["wall_s"])
    floor, steps = record["floor"], record["config"]["steps"]
    assert floor["rows_per_step"] == 6  # 2 UNets x 3 guidance rows (ZONE.md's cost model)
    assert floor["denoise_tflop"] == pytest.approx(floor["unet_gflop_per_row"] * 6 * steps / 1e3)
    for ceiling in floor["ceilings"]:
        assert ceiling["step_floor_s"] == pytest.approx(floor["unet_gflop_per_row"] * 1e9 * 6 / ceiling["flops_per_s"])
        assert ceiling["gap"]["engine:eager"] == pytest.approx(
            eager["stages"]["denoise"]["median"] / (ceiling["step_floor_s"] * steps))
    table = (tmp_path / "bench-tiny-smoke.md").read_text(encoding="utf-8")  # as written, whatever LC_ALL says
    assert "| baseline (fp32) |" in table and "engine:eager" in table
    assert "- GroupNorms (--group-norm auto): engine:eager UNets pytorch, VAE pytorch; " in table
    assert record["config"]["unets_channels_last"] is False and "fp32 (default layout: contiguous)" in table
    assert f"- rounds: {harness.round_order(torch.float32)}" in table and "interleaved" in record["config"]["rounds"]
    assert (tmp_path / "bench-tiny-smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Batches of concurrent edits (the preset's batch of 2): measured where the denoiser batches.
    assert record["config"]["batch"] == 2
    fused = next(run for run in timed if run["name"] == "engine:fused")["batched_throughput"]
    assert fused["batch"] == 2 and fused["batches"] == record["config"]["repeats"] and "error" not in fused
    assert fused["edits_per_s"] > 0 and fused["wall_s_per_batch"]["n"] == fused["batches"]
    assert fused["edits_per_s"] == pytest.approx(
        fused["batch"] * fused["batches"] / sum(fused["wall_s_per_batch"]["samples"]))
    assert fused["speedup_vs_sequential"] == pytest.approx(
        fused["edits_per_s"] / next(run for run in timed if run["name"] == "engine:fused")["throughput"]["edits_per_s"])
    assert fused["denoised_as_one_batch"] and fused["denoise_runs"] == [[2]] * fused["batches"]
    assert fused["per_step"]["n"] == 2 * fused["batches"] and fused["peak_memory"]["bytes"] > 0
    # At 64² the tiny UNet's innermost level is 1x1, where BLAS picks another kernel for 3 rows
    # than for 6: fp32 rounding, one uint8 level here. At 128² it is exact (next test).
    assert fused["first_vs_sequential"]["max_pixel_diff_image"] <= 1
    for name in ("baseline", "engine:eager"):  # no batched path: marked, not measured
        batched = next(run for run in timed if run["name"] == name)["batched_throughput"]
        assert set(batched) == {"batch", "not_applicable"} and batched["batch"] == 2
    assert "## Throughput: sequential vs batched (batches of 2 concurrent edits)" in table
    assert "| engine:eager (fp32) |" in table.split("## Throughput")[1].split("##")[0]

    # The ONNX Runtime refinement row (SAM exported in the run): the same output as the baseline's.
    assert record["sam_onnx_export_s"] > 0
    assert record["quality"]["engine:fused+sam-onnx"]["mask_b_identical"]
    assert record["quality"]["engine:fused+sam-onnx"]["iou_mask_f"] == 1.0
    # The row with SAM's image encoder in bf16: timed, its masks compared with the baseline's in the run.
    bf16_sam = next(run for run in timed if run["name"] == "engine:fused+sam-bf16")
    assert bf16_sam["stages"]["refine"]["median"] > 0
    assert record["quality"]["engine:fused+sam-bf16"]["mask_b_identical"]  # localization does not use SAM
    assert 0.0 <= record["quality"]["engine:fused+sam-bf16"]["iou_mask_f"] <= 1.0


def test_without_matplotlib_the_reports_are_written_and_the_chart_said_skipped(batched_record, tmp_path,
                                                                               monkeypatch):
    """The chart was written last, with matplotlib imported only then: a run of many minutes ended in an
    ImportError."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what importing it does where it is not installed
    paths = write_reports(batched_record, tmp_path)
    assert set(paths) == {"json", "markdown"} and all(path.exists() for path in paths.values())
    assert not list(tmp_path.glob("*.png"))


def test_the_markdown_report_is_utf8_whatever_the_locale(batched_record, tmp_path):
    """Under LC_ALL=C with PYTHONUTF8=0 its "128²" was an encode error's traceback at the end of the run (the
    locale's ASCII), the run's minutes lost."""
    record = json.loads(json.dumps(batched_record))
    (tmp_path / "record.json").write_text(json.dumps(record), encoding="utf-8")
    script = ("import json, sys; from pathlib import Path; sys.modules['matplotlib'] = None; "
              "from zone_benchmarks.report import write_reports; "
              "write_reports(json.loads(Path('record.json').read_text(encoding='utf-8')), Path('out'))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    (written,) = (tmp_path / "out").glob("*.md")
    assert "²" in markdown(record) and written.read_text(encoding="utf-8") == markdown(record)


def test_the_dual_unet_benchmark_under_an_ascii_locale_escapes_its_table_not_a_traceback():
    """Run as a script under LC_ALL=C with PYTHONUTF8=0, its header's "64²" was an encode error's traceback (the
    locale's ASCII) once the UNets had been timed, exit 1 and no table."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    run = subprocess.run([sys.executable, "-m", "zone_benchmarks.bench_dual_unet", "--models", "tiny", "--resolution",
                          "64", "--repeats", "1", "--device", "cpu"], env=env, capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert b"64\\xb2 (8\\xb2 latent)" in run.stdout and b"two-calls" in run.stdout


def test_the_refine_benchmark_under_an_ascii_locale_escapes_its_table_not_a_traceback():
    """From a mutation audit: of the four scripts' stdout_kept only bench_dual_unet's was tested; bench_refine's
    "64² image" line was an encode error's traceback under LC_ALL=C with PYTHONUTF8=0 without it."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    run = subprocess.run([sys.executable, "-m", "zone_benchmarks.bench_refine", "--model-type", "tiny", "--size", "96",
                          "--points-per-side", "8", "--repeats", "1", "--device", "cpu", "--no-onnx"], env=env,
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert b"image encoder, one 64\\xb2 image" in run.stdout


def test_the_photo_benchmark_goes_on_past_a_reader_gone_from_its_stdout():
    """From a mutation audit: bench_photo's stdout_kept went untested; without it `bench_photo | head -0` (its
    reader gone) was a BrokenPipeError's traceback, exit 1, once the photo had been edited."""
    run = subprocess.Popen([sys.executable, "-m", "zone_benchmarks.bench_photo", "--size", "64x96", "--repeats", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run.stdout.close()  # the reader gone before the table
    with run.stderr:
        said = run.stderr.read().decode(errors="replace")
    assert run.wait(300) == 0 and "Traceback" not in said, said[-2000:]


def test_the_load_test_without_httpx_says_which_extra_to_install():
    """Its --help too was an import's traceback (ModuleNotFoundError: No module named 'httpx') on an install
    without the [bench] extra."""
    script = ("import runpy, sys; sys.modules['httpx'] = None; sys.argv = ['load_test', '--help']; "
              "runpy.run_module('zone_benchmarks.load_test', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (2, ""), out.stderr
    assert out.stderr == "load test: needs httpx: pip install 'zone-engine[bench]'\n"


def test_the_load_test_imported_without_httpx_raises_the_import_error(monkeypatch):
    """Imported (pytest.importorskip, a tool of the user's), not run: an ImportError to handle, not a SystemExit
    that ends the importer's process."""
    monkeypatch.setitem(sys.modules, "httpx", None)  # as on an install without it
    monkeypatch.delitem(sys.modules, "zone_benchmarks.load_test", raising=False)
    with pytest.raises(ModuleNotFoundError, match="httpx"):
        importlib.import_module("zone_benchmarks.load_test")


@pytest.fixture(scope="module")
def batched_record():
    """tiny-smoke at 128² with the fused backend only (no SAM rows: the end-to-end test has them) and batches of 3."""
    return run_benchmark(dataclasses.replace(PRESETS["tiny-smoke"], resolution=128, backends=("fused",), batch=3,
                                             sam_onnx=False, sam_precision=None))


def test_batched_first_edit_is_the_sequential_edit(batched_record):
    """The batch's first request is the sequential timed edit: the same image on the CPU in fp32, up to one
    level where the CPU's kernels round a row of a larger batch differently (seen on an AMD EPYC)."""
    batched = next(run for run in batched_record["runs"] if run["name"] == "engine:fused")["batched_throughput"]
    assert batched["batch"] == 3 and batched["denoised_as_one_batch"] and batched["edits_per_s"] > 0
    first = batched["first_vs_sequential"]
    assert first["mask_b_identical"] and first["mask_f_identical"]
    assert first["max_pixel_diff_image"] <= 1 and first["max_pixel_diff_styled"] <= 1


@pytest.mark.parametrize(("argv", "words"), [
    (["--repeats", "0"], "--repeats must be at least 1"), (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--steps", "5000"], "--steps must be between 1 and 999"),
    (["--resolution", "100000"], "--resolution must be a multiple of 32 between 32 and 2048"),  # numpy: 149 GiB
    (["--resolution", "33"], "--resolution must be a multiple of 32"),  # was reported as 33, worked on at 64
    (["--batch", "1000"], "--batch must be between 1 and 256"),
    (["--seed", str(2**32)], "--seed must be between 0 and 4294967295"),  # was said after the models' build
    (["--preset", "tiny-smoke", "--seed", str(2**32 - 1)], "--seed must be between 0 and 4294967294"),
    (["--time-limit", "inf"], "--time-limit must be a finite number"),
    (["--sam-points", "1000"], "--sam-points must be between 1 and 256"),
])
def test_a_value_out_of_range_is_said_by_its_option_before_any_work(capsys, argv, words):
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2 and words in capsys.readouterr().err


def test_backends_are_read_in_any_case_and_an_unknown_one_is_said(capsys):
    assert parse_args(["--backends", "Fused, EAGER"]).backends == ("fused", "eager")
    with pytest.raises(SystemExit):
        parse_args(["--backends", "fused,tensorrtt"])
    assert "--backends: unknown tensorrtt; the denoisers are" in capsys.readouterr().err


@pytest.mark.parametrize(("backends", "words"), [
    ("fused,,eager", "--backends 'fused,,eager': entry 2 is empty (a comma too many?)"),
    ("fused,", "--backends 'fused,': entry 2 is empty"),
    # Naming none at all is said as such (from a mutation audit: it went untested), not as an empty first entry.
    ("", "--backends names no denoiser: give one or more of"), (" , ", "--backends names no denoiser"),
    # Twice the same was two rows of one name, whose speed-up and quality entries overwrote each other; then
    # collapsed into one, unsaid: a typo for another backend dropped its row.
    ("Fused, fused,EAGER", "--backends 'Fused, fused,EAGER' names fused more than once: name each denoiser once"),
])
def test_an_empty_or_repeated_backend_is_refused_not_left_out(capsys, backends, words):
    """`--backends fused,,eager` ran fused and eager, the empty entry (a name left out?) skipped unsaid."""
    with pytest.raises(SystemExit) as stop:
        parse_args(["--backends", backends])
    assert stop.value.code == 2 and words in capsys.readouterr().err


def test_the_tensorrt_row_reads_its_engines_from_the_engines_option(capsys):
    """There was no way to give the tensorrt row an engine folder: it was always skipped ("needs --engines")."""
    config = parse_args(["--backends", "fused,tensorrt", "--engines", "engines"])
    rows = harness.EngineRows(config, None, torch.device("cpu"), None, None)
    assert rows._backend_options("tensorrt")() == {"engines": Path("engines")}
    assert rows._backend_options("fused")() == {}  # the other rows take no folder (ZonePipeline would refuse one)
    assert harness.EngineRows(parse_args([]), None, None, None, None)._backend_options("tensorrt")() == {}
    with pytest.raises(SystemExit):
        parse_args(["--backends", "fused", "--engines", "engines"])
    assert "--engines is read by the tensorrt row only" in capsys.readouterr().err


def test_the_help_says_each_presets_backends(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # argparse's wrapping would break "cpu-smoke" at its hyphen
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "cpu-smoke = sd15 models" in text and "1 timed edit after" in text
    # Not "default all" as the help said, for every preset; the variant rows and SAM's thresholds too.
    assert "backends eager,fused, variant rows none; cpu-256" in text
    assert "gpu-512 = sd15 models, 512 px, 20 steps, fp16, SAM vit_h (32 points a side, IoU/stability thresholds " \
        "0.88/0.95)" in text and "variant rows +sam-onnx +sam-bf16 +gn-torch;" in text


@pytest.mark.parametrize(("make", "words"), [
    (lambda out: (out / "bench-tiny-smoke.md").mkdir(parents=True), "holds a folder named bench-tiny-smoke.md"),
    (lambda out: out.mkdir() or (out / "sam-onnx-tiny").touch(), "--out's SAM export folder"),
])
def test_a_report_path_that_is_taken_is_said_before_any_work(tmp_path, capsys, make, words):
    """Said after the whole run before, as a traceback (the reports, or SAM's export, lost)."""
    out = tmp_path / "out"
    make(out)
    with pytest.raises(SystemExit) as stop:
        parse_args(["--preset", "tiny-smoke", "--sam-onnx", "--out", str(out)])
    assert stop.value.code == 2 and words in capsys.readouterr().err


def test_device_names_and_choices_are_read_as_zone_edit_reads_them(capsys):
    config = parse_args(["--preset", "TINY-SMOKE", "--device", "CUDA:1", "--dtype", "FP16", "--action", "Remove"])
    assert (config.preset, config.device, config.dtype, config.action.value) == ("tiny-smoke", "cuda:1", "fp16",
                                                                                 "remove")
    with pytest.raises(SystemExit):
        parse_args(["--device", "tpu"])
    assert "device 'tpu' is not one the engine runs on" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # before torch's import, and naming the option the user never typed
        parse_args(["--preset", "gpu-512", "--device", "cpu"])
    assert "--dtype fp16 (the gpu-512 preset's unless given) runs only on CUDA: on the CPU pass --dtype fp32" in \
        capsys.readouterr().err
    assert parse_args(["--preset", "gpu-512", "--device", "cpu", "--dtype", "fp32"]).dtype == "fp32"


def test_batch_option_and_no_batched_report_without_it(batched_record):
    assert parse_args(["--preset", "tiny-smoke", "--batch", "5"]).batch == 5
    assert parse_args(["--preset", "cpu-smoke"]).batch == 1 and PRESETS["gpu-throughput"].batch > 1
    with pytest.raises(SystemExit):
        parse_args(["--batch", "0"])
    assert parse_args(["--preset", "gpu-512", "--channels-last"]).channels_last
    with pytest.raises(SystemExit):  # fp32 engine rows share the baseline's weights: the layout would change it
        parse_args(["--preset", "cpu-256", "--channels-last"])
    assert parse_args([]).group_norm == "auto" and parse_args(["--group-norm", "torch"]).group_norm == "torch"
    assert "## Throughput: sequential vs batched (batches of 3" in markdown(batched_record)
    # batch 1 (or a record from before the batched measurement): no table
    sequential_only = {**batched_record, "runs": [{k: v for k, v in run.items() if k != "batched_throughput"}
                                                  for run in batched_record["runs"]]}
    assert "Throughput: sequential vs batched" not in markdown(sequential_only)


def failing_when_batching(monkeypatch, message: str) -> None:
    """Make the engine rows whose denoiser batches (fused) raise `message` in every edit."""
    def engine_edit(pipe, *args):
        edit = harness.engine_edit_unpatched(pipe, *args)
        if not isinstance(pipe.denoiser.denoiser, BatchDenoiser):
            return edit

        def broken():
            raise RuntimeError(message)
        return broken
    monkeypatch.setattr(harness, "engine_edit_unpatched", harness.engine_edit, raising=False)
    monkeypatch.setattr(harness, "engine_edit", engine_edit)


def test_each_rows_segmenter_is_made_untimed_before_its_first_edit(tiny_models, monkeypatch):
    """ONNX Runtime's sessions (and SAM's reduced-precision copy) were made inside a row's first timed refine:
    without warm-up edits, its first sample paid for them (128.8 ms against 10.8 ms at tiny-smoke)."""
    made, make = [], pipeline.make_segmenter
    monkeypatch.setattr(pipeline, "make_segmenter", lambda *args: made.append(args) or make(*args))
    config = dataclasses.replace(PRESETS["tiny-smoke"], backends=("eager", "fused"), sam_onnx=False,
                                 sam_precision="bf16")
    edit_config = EditConfig(steps=1, action=Action.CHANGE, sam=SamConfig.for_random_weights())
    rows = harness.EngineRows(config, tiny_models, torch.device("cpu"), make_sample_image(64, 64), edit_config)
    built = rows.build(torch.float32)
    assert [row.name for row in built] == ["engine:eager", "engine:fused", "engine:fused+sam-bf16"]
    assert len(made) == 3
    for row in built:
        row.edit()
    assert len(made) == 3  # no edit made one

    def failing(*args):  # ONNX Runtime's provider failing to start on the device, say: that row is skipped
        raise RuntimeError("the provider failed to start")

    monkeypatch.setattr(pipeline, "make_segmenter", failing)
    rows = harness.EngineRows(config, tiny_models, torch.device("cpu"), make_sample_image(64, 64), edit_config)
    assert rows.build(torch.float32) == []
    assert {"name": "engine:fused+sam-bf16", "skipped": "the provider failed to start"} in rows.skipped


def test_a_row_this_machine_cannot_run_is_skipped_in_the_command_lines_words(tiny_models):
    """The report is read from `zone bench`: a skip said "--denoiser tensorrt (denoiser='tensorrt') needs ...",
    an option `zone bench` does not have, and a backend left out of the user's own --backends was blamed on "this
    preset's backends"."""
    config = dataclasses.replace(PRESETS["tiny-smoke"], backends=("tensorrt",), sam_onnx=False, sam_precision=None)
    rows = harness.EngineRows(config, tiny_models, torch.device("cpu"), make_sample_image(64, 64), EditConfig())
    assert rows.build(torch.float32) == []
    (skipped,) = rows.skipped
    assert skipped == {"name": "engine:tensorrt",
                       "skipped": "the tensorrt backend needs a CUDA GPU; on the CPU use the fused backend"}


def test_a_backend_left_out_of_backends_is_said_as_the_runs_choice(monkeypatch):
    """The report said "not in this preset's backends" also of a backend the user's own --backends left out."""
    class Stop(Exception):
        pass

    def engine_rows(*args, skipped, sam_export):
        seen.extend(skipped)
        raise Stop

    seen = []
    monkeypatch.setattr(harness, "EngineRows", engine_rows)
    monkeypatch.setattr(harness, "ReferenceStyleZone", lambda *args: None)
    config = dataclasses.replace(PRESETS["tiny-smoke"], backends=("fused",), warmup=1)
    with pytest.raises(Stop):
        run_benchmark(config, progress=lambda message: None)
    assert {"name": "engine:eager", "skipped": "not in this run's --backends (add ...,eager)"} in seen
    assert [row["name"] for row in seen] == [f"engine:{kind}" for kind in backends.DENOISERS if kind != "fused"]


def test_the_group_norm_comparison_row_is_the_fused_row_with_pytorchs_norm(tiny_models, monkeypatch):
    """gpu-512's "+gn-torch" row: a fused denoiser of its own with PyTorch's norms, beside the fused row's
    with the kernel (its captured steps hold the norms); skipped where it would compare nothing."""
    import zone_kernels.group_norm as norm_module
    from zone_engine.models import pytorch_norms

    monkeypatch.setattr(norm_module, "runs_on", lambda device: True)  # as under the interpreter (no edit runs here)

    def rows(**changes):
        config = dataclasses.replace(PRESETS["tiny-smoke"], **{"sam_onnx": False, "sam_precision": None,
                                                               "compare_group_norm": True, **changes})
        built = harness.EngineRows(config, tiny_models, torch.device("cpu"), np.zeros((64, 64, 3), np.uint8),
                                   EditConfig())
        return built, {row.name: row for row in built.build(torch.float32)}

    built, named = rows(backends=("fused",), group_norm="triton", sam_precision="bf16")
    assert list(named) == ["engine:fused", "engine:fused+sam-bf16", "engine:fused+gn-torch"]
    # The variant row runs on the fused row's denoiser, kernel 3 in its steps: its JSON says so (it said pytorch).
    assert named.pop("engine:fused+sam-bf16").pipe.group_norms == {"unets": "kernel 3", "vae": "kernel 3"}
    fused, pytorch = (named[name].pipe.denoiser.denoiser for name in named)  # inside the step-timing wrapper
    assert fused.norms is norm_module.triton_group_norms and pytorch.norms is pytorch_norms
    assert built.denoisers["fused"] is fused  # the variants' denoiser stays the fused row's
    assert named["engine:fused"].pipe.group_norms == {"unets": "kernel 3", "vae": "kernel 3"}
    assert named["engine:fused+gn-torch"].pipe.group_norms == {"unets": "pytorch", "vae": "pytorch"}
    already = "the fused row's norms are PyTorch's already: it would be timed twice"
    for changes, reason in (({"backends": ("eager",)}, "needs the fused backend"),
                            ({"backends": ("fused",), "group_norm": "torch"}, already),
                            ({"backends": ("fused",), "group_norm": "auto"}, already)):  # the CPU's auto: PyTorch's
        built, named = rows(**changes)
        assert "engine:fused+gn-torch" not in named
        assert {"name": "engine:fused+gn-torch", "skipped": reason} in built.skipped
    # Asked for where it cannot run: PyTorch's ran, and the JSON says so (one warning, by the fused row).
    monkeypatch.setattr(norm_module, "runs_on", lambda device: False)
    with pytest.warns(UserWarning, match="--group-norm triton .*cannot run on cpu here"):
        built, named = rows(backends=("fused",), group_norm="triton")
    assert named["engine:fused"].pipe.group_norms == {"unets": "pytorch", "vae": "pytorch"}
    assert {"name": "engine:fused+gn-torch", "skipped": already} in built.skipped
    assert PRESETS["gpu-512"].compare_group_norm and not parse_args(["--no-compare-group-norm"]).compare_group_norm


def test_an_engine_row_that_fails_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    failing_when_batching(monkeypatch, "CUDA error: an illegal memory access\nmore lines")
    monkeypatch.setattr(harness, "cost_floor", lambda *args, **kwargs: 1 / 0)  # a device such an error left unusable
    assert main(["--preset", "tiny-smoke", "--backends", "eager,fused", "--no-sam-onnx", "--sam-precision", "none",
                 "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench-tiny-smoke.json").read_text())
    runs = {run["name"]: run for run in record["runs"]}
    failure = "timed edit 1 failed: RuntimeError: CUDA error: an illegal memory access"  # its first line
    assert runs["engine:fused"] == {"name": "engine:fused", "skipped": failure}
    assert runs["engine:eager"]["stages"]["total"]["n"] == 1 and set(record["quality"]) == {"engine:eager"}
    assert record["parity"]["name"] == "engine:eager" and "engine:fused" not in record["speedup"]
    table = (tmp_path / "bench-tiny-smoke.md").read_text(encoding="utf-8")  # as written, whatever LC_ALL says
    assert "| engine:fused | skipped: timed edit 1 failed: RuntimeError: CUDA error" in table
    failed = "measurement failed: ZeroDivisionError: division by zero"
    assert record["floor"] is None and record["floor_error"] == failed and f"Not computed: {failed}." in table
    record["parity"] = {"name": "engine:eager (fp32, untimed)", "failed": "edit failed: RuntimeError: boom"}
    assert "fp32 parity (engine:eager (fp32, untimed)): edit failed: RuntimeError: boom." in markdown(record)


def test_a_batch_that_fails_is_reported_and_the_rows_stay(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(ZonePipeline, "edit_batch", out_of_memory)
    record = run_benchmark(dataclasses.replace(PRESETS["tiny-smoke"], backends=("fused",), sam_onnx=False,
                                               sam_precision=None, warmup=1))
    fused = next(run for run in record["runs"] if run["name"] == "engine:fused")
    assert fused["stages"]["total"]["n"] == 1 and record["quality"]["engine:fused"]["mask_b_identical"]
    batched = fused["batched_throughput"]
    assert batched["error"] == "batch of 2 failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert batched["batches"] == 0 and batched["warmup_s"] == [] and batched["edits_per_s"] is None
    assert "batch of 2 failed: OutOfMemoryError" in markdown(record)


def test_a_half_precision_run_times_the_fp32_baseline_first_then_checks_fp32_parity(tmp_path, monkeypatch):
    """The gpu-512 flow (the engine in half precision) on the CPU in bf16: the baseline's fp32 edits, one
    untimed fp32 engine:eager edit for parity, then the engine rows in bf16 on the same (now cast) weights.
    Only a GPU runs this flow for real, and a lease lost to a bug in it is a lease lost."""
    cuda_rules = backends.resolve_dtype
    monkeypatch.setattr(harness, "resolve_dtype", lambda dtype, _: cuda_rules(dtype, torch.device("cuda")))
    monkeypatch.setattr(pipeline, "resolve_dtype", lambda dtype, _: cuda_rules(dtype, torch.device("cuda")))

    def matmul_peak(_, dtype: torch.dtype) -> dict:  # bf16 products of 2048² take minutes on a CPU without bf16
        return {"dtype": str(dtype).removeprefix("torch."), "n": 1, "flops_per_s": 1e9, "median_flops_per_s": 1e9}
    monkeypatch.setattr(harness, "matmul_peak", matmul_peak)
    config = dataclasses.replace(PRESETS["tiny-smoke"], dtype="bf16", backends=("fused",), sam_onnx=False,
                                 sam_precision=None, out=tmp_path)
    record = run_benchmark(config)

    runs = {run["name"]: run for run in record["runs"] if "skipped" not in run}
    assert list(runs) == ["baseline", "engine:fused"] and runs["baseline"]["dtype"] == "fp32"
    assert runs["engine:fused"]["dtype"] == "bf16" and runs["engine:fused"]["batched_throughput"]["edits_per_s"] > 0
    parity = record["parity"]
    assert parity["name"] == "engine:eager (fp32, untimed)" and parity["dtype"] == "fp32"
    assert parity["mask_b_identical"] and parity["max_pixel_diff_image"] <= 1  # fp32 against fp32
    assert record["quality"]["engine:fused"]["dtype"] == "bf16" and record["floor"]["unet_gflop_per_row"] > 0
    assert "| engine:fused (bf16) |" in markdown(record)
    # Its rounds were not interleaved with the baseline's: the record and the report say so, not "interleaved".
    rounds = record["config"]["rounds"]
    assert rounds.startswith("the fp32 baseline's rounds first") and f"- rounds: {rounds}" in markdown(record)


def test_a_half_precision_run_stopped_while_its_rows_are_built_keeps_the_baseline_and_says_why(monkeypatch):
    """The gpu-512 flow builds the engine rows after the baseline's edits and the parity edit: SIGTERM during that
    build (SAM's ONNX export, a minute for vit_b) went on building, and the report said nothing of the rows."""
    monkeypatch.setattr(harness, "_release", lambda device: None)
    monkeypatch.setattr(harness, "ZonePipeline", lambda *args, **kwargs: SimpleNamespace(edit=lambda *_: "parity"))
    calls, deadline = [], Deadline(None)

    def build(dtype):
        deadline.stop("it was sent SIGTERM")  # as its handler does, mid-export
        pytest.fail("the build went on")

    rows = SimpleNamespace(config=dataclasses.replace(PRESETS["tiny-smoke"], warmup=0, repeats=2), models=None,
                           device=torch.device("cpu"), image=None, edit_config=None, skipped=[], build=build)
    baseline = stand_in_row("baseline", calls)
    timed, parity = harness.timed_rows(baseline, rows, torch.bfloat16, lambda message: None, deadline)
    assert timed == [baseline] and calls == ["baseline", "baseline"] and parity.result == "parity"
    assert rows.skipped == [{"name": "engine rows", "skipped": "not built: the run was cut short (it was sent "
                                                               "SIGTERM)"}]


def test_a_baseline_that_fails_ends_the_run(monkeypatch):
    monkeypatch.setattr(ReferenceStyleZone, "edit", lambda *args, **kwargs: (_ for _ in ()).throw(ValueError("x")))
    with pytest.raises(ValueError):
        run_benchmark(dataclasses.replace(PRESETS["tiny-smoke"], backends=("eager",), batch=1, sam_onnx=False,
                                          sam_precision=None))


def test_a_run_cut_short_reports_the_edits_it_timed(monkeypatch):
    """SIGTERM (what the device stage's `timeout` sends) inside fused's second timed edit: rounds stop there,
    no batch or floor starts, and what was timed before it is reported; nothing started after it."""
    def engine_edit(pipe, *args):
        edit = harness.engine_edit_unpatched(pipe, *args)
        if not isinstance(pipe.denoiser.denoiser, BatchDenoiser):
            return edit
        calls = []

        def second_is_cut():
            calls.append(1)
            if len(calls) == 2:
                raise OutOfTime("it was sent SIGTERM")
            return edit()
        return second_is_cut
    monkeypatch.setattr(harness, "engine_edit_unpatched", harness.engine_edit, raising=False)
    monkeypatch.setattr(harness, "engine_edit", engine_edit)
    record = run_benchmark(dataclasses.replace(PRESETS["tiny-smoke"], backends=("eager", "fused"), repeats=2,
                                               sam_onnx=False, sam_precision=None))
    # fp32 rounds run eager, the baseline, then fused: round 2 stopped inside fused.
    counts = {run["name"]: run["stages"]["total"]["n"] for run in record["runs"] if "stages" in run}
    assert counts == {"engine:eager": 2, "engine:fused": 1, "baseline": 2}
    assert record["cut_short"] == "it was sent SIGTERM"
    # The floor stays, on the ceiling measured before the edits: no second measurement in a run cut short.
    (ceiling,) = record["floor"]["ceilings"]
    assert ceiling["measured_flops_per_s"]["after"] is None and ceiling["gap"]["engine:fused"] > 0
    assert "measured before the edits only: the run was cut short" in markdown(record)
    fused = next(run for run in record["runs"] if run["name"] == "engine:fused")
    assert fused["batched_throughput"]["batches"] == 0 and "cut short" in fused["batched_throughput"]["error"]
    assert record["quality"]["engine:fused"]["mask_b_identical"]  # its first edit still compared
    assert "**cut short**: it was sent SIGTERM" in markdown(record)


def test_a_deadline_starts_no_work_once_its_time_is_up_and_interrupts_work_on_sigterm(monkeypatch):
    now = [100.0]
    with monkeypatch.context() as patched:  # the clock of the time module itself: undone at once
        patched.setattr(measure.time, "monotonic", lambda: now[0])
        deadline = Deadline(10)
        assert deadline.run(lambda: "ran") == "ran" and deadline.reason is None
        now[0] = 110.0
        assert deadline.run(lambda: 1 / 0) is None and deadline.reason == "its --time-limit of 10 s ran out"

    unlimited = Deadline(None)
    unlimited.stop("asked to")  # idle: nothing to interrupt, but nothing starts any more
    assert unlimited.run(lambda: "ran") is None and unlimited.reason == "asked to"

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for number, reason in ((signal.SIGTERM, "it was sent SIGTERM"), (signal.SIGINT, measure.INTERRUPTED)):
        signalled = Deadline(None)
        with signalled.stopping_on_signals():
            def work_until_signalled(number=number) -> str:
                os.kill(os.getpid(), number)
                time.sleep(30)  # the handler's OutOfTime ends the sleep at once
                return "finished"
            assert signalled.run(work_until_signalled) is None and signalled.reason == reason
            if number == signal.SIGINT:  # a second Ctrl-C quits, as outside
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(30)
    after_a_limit = Deadline(None)
    with after_a_limit.stopping_on_signals(), pytest.raises(KeyboardInterrupt):
        after_a_limit.stop("its --time-limit of 1 s ran out")  # its reason first: Ctrl-C was swallowed for good
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_time_limit_spent_before_the_baseline_ends_the_run_in_one_line(capsys, tmp_path):
    assert main(["--preset", "tiny-smoke", "--backends", "eager", "--no-sam-onnx", "--time-limit", "1e-6",
                 "--out", str(tmp_path)]) == 2
    assert "cut short before the baseline's first timed edit (its --time-limit of 1e-06 s ran out): nothing to " \
        "compare; give it more time (--time-limit)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--time-limit", "0"])


def test_a_sigterm_during_the_models_build_ends_the_run_without_advising_more_time(capsys, tmp_path, monkeypatch):
    build = harness.build_random_components

    def terminated_build(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends: no time limit was set
        return build(*args)

    monkeypatch.setattr(harness, "build_random_components", terminated_build)
    assert main(["--preset", "tiny-smoke", "--backends", "eager", "--no-sam-onnx", "--out", str(tmp_path)]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == "error: the run was cut short before the baseline's first timed edit (it was sent SIGTERM): " \
        "nothing to compare"


def test_a_ctrl_c_during_the_models_build_quits_with_130_and_builds_no_row(capsys, tmp_path, monkeypatch):
    """It went on to export SAM to ONNX, then said "cut short ... give it more time" and exited 2."""
    build, finished = harness.build_random_components, []

    def interrupted_build(*args):
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: the build stops (it waited for it to end)
        finished.append(build(*args))

    monkeypatch.setattr(harness, "build_random_components", interrupted_build)
    assert main(["--preset", "tiny-smoke", "--backends", "eager", "--sam-onnx", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert not finished and not (tmp_path / "sam-onnx-tiny").exists()


def test_a_ctrl_c_while_the_rows_are_built_stops_the_sam_export_and_quits_with_130(capsys, tmp_path, monkeypatch):
    """A first Ctrl-C during SAM's ONNX export (a minute for vit_b on 2 cores) waited for the export to end."""
    finished = []

    def interrupted_export(*args):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the handler's OutOfTime ends the sleep at once
        finished.append(True)

    monkeypatch.setattr(harness, "export_sam", interrupted_export)
    argv = ["--preset", "tiny-smoke", "--backends", "eager", "--sam-onnx", "--sam-precision", "none"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert not finished and list(tmp_path.iterdir()) == []


def test_a_run_that_ends_without_its_reports_leaves_no_folder_it_made(capsys, tmp_path, monkeypatch):
    """A run cut short after its rows were built (the SAM export written into --out) left that export, and --out's
    new folders, with no report: the README says a run that fails before writing leaves no folder it made."""
    def export_then_stop(baseline, rows, dtype, *args):
        rows.build(dtype)  # the +sam-onnx row's export, into --out
        assert rows.sam_export["folder"].is_dir()
        engines = rows.sam_export["folder"] / TRT_CACHE  # ONNX Runtime's TensorRT engines of it, on a GPU
        engines.mkdir()
        (engines / "encoder.engine").write_bytes(b"an engine")
        raise ZoneError("the run was cut short before the baseline's first timed edit: nothing to compare")

    monkeypatch.setattr(harness, "timed_rows", export_then_stop)
    argv = ["--preset", "tiny-smoke", "--backends", "eager", "--sam-onnx", "--sam-precision", "none"]
    assert main([*argv, "--out", str(tmp_path / "new" / "bench")]) == 2
    assert "nothing to compare" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"  # a folder that was there stays, and what else is in it
    (kept / "sam-onnx-tiny").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    assert main([*argv, "--out", str(kept)]) == 2
    assert sorted(path.name for path in kept.iterdir()) == ["notes.txt", "sam-onnx-tiny"]
    # run_benchmark's own caller is told the same: where the export went, and that the run made its folder.
    exported, config = {}, dataclasses.replace(PRESETS["tiny-smoke"], backends=("eager",), sam_onnx=True,
                                               sam_precision=None, out=tmp_path / "api")
    with pytest.raises(ZoneError, match="nothing to compare"):
        run_benchmark(config, sam_export=exported)
    assert exported["folder"] == config.sam_export_folder and exported["created"]


def test_a_run_that_ends_without_its_reports_removes_only_the_sam_export_it_made(capsys, tmp_path, monkeypatch):
    """It removed --out's SAM export folder whole whenever the folder was not there when the run started: a run
    into the same --out at the same time lost the export it had made meanwhile, or its scratch folder mid-export."""
    def stop_after(make_other_run_first: bool):
        def export_then_stop(baseline, rows, dtype, *args):
            other = rows.config.sam_export_folder / f".export-{os.getpid()}-other"  # a running export's scratch
            if make_other_run_first:  # the other run's export, made after this run started, before its own
                other.mkdir(parents=True)
            rows.build(dtype)
            other.mkdir(parents=True, exist_ok=True)
            raise ZoneError("the run was cut short before the baseline's first timed edit: nothing to compare")
        return export_then_stop

    argv = ["--preset", "tiny-smoke", "--backends", "eager", "--sam-onnx", "--sam-precision", "none"]
    for other_run_first, left in ((True, [".export-other", "image_encoder.onnx", "manifest.json", "mask_decoder.onnx"]),
                                  (False, [".export-other"])):  # this run's files go, the other's stay
        out = tmp_path / str(other_run_first)
        monkeypatch.setattr(harness, "timed_rows", stop_after(other_run_first))
        assert main([*argv, "--out", str(out)]) == 2
        assert "nothing to compare" in capsys.readouterr().err
        names = sorted(path.name.replace(f"-{os.getpid()}", "") for path in (out / "sam-onnx-tiny").iterdir())
        assert names == left


def test_sigterm_stops_a_real_run_which_reports_what_it_timed(tmp_path):
    """The whole path, as `timeout` on the device machine drives it: a run asked for 200 rounds, sent
    SIGTERM once the baseline finished its first, exits 0 with its reports written (a Ctrl-C does the same:
    the Deadline's test)."""
    command = [sys.executable, "-m", "benchmarks", "--preset", "tiny-smoke", "--backends", "eager", "--batch", "1",
               "--no-sam-onnx", "--sam-precision", "none", "--repeats", "200", "--out", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        for line in process.stderr:
            if "baseline: edit 1/200" in line:
                process.terminate()
                break
        _, err = process.communicate(timeout=120)
    finally:  # a failure (or pytest-timeout) here must not leave 200 rounds running beside the rest of the suite
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    record = json.loads((tmp_path / "bench-tiny-smoke.json").read_text())
    assert record["cut_short"] == "it was sent SIGTERM"
    assert 1 <= next(run for run in record["runs"] if run["name"] == "baseline")["stages"]["total"]["n"] < 200


# A wide image and another seed too: the baseline reads the attention grid and takes the seed itself, so a
# square image at the default seed could not show it swapping the grid's sides or ignoring the seed. 1000x90 is
# shrunk and padded to 512x64: its d (EditResult.difference) is cropped and enlarged back as the masks are.
@pytest.mark.parametrize(("action", "threshold", "size", "seed"), [
    (Action.CHANGE, 2, (64, 64), 42), (Action.REMOVE, 0, (64, 64), 42), (Action.CHANGE, 2, (64, 128), 7),
    (Action.CHANGE, 2, (1000, 90), 7)])
def test_baseline_gives_the_engines_masks_and_image(pipe, baseline, action, threshold, size, seed):
    image = make_sample_image(*size)
    config = pipe.default_config.replace(steps=2, action=action, reference_threshold=threshold, seed=seed)
    engine, reference = pipe.edit(image, INSTRUCTION, config), baseline.edit(image, INSTRUCTION, config)

    assert np.array_equal(engine.mask_b, reference.mask_b)
    assert np.array_equal(engine.difference, reference.difference)  # the levels M_b thresholds, at the input size
    if threshold < 108:
        assert 0.0 < engine.mask_b.mean() < 1.0
    # The baseline's IP2P UNet runs attention as baddbmm + softmax + bmm, the engine's as SDPA: the
    # same fp32 function with other rounding, so a pixel may land one uint8 level apart where the
    # value straddles a .5 boundary (the engine's own parity test with diffusers allows the same).
    assert np.abs(engine.styled.astype(int) - reference.styled.astype(int)).max() <= 1
    # Such a level may tip one of SAM's thresholds (README, "Batching never changes a result"): M_f and R then
    # differ by a pixel or a few, and the output there. Seen at 64x128, seed 7, on a 2-core AMD EPYC with 2
    # threads: one pixel of M_f, the output 35 levels apart there; the other CPUs here gave identical masks.
    tipped = (engine.mask_f != reference.mask_f) | (engine.region != reference.region)
    assert tipped.sum() <= 4
    near_tipped = np.pad(tipped, 1)
    near_tipped = np.any([near_tipped[1 + dy:1 + dy + tipped.shape[0], 1 + dx:1 + dx + tipped.shape[1]]
                          for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    assert np.abs(engine.image.astype(int) - reference.image.astype(int))[~near_tipped].max() <= 1
    assert engine.used_fallback == reference.used_fallback


def test_the_baselines_difference_is_enlarged_as_its_masks_are(pipe, baseline, monkeypatch):
    """Random weights' d changes by a level from pixel to pixel, where a bicubic enlargement gives the nearest
    pixel's level too (from a mutation audit: it passed the parity test above). Stripes a pixel wide: the levels at
    the input size are d's own."""
    import zone_benchmarks.baseline as reference_style

    def stripes(store, token_count, grid, size, config):
        difference = np.zeros(size, np.uint8)
        difference[:, ::2] = 200
        return np.where(difference < 128, 255, 0).astype(np.uint8), difference

    monkeypatch.setattr(reference_style, "show_diff_cross_attention", stripes)
    config = pipe.default_config.replace(steps=1, action=Action.CHANGE)
    result = baseline.edit(make_sample_image(1000, 90), INSTRUCTION, config)
    assert result.difference.shape == (1000, 90) and np.unique(result.difference).tolist() == [0, 200]


def test_baseline_store_holds_every_attention_layer_every_step(pipe, baseline):
    steps = 2
    baseline.edit(make_sample_image(64, 64), INSTRUCTION, pipe.default_config.replace(steps=steps,
                                                                                      action=Action.CHANGE))
    store = baseline.last_store
    layers = [m for m in pipe.models.ip2p_unet.modules() if isinstance(m, Attention)]
    assert len(layers) == 32  # SD1.5's 16 transformer blocks, a self and a cross attention each
    # At 64x64 every layer has at most 32^2 queries, so every one is kept: self and cross, all places.
    assert store.stored_layer_count() == len(layers) and store.num_att_layers == len(layers)
    counts = {key: len(maps) for key, maps in store.attention_store.items()}
    assert counts == {"down_cross": 6, "down_self": 6, "mid_cross": 1, "mid_self": 1, "up_cross": 9, "up_self": 9}
    assert store.cur_step == steps
    heads = pipe.models.ip2p_unet.config.attention_head_dim  # SD1.5's key for the number of heads
    for key, maps in store.attention_store.items():
        for probabilities in maps:  # the two empty-prompt branches, P[heads:] of (3 * heads, N, K)
            assert probabilities.shape[0] == 2 * heads and probabilities.shape[1] <= STORED_MAX_QUERIES
            # running sums over the steps of probability rows that each sum to 1
            assert np.allclose(probabilities.sum(-1).numpy(), steps, atol=1e-4), key
    # The UNet is shared with the engine: its own processors must be back.
    assert not any(type(p).__name__ == "StoringAttnProcessor" for p in pipe.models.ip2p_unet.attn_processors.values())


def test_dual_unet_techniques_agree_and_are_all_timed(capsys):
    from zone_benchmarks.bench_dual_unet import main as bench_dual_unet

    assert bench_dual_unet(["--models", "tiny", "--resolution", "64", "--repeats", "1", "--device", "cpu",
                            "--channels-last"]) == 0
    labels = ("single", "two-calls", "vmap", "step", "two-calls-cl", "step-cl")
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in labels}
    assert set(rows) == set(labels)  # no CUDA: no streams and no graph rows
    assert "64² (8² latent), 6 rows (B = 1), fp32, median of 1" in out
    assert "x single+graph" not in out  # nor the column of ratios to one: it would repeat "x single"
    assert float(rows["vmap"][3]) <= 1e-5  # the stacked-weights call computes the same eps as two calls
    # Channels-last copies compute the same eps up to the convolutions' summation order.
    assert float(rows["two-calls-cl"][3]) <= 1e-4 and float(rows["step-cl"][2]) > 0
    assert float(rows["single"][2]) == 1.0 and float(rows["two-calls"][2]) > 0 and float(rows["step"][2]) > 0


def test_dual_unet_table_puts_each_variant_against_one_unet_call_and_the_two_calls_eps(capsys):
    from zone_benchmarks.bench_dual_unet import print_results

    eps = torch.zeros(2)
    results = {"single": (0.010, eps + 5, None), "two-calls": (0.020, eps, None), "vmap": (0.030, eps + 0.25, 1.5),
               "step": (0.040, eps + 9, None)}
    print_results(results)
    header, *lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines}
    assert "x single+graph" not in header
    assert rows["vmap"] == ["30.00ms", "3.00", "0.25", "1.50"] and rows["two-calls"] == ["20.00ms", "2.00", "0", "n/a"]
    assert rows["single"][2:] == ["n/a", "(other", "rows)", "n/a"] and rows["step"][2:5] == ["n/a", "(whole", "step)"]
    print_results({**results, "single+graph": (0.005, eps + 5, None)})  # on CUDA: against the graphed call too
    header, *lines = capsys.readouterr().out.splitlines()
    assert "x single+graph" in header and lines[2].split()[:4] == ["vmap", "30.00ms", "3.00", "6.00"]


def test_refinement_variants_run_on_the_fastest_fused_family_denoiser():
    from zone_benchmarks.harness import variant_denoiser

    assert variant_denoiser(("eager", "fused", "compile")) == "compile"
    assert variant_denoiser(("eager", "fused")) == "fused" and variant_denoiser(("eager",)) == "eager"


def test_dual_unet_benchmark_refuses_half_precision_on_the_cpu_in_one_line(capsys):
    from zone_benchmarks.bench_dual_unet import main as bench_dual_unet

    assert bench_dual_unet(["--models", "tiny", "--dtype", "fp16", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: fp16/bf16 need CUDA: use --dtype fp32 on the CPU\n"


def test_kernel_benchmark_help_explains_instead_of_running(capsys):
    from zone_benchmarks.bench_kernels import main as bench_kernels

    with pytest.raises(SystemExit) as exit_info:
        bench_kernels(["--help"])
    assert exit_info.value.code == 0 and "SD1.5 shapes" in capsys.readouterr().out


def test_refine_benchmark_rows_and_their_agreement(capsys):
    """bench_refine on a tiny SAM: fp32 torch first (the reference), the bf16-encoder row with its IoU,
    and the search table."""
    from zone_benchmarks.bench_refine import main as bench_refine

    bench_refine(["--model-type", "tiny", "--size", "96", "--points-per-side", "8", "--repeats", "1",
                  "--device", "cpu", "--no-onnx", "--sam-precision", "bf16"])
    output = capsys.readouterr().out
    lists, rest = output.split("the engine's question")
    searches, networks = rest.split("SAM's networks")
    lines = lists.splitlines()
    rows = [line for line in lines if line.startswith("torch")]
    assert len(rows) == 2 and rows[0].endswith("reference") and "bf16" in rows[1]
    mean_iou = float(rows[1].split()[-3])
    assert 0.9 <= mean_iou <= 1.0
    assert not any(line.startswith("onnx") for line in lines) and any("speed-up torch, image encoder bf16" in line
                                                                        for line in lines)
    # The search rows: one per PyTorch segmenter, each choosing what its list gives on this image.
    search_rows = [line for line in searches.splitlines() if line.startswith("torch")]
    assert len(search_rows) == 2 and all(line.endswith("same") for line in search_rows)
    # SAM's encoder and decoder transformer against the engine's forms: their difference is rounding alone.
    # With --sam-precision, the encoders again under autocast: the two forms round differently in bf16.
    encoder, encoder_bf16, transformer = (line for line in networks.splitlines()
                                          if line.startswith(("image encoder", "decoder")))
    assert "autocast to torch.bfloat16" in encoder_bf16
    for line, bound in ((encoder, 1e-5), (transformer, 1e-5), (encoder_bf16, 5e-2)):
        assert float(line.split("max |difference| ")[1].split()[0]) < bound and line.count(" ms") == 2


def test_photo_benchmark_times_each_host_step_and_the_png_levels(capsys):
    from zone_benchmarks.bench_photo import main as bench_photo

    assert bench_photo(["--size", "64x96", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for what in ("read (JPEG", "shrink to the working size", "blend stage", "write PNG", "write WEBP", "write JPEG"):
        assert f"| {what}" in out, what
    assert "Pillow's default level 6" in out
    with pytest.raises(SystemExit):
        bench_photo(["--size", "10x4000"])
    assert "each side at least 64" in capsys.readouterr().err


def test_photo_benchmark_figures_are_medians_after_a_warm_up_and_its_table_says_whose(capsys, monkeypatch):
    """bench_photo with a stand-in pipeline and stand-in figures (1 s, 2 s, ... in the order measured): each
    figure in its row, the blend stage's median without the warm-up edit, PNG level 6 against level 1."""
    from zone_benchmarks import bench_photo
    from zone_engine.errors import DeviceError

    clock = iter([0.0, 0.01, 1.0, 1.02, 2.0, 2.06])  # three timed calls of 10, 20 and 60 ms
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(bench_photo.time, "perf_counter", lambda: next(clock))
        seconds, last = bench_photo.median_seconds(lambda: calls.append("call") or len(calls), repeats=3)
    assert seconds == pytest.approx(0.02) and calls == ["call"] * 4 and last == 4  # a warm-up, then 3 timed
    assert [bench_photo.parse_args(["--repeats", n]).repeats for n in ("1", "100")] == [1, 100]  # the edges taken

    def no_such_device(seed, device):
        raise DeviceError(f"device {device!r} is not available")
    monkeypatch.setattr(ZonePipeline, "tiny", no_such_device)
    assert bench_photo.main(["--size", "64x96", "--device", "cuda:7"]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    blend_seconds, devices = iter([9.0, 0.1, 0.3, 0.2]), []  # the warm-up edit's blend was slow

    def tiny(seed, device):
        devices.append(device)
        return SimpleNamespace(default_config=EditConfig(),
                               edit=lambda pixels, *_: SimpleNamespace(image=pixels,
                                                                       timings={"blend": next(blend_seconds)}))
    monkeypatch.setattr(ZonePipeline, "tiny", tiny)
    figures = iter(range(1, 7))
    monkeypatch.setattr(bench_photo, "median_seconds", lambda work, repeats: (float(next(figures)), work()))
    assert bench_photo.main(["--size", "64x96", "--repeats", "3", "--device", "cuda:1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("A 96x64 photo, median of 3:") and devices == ["cuda:1"]
    # | what | seconds | note |, after the table's header
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")][1:]
    assert [figure for _, figure, _ in rows] == ["1.000", "2.000", "0.200", "4.000", "5.000", "6.000"]
    shrink, blend, png = rows[1][2], rows[2][2], rows[3][2]
    assert shrink.startswith("96x64 -> ") and blend == "on cuda:1 |"
    assert "Pillow's default level 6: 3.000 s (0.75x level 1's)" in png


def test_refine_benchmark_defaults_on_the_cpu_and_how_a_run_is_timed(capsys, monkeypatch):
    """On the CPU: 8 points a side, 1 repeat, every mask kept (thresholds 0), the networks timed 3 times at least;
    a timed run: one warm-up, then each run's total and the image encoder inside it (not the warm-up's), and the
    predictor's own set_image back afterwards (the search rows time the same predictor again)."""
    from zone_benchmarks import bench_refine

    timed_runs, configs, reported, networks = bench_refine.timed_runs, [], [], []
    monkeypatch.setattr(bench_refine, "TorchSamSegmenter", lambda sam, config, *_: configs.append(config) or
                        SimpleNamespace(segment=None, generator=SimpleNamespace(predictor=None)))
    monkeypatch.setattr(bench_refine, "timed_runs", lambda *_: ([], 1.0, 0.5))
    monkeypatch.setattr(bench_refine, "search_rows", lambda *_: [])
    monkeypatch.setattr(bench_refine, "print_report", lambda args, *_: reported.append(args))
    monkeypatch.setattr(bench_refine, "print_network_rows", lambda sam, prompts, repeats, half: networks.append(
        (prompts, repeats, half)))
    assert bench_refine.main(["--model-type", "tiny", "--size", "64", "--device", "cpu", "--no-onnx"]) == 0
    (args,), (config,) = reported, configs
    assert (args.points_per_side, args.repeats) == (8, 1) and networks == [(64, 3, None)]
    assert (config.points_per_side, config.pred_iou_thresh, config.stability_score_thresh) == (8, 0.0, 0.0)

    class Predictor:
        features = torch.zeros(1)

        def set_image(self, image):
            pass

    predictor = Predictor()

    def segment(image):
        predictor.set_image(image)
        return [image]
    # The warm-up's encoder takes 100 s; then runs of 3 s and 4 s, their encoder 1 s and 2 s.
    clock = iter([0, 100, 200, 200, 201, 203, 300, 300, 302, 304])
    with monkeypatch.context() as patch:
        patch.setattr(bench_refine.time, "perf_counter", lambda: next(clock))
        masks, total, encoder = timed_runs("stand-in", segment, predictor, "image", repeats=2)
    assert (masks, total, encoder) == (["image"], 3.5, 1.5) and "set_image" not in vars(predictor)  # the class's again
    assert capsys.readouterr().err.count("[refine] stand-in: run") == 2


def test_refine_report_gives_each_rows_speed_up_over_the_first_and_says_when_the_choices_differ(capsys):
    from zone_benchmarks.bench_refine import compare, parse_args, print_report

    args = parse_args(["--points-per-side", "8", "--repeats", "1", "--no-onnx"])
    sam = SimpleNamespace(image_encoder=SimpleNamespace(img_size=1024))
    rows = [("torch fp32", [], 4.0, 1.0), ("torch bf16", [], 2.0, 0.25)]  # decoding: 3 s, then 1.75 s
    searches = [("torch fp32", 4.5, 1.5, 1.0, "same"), ("torch bf16", 2.5, 0.5, 0.25, 0.75)]
    print_report(args, sam, rows, None, searches)
    out = capsys.readouterr().out
    assert "speed-up torch bf16 vs torch fp32: 2.00x total, 4.00x image encoder, 1.71x decoding" in out
    listed_and_searched = [line.split()[2:5] for line in out.splitlines() if line.startswith("torch")][2:]
    assert listed_and_searched == [["4500.0", "1500.0", "3.00x"], ["2500.0", "500.0", "5.00x"]]
    assert out.rstrip().endswith("IoU 0.7500\nthe chosen segments differ: the two decoders round differently (the "
                                 "factored transformer; on CUDA also batch-size dependent kernels, TF32 convolutions), "
                                 "moving masks that sit at a threshold")
    print_report(args, sam, rows, None, searches[:1])
    assert "the chosen segments differ" not in capsys.readouterr().out
    # The networks' rows: SAM's module against the engine's form, the difference relative to the output's size.
    compare("stand-in", 1, torch.device("cpu"), ("SAM's", lambda: torch.tensor([200.0, -200.0])),
            ("the engine's", lambda: torch.tensor([200.0, -198.0])))
    assert capsys.readouterr().out.endswith("max |difference| 1.0e-02 of the output's magnitude\n")


def test_refine_search_row_gives_the_worst_disagreement_of_its_runs(monkeypatch):
    """The search's runs against listing every segment and choosing (the centre quarter, here): one run chose half
    of it (IoU 0.5), the other 13 of its 16 pixels (IoU 0.8125); the row gives the worse."""
    from zone_benchmarks import bench_refine
    from zone_engine.refine import Selection

    centre = bench_refine.centre_mask((8, 8))
    half, most = centre.copy(), centre.copy()
    half[4:], most[2, 2:5] = False, False
    found = iter([Selection(half, 0.5, 1), Selection(most, 0.8, 1)])
    segmenter = SimpleNamespace(select=lambda image, mask_b: next(found), generator=SimpleNamespace(predictor=None))
    monkeypatch.setattr(bench_refine, "timed_runs", lambda name, run, predictor, image, repeats: (
        [run(image) for _ in range(repeats)][-1], 0.5, 0.25))
    rows = [("torch fp32", [centre], 2.0, 1.0)]
    (search,) = bench_refine.search_rows({"torch fp32": segmenter}, rows, np.zeros((8, 8, 3), np.uint8), repeats=2)
    assert search[0] == "torch fp32" and search[2:] == (0.5, 0.25, 0.5)


def test_a_refine_benchmark_part_that_fails_costs_its_own_rows(capsys, monkeypatch):
    from zone_benchmarks import bench_refine

    def broken(*args):
        raise RuntimeError("CUDA error: device-side assert triggered")
    monkeypatch.setattr(bench_refine, "search_rows", broken)
    bench_refine.main(["--model-type", "tiny", "--size", "64", "--points-per-side", "4", "--repeats", "1",
                       "--device", "cpu", "--no-onnx"])
    output = capsys.readouterr().out
    assert "the search rows failed:" in output and "RuntimeError: CUDA error: device-side assert" in output
    lists, networks = output.split("the engine's question")[0], output.split("SAM's networks")[1]
    assert any(line.endswith("reference") for line in lists.splitlines())  # printed after the failure
    assert any(line.startswith("image encoder") for line in networks.splitlines())

    timed_runs = bench_refine.timed_runs

    def variant_fails(name, *args):
        if name.startswith("torch, image encoder"):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return timed_runs(name, *args)
    monkeypatch.setattr(bench_refine, "timed_runs", variant_fails)  # a --sam-precision variant loses its rows only
    assert bench_refine.main(["--model-type", "tiny", "--size", "64", "--points-per-side", "4", "--repeats", "1",
                              "--device", "cpu", "--no-onnx", "--sam-precision", "bf16"]) == 0
    output = capsys.readouterr().out
    assert "torch, image encoder bf16 (autocast): its runs failed:" in output
    lists = output.split("the engine's question")[0].split("its runs failed:")[1]
    assert any(line.endswith("reference") for line in lists.splitlines()) and "(autocast)" not in lists


def test_graph_breaks_counts_each_break_and_shows_where_it_is(capsys, monkeypatch):
    """zone_benchmarks.graph_breaks, dynamo's real explain, on a stand-in for the dual step that breaks: that the
    real step is one graph, tests/test_dual_step.py shows (a counting backend traces it once); tracing it here too
    took 20 s of the suite for no other claim."""
    import zone_benchmarks.graph_breaks as graph_breaks_module

    def halve_then_break(latents):
        torch._dynamo.graph_break()
        return latents / 2

    step_shapes = []

    def broken_step(unets, schedule, state, image_latents, *_):
        step_shapes.append((tuple(state.z_mb.shape), tuple(image_latents.shape)))
        # Two breaks, one frame below the step: where each is shows the step's frame and the helper's.
        return halve_then_break(halve_then_break(state.z_mb * 2)) + 1

    monkeypatch.setattr(graph_breaks_module, "dual_step", broken_step)
    graph_breaks = graph_breaks_module.main
    assert graph_breaks(["--models", "tiny", "--resolution", "64", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "cpu, fp32, recording by the torch reference: 3 graph(s), 2 break(s)" in out
    assert out.count("- Call to `torch._dynamo.graph_break()`") == 1
    assert "in broken_step>" in out and "in halve_then_break>" in out
    assert step_shapes == [((1, 4, 8, 8), (3, 4, 8, 8))]  # one edit at 64 px: an 8x8 latent
    # Its options checked as the other tools' are: one line each, not a traceback from inside dynamo.
    with pytest.raises(SystemExit):
        graph_breaks(["--resolution", "0"])
    assert "--resolution must be a multiple of 8 between 32 and 2048" in capsys.readouterr().err
    assert graph_breaks(["--models", "tiny", "--resolution", "64", "--device", "cpu", "--dtype", "fp16"]) == 2
    assert capsys.readouterr().err.strip() == "error: --dtype fp16 runs only on CUDA here; on the CPU use fp32"
    # Kernel 1 is named only where it can launch: elsewhere its launcher ran the reference.
    from zone_kernels import attn_accumulate

    for launches, words in ((True, "kernel 1 (Triton, its custom op)"), (False, "the torch reference (Triton cannot")):
        monkeypatch.setattr(attn_accumulate, "runs_on", lambda device, launches=launches: launches)
        assert graph_breaks_module._recording(attn_accumulate.attn_accumulate_, torch.device("cpu")).startswith(words)


def test_graph_breaks_fails_on_a_break_that_dynamo_does_not_count(capsys, monkeypatch):
    """A break inside a function the step calls in a loop: dynamo's explain lists its reason but counts 1 graph
    and 0 breaks; the tool exited 0, "no breaks", under the break it printed."""
    import zone_benchmarks.graph_breaks as graph_breaks_module

    def halve_then_break(latents):
        latents = latents / 2
        torch._dynamo.graph_break()
        return latents

    def step_breaking_in_a_loop(unets, schedule, state, *_):
        latents = state.z_mb * 2
        for _ in range(2):
            latents = halve_then_break(latents)
        return latents + 1

    monkeypatch.setattr(graph_breaks_module, "dual_step", step_breaking_in_a_loop)
    assert graph_breaks_module.main(["--models", "tiny", "--resolution", "64", "--device", "cpu"]) == 1
    assert "- Call to `torch._dynamo.graph_break()`" in capsys.readouterr().out


def test_kernel_floor_line_puts_the_graph_replay_against_the_modelled_bytes():
    from zone_benchmarks.bench_kernels import floor_line

    rows = [{"name": "c: fused Triton kernel", "time_ms": 0.2, "bytes": 3e6},
            {"name": "c: the same, replayed from a CUDA graph", "time_ms": 0.012, "bytes": 3e6}]
    line = floor_line(rows, bandwidth=3e12)  # 3 MB at 3 TB/s: 1 us
    assert "memory floor: 1.00 us (3.00 MB at 3000 GB/s measured)" in line and "12.00 us = 12.0x the floor" in line
    assert "only reading" not in line


def test_kernel_floor_line_puts_the_graph_replay_against_launches_only_reading_where_measured():
    from zone_benchmarks.bench_kernels import _table, floor_line
    from zone_kernels.attn_accumulate import READ_ONCE_ROW  # the row kernel 1's benchmark adds on a GPU

    rows = [{"name": "c: fused Triton kernel", "time_ms": 0.2, "bytes": 3e6, "max_abs_diff": 1e-9},
            {"name": "c: the same, replayed from a CUDA graph", "time_ms": 0.012, "bytes": 3e6, "max_abs_diff": 1e-9},
            {"name": READ_ONCE_ROW, "time_ms": 0.004, "bytes": 2e6, "max_abs_diff": None}]
    line = floor_line(rows, bandwidth=3e12)
    assert line.endswith("the same launches only reading their inputs: 4.00 us, the kernel 3.0x that (target: within "
                         "2x, not met)")
    assert _table("kernel", rows, "max_abs_diff").splitlines()[-1].split()[-1] == "-"  # nothing to check
    rows[-1]["time_ms"] = 0.006  # at the target's edge: 2.0x
    assert floor_line(rows, bandwidth=3e12).endswith("6.00 us, the kernel 2.0x that (target: "
                                                     "within 2x, met)")


def test_the_kernel_benchmark_refuses_to_measure_where_the_kernels_cannot_run():
    """With ZONE_DISABLE_TRITON=1 (or TRITON_INTERPRET=0 on a CPU) each launcher ran its reference: the "fused
    Triton kernel" rows were the reference under the kernel's name, checked against itself."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "ZONE_DISABLE_TRITON": "1"}
    run = subprocess.run([sys.executable, "-m", "zone_benchmarks.bench_kernels"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert run.returncode == 2 and "the Triton kernels cannot run on cpu here" in run.stderr
    assert "fused Triton kernel" not in run.stdout


def test_kernel_benchmark_on_the_cpu_checks_correctness():
    """bench_kernels under the interpreter: no timings, every variant's quality figure against the
    reference (kernel 1: fp32 sums of 77-way softmaxes, within 1e-6; kernel 2: bit-exact masks;
    kernel 3, plain and fused with the time embedding and SiLU: fp32 outputs of magnitude ~5 against float64's,
    within 1e-5)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "zone_benchmarks.bench_kernels"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line.strip()[:2] in ("a:", "b:", "c:")]
    kernel_1, kernel_2, kernel_3 = rows[:3], rows[3:6], rows[6:]
    assert len(kernel_3) == 3 + 2 and all(row[-5:-3] == ["n/a", "n/a"] for row in rows)
    assert all(float(row[-1]) < 1e-6 for row in kernel_1)
    assert all(row[-1] == "0" for row in kernel_2)
    assert all(float(row[-1]) < 1e-5 for row in kernel_3)


def test_benchmark_rows_time_each_variant_after_its_checked_first_call(monkeypatch):
    """On CUDA (do_bench stubbed; a device object needs no GPU): each variant checked, then timed by the
    default or a given timer, then the last variant's (the kernel's) launch-cost rows; elsewhere no times."""
    import triton.testing

    from zone_kernels.runtime import benchmark_rows

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **_: calls.append(("bench", fn())) or 2.0)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **_: calls.append(("graph", fn())) or 0.5)
    variants = {"a: plain": (lambda: "a", 30), "c: kernel": (lambda: "c", 10)}

    def check(out):
        calls.append(("check", out))
        return {"out": out}

    rows = benchmark_rows(variants, check, torch.device("cuda"), lambda: "op")
    assert [(row["name"], row["time_ms"], row["out"]) for row in rows] == [
        ("a: plain", 2.0, "a"), ("c: kernel", 2.0, "c"),
        ("c: through the custom op (as torch.compile calls it)", 2.0, "op"),
        ("c: the same, replayed from a CUDA graph", 0.5, "c")]
    assert calls[:4] == [("check", "a"), ("bench", "a"), ("check", "c"), ("bench", "c")]
    host = benchmark_rows(variants, lambda out: {}, torch.device("cuda"), lambda: "op", lambda name, run: 7.0)
    assert [row["time_ms"] for row in host[:2]] == [7.0, 7.0]
    assert [row["time_ms"] for row in benchmark_rows(variants, lambda out: {}, torch.device("cpu"), None)] == [
        None, None]


def test_a_kernel_benchmark_that_fails_spares_the_others(capsys, monkeypatch):
    import functools

    from zone_benchmarks.bench_kernels import main as bench_kernels
    from zone_kernels import attn_accumulate, group_norm

    def broken(device):
        raise RuntimeError("triton compilation failed")
    monkeypatch.setattr(attn_accumulate, "benchmark", broken)
    monkeypatch.setattr(group_norm, "benchmark", functools.partial(group_norm.benchmark, shape=(1, 64, 8, 8)))
    assert bench_kernels([]) == 0
    output = capsys.readouterr().out
    assert "kernel 1: attention-map accumulation" in output and "RuntimeError: triton compilation failed" in output
    after = output.split("triton compilation failed")[-1]
    assert "kernel 2: mask binarization" in after and "kernel 3: GroupNorm" in after
    assert "c: fused Triton kernel" in output and "c: Triton kernel on NHWC" in output


def test_graph_memory_reads_its_shapes_and_needs_a_gpu(capsys):
    from zone_benchmarks import graph_memory

    args = graph_memory.parse_args(["--sizes", "512X384,256x512", "--batches", "1,4"])
    assert args.shapes == [(1, 512, 384), (1, 256, 512), (4, 512, 384), (4, 256, 512)]
    assert args.dtype == "fp16"  # what a server's graphs hold
    for bad in (["--sizes", "500x512"], ["--sizes", "512"], ["--batches", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            graph_memory.parse_args(bad)
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert graph_memory.main([]) == 2
        assert capsys.readouterr().err.startswith("error: CUDA graphs need a CUDA GPU")


def test_selection_agreement_names_the_same_choice_or_measures_the_difference():
    from zone_benchmarks.bench_refine import centre_mask, selection_agreement
    from zone_engine.refine import Selection

    square = np.zeros((8, 8), bool)
    square[2:6, 2:6] = True  # 16 px
    wider = square.copy()
    wider[2:6, 6] = True  # 20 px
    assert selection_agreement(Selection(square, 0.5, 3), Selection(square.copy(), 0.5, 3)) == "same"
    assert selection_agreement(Selection(None, 0.0, 3), Selection(None, 0.0, 3)) == "same"
    assert selection_agreement(Selection(square, 0.5, 3), Selection(wider, 0.4, 3)) == 16 / 20
    assert selection_agreement(Selection(square, 0.5, 3), Selection(None, 0.0, 3)) == 0.0
    assert selection_agreement(Selection(square, 0.5, 3), Selection(square, 0.5, 4)) == 1.0  # counts differ
    assert selection_agreement(Selection(square, 0.5, 3), Selection(square, 0.6, 3)) == 1.0  # scores differ
    assert selection_agreement(Selection(None, 0.0, 3), Selection(None, 0.0, 4)) == 0.0
    assert np.array_equal(centre_mask((8, 8)), square)  # M_b of the search rows: the central quarter


def test_mask_agreement_takes_each_reference_masks_best_match():
    from zone_benchmarks.bench_refine import mask_agreement

    left, right, top = (np.zeros((4, 4), bool) for _ in range(3))
    left[:, :2], right[:, 2:], top[:2] = True, True, True
    assert mask_agreement([left, right], [top, right]) == pytest.approx((2 / 3, 1 / 3))  # left's best: top, 1/3
    assert mask_agreement([], []) == (1.0, 1.0) and mask_agreement([left], []) == (0.0, 0.0)


@pytest.mark.parametrize(("module", "argv", "words"), [
    ("bench_refine", ["--size", "0"], "--size must be between 32 and 2048"),  # was a ZeroDivisionError
    ("bench_refine", ["--points-per-side", "0"], "--points-per-side must be between 1 and 256"),  # was the default
    ("bench_refine", ["--points-per-batch", "0"], "--points-per-batch must be at least 1"),
    ("bench_refine", ["--providers", "CUDA"], "unknown ONNX Runtime provider 'CUDA': did you mean CUDAExecution"),
    ("bench_refine", ["--device", "gpu"], "device 'gpu' is not one the engine runs on"),
    ("bench_refine", ["--fp16", "--no-onnx"], "--fp16 sets the ONNX export's precision"),  # was silently unread
    ("bench_refine", ["--providers", "CPUExecutionProvider", "--no-onnx"], "--providers are ONNX Runtime's"),
    ("bench_refine", ["--device", "cpu", "--sam-precision", "fp16"], "fp16 runs only on CUDA"),
    ("bench_dual_unet", ["--repeats", "0"], "--repeats must be at least 1"),  # was an IndexError
    ("bench_dual_unet", ["--batch", "0"], "--batch must be between 1 and 256"),  # was a reshape's RuntimeError
    # Each bound, not only the first that broke.
    ("bench_refine", ["--size", "31"], "--size must be between 32 and 2048"),
    ("bench_refine", ["--size", "2049"], "--size must be between 32 and 2048"),
    ("bench_refine", ["--repeats", "0"], "--repeats must be at least 1"),
    ("bench_refine", ["--points-per-side", "257"], "--points-per-side must be between 1 and 256"),
    ("bench_dual_unet", ["--batch", "257"], "--batch must be between 1 and 256"),
    ("bench_dual_unet", ["--resolution", "0"], "--resolution must be a multiple of 8 between 32 and 2048"),
    ("bench_photo", ["--size", "63x4000"], "63x4000: each side at least 64"),
    ("bench_photo", ["--size", "10001x10000"], "at most 100,000,000 pixels"),  # before a 100 MP photo is made
    ("bench_photo", ["--size", "3000"], "'3000' is not HxW"),
    ("bench_photo", ["--repeats", "0"], "--repeats must be between 1 and 100"),  # not the 100 choices listed
    ("bench_photo", ["--repeats", "101"], "--repeats must be between 1 and 100"),
    ("graph_memory", ["--sizes", "512x512,496x512"], "--sizes 512x512,496x512: each side a multiple of 32, at "),
    ("graph_memory", ["--sizes", "512x496"], "--sizes 512x496: each side a multiple of 32, at least 32"),
    ("graph_memory", ["--sizes", "0x512"], "--sizes 0x512: each side a multiple of 32, at least 32"),
    ("graph_memory", ["--batches", "1,0"], "--batches 1,0: each at least 1"),
    ("graph_memory", ["--steps", "0"], "--steps must be at least 1"),
    ("graph_memory", ["--sizes", "512xabc"], "--sizes takes HxW,HxW,... and --batches N,N,..."),
])
def test_the_micro_benchmarks_say_a_bad_option_in_one_line(capsys, module, argv, words):
    parse = importlib.import_module(f"zone_benchmarks.{module}").parse_args
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2 and words in capsys.readouterr().err


def test_the_micro_benchmarks_check_what_auto_found_and_the_options_their_help_names(capsys):
    """bench_refine with --device auto ran fp16 SAM on the CPU; graph_memory took a batch of 3, bench_dual_unet's
    median of an even count was its upper middle."""
    from zone_benchmarks import bench_dual_unet, bench_refine, graph_memory

    if not torch.cuda.is_available():  # auto finds the CPU
        assert bench_refine.main(["--model-type", "tiny", "--size", "64", "--sam-precision", "fp16", "--no-onnx"]) == 2
        assert "--sam-precision fp16 runs only on CUDA" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        graph_memory.parse_args(["--batches", "1,3"])
    assert "--batches 1,3: each a power of two" in capsys.readouterr().err
    clock = iter([0.0, 0.010, 1.0, 1.030])  # two timed calls of 10 and 30 ms (after the untimed one)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_dual_unet.time, "perf_counter", lambda: next(clock))
        seconds, _ = bench_dual_unet.time_variant(lambda: calls.append("call"), (), torch.device("cpu"), repeats=2)
    assert seconds == pytest.approx(0.020) and len(calls) == 3


def test_rows_that_build_on_their_first_edit_are_always_warmed_up():
    """With --warmup 0 a fused row on CUDA timed its CUDA graphs' capture in its first edit: the rule knew
    backend names that no longer exist ("cuda-graphs") and missed the row whose pipeline captures."""
    from zone_engine.graphs import CapturedCalls, eager

    def row(name, run=None):
        return harness.Implementation(name, "fp16", edit=lambda: None,
                                      pipe=None if run is None else SimpleNamespace(run=run))

    assert harness.builds_on_first_edit(row("engine:compile", eager))
    assert harness.builds_on_first_edit(row("engine:tensorrt", eager))
    assert harness.builds_on_first_edit(row("engine:fused+gn-torch", CapturedCalls()))
    assert not harness.builds_on_first_edit(row("engine:fused", eager))
    assert not harness.builds_on_first_edit(row("baseline"))


def test_the_benchmark_edits_at_the_resolution_it_is_given(monkeypatch):
    """--resolution 1024 timed edits at 512: the engine's default max_side shrank the test image first."""
    seen = {}

    class Stop(Exception):
        pass

    def engine_rows(config, models, device, image, edit_config, **kwargs):
        seen.update(image=image.shape[:2], geometry=working_geometry(*image.shape[:2], edit_config.max_side),
                    frozen=gc.get_freeze_count())
        raise Stop

    monkeypatch.setattr(harness, "EngineRows", engine_rows)
    monkeypatch.setattr(harness, "ReferenceStyleZone", lambda *args: None)
    config = dataclasses.replace(PRESETS["tiny-smoke"], resolution=640, warmup=1)
    with pytest.raises(Stop):
        run_benchmark(config, progress=lambda message: None)
    assert seen["image"] == (640, 640)
    assert seen["geometry"].scaled_size == (640, 640) and seen["geometry"].latent_size == (80, 80)
    # The models were frozen out of the collections between rows, and the run gave them back to the collector.
    assert seen["frozen"] > 0 and gc.get_freeze_count() == 0


def test_a_summary_is_the_median_and_quartiles_of_its_samples():
    summary = measure.summarize([10.0, 1.0, 2.0])
    assert (summary["median"], summary["q1"], summary["q3"], summary["min"], summary["max"], summary["n"]) == (
        2.0, 1.5, 6.0, 1.0, 10.0, 3)
    assert measure.summarize([])["median"] is None


# ------------------------------------------------------------------ the measured figures, by their definitions


def test_step_clock_gives_each_steps_own_seconds_and_each_loop_its_own_marks(monkeypatch):
    """per_step is the median of each step's own seconds: seconds counted from the loop's start, or marks left
    over from the previous edit's loop, would report a slower step (and a wrong step count) for every row."""
    clock = measure.StepClock(torch.device("cpu"))
    now = iter([10.0, 11.0, 13.0, 50.0, 54.0])
    with monkeypatch.context() as patched:
        patched.setattr(measure.time, "perf_counter", lambda: next(now))
        clock.start()
        clock.tick(0)
        clock.tick(1)
        first = clock.seconds()
        clock.start()  # the next edit's loop
        clock.tick(0)
    assert first == [1.0, 2.0] and clock.seconds() == [4.0]


def test_peak_memory_is_the_largest_resident_set_sampled(monkeypatch):
    """The CPU's peak memory column: the largest sample, not the last; of the resident set (statm's second field),
    which stays within the process's peak (getrusage's KiB, as bytes), not of the address space."""
    # The kernel's peak may lag the live count by a few pages; the address space is several times the resident set.
    assert 0 < measure._current_rss_bytes() <= 1.25 * measure.process_peak_rss_bytes()
    samples, done = iter([300, 900, 200]), []

    def rss() -> int:
        value = next(samples, None)
        if value is None:
            done.append(True)
            return 100
        return value

    monkeypatch.setattr(measure, "_current_rss_bytes", rss)
    with measure.PeakMemory(torch.device("cpu"), interval_s=0.001) as peak:
        for _ in range(5000):  # until the sampler has seen every sample (a few ms)
            if done:
                break
            time.sleep(0.001)
    assert done and peak.peak_bytes == 900 and peak.report()["kind"] == "process_rss_sampled"


def test_the_matmul_ceiling_is_the_best_products_rate_after_untimed_warm_up(monkeypatch):
    """The floor divides by this ceiling: 2 n³ FLOPs over the fastest product (the median beside it), timed only
    after three warm-up products (a first product's one-off costs would lower the ceiling)."""
    events, mm = [], torch.mm
    now = iter([0.0, 1.0, 10.0, 14.0, 20.0, 22.0])  # products of 1 s, 4 s and 2 s
    with monkeypatch.context() as patched:
        patched.setattr(measure.torch, "mm", lambda a, b: events.append("mm") or mm(a, b))
        patched.setattr(measure.time, "perf_counter", lambda: events.append("clock") or next(now))
        ceiling = measure.matmul_peak(torch.device("cpu"), torch.float32, repeats=3, size=2)
    assert ceiling == {"dtype": "float32", "n": 2, "flops_per_s": 16.0, "median_flops_per_s": 8.0}
    assert events[:4] == ["mm", "mm", "mm", "clock"]


def test_engine_and_baseline_outputs_are_compared_pixel_for_pixel():
    """The agreement columns: uint8 differences taken without wrapping (1 - 2 is 1 level, not 255) and two empty
    masks agreeing fully."""
    a, b = np.array([[1, 200]], np.uint8), np.array([[2, 190]], np.uint8)
    assert harness._max_diff(a, b) == 10 and harness._max_diff(a, a) == 0
    assert harness._max_diff(np.array([1], np.uint8), np.array([2], np.uint8)) == 1
    empty = np.zeros((2, 2), bool)
    assert harness._iou(empty, empty) == 1.0
    assert harness._iou(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)) == pytest.approx(1 / 3)
    half, full = np.array([1, 1, 0, 0], bool), np.ones(4, bool)
    engine = SimpleNamespace(image=a, styled=a, mask_b=half, mask_f=full, region=half, used_fallback=True)
    reference = SimpleNamespace(image=b, styled=a, mask_b=full, mask_f=full, region=~half, used_fallback=False)
    assert harness.compare(engine, reference, "fp16") == {
        "dtype": "fp16", "max_pixel_diff_image": 10, "max_pixel_diff_styled": 0, "iou_mask_b": 0.5,
        "mask_b_identical": False, "iou_mask_f": 1.0, "mask_f_identical": True, "iou_region": 0.0,
        "used_fallback": True, "baseline_used_fallback": False}
    assert harness.agreement(engine, reference) == {"max_pixel_diff_image": 10, "max_pixel_diff_styled": 0,
                                                    "mask_b_identical": False, "mask_f_identical": True}
    assert harness.Parity("engine:eager", engine).report(reference) == {
        "name": "engine:eager", **harness.compare(engine, reference, "fp32")}
    assert harness.Parity(None).report(reference) is None  # every engine row failed: the report has no parity line


def test_the_agreement_table_says_when_both_sides_fell_back_so_sams_segments_were_not_compared():
    """With random SAM weights at ZONE's thresholds every row and the baseline fall back to M_b: an IoU M_f of 1
    there compares M_b with M_b (the H200's bf16-SAM rows "agreed" so), and the report must not let it pass for
    agreement of SAM's segments."""
    def quality(used_fallback: bool, baseline_used_fallback: bool) -> dict:
        return {"dtype": "fp16", "max_pixel_diff_image": 1, "max_pixel_diff_styled": 1, "iou_mask_b": 1.0,
                "mask_b_identical": True, "iou_mask_f": 1.0, "iou_region": 1.0, "used_fallback": used_fallback,
                "baseline_used_fallback": baseline_used_fallback}
    both = {"quality": {"engine:fused": quality(True, True), "engine:fused+sam-bf16": quality(True, True)},
            "parity": None}
    text = "\n".join(agreement_table(both))
    assert "engine:fused, engine:fused+sam-bf16 and the baseline all fell back to M_b" in text
    assert "SAM's segments (a reduced-precision SAM's borders among them) were not compared" in text
    segmented = {"quality": {"engine:fused": quality(False, False), "engine:eager": quality(True, False)},
                 "parity": None}
    assert "fell back" not in "\n".join(agreement_table(segmented))


def test_the_unet_flop_count_agrees_with_an_independent_count_of_its_layers():
    """The floor's FLOPs (FlopCounterMode on a meta copy) against a count from the layers' shapes alone: 2 x MACs of
    every Conv2d and Linear, and 2 x 2 x N x K x inner_dim for each attention's two products (SD1.5 at 64²:
    803.4 GFLOP both ways, ZONE.md's figure)."""
    from zone_engine.models import PRESETS as MODEL_PRESETS
    from zone_engine.models import build_unet

    with torch.device("meta"):
        unet = build_unet(MODEL_PRESETS["tiny"])
    counted = []

    def convolution(module, _, out):
        counted.append(2 * out.numel() * module.in_channels // module.groups * module.kernel_size[0]
                       * module.kernel_size[1])

    def attention(module, args, kwargs, _):
        states, context = args[0] if args else kwargs["hidden_states"], kwargs.get("encoder_hidden_states")
        queries = states.shape[2] * states.shape[3] if states.ndim == 4 else states.shape[1]
        keys = queries if context is None else context.shape[1]
        counted.append(4 * states.shape[0] * queries * keys * module.inner_dim)

    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(convolution)
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda module, _, out: counted.append(2 * out.numel() * module.in_features))
        elif isinstance(module, Attention):
            module.register_forward_hook(attention, with_kwargs=True)
    latent, context_dim = (16, 16), unet.config.cross_attention_dim
    with torch.no_grad():
        unet(torch.empty(1, 8, *latent, device="meta"), torch.tensor(999),
             encoder_hidden_states=torch.empty(1, 77, context_dim, device="meta"))
    assert sum(counted) > 0 and measure.unet_flops_per_row(dict(unet.config), latent, context_dim) == sum(counted)


# What classify_action is given, in tests that stub it.
STUBBED_CLASSIFIER_MODELS = SimpleNamespace(tokenizer=None, text_encoder=None, action_classifier=None)


def stand_in_row(name: str, calls: list[str], fails_at: int | None = None,
                 stop: Deadline | None = None) -> harness.Implementation:
    """A report row whose edit only says it ran (in `calls`): its `fails_at`-th edit raises, or with `stop` is
    where SIGTERM came."""
    def edit():
        calls.append(name)
        if calls.count(name) == fails_at:
            if stop is not None:
                stop.stop("it was sent SIGTERM")
            raise RuntimeError("boom")
        return None, {"total": 1.0}, [0.5]
    return harness.Implementation(name, "fp32", edit)


def test_no_edit_starts_past_the_time_limit_warm_ups_included_however_many_repeats_are_asked(monkeypatch):
    """The warm-up edits went on past --time-limit (--warmup 6 --time-limit 8: all six ran, 16 s), and once the
    time was up the rounds still counted to --repeats doing nothing (--repeats 10**20: a run that never ended,
    SIGTERM included)."""
    monkeypatch.setattr(harness, "_release", lambda device: None)
    config = dataclasses.replace(PRESETS["tiny-smoke"], warmup=6, repeats=1000)
    now, calls, checks = [0.0], [], []
    row = stand_in_row("engine:eager", calls)
    row.edit = lambda edit=row.edit: now.__setitem__(0, now[0] + 2.0) or edit()  # each edit 2 s
    with monkeypatch.context() as patched:  # the clock of the time module itself: undone at once
        patched.setattr(measure.time, "monotonic", lambda: now[0])
        deadline = Deadline(8)
        patched.setattr(deadline, "expired", lambda expired=deadline.expired: checks.append(1) or expired())
        harness.measure([row], config, torch.device("cpu"), lambda message: None, deadline)
    assert calls == ["engine:eager"] * 4 and not row.walls  # the fifth warm-up would start at 8 s
    assert deadline.reason == "its --time-limit of 8 s ran out" and len(checks) < 10


def test_the_rounds_warm_each_row_up_before_its_first_timed_edit_and_drop_a_row_that_failed(monkeypatch):
    """fp32 rounds with stand-in edits: an engine row first, then the baseline, then the others; warm-up only in
    the first round (a row that builds on its first edit warmed up even without --warmup); a row that raised
    leaves the rounds and the parity edit is the first engine row that did not; a row the deadline stopped before
    its first timed edit is skipped with why, and with the baseline's (or before the rows are built) there is
    nothing to compare."""
    monkeypatch.setattr(harness, "_release", lambda device: None)  # a full collection after each edit: seconds here
    config = dataclasses.replace(PRESETS["tiny-smoke"], warmup=0, repeats=2)
    calls = []

    def rounds(engines: list[harness.Implementation], deadline: Deadline):
        calls.clear()
        rows = SimpleNamespace(config=config, device=torch.device("cpu"), skipped=[],
                               build=lambda dtype: calls.append("build") or engines)
        timed, parity = harness.timed_rows(stand_in_row("baseline", calls), rows, torch.float32,
                                           lambda message: None, deadline)
        return timed, parity, rows.skipped

    engines = [stand_in_row("engine:broken", calls, fails_at=1), stand_in_row("engine:compile", calls),
               stand_in_row("engine:eager", calls)]
    timed, parity, skipped = rounds(engines, Deadline(None))
    assert calls == ["build", "engine:broken", "baseline", "engine:compile", "engine:compile", "engine:eager",
                     "baseline", "engine:compile", "engine:eager"]
    assert [row.name for row in timed] == ["baseline", "engine:compile", "engine:eager"]
    assert [len(row.walls) for row in timed] == [2, 2, 2] and len(engines[1].warmup_s) == 1
    assert parity.name == "engine:compile"
    assert skipped == [{"name": "engine:broken", "skipped": "timed edit 1 failed: RuntimeError: boom"}]

    deadline = Deadline(None)  # SIGTERM inside eager's first timed edit: no round after it, eager skipped
    timed, _, skipped = rounds([stand_in_row("engine:fused", calls),
                                stand_in_row("engine:eager", calls, fails_at=1, stop=deadline)], deadline)
    assert calls == ["build", "engine:fused", "baseline", "engine:eager"]
    assert [row.name for row in timed] == ["engine:fused", "baseline"]
    assert skipped == [{"name": "engine:eager", "skipped": "no timed edit: the run was cut short (it was sent "
                                                           "SIGTERM)"}]
    deadline = Deadline(None)  # SIGTERM inside the first row's first edit: the baseline never ran
    with pytest.raises(ZoneError, match=r"cut short before the baseline's first timed edit \(it was sent SIGTERM\)"):
        rounds([stand_in_row("engine:eager", calls, fails_at=1, stop=deadline)], deadline)
    with pytest.raises(ZoneError, match="cut short before the baseline's first timed edit"):
        rounds([], deadline)  # the time up before the rounds (in the models' build): no row is built for nothing
    assert calls == []


def test_a_rows_record_holds_its_figures_by_their_definitions():
    """summarize_run and summarize_batched on set figures: unless every edit marked each step (the second edit's
    marks stop at one here) the step is denoise ÷ steps; the peak memory is the largest sampled; throughput is
    edits ÷ wall time; a batched step only when every batch marked each step, "denoised as one batch" only when
    every batch was."""
    config = dataclasses.replace(PRESETS["tiny-smoke"], steps=2, batch=2)
    memory = [{"bytes": 3, "label": "during the timed edits"}, {"bytes": 7, "label": "during the timed edits"}]
    result = SimpleNamespace(used_fallback=False, mask_b=np.ones((2, 2)), mask_f=np.zeros((2, 2)),
                             region=np.eye(2))
    row = harness.Implementation(
        "engine:tensorrt", "fp16", edit=lambda: None, result=result, walls=[1.0, 3.0], peak_memory=memory,
        timings=[{**dict.fromkeys(STAGES, 0.1), "denoise": 0.8, "total": 2.0}] * 2, steps=[[0.1, 0.2], [0.3]],
        batched=harness.BatchedRun(2, walls=[0.5, 1.5], steps=[[0.1, 0.2], [0.3]], peak_memory=memory,
                                   denoise_runs=[[2], [1, 1]]))
    record = harness.summarize_run(row, config, torch.device("cpu"))
    assert record["per_step"]["median"] == pytest.approx(0.4) and record["per_step_source"].startswith("denoise ÷")
    assert record["peak_memory"]["bytes"] == 7
    assert (record["throughput"]["edits_per_s"], record["throughput"]["requests"]) == (0.5, 2)
    assert (record["mask_b_fraction"], record["mask_f_fraction"], record["region_fraction"]) == (1.0, 0.0, 0.5)
    batched = record["batched_throughput"]
    assert batched["edits_per_s"] == 2.0 and batched["speedup_vs_sequential"] == 4.0
    assert batched["per_step"] is None and batched["denoised_as_one_batch"] is False  # the second batch: [1, 1]
    assert batched["peak_memory"] == {"bytes": 7, "label": "during the timed batches"}


def test_batches_are_measured_only_with_batch_over_1_each_request_on_its_own_seed():
    config, edit_config = dataclasses.replace(PRESETS["tiny-smoke"], batch=3, seed=7), EditConfig(seed=0)
    image = np.zeros((8, 8, 3), np.uint8)
    assert [request.config.seed for request in harness.batch_requests(image, config, edit_config)] == [7, 8, 9]
    row = harness.Implementation("baseline", "fp32", edit=lambda: None)
    harness.measure_batched([row], dataclasses.replace(config, batch=1), image, edit_config, torch.device("cpu"),
                            print, Deadline(None))
    assert row.batched_skip is None  # batch 1: no batched_throughput at all, not "not applicable"


def test_batched_rounds_warm_up_once_with_warm_up_edits_and_a_failed_batch_leaves_them(monkeypatch):
    """measure_batched with stand-in pipelines: one untimed batch each (the run has warm-up edits), then one
    timed batch a round, each its own denoising loop of B; a row whose batch raised is tried no more."""
    monkeypatch.setattr(harness, "_release", lambda device: None)
    monkeypatch.setattr(harness, "classify_action", lambda *args: None)
    masks = np.ones((2, 2), bool)
    result = SimpleNamespace(image=np.zeros((2, 2, 3), np.uint8), styled=np.zeros((2, 2, 3), np.uint8),
                             mask_b=masks, mask_f=masks, region=masks, used_fallback=False)
    other = SimpleNamespace(**{**vars(result), "image": np.ones((2, 2, 3), np.uint8)})  # another seed's edit
    batches = []

    def batching_row(name: str, fails: bool = False) -> harness.Implementation:
        denoiser = measure.BatchStepTimedDenoiser(None, measure.StepClock(torch.device("cpu")))

        def edit_batch(requests):
            batches.append(name)
            if fails:
                raise torch.OutOfMemoryError("CUDA out of memory")
            denoiser.runs.append(len(requests))
            return [result] + [other] * (len(requests) - 1)
        pipe = SimpleNamespace(denoiser=denoiser, edit_batch=edit_batch, models=STUBBED_CLASSIFIER_MODELS)
        return harness.Implementation(name, "fp32", edit=lambda: None, result=result, pipe=pipe)

    fused, broken = batching_row("engine:fused"), batching_row("engine:broken", fails=True)
    config = dataclasses.replace(PRESETS["tiny-smoke"], batch=2, warmup=1, repeats=2)
    harness.measure_batched([fused, broken], config, np.zeros((8, 8, 3), np.uint8), EditConfig(),
                            torch.device("cpu"), lambda message: None, Deadline(None))
    assert batches == ["engine:fused", "engine:broken", "engine:fused", "engine:fused"]
    assert len(fused.batched.warmup_s) == 1 and len(fused.batched.walls) == 2 and fused.batched.error is None
    assert fused.batched.denoise_runs == [[2], [2]]  # the warm-up batch's loop not counted in the first
    assert fused.batched.first_vs_sequential["max_pixel_diff_image"] == 0  # the first request against the row's edit
    assert broken.batched.error == "batch of 2 failed: OutOfMemoryError: CUDA out of memory"
    # Once the time is up no batch starts, and the rounds end there (they counted to --repeats doing nothing).
    stopped, checks, late = Deadline(None), [], batching_row("engine:fused")
    stopped.stop("it was sent SIGTERM")
    monkeypatch.setattr(stopped, "expired", lambda expired=stopped.expired: checks.append(1) or expired())
    harness.measure_batched([late], dataclasses.replace(config, repeats=1000), np.zeros((8, 8, 3), np.uint8),
                            EditConfig(), torch.device("cpu"), lambda message: None, stopped)
    assert not late.batched.walls and "cut short" in late.batched.error and len(checks) < 10


def test_the_floor_takes_the_better_ceiling_and_the_cuda_floor_is_dense_bf16(monkeypatch):
    """A busy moment can only slow a matmul: of the rates before and after the edits (after: unless the run was cut
    short), the faster is the ceiling; on CUDA a dense bf16 one too, ZONE.md's floor."""
    monkeypatch.setattr(harness, "unet_flops_per_row", lambda unet_config, latent_size, context_dim: 2e9)
    monkeypatch.setattr(harness, "matmul_peak", lambda device, dtype: {"dtype": "float32", "flops_per_s": 4e9})
    models = SimpleNamespace(ip2p_unet=SimpleNamespace(config={}),
                             text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=32)))
    before = {"dtype": "float32", "flops_per_s": 1e9}
    runs = [{"name": "engine:eager", "stages": {"denoise": {"median": 18.0}}},
            {"name": "engine:compile", "skipped": "no timed edit"}]
    config = dataclasses.replace(PRESETS["tiny-smoke"], steps=3)
    floor = harness.cost_floor(models, (8, 8), config, torch.device("cpu"), [before], runs)
    assert floor["denoise_tflop"] == pytest.approx(2e9 * 6 * 3 / 1e12)
    (ceiling,) = floor["ceilings"]
    assert ceiling["flops_per_s"] == 4e9 and ceiling["measured_flops_per_s"] == {"before": 1e9, "after": 4e9}
    assert (ceiling["step_floor_s"], ceiling["denoise_floor_s"]) == (3.0, 9.0)  # 6 rows of 2 GFLOP at 4 TFLOP/s
    assert ceiling["gap"] == {"engine:eager": 2.0}
    (ceiling,) = harness.cost_floor(models, (8, 8), config, torch.device("cpu"), [before], runs,
                                    remeasure=False)["ceilings"]
    assert ceiling["flops_per_s"] == 1e9 and ceiling["measured_flops_per_s"]["after"] is None
    # The run's floor: remeasured, unless the run was cut short (then no new work starts).
    monkeypatch.setattr(harness, "cost_floor", lambda *args, remeasure: {"remeasured": remeasure})
    cut_short = Deadline(None)
    cut_short.stop("it was sent SIGTERM")
    for deadline, remeasured in ((Deadline(None), True), (cut_short, False)):
        floor = harness._floor(models, (8, 8), config, torch.device("cpu"), [before], runs, deadline, print)
        assert floor == ({"remeasured": remeasured}, None)
    cuda = torch.device("cuda")
    assert harness.ceiling_dtypes(cuda, torch.float16) == [torch.float16, torch.bfloat16]
    assert harness.ceiling_dtypes(cuda, torch.bfloat16) == [torch.bfloat16]
    assert harness.ceiling_dtypes(torch.device("cpu"), torch.float32) == [torch.float32]


def test_without_warm_up_edits_each_network_is_called_once_untimed_first(monkeypatch):
    """First calls allocate and pick kernels: with --warmup 0 nothing else keeps that cost out of the first timed
    edit, and the report says which was done."""
    primed, cpu = [], torch.device("cpu")
    monkeypatch.setattr(harness, "prime", lambda *args: primed.append(args))
    with_warm_up = dataclasses.replace(PRESETS["tiny-smoke"], warmup=1)
    assert harness._prime_unless_warming_up(with_warm_up, None, (8, 8), cpu) == "none: warm-up edits instead"
    assert not primed
    priming = harness._prime_unless_warming_up(dataclasses.replace(with_warm_up, warmup=0), None, (8, 8), cpu)
    assert priming.startswith("no warm-up edit; each network called once untimed first") and len(primed) == 1


def test_an_engine_edit_counts_its_classification_in_the_action_stage_and_the_total(monkeypatch):
    """The engine edit is given its action (as the baseline is): the classification it skipped is timed beside it
    and added to both figures."""
    class FixedStopwatch(Stopwatch):
        @contextlib.contextmanager
        def __call__(self, stage: str):
            yield
            self.seconds[stage] = 0.25

    classified = []
    monkeypatch.setattr(harness, "Stopwatch", FixedStopwatch)
    monkeypatch.setattr(harness, "classify_action", lambda instruction, *models_and_rule: classified.append(
        instruction))
    result = SimpleNamespace(timings={"action": 0.5, "denoise": 1.0, "total": 2.0})
    pipe = SimpleNamespace(device=torch.device("cpu"), denoiser=object(), models=STUBBED_CLASSIFIER_MODELS,
                           edit=lambda *args: result)
    config = PRESETS["tiny-smoke"]
    _, timings, _ = harness.engine_edit(pipe, None, config, EditConfig())()
    assert timings == {"action": 0.75, "denoise": 1.0, "total": 2.25} and classified == [config.instruction]
    assert result.timings["total"] == 2.0  # the pipeline's own record left as it was


# ----------------------------------------------------------------------------------------------- the report


def _summary(median: float, low: float, high: float, n: int = 2) -> dict:
    return {"n": n, "median": median, "min": low, "max": high, "q1": (low + median) / 2, "q3": (median + high) / 2}


def test_the_report_says_each_figure_in_its_unit_and_its_own_column():
    """The markdown is what people read: a median's spread as min–max (not the quartiles), a speed-up as the
    record's ratio, seconds, GiB and TFLOP/s in their units, and every agreement figure under its own header."""
    assert (format_seconds(12.34), format_seconds(1.5), format_seconds(0.0123), format_seconds(2e-5)) == (
        "12.3 s", "1.50 s", "12.3 ms", "20 µs")
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    stages = {column: _summary(0.5, 0.25, 1.0) for column in (*STAGES, "total")}
    stages["total"] = _summary(2.0, 1.0, 4.0)
    run = {"name": "engine:fused", "dtype": "fp32", "stages": stages, "per_step": _summary(0.1, 0.05, 0.2, n=4),
           "per_step_source": "marks", "peak_memory": {"bytes": 2**31, "label": "peak"},
           "throughput": {"edits_per_s": 0.5, "label": "edits"}}
    row = next(line for line in stage_table({"runs": [run], "speedup": {"engine:fused": 2.0}})
               if line.startswith("| engine:fused"))
    assert "| 2.00 s [1.00 s–4.00 s] | 2.00× | 2.00 GiB | 0.5 |" in row
    assert "| 100.0 ms [50.0 ms–200.0 ms] |" in row  # per_step's over all the steps
    single = {**run, "stages": {**stages, "total": _summary(2.0, 2.0, 2.0, n=1)}}
    assert "| 2.00 s | 2.00× |" in next(line for line in stage_table({"runs": [single], "speedup": {
        "engine:fused": 2.0}}) if line.startswith("| engine:fused"))

    quality = {"dtype": "fp32", "max_pixel_diff_image": 7, "max_pixel_diff_styled": 1, "iou_mask_b": 0.5,
               "mask_b_identical": False, "iou_mask_f": 0.25, "iou_region": 0.125, "used_fallback": False,
               "baseline_used_fallback": True}
    lines = agreement_table({"quality": {"engine:fused": quality}, "parity": {"name": "engine:fused", **quality}})
    assert "| engine:fused | fp32 | 7 | 1 | 0.5000 | False | 0.2500 | 0.1250 | False / True |" in lines
    assert lines[-1] == ("fp32 parity (engine:fused): max pixel difference 7 (image), 1 (styled); IoU M_b 0.5000, "
                         "M_f 0.2500.")

    ceiling = {"dtype": "float32", "flops_per_s": 2e12, "measured_flops_per_s": {"before": 2e12, "after": 1e12},
               "denoise_floor_s": 4.0, "step_floor_s": 0.2, "gap": {"engine:fused": 1.5}}
    floor = {"unet_gflop_per_row": 800.0, "rows_per_step": 6, "denoise_tflop": 96.0, "ceilings": [ceiling]}
    (line,) = floor_lines({"floor": floor, "config": {"steps": 20}})[-1:]
    assert line.startswith("- measured float32 matmul 2 TFLOP/s (best of 2 before the edits and 1 after) → floor "
                           "4.00 s per edit (200.0 ms per step); denoise measured / floor: engine:fused 1.5×")

    batched = {"batch": 4, "edits_per_s": 2.5, "wall_s_per_batch": _summary(1.6, 1.5, 1.7), "per_step": None,
               "peak_memory": None, "speedup_vs_sequential": 5.0, "denoised_as_one_batch": True,
               "first_vs_sequential": {"max_pixel_diff_image": 0, "max_pixel_diff_styled": 1}, "label": "batched: x"}
    (row,) = [line for line in batched_table({"runs": [{**run, "batched_throughput": batched}]})
              if line.startswith("| engine:fused")]
    assert row.startswith("| engine:fused (fp32) | 0.5 | 2.5 | 1.60 s [1.50 s–1.70 s] | – | 5.00× |")


# ---------------------------------------------------------------------------- the baseline's pieces, alone


def test_the_attention_store_keeps_maps_up_to_32_squared_queries_and_the_empty_prompt_rows():
    """The reference keeps every map with at most 32² queries (its cost at 512², where one level has exactly
    32²): `<` would drop that level and make the baseline cheaper than the reference; P[heads:] are the
    empty-prompt rows the localisation reads."""
    heads, store = 2, AttentionStore()
    store.num_att_layers = 2
    first, second = torch.rand(3 * heads, STORED_MAX_QUERIES, 5), torch.rand(3 * heads, STORED_MAX_QUERIES, 5)
    kept, mean = first[heads:].clone(), (first[heads:] + second[heads:]) / 2
    store(first, True, "up", heads)
    store(torch.rand(3 * heads, STORED_MAX_QUERIES + 1, 5), False, "down", heads)
    assert store.cur_step == 1 and store.stored_layer_count() == 1
    assert torch.equal(store.attention_store["up_cross"][0], kept)
    store(second, True, "up", heads)
    store(torch.rand(3 * heads, STORED_MAX_QUERIES + 1, 5), False, "down", heads)
    assert torch.allclose(store.average()["up_cross"][0], mean)  # the running sum over the steps, averaged


def test_small_components_are_those_under_the_area_by_4_connectivity():
    """ZONE.md's fixed rule the engine implements: a 4-connected component of fewer than 64 pixels goes, one of
    64 stays; two blocks touching at a corner are two components."""
    mask = np.zeros((40, 40), np.uint8)
    mask[0:8, 0:8] = 255  # 64 pixels: kept
    mask[20:27, 0:9] = 255  # 63 pixels: dropped
    mask[20:26, 20:26] = 255  # 36 + 36 pixels meeting at a corner: dropped, each under 64
    mask[26:32, 26:32] = 255
    expected = np.zeros_like(mask)
    expected[0:8, 0:8] = 255
    assert np.array_equal(drop_small_components(mask), expected)


def test_the_fine_mask_is_the_first_best_segment_or_the_rough_mask_when_none_overlaps(monkeypatch):
    """As the engine: the segment with the best IoU with M_b (the first of equals), else M_b itself, flagged."""
    import segment_anything

    rough = np.zeros((16, 16), np.uint8)
    rough[0:8, 0:16] = 255
    first, second, apart = (np.zeros((16, 16), bool) for _ in range(3))
    first[0:8, 0:8] = True  # IoU 0.5
    second[0:8, 8:16] = True  # IoU 0.5 too
    apart[8:16, :] = True
    segments = []

    class Generator:
        def __init__(self, sam, **settings):
            pass

        def generate(self, image):
            return [{"segmentation": segmentation} for segmentation in segments]

    monkeypatch.setattr(segment_anything, "SamAutomaticMaskGenerator", Generator)
    config = EditConfig(min_region_area=0)
    segments[:] = [apart, first, second]
    fine, fell_back = get_finemask_everything(rough, rough, None, config)
    assert np.array_equal(fine, first.astype(np.uint8) * 255) and not fell_back
    segments[:] = [apart]
    fine, fell_back = get_finemask_everything(rough, rough, None, config)
    assert np.array_equal(fine, rough) and fell_back


def test_the_fft_region_is_where_the_lumas_differ_by_more_than_the_threshold():
    """With the disc keeping every frequency (default radius, small images) E = |S - G|: R is where it is above
    30, not where it equals it. A small disc is centred on the zero frequency (rows/2, cols/2): on a wide image a
    disc at (cols/2, rows/2) misses it, and a uniform difference gives no region."""
    config = EditConfig(close_kernel=1)
    styled, original = np.zeros((40, 60, 3), np.uint8), np.zeros((40, 60, 3), np.uint8)
    styled[5:15, 5:15] = config.fft_threshold + 1
    styled[25:35, 40:50] = config.fft_threshold
    expected = np.zeros((40, 60), np.uint8)
    expected[5:15, 5:15] = 255
    assert np.array_equal(subtract_fft_images(styled, original, config), expected)
    uniform = np.full((20, 60, 3), 100, np.uint8)
    region = subtract_fft_images(uniform, np.zeros_like(uniform), config.replace(fft_radius=2))
    assert (region == 255).all()


def test_baseline_times_each_stage_around_its_own_work(pipe, baseline, monkeypatch):
    """The speed-ups divide these times: the VAE decode timed as refinement, the classifier's cost skipped, a
    step clock never started, the per-step cache frees left out or a total that is the stages' sum (not the
    edit's wall time) would each change a ratio and no output. SAM is stubbed: its cost is not the point here."""
    import zone_benchmarks.baseline as reference_style

    running, seen = [], []

    class Watch(Stopwatch):  # one second a stage; records which stage is running
        @contextlib.contextmanager
        def __call__(self, stage):
            running.append(stage)
            try:
                yield
            finally:
                running.pop()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + 1.0

    def spy(name, work):
        def called(*args, **kwargs):
            seen.append((name, running[-1] if running else None))
            return work(*args, **kwargs)
        return called

    vae, unet = type(baseline.ip2p_pipe.vae), type(baseline.ip2p_pipe.unet)
    monkeypatch.setattr(reference_style, "Stopwatch", Watch)
    monkeypatch.setattr(reference_style, "time", SimpleNamespace(perf_counter=iter([100.0, 130.0]).__next__))
    monkeypatch.setattr(reference_style, "get_finemask_everything", spy("sam", lambda rough, *_: (rough, False)))
    for module, name in ((reference_style, "show_diff_cross_attention"), (reference_style, "paste_region"),
                         (vae, "encode"), (vae, "decode"), (unet, "forward"), (ReferenceStyleZone, "encode_prompt"),
                         (ReferenceStyleZone, "classify"), (torch.cuda, "empty_cache")):
        monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    ticks = []
    clock = SimpleNamespace(start=lambda: ticks.append("start"), tick=ticks.append)
    config = pipe.default_config.replace(steps=1, action=Action.CHANGE)
    result = baseline.edit(make_sample_image(32, 32), INSTRUCTION, config, step_clock=clock)

    assert result.timings == {**{stage: 1.0 for stage in STAGES}, "total": 30.0}
    assert ticks == ["start", 0]
    assert sorted(set(seen)) == sorted({
        ("encode_prompt", "text"), ("classify", "action"), ("encode", "vae_encode"), ("forward", "denoise"),
        ("empty_cache", "denoise"), ("show_diff_cross_attention", "localize"), ("decode", "vae_decode"),
        ("sam", "refine"), ("paste_region", "blend")})
    assert seen.count(("forward", "denoise")) == 2 and seen.count(("empty_cache", "denoise")) == 1  # both UNets


def test_the_presets_measure_what_the_recorded_results_say():
    """README and RESULTS.md quote runs of these presets (cpu-256: 256², 20 steps, fp32, SAM vit_b at 32² points,
    two rounds; gpu-512: 512², 20 steps, fp16, vit_h): a preset changed silently makes a new run incomparable
    with them, and CPU presets must leave out the backends whose first edit builds for minutes."""
    def settings(name):
        preset = PRESETS[name]
        return (preset.models, preset.resolution, preset.steps, preset.dtype, preset.sam_type,
                preset.sam.points_per_side, preset.repeats, preset.warmup, preset.device, preset.batch, preset.seed)

    assert settings("tiny-smoke") == ("tiny", 64, 2, "fp32", "tiny", 8, 1, 0, "cpu", 2, 42)
    assert settings("cpu-smoke") == ("sd15", 128, 2, "fp32", "vit_b", 4, 1, 0, "cpu", 1, 42)
    assert settings("cpu-256") == ("sd15", 256, 20, "fp32", "vit_b", 32, 2, 0, "cpu", 1, 42)
    assert settings("gpu-512") == ("sd15", 512, 20, "fp16", "vit_h", 32, 5, 1, "cuda", 4, 42)
    assert settings("gpu-throughput") == ("sd15", 512, 20, "fp16", "vit_h", 32, 16, 2, "cuda", 8, 42)
    for name in ("tiny-smoke", "cpu-smoke", "cpu-256"):
        assert not {"compile", "tensorrt"} & set(PRESETS[name].backends)


def test_each_option_changes_its_own_setting():
    """Options that were read but never reached the config would leave the preset's value in the run, and the
    report would say what was asked, not what ran."""
    config = parse_args(["--models", "tiny", "--sam-points", "8", "--sam-precision", "none", "--seed", "7",
                         "--compare-group-norm", "--steps", "3", "--warmup", "2"])
    assert (config.models, config.sam_type, config.sam.points_per_side, config.sam_precision, config.seed,
            config.compare_group_norm, config.steps, config.warmup) == ("tiny", "tiny", 8, None, 7, True, 3, 2)
    assert config.sam.pred_iou_thresh == PRESETS["cpu-smoke"].sam.pred_iou_thresh  # only the points changed
    assert parse_args(["--models", "tiny", "--sam-type", "vit_b"]).sam_type == "vit_b"
    assert not parse_args(["--preset", "gpu-512", "--no-compare-group-norm"]).compare_group_norm
    assert parse_args(["--preset", "gpu-512", "--sam-precision", "fp16"]).sam_precision == "fp16"
    assert parse_args(["--preset", "gpu-512", "--channels-last"]).channels_last  # half precision: allowed


def test_the_floors_unet_count_is_zone_mds_for_sd15():
    """The floor (issue #4: UNet FLOPs per step x 6 rows / matmul peak) rests on this count: ZONE.md's cost model
    gives 803.4 GFLOP a row for SD1.5 at a 64x64 latent, its 77-token context included. Counted on the meta
    device: no weights, no compute."""
    from zone_engine.models import PRESETS, build_unet

    with torch.device("meta"):
        unet = build_unet(PRESETS["sd15"])
    assert measure.unet_flops_per_row(dict(unet.config), (64, 64), 768) / 1e9 == pytest.approx(803.37, abs=0.01)
