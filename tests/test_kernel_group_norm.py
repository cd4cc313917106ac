"""Kernel 3 (GroupNorm in the input's layout) against PyTorch's GroupNorm, under TRITON_INTERPRET=1.

Tolerance (flash-attention's rule): with `exact` GroupNorm in float64 on the same input values and
`torch_same` PyTorch's at the input precision on an NCHW copy (fp32: F.group_norm; fp16/bf16: computed in
fp32 and rounded once to the input dtype, the best an fp16 output can be; NCHW because PyTorch's CPU norm
on channels-last input sums E[x^2] - E[x]^2, 1e3 off at a mean of 1e4, a yardstick nothing could fail), require
    max|kernel - exact| <= 2 * max|torch_same - exact| + atol.
The kernel's statistics and arithmetic are fp32 like PyTorch's, in another order (chunk means and
deviations combined by Chan's formula; PyTorch: Welford), so in fp32 the two differ by a few ulps of the
outputs (measured: 1.3e-6 against 0.7e-6 at SD1.5's largest shape); atol = 1e-5 covers that for outputs
of magnitude <= 10 (fp32's ulp there is 1e-6). In half precision both round the same fp32 value once
(atol: one ulp of fp16 at 8, where a 1-ulp fp32 difference can flip the rounding).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton or the kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import compiled_graph, dispatched_ops, spy_calls  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import zone_kernels.group_norm as norm_module  # noqa: E402
from zone_kernels.group_norm import (  # noqa: E402
    group_norm,
    group_norm_reference,
    group_norm_triton,
    spatial_stride,
    triton_group_norms,
)
from zone_kernels.runtime import DISABLE_ENV, is_interpreted  # noqa: E402

INTERPRETED = is_interpreted(norm_module._channel_stats_kernel)
ATOL = {torch.float32: 1e-5, torch.float16: 8 * 2**-10, torch.bfloat16: 8 * 2**-7}


def _inputs(shape, layout: str, dtype, device="cpu", seed=0, offset=0.5, spread=2.0):
    """x (N, C, *spatial) in the named layout (nchw, nhwc, or blc: a (B, C, L) view of (B, L, C), as the
    VAE's attention norm gets it), weight and bias (C,)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * spread + offset
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "blc":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    weight = 1 + 0.5 * torch.randn(shape[1], generator=generator)
    bias = 0.5 * torch.randn(shape[1], generator=generator)
    return x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype)


def _assert_within_rule(x, groups, weight, bias, got, eps=1e-5, addend=None, silu=False):
    """The module docstring's rule, for the norm of x (+ addend, then SiLU where given)."""
    exact = group_norm_reference(x.double(), groups, weight.double(), bias.double(), eps,
                                 None if addend is None else addend.double(), silu)
    same = group_norm_reference(x.float().contiguous(), groups, weight.float(), bias.float(), eps,
                                None if addend is None else addend.float(), silu).to(x.dtype)
    torch_error = (same.double() - exact).abs().max().item()
    error = (got.double() - exact).abs().max().item()
    assert error <= 2 * torch_error + ATOL[x.dtype], (error, torch_error)


# (N, C, *spatial), groups, layout, blocks (channels, positions) a program covers (None: the launcher's)
CASES = [
    ((2, 12, 5, 7), 4, "nchw", None),
    ((2, 12, 5, 7), 4, "nhwc", None),
    ((3, 30, 9, 11), 3, "nhwc", (16, 8)),  # groups of 10 across 2 channel blocks (the last 14 of 16), 13 chunks
    ((2, 6, 5, 7), 2, "nchw", (1, 4)),  # one channel a program, 9 chunks, the last one 3 positions long
    ((2, 20, 6, 6), 20, "nhwc", (8, 4)),  # one channel a group, 3 channel blocks (the last half empty)
    ((1, 6, 1, 1), 2, "nchw", None),  # one position
    ((2, 8, 33), 2, "blc", (1, 4)),
    ((2, 8, 33), 2, "nchw", None),  # (B, C, L) contiguous
    ((1, 4, 2, 3, 5), 2, "nchw", (2, 8)),  # 3-D spatial dims
    ((3, 6), 6, "nchw", None),  # no spatial dims, one channel a group: run-time ints equal to 1
    ((2, 1, 5, 3), 1, "nchw", None),  # one channel, one group
    ((2, 6, 4, 4), 1, "nhwc", (4, 4)),  # one group across 2 channel blocks
]


