"""benchmarks/gpu_session.sh, dry: every stage's command is one its tool accepts.

A lease of the GPU machine is short and rare; a flag renamed in a benchmark since the script was
written would cost a whole stage of it. The script's DRY_RUN=1 prints the commands; each is parsed
here by its tool's own parser (pytest's: its paths, markers and -k names exist).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from zone_benchmarks import (
    bench_dual_unet,
    bench_kernels,
    bench_photo,
    bench_refine,
    graph_breaks,
    graph_memory,
    load_test,
    options,
)
from zone_engine.config import DENOISERS

ROOT = Path(__file__).parents[1]
STAGES = ("tests", "compile", "kernels", "refine", "refine-zero", "dual", "breaks", "profile", "graph-memory", "bench",
          "bench-contiguous", "bench-compile", "photo", "suite", "serve")
PARSERS = {"zone_benchmarks": options.parse_bench_args, **{f"zone_benchmarks.{tool}": parse for tool, parse in {
    "bench_refine": bench_refine.parse_args, "bench_dual_unet": bench_dual_unet.parse_args,
    "graph_breaks": graph_breaks.parse_args, "bench_kernels": bench_kernels.parse_args,
    "load_test": load_test.parse_args, "profile_edit": options.parse_profile_args,
    "graph_memory": graph_memory.parse_args, "bench_photo": bench_photo.parse_args}.items()}}


def dry_run(*stages: str, **env: str) -> subprocess.CompletedProcess:
    # python3 must be this interpreter: the serve stage checks its wheels with it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", "benchmarks/gpu_session.sh", *stages], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PATH": path, "DRY_RUN": "1", **env})


def commands(output: str) -> dict[str, list[str]]:
    """Stage log name -> the command's words, from the dry run's `DRY-RUN name: command` lines."""
    found = {}
    for line in output.splitlines():
        if line.startswith("DRY-RUN "):
            name, command = line.removeprefix("DRY-RUN ").split(":", 1)
            found[name] = shlex.split(command)
    return found


@pytest.fixture(scope="module")
def every_stage(tmp_path_factory) -> dict[str, list[str]]:
    run = dry_run(*STAGES, OUT=str(tmp_path_factory.mktemp("out")), BACKENDS="fused,compile")
    assert run.returncode == 0, run.stdout + run.stderr
    return commands(run.stdout)


def test_the_dry_run_prints_one_command_a_stage_and_runs_none(every_stage, tmp_path):
    assert len(every_stage) == len(STAGES)
    assert all(words[:2] == ["python3", "-m"] for words in every_stage.values())
    run = dry_run(OUT=str(tmp_path))  # the default stages
    # What the open issue waits for first (the kernels' timings), then the tests and the edit's; not compile's rows.
    assert list(commands(run.stdout)) == ["bench_kernels", "gpu_tests", "bench", "bench_dual_unet", "bench_refine",
                                          "profile", "graph_memory"]
    assert list(tmp_path.iterdir()) == []  # no log, no gpu.txt: nothing ran


def test_fetch_wheels_downloads_what_the_device_image_lacks():
    exclude = (ROOT / ".git" / "info" / "exclude")
    before = exclude.read_text() if exclude.exists() else None
    words = commands(dry_run("fetch-wheels", "serve").stdout)["fetch-wheels"]
    assert words[:4] == ["python3", "-m", "pip", "download"] and "--no-deps" in words and ".whl" in words
    assert {"diffusers==0.42.1", "segment-anything", "ftfy", "wcwidth", "fastapi", "uvicorn"} <= set(words)
    assert "fastapi" not in commands(dry_run("fetch-wheels").stdout)["fetch-wheels"]
    assert (exclude.read_text() if exclude.exists() else None) == before  # a dry run writes nothing


def test_a_stage_starts_only_while_the_budget_holds_its_limit_and_its_log_comes_back_packed(tmp_path):
    """Not dry: graph-memory (limit 150 s) runs, and on this CPU says it needs a GPU (shown as it runs, and
    kept in its log); the suite (400 s) no longer fits a budget of 200 s and is skipped; a summary of both ends the
    output. The logs come back in one archive ($OUT returns 8 files at most)."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    # No GPU seen, on a GPU machine too: graph-memory then stops at once, as on this CPU.
    run = dry_run("graph-memory", "suite", DRY_RUN="0", BUDGET="200", OUT=str(out), LOGS=str(logs),
                  CUDA_VISIBLE_DEVICES="")
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"error: CUDA graphs need a CUDA GPU.*\n== graph_memory: rc 2 after", run.stdout)
    assert re.search(r"== tests: skipped, 1\d\ds of the call's budget of 200s left and its limit is 400s", run.stdout)
    summary = run.stdout.split("== summary (")[1].splitlines()  # last: the reply carries the end of the output
    assert summary[1].startswith("graph_memory: rc 2 after") and summary[2].startswith("tests: skipped (1")
    assert [path.name for path in out.iterdir()] == ["logs.tar.gz"]  # packed through a temporary file
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
        assert {"gpu.txt", "graph_memory.log", "summary.txt"} <= names and "tests.log" not in names
        assert b"CUDA graphs need a CUDA GPU" in archive.extractfile("./graph_memory.log").read()
        assert b"torch" in archive.extractfile("./gpu.txt").read()


