"""Kernel 2 (fused mask binarization) against the reference composition, under TRITON_INTERPRET=1.

Tolerance: none. The kernels repeat the reference's arithmetic exactly (fp32 multiply then IEEE
divide, truncating cast, saturating subtraction, Pillow's integer bicubic passes), so masks and the
resized difference must be bit-identical, including maps with ties and all-equal columns.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton or the kernels are imported


import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import compiled_graph, dispatched_ops, spy_calls  # noqa: E402
from PIL import Image  # noqa: E402

import zone_kernels.mask_binarize as binarize_module  # noqa: E402
from zone_engine.localize import binarize_reference, localize  # noqa: E402
from zone_engine.pillow_resize import pillow_coefficients  # noqa: E402
from zone_kernels.mask_binarize import (  # noqa: E402
    PRECISION_BITS,
    binarize_mask,
    mask_binarize_,
    mask_binarize_reference_,
    mask_binarize_triton,
)
from zone_kernels.runtime import DISABLE_ENV, is_interpreted  # noqa: E402

INTERPRETED = is_interpreted(binarize_module._binarize_kernel)


def _map(grid, kind: str, seed: int, tokens: int = 77) -> torch.Tensor:
    """Averaged attention maps (h*w, tokens) float32 of several kinds."""
    rng = np.random.default_rng(seed)
    cells = grid[0] * grid[1]
    if kind == "random":
        values = rng.random((cells, tokens)) ** 3  # skewed, so thresholds cut through real regions
    elif kind == "ties":
        values = rng.integers(1, 5, size=(cells, tokens)) / 4  # few distinct values: ties, several maxima
    elif kind == "flat":
        values = rng.random((cells, tokens))
        values[:, 0] = 0.3  # an all-equal first column: a_1 = 255 everywhere
        values[:, 1::2] = 0.7  # and all-equal candidate last columns
    else:
        raise AssertionError(kind)
    return torch.from_numpy(values.astype(np.float32))


def _run_both(average, grid, last_token, size, rule):
    mask = torch.full(size, 7, dtype=torch.uint8)  # garbage: every pixel must be written
    difference = torch.full(size, 7, dtype=torch.uint8)
    mask_binarize_triton(average, grid, last_token, mask, rule=rule, difference=difference)
    expected_mask, expected_difference = binarize_reference(average, grid, last_token, size, rule=rule)
    return mask.numpy(), difference.numpy(), expected_mask, expected_difference


CASES = [
    ((3, 2), (96, 64)),
    ((16, 16), (512, 512)),  # SD1.5 at 512x512
    ((5, 7), (160, 224)),
    ((12, 20), (384, 640)),
    ((2, 2), (37, 53)),  # not a multiple of the grid
    ((4, 4), (4, 4)),  # both passes skipped
    ((3, 5), (3, 40)),  # vertical pass skipped
    ((4, 6), (7, 3)),  # width shrinks: Pillow's downscaling window
]
# Interpreted, the CASES but the second large one (10 s; 5x7 -> 160x224 is another non-square whole scale).
INTERPRETED_CASES = [case for case in CASES if case != ((12, 20), (384, 640))]


@pytest.mark.parametrize("rule", ["reference", "paper"])
@pytest.mark.parametrize("grid,size", INTERPRETED_CASES, ids=lambda v: "x".join(map(str, v)))
def test_bit_identical_to_reference_on_random_maps(grid, size, rule):
    for seed in (0, 1):
        average = _map(grid, "random", seed)
        last_token = int(np.random.default_rng(seed).integers(1, 77))
        mask, difference, expected_mask, expected_difference = _run_both(average, grid, last_token, size, rule)
        assert np.array_equal(difference, expected_difference)
        assert set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(mask.astype(bool), expected_mask)


@pytest.mark.parametrize("grid,size", [((5, 7), (160, 224)), ((4, 6), (7, 3)), ((12, 20), (96, 320)),
                                       ((16, 16), (200, 70)), ((7, 5), (100, 37))],
                         ids=lambda v: "x".join(map(str, v)))
def test_bit_identical_with_the_gpus_tiles(grid, size, monkeypatch):
    # The GPU's 16 x 128 tiles (more tiles, each reading its own span of grid rows; in the last two
    # sizes windows move on inside a tile), interpreted; SD1.5's 16x16 -> 512x512 (19 s here, a whole scale as
    # 12x20 -> 96x320) runs them compiled in TestCompiledOnGPU.
    monkeypatch.setattr(binarize_module, "is_interpreted", lambda kernel: False)
    average = _map(grid, "random", seed=3)
    mask, difference, expected_mask, expected_difference = _run_both(average, grid, 9, size, "reference")
    assert np.array_equal(difference, expected_difference) and np.array_equal(mask.astype(bool), expected_mask)


@pytest.mark.parametrize("kind", ["ties", "flat"])
@pytest.mark.parametrize("grid,size", [((3, 2), (96, 64)), ((5, 7), (160, 224)), ((2, 2), (37, 53))],
                         ids=lambda v: "x".join(map(str, v)))
def test_bit_identical_with_ties_and_all_equal_columns(grid, size, kind):
    for last_token, rule in ((1, "reference"), (4, "paper"), (76, "reference")):
        mask, difference, expected_mask, expected_difference = _run_both(
            _map(grid, kind, seed=last_token), grid, last_token, size, rule
        )
        assert np.array_equal(difference, expected_difference)
        assert np.array_equal(mask.astype(bool), expected_mask)


def test_thresholds_are_passed_through():
    grid, size = (5, 7), (160, 224)
    average = _map(grid, "random", 3)
    for rule, kwargs in (("reference", {"reference_threshold": 60}), ("paper", {"paper_threshold": 20})):
        mask = torch.empty(size, dtype=torch.uint8)
        mask_binarize_(average, grid, 9, mask, rule=rule, **kwargs)
        expected, _ = binarize_reference(average, grid, 9, size, rule=rule, **kwargs)
        assert np.array_equal(mask.numpy().astype(bool), expected)


def test_the_reference_rule_saturates_2d_at_255_in_the_kernel():
    """min(2d, 255) <= T, not 2d <= T: they differ only at T >= 255 (d >= 128 then kept), which the default 108
    and the random maps' thresholds never reach. Token 0 peaks where token 5 is 0: d = 255 there."""
    grid, size = (3, 2), (12, 8)
    average = torch.full((6, 77), 0.5)
    average[:, 0] = torch.tensor([1.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    average[0, 5] = 0.0
    for threshold in (254, 255):
        mask, difference = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
        mask_binarize_triton(average, grid, 5, mask, reference_threshold=threshold, difference=difference)
        expected, _ = binarize_reference(average, grid, 5, size, reference_threshold=threshold)
        assert difference.max() == 255 and np.array_equal(mask.numpy().astype(bool), expected)
    assert mask.all()  # at 255 every pixel, d = 255 included


def test_coefficient_tables_reproduce_pillow_on_images():
    # The host tables alone, applied in numpy, against PIL on random uint8 images (incl. shrinking widths).
    rng = np.random.default_rng(0)
    for _ in range(40):
        height, width = (int(v) for v in rng.integers(1, 20, 2))
        out_h, out_w = int(rng.integers(height, 80)), int(rng.integers(1, 80))
        image = rng.integers(0, 256, (height, width), dtype=np.uint8)
        rows = image.astype(np.int64)
        for axis, (source, target) in ((1, (width, out_w)), (0, (height, out_h))):
            starts, weights = pillow_coefficients(source, target, "bicubic")
            acc = np.full((rows.shape[0], target) if axis else (target, rows.shape[1]), 1 << (PRECISION_BITS - 1))
            for t in range(weights.shape[1]):
                index = np.minimum(starts + t, source - 1)
                acc += rows[:, index] * weights[:, t] if axis else rows[index, :] * weights[:, t, None]
            rows = np.clip(acc >> PRECISION_BITS, 0, 255)
        expected = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BICUBIC))
        assert np.array_equal(rows, expected), (height, width, out_h, out_w)


