"""The fused dual step (issue: batched dual-UNet step) against the sequential reference, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import smooth_image, spy_calls
from diffusers import DPMSolverMultistepScheduler

from zone_engine import Action, ZonePipeline
from zone_engine.backends import make_localization_kernels
from zone_engine.config import MAX_STEPS, EditConfig, SamConfig
from zone_engine.denoise import (
    DenoiseInputs,
    SequentialDenoiser,
    blend_latents,
    guided_noise,
    initial_noise,
    make_scheduler,
)
from zone_engine.dual_step import DualState, DualUNet, FusedDualDenoiser, advance, dual_step
from zone_engine.errors import ConfigError
from zone_engine.localize import AttentionAccumulator
from zone_engine.pipeline import encode_image_latents
from zone_engine.solver import data_prediction, solver_schedule, solver_update
from zone_engine.text import encode_instruction

SCALED_LINEAR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # IP2P's schedule


@pytest.mark.parametrize("config", [dict(DPMSolverMultistepScheduler().config), SCALED_LINEAR])
@pytest.mark.parametrize("steps", [1, 2, 3, 14, 20, 30])
def test_solver_matches_diffusers_scheduler_bit_for_bit(config, steps):
    reference = make_scheduler(config)
    reference.set_timesteps(steps)
    schedule = solver_schedule(make_scheduler(config), steps)
    assert torch.equal(schedule.timesteps, reference.timesteps)
    assert_solver_follows(reference, schedule, seed=steps)


def assert_solver_follows(reference: DPMSolverMultistepScheduler, schedule, seed: int) -> None:
    """The fused solver's latents equal diffusers' step() at every step, on random noise predictions."""
    generator = torch.Generator().manual_seed(seed)
    z = z_reference = torch.randn(1, 4, 6, 5, generator=generator)
    x0_previous = torch.zeros_like(z)
    for i, t in enumerate(reference.timesteps):
        eps = torch.randn(1, 4, 6, 5, generator=generator)
        z_reference = reference.step(eps, t, z_reference, return_dict=False)[0]
        step = torch.tensor([i])
        x0 = data_prediction(schedule, step, z, eps)
        z, x0_previous = solver_update(schedule, step, z, x0, x0_previous), x0
        assert torch.equal(z, z_reference), f"step {i}"


def test_the_most_steps_an_edit_takes_have_a_finite_schedule():
    """At 1000 steps two timesteps rounded to one: a zero step, and NaN latents blamed on the guidance."""
    schedule = solver_schedule(make_scheduler(SCALED_LINEAR), MAX_STEPS)
    assert all(torch.isfinite(value).all() for value in vars(schedule).values() if isinstance(value, torch.Tensor))
    assert len(set(schedule.timesteps.tolist())) == MAX_STEPS
    with pytest.raises(ConfigError, match=f"steps must be between 1 and {MAX_STEPS}"):
        EditConfig(steps=MAX_STEPS + 1)


@pytest.fixture(scope="module")
def denoise_inputs(tiny_models):
    def build(size, seed):
        encoded = encode_instruction(tiny_models.tokenizer, tiny_models.text_encoder, "make the dog a golden statue")
        return DenoiseInputs(
            context=encoded.context,
            image_latents=encode_image_latents(tiny_models.vae, smooth_image(*size, seed=seed), torch.float32),
            noise=initial_noise(seed, (size[0] // 8, size[1] // 8), torch.device("cpu"), torch.float32),
        )

    return build


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_fused_step_equals_sequential_reference(tiny_models, denoise_inputs, action, size):
    config = EditConfig(steps=4)
    inputs = denoise_inputs(size, seed=3)
    beta = config.beta_for(action)
    reference = SequentialDenoiser(tiny_models.ip2p_unet, tiny_models.mb_unet, tiny_models.scheduler_config)
    fused = FusedDualDenoiser(tiny_models.ip2p_unet, tiny_models.mb_unet, tiny_models.scheduler_config)
    expected_attention, got_attention = AttentionAccumulator(), AttentionAccumulator()
    expected, got = reference(inputs, config, beta, expected_attention), fused(inputs, config, beta, got_attention)
    # Bit-identical on the CPU: the same float32 operations in the same order (the solver's scalars
    # are computed exactly as diffusers computes them).
    assert torch.equal(got, expected)
    assert torch.equal(got_attention.total, expected_attention.total) and got_attention.rows == expected_attention.rows


def test_whole_edit_is_the_same_with_either_denoiser(tiny_models):
    image = smooth_image(64, 96, seed=4)
    config = EditConfig(steps=3, sam=SamConfig.for_random_weights())
    results = {
        kind: ZonePipeline(tiny_models, device="cpu", denoiser=kind).edit(image, "add a hat", config)
        for kind in ("eager", "fused")
    }
    assert np.array_equal(results["eager"].mask_b, results["fused"].mask_b)
    # uint8 rounding of values that differ in the last float bit can move a pixel by one level.
    assert np.abs(results["eager"].styled.astype(int) - results["fused"].styled.astype(int)).max() <= 1
    assert np.abs(results["eager"].image.astype(int) - results["fused"].image.astype(int)).max() <= 1


def lean_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """The tiny UNet with one layer a block and cross-attention only where ZONE reads it (the latent halved twice):
    a third of the modules for dynamo to trace (35 s of the suite's slowest test before)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config({
            **unet.config, "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")}).eval()


