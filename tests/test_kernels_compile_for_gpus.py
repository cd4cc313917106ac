"""The Triton kernels compile for Hopper (sm_90), Ada (sm_89), Ampere (sm_80) and Turing (sm_75) GPUs at SD1.5's
shapes, checked on the CPU.

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
def test_every_kernel_launch_at_sd15_shapes_compiles_for_hopper_ada_ampere_and_turing():
    script = Path(__file__).with_name("gpu_compile.py")
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}  # the launchers' GPU choices
    runs = {capability: subprocess.Popen([sys.executable, str(script), str(capability)], env=env,
                                         cwd=script.parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True) for capability in (90, 89, 80, 75)}
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


@pytest.fixture
def gpu_compile():
    """The script's checks, for tests on PTX and SASS written by hand: they need no ptxas, but the module stops at
    import without one (exit 77)."""
    try:
        import gpu_compile
    except SystemExit:
        pytest.skip("gpu_compile needs Triton's ptxas")
    return gpu_compile


def test_kernel_1s_order_check_passes_its_order_and_refuses_a_loop_among_the_last_programs_reads(gpu_compile):
    """gpu_compile's check on kernel 1's PTX, on PTX written here: the real kernel never makes it fire, so a check
    that could no longer see a loop (its first form, the reads waiting one by one) would pass unnoticed."""
    before = ["$L__BB0_1:", "st.global.v4.b32 [%rd1], {%r1, %r2, %r3, %r4};", "bar.sync 0;",
              "atom.global.gpu.acq_rel.add.u32 %r5, [%rd2], 1;", "bar.sync 0;", "$L__BB0_2:",
              "ld.global.cg.v4.b32 {%r6, %r7, %r8, %r9}, [%rd3];"]
    after = ["$L__BB0_3:", "ret;"]
    check = gpu_compile.check_ticket_order
    for branch in ("@%p1 bra $L__BB0_3;", "@%p1 bra $L__BB0_1;"):  # forward; back to before the ticket: no loop there
        assert check("_attn_accumulate_kernel", {"GROUPS": 2}, "\n".join([*before, branch, *after])) is None
    looping = "\n".join([*before, "@%p1 bra \t$L__BB0_2;", *after])
    with pytest.raises(SystemExit, match=r"sum loops \(@%p1 bra"):
        check("_attn_accumulate_kernel", {"GROUPS": 2}, looping)
    assert check("_attn_accumulate_kernel", {"GROUPS": 1}, looping) is None  # one group: no sum across programs
    scalar = "\n".join([before[0], "st.global.b32 [%rd1], %r1;", *before[2:], *after])  # 77 keys a row
    with pytest.raises(SystemExit, match=r"move in scalars \(st.global.b32 .*PARTIAL_K=77"):
        check("_attn_accumulate_kernel", {"GROUPS": 2, "PARTIAL_K": 77}, scalar)


def test_the_round_trip_model_tells_reads_in_flight_together_from_reads_waiting_for_one_another(gpu_compile):
    """gpu_compile's model of kernel 1's last program, on SASS written here: 4 reads then their adds are one round
    trip; each read into the register the add before it just read (the 4-warp kernel's tail) is one round trip each."""
    reads = [f"/*00{i}0*/ @!P3 LDG.E.128.STRONG.GPU R{4 * i + 20}, desc[UR10][R52.64+0x{i}00] ;" for i in range(4)]
    adds = [f"/*01{i}0*/ FADD R7, R7, R{4 * i + 20} ;" for i in range(4)]
    assert 1 < gpu_compile.round_trips(reads + adds) < 1.1
    chained = [line for i in range(4) for line in (
        "/*0200*/ CS2R R24, SRZ ;", f"/*0210*/ @!P3 LDG.E.128.STRONG.GPU R24, desc[UR10][R52.64+0x{i}00] ;",
        "/*0220*/ FADD R55, R55, R24 ;", "/*0230*/ FADD R28, R28, R25 ;")]
    assert 4 < gpu_compile.round_trips(chained) < 4.1
    assert gpu_compile.round_trips(["/*0300*/ STG.E.128 desc[UR10][R24.64], R12 ;", "/*0310*/ EXIT ;"]) < 0.01


def test_the_chunks_in_flight_are_the_groups_committed_before_the_first_wait_over_those_it_waits_for(gpu_compile):
    """gpu_compile's count on PTX written here: a chunk of Q and one of K^T are two groups; a first wait letting 4
    stay pending after 6 were committed means 3 chunks in flight, one letting 2 stay pending 1.5 (not whole chunks:
    the check fails), and a PTX without asynchronous copies none."""
    copies = "cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;\ncp.async.commit_group;"
    three = "\n".join([copies] * 6 + ["cp.async.wait_group 4;", "bar.sync 0;", copies, "cp.async.wait_group 4;"])
    assert gpu_compile.chunks_in_flight(three) == 3
    assert gpu_compile.chunks_in_flight(three.replace("wait_group 4", "wait_group 2", 1)) == 1.5
    assert gpu_compile.chunks_in_flight("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];") == 0
    launched = {"D": 160, "BLOCK_D": 64, "CHUNKS_IN_FLIGHT": 2}
    with pytest.raises(SystemExit, match="3 chunks of d in flight before the first wait, not the 2 it was launched"):
        gpu_compile.check_chunks_in_flight("_attn_accumulate_kernel", 90, launched, three)
    gpu_compile.check_chunks_in_flight("_attn_accumulate_kernel", 75, launched, three)  # a T4: no such copies
    gpu_compile.check_chunks_in_flight("_attn_accumulate_kernel", 90, {**launched, "D": 40}, "")  # one pass