def test_writes_in_place_and_localize_accepts_it():
    grid, size = (3, 2), (96, 64)
    average = _map(grid, "random", 4)
    mask = torch.zeros(size, dtype=torch.uint8)
    storage = mask.data_ptr()
    mask_binarize_(average, grid, 5, mask)
    assert mask.data_ptr() == storage and mask.any()
    fused = localize(average, grid, 5, size, binarize=binarize_mask)
    plain = localize(average, grid, 5, size)
    assert np.array_equal(fused.mask_b, plain.mask_b) and np.array_equal(fused.difference, plain.difference)


def test_strided_map():
    grid, size = (5, 7), (160, 224)
    wide = _map(grid, "random", 5, tokens=154)
    average = wide[:, ::2]  # (35, 77) with a column stride of 2
    assert not average.is_contiguous()
    mask, difference, expected_mask, expected_difference = _run_both(average, grid, 6, size, "reference")
    assert np.array_equal(difference, expected_difference) and np.array_equal(mask.astype(bool), expected_mask)


def test_shrinking_height_falls_back_to_the_reference(monkeypatch):
    grid, size = (8, 4), (5, 40)
    average = _map(grid, "random", 6)
    with pytest.raises(ValueError, match="only enlarges the height"):
        mask_binarize_triton(average, grid, 3, torch.empty(size, dtype=torch.uint8))
    mask = torch.empty(size, dtype=torch.uint8)
    mask_binarize_(average, grid, 3, mask)
    assert np.array_equal(mask.numpy().astype(bool), binarize_reference(average, grid, 3, size)[0])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a, m: dict(average=a.double()), "float32 \\(N, K\\)"),
        (lambda a, m: dict(average=a[0]), "float32 \\(N, K\\)"),
        (lambda a, m: dict(grid=(2, 2)), "does not hold"),
        (lambda a, m: dict(grid=(-3, -2)), "does not hold"),  # the right product, but no grid
        (lambda a, m: dict(last_token=77), "outside the map"),
        (lambda a, m: dict(last_token=-1), "outside the map"),
        (lambda a, m: dict(mask=m.bool()), "uint8 \\(H, W\\)"),
        (lambda a, m: dict(mask=m.t()), "uint8 \\(H, W\\)"),
        (lambda a, m: dict(mask=m[None]), "uint8 \\(H, W\\)"),
        (lambda a, m: dict(mask=m[:0]), "non-empty uint8"),
        (lambda a, m: dict(difference=torch.empty(96, 64, dtype=torch.int16)), "difference must be a contiguous"),
        (lambda a, m: dict(mask=m.to("meta")), "is on meta"),
        (lambda a, m: dict(difference=torch.empty(5, 5, dtype=torch.uint8)), "differ in shape"),
        (lambda a, m: dict(rule="median"), "unknown threshold rule"),
    ],
)
def test_clear_errors(change, message):
    average, mask = _map((3, 2), "random", 0), torch.empty(96, 64, dtype=torch.uint8)
    arguments = {"average": average, "grid": (3, 2), "last_token": 5, "mask": mask, **change(average, mask)}
    for function in (mask_binarize_, mask_binarize_triton):
        with pytest.raises(ValueError, match=message):
            function(**arguments)


