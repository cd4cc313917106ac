"""Compile kernel 3's launch plans for SD1.5's norms at 512² for sm_90 with Triton's own ptxas, no GPU needed:
what a GPU would compile at an edit's first step, checked on the CPU (tests/test_kernel_group_norm.py runs it in
a process without TRITON_INTERPRET). Exit 0; 1 with the reason when a kernel fails to compile or spills to
local memory; 77 where Triton has no ptxas."""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.group_norm as m

try:
    from triton.backends.nvidia.compiler import get_ptxas

    print(f"ptxas: {get_ptxas(90).path}")
except (ImportError, RuntimeError, OSError) as error:  # nothing here to compile for a GPU with
    print(f"no ptxas: {error}")
    sys.exit(77)

UNET_NORMS = ((320, 4096), (640, 4096), (640, 1024), (960, 1024), (1280, 1024), (1280, 256), (1920, 256),
              (2560, 256), (1280, 64), (2560, 64))  # (channels, positions) at a 64x64 latent
VAE_NORMS = ((128, 262144), (256, 262144), (256, 65536), (512, 65536), (512, 16384), (512, 4096))  # at 512²
# (channels, groups, positions, channels adjacent): the UNets' NHWC, the VAE's NCHW and its attention's (B, C, L)
# view, and groups of one channel without positions (ints equal to 1).
NORMS = ([(c, 32, hw, True) for c, hw in UNET_NORMS] + [(c, 32, hw, False) for c, hw in VAE_NORMS]
         + [(512, 32, 4096, True), (6, 6, 1, False)])


def compile_once(kernel, args: list[tuple[str, object]], constexprs: dict[str, int], seen: set) -> None:
    """Compile `kernel` for these argument values as Triton would: an int equal to 1 becomes the constant 1."""
    signature, constants = {}, dict(constexprs)
    for name, value in args:
        if isinstance(value, str):  # a pointer's type
            signature[name] = value
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
    signature.update({name: "constexpr" for name in constexprs})
    signature = {name: signature[name] for name in kernel.arg_names}  # in the kernel's order, every one given
    key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted(constants.items())))
    if key not in seen:
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32))
        if ".local" in compiled.asm["ptx"]:
            raise SystemExit(f"{kernel.__name__} {constants}: spills to local memory")


def main() -> None:
    seen: set = set()
    for channels, groups, positions, adjacent in NORMS:
        plan = m.LaunchPlan.of(channels, groups, positions, adjacent, interpreted=False)
        strides = (channels * positions, 1, channels) if adjacent else (channels * positions, positions, 1)
        x_strides = [("stride_xn", strides[0]), ("stride_xc", strides[1]), ("stride_xhw", strides[2])]
        y_strides = [("stride_yn", strides[0]), ("stride_yc", strides[1]), ("stride_yhw", strides[2])]
        shape = [("HW", positions), ("GROUPS", groups), ("CPG", plan.per_group)]
        stats = [("chunk_mean_ptr", "*fp32"), ("chunk_m2_ptr", "*fp32")]
        moments = [("mean_ptr", "*fp32"), ("rstd_ptr", "*fp32")]
        fp16 = [(name, "*fp16") for name in ("x_ptr", "y_ptr", "weight_ptr", "bias_ptr")]
        compile_once(m._group_stats_kernel, [fp16[0], ("mean_ptr", "*fp32"), ("m2_ptr", "*fp32"), *x_strides, *shape,
                                             ("CHUNKS", plan.chunks)], plan.tile, seen)
        chunks = [("CHUNKS", plan.chunks), ("CHUNK_HW", plan.block_hw)]
        compile_once(m._group_moments_kernel, [*stats, *moments, ("group_size", 1.0), ("eps", 1e-5), *shape, *chunks],
                     plan.moments, seen)
        compile_once(m._group_norm_apply_kernel, [*fp16, *moments, *x_strides, *y_strides, *shape], plan.tile, seen)
    print(f"{len(seen)} kernels compiled for sm_90")


if __name__ == "__main__":
    main()