def test_a_compiled_step_is_traced_once_for_every_step_of_every_edit(tiny_models, denoise_inputs):
    """torch.compile reads no Python number that changes from step to step (the attention's row count
    is a device tensor) and the same code from the first call on (the sums are allocated before it):
    one trace for two edits of 3 steps. Until this held, every step of an edit recompiled."""
    from zone_engine.dual_step import dual_step

    traces = []

    def backend(graph_module, example_inputs):
        traces.append(graph_module)
        return graph_module  # runs the traced graph as it is: seconds, where inductor takes minutes

    models, config, inputs = tiny_models, EditConfig(steps=3), denoise_inputs((64, 96), seed=5)
    unets = lean_unet(models.ip2p_unet), lean_unet(models.mb_unet)
    compiled = FusedDualDenoiser(*unets, models.scheduler_config)
    compiled.step_fn = torch.compile(dual_step, backend=backend, dynamic=False)
    plain = FusedDualDenoiser(*unets, models.scheduler_config)
    expected_attention = AttentionAccumulator()
    expected = plain(inputs, config, 0.01, expected_attention)
    for _ in range(2):
        attention = AttentionAccumulator()
        latents = compiled(inputs, config, 0.01, attention)
        assert torch.allclose(latents, expected, rtol=0, atol=1e-6)
        assert attention.rows == expected_attention.rows == 3 * 3 * 2 * 2  # steps x layers x kept rows x heads
        assert torch.allclose(attention.average(), expected_attention.average(), rtol=0, atol=1e-7)
    assert len(traces) == 1


def test_compile_backend_raises_dynamos_recompile_limit_but_never_lowers_it(tiny_models):
    from zone_engine.dual_step import COMPILE_RECOMPILE_LIMIT

    config = torch._dynamo.config
    # config.patch restores the value after (pytest's monkeypatch would delete the entry, hiding it)
    with config.patch(recompile_limit=8):  # dynamo's default
        ZonePipeline(tiny_models, device="cpu", denoiser="fused")
        assert config.recompile_limit == 8  # only the compile backend touches it
        ZonePipeline(tiny_models, device="cpu", denoiser="compile")
        assert config.recompile_limit == COMPILE_RECOMPILE_LIMIT
    with config.patch(recompile_limit=1000):
        ZonePipeline(tiny_models, device="cpu", denoiser="compile")
        assert config.recompile_limit == 1000


