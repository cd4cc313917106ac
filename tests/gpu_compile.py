"""Compile every Triton kernel launch of SD1.5's shapes at 512² for sm_90, sm_89, sm_80 and sm_75 with Triton's own
ptxas, no GPU needed.

The launchers run as they would on a GPU (this process does not interpret), on meta tensors, kernel 1's sized for
one GPU of each capability (MODELLED_GPUS); their kernels are replaced by recorders, and each recorded launch is
compiled as Triton's JIT would specialise it (an int equal to
1 becomes the constant 1, None a constant None; aligned pointers and ints divisible by 16 are marked so). What a
GPU would compile at an edit's first step, checked on the CPU: tests/test_kernels_compile_for_gpus.py runs it
(`python tests/gpu_compile.py [90 89 80 75]`: the compute capabilities, all four by default). Prints
each kernel's stack/local bytes where not 0. Exit 0; 1 with the reason when a kernel fails to compile, kernel 3
reads x or writes y 2 bytes at a time at SD1.5's channel counts (no vector access), or kernel 1's sum across
programs lost the order of its stores, barrier, ticket and reads, reads the groups' sums in a loop, or moves them
in scalars, not 16-byte vectors, or its d loop waits before it has requested the chunks it was launched to have in
flight; 77 where Triton has no ptxas.
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from gpu_datasheets import MODELLED_GPUS, THREADS_A_MULTIPROCESSOR
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zone_kernels import attn_accumulate, group_norm, mask_binarize

try:
    from triton.backends.nvidia.compiler import get_ptxas

    PTXAS = get_ptxas(90).path
    print(f"ptxas: {PTXAS}")
except (ImportError, RuntimeError, OSError, TypeError, AttributeError) as error:  # no ptxas, or another API
    print(f"no ptxas this script can use (triton {triton.__version__}): {error!r}")
    sys.exit(77)

POINTEES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
            torch.int64: "i64", torch.uint8: "u8"}
META = torch.device("meta")


LAUNCH_OPTIONS = ("num_warps", "num_stages")  # keywords of a launch that are compile options, not the kernel's


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **constexprs)` records the launch (its constexprs and,
    apart, the compile options it names)."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def record(*args, **keywords):
            options = {name: keywords.pop(name) for name in LAUNCH_OPTIONS if name in keywords}
            self.launches.append((args, keywords, options))

        return record


def signature_of(kernel, args: tuple, constexprs: dict) -> tuple[dict, dict, dict]:
    """Triton's signature, constants and attributes for a launch with these arguments: as its JIT specialises
    them, a pointer 16-byte aligned (CUDA's allocations are; a view's offset may not be) and an int divisible by
    16 get `tt.divisibility` 16 (the vectorised code a GPU compiles)."""
    if unknown := set(constexprs) - {param.name for param in kernel.params if param.is_constexpr}:
        raise SystemExit(f"{kernel.__name__}: keyword arguments {sorted(unknown)} are not its constexprs")
    names = [name for name in kernel.arg_names if name not in constexprs]
    signature, constants, attrs = {name: "constexpr" for name in constexprs}, dict(constexprs), {}
    for name, value in zip(names, args, strict=True):
        aligned = False
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTEES[value.dtype]
            aligned = value.storage_offset() * value.element_size() % 16 == 0
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif value is None or (isinstance(value, int) and value == 1):
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            aligned = value % 16 == 0
        if aligned:
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return {name: signature[name] for name in kernel.arg_names}, constants, attrs


def read_cubin(tool: str, option: str, cubin: bytes) -> str:
    """What one of the CUDA tools beside Triton's ptxas (cuobjdump, nvdisasm) prints of a cubin."""
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / "kernel.cubin"
        binary.write_bytes(cubin)
        return subprocess.run([str(Path(PTXAS).with_name(tool)), option, str(binary)], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """The cubin's registers a thread (REG), stack and local bytes (STACK, LOCAL), ..., as cuobjdump reports them."""
    usage = read_cubin("cuobjdump", "--dump-resource-usage", cubin).partition("Function")[2]
    return {name: int(value) for name, value in re.findall(r"\b([A-Z]+):(\d+)", usage)}


def local_bytes(usage: dict[str, int]) -> int:
    """Stack and local memory of the cubin Triton built (its `resource_usage`): the build's own figure (ptxas decides
    register spills; the PTX does not show them). A few bytes may be a call's frame (an IEEE division's slow path)
    rather than spills, so the figure is printed, not failed on."""
    return usage.get("STACK", 0) + usage.get("LOCAL", 0)


def sd15_launches() -> None:
    """The engine's launches at 512² in fp16 (bf16 compiles the same tiles with other conversions: the GPU tests'
    share; here it would double the time): kernel 1 on the five recorded layers' kept rows (2 rows of 8
    heads, 16x16 queries, d 160), kernel 2 from a 16x16 map to 512x512, kernel 3 as the engine calls it in
    SD1.5's UNet (channels last, 6 rows) and VAE (decode and encode, NCHW), and on groups of one channel without
    positions."""
    dtype = torch.float16
    queries = torch.empty(3, 256, 1280, dtype=dtype, device=META).view(3, 256, 8, 160).transpose(1, 2)[1:]
    keys = torch.empty(3, 77, 1280, dtype=dtype, device=META).view(3, 77, 8, 160).transpose(1, 2)[1:]
    attn_accumulate._launch(torch.empty(256, 77, device=META), queries, keys, 160**-0.5)
    attn_accumulate.read_once(queries, keys)  # the floor its benchmark measures it against
    calls = sd15_norm_calls(dtype)
    for call in calls:
        norm(*call)
    adjacent, fused = sum(x.stride(1) == 1 for x, *_ in calls), sum(silu for *_, silu in calls)
    print(f"kernel 3: {len(calls)} kinds of call (shape, layout, fusion), {adjacent} channels adjacent, {fused} fused "
          "with SiLU")
    norm(torch.empty(3, 6, dtype=dtype, device=META), 6)
    mask = torch.empty(512, 512, dtype=torch.uint8)
    for paper, threshold in ((False, 108), (True, 128)):  # both rules (128: divisible by 16, specialised)
        mask_binarize._launch(torch.rand(256, 77), (16, 16), 5, mask, paper, threshold, torch.empty_like(mask))


def sd15_norm_calls(dtype: torch.dtype) -> list[tuple]:
    """(x, groups, addend, silu) of every kernel-3 call, one per shape, layout and kind, of SD1.5's UNet on 6 rows
    of 64x64 latents and of its VAE decoding them and encoding a 512² image, as the engine makes them: the real
    topologies run on meta tensors inside `triton_group_norms` (the ResNet blocks' fused norms included), each
    `group_norm` call recorded. The UNet's inputs are made channels last, as the engine's are on CUDA (its
    convolutions return NHWC there; on meta they return NCHW)."""
    from zone_engine.models import PRESETS, build_unet, build_vae

    with torch.device(META):
        unet, vae = (model.to(dtype).eval() for model in (build_unet(PRESETS["sd15"]), build_vae(PRESETS["sd15"])))
    calls, layout = {}, {"channels_last": True}

    def record(x, num_groups, weight, bias, eps=1e-5, *, addend=None, silu=False):
        if layout["channels_last"] and x.dim() == 4:
            x = x.to(memory_format=torch.channels_last)
        key = (tuple(x.shape), x.stride(), num_groups, addend is not None, silu)
        calls.setdefault(key, (x, num_groups, addend, silu))
        return group_norm.group_norm_reference(x, num_groups, weight, bias, eps, addend, silu)

    real, group_norm.group_norm = group_norm.group_norm, record
    try:
        with torch.no_grad():
            with group_norm.triton_group_norms(unet):
                unet(torch.empty(6, 8, 64, 64, dtype=dtype, device=META), 900,
                     encoder_hidden_states=torch.empty(6, 77, 768, dtype=dtype, device=META))
            layout["channels_last"] = False
            with group_norm.triton_group_norms(vae):
                vae.decode(torch.empty(1, 4, 64, 64, dtype=dtype, device=META))
                vae.encode(torch.empty(1, 3, 512, 512, dtype=dtype, device=META))
    finally:
        group_norm.group_norm = real
    return list(calls.values())


def norm(x: torch.Tensor, groups: int, addend: torch.Tensor | None = None, silu: bool = False) -> None:
    weight = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
    group_norm._launch(x, groups, weight, weight, 1e-5, None, addend, silu)


# Kernel 3's one access to x (stats) or y (apply), by channel blocks: with C a multiple of 16 (every SD1.5 norm),
# 16-bit scalar accesses mean the tile lost its vector loads (its first version, tiled by whole groups of 10 to 80
# channels, compiled to 2-byte accesses with up to 37.5 % of lanes masked on every UNet norm).
SCALAR_HALF = {"_channel_stats_kernel": re.compile(r"ld\.global(?:\.\w+)*\.[bu]16\b"),
               "_group_norm_apply_kernel": re.compile(r"st\.global(?:\.\w+)*\.[bu]16\b")}


def check_vector_access(name: str, args: dict, ptx: str) -> None:
    """SystemExit when kernel 3 reads x or writes y 2 bytes at a time at a channel count divisible by 16."""
    if name in SCALAR_HALF and args["C"] % 16 == 0 and (found := SCALAR_HALF[name].findall(ptx)):
        raise SystemExit(f"{name} at {args['C']} channels: {len(found)} scalar 16-bit accesses ({found[0]})")


# Kernel 1's sum across programs (GROUPS > 1): every thread's partial stored, a barrier, then one thread's ticket
# (gpu scope, acquire-release), its value shared through a barrier, and the last program's reads from L2 (.cg).
# The order the PTX memory model needs for the last program to see every partial; the interpreter, running
# programs one after another, cannot show it. And those reads unrolled: as a loop (its first form), the last
# program waited out one L2 round trip per group, 16 in turn at SD1.5's shapes.
# The partial sums stored and read back in 16-byte vectors: their rows of keys a multiple of 16 (80 for CLIP's 77).
TICKET = re.compile(r"atom\.global\.gpu\.acq_rel\.add")
LABEL, BRANCH = re.compile(r"^(\$L__\w+):"), re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def check_ticket_order(name: str, constexprs: dict, ptx: str) -> None:
    """SystemExit when kernel 1's cross-program sum lost that order in the PTX."""
    if name != "_attn_accumulate_kernel" or constexprs["GROUPS"] == 1:
        return
    lines = ptx.splitlines()
    tickets = [i for i, line in enumerate(lines) if TICKET.search(line)]
    if len(tickets) != 1:
        raise SystemExit(f"{name}: {len(tickets)} acquire-release gpu-scope ticket atomics, not 1")
    ticket = tickets[0]
    stores = [i for i, line in enumerate(lines[:ticket]) if "st.global" in line]
    reads = [i for i, line in enumerate(lines) if i > ticket and "ld.global.cg" in line]
    if not stores or not any("bar.sync" in line for line in lines[stores[-1]:ticket]):
        raise SystemExit(f"{name}: no barrier between the partials' stores and the ticket")
    if not reads or not any("bar.sync" in line for line in lines[ticket:reads[0]]):
        raise SystemExit(f"{name}: the partials are not read from L2 (.cg) after the ticket's shared value")
    if scalar := [lines[i].strip() for i in [*stores, *reads] if ".v4." not in lines[i]]:
        raise SystemExit(f"{name}: the partial sums move in scalars ({scalar[0]}), not 16-byte vectors: their rows "
                         f"of PARTIAL_K={constexprs['PARTIAL_K']} keys must be a multiple of 16")
    if loop := backward_branch(lines, ticket):
        raise SystemExit(f"{name}: the last program's sum loops ({loop}): each group's read waits for the one "
                         "before, where unrolled they can be in flight together")


def backward_branch(lines: list[str], start: int) -> str | None:
    """The first branch after line `start` back to a label also after it (a loop there), or None."""
    labels = {match[1]: i for i, line in enumerate(lines) if (match := LABEL.match(line))}
    for i, line in enumerate(lines[start:], start):
        if (match := BRANCH.search(line)) and start < labels.get(match[1], -1) <= i:
            return line.strip()
    return None


# Kernel 1's d chunks in flight (CHUNKS_IN_FLIGHT): the pipelined loop's asynchronous copies of that many chunks
# committed before its first wait. Were they issued one chunk at a time (Triton no longer pipelining the loop), each
# chunk would wait out its own round trip to memory again. The first `cp.async.wait_group N` lets N groups stay
# pending: the groups committed before it, less N, are the first chunk's, which gives the groups a chunk.
COMMIT, FIRST_WAIT = re.compile(r"\bcp\.async\.commit_group\b"), re.compile(r"\bcp\.async\.wait_group\s+(\d+)")


def chunks_in_flight(ptx: str) -> float:
    """How many chunks' copies the PTX commits before its first wait (0: no asynchronous copies)."""
    lines = ptx.splitlines()
    first = next((i for i, line in enumerate(lines) if FIRST_WAIT.search(line)), None)
    if first is None:
        return 0
    committed = sum(bool(COMMIT.search(line)) for line in lines[:first])
    a_chunk = committed - int(FIRST_WAIT.search(lines[first])[1])
    return committed / a_chunk if a_chunk > 0 else 0


def check_chunks_in_flight(name: str, capability: int, constexprs: dict, ptx: str) -> None:
    """SystemExit when kernel 1 commits other than CHUNKS_IN_FLIGHT chunks' copies before its first wait (on sm_80
    and later, with more than one chunk of d: a T4 has no asynchronous copies, and a single pass is not pipelined)."""
    if name != "_attn_accumulate_kernel" or capability < 80 or constexprs["D"] <= constexprs["BLOCK_D"]:
        return
    if (found := chunks_in_flight(ptx)) != constexprs["CHUNKS_IN_FLIGHT"]:
        raise SystemExit(f"{name} on sm_{capability}: {found:g} chunks of d in flight before the first wait, not the "
                         f"{constexprs['CHUNKS_IN_FLIGHT']} it was launched with")


# Kernel 1's last program reads every group's partial sums after its ticket. Compiled for 4 warps (Triton's default)
# by Triton 3.8's ptxas for sm_90, its 64 reads a thread went into one register, each waiting for the add of the one
# before: 43 round trips to L2 in turn. The SASS after the ticket is put through a model: a global load (or atomic)
# takes one round trip, an instruction waits for the registers it reads, anything else is one issue slot.
ROUND_TRIP = 1000  # issue slots
INSTRUCTION = re.compile(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
NO_DESTINATION = ("ST", "RED", "BRA", "EXIT", "BAR", "ISETP", "FSETP", "MEMBAR", "ERRBAR", "CGAERRBAR", "CCTL")


def round_trips(sass: list[str]) -> float:
    """The modelled critical path of these SASS lines, in round trips to memory."""
    ready: dict[int, int] = {}
    now = 0
    for line in sass:
        if not (match := INSTRUCTION.search(line)):
            continue
        opcode, registers = match[1], [int(r) for r in re.findall(r"\bR(\d+)\b", match[2])]
        loads = opcode.startswith(("LDG.", "ATOMG"))
        written, read = ([], registers) if opcode.startswith(NO_DESTINATION) else (registers[:1], registers[1:])
        now = max([now, *(ready.get(r, 0) for r in read)]) + 1
        width = (4 if ".128" in opcode else 2 if ".64" in opcode else 1) if loads else 1
        for first in written:
            ready.update(dict.fromkeys(range(first, first + width), now + (ROUND_TRIP if loads else 0)))
    return now / ROUND_TRIP


def last_program_round_trips(name: str, constexprs: dict, cubin: bytes) -> float | None:
    """Kernel 1's modelled round trips after its ticket; SystemExit beyond one per two groups (None: no ticket)."""
    if name != "_attn_accumulate_kernel" or constexprs["GROUPS"] == 1:
        return None
    sass = read_cubin("nvdisasm", "-c", cubin).splitlines()
    ticket = next((i for i, line in enumerate(sass) if "ATOMG" in line), None)
    if ticket is None:
        raise SystemExit(f"{name}: no ATOMG (its ticket) in the SASS of a launch of {constexprs['GROUPS']} groups")
    trips = round_trips(sass[ticket + 1:])
    if trips > constexprs["GROUPS"] / 2:
        raise SystemExit(f"{name}: its last program's sum of {constexprs['GROUPS']} groups takes {trips:.1f} round "
                         "trips to L2 in turn (modelled on the SASS): its reads wait for one another")
    return trips


# Hopper (H100/H200: the lent devices), then what edge servers run: Ada (L4, L40S), Ampere (A100; the A10's sm_86
# on request) and Turing (T4, fp16: it has no bf16 units). Kernel 1's launcher sizes its loads by the GPU's
# multiprocessors: those of the GPU each capability is compiled as (gpu_datasheets.MODELLED_GPUS).
CAPABILITIES = (90, 89, 80, 75)


def resident_programs(capability: int, registers: int, warps: int, shared: int) -> int:
    """Programs of this many registers a thread, warps and shared bytes one multiprocessor of the modelled GPU holds
    at once (registers are given a warp 256 at a time; CUDA keeps RESERVED_SHARED bytes of shared memory a block)."""
    threads = warps * 32
    return min(65536 // (threads * -(-registers // 8) * 8), THREADS_A_MULTIPROCESSOR[capability] // threads,
               MODELLED_GPUS[capability][1] // (shared + attn_accumulate.RESERVED_SHARED))


def main(capabilities: tuple[int, ...]) -> None:
    """Compile for `capabilities` (compute capabilities as 90 for sm_90): the test runs one process each, at once."""
    modules = {attn_accumulate: ["_attn_accumulate_kernel", "_read_once_kernel"], mask_binarize: ["_binarize_kernel"],
               group_norm: ["_channel_stats_kernel", "_group_moments_kernel", "_group_norm_apply_kernel"]}
    if unknown := sorted(set(capabilities) - set(MODELLED_GPUS)):
        raise SystemExit(f"no GPU modelled for {unknown}: compute capabilities {sorted(MODELLED_GPUS)} (MODELLED_GPUS)")
    recorders = [(module, name, Recorder(getattr(module, name))) for module, names in modules.items() for name in names]
    for module, name, recorder in recorders:
        setattr(module, name, recorder)
    compiled = set()
    for capability in capabilities:  # the launches as each GPU's launchers make them
        attn_accumulate._multiprocessors = lambda _device, gpu=MODELLED_GPUS[capability]: gpu
        for _, _, recorder in recorders:
            recorder.launches.clear()
        sd15_launches()
        for _, name, recorder in recorders:
            for args, constexprs, options in recorder.launches:
                signature, constants, attrs = signature_of(recorder.kernel, args, constexprs)
                key = (capability, name, tuple(signature.items()), tuple(sorted(constants.items(), key=str)),
                       tuple(sorted(attrs)), tuple(sorted(options.items())))
                if key in compiled:
                    continue
                compiled.add(key)
                source = ASTSource(recorder.kernel, signature, constexprs=constants, attrs=attrs)
                kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
                usage = resource_usage(kernel.asm["cubin"])
                named = dict(zip(recorder.kernel.arg_names, args, strict=False))
                if stack := local_bytes(usage):  # reported, not failed: a call frame counts too
                    print(f"sm_{capability} {name} {constants}: {stack} bytes of stack/local memory")
                check_vector_access(name, named, kernel.asm["ptx"])
                check_ticket_order(name, constexprs, kernel.asm["ptx"])
                check_chunks_in_flight(name, capability, constexprs, kernel.asm["ptx"])
                if (trips := last_program_round_trips(name, constexprs, kernel.asm["cubin"])) is not None:
                    programs = triton.cdiv(named["N"], constexprs["BLOCK_N"]) * constexprs["GROUPS"]
                    registers, warps = usage["REG"], options["num_warps"]
                    fit = resident_programs(capability, registers, warps, kernel.metadata.shared)
                    # Triton 3.8 builds tl.dot for sm_75 from FMAs: the reason for its registers there.
                    units = "tensor cores" if "mma." in kernel.asm["ptx"] else "FMAs, no tensor cores"
                    print(f"sm_{capability} kernel 1: {constexprs['CHUNKS_IN_FLIGHT']} of d's chunks in flight, "
                          f"{kernel.metadata.shared} bytes of shared memory, {warps} warps, {registers} registers a "
                          f"program: {fit} an SM at once, {triton.cdiv(programs, MODELLED_GPUS[capability][0])} "
                          f"needed for one wave; dots on {units}; the last program's sum {trips:.1f} round trips to L2 "
                          "(modelled)")
    launched = {name for _, name, recorder in recorders if recorder.launches}
    if len(launched) < len(recorders):
        raise SystemExit(f"no launch recorded for {sorted({name for _, name, _ in recorders} - launched)}")
    print(f"{len(compiled)} kernels compiled for {', '.join(f'sm_{c}' for c in capabilities)}")


if __name__ == "__main__":
    main(tuple(map(int, sys.argv[1:])) or CAPABILITIES)
