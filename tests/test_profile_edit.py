"""benchmarks/profile_edit.py: per-stage device-busy time and launches from torch.profiler's events."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from zone_benchmarks import options, profile_edit
from zone_benchmarks.profile_edit import (
    StageProfile,
    all_stages,
    covered,
    layout_said,
    stage_profiles,
    stage_table,
)
from zone_engine.cli import signals_handled
from zone_engine.config import EditConfig, SamConfig
from zone_engine.errors import ZoneError
from zone_engine.pipeline import STAGES
from zone_engine.timing import RANGE_PREFIX


@pytest.mark.parametrize(("intervals", "window", "expected"), [
    ([], (0, 100), 0),
    ([(10, 30), (20, 50)], (0, 100), 40),  # overlapping: counted once
    ([(10, 30), (40, 50)], (0, 100), 30),
    ([(-10, 10), (90, 120)], (0, 100), 20),  # clipped to the window
    ([(20, 30), (0, 100), (40, 60)], (0, 100), 100),  # one interval covering the others
    ([(100, 120), (-5, 0)], (0, 100), 0),  # touching the window only at its ends
])
def test_covered_counts_each_instant_of_the_window_once(intervals, window, expected):
    assert covered(intervals, window) == pytest.approx(expected)


def _event(name: str, start: float, end: float, device: bool = False, annotation: bool = False,
           parent: FunctionEvent | None = None) -> FunctionEvent:
    event = FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end,
                          device_type=DeviceType.CUDA if device else DeviceType.CPU, is_user_annotation=annotation)
    if parent is not None:
        event.set_cpu_parent(parent)
    return event


def test_stage_profiles_attribute_device_work_and_dispatched_ops_to_the_stage_they_started_in():
    conv = _event("aten::conv2d", 5, 60)
    events = [
        _event(RANGE_PREFIX + "denoise", 0, 100, annotation=True),
        _event(RANGE_PREFIX + "denoise", 0, 100, device=True, annotation=True),  # the GPU copy of the range
        conv, _event("aten::convolution", 6, 59, parent=conv),  # called by conv2d: not dispatched from Python
        _event("aten::add", 70, 80),
        _event("cudaGraphLaunch", 81, 82),
        _event("sm90_gemm", 10, 30, device=True), _event("sm90_gemm", 20, 50, device=True),
        _event("softmax", 90, 120, device=True),  # launched in the stage, finishing after it
        _event(RANGE_PREFIX + "refine", 200, 300, annotation=True),
        _event("aten::mm", 210, 290),
        _event("sm90_gemm", 150, 160, device=True),  # between the stages: no stage's
    ]
    denoise, refine = stage_profiles(events, ("text", "denoise", "refine"))  # no text range: no text row
    assert (denoise.stage, denoise.wall_us, denoise.device_busy_us, denoise.device_ops) == ("denoise", 100, 50, 3)
    assert (denoise.torch_ops, denoise.in_torch_ops_us, denoise.graph_launches) == (2, 65, 1)
    assert denoise.longest[0] == ("sm90_gemm", 50)
    assert denoise.busy_share == pytest.approx(0.5)
    assert (refine.device_busy_us, refine.device_ops, refine.torch_ops) == (0, 0, 1)
    assert refine.longest == (("host: aten::mm", 80),)  # no device work traced there: its ops, said as host time
    total = all_stages([denoise, refine])
    assert (total.wall_us, total.device_busy_us, total.device_ops, total.torch_ops) == (200, 50, 3, 3)
    assert total.busy_share == pytest.approx(0.25) and "| all stages | 0.20 ms | 0.05 ms | 25 % |" in stage_table(
        [denoise, refine])


def test_a_cpu_run_has_no_device_busy_time_and_ranks_its_torch_ops():
    events = [_event(RANGE_PREFIX + "blend", 0, 10, annotation=True), _event("aten::fft_fft2", 1, 4),
              _event("aten::abs", 5, 6), _event("aten::fft_fft2", 7, 9)]
    (blend,) = stage_profiles(events)
    assert blend.device_busy_us is None and blend.busy_share is None
    assert blend.longest == (("aten::fft_fft2", 5), ("aten::abs", 1))
    assert blend.torch_ops_share == pytest.approx(0.6)


def test_an_op_starting_as_a_stage_ends_is_not_that_stages():
    """A range's span is half-open: what starts at its end (the next stage's first op) is not in it."""
    events = [_event(RANGE_PREFIX + "blend", 0, 10, annotation=True), _event("aten::abs", 2, 4),
              _event("aten::add", 10, 12)]
    (blend,) = stage_profiles(events)
    assert (blend.torch_ops, blend.longest) == (1, (("aten::abs", 2),))


def test_a_cpu_runs_all_stages_row_has_no_device_busy_time():
    """Summing stages without device activity gives no busy time, not 0 ms (which would read as an idle GPU)."""
    (blend,) = stage_profiles([_event(RANGE_PREFIX + "blend", 0, 10, annotation=True), _event("aten::abs", 2, 4)])
    assert all_stages([blend]).device_busy_us is None
    assert "| all stages | 0.01 ms | — | — |" in stage_table([blend])


def test_profiling_a_tiny_edit_reports_every_stage(capsys, tmp_path):
    trace = tmp_path / "made" / "trace.json"  # its folder made, as zone edit -o's
    assert options.profile_main(["--models", "tiny", "--device", "cpu", "--resolution", "64", "--steps", "2",
                              "--warmup", "0", "--rows", "5", "--trace", str(trace)]) == 0
    assert json.loads(trace.read_text())["traceEvents"]
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(STAGES) <= set(rows)
    denoise_ops = int(rows["denoise"].split("|")[7])
    assert denoise_ops > int(rows["blend"].split("|")[7]) > 0  # two UNets x 2 steps dispatch the most
    assert "top 5 ops by self time" in table
    op_table = table.split("top 5 ops by self time")[1]
    assert "aten::" in op_table and "zone." not in op_table  # the stages' ranges are not ops
    # What ran, as the pipeline resolved it: the working size padded to a multiple of 32, the precision, layout.
    assert "image 64² worked on at 64×64, 2 steps, denoiser fused in fp32 (contiguous; GroupNorms: unets pytorch" \
        in table


def test_the_header_says_one_step_in_the_singular():
    args = options.parse_profile_args(["--models", "tiny", "--device", "cpu", "--resolution", "64", "--steps", "1"])
    pipe = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, group_norms={"unets": "pytorch"})
    assert ", 1 step, denoiser fused" in profile_edit._what_ran(args, pipe, EditConfig(max_side=64), "fp32")


def test_the_header_says_which_nets_ran_channels_last():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert layout_said(True, cpu, torch.float32) == "UNets and VAE channels-last"  # --channels-last: the VAE's too
    assert layout_said(None, cuda, torch.float16) == "UNets channels-last"  # the default: the UNets' only
    assert layout_said(None, cpu, torch.float32) == layout_said(False, cuda, torch.float16) == "contiguous"


def test_half_precision_on_the_cpu_is_a_one_line_error_naming_the_option(capsys):
    with pytest.raises(SystemExit) as exit_:  # before torch's import and the models' build
        options.profile_main(["--models", "tiny", "--device", "cpu", "--dtype", "fp16", "--warmup", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: --dtype fp16 runs only on CUDA here; on the CPU use fp32")


@pytest.mark.parametrize(("argv", "words"), [
    (["--resolution", "100000"], "--resolution must be a multiple of 32 between 32 and 2048"),
    (["--resolution", "100"], "--resolution must be a multiple of 32"),  # was worked on at 128
    (["--steps", "0"], "--steps must be between 1 and 999"), (["--rows", "-1"], "--rows must be 0 or more"),
])
def test_a_value_out_of_range_is_said_by_its_option(capsys, argv, words):
    with pytest.raises(SystemExit):
        options.parse_profile_args(argv)
    assert words in capsys.readouterr().err


def test_a_trace_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    """A missing folder is made, as zone edit -o's; a file where its folder goes was said as "no folder"."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):
        options.parse_profile_args(["--trace", str(tmp_path / "afile" / "trace.json")])
    assert "afile is a file, not a folder" in capsys.readouterr().err
    new = tmp_path / "new" / "t.json"
    assert options.parse_profile_args(["--trace", str(new)]).trace == new
    assert options.parse_profile_args(["--trace", str(tmp_path / "t.json.gz")]).trace.name == "t.json.gz"
    # Any other name is refused: `--trace photo.png` wrote the trace over the photo.
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    with pytest.raises(SystemExit):
        options.parse_profile_args(["--trace", str(tmp_path / "photo.png")])
    assert "photo.png: a Chrome trace is JSON: name it FILE.json" in capsys.readouterr().err
    assert (tmp_path / "photo.png").read_bytes() == b"\x89PNG"


