"""The `tensorrt` denoiser: the fused dual step with both UNets in one TensorRT engine.

Written against the TensorRT 10 Python API (ICudaEngine / IExecutionContext, name-based tensor addresses,
execute_async_v3) and NOT verified on any machine here: TensorRT cannot be installed on our machines.
tests/test_export_unet.py's TensorRT class checks it against PyTorch where TensorRT and a GPU are present.

The loop is `FusedDualDenoiser`'s (dual_step.py) with the UNet call replaced by the engine built from
`zone export unet`'s dual_step.onnx (export/unet.py): per step the engine reads the persistent input
buffers and writes each model's guided noise and the step's attention sum; `zone_engine.solver` does the
scheduler math and the blend in torch, on the same buffers. Every buffer is a CUDA tensor shared with
TensorRT by address (`set_tensor_address`), the engine runs on torch's current stream, and nothing goes
through host memory: the same shapes every step, so a step can be captured in a CUDA graph (`cuda_graph`).

Localization: an eager UNet is recorded by `record_cross_attention`'s processors; an engine cannot be, so
the engine returns each step's attention sum and `__call__` adds it, with its row count from the manifest,
to the `AttentionAccumulator` the pipeline passes every denoiser (the `Denoiser` protocol).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import EditConfig
from .denoise import DenoiseInputs, make_scheduler
from .dual_step import DualState, advance
from .errors import ConfigError, DeviceError, ZoneError
from .localize import AttentionAccumulator
from .solver import SolverSchedule, solver_schedule

INPUTS = ("sample", "timestep", "context", "guidance")
OUTPUTS = ("eps_mb", "eps_ip2p", "attention")
TENSORRT_MISSING = (
    "TensorRT is not installed: install NVIDIA TensorRT 10 or newer for your CUDA version (the "
    "`tensorrt-cu12` / `tensorrt-cu13` wheels, or NVIDIA's tar/deb packages, see "
    "https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html); the `tensorrt` "
    "PyPI package is only a metapackage that fetches those wheels from NVIDIA and fails where they cannot be "
    "downloaded"
)


def import_tensorrt() -> Any:
    """The `tensorrt` module (10 or newer), or a DeviceError that says what to install."""
    try:
        import tensorrt
    except ImportError:
        raise DeviceError(TENSORRT_MISSING) from None
    major = str(getattr(tensorrt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise DeviceError(f"TensorRT {getattr(tensorrt, '__version__', '?')} is too old: zone-engine needs "
                          "TensorRT 10 or newer (strongly typed networks, the name-based tensor API)")
    return tensorrt


def require_tensorrt_runtime(device: torch.device) -> Any:
    """The tensorrt module when it and a CUDA device are there; else one DeviceError naming all that is missing."""
    problems = []
    try:
        trt = import_tensorrt()
    except DeviceError as error:
        trt, problems = None, [str(error)]
    if not torch.cuda.is_available():
        problems.append("this machine has no CUDA GPU (TensorRT engines run on NVIDIA GPUs only)")
    elif device.type != "cuda":
        problems.append(f"the TensorRT denoiser runs on CUDA, not on {device}: use --device cuda")
    if problems:
        raise DeviceError("the tensorrt denoiser cannot run: " + "; ".join(problems))
    return trt


class TensorRTDenoiser:
    """The `Denoiser` on a TensorRT engine of the dual step (written for TensorRT 10; not verified here).

    `engine_path`: an engine built from dual_step.onnx (export/engine.py); `graph`: that graph's manifest
    entry (image sizes, attention rows per step); `scheduler_config`: IP2P's. `cuda_graph`: capture one step
    and replay it (the first step runs eagerly; it also warms the engine up). Raises DeviceError without
    TensorRT or CUDA.
    """

    def __init__(self, engine_path: Path, graph: dict[str, Any], scheduler_config: dict,
                 device: str | torch.device = "cuda", cuda_graph: bool = False) -> None:
        device = torch.device(device)
        trt = require_tensorrt_runtime(device)
        if device.type == "cuda" and device.index is None:  # tensors report their index: compare like with like
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.trt, self.graph, self.scheduler_config, self.cuda_graph = trt, graph, scheduler_config, cuda_graph
        self.rows_per_step = int(graph["attention"]["rows_per_step"])
        self.image_sizes = {bound: tuple(size) for bound, size in graph["image_sizes"].items()}
        self._schedules: dict[int, SolverSchedule] = {}
        self._buffers: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

        self.logger = trt.Logger(trt.Logger.WARNING)  # TensorRT needs the logger and runtime to outlive the engine
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            # TensorRT's own stream: on the default one (torch's current outside a capture) TensorRT synchronises
            # the whole device around each enqueue (its execute_async_v3 documentation).
            self.stream = torch.cuda.Stream(self.device)
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise DeviceError(f"TensorRT cannot load {engine_path}: built by another TensorRT version or for "
                                  "another GPU; rebuild it with `zone build-engine FOLDER`")
            self.context = self.engine.create_execution_context()
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != set(INPUTS) | set(OUTPUTS):
            raise ZoneError(f"{engine_path} is not a dual-step engine: tensors {sorted(names)}")
        for name in names:
            if self.engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise ZoneError(f"{engine_path}: {name} is {self.engine.get_tensor_dtype(name)}, expected float32")

    @classmethod
    def from_export(cls, folder: Path, scheduler_config: dict, *, device: str | torch.device = "cuda",
                    cache_root: Path | None = None, cuda_graph: bool = False) -> TensorRTDenoiser:
        """The denoiser for a `zone export unet` folder; builds the engine first when the cache has none that fits."""
        require_tensorrt_runtime(torch.device(device))
        from zone_export.engine import ensure_engine

        path, graph, _ = ensure_engine(folder, "dual_step", cache_root, device=torch.device(device))
        return cls(path, graph, scheduler_config, device, cuda_graph)

    def schedule(self, steps: int) -> SolverSchedule:
        if steps not in self._schedules:
            self._schedules[steps] = solver_schedule(make_scheduler(self.scheduler_config), steps).to(self.device)
        return self._schedules[steps]

    def buffers(self, latent: tuple[int, int], context_dim: int) -> dict[str, torch.Tensor]:
        """The engine's persistent I/O tensors for one latent size, bound to the execution context."""
        image = (latent[0] * 8, latent[1] * 8)
        low, high = self.image_sizes["min"], self.image_sizes["max"]
        if not all(lo <= s <= hi for lo, s, hi in zip(low, image, high, strict=True)):
            raise ConfigError(
                f"the TensorRT engine serves images from {low[0]}x{low[1]} to {high[0]}x{high[1]}, not "
                f"{image[0]}x{image[1]}: re-export with `zone export unet --dynamic-shapes MIN:OPT:MAX` covering it"
            )
        if latent not in self._buffers:
            h, w = latent
            shapes = {"sample": (6, 8, h, w), "timestep": (1,), "context": (3, 77, context_dim), "guidance": (2,),
                      "eps_mb": (1, 4, h, w), "eps_ip2p": (1, 4, h, w), "attention": (h * w // 16, 77)}
            self._buffers[latent] = {name: torch.empty(shape, dtype=torch.float32, device=self.device)
                                     for name, shape in shapes.items()}
        buffers = self._buffers[latent]
        for name in INPUTS:
            if not self.context.set_input_shape(name, tuple(buffers[name].shape)):
                raise ZoneError(f"the dual-step engine refuses {name} of shape {tuple(buffers[name].shape)}")
        for name in OUTPUTS:  # the engine writes what its graph says: never past the end of a buffer
            if (shape := tuple(self.context.get_tensor_shape(name))) != tuple(buffers[name].shape):
                raise ZoneError(f"the dual-step engine writes {name} as {shape}, not {tuple(buffers[name].shape)}: "
                                "re-export it with this version (`zone export unet`) and rebuild (`zone build-engine`)")
        for name, tensor in buffers.items():
            if not self.context.set_tensor_address(name, tensor.data_ptr()):
                raise ZoneError(f"TensorRT refused the address of the dual-step engine's {name}")
        return buffers

    def step(self, schedule: SolverSchedule, state: DualState, buffers: dict[str, torch.Tensor],
             beta: torch.Tensor, attention_total: torch.Tensor) -> None:
        """One dual step in place: the engine, both solver updates, the blend, the attention sum."""
        buffers["sample"][:3, :4].copy_(state.z_mb.expand(3, -1, -1, -1))
        buffers["sample"][3:, :4].copy_(state.z_ip.expand(3, -1, -1, -1))
        buffers["timestep"].copy_(schedule.timesteps.index_select(0, state.step))
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the inputs just copied (in a capture: the fork the graph records)
        try:
            enqueued = self.context.execute_async_v3(self.stream.cuda_stream)
        finally:  # joined even when it fails: a capture left forked would end in a CUDA error, not this one
            caller.wait_stream(self.stream)  # the outputs, read below (in a capture: the join)
        if not enqueued:
            raise ZoneError("TensorRT could not run the dual-step engine (see TensorRT's messages above)")
        advance(schedule, state, buffers["eps_mb"], buffers["eps_ip2p"], beta)
        attention_total.add_(buffers["attention"])

    @torch.inference_mode()
    def __call__(self, inputs: DenoiseInputs, config: EditConfig, beta: float, attention: AttentionAccumulator,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run the whole dual loop; returns z_ip (1, 4, h, w). `attention` receives every step's attention sum."""
        if inputs.noise.device != self.device:
            raise DeviceError(f"the TensorRT engine runs on {self.device}; the inputs are on {inputs.noise.device}")
        with torch.cuda.device(self.device):  # the engine's context, stream and captured graph are that GPU's
            return self._loop(inputs, config, beta, attention, on_step)

    def _loop(self, inputs: DenoiseInputs, config: EditConfig, beta: float, attention: AttentionAccumulator,
              on_step: Callable[[int], None] | None) -> torch.Tensor:
        schedule = self.schedule(config.steps)
        buffers = self.buffers(tuple(inputs.noise.shape[-2:]), inputs.context.shape[-1])
        buffers["context"].copy_(inputs.context)
        buffers["sample"][:, 4:].copy_(inputs.image_latents.repeat(2, 1, 1, 1))
        buffers["guidance"].copy_(torch.tensor([config.text_guidance, config.image_guidance]))
        state = DualState.start(inputs.noise)
        beta_tensor = torch.tensor([beta], device=self.device)
        total = torch.zeros_like(buffers["attention"])  # this edit's sum; the engine's buffer is per step

        graph = None
        for index in range(schedule.steps):
            if graph is not None:
                graph.replay()
            else:
                self.step(schedule, state, buffers, beta_tensor, total)
                if self.cuda_graph and index + 1 < schedule.steps:
                    # Capture records the next step without running it; replays then read state.step on
                    # the device, so one graph serves every later step.
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        self.step(schedule, state, buffers, beta_tensor, total)
            if on_step is not None:
                on_step(index)
        attention.add_sum(total, self.rows_per_step * schedule.steps)
        return state.z_ip.to(inputs.noise.dtype)
