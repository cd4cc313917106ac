"""Kernel 1 (fused attention-map accumulation) against its torch reference, under TRITON_INTERPRET=1.

Tolerance (flash-attention's rule): with `exact` the float64 softmax sum of the same input values and
`torch_same` torch computing at the input precision (fp16: matmul and softmax in fp16; fp32: the
fp32 reference), require  max|kernel - exact| <= 2 * max|torch_same - exact| + atol.
The kernel's products of fp16/bf16 values are exact in its fp32 tl.dot accumulator and its softmax
and row sum run in fp32, so it is far inside that bound (measured: 2e-7 against torch fp16's 5e-4 at
SD1.5 shapes). atol = 1e-6 per summed row covers fp32 rounding (~6e-8 relative per addition of values
<= 1) and the GPU's approximate exp2 (ex2.approx, 2 ulp) where torch happens to be exact.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton or the kernels are imported


import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import compiled_graph, dispatched_ops, spy_calls  # noqa: E402
from gpu_datasheets import A100, H100, L4  # noqa: E402

import zone_kernels.attn_accumulate as attn_module  # noqa: E402
from zone_engine.localize import AttentionAccumulator  # noqa: E402
from zone_kernels.attn_accumulate import (  # noqa: E402
    attention_sum_fp64,
    attn_accumulate_,
    attn_accumulate_reference,
    attn_accumulate_triton,
)
from zone_kernels.runtime import DISABLE_ENV, is_interpreted, triton_disabled  # noqa: E402

INTERPRETED = is_interpreted(attn_module._attn_accumulate_kernel)
# The dispatcher's tests check that it launched the kernel: where it cannot (ZONE_DISABLE_TRITON=1, or Triton
# compiled and these tensors on the CPU) they would compare the reference with itself.
DISPATCHES_TO_KERNEL = pytest.mark.skipif(not attn_module.runs_on(torch.device("cpu")),
                                          reason="kernel 1 cannot launch on the CPU here (ZONE_DISABLE_TRITON=1 or "
                                          "TRITON_INTERPRET=0): attn_accumulate_ runs the reference")


def _inputs(rows, heads, queries, dim, keys, dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, heads, queries, dim, generator=generator)
    key = torch.randn(rows, heads, keys, dim, generator=generator)
    return query.to(device, dtype), key.to(device, dtype)


def _torch_same_precision(query, key, scale):
    """softmax(q k^T * scale) computed at the inputs' precision, summed in fp32 (the error yardstick)."""
    if query.dtype == torch.float32:
        return attention_probability_sum_fp32(query, key, scale)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    return scores.softmax(dim=-1).float().sum(dim=(0, 1))


def attention_probability_sum_fp32(query, key, scale):
    total = torch.zeros(query.shape[2], key.shape[2], device=query.device)
    attn_accumulate_reference(total, query, key, scale)
    return total


def _assert_within_rule(query, key, scale, got):
    exact = attention_sum_fp64(query, key, scale)
    torch_error = (_torch_same_precision(query, key, scale).double() - exact).abs().max().item()
    kernel_error = (got.double() - exact).abs().max().item()
    atol = 1e-6 * query.shape[0] * query.shape[1]
    assert kernel_error <= 2 * torch_error + atol, (kernel_error, torch_error)


