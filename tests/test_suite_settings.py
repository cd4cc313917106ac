"""The test suite's own settings: its markers, and the environment a contributor's shell may leave set."""

from __future__ import annotations

import os
import subprocess
import sys
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