def _case_id(case) -> str:
    return f"{'x'.join(map(str, case[0]))}-{case[2]}-{case[3]}"


# fp32 on every case; fp16 on one of each layout (its loads and stores differ, not its tiling: the
# interpreter's time goes where the cases are many)
DTYPE_CASES = [(case, torch.float32) for case in CASES] + [(CASES[i], torch.float16) for i in (0, 2, 6)]


@pytest.mark.parametrize("case, dtype", DTYPE_CASES, ids=lambda value: _case_id(value) if isinstance(value, tuple)
                         else str(value).removeprefix("torch."))
def test_kernel_matches_pytorch(case, dtype):
    shape, groups, layout, blocks = case
    x, weight, bias = _inputs(shape, layout, dtype)
    y = group_norm_triton(x, groups, weight, bias, 1e-5, blocks=blocks)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.stride() == x.stride()  # the output keeps the input's layout
    _assert_within_rule(x, groups, weight, bias, y)


def test_a_layout_without_one_spatial_stride_is_copied_first():
    x, weight, bias = _inputs((2, 8, 6, 10), "nchw", torch.float32)
    sliced = x[:, :, :, :7]  # rows 10 apart, 7 columns 1 apart: no single stride walks (h, w)
    assert spatial_stride(sliced) is None and spatial_stride(x) == 1
    _assert_within_rule(sliced, 4, weight, bias, group_norm_triton(sliced, 4, weight, bias, 1e-5))


def test_size_one_dims_take_no_step_and_other_layouts_are_copied():
    x, weight, bias = _inputs((2, 8, 1, 5), "nchw", torch.float32)
    turned = x.transpose(2, 3)  # (2, 8, 5, 1), contiguous: its size-1 dim's stride says nothing
    assert spatial_stride(turned) == 1
    _assert_within_rule(turned, 4, weight, bias, group_norm_triton(turned, 4, weight, bias, 1e-5))
    gapped = torch.randn(2 * 8 * 28).as_strided((2, 8, 4, 1, 5), (8 * 28, 28, 7, 7, 1))  # rows 7 apart, 5 long
    assert spatial_stride(gapped) is None
    _assert_within_rule(gapped, 4, weight, bias, group_norm_triton(gapped, 4, weight, bias, 1e-5))


def test_a_strided_input_with_one_spatial_stride_gets_a_contiguous_output():
    """Every other position, or every other channel: one stride still walks x's spatial dims, so x is read in
    place, but empty_like gives a dense y with strides of its own: y must be addressed by those, not x's."""
    x, weight, bias = _inputs((2, 8, 14), "nchw", torch.float32)
    wide, _, _ = _inputs((2, 16, 7), "nchw", torch.float32)
    for strided in (x[:, :, ::2], wide[:, ::2]):
        assert spatial_stride(strided) is not None and not strided.is_contiguous()
        y = group_norm_triton(strided, 4, weight, bias, 1e-5)
        assert y.is_contiguous()
        _assert_within_rule(strided, 4, weight, bias, y)


def test_inputs_spanning_2_31_elements_are_refused():
    """The kernels' offsets are 32-bit: a view of few elements whose strides span 2^31 goes to PyTorch (meta
    tensors: no memory behind them)."""
    x = torch.empty_strided((1, 2, 2), (4, 2**31, 1), device="meta")
    weight, bias = torch.empty(2, device="meta"), torch.empty(2, device="meta")
    with pytest.raises(ValueError, match="offsets are 32-bit"):
        group_norm_triton(x, 1, weight, bias, 1e-5)


