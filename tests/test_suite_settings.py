"""The test suite's own settings: its markers, and the environment a contributor's shell may leave set."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def _pytest(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
            unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """pytest on `args` alone: a PYTEST_ADDOPTS naming this file would have it run itself, and so on. `unset`: other
    variables of this process left out."""
    inherited = {name: value for name, value in os.environ.items() if name not in ("PYTEST_ADDOPTS", *unset)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          env={**inherited, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=240)


def test_a_misspelt_marker_is_an_error_not_a_test_no_session_selects(tmp_path):
    """`@pytest.mark.gpus` was a warning: the test ran (skipped) on the CPU, and `-m gpu` left it out."""
    (tmp_path / "test_typo.py").write_text("import pytest\n\n\n@pytest.mark.gpus\ndef test_it():\n    pass\n")
    run = _pytest("-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path), cwd=tmp_path)
    assert run.returncode != 0 and "'gpus' not found in `markers`" in run.stdout, run.stdout[-2000:]


def test_every_registered_marker_is_used():
    """A marker in pyproject.toml that no test carries only misleads `pytest --markers` (`slow` promised
    checkpoint tests that never existed)."""
    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    markers = settings["tool"]["pytest"]["ini_options"]["markers"]
    tests = "".join(path.read_text(encoding="utf-8") for path in Path(__file__).parent.glob("test_*.py"))
    assert [line for line in markers if f"pytest.mark.{line.split(':')[0]}" not in tests] == []


def test_the_test_extra_installs_every_extra_the_cpu_tests_use():
    """The tests of an extra skip where it is missing: a package dropped from [test] would have CI skip its ~190
    serving (or ONNX, load-test, Ray) tests and stay green. [gpu] is not installable on the CPU machines."""
    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    wanted = {requirement for name in ("onnx", "bench", "serve", "ray") for requirement in extras[name]
              if not requirement.startswith("zone-engine[")}
    assert wanted - set(extras["test"]) == set()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the suite's own setting on a machine without CUDA")
def test_the_kernel_tests_run_the_kernels_whatever_the_shell_left_set():
    """TRITON_INTERPRET=0 or ZONE_DISABLE_TRITON=1 left in a contributor's shell: the conftest sets the one to 1 and
    drops the other, so the kernel tests still launch the kernels (85 and 12 of them failed, the first with Triton's
    "0 active drivers")."""
    node = "tests/test_kernel_mask_binarize.py::test_environment_variable_switches_the_kernels_off"
    run = _pytest(node, env={"TRITON_INTERPRET": "0", "ZONE_DISABLE_TRITON": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_the_suite_leaves_no_onnxruntime_telemetry_in_the_home_folder(tmp_path):
    """Importing onnxruntime (test_sam_onnx.py, test_export_unet.py; diffusers as a model loads) wrote a device id and
    a telemetry database under ~/.cache/Microsoft: the suite left them in the contributor's home."""
    run = _pytest("--collect-only", "tests/test_sam_onnx.py", env={"HOME": str(tmp_path)},
                  unset=("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME"))  # as in a shell that sets neither
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert not (tmp_path / ".cache" / "Microsoft").exists(), sorted(map(str, tmp_path.rglob("*")))


# A step with a child of its own, which on TERM waits for that child (its TERM came with the step's, as its process
# group's) and takes a moment before it says it stopped: the script must signal the group and wait for the step.
_STEP = """import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def stop(*_):
    child.wait()
    time.sleep(0.5)
    open(sys.argv[2], "w").write("stopped")
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
time.sleep(120)
"""


@contextlib.contextmanager
def _ci_running_step(tmp_path: Path, script: str) -> Iterator[tuple[subprocess.Popen, list[int], Path]]:
    """`script` (given a file to write its pids in, then one to write as it stops) run as a .ci/steps.sh step under
    bash: yields the script's process once the step has written its pids, those pids and the file it writes as it
    stops; every process of it killed after."""
    pid_file, stopped = tmp_path / "step.pid", tmp_path / "stopped"
    (tmp_path / "step.py").write_text(script)
    step = shlex.join([sys.executable, str(tmp_path / "step.py"), str(pid_file), str(stopped)])
    ci = subprocess.Popen(["bash", "-c", f"set -euo pipefail\nsource .ci/steps.sh\nstep {step}\n"], cwd=ROOT)
    try:
        while not pid_file.exists() or not pid_file.read_text():
            assert ci.poll() is None, "the script ended before its step started"
            time.sleep(0.05)
        yield ci, [int(pid) for pid in pid_file.read_text().split()], stopped
    finally:
        ci.kill()
        ci.wait()
        for pid in pid_file.read_text().split() if pid_file.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.mark.skipif(shutil.which("bash") is None, reason=".ci/run is a bash script")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_ci_stopped_by_a_signal_stops_its_running_step(tmp_path, stop):
    """A CI timeout's TERM to .ci/run left its `zone bench` step running ~30 s after the script had gone: a step
    (.ci/steps.sh) is stopped, with its own children, and waited for before the script exits; INT (Ctrl-C) too.
    From a mutation audit: the step's own child and the wait for the step went untested."""
    with _ci_running_step(tmp_path, _STEP) as (ci, pids, stopped):
        ci.send_signal(stop)
        code = ci.wait(60)
        assert stopped.exists()  # the step had ended when the script did
        for pid in pids:  # the step and its child stopped and reaped, not left to run on
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert code == 128 + stop  # as bash killed by the signal exits (the EXIT trap, if any, has run)