def test_a_backend_the_device_cannot_run_is_refused_before_the_models_are_built(capsys):
    """zone profile --denoiser tensorrt --device cpu spent 34 s building SD1.5 and SAM vit_h first."""
    for argv, words in ((["--denoiser", "tensorrt", "--device", "cpu"], "needs a CUDA GPU"),
                        (["--denoiser", "tensorrt", "--device", "auto"], "needs --engines DIR"),
                        (["--engines", "x", "--device", "auto"], "is read by --denoiser tensorrt"),
                        (["--sam-precision", "fp16", "--device", "cpu"], "runs only on CUDA")):
        with pytest.raises(SystemExit):
            options.parse_profile_args(argv)
        assert words in capsys.readouterr().err


def test_the_group_norm_option_reaches_the_pipeline(monkeypatch):
    built = []

    def pipeline(*args, **kwargs):
        built.append(kwargs)
        raise InterruptedError("stop before any edit")

    monkeypatch.setattr(profile_edit, "ZonePipeline", pipeline)
    monkeypatch.setattr(profile_edit, "build_random_components", lambda *args: SimpleNamespace(to=lambda *a: "models"))
    with pytest.raises(InterruptedError):
        profile_edit.profile_edit(options.parse_profile_args(["--models", "tiny", "--device", "cpu", "--group-norm",
                                                            "triton"]))
    assert built[0]["group_norm"] == "triton" and built[0]["engines"] is None
    assert options.parse_profile_args([]).group_norm == "auto"


