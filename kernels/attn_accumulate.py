"""Kernel 1: fused cross-attention map accumulation (ZONE.md section 3), in place.

For one recorded layer and one step, with query (R, H, N, d) and key (R, H, K, d) of the kept rows:

    total (N, K) fp32 += sum over (R, H) of softmax(q k^T * scale)

without ever writing the (R*H, N, K) probabilities. The grid is (blocks of BLOCK_N queries) x (groups
of rows): each program computes the scores of its rows with tl.dot, the softmax in fp32, and sums
them in registers. A row's d is read in 64-wide chunks, copied asynchronously into shared memory as many at
once as the GPU's shared memory allows with every program resident (all 3 of SD1.5's on an H100 or H200:
one round trip to memory, not one a chunk; `_chunks_in_flight`). With one group the program adds that sum to
the accumulator. With several (on a GPU: one row each, so a layer's 16 rows run on 16 programs at once instead
of one after another, the latency of their loads overlapping), each program writes its sum to a workspace;
the block's last program to finish (a ticket counts them) adds the groups' sums to the accumulator in group
order. One launch per call; deterministic (the order of every addition is fixed; the ticket decides only who
adds, not the order).

The kernel adds the *sum* over rows; `AttentionAccumulator` counts the rows and divides by the total
count at the end. sum-then-divide-once equals the reference's pooled mean over (steps, layers,
rows) exactly, even when layers have different head counts (a per-layer mean would weight them
differently).

Public API:
    attn_accumulate_(total, query, key, scale)          guarded: kernel when usable, else reference
    attn_accumulate_triton(total, query, key, scale)     the launcher (always launches)
    attn_accumulate_reference(total, query, key, scale)  plain torch (zone_engine.localize)
    torch.ops.zone.attn_accumulate_                      the custom op (fake impl registered)
    benchmark(...)                                       (a) store-all, (b) torch, (c) kernel; on a GPU a floor:
    read_once(query, key)                                a launch reading Q and K once, nothing else
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from zone_engine.localize import accumulate_attention_probabilities
from zone_kernels.runtime import benchmark_rows, can_launch, is_interpreted, traced

MAX_KEYS = 128  # keys are padded to one BLOCK_K tile; CLIP's 77 tokens fit
LOG2E = 1.4426950408889634


@triton.jit
def _attn_accumulate_kernel(
    total_ptr, q_ptr, k_ptr, partial_ptr, ticket_ptr,
    N, K, scale_log2e,
    stride_qr, stride_qh, stride_qn,
    stride_kr, stride_kh, stride_kn,
    # Loop bounds as constants: a layer's head count and width never change within a model (SD1.5: 8
    # heads, 3 widths, so 3 compilations), the loops compile with known trip counts, and triton 3.6's
    # interpreter fails on a loop bound passed at run time (int() of a 1-element array, under NumPy 2.4).
    D: tl.constexpr, HEADS: tl.constexpr, ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PARTIAL_K: tl.constexpr, CHUNKS_IN_FLIGHT: tl.constexpr,
):
    block = tl.program_id(0)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < N
    k_in = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # sum over this group's rows of the probabilities
    for i in range(GROUP_ROWS):
        row = tl.program_id(1) * GROUP_ROWS + i
        real = row < ROWS  # the last group may hold fewer rows: the rest read row ROWS - 1 and add nothing
        row = tl.minimum(row, ROWS - 1)
        r = row // HEADS
        h = row - r * HEADS
        q_row = q_ptr + r * stride_qr + h * stride_qh
        k_row = k_ptr + r * stride_kr + h * stride_kh
        scores = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        # Pipelined (sm_80 on): CHUNKS_IN_FLIGHT chunks' asynchronous copies into shared memory issued before the
        # first dot waits for its own. As plain loads (an unrolled loop) each chunk's waited behind the barrier
        # that frees the one shared buffer: 3 round trips to memory in turn at d = 160 where 1 will do.
        for d0 in tl.range(0, D, BLOCK_D, num_stages=CHUNKS_IN_FLIGHT + 1):
            d_in = (d0 + offs_d) < D
            q = tl.load(q_row + offs_n[:, None] * stride_qn + (d0 + offs_d)[None, :],
                        mask=n_in[:, None] & d_in[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            # K^T loaded directly (as Triton's fused-attention tutorial does), not tl.trans'd.
            kt = tl.load(k_row + offs_k[None, :] * stride_kn + (d0 + offs_d)[:, None],
                         mask=k_in[None, :] & d_in[:, None], other=0.0)  # (BLOCK_D, BLOCK_K)
            scores = tl.dot(q, kt, scores, input_precision=DOT_PRECISION)
        # Padded keys get -inf (probability 0); padded queries see zeros (a finite, discarded row).
        scores = tl.where(k_in[None, :], scores * scale_log2e, float("-inf"))
        p = tl.exp2(scores - tl.max(scores, axis=1)[:, None])
        acc += tl.where(real, p / tl.sum(p, axis=1)[:, None], 0.0)
    # Only one program per block touches the accumulator's BLOCK_N rows: a plain read-add-write, no atomics.
    ptrs = total_ptr + offs_n[:, None] * K + offs_k[None, :]
    inside = n_in[:, None] & k_in[None, :]
    if GROUPS == 1:
        tl.store(ptrs, tl.load(ptrs, mask=inside, other=0.0) + acc, mask=inside)
    else:
        # The partial sums keep PARTIAL_K keys (77 rounded up to 80 of the tile's 128), a mask constant over 16
        # lanes, so 16-byte vectors: padded keys hold 0, padded queries' finite values are never added.
        tile = tl.arange(0, BLOCK_N)[:, None] * PARTIAL_K + offs_k[None, :]
        kept = (offs_k < PARTIAL_K)[None, :]
        partials = partial_ptr + block * (GROUPS * BLOCK_N * PARTIAL_K)
        tl.store(partials + tl.program_id(1) * (BLOCK_N * PARTIAL_K) + tile, acc, mask=kept)
        tl.debug_barrier()  # every thread's share of the sum stored before the ticket releases it
        if tl.atomic_add(ticket_ptr + block, 1, sem="acq_rel") == GROUPS - 1:  # the block's last program
            summed = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            # Unrolled (at 8 warps ptxas keeps 8 reads in flight); in group order, whoever came last: deterministic.
            for group in tl.static_range(GROUPS):
                # .cg: read from L2, where the other programs' stores are, past this SM's L1.
                summed += tl.load(partials + group * (BLOCK_N * PARTIAL_K) + tile, mask=kept, other=0.0,
                                  cache_modifier=".cg")
            tl.store(ptrs, tl.load(ptrs, mask=inside, other=0.0) + summed, mask=inside)
            # Ready for the next launch: every program of the block has taken its ticket, and the launch's end
            # publishes the store (an atomic's fence would only make this program wait).
            tl.store(ticket_ptr + block, 0)


_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_arguments(total: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
    """ValueError unless query (R, H, N, d), key (R, H, K, d), total (N, K) fp32 fit together."""
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(f"query and key must be (R, heads, N, d) and (R, heads, K, d); got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    rows, heads, queries, dim = query.shape
    if key.shape[0] != rows or key.shape[1] != heads or key.shape[3] != dim:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)} in (R, heads, d)")
    keys = key.shape[2]
    if not 1 <= keys <= MAX_KEYS:
        raise ValueError(f"the kernel takes 1 to {MAX_KEYS} keys, got {keys}")
    if query.dtype not in _INPUT_DTYPES or key.dtype != query.dtype:
        raise ValueError(f"query and key must share one dtype of fp16, bf16, fp32; got {query.dtype}, {key.dtype}")
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("query and key need a contiguous last (d) dimension (stride 1); other strides are free")
    if total.dtype != torch.float32 or total.shape != (queries, keys) or not total.is_contiguous():
        raise ValueError(f"the accumulator must be a contiguous float32 ({queries}, {keys}) tensor; got "
                         f"{total.dtype} {tuple(total.shape)}{'' if total.is_contiguous() else ' non-contiguous'}")
    if not (total.device == query.device == key.device):
        raise ValueError(f"total, query and key must be on one device; got {total.device}, {query.device}, "
                         f"{key.device}")


# Warps a program: 8, not Triton's 4. The block's last program reads every group's partial sums (16 x 5 KB at
# SD1.5's shapes); at 4 warps a thread made 64 masked 16-byte reads, which ptxas (Triton 3.8, sm_90) compiled
# to one register reused, most reads waiting for the add of the one before: 43 round trips to L2 in turn, read off
# the SASS (its first form, a loop, also read in turn: 12.7 us a layer on the H200, 29x its DRAM floor). At 8
# warps, 32 reads a thread, 8 issued at once: 6 round trips (16 warps: 4, but 3 programs an SM where 8 warps fit
# 4). Not timed; on an L4 the registers of 8 warps fit 4 programs an SM, not the 5 of 4 warps: SD1.5's 256
# programs take 2 waves there, which may cost more than the reads save (bench_kernels times 4, 8 and 16 warps).
WARPS = 8


def attn_accumulate_triton(total: torch.Tensor, query: torch.Tensor, key: torch.Tensor, scale: float, *,
                           row_groups: int | None = None, chunks_in_flight: int | None = None,
                           warps: int = WARPS) -> None:
    """Launch the kernel: total (N, K) fp32 += sum_{R, H} softmax(query key^T * scale), in place.

    `row_groups`: programs per block of queries; `chunks_in_flight`: chunks of d a program loads at once (1 to
    d / 64 rounded up), None: the launcher's choice; `warps`: a program's warps (a power of 2, 1 to 32; WARPS
    unless given). Tests and the benchmark pick others."""
    _check_arguments(total, query, key)
    if warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"warps must be a power of 2 from 1 to 32, got {warps}")
    _launch(total, query, key, scale, row_groups=row_groups, chunks_in_flight=chunks_in_flight, warps=warps)


def _launch(total: torch.Tensor, query: torch.Tensor, key: torch.Tensor, scale: float, *,
            row_groups: int | None = None, chunks_in_flight: int | None = None, warps: int = WARPS) -> None:
    rows, heads, queries, dim = query.shape
    keys = key.shape[2]
    if rows * heads == 0 or queries == 0:
        return
    interpreted = is_interpreted(_attn_accumulate_kernel)
    block_n, block_k, block_d = _tiles(keys, dim, interpreted)
    # On a GPU a program per row: SD1.5's N = 256 and 16 rows make 256 programs. The interpreter prefers
    # fewer, larger programs (two groups keep its path the GPU's).
    groups = row_groups or min(rows * heads, 2 if interpreted else MAX_ROW_GROUPS)
    group_rows = triton.cdiv(rows * heads, groups)
    groups = triton.cdiv(rows * heads, group_rows)  # no group left empty
    blocks = triton.cdiv(queries, block_n)
    partial_k = triton.cdiv(keys, 16) * 16
    chunks = triton.cdiv(dim, block_d)
    if chunks_in_flight is None:
        chunk_bytes = (block_n + block_k) * block_d * query.element_size()  # a chunk of Q's rows and of K^T
        chunks_in_flight = _chunks_in_flight(_multiprocessors(query.device), chunks, chunk_bytes, blocks * groups)
    elif not 1 <= chunks_in_flight <= chunks:
        raise ValueError(f"chunks_in_flight must be 1 to {chunks} (d = {dim} in chunks of {block_d}), got "
                         f"{chunks_in_flight}")
    partials, tickets = _workspace(total.device, blocks, groups, block_n * partial_k)
    _attn_accumulate_kernel[(blocks, groups)](
        total, query, key, partials, tickets,
        queries, keys, float(scale) * LOG2E,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        D=dim, HEADS=heads, ROWS=rows * heads, GROUPS=groups, GROUP_ROWS=group_rows,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, PARTIAL_K=partial_k, CHUNKS_IN_FLIGHT=chunks_in_flight,
        # fp32 inputs: "ieee", no tf32 rounding, as the fp32 reference; fp16/bf16 products are exact
        # in the fp32 accumulator whatever the setting ("tf32" is Triton's default).
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=warps,
    )


def _tiles(keys: int, dim: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_D): 16 queries a program (tl.dot's smallest tile; the interpreter prefers fewer,
    larger programs), the keys in one tile, and d walked in chunks of at most 64, so a 160-dim head wastes 17 %
    (3 x 64) instead of 37 % (256) and the K tile stays at 16 KB in fp16."""
    return (64 if interpreted else 16, max(16, triton.next_power_of_2(keys)),
            min(64, triton.next_power_of_2(max(dim, 16))))


