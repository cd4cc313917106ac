"""The Triton kernels compile for Hopper (sm_90), Ada (sm_89) and Ampere (sm_80) GPUs at SD1.5's shapes, checked
on the CPU.

A kernel that compiles under the interpreter can still fail to compile for a GPU (an int argument equal to 1
becomes a compile-time constant there, a tile can outgrow the registers), or compile to slower code than
intended (kernel 3's scalar 16-bit accesses), or lose an order the interpreter cannot test (kernel 1's stores,
barrier and ticket across programs). tests/gpu_compile.py runs the
launchers as on a GPU, on meta tensors, and compiles every launch with Triton's own ptxas: no GPU needed, so
such a failure shows in CI, not in a lease's first edit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


# With Triton's cache (~/.triton/cache) empty, as on a fresh CI machine, it compiles every kernel: 46 s on 2 cores
# in one process against 11 s with the cache; one process per GPU, at once, so both cores compile. Its own limit,
# above the suite's 300 s, for a slower machine's cold cache.
@pytest.mark.timeout(900)
def test_every_kernel_launch_at_sd15_shapes_compiles_for_hopper_ada_and_ampere():
    script = Path(__file__).with_name("gpu_compile.py")
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}  # the launchers' GPU choices
    runs = {capability: subprocess.Popen([sys.executable, str(script), str(capability)], env=env,
                                         cwd=script.parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True) for capability in (90, 89, 80)}
    try:
        said = {capability: (run.communicate(timeout=840), run.returncode) for capability, run in runs.items()}
    finally:
        for run in runs.values():
            run.kill()  # nothing once it has ended; else a hung one does not outlive the test
            run.wait()
    for capability, ((out, err), code) in said.items():
        if code == 77:
            pytest.skip(out.strip())
        assert code == 0, out[-2000:] + err[-4000:]
        assert f"kernels compiled for sm_{capability}" in out