def test_strided_weights_and_many_blocks_of_chunk_statistics(monkeypatch):
    x, _, _ = _inputs((2, 6, 5, 7), "nchw", torch.float32)
    weight, bias = torch.randn(12)[::2], torch.randn(18)[::3]  # not contiguous: read as such
    monkeypatch.setattr(norm_module, "INTERPRETED_TILE", 4)  # a group: 3 channels x 9 chunks, in 7 blocks of 4
    monkeypatch.setattr(norm_module, "TILE_ELEMENTS", 4)
    _assert_within_rule(x, 2, weight, bias, group_norm_triton(x, 2, weight, bias, 1e-5, blocks=(1, 4)))


def test_tiles_stay_within_budget_for_every_sd_shape():
    """The launcher's tiles at SD1.5's UNet and VAE norm shapes, NHWC and NCHW, up to 2048² images: never
    above TILE_ELEMENTS (a larger map gets more chunks, not larger tiles); on NHWC blocks of 64 channels,
    each dividing C (vector loads, no masked lanes)."""
    from zone_kernels.group_norm import TILE_ELEMENTS, tile_shape

    for channels in (128, 256, 320, 512, 640, 960, 1280, 1920, 2560):
        for side in (1, 8, 64, 512, 2048):
            for channels_adjacent in (True, False):
                block_c, block_hw = tile_shape(channels, side * side, channels_adjacent, interpreted=False)
                assert block_c * block_hw <= TILE_ELEMENTS, (channels, side, channels_adjacent)
                assert block_hw <= max(1, side * side) * 2
                if channels_adjacent:
                    assert block_c == 64, (channels, block_c)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_statistics_survive_a_large_mean_with_the_gpus_tiles(monkeypatch, layout):
    """Mean 1e4, spread 1 in fp32, in the tiles a GPU runs (NHWC 64 channels x 64 positions, NCHW 4 x 1024):
    E[x^2] - E[x]^2 would lose every digit of the variance (1e8 against fp32's 7), and a plain fp32 sum of a
    chunk misses the mean by more than the output can take; the corrected two-pass chunk statistics and
    Chan's combination keep it within PyTorch's own error."""
    monkeypatch.setattr(norm_module, "is_interpreted", lambda kernel: False)  # the launcher's GPU plan
    x, weight, bias = _inputs((1, 320, 32, 32), layout, torch.float32, offset=1e4, spread=1.0)
    _assert_within_rule(x, 32, weight, bias, group_norm_triton(x, 32, weight, bias, 1e-5))


def test_the_gpus_nhwc_tiles_with_groups_across_channel_blocks(monkeypatch):
    """96 channels in 32-channel blocks (the largest power of two dividing C), groups of 3 straddling them."""
    monkeypatch.setattr(norm_module, "is_interpreted", lambda kernel: False)
    x, weight, bias = _inputs((2, 96, 9, 9), "nhwc", torch.float32)
    _assert_within_rule(x, 32, weight, bias, group_norm_triton(x, 32, weight, bias, 1e-5))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[6]], ids=_case_id)
def test_the_time_embeddings_sum_and_silu_inside_the_kernel(case):
    """group_norm(x, addend=t, silu=True) = SiLU(GroupNorm(x + t[:, :, None, None])): the sum moves each
    channel's chunk means in the moments kernel and x's in the apply kernel, SiLU on the output. The
    yardstick is the same rule on SiLU(exact norm of x + t)."""
    shape, groups, layout, blocks = case
    x, weight, bias = _inputs(shape, layout, torch.float32)
    addend = 3 * torch.randn(shape[:2], generator=torch.Generator().manual_seed(1))
    got = group_norm_triton(x, groups, weight, bias, 1e-5, blocks, addend=addend, silu=True)
    assert got.stride() == x.stride()
    _assert_within_rule(x, groups, weight, bias, got, addend=addend, silu=True)