# A step that exits at once on TERM, its child taking a second to stop; the child writes the pids once its own
# TERM handler is set (a TERM before it would end it at once, and the test prove nothing).
_STEP_LEAVING_ITS_CHILD = """import subprocess, sys
child = '''import os, signal, sys, time


def stop(*_):
    time.sleep(1)
    open(sys.argv[2], "w").write("stopped")
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
open(sys.argv[1], "w").write(f"{os.getppid()} {os.getpid()}")
time.sleep(120)
'''
subprocess.Popen([sys.executable, "-c", child, *sys.argv[1:]]).wait()
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason=".ci/run is a bash script")
def test_ci_stopped_by_a_signal_waits_for_a_child_its_step_left_stopping(tmp_path):
    """A step gone at TERM while its child was still stopping: the script had exited before the child ended (the
    wait was for the step's own process only); now the whole process group is waited for."""
    with _ci_running_step(tmp_path, _STEP_LEAVING_ITS_CHILD) as (ci, _, stopped):
        ci.send_signal(signal.SIGTERM)
        assert ci.wait(60) == 143
        assert stopped.exists()  # the step's child had ended when the script did


@pytest.mark.skipif(shutil.which("bash") is None, reason=".ci/run is a bash script")
def test_a_step_that_fails_fails_the_ci_script_with_its_status():
    """From a mutation audit: `step` returning 0 whatever its command's status left every failing step (the lint,
    the tests) a green CI, and no test said so."""
    run = subprocess.run(["bash", "-c", "set -euo pipefail\nsource .ci/steps.sh\nstep sh -c 'exit 3'\necho after\n"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3 and "after" not in run.stdout


def test_every_command_of_the_ci_script_runs_as_a_step():
    """From a mutation audit: no test read .ci/run; a command of it outside `step` (its pytest, say) runs in the
    script's own process group, and a CI timeout's TERM leaves it running after the script has gone."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assignment = re.compile(r'\w+=("[^"]*"|\S*)')  # a line that only sets a variable (not `NAME=1 command`)
    commands = [line for line in lines[lines.index("source .ci/steps.sh") + 1:]
                if line and not line.startswith(("#", "source ", "trap ")) and not assignment.fullmatch(line)]
    assert len(commands) >= 5 and all(line.startswith("step ") for line in commands), commands


def test_a_file_a_test_leaves_open_fails_it(tmp_path):
    """`Image.open(path).size` left the file open (seven tests did): its ResourceWarning, said when the file is
    collected as a PytestUnraisableExceptionWarning, passed unseen."""
    (tmp_path / "test_leak.py").write_text("def test_it(tmp_path):\n    (tmp_path / 'x').write_text('x')\n"
                                           "    open(tmp_path / 'x').read()  # noqa: SIM115\n")
    run = _pytest("-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path), cwd=tmp_path)
    assert run.returncode == 1 and "ResourceWarning: unclosed file" in run.stdout, run.stdout[-2000:]


def test_a_gpu_class_rerun_compiled_runs_that_class_whatever_pytest_addopts_says(tmp_path, monkeypatch):
    """The shell's PYTEST_ADDOPTS reached the rerun: a `-k` meant for the session deselected the class there, and
    the GPU class failed with the rerun's "no tests ran" (exit 5)."""
    from conftest import rerun_compiled

    probe = tmp_path / "tests" / "test_probe.py"
    probe.parent.mkdir()
    probe.write_text("class TestProbe:\n    def test_it(self):\n        pass\n")
    monkeypatch.setenv("PYTEST_ADDOPTS", "-k some_other_test")
    run = rerun_compiled(str(probe), "TestProbe")
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
