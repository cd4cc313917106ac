"""The stages around the denoising loop replayed from CUDA graphs (zone_engine/graphs.py) against eager."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import smooth_image

from zone_engine import EditConfig, SamConfig, ZonePipeline
from zone_engine.graphs import CapturedCalls, eager


def test_cpu_tensors_run_the_function_itself(tiny_pipe):
    calls = []
    run = CapturedCalls()
    result = run("double", lambda x: calls.append(x) or 2 * x, torch.ones(3))
    assert torch.equal(result, torch.full((3,), 2.0)) and len(calls) == 1 and run.captures == 0
    assert tiny_pipe.run is eager  # a CPU pipeline captures nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
class TestOnGPU:
    def test_replay_equals_eager_reads_new_inputs_and_captures_once_per_shape(self, tiny_models):
        decoder = copy.deepcopy(tiny_models.vae).cuda()
        run = CapturedCalls()

        def decode(latents):
            return decoder.decode(latents, return_dict=False)[0]

        generator = torch.Generator(device="cuda").manual_seed(0)
        for shape in [(1, 4, 8, 8), (1, 4, 8, 12), (1, 4, 8, 8), (1, 4, 8, 12), (1, 4, 8, 8)]:
            latents = torch.randn(shape, device="cuda", generator=generator)
            with torch.inference_mode():
                got, expected = run("decode", decode, latents), decode(latents)
            # The same kernels on the same inputs; 1e-5 leaves room for cuDNN choosing another algorithm.
            assert (got - expected).abs().max().item() <= 1e-5
        assert run.captures == 2

    def test_a_stage_that_cannot_be_captured_runs_eagerly_with_one_warning(self):
        run = CapturedCalls()

        def reads_a_value(x):  # .item() synchronises: not allowed while a stream is capturing
            return x * x.sum().item()

        x = torch.arange(4.0, device="cuda")
        with pytest.warns(UserWarning, match="reads_a_value: not captured"):
            first = run("reads_a_value", reads_a_value, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = run("reads_a_value", reads_a_value, 2 * x)
        assert torch.equal(first, x * 6) and torch.equal(second, 2 * x * 12) and run.captures == 0

    def test_a_capture_out_of_memory_is_raised_and_a_later_call_captures(self):
        """Out of memory while capturing is the device's state, not the function's: the call fails (the pipeline
        says it as OutOfDeviceMemory) and the next one captures, where a stage kept eager would stay slow."""
        run, failed = CapturedCalls(), []

        def squares(x):
            if torch.cuda.is_current_stream_capturing() and not failed:
                failed.append(True)
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return x * x

        x = torch.arange(4.0, device="cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "not captured" warning
            with pytest.raises(torch.OutOfMemoryError, match="simulated"):
                run("squares", squares, x)
            assert torch.equal(run("squares", squares, x), x * x) and run.captures == 1

    def test_an_edit_with_graphed_stages_matches_one_without(self, tiny_models):
        image = smooth_image(64, 96, seed=6)
        config = EditConfig(steps=2, sam=SamConfig.for_random_weights())
        graphed = ZonePipeline(copy.deepcopy(tiny_models), device="cuda", dtype="fp32")
        plain = ZonePipeline(copy.deepcopy(tiny_models), device="cuda", dtype="fp32", cuda_graphs=False)
        assert plain.run is eager
        for seed in (1, 2):  # the second edit replays every stage's graph
            got = graphed.edit(image, "make the house golden", config.replace(seed=seed))
            expected = plain.edit(image, "make the house golden", config.replace(seed=seed))
            # The same kernels replayed (the plain pipeline's denoising steps eager: within 1e-5 of a replay,
            # tested in test_dual_step); 1 level leaves room for cuDNN choosing other algorithms at capture,
            # and M_b may differ where a value sits on a threshold.
            assert np.abs(got.styled.astype(int) - expected.styled).max() <= 1
            union = (got.mask_b | expected.mask_b).sum()
            assert (got.mask_b & expected.mask_b).sum() >= 0.95 * union
        assert graphed.run.captures == 4  # text (with "" the same shape), masked text, VAE encode, decode


def test_cuda_graphs_false_turns_them_off_even_on_cuda():
    """cuda_graphs=False runs a CUDA pipeline's stages eagerly (a capture that misbehaves, a profiler that needs
    the kernels): it must win over the CUDA default, which None keeps."""
    from zone_engine.backends import uses_cuda_graphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_cuda_graphs(cuda, None) and not uses_cuda_graphs(cpu, None)
    assert not uses_cuda_graphs(cuda, False) and not uses_cuda_graphs(cpu, False)
    assert uses_cuda_graphs(cuda, True)


def test_eager_calls_the_stage_with_every_input():
    """The plain path every stage's capture is compared with: all inputs reach it (today's stages take one)."""
    a, b = torch.arange(3.0), torch.full((3,), 10.0)
    assert torch.equal(eager("sum", torch.add, a, b), a + b)