def test_the_op_table_leaves_out_the_stages_ranges():
    """A stage's range is not an op: its self time is the Python between the ops, and would top a CPU table."""
    with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler,
          torch.profiler.record_function(RANGE_PREFIX + "blend")):
        torch.ones(3).add(1)
    table = profile_edit._op_table(profiler, 100, torch.device("cpu"))
    assert "aten::add" in table and RANGE_PREFIX not in table


class _StopEdit(Exception):
    pass


def _recording_pipeline(monkeypatch, built: list, edits: list, stop_after: int):
    """ZonePipeline replaced: records its arguments and each edit's config; the `stop_after`th edit stops the run
    (0: building the pipeline does). The models are not built."""
    def pipeline(*args, **kwargs):
        built.append((args, kwargs))
        if not stop_after:
            raise _StopEdit
        return SimpleNamespace(edit=edit)

    def edit(image, instruction, config):
        edits.append(config)
        if len(edits) == stop_after:
            raise _StopEdit

    monkeypatch.setattr(profile_edit, "ZonePipeline", pipeline)
    monkeypatch.setattr(profile_edit, "build_random_components", lambda *args: SimpleNamespace(to=lambda *a: "models"))


def test_the_profiled_edit_follows_the_warm_ups_with_the_tiny_sams_settings_at_the_resolution(monkeypatch, capsys):
    """--warmup N edits before the one profiled; the random tiny SAM gets the tests' settings; the edit is worked
    on at --resolution, not shrunk to max_side's default 512."""
    built, edits = [], []
    _recording_pipeline(monkeypatch, built, edits, stop_after=3)
    args = options.parse_profile_args(["--models", "tiny", "--device", "cpu", "--resolution", "640", "--steps", "2",
                                       "--warmup", "2"])
    with pytest.raises(_StopEdit):
        profile_edit.profile_edit(args)
    assert len(edits) == 3 and "[profile] profiled edit" in capsys.readouterr().err
    assert {(config.max_side, config.steps) for config in edits} == {(640, 2)}
    assert edits[0].sam == SamConfig.for_random_weights()