def test_cuda_graphs_are_refused_off_cuda_and_by_the_eager_reference(tiny_models):
    from zone_engine.errors import DeviceError

    with pytest.raises(DeviceError, match="CUDA graphs need a CUDA device"):
        ZonePipeline(tiny_models, device="cpu", denoiser="fused", cuda_graphs=True)
    assert ZonePipeline(tiny_models, device="cpu", denoiser="fused").denoiser.cuda_graphs is False


def test_pipelines_can_share_one_denoiser_instance_but_not_reconfigure_it(tiny_models):
    first = ZonePipeline(tiny_models, device="cpu", denoiser="fused")
    second = ZonePipeline(tiny_models, device="cpu", denoiser=first.denoiser)
    assert second.denoiser is first.denoiser
    image, config = smooth_image(64, 64, seed=4), EditConfig(steps=2, sam=SamConfig.for_random_weights())
    assert np.array_equal(second.edit(image, "add a hat", config).image, first.edit(image, "add a hat", config).image)
    with pytest.raises(ConfigError, match="comes configured"):
        ZonePipeline(tiny_models, device="cpu", denoiser=first.denoiser, cuda_graphs=False)
    with pytest.raises(ConfigError, match="a backend name .* or a Denoiser, got int"):
        ZonePipeline(tiny_models, device="cpu", denoiser=3)


def test_xformers_is_refused_with_a_reason_where_it_cannot_run(tiny_models):
    from zone_engine.errors import DeviceError

    with pytest.raises(DeviceError, match="needs a CUDA device"):
        ZonePipeline(tiny_models, device="cpu", attention="xformers")
    with pytest.raises(ConfigError, match="unknown attention backend"):
        ZonePipeline(tiny_models, device="cpu", attention="flash")


def _cuda_copy(tiny_models):
    import copy

    return copy.deepcopy(tiny_models)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs, fp16/bf16, xformers, compiled kernels: CUDA")