MAX_ROW_GROUPS = 32  # programs per block of queries; more rows than this share programs
RESERVED_SHARED = 1024  # bytes of shared memory CUDA keeps for itself in every block (sm_80 and later)


@functools.cache
def _multiprocessors(device: torch.device) -> tuple[int, int, int] | None:
    """A CUDA GPU's (multiprocessors, shared memory bytes each, the most one block may take); None elsewhere."""
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    return (properties.multi_processor_count, properties.shared_memory_per_multiprocessor,
            properties.shared_memory_per_block_optin)


def _chunks_in_flight(gpu: tuple[int, int, int] | None, chunks: int, chunk_bytes: int, programs: int) -> int:
    """How many of a row's `chunks` of d a program loads at once: each takes `chunk_bytes` of shared memory.

    All of them (one round trip to memory instead of one a chunk) while the launch's `programs` still fit on the
    GPU's multiprocessors all at once (SD1.5: an H100 or H200, 3 chunks of 18 KB, 2 programs an SM); fewer where
    that would leave programs waiting for a second wave, which costs a whole program's latency (an A100: 2; an L4,
    58 multiprocessors of 100 KB: 1). Registers and threads are not counted: at 8 warps (52 to 64 registers a
    thread) 4 programs fit an SM, enough on an H100 or H200 and an A100; an L4's 256 programs take 2 waves whatever
    the depth (4 warps, 94 registers, would fit 5). `gpu` None (the interpreter, which ignores it; meta tensors):
    all of them."""
    if gpu is None:
        return chunks
    multiprocessors, shared, per_block = gpu
    resident = triton.cdiv(programs, multiprocessors)  # programs an SM holds at once for a single wave
    for count in range(chunks, 1, -1):
        # A block may take `per_block` (CUDA's reservation already left out); each resident one also costs that.
        if count * chunk_bytes <= per_block and resident * (count * chunk_bytes + RESERVED_SHARED) <= shared:
            return count
    return 1