def test_a_sigterm_during_a_profile_is_one_line_and_exit_143(monkeypatch, capsys):
    """As zone's own commands: SIGTERM killed `zone profile` silently (the default action), whatever it was doing."""
    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at once; without one installed, the test's below raises instead

    def unhandled(_signum, _frame):
        raise AssertionError("zone profile left SIGTERM to its default action, which kills the process")

    monkeypatch.setattr(profile_edit, "build_random_components", terminated)
    with signals_handled({signal.SIGTERM: unhandled}):
        assert options.profile_main(["--models", "tiny", "--device", "cpu"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "terminated"


def test_a_trace_cut_off_by_ctrl_c_leaves_the_last_one_and_no_partial_file(monkeypatch, tmp_path, capsys):
    """The trace went straight to --trace: a large one, gzip'd in Python, was left cut off by a Ctrl-C."""
    _recording_pipeline(monkeypatch, [], [], stop_after=99)
    trace = tmp_path / "trace.json.gz"
    trace.write_bytes(b"the last run's trace")

    class CutOffProfile(contextlib.nullcontext):  # torch's profiler, whose trace writing is cut off
        def __init__(self, activities):
            super().__init__(self)

        def export_chrome_trace(self, path):
            Path(path).write_bytes(b"half a tr")
            raise KeyboardInterrupt

    monkeypatch.setattr(profile_edit, "profile", CutOffProfile)
    assert options.profile_main(["--models", "tiny", "--device", "cpu", "--warmup", "0", "--trace", str(trace)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert trace.read_bytes() == b"the last run's trace" and os.listdir(tmp_path) == ["trace.json.gz"]


def test_a_cuda_profile_defaults_to_fp16(monkeypatch):
    """Without --dtype a CUDA profile runs the GPU's edit in fp16 (the CPU's in fp32): checked without a GPU."""
    built = []
    _recording_pipeline(monkeypatch, built, [], stop_after=0)
    monkeypatch.setattr(profile_edit, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(profile_edit, "resolve_dtype", lambda name, device: name)
    with pytest.raises(_StopEdit):
        profile_edit.profile_edit(options.parse_profile_args(["--models", "tiny", "--device", "cpu"]))
    assert built[0][0] == ("models", torch.device("cuda"), "fp16")


def _stage(stage: str, device_ops: int, graph_launches: int) -> StageProfile:
    return StageProfile(stage=stage, wall_us=100.0, device_busy_us=10.0 * device_ops, device_ops=device_ops,
                        graph_launches=graph_launches, torch_ops=1, in_torch_ops_us=1.0, longest=())


def test_the_report_names_only_the_stages_whose_graph_kernels_were_not_traced(monkeypatch, capsys):
    """A stage that launched CUDA graphs but shows no device work has busy times that are not real: named; a stage
    with both is not."""
    profiles = [_stage("denoise", 0, 3), _stage("blend", 5, 1), _stage("refine", 4, 0)]
    monkeypatch.setattr(profile_edit, "profile_edit", lambda args: (torch.device("cuda"), "One edit", profiles, ""))
    assert profile_edit.profile_and_report(options.parse_profile_args(["--device", "cpu", "--rows", "0"])) == 0
    out = capsys.readouterr().out
    assert "No device work was traced in denoise although CUDA graphs were launched there" in out


def test_a_zone_error_while_profiling_is_one_line_and_exit_2(monkeypatch, capsys):
    def failing(args):
        raise ZoneError("the models cannot be built")

    monkeypatch.setattr(profile_edit, "profile_edit", failing)
    assert profile_edit.profile_and_report(options.parse_profile_args(["--device", "cpu"])) == 2
    said = capsys.readouterr()
    assert said.out == "" and "the models cannot be built" in said.err.strip().splitlines()[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a profile's device side: needs CUDA")
def test_a_cuda_profile_sees_the_kernels_of_the_replayed_denoising_graph():
    args = options.parse_profile_args(["--models", "tiny", "--device", "cuda", "--resolution", "64", "--steps", "3",
                                    "--rows", "0"])
    _, _, profiles, _ = profile_edit.profile_edit(args)
    stages = {p.stage: p for p in profiles}
    assert set(STAGES) <= set(stages)
    denoise = stages["denoise"]
    assert denoise.graph_launches == 3  # one replay a step, captured in the warm-up edit
    assert denoise.device_ops > 0 and 0 < denoise.busy_share <= 1
    assert all(p.device_busy_us is not None for p in profiles)


def test_a_reader_gone_from_the_report_is_no_error(monkeypatch):
    """`zone profile ... | head -1`: the stage table's print met the closed pipe, a BrokenPipeError's traceback and
    exit 1 once the edit was profiled; `zone bench`'s report alike. The rest goes nowhere, and the tool's status."""
    reader, writer = os.pipe()
    os.close(reader)
    with open(writer, "w", buffering=1, encoding="utf-8") as gone:  # line by line, as a terminal's or a flush's
        monkeypatch.setattr(sys, "stdout", gone)

        def report() -> int:
            for row in range(3):
                print(f"| stage {row} |")
            return 0

        assert options.quitting_on_a_signal(report) == 0
        assert sys.stdout is gone  # the caller's own stream back after the run