def test_the_reference_adds_the_time_embedding_in_xs_dtype():
    """As diffusers' ResnetBlock2D: an fp32 time embedding is cast to an fp16 x's dtype before the sum, so the
    fallback's output stays fp16 (no promotion to fp32 where the kernel cannot run)."""
    x, weight, bias = _inputs((2, 8, 3, 3), "nchw", torch.float16)
    addend = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    y = group_norm_reference(x, 4, weight, bias, 1e-5, addend, silu=True)
    assert y.dtype == torch.float16
    assert torch.equal(y, F.silu(F.group_norm(x + addend.half()[:, :, None, None], 4, weight, bias, 1e-5)))


def test_addend_errors():
    x, weight, bias = _inputs((2, 8, 3, 3), "nchw", torch.float32)
    with pytest.raises(ValueError, match=r"addend must be a floating \(2, 8\) tensor"):
        group_norm(x, 4, weight, bias, addend=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"addend must be a floating \(2, 8\) tensor on cpu"):
        group_norm(x, 4, weight, bias, addend=torch.zeros(2, 8, device="meta"))  # read as host memory otherwise
    with pytest.raises(ValueError, match="addend must be a floating"):
        group_norm(x, 4, weight, bias, addend=torch.zeros(2, 8, dtype=torch.int32))


def test_eps_and_repeats_bit_for_bit():
    x, weight, bias = _inputs((2, 8, 4, 4), "nhwc", torch.float32, spread=1e-3)  # var ~1e-6: eps matters
    runs = [group_norm_triton(x, 2, weight, bias, 1e-2, blocks=(1, 4)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    _assert_within_rule(x, 2, weight, bias, runs[0], eps=1e-2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, w, b: (x, 3, w, b), "do not split into 3 groups"),
        (lambda x, w, b: (x, 0, w, b), "do not split into 0 groups"),  # not a ZeroDivisionError
        (lambda x, w, b: (x, -4, w, b), "do not split into -4 groups"),  # 8 % -4 == 0 all the same
        (lambda x, w, b: (x.int(), 4, w, b), "x must be a floating tensor"),
        (lambda x, w, b: (x, 4, w[:6], b), r"weight must be a floating \(8,\) tensor"),
        (lambda x, w, b: (x, 4, w, b.int()), "bias must be a floating"),
        (lambda x, w, b: (x, 4, w.to("meta"), b), "weight is on meta, x on cpu"),
        (lambda x, w, b: (x[0, 0, 0], 4, w, b), r"\(N, C, \*spatial\)"),
    ],
)
def test_clear_errors(change, message):
    x, weight, bias = _inputs((2, 8, 3, 3), "nchw", torch.float32)
    with pytest.raises(ValueError, match=message):
        group_norm(*change(x, weight, bias))


def test_environment_variable_switches_the_kernel_off(monkeypatch):
    x, weight, bias = _inputs((2, 8, 3, 3), "nhwc", torch.float32)
    calls = spy_calls(monkeypatch, norm_module, "_launch", "group_norm_reference")
    group_norm(x, 4, weight, bias)
    assert calls == ["_launch"]
    calls.clear()
    monkeypatch.setenv(DISABLE_ENV, "1")
    _assert_within_rule(x, 4, weight, bias, group_norm(x, 4, weight, bias))
    assert calls == ["group_norm_reference"]


