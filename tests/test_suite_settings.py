"""The test suite's own settings: its markers, and the environment a contributor's shell may leave set."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def _pytest(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """pytest on `args` alone: a PYTEST_ADDOPTS naming this file would have it run itself, and so on."""
    inherited = {name: value for name, value in os.environ.items() if name != "PYTEST_ADDOPTS"}
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


@pytest.mark.skipif(shutil.which("bash") is None, reason=".ci/run is a bash script")
def test_ci_stopped_by_a_signal_stops_its_running_step(tmp_path):
    """A CI timeout's TERM to .ci/run left its `zone bench` step running ~30 s after the script had gone: a step
    (.ci/steps.sh) is stopped, with its own children, and waited for before the script exits."""
    pid_file = tmp_path / "step.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    script = f"set -euo pipefail\nsource .ci/steps.sh\nstep {shlex.quote(sys.executable)} -c {shlex.quote(sleeper)}\n"
    ci = subprocess.Popen(["bash", "-c", script], cwd=ROOT)
    try:
        while not pid_file.exists() or not pid_file.read_text():
            assert ci.poll() is None, "the script ended before its step started"
            time.sleep(0.05)
        step_pid = int(pid_file.read_text())
        ci.send_signal(signal.SIGTERM)
        code = ci.wait(60)
        with pytest.raises(ProcessLookupError):  # stopped and reaped by the script, not left to run on
            os.kill(step_pid, 0)
        assert code == 128 + signal.SIGTERM  # as bash killed by TERM exits (the EXIT trap, if any, has run)
    finally:
        ci.kill()
        ci.wait()
        if pid_file.exists() and pid_file.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


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