_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, blocks: int, groups: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups' partial sums and the blocks' tickets (zero between launches) for a launch of this shape.

    Kept per device and shape, allocated at a shape's first launch (a warm-up, before any CUDA-graph
    capture) and reused: launches that share one must not run at the same time, which holds for the
    engine's, all issued in order on one stream. Tickets are only touched when there are several groups.
    """
    key = (device, blocks, groups, tile)
    if key not in _workspaces:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Made inside a capture, the tickets' zeros would only be recorded: launch once before capturing.
            raise RuntimeError("kernel 1's first launch at this shape is being captured in a CUDA graph: launch it "
                               "once eagerly first (a warm-up), as the engine's denoiser does")
        size = blocks * groups * tile if groups > 1 else 1
        _workspaces[key] = (torch.empty(size, device=device, dtype=torch.float32),
                            torch.zeros(blocks, device=device, dtype=torch.int32))
    return _workspaces[key]


# The plain-torch reference: the same in-place contract, from the engine's localization stage.
attn_accumulate_reference = accumulate_attention_probabilities


@torch.library.custom_op("zone::attn_accumulate_", mutates_args=("total",))
def _attn_accumulate_op(total: torch.Tensor, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
    if can_launch(_attn_accumulate_kernel, query.device, (query.dtype,)):
        attn_accumulate_triton(total, query, key, scale)
    else:
        attn_accumulate_reference(total, query, key, scale)


@_attn_accumulate_op.register_fake
def _(total: torch.Tensor, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
    _check_arguments(total, query, key)


def runs_on(device: torch.device) -> bool:
    """Whether the kernel can launch on `device` here (else `attn_accumulate_` runs the reference)."""
    return can_launch(_attn_accumulate_kernel, device)


def attn_accumulate_(total: torch.Tensor, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
    """total (N, K) fp32 += sum over (R, H) of softmax(query key^T * scale), in place.

    query (R, H, N, d) and key (R, H, K, d), fp16/bf16/fp32, any strides but a contiguous last dim.
    Runs the kernel when Triton can run here (under torch.compile through the `zone::attn_accumulate_`
    custom op, one opaque mutating op; eager calls and CUDA-graph capture launch it directly);
    otherwise the torch reference.
    """
    _check_arguments(total, query, key)
    if not can_launch(_attn_accumulate_kernel, query.device, (query.dtype,)):
        attn_accumulate_reference(total, query, key, scale)
    elif traced(total, query, key):
        torch.ops.zone.attn_accumulate_(total, query, key, float(scale))
    else:  # eager or CUDA-graph capture: checked above, launched without the dispatcher's host time
        _launch(total, query, key, scale)


# ------------------------------------------------------------------------------------------- benchmark


def attention_sum_fp64(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """sum over (R, H) of softmax(q k^T * scale) in float64: the accuracy yardstick, (N, K)."""
    scores = torch.matmul(query.double(), key.double().transpose(-1, -2)) * scale
    return scores.softmax(dim=-1).sum(dim=(0, 1))


@triton.jit
def _read_once_kernel(
    sums_ptr, q_ptr, k_ptr, N, K,
    stride_qr, stride_qh, stride_qn, stride_kr, stride_kh, stride_kn,
    D: tl.constexpr, HEADS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The floor kernel 1 is measured against: kernel 1's grid (blocks of queries x rows) and warps reading a layer's
    Q and K once (a row's keys by its first block only) with the same tiles, and nothing else: one sum per program."""
    block, row = tl.program_id(0), tl.program_id(1)
    r = row // HEADS
    h = row - r * HEADS
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    total = 0.0
    for d0 in tl.static_range(0, D, BLOCK_D):
        d_in = (d0 + offs_d) < D
        q = tl.load(q_ptr + r * stride_qr + h * stride_qh + offs_n[:, None] * stride_qn + (d0 + offs_d)[None, :],
                    mask=(offs_n < N)[:, None] & d_in[None, :], other=0.0)
        kt = tl.load(k_ptr + r * stride_kr + h * stride_kh + offs_k[None, :] * stride_kn + (d0 + offs_d)[:, None],
                     mask=((offs_k < K) & (block == 0))[None, :] & d_in[:, None], other=0.0)
        total += tl.sum(q.to(tl.float32)) + tl.sum(kt.to(tl.float32))
    tl.store(sums_ptr + row * tl.num_programs(0) + block, total)