# (rows, heads, N, d, K): N off the block size (1, 6, 37, 100) and on it (256), heads 1/5/8/20,
# d 8/40/80/160, CLIP's 77 keys plus a few and a full 128-key tile.
SHAPES = [
    (2, 8, 256, 160, 77),  # SD1.5 at 512x512
    (2, 1, 1, 8, 77),
    (2, 5, 37, 40, 77),
    (1, 20, 100, 80, 77),
    (2, 8, 6, 160, 77),
    (3, 2, 37, 80, 5),
    (1, 2, 17, 16, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape, dtype):
    rows, heads, queries, dim, keys = shape
    query, key = _inputs(rows, heads, queries, dim, keys, dtype)
    scale = dim**-0.5
    total = torch.zeros(queries, keys)
    attn_accumulate_triton(total, query, key, scale)
    _assert_within_rule(query, key, scale, total)
    if dtype == torch.float32:
        expected = torch.zeros(queries, keys)
        attn_accumulate_reference(expected, query, key, scale)
        assert torch.allclose(total, expected, rtol=0, atol=1e-6 * rows * heads)


def test_scores_far_beyond_exps_range_stay_finite():
    """Scores in the thousands: the kernel's softmax subtracts each row's largest score before exp2, as
    torch's does (SD's scores are small, so the other tests never needed it)."""
    query, key = _inputs(2, 5, 37, 40, 77, torch.float32, seed=3)
    query, key = query * 30, key * 30
    total = torch.zeros(37, 77)
    attn_accumulate_triton(total, query, key, 1.0)
    assert torch.isfinite(total).all()
    _assert_within_rule(query, key, 1.0, total)


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 10])
def test_any_split_of_the_rows_gives_the_sum_and_repeats_bit_for_bit(groups):
    # 10 rows: groups of 10, 5+5, 4+4+2, 3+3+3+1 and 1 each (the GPU's choice); the workspace and its
    # tickets are reused by the second launch, which must give the same bits (the order of the adds is fixed).
    query, key = _inputs(2, 5, 37, 40, 77, torch.float32, seed=6)
    first, second = torch.zeros(37, 77), torch.zeros(37, 77)
    attn_accumulate_triton(first, query, key, 0.2, row_groups=groups)
    attn_accumulate_triton(second, query, key, 0.2, row_groups=groups)
    assert torch.equal(first, second)
    expected = torch.zeros(37, 77)
    attn_accumulate_reference(expected, query, key, 0.2)
    assert torch.allclose(first, expected, rtol=0, atol=1e-5)
    attn_accumulate_triton(first, query, key, 0.2, row_groups=groups)  # in place: now twice the sum
    assert torch.allclose(first, 2 * expected, rtol=0, atol=2e-5)