def test_float64_and_autograd_calls_go_to_pytorch(monkeypatch):
    x, weight, bias = _inputs((2, 8, 3, 3), "nhwc", torch.float64)
    calls = spy_calls(monkeypatch, norm_module, "_launch", "group_norm_reference")
    assert torch.allclose(group_norm(x, 4, weight, bias), F.group_norm(x, 4, weight, bias))
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        group_norm_triton(x, 4, weight, bias, 1e-5)
    norm = nn.GroupNorm(4, 8)  # weights that require grad, grad mode on: the kernels have no backward
    y = group_norm(x.float(), 4, norm.weight, norm.bias)
    assert y.grad_fn is not None
    assert calls == ["group_norm_reference", "group_norm_reference"]


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's bf16 fallback")
def test_bf16_falls_back_to_pytorch_under_the_interpreter(monkeypatch):
    x, weight, bias = _inputs((2, 8, 3, 3), "nhwc", torch.bfloat16)
    calls = spy_calls(monkeypatch, norm_module, "_launch", "group_norm_reference")
    group_norm(x, 4, weight, bias)
    assert calls == ["group_norm_reference"]


def test_custom_op_opcheck_and_fake_tensors():
    x, weight, bias = _inputs((2, 8, 5, 3), "nhwc", torch.float32)
    torch.library.opcheck(torch.ops.zone.group_norm.default, (x, 4, weight, bias, 1e-5, None, False))
    addend = torch.randn(2, 8)
    torch.library.opcheck(torch.ops.zone.group_norm.default, (x, 4, weight, bias, 1e-5, addend, True))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2, 8, 5, 3).to(memory_format=torch.channels_last)
        y = group_norm(fake, 4, torch.empty(8), torch.empty(8))  # the fake implementation: no kernel
        assert y.shape == fake.shape and y.stride() == fake.stride()
        assert group_norm(fake.half(), 4, torch.empty(8), torch.empty(8)).dtype == torch.float16  # x's dtype
        with pytest.raises(ValueError, match="do not split"):
            torch.ops.zone.group_norm(fake, 3, torch.empty(8), torch.empty(8), 1e-5, None, False)
        gapped = torch.empty(2, 8, 6, 10)[..., :7]  # no single spatial stride: the real op's output is contiguous
        assert torch.ops.zone.group_norm(gapped, 4, torch.empty(8), torch.empty(8), 1e-5, None, False).is_contiguous()


def test_only_traced_calls_go_through_the_custom_op():
    """Eager calls launch directly (no dispatcher host time); torch.compile sees the opaque op."""
    x, weight, bias = _inputs((2, 8, 3, 3), "nhwc", torch.float32)
    norm = nn.GroupNorm(4, 8)  # a module's weights are Parameters: an eager call all the same
    assert not any(op.startswith("zone.") for op in dispatched_ops(lambda: group_norm(x, 4, weight, bias)))
    with torch.no_grad():  # with grad, weights that require it go to PyTorch before the question arises
        params = dispatched_ops(lambda: group_norm(x, 4, norm.weight, norm.bias))
    assert not any(op.startswith("zone.") for op in params)
    graph = compiled_graph(lambda x, w, b: group_norm(x, 4, w, b) * 2, x, weight, bias)
    assert "zone.group_norm" in graph
    compiled = torch.compile(lambda x, w, b: group_norm(x, 4, w, b) * 2, backend="aot_eager", fullgraph=True)
    _assert_within_rule(x, 4, weight, bias, compiled(x, weight, bias) / 2)


def plain_norm(norm: nn.GroupNorm) -> nn.Module:
    """A plain nn.GroupNorm with `norm`'s settings and weights (no instance forward)."""
    plain = nn.GroupNorm(norm.num_groups, norm.num_channels, norm.eps)
    plain.load_state_dict(norm.state_dict())
    return plain


def _norms(module: nn.Module) -> list[nn.GroupNorm]:
    return [norm for norm in module.modules() if isinstance(norm, nn.GroupNorm)]