def read_once(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Launch the floor kernel on one layer: (R*H*blocks,) sums whose total is query's plus key's, each element
    read once."""
    rows, heads, queries, dim = query.shape
    block_n, block_k, block_d = _tiles(key.shape[2], dim, is_interpreted(_read_once_kernel))
    blocks = triton.cdiv(queries, block_n)
    sums = torch.empty(rows * heads * blocks, device=query.device, dtype=torch.float32)
    _read_once_kernel[(blocks, rows * heads)](
        sums, query, key, queries, key.shape[2], query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        D=dim, HEADS=heads, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=WARPS,
    )
    return sums


def _store_all(layers: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """(a) the reference's AttentionStore: materialise every layer's probabilities, average later."""
    store = []
    for query, key in layers:
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        store.append(scores.softmax(dim=-1).flatten(0, 1))  # (R*H, N, K) kept in memory
    return torch.cat(store).mean(0)


def _kept_rows(rows: int, length: int, heads: int, dim: int, generator: torch.Generator, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """A random (rows + 1, length, heads * dim) projection viewed as (rows + 1, heads, length, d), rows 1:
    kept: the strided view the recording processor hands the kernel."""
    projection = torch.randn(rows + 1, length, heads * dim, generator=generator).to(device, dtype)
    return projection.view(rows + 1, length, heads, dim).transpose(1, 2)[1:]


def benchmark(
    device: str | torch.device | None = None, *, layers: int = 5, rows: int = 2, heads: int = 8,
    queries: int = 256, dim: int = 160, keys: int = 77, dtype: torch.dtype | None = None, seed: int = 0,
) -> list[dict]:
    """SD1.5 at 512x512 by default: 5 layers of 2 kept rows x 8 heads, N = 256, d = 160, 77 keys.

    Returns one dict per variant: name, time_ms (do_bench median on CUDA, None elsewhere), bytes
    (a model of the DRAM traffic, see below), max_abs_diff against the fp64 average.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    scale = 1.0 / math.sqrt(dim)
    generator = torch.Generator().manual_seed(seed)
    inputs = [(_kept_rows(rows, queries, heads, dim, generator, device, dtype),
               _kept_rows(rows, keys, heads, dim, generator, device, dtype)) for _ in range(layers)]
    count = layers * rows * heads
    exact = sum(attention_sum_fp64(q, k, scale) for q, k in inputs) / count

    def averaged(accumulate: Callable[..., object]) -> Callable[[], torch.Tensor]:
        """The average over every layer's rows and heads, summed into one total by `accumulate`."""
        def run() -> torch.Tensor:
            total = torch.zeros(queries, keys, device=device)
            for q, k in inputs:
                accumulate(total, q, k, scale)
            return total / count

        return run

    element = torch.finfo(dtype).bits // 8
    qk_bytes = layers * rows * heads * (queries + keys) * dim * element
    probs = layers * rows * heads * queries * keys * 4
    # Traffic model: every variant reads Q and K once. The torch paths also write and re-read fp32
    # copies of Q, K (.float()), then move the probabilities' size 5 times (matmul out, scale in/out, softmax
    # in/out); the store then concatenates them (read, write) and reads them for the mean: 8 in all; the torch
    # reference reads them once for each layer's sum (6), writes that sum and adds it to the total (read both,
    # write one: 4 maps a layer). The kernel adds only the accumulator's read-modify-write (its groups' partial
    # sums, written and read back within the launch, 16 x 256 x 80 x 4 B = 1.3 MB a layer on a GPU, stay in L2
    # and are not counted).
    upcast = 2 * qk_bytes * 4 // element
    variants = {
        "a: store all, average later": (lambda: _store_all(inputs, scale), qk_bytes + upcast + 8 * probs),
        "b: torch reference, in place": (averaged(attn_accumulate_reference),
                                         qk_bytes + upcast + 6 * probs + layers * 4 * queries * keys * 4),
        "c: fused Triton kernel": (averaged(attn_accumulate_), qk_bytes + layers * 2 * queries * keys * 4),
    }

    def check(out: torch.Tensor) -> dict:
        return {"max_abs_diff": (out.double() - exact).abs().max().item()}

    results = benchmark_rows(variants, check, device, averaged(torch.ops.zone.attn_accumulate_))
    if device.type == "cuda":  # other launches than the launcher's (on an H200: a row a program, all of d at once)
        graphed = results[-1]

        def launched_as(name: str, **choice: int) -> dict:
            run = averaged(functools.partial(attn_accumulate_triton, **choice))
            return {**graphed, "name": f"c: {name}, from a CUDA graph", **check(run()),
                    "time_ms": triton.testing.do_bench_cudagraph(run, return_mode="median")}

        results += [launched_as(name, **choice) for name, choice in launch_sweeps(dim, keys)]
        # The same launches around the same zeros and division, only reading: what kernel 1 costs beyond that.
        floor = averaged(lambda _total, query, key, _scale: read_once(query, key))
        results.append({"name": READ_ONCE_ROW, "bytes": qk_bytes, "max_abs_diff": None,
                        "time_ms": triton.testing.do_bench_cudagraph(floor, return_mode="median")})
    return results


READ_ONCE_ROW = "floor: a launch a layer only reading Q, K, from a CUDA graph"


def launch_sweeps(dim: int, keys: int) -> list[tuple[str, dict[str, int]]]:
    """The launches the GPU benchmark times beside the launcher's own, as (the row's name, attn_accumulate_triton's
    keywords): a block's rows in 1, 2, 4 or 8 programs, 1 to all of d's chunks in flight, 4, 8 or 16 warps. Apart
    from the benchmark so that the suite launches each on the CPU: a stale choice fails there, not on a lease."""
    groups = [("one program per block, rows in turn" if count == 1 else f"rows in {count} groups a block",
               {"row_groups": count}) for count in (1, 2, 4, 8)]
    depths = [(f"{count} of d's chunks in flight", {"chunks_in_flight": count})
              for count in range(1, triton.cdiv(dim, _tiles(keys, dim, False)[2]) + 1)]
    return groups + depths + [(f"{count} warps a program", {"warps": count}) for count in (4, 8, 16)]