def test_each_block_and_group_keeps_its_own_partial_sums_added_in_group_order():
    """The workspace holds a (block, group)'s partial sums apart from every other's, its keys rounded up to 16, and the
    last program adds them in group order. The interpreter runs a block's programs one after another, so blocks
    sharing a region (or a sum in another order) still gave the right total here; on a GPU they run at once."""
    query, key = _inputs(3, 1, 130, 16, 77, torch.float32, seed=8)  # 3 groups of a row; 130 queries: 3 blocks
    total = torch.zeros(130, 77)
    attn_accumulate_triton(total, query, key, 0.25, row_groups=3)
    block_n = attn_module._tiles(77, 16, INTERPRETED)[0]
    blocks = -(-130 // block_n)
    partials, tickets = attn_module._workspace(total.device, blocks, 3, block_n * 80)
    assert partials.numel() == blocks * 3 * block_n * 80
    assert torch.equal(tickets, torch.zeros(blocks, dtype=torch.int32))  # reset for the next launch
    groups = partials.view(blocks, 3, block_n, 80)[..., :77].transpose(0, 1).reshape(3, blocks * block_n, 77)[:, :130]
    assert torch.equal(total, groups[0] + groups[1] + groups[2])


@DISPATCHES_TO_KERNEL
@pytest.mark.parametrize("queries, heads, dim, keys", [(256, 8, 160, 77), (70, 5, 40, 9), (1, 1, 16, 1)])
def test_the_benchmarks_floor_kernel_reads_every_element_of_query_and_key_once(queries, heads, dim, keys):
    """Its sums add up to query's plus key's: an element missed or read twice (a block past the first reading the
    keys again) changes the total. Integer values 1 to 4 keep every sum exact in fp32."""
    generator = torch.Generator().manual_seed(3)
    query = torch.randint(1, 5, (2, heads, queries, dim), generator=generator).float()
    key = torch.randint(1, 5, (2, heads, keys, dim), generator=generator).float()
    assert attn_module.read_once(query, key).sum().item() == query.sum().item() + key.sum().item()


def test_accumulates_in_place_across_calls(monkeypatch):
    query, key = _inputs(2, 5, 37, 40, 77, torch.float32, seed=1)
    query2, key2 = _inputs(2, 5, 37, 40, 77, torch.float32, seed=2)
    total = torch.zeros(37, 77)
    storage = total.data_ptr()
    calls = spy_calls(monkeypatch, attn_module, "_launch", "attn_accumulate_reference")
    attn_accumulate_(total, query, key, 0.2)
    attn_accumulate_(total, query2, key2, 0.2)
    assert calls == ["_launch", "_launch"]  # the kernel, not the reference compared with itself
    assert total.data_ptr() == storage
    expected = torch.zeros(37, 77)
    attn_accumulate_reference(expected, query, key, 0.2)
    attn_accumulate_reference(expected, query2, key2, 0.2)
    assert torch.allclose(total, expected, rtol=0, atol=2e-5)


@DISPATCHES_TO_KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_inputs_as_the_recording_processor_passes_them(dtype, monkeypatch):
    # (B, N, heads*d) projections viewed as (B, heads, N, d) and sliced to the kept rows 1:3.
    batch, queries, keys, heads, dim = 3, 37, 77, 5, 40
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(batch, queries, heads * dim, generator=generator).to(dtype)
    k = torch.randn(batch, keys, heads * dim, generator=generator).to(dtype)
    query = q.view(batch, queries, heads, dim).transpose(1, 2)[1:3]
    key = k.view(batch, keys, heads, dim).transpose(1, 2)[1:3]
    assert not query.is_contiguous() and not key.is_contiguous()
    total = torch.zeros(queries, keys)
    calls = spy_calls(monkeypatch, attn_module, "_launch", "attn_accumulate_reference")
    attn_accumulate_(total, query, key, dim**-0.5)
    assert calls == ["_launch"]
    _assert_within_rule(query.contiguous(), key.contiguous(), dim**-0.5, total)


@DISPATCHES_TO_KERNEL
def test_accumulator_with_the_kernel_matches_the_default(monkeypatch):
    fused, plain = AttentionAccumulator(attn_accumulate_), AttentionAccumulator()
    launches = spy_calls(monkeypatch, attn_module, "_launch")
    for seed in (4, 5):
        query, key = _inputs(2, 8, 16, 40, 77, torch.float32, seed=seed)
        fused.add(query, key, 0.3)
        plain.add(query, key, 0.3)
    assert launches == ["_launch", "_launch"]  # the fused accumulator ran the kernel; the plain one did not
    assert fused.rows == plain.rows == 32
    assert torch.allclose(fused.average(), plain.average(), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t, q, k: (t, q[0], k), "must be \\(R, heads, N, d\\)"),
        (lambda t, q, k: (t, q, k[0]), "must be \\(R, heads, N, d\\)"),  # key's rank too, not an IndexError
        (lambda t, q, k: (t, q, k[:1]), "does not match query"),  # fewer key rows: the kernel would read past k
        (lambda t, q, k: (t, q, k[:, :1]), "does not match query"),
        (lambda t, q, k: (t, q, k[..., :8]), "does not match query"),
        (lambda t, q, k: (torch.zeros(37, 129), q, torch.zeros(2, 5, 129, 40)), "1 to 128 keys"),
        (lambda t, q, k: (t, q.half(), k), "share one dtype"),
        (lambda t, q, k: (t, q.long(), k.long()), "share one dtype"),
        (lambda t, q, k: (t.half(), q, k), "contiguous float32"),
        (lambda t, q, k: (t[:, :77].t().contiguous().t(), q, k), "contiguous float32"),
        (lambda t, q, k: (torch.zeros(36, 77), q, k), "contiguous float32"),
        (lambda t, q, k: (t, q.transpose(2, 3).contiguous().transpose(2, 3), k), "contiguous last"),
        (lambda t, q, k: (t, q, k.transpose(2, 3).contiguous().transpose(2, 3)), "contiguous last"),
        (lambda t, q, k: (t.to("meta"), q, k), "one device"),
        (lambda t, q, k: (t, q, k.to("meta")), "one device"),
    ],
)
def test_clear_errors(change, message):
    query, key = _inputs(2, 5, 37, 40, 77, torch.float32)
    total = torch.zeros(37, 77)
    args = change(total, query, key)
    for function in (attn_accumulate_, attn_accumulate_triton):
        with pytest.raises(ValueError, match=message):
            function(*args, 0.1)


def test_no_rows_or_no_queries_add_nothing():
    """Empty inputs (no kept rows, or an empty map) leave the accumulator as it was, with no launch: a grid
    of zero rows has no split into row groups (the launcher's early return protects it)."""
    query, key = _inputs(2, 5, 6, 40, 77, torch.float32)
    total = torch.full((6, 77), 0.5)
    attn_accumulate_triton(total, query[:0], key[:0], 0.1)
    assert torch.equal(total, torch.full((6, 77), 0.5))
    empty = torch.zeros(0, 77)
    attn_accumulate_triton(empty, query[:, :, :0], key, 0.1)
    assert empty.shape == (0, 77)