def test_the_scope_switches_every_affine_norm_and_restores_them(monkeypatch):
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.SiLU(), nn.GroupNorm(2, 8, affine=False))
    x = torch.randn(2, 3, 5, 5)
    expected = net(x)
    calls = []
    monkeypatch.setattr(norm_module, "group_norm", lambda *args: calls.append(args[1]) or group_norm(*args))
    with triton_group_norms(net) as switched, triton_group_norms(net) as nested:
        got = net(x)
    assert (switched, nested) == (1, 0)  # the affine norm, once; a nested scope leaves it to the outer
    assert calls == [4]
    assert torch.allclose(got, expected, atol=1e-5)
    assert all("forward" not in vars(norm) for norm in _norms(net))
    with pytest.raises(RuntimeError, match="inside"), triton_group_norms(net):
        raise RuntimeError("inside")
    assert all("forward" not in vars(norm) for norm in _norms(net))  # restored on the way out of an error too
    net(x)
    assert calls == [4]
    with triton_group_norms(net):
        twin = copy.deepcopy(net)  # a copy made inside keeps the kernel, on its own weights
    twin[1].weight.data.mul_(2)
    assert torch.allclose(twin(x), nn.Sequential(*list(twin)[:1], plain_norm(twin[1]), *list(twin)[2:])(x), atol=1e-5)
    assert calls == [4, 4] and "forward" in vars(twin[1])


def _tiny_unet_inputs():
    from zone_engine.models import build_tiny_unet

    torch.manual_seed(0)
    unet = build_tiny_unet().eval().to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 8, 8, 8, generator=generator).to(memory_format=torch.channels_last)
    return unet, sample, torch.randn(1, 77, 32, generator=generator)


@pytest.mark.skipif(not INTERPRETED, reason="the kernel runs on the CPU only under TRITON_INTERPRET=1")
def test_a_channels_last_tiny_unet_with_the_kernel_matches_pytorch():
    """Every GroupNorm of the UNet through the kernel, on NHWC activations: the output agrees with
    PyTorch's within fp32 rounding. (The pipeline's test runs the contiguous UNets and the VAE through
    it: tests/test_pipeline.py.)"""
    unet, sample, context = _tiny_unet_inputs()
    with torch.inference_mode():
        expected = unet(sample, 900, encoder_hidden_states=context).sample
        with triton_group_norms(unet):
            got = unet(sample, 900, encoder_hidden_states=context).sample
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.skipif(not INTERPRETED, reason="the kernel runs on the CPU only under TRITON_INTERPRET=1")
def test_every_resnet_block_runs_two_fused_norms(monkeypatch):
    """In the scope each of the UNet's ResnetBlock2Ds calls the kernel twice with SiLU, the second with the time
    embedding as addend; its other norms (the transformers') plain; all restored after."""
    unet, sample, context = _tiny_unet_inputs()
    resnets = [module for module in unet.modules() if type(module).__name__ == "ResnetBlock2D"]
    assert resnets and all(norm_module.fusable_resnet(block) for block in resnets)
    calls = []
    real = norm_module.group_norm
    monkeypatch.setattr(norm_module, "group_norm", lambda *args, **kwargs: calls.append(
        (kwargs.get("silu", False), kwargs.get("addend") is not None)) or real(*args, **kwargs))
    with torch.inference_mode(), triton_group_norms(unet):
        unet(sample, 900, encoder_hidden_states=context)
    assert calls.count((True, False)) == calls.count((True, True)) == len(resnets)
    assert calls.count((False, False)) == len(_norms(unet)) - 2 * len(resnets)
    assert not any("forward" in vars(module) for module in unet.modules())


def test_fused_resnets_do_diffusers_operations_where_the_kernel_cannot_run(monkeypatch):
    """With Triton switched off the fused forward falls back to PyTorch's norm, then SiLU, after diffusers' own
    sum: the UNet's output is bit for bit diffusers' (so the fused forward is diffusers' computation)."""
    monkeypatch.setenv(DISABLE_ENV, "1")
    unet, sample, context = _tiny_unet_inputs()
    calls = spy_calls(monkeypatch, norm_module, "_norm_and_silu")
    with torch.inference_mode():
        expected = unet(sample, 900, encoder_hidden_states=context).sample
        with triton_group_norms(unet):
            got = unet(sample, 900, encoder_hidden_states=context).sample
    assert len(calls) == 2 * sum(type(module).__name__ == "ResnetBlock2D" for module in unet.modules()) > 0
    assert torch.equal(got, expected)