def test_an_unchanged_height_runs_the_kernel(monkeypatch):
    """Only a shrinking height falls back to the reference: an equal one (4x4 -> 4x4, 3x5 -> 3x40) is fused."""
    calls = spy_calls(monkeypatch, binarize_module, "_launch", "mask_binarize_reference_")
    for grid, size in (((4, 4), (4, 4)), ((3, 5), (3, 40))):
        mask = torch.empty(size, dtype=torch.uint8)
        mask_binarize_(_map(grid, "random", 2), grid, 5, mask)
        assert np.array_equal(mask.numpy().astype(bool), binarize_reference(_map(grid, "random", 2), grid, 5, size)[0])
    assert calls == ["_launch", "_launch"]


def test_environment_variable_switches_the_kernels_off(monkeypatch):
    calls = spy_calls(monkeypatch, binarize_module, "_launch", "mask_binarize_reference_")
    grid, size, average = (3, 2), (96, 64), _map((3, 2), "random", 7)
    mask = torch.empty(size, dtype=torch.uint8)
    mask_binarize_(average, grid, 5, mask)
    assert calls == ["_launch"]
    calls.clear()
    monkeypatch.setenv(DISABLE_ENV, "1")
    mask_binarize_(average, grid, 5, mask)
    assert calls == ["mask_binarize_reference_"]
    assert np.array_equal(mask.numpy().astype(bool), binarize_reference(average, grid, 5, size)[0])