def test_environment_variable_switches_the_kernel_off(monkeypatch):
    query, key = _inputs(2, 5, 6, 40, 77, torch.float32)
    calls = spy_calls(monkeypatch, attn_module, "_launch", "attn_accumulate_reference")
    attn_accumulate_(torch.zeros(6, 77), query, key, 0.1)
    assert calls == ["_launch"]
    calls.clear()
    monkeypatch.setenv(DISABLE_ENV, "1")
    total = torch.zeros(6, 77)
    attn_accumulate_(total, query, key, 0.1)
    assert calls == ["attn_accumulate_reference"]
    _assert_within_rule(query, key, 0.1, total)


def test_the_switch_takes_the_usual_spellings_of_yes(monkeypatch):
    """ZONE_DISABLE_TRITON: 1, true, yes, on in any case and with spaces turn the kernels off; others do not."""
    warnings.simplefilter("error")  # the spellings of yes and no warn of nothing (pytest restores the filters)
    for value, off in (("1", True), ("TRUE", True), (" yes ", True), ("On", True), ("0", False), ("", False),
                       ("no", False), ("False", False), (" off", False)):
        monkeypatch.setenv(DISABLE_ENV, value)
        assert triton_disabled() is off, value
    monkeypatch.setenv(DISABLE_ENV, "maybe")  # a typo leaves the kernels on, and says so, once
    with pytest.warns(UserWarning, match="ZONE_DISABLE_TRITON='maybe' is neither yes .* the Triton kernels stay on"):
        assert triton_disabled() is False
    assert triton_disabled() is False  # asked again (each kernel's caller asks): "error" above, were it said again