def test_a_training_block_or_an_unusual_one_keeps_diffusers_forward(monkeypatch):
    from diffusers.models.resnet import ResnetBlock2D

    calls = spy_calls(monkeypatch, norm_module, "_norm_and_silu")
    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=16, groups=4, output_scale_factor=2.0)
    x, temb = torch.randn(2, 8, 5, 5), torch.randn(2, 16)
    with torch.no_grad(), triton_group_norms(block):
        block(x, temb)  # training mode (dropout active): diffusers' forward
        assert calls == []
        block.eval()
        expected = ResnetBlock2D.forward(block, x, temb)
        got = block(x, temb)  # a shortcut convolution and an output scale of 2, fused
        assert calls == ["_norm_and_silu", "_norm_and_silu"]
        assert torch.allclose(got, expected, atol=1e-5)
        block(x, temb[:1])  # one time embedding for both samples: diffusers broadcasts it
        with triton_group_norms(block):  # a nested scope leaves the block to the outer one
            block(x, temb)
        assert len(calls) == 4
    assert "forward" not in vars(block)
    assert not norm_module.fusable_resnet(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4,
                                                          time_embedding_norm="scale_shift"))
    assert not norm_module.fusable_resnet(ResnetBlock2D(in_channels=8, temb_channels=16, groups=4, down=True))
    block.norm2.register_forward_hook(lambda *args: None)  # a hook the fused forward would skip
    assert not norm_module.fusable_resnet(block)


# --------------------------------------------------------------------------------- compiled, on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernels need a CUDA GPU")
@pytest.mark.usefixtures("skip_if_compiled_elsewhere")
class TestCompiledOnGPU:
    """The compiled kernels (no interpreter), bf16 included; reruns itself without the interpreter.
    Half precision only for the awkward cases (the interpreter checks fp32; each case compiles anew)."""

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test_matches_pytorch(self, case, dtype):
        shape, groups, layout, blocks = case
        x, weight, bias = _inputs(shape, layout, dtype, device="cuda")
        y = group_norm_triton(x, groups, weight, bias, 1e-5, blocks=blocks)
        assert y.stride() == x.stride()
        _assert_within_rule(x, groups, weight, bias, y)

    @pytest.mark.parametrize("shape", [(6, 320, 64, 64), (6, 2560, 8, 8), (6, 960, 32, 32), (1, 128, 512, 512)])
    @pytest.mark.parametrize("layout", ["nhwc", "nchw"])
    def test_sd15_shapes_with_the_launchers_tiles(self, shape, layout):
        x, weight, bias = _inputs(shape, layout, torch.float16, device="cuda")
        _assert_within_rule(x, 32, weight, bias, group_norm(x, 32, weight, bias))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_the_time_embeddings_sum_and_silu(self, dtype):
        x, weight, bias = _inputs((6, 640, 32, 32), "nhwc", dtype, device="cuda")
        addend = torch.randn(6, 640, device="cuda", dtype=dtype)
        got = group_norm(x, 32, weight, bias, addend=addend, silu=True)
        _assert_within_rule(x, 32, weight, bias, got, addend=addend, silu=True)

    def test_cuda_graph_capture(self):
        x, weight, bias = _inputs((6, 640, 32, 32), "nhwc", torch.float16, device="cuda")
        group_norm(x, 32, weight, bias)  # warm-up: compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = group_norm(x, 32, weight, bias)
        x.mul_(2)
        graph.replay()
        torch.cuda.synchronize()
        _assert_within_rule(x, 32, weight, bias, y)