@pytest.mark.usefixtures("skip_if_compiled_elsewhere")
class TestOnGPU:
    """The denoiser on CUDA, with the Triton kernels compiled: reruns itself without the interpreter."""

    def test_cuda_graph_replay_equals_eager_and_captures_once_per_shape(self, tiny_models):
        import copy

        device = torch.device("cuda")
        ip2p, mb = copy.deepcopy(tiny_models.ip2p_unet).to(device), copy.deepcopy(tiny_models.mb_unet).to(device)
        eager = FusedDualDenoiser(ip2p, mb, tiny_models.scheduler_config)
        graphed = FusedDualDenoiser(ip2p, mb, tiny_models.scheduler_config, cuda_graphs=True)
        config = EditConfig(steps=4)
        accumulate, _ = make_localization_kernels("auto", device)  # the compiled Triton kernel, as in an edit

        def inputs(seed, size=(64, 96)):
            encoded = encode_instruction(tiny_models.tokenizer, tiny_models.text_encoder, f"add hat number {seed}")
            return DenoiseInputs(
                context=encoded.context.to(device),
                image_latents=encode_image_latents(tiny_models.vae, smooth_image(*size, seed=seed), torch.float32)
                .to(device),
                noise=initial_noise(seed, (size[0] // 8, size[1] // 8), device, torch.float32),
            )

        # Two shapes (one edit, a batch of two), each run twice with new inputs, interleaved: 2 captures, not 4.
        for batch in ([inputs(1)], [inputs(2), inputs(3)], [inputs(4)], [inputs(5), inputs(6)]):
            betas = [0.01, 0.2][: len(batch)]
            expected_attention = [AttentionAccumulator(accumulate) for _ in batch]
            got_attention = [AttentionAccumulator(accumulate) for _ in batch]
            expected = eager.denoise_batch(batch, config, betas, expected_attention)
            got = graphed.denoise_batch(batch, config, betas, got_attention)
            # The same kernels on the same inputs; 1e-5 leaves room for cuDNN picking another algorithm at capture.
            for g, e in zip(got, expected, strict=True):
                assert (g - e).abs().max().item() <= 1e-5
            for g, e in zip(got_attention, expected_attention, strict=True):
                assert g.rows == e.rows and torch.allclose(g.total, e.total, rtol=0, atol=1e-5)
        assert graphed.captures == 2
        # Both shapes' graphs allocate from one pool (replayed interleaved above, each equal to eager).
        assert len({captured.graph.pool() for captured in graphed._graphs.values()}) == 1

    def test_xformers_attention_matches_sdpa(self, tiny_models):
        pytest.importorskip("xformers", reason="xformers is not installed")
        import copy

        image = smooth_image(64, 96, seed=9)
        config = EditConfig(steps=3, sam=SamConfig.for_random_weights())
        results = {
            kind: ZonePipeline(copy.deepcopy(tiny_models), device="cuda", denoiser="fused", attention=kind).edit(
                image, "add a hat", config)
            for kind in ("sdpa", "xformers")
        }
        # Different attention kernels, fp32: the styled images agree to a few uint8 levels.
        difference = np.abs(results["sdpa"].styled.astype(int) - results["xformers"].styled.astype(int))
        assert difference.max() <= 3

    def test_channels_last_captured_edit_matches_contiguous(self, tiny_models):
        """NHWC weights under the captured fused step, in fp16: the same edit up to cuDNN choosing other
        convolution algorithms (fp16 sums in another order). Bounds to be confirmed on the first GPU run."""
        image = smooth_image(64, 96, seed=12)
        config = EditConfig(steps=3, sam=SamConfig.for_random_weights())
        pipes = [ZonePipeline(_cuda_copy(tiny_models), device="cuda", dtype="fp16", denoiser="fused",
                              channels_last=layout) for layout in (False, True)]
        for pipe, layout in zip(pipes, (False, True), strict=True):  # else the test compares a layout with itself
            for unet in (pipe.models.ip2p_unet, pipe.models.mb_unet):
                assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == layout
        results = [pipe.edit(image, "add a hat", config) for pipe in pipes]
        assert np.abs(results[1].styled.astype(int) - results[0].styled.astype(int)).max() <= 4
        overlap = (results[0].mask_b & results[1].mask_b).sum() / max((results[0].mask_b | results[1].mask_b).sum(), 1)
        assert overlap >= 0.9

    def test_group_norm_kernel_captured_edit_matches_pytorchs_norm(self, tiny_models, monkeypatch):
        """Kernel 3 on the channels-last UNets and the VAE, captured, in fp16: PyTorch's norm up to fp32
        summation order and one fp16 rounding per norm. Bounds as for the layout test above."""
        image = smooth_image(64, 96, seed=12)
        config = EditConfig(steps=3, sam=SamConfig.for_random_weights())
        import zone_kernels.group_norm as norm_module

        launches = spy_calls(monkeypatch, norm_module, "_launch")
        results = []
        for kind in ("torch", "triton"):
            pipe = ZonePipeline(_cuda_copy(tiny_models), device="cuda", dtype="fp16", denoiser="fused", group_norm=kind)
            name = "kernel 3" if kind == "triton" else "pytorch"
            assert pipe.group_norms == {"unets": name, "vae": name}
            results.append(pipe.edit(image, "add a hat", config))
            assert bool(launches) == (kind == "triton")  # kernel 3 ran (at capture), else the test compares torch
        assert np.abs(results[1].styled.astype(int) - results[0].styled.astype(int)).max() <= 4
        overlap = (results[0].mask_b & results[1].mask_b).sum() / max((results[0].mask_b | results[1].mask_b).sum(), 1)
        assert overlap >= 0.9

    @pytest.mark.parametrize("dtype, tolerance", [("fp16", 2e-2), ("bf16", 8e-2)])
    def test_half_precision_denoising_stays_close_to_fp32(self, tiny_models, dtype, tolerance):
        """Final latents of the fused loop in fp16/bf16 against fp32, relative to their magnitude.

        Tolerance: fp16 keeps 11 significant bits (~5e-4 per rounding) and bf16 8 (~4e-3); 20 guided
        steps of two UNets compound them. Bounds to be confirmed on the first GPU run.
        """
        config = EditConfig(steps=20, sam=SamConfig.for_random_weights())
        image = smooth_image(64, 96, seed=11)
        latents = {}
        for precision in ("fp32", dtype):
            pipe = ZonePipeline(_cuda_copy(tiny_models), device="cuda", dtype=precision, denoiser="fused")
            prepared = pipe.prepare(image, "add a hat", config)
            (latents[precision],) = pipe.denoise([prepared])
            assert torch.isfinite(latents[precision]).all()
        reference = latents["fp32"].float()
        assert (latents[dtype].float() - reference).abs().max() <= tolerance * reference.abs().max()

    def test_compiled_step_is_compiled_and_captured_once_for_many_edits(self, tiny_models):
        from torch._dynamo.utils import counters

        pipe = ZonePipeline(_cuda_copy(tiny_models), device="cuda", denoiser="compile",
                            default_config=EditConfig(steps=3, sam=SamConfig.for_random_weights()))
        image = smooth_image(64, 96, seed=12)
        pipe.edit(image, "add a hat")
        compiled_frames, captures = counters["frames"]["ok"], pipe.denoiser.captures
        for seed in (1, 2, 3):
            pipe.edit(image, "add a scarf", pipe.default_config.replace(seed=seed))
        assert counters["frames"]["ok"] == compiled_frames  # no recompilation after the first edit
        assert pipe.denoiser.captures == captures == 1


def test_the_blend_and_the_guidance_by_hand():
    """ZONE.md's two formulas on numbers worked out by hand (the fused and sequential steps share them, so
    comparing the two could not catch a slip in either)."""
    z_ip, z_mb = torch.full((2, 4, 1, 1), 1.0), torch.full((2, 4, 1, 1), 3.0)
    blended = blend_latents(z_ip, z_mb, torch.tensor([0.2, 0.01]).view(-1, 1, 1, 1))
    assert torch.allclose(blended[0], torch.full((4, 1, 1), 1.6 / 1.2)) and torch.allclose(
        blended[1], torch.full((4, 1, 1), 1.03 / 1.01))
    assert torch.allclose(blend_latents(z_ip, z_mb, 0.2), torch.full_like(z_ip, 1.6 / 1.2))
    # Rows (c_T, image), (empty, image), (empty, zero image): eps_u + s_T (eps_T - eps_I) + s_I (eps_I - eps_u).
    eps = torch.tensor([3.0, 2.0, 1.0]).view(3, 1, 1, 1)
    assert guided_noise(eps, 7.5, 1.5).item() == 1.0 + 7.5 * (3.0 - 2.0) + 1.5 * (2.0 - 1.0)
    # Unequal differences, so swapping s_T and s_I shows (1 + 7.5 * 2 + 1.5 * 1 = 17.5, not 11.5); two edits'
    # groups of 3 rows in turn: the second is (8, 4, 2) -> 2 + 7.5 * 4 + 1.5 * 2 = 35.
    eps = torch.tensor([4.0, 2.0, 1.0, 8.0, 4.0, 2.0]).view(6, 1, 1, 1)
    assert guided_noise(eps, 7.5, 1.5).view(-1).tolist() == [17.5, 35.0]


def test_the_fused_solver_refuses_a_scheduler_it_does_not_implement():
    """The fused denoisers' solver is DPM-Solver++ 2M (midpoint, epsilon) without thresholding: a checkpoint
    whose scheduler config asks for more is refused, not solved as if it had asked for none."""
    assert solver_schedule(make_scheduler(SCALED_LINEAR), 4).steps == 4
    for changes in ({"thresholding": True}, {"solver_type": "heun"}, {"prediction_type": "v_prediction"}):
        with pytest.raises(ValueError, match=r"DPM-Solver\+\+ 2M"):
            solver_schedule(make_scheduler({**SCALED_LINEAR, **changes}), 4)


@pytest.mark.parametrize("last_step", ["euler_at_final", "final_sigma_zero"])
def test_the_fused_solver_takes_a_first_order_last_step_where_the_scheduler_does(last_step):
    """A scheduler config with euler_at_final (make_scheduler reads it from the checkpoint's config), or a
    scheduler ending at sigma 0 (newer diffusers' default), ends on a first-order step even at 20 steps, as
    diffusers' step() does: the fused solver follows it bit for bit (second order there, it ran off to inf)."""
    def scheduler():
        if last_step == "euler_at_final":
            return make_scheduler({**SCALED_LINEAR, "euler_at_final": True})
        return DPMSolverMultistepScheduler.from_config(SCALED_LINEAR, final_sigmas_type="zero")

    reference = scheduler()
    reference.set_timesteps(20)
    schedule = solver_schedule(scheduler(), 20)
    assert schedule.correction_scale[-1].item() == 0 and schedule.correction_scale[-2].item() != 0
    assert_solver_follows(reference, schedule, seed=0)


def test_a_half_precision_step_guides_and_solves_in_float32():
    """fp16 UNets (as on a GPU): the trajectories and history stay float32 buffers and the guidance is taken
    of the noise cast to float32, as the eager denoiser does; fp16 guidance (7.5x differences) would round."""
    generator = torch.Generator().manual_seed(0)
    noise, eps = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator).half()
    unet = DualUNet(lambda *args, **kwargs: (eps[:3],), lambda *args, **kwargs: (eps[3:],))
    schedule, beta = solver_schedule(make_scheduler(SCALED_LINEAR), 4), torch.tensor([0.2]).view(-1, 1, 1, 1)
    state, expected = DualState.start(noise.half()), DualState.start(noise.half())
    assert all(buffer.dtype == torch.float32 for buffer in (state.z_mb, state.z_ip, state.x0_mb, state.x0_ip))
    dual_step(unet, schedule, state, torch.zeros(3, 4, 8, 8, dtype=torch.float16), torch.zeros(3, 77, 32),
              torch.tensor([7.5, 1.5]), beta)
    advance(schedule, expected, guided_noise(eps[:3].float(), 7.5, 1.5), guided_noise(eps[3:].float(), 7.5, 1.5), beta)
    assert torch.equal(state.z_ip, expected.z_ip) and torch.equal(state.z_mb, expected.z_mb)


def test_reset_starts_a_fresh_edit_in_buffers_a_previous_one_used():
    """A captured step's buffers are reused edit after edit (load_static): reset_ must clear the history the
    second-order update reads and the step index, not only the trajectories."""
    state = DualState.start(torch.zeros(1, 4, 2, 2))
    for buffer in (state.x0_mb, state.x0_ip):
        buffer.fill_(float("nan"))
    state.step.fill_(5)
    noise = torch.randn(1, 4, 2, 2)
    state.reset_(noise)
    assert torch.equal(state.z_mb, noise) and torch.equal(state.z_ip, noise) and state.step.tolist() == [0]
    assert not state.x0_mb.any() and not state.x0_ip.any()


def test_compiled_or_graphed_denoisers_pad_batches_unless_told_not_to(tiny_models, monkeypatch):
    """Compilation and capture are keyed by shape: either one pads batches to powers of two by default."""
    monkeypatch.setattr(torch, "compile", lambda function, **options: function)  # nothing is run here
    models = tiny_models.ip2p_unet, tiny_models.mb_unet, tiny_models.scheduler_config
    with torch._dynamo.config.patch(recompile_limit=8):  # compile=True raises it: leave the process's as it was
        assert FusedDualDenoiser(*models, compile=True).pad_batches
        assert not FusedDualDenoiser(*models, compile=True, pad_batches=False).pad_batches
    assert FusedDualDenoiser(*models, cuda_graphs=True).pad_batches
    assert not FusedDualDenoiser(*models).pad_batches