def test_reference_in_place_contract():
    grid, size, average = (3, 2), (96, 64), _map((3, 2), "random", 8)
    mask, difference = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    mask_binarize_reference_(average, grid, 5, mask, rule="paper", difference=difference)
    expected_mask, expected_difference = binarize_reference(average, grid, 5, size, rule="paper")
    assert np.array_equal(mask.numpy().astype(bool), expected_mask)
    assert np.array_equal(difference.numpy(), expected_difference)


def test_custom_op_opcheck_and_fake_tensors():
    average = _map((3, 2), "random", 9)
    mask, difference = torch.empty(96, 64, dtype=torch.uint8), torch.empty(96, 64, dtype=torch.uint8)
    op = torch.ops.zone.mask_binarize_.default
    torch.library.opcheck(op, (average, 3, 2, 5, False, 108, mask, difference))
    torch.library.opcheck(op, (average, 3, 2, 5, True, 128, mask, None))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        average, mask = torch.empty(6, 77), torch.empty(96, 64, dtype=torch.uint8)
        mask_binarize_(average, (3, 2), 5, mask)  # the fake implementation: no kernel, no error
        with pytest.raises(ValueError, match="does not hold"):
            op(average, 2, 2, 5, False, 108, mask, None)


def test_only_traced_calls_go_through_the_custom_op():
    """Eager calls launch directly (no dispatcher host time); torch.compile sees the opaque op."""
    grid, average = (3, 2), _map((3, 2), "random", 7)
    mask = torch.empty(96, 64, dtype=torch.uint8)
    assert not any(op.startswith("zone.") for op in dispatched_ops(lambda: mask_binarize_(average, grid, 5, mask)))
    graph = compiled_graph(lambda a, m: mask_binarize_(a, grid, 5, m), average, mask)
    assert "zone.mask_binarize_" in graph


@pytest.mark.parametrize("rule", ["reference", "paper"])
def test_traceable_by_torch_compile(rule):
    """Traced, the rule reaches the custom op as its `paper` flag: both rules, not just the default."""
    average = _map((3, 2), "random", 10)

    def step(average, mask):
        mask_binarize_(average, (3, 2), 5, mask, rule=rule)
        return mask.sum()

    mask = torch.empty(96, 64, dtype=torch.uint8)
    count = torch.compile(step, backend="aot_eager", fullgraph=True)(average, mask)
    expected, _ = binarize_reference(average, (3, 2), 5, (96, 64), rule=rule)
    assert np.array_equal(mask.numpy().astype(bool), expected) and count.item() == expected.sum()


# --------------------------------------------------------------------------------- compiled, on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernels need a CUDA GPU")
@pytest.mark.usefixtures("skip_if_compiled_elsewhere")
class TestCompiledOnGPU:
    """The compiled kernels (no interpreter); reruns itself in a process without the interpreter."""


    @pytest.mark.parametrize("kind", ["random", "ties", "flat"])
    @pytest.mark.parametrize("grid,size", CASES, ids=lambda v: "x".join(map(str, v)))
    def test_bit_identical(self, grid, size, kind):
        for rule, last_token in (("reference", 5), ("paper", 76)):
            average = _map(grid, kind, seed=last_token).cuda()
            mask = torch.empty(size, dtype=torch.uint8, device="cuda")
            difference = torch.empty_like(mask)
            mask_binarize_(average, grid, last_token, mask, rule=rule, difference=difference)
            expected_mask, expected_difference = binarize_reference(average, grid, last_token, size, rule=rule)
            assert np.array_equal(difference.cpu().numpy(), expected_difference)
            assert np.array_equal(mask.cpu().numpy().astype(bool), expected_mask)

    def test_cuda_graph_capture(self):
        grid, size = (16, 16), (512, 512)
        average = _map(grid, "random", 11).cuda()
        mask = torch.empty(size, dtype=torch.uint8, device="cuda")
        mask_binarize_(average, grid, 5, mask)  # warm-up: compiles and caches the tables on the device
        mask.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mask_binarize_(average, grid, 5, mask)
        graph.replay()
        torch.cuda.synchronize()
        assert np.array_equal(mask.cpu().numpy().astype(bool), binarize_reference(average, grid, 5, size)[0])