def test_the_benchmark_stages_pass_their_tools_parsers(every_stage):
    parsed = 0
    for name, words in every_stage.items():
        module, arguments = words[2], words[3:]
        if module == "pytest":
            continue
        assert module in PARSERS, f"stage {name} runs {module}, which this test does not know"
        PARSERS[module](arguments)  # argparse exits (SystemExit 2) on an unknown flag or a bad value
        parsed += 1
    assert parsed == 12
    bench = options.parse_bench_args(every_stage["bench"][3:])
    assert bench.backends == ("fused", "compile") and set(bench.backends) <= set(DENOISERS)
    compiled = options.parse_bench_args(every_stage["bench_compile"][3:])
    assert compiled.backends == ("fused", "compile") and compiled.batch == 1 and compiled.time_limit_s == 310
    assert not compiled.compare_group_norm and not compiled.sam_onnx  # rows the bench stage has, or cannot run
    assert str(compiled.out).endswith("/compile")  # its reports in $OUT: they come back from a call cut off after it


def test_a_benchs_limit_is_cut_to_the_budget_left_and_a_minute_short_of_it_skips(tmp_path):
    """BENCH_LIMIT 570 with 200 s of budget left skipped the stage outright; now it gets what is left."""
    words = commands(dry_run("bench", BENCH_LIMIT="570", BUDGET="200").stdout)["bench"]
    time_limit = int(words[words.index("--time-limit") + 1])
    assert 170 <= time_limit <= 175  # 200 s less the 5 s kept for the log, less 20 s: bench stops itself first
    assert "--time-limit" in commands(dry_run("bench").stdout)["bench"]
    skipped = dry_run("bench", DRY_RUN="0", BUDGET="50", OUT=str(tmp_path / "out"), LOGS=str(tmp_path / "logs")).stdout
    assert "== bench: skipped," in skipped and "its limit is 240s" in skipped
    assert not (tmp_path / "logs" / "gpu.txt").exists()  # no stage ran: the machine's versions are not read


def test_the_pytest_stages_name_paths_markers_and_tests_that_exist(every_stage, pytestconfig):
    markers = {entry.split(":")[0] for entry in pytestconfig.getini("markers")}
    test_source = "\n".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    pytest_stages = {name: words[3:] for name, words in every_stage.items() if words[2] == "pytest"}
    assert set(pytest_stages) == {"gpu_tests", "compile_test", "tests"}
    for name, arguments in pytest_stages.items():
        values = dict(zip(arguments, arguments[1:], strict=False))
        paths = [word for word, before in zip(arguments, ["", *arguments[:-1]], strict=True)
                 if not word.startswith("-") and before not in ("-m", "-k", "-n")]
        assert paths and all((ROOT / path).exists() for path in paths), name
        assert "-m" not in values or values["-m"] in markers, name
        names = set(re.findall(r"\w+", values.get("-k", ""))) - {"not", "and", "or"}
        assert all(re.search(rf"def test_\w*{word}", test_source) for word in names), name


def test_the_uninstalled_checkout_imports_the_folders_under_their_installed_names(tmp_path):
    """The device runs the checkout without installing it: the script links kernels/, export/ and benchmarks/ as
    zone_kernels, zone_export and zone_benchmarks. Python without site-packages (-S: no editable install to
    find them) imports each from its folder."""
    dry_run("kernels", SRC=str(tmp_path))
    script = ("import zone_kernels, zone_export, zone_benchmarks\n"
              "print('\\n'.join(module.__file__ for module in (zone_kernels, zone_export, zone_benchmarks)))")
    out = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    found = [Path(line).resolve() for line in out.stdout.split()]
    assert found == [ROOT / folder / "__init__.py" for folder in ("kernels", "export", "benchmarks")]