def test_asking_for_triton_where_it_cannot_run_says_so(monkeypatch):
    import warnings

    from zone_engine.backends import make_localization_kernels

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # where the kernels can run (the interpreter on the CPU): no warning
        if INTERPRETED:
            make_localization_kernels("triton", torch.device("cpu"))
    monkeypatch.setenv(DISABLE_ENV, "1")
    with pytest.warns(UserWarning, match="--kernels triton .*cannot run on cpu here.*the torch reference runs"):
        make_localization_kernels("triton", torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto (the default) on CUDA with the kernels switched off: said nothing of
        make_localization_kernels("auto", torch.device("cuda"))  # a --kernels triton the user never passed


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's bf16 fallback")
def test_bf16_falls_back_to_torch_under_the_interpreter(monkeypatch):
    query, key = _inputs(2, 5, 6, 40, 77, torch.bfloat16)
    calls = spy_calls(monkeypatch, attn_module, "_launch", "attn_accumulate_reference")
    total = torch.zeros(6, 77)
    attn_accumulate_(total, query, key, 0.1)
    assert calls == ["attn_accumulate_reference"]


def test_custom_op_opcheck_and_fake_tensors():
    query, key = _inputs(2, 3, 37, 40, 77, torch.float32)
    torch.library.opcheck(torch.ops.zone.attn_accumulate_.default, (torch.zeros(37, 77), query, key, 0.1))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        total, query, key = torch.empty(37, 77), torch.empty(2, 3, 37, 40), torch.empty(2, 3, 77, 40)
        attn_accumulate_(total, query, key, 0.1)  # runs the fake implementation: no kernel, no error
        with pytest.raises(ValueError, match="contiguous float32"):
            torch.ops.zone.attn_accumulate_(torch.empty(36, 77), query, key, 0.1)


def test_only_traced_calls_go_through_the_custom_op():
    """Eager calls launch directly (no dispatcher host time); torch.compile sees the opaque op."""
    query, key = _inputs(2, 3, 6, 16, 77, torch.float32)
    total = torch.zeros(6, 77)
    assert not any(op.startswith("zone.") for op in dispatched_ops(lambda: attn_accumulate_(total, query, key, 0.25)))
    assert dispatched_ops(lambda: torch.ops.zone.attn_accumulate_(total, query, key, 0.25)) == [
        "zone.attn_accumulate_.default"]
    graph = compiled_graph(lambda total, q, k: attn_accumulate_(total, q, k, 0.25), torch.zeros(6, 77), query, key)
    assert "zone.attn_accumulate_" in graph


def test_traceable_by_torch_compile():
    query, key = _inputs(2, 3, 6, 16, 77, torch.float32)

    def step(total, query, key):
        attn_accumulate_(total, query, key, 0.25)
        return total * 2

    total, expected = torch.zeros(6, 77), torch.zeros(6, 77)
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(total, query, key)
    attn_accumulate_reference(expected, query, key, 0.25)
    assert torch.allclose(total, expected, atol=1e-6) and torch.allclose(out, 2 * expected, atol=2e-6)


def test_capture_on_a_tiny_unet_gives_the_same_mask_b():
    """Recording through the kernel (strided views of real projections) and binarizing with kernel 2
    give the torch path's attention map and the identical M_b."""
    from zone_engine.localize import localize, record_cross_attention
    from zone_engine.models import build_tiny_unet
    from zone_kernels.mask_binarize import binarize_mask

    torch.manual_seed(0)
    unet = build_tiny_unet().eval()
    latent_size, grid, size = (8, 12), (2, 3), (64, 96)
    generator = torch.Generator().manual_seed(0)
    steps = [(torch.randn(3, 8, *latent_size, generator=generator), torch.randn(3, 77, 32, generator=generator))
             for _ in range(2)]
    averages = []
    for accumulate in (None, attn_accumulate_):
        recorder = record_cross_attention(unet, latent_size, grid, AttentionAccumulator(accumulate))
        with torch.inference_mode(), recorder as accumulator:
            for sample, context in steps:
                unet(sample, 900, encoder_hidden_states=context)
        averages.append(accumulator.average())
    plain, fused = averages
    assert torch.allclose(fused, plain, rtol=0, atol=1e-6)
    for rule in ("reference", "paper"):
        expected = localize(plain, grid, 7, size, rule=rule, min_area=0)
        got = localize(fused, grid, 7, size, rule=rule, min_area=0, binarize=binarize_mask)
        assert np.array_equal(got.mask_b, expected.mask_b)
        assert np.array_equal(got.difference, expected.difference)


# --------------------------------------------------------------------------------- compiled, on a GPU


SD15_CHUNK = (16 + 128) * 64 * 2  # a 64-wide chunk of d: 16 queries and the 128-key tile, fp16


@pytest.mark.parametrize(("gpu", "programs", "chunk", "expected"), [
    (H100, 256, SD15_CHUNK, 3),  # SD1.5 at 512²: 16 blocks x 16 rows, 2 programs an SM even with all 3 chunks
    (A100, 256, SD15_CHUNK, 2),  # 3 programs an SM: 3 x 55 KB over its 164 KB
    (L4, 256, SD15_CHUNK, 1),  # 5 programs an SM of 100 KB
    (H100, 576, SD15_CHUNK, 2),  # 768²: 36 blocks, 5 programs an SM
    (H100, 256, 2 * SD15_CHUNK, 3),  # fp32 inputs: 109 KB a program, 2 still fit
    (H100, 132, 120_000, 1),  # two chunks would pass the most a block may take
    (None, 10_000, SD15_CHUNK, 3),  # no GPU to size it by (the interpreter ignores it)
])
def test_a_program_loads_every_chunk_of_d_at_once_while_the_launch_fits_on_the_gpu_at_once(gpu, programs, chunk,
                                                                                        expected):
    assert attn_module._chunks_in_flight(gpu, 3, chunk, programs) == expected


def test_every_launch_the_gpu_benchmark_sweeps_gives_the_sum():
    """bench_kernels times these on a GPU only (row splits, depths, warps): each launched here, at d = 160's 3
    chunks, so that a choice the launcher refuses fails in the suite instead of costing a lease's kernel numbers.
    The interpreter ignores depth and warps; the compiled ones are checked by TestCompiledOnGPU."""
    sweeps = attn_module.launch_sweeps(160, 77)
    assert [choice for _, choice in sweeps] == [
        *({"row_groups": count} for count in (1, 2, 4, 8)), *({"chunks_in_flight": count} for count in (1, 2, 3)),
        *({"warps": count} for count in (4, 8, 16))]
    assert len({name for name, _ in sweeps}) == len(sweeps)
    query, key = _inputs(2, 4, 20, 160, 77, torch.float32, seed=11)
    expected = torch.zeros(20, 77)
    attn_accumulate_reference(expected, query, key, 0.1)
    for name, choice in sweeps:
        total = torch.zeros(20, 77)
        attn_accumulate_triton(total, query, key, 0.1, **choice)
        assert torch.allclose(total, expected, rtol=0, atol=1e-5), name


@pytest.mark.parametrize("count", [0, 4])
def test_chunks_in_flight_outside_one_to_the_chunks_of_d_is_a_clear_error(count):
    query, key = _inputs(2, 1, 20, 160, 77, torch.float32)
    with pytest.raises(ValueError, match=rf"chunks_in_flight must be 1 to 3 \(d = 160 in chunks of 64\), got {count}"):
        attn_accumulate_triton(torch.zeros(20, 77), query, key, 0.1, chunks_in_flight=count)


@pytest.mark.parametrize("warps", [0, 3, 64])
def test_warps_other_than_a_power_of_2_up_to_32_are_a_clear_error(warps):
    query, key = _inputs(2, 1, 20, 16, 77, torch.float32)
    with pytest.raises(ValueError, match=f"warps must be a power of 2 from 1 to 32, got {warps}"):
        attn_accumulate_triton(torch.zeros(20, 77), query, key, 0.1, warps=warps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernels need a CUDA GPU")
@pytest.mark.usefixtures("skip_if_compiled_elsewhere")
class TestCompiledOnGPU:
    """The compiled kernel (no interpreter), bf16 included; reruns itself without the interpreter."""


    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_matches_reference(self, shape, dtype):
        rows, heads, queries, dim, keys = shape
        query, key = _inputs(rows, heads, queries, dim, keys, dtype, device="cuda")
        total = torch.zeros(queries, keys, device="cuda")
        attn_accumulate_(total, query, key, dim**-0.5)
        _assert_within_rule(query, key, dim**-0.5, total)

    @staticmethod
    def _sd15_totals(seed: int, launches: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """query, key (SD1.5's 16 rows, fp16) and the total of a launch for each dict of the launcher's choices."""
        query, key = _inputs(2, 8, 256, 160, 77, torch.float16, device="cuda", seed=seed)
        totals = []
        for choices in launches:
            totals.append(torch.zeros(256, 77, device="cuda"))
            attn_accumulate_triton(totals[-1], query, key, 160**-0.5, **choices)
        return query, key, totals

    @pytest.mark.parametrize("groups", [1, 3, 16])
    def test_row_groups_on_the_device_sum_alike_and_repeat_bit_for_bit(self, groups):
        # Here the programs of a block run at once: the last to take its ticket must see every partial sum.
        query, key, runs = self._sd15_totals(7, [{"row_groups": groups}] * 3)
        assert all(torch.equal(runs[0], run) for run in runs[1:])
        _assert_within_rule(query, key, 160**-0.5, runs[0])

    def test_every_depth_of_loads_gives_the_same_bits(self):
        # Loading d's chunks one at a time or all at once changes when the copies arrive, not the dots' order.
        query, key, runs = self._sd15_totals(9, [{"chunks_in_flight": count} for count in (1, 2, 3)])
        assert all(torch.equal(runs[0], run) for run in runs[1:])
        _assert_within_rule(query, key, 160**-0.5, runs[0])

    @pytest.mark.parametrize("warps", [4, 8, 16])
    def test_every_count_of_warps_sums_alike_and_repeats_bit_for_bit(self, warps):
        # The warps change how a row's softmax sum is reduced (its last bit), not what is summed.
        query, key, runs = self._sd15_totals(10, [{"warps": warps}] * 2)
        assert torch.equal(runs[0], runs[1])
        _assert_within_rule(query, key, 160**-0.5, runs[0])

    def test_a_workspace_is_never_first_made_inside_a_capture(self):
        # Its tickets' zeros would only be recorded, not run: the first launch of a shape must be eager.
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="launch it once eagerly"), torch.cuda.graph(graph):
            attn_module._workspace(torch.device("cuda"), 7, 3, 2048)

    def test_strided_and_cuda_graph_capture(self):
        batch, queries, keys, heads, dim = 3, 256, 77, 8, 160
        q = torch.randn(batch, queries, heads * dim, device="cuda", dtype=torch.float16)
        k = torch.randn(batch, keys, heads * dim, device="cuda", dtype=torch.float16)
        query = q.view(batch, queries, heads, dim).transpose(1, 2)[1:3]
        key = k.view(batch, keys, heads, dim).transpose(1, 2)[1:3]
        total = torch.zeros(queries, keys, device="cuda")
        attn_accumulate_(total, query, key, dim**-0.5)  # warm-up: compiles outside the capture
        total.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            attn_accumulate_(total, query, key, dim**-0.5)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        _assert_within_rule(query, key, dim**-0.5, total / 2)
