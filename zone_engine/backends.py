"""The one place that decides device, dtype and which implementation runs each heavy stage.

Stages never test `torch.cuda.is_available()` themselves; they receive what this module built.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .config import (
    DENOISERS,
    SamConfig,
    check_backend_options,
    check_precision,
    device_kind,
    lowered_name,
    option,
)
from .denoise import Denoiser, SequentialDenoiser
from .dual_step import FusedDualDenoiser
from .errors import ConfigError, DeviceError, warn_caller
from .localize import Accumulate, Binarize, accumulate_attention_probabilities, binarize_reference
from .models import NormScope, ZoneModels, check_compile_cache_writable, check_triton_cache_writable, pytorch_norms
from .paths import expanded
from .refine import Segmenter

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without CUDA is a clear DeviceError."""
    if isinstance(name, torch.device):
        name = str(name)
    if device_kind(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name.strip().lower())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{option('device', str(device))} was asked for but this machine has no CUDA GPU: use "
                              f"{option('device', 'cpu')}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def current_device(device: torch.device) -> contextlib.AbstractContextManager:
    """`device` made CUDA's current device for a block: streams, events, CUDA graphs and Triton launch on the
    current device, so work on cuda:1 would otherwise be timed or captured on cuda:0. Nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 by default (the reference precision); fp16/bf16 only on CUDA."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype.strip().lower() not in DTYPES:
            raise DeviceError(f"unknown dtype {dtype!r}: use fp32, fp16 or bf16")
        dtype = DTYPES[dtype.strip().lower()]
    if dtype not in DTYPES.values():
        raise DeviceError(f"dtype {dtype} is not supported: use fp32, fp16 or bf16")
    check_precision(next(name for name, value in DTYPES.items() if value == dtype), device.type)
    return dtype


def uses_cuda_graphs(device: torch.device, cuda_graphs: bool | None) -> bool:
    """The `cuda_graphs` option resolved: None means on for a CUDA device (denoiser steps, text encoder, VAE)."""
    return device.type == "cuda" if cuda_graphs is None else cuda_graphs


def captures_stages(device: torch.device, cuda_graphs: object, denoiser: object) -> bool:
    """Whether a pipeline replays its steps, text encoder and VAE from CUDA graphs: where `cuda_graphs` resolves
    on, but for the plain reference (eager) throughout; auto's kernel 3 rests on it (make_group_norms)."""
    return bool(uses_cuda_graphs(device, cuda_graphs)) and lowered_name(denoiser) != "eager"


def make_denoiser(
    models: ZoneModels, kind: str | Denoiser, device: torch.device, engines: Path | None = None,
    cuda_graphs: bool | None = None, norms: NormScope = pytorch_norms,
) -> Denoiser:
    """eager: the sequential reference; fused: one dual step of tensor ops; compile: fused + torch.compile;
    tensorrt: the exported dual step run by TensorRT (`engines`: a `zone export unet` folder).
    `cuda_graphs` (fused, compile, tensorrt): replay each step from a CUDA graph; None = on for CUDA.
    `norms` (fused, compile): how the UNets' GroupNorms run (`make_group_norms`).
    A `Denoiser` instance is used as it is: pipelines over the same models can share one (its
    compilation, CUDA graphs and engines are built once). The options are checked (`check_backends`) by
    the pipeline before it calls this."""
    if not isinstance(kind, str):
        if engines is not None or cuda_graphs is not None or norms is not pytorch_norms:
            raise ConfigError("engines, cuda_graphs and norms configure a denoiser named by its backend; a "
                              "Denoiser instance comes configured: pass none of them with it")
        if not callable(kind):
            raise ConfigError(f"denoiser must be a backend name ({', '.join(DENOISERS)}) or a Denoiser, got "
                              f"{type(kind).__name__}")
        return kind
    graphs = uses_cuda_graphs(device, cuda_graphs)
    if kind == "eager":
        return SequentialDenoiser(models.ip2p_unet, models.mb_unet, models.scheduler_config)
    if kind in ("fused", "compile"):
        return FusedDualDenoiser(models.ip2p_unet, models.mb_unet, models.scheduler_config, compile=kind == "compile",
                                 cuda_graphs=graphs, norms=norms)
    from .tensorrt_denoiser import TensorRTDenoiser  # the one name left, checked above

    return TensorRTDenoiser.from_export(Path(engines), models.scheduler_config, device=device, cuda_graph=graphs)


def configure_attention(models: ZoneModels, kind: str, device: torch.device) -> None:
    """sdpa: PyTorch's scaled_dot_product_attention (diffusers' default processor); xformers: its
    memory-efficient kernels in both UNets and the VAE (CUDA only). The few cross-attention layers
    that localization records keep their recording SDPA processor while denoising either way."""
    check_backend_options(device.type, attention=kind)
    if kind == "sdpa":
        return
    for module in (models.ip2p_unet, models.mb_unet, models.vae):
        module.enable_xformers_memory_efficient_attention()


def check_backends(device: torch.device, **options: object) -> None:
    """`config.check_backend_options` on the resolved device, and the `--sam-onnx` and `--engines` folders
    checked to be exports (a wrong folder is said now, not after the weights moved, nor as TensorRT missing), and
    for compile the folder PyTorch writes its kernels in."""
    check_backend_options(device.type, **options)
    if lowered_name(options.get("denoiser")) == "compile":
        check_compile_cache_writable()
    if triton_compiles_kernels(device, **options):
        check_triton_cache_writable()
    if options.get("segmenter") == "onnx":
        check_onnx_segmenter(options.get("sam_onnx"))
    if options.get("denoiser") == "tensorrt":
        from zone_export.unet import read_manifest

        read_manifest(options["engines"])


def triton_compiles_kernels(device: torch.device, kernels: object = "auto", group_norm: object = "auto",
                            denoiser: object = "fused", cuda_graphs: object = None, **_others: object) -> bool:
    """Whether a pipeline of these options launches compiled Triton kernels (which Triton writes to its cache
    folder): on CUDA, where Triton runs, with the localization kernels or kernel 3's GroupNorm chosen (as
    make_localization_kernels and make_group_norms choose them)."""
    if device.type != "cuda":
        return False
    norms = lowered_name(group_norm)
    norm_kernel = norms == "triton" or (norms == "auto" and captures_stages(device, cuda_graphs, denoiser))
    if lowered_name(kernels) == "torch" and not norm_kernel:
        return False
    from zone_kernels.attn_accumulate import runs_on  # the rule every kernel shares (kernels/runtime.py)

    return runs_on(device)


def check_onnx_segmenter(sam_onnx: str | Path | None) -> None:
    """ConfigError / CheckpointError unless `sam_onnx` is a whole `zone export sam` folder: its manifest's values,
    every file it lists and their checksums (before any weights load, and before a server opens its port)."""
    check_backend_options("auto", segmenter="onnx", sam_onnx=sam_onnx)
    from .sam_onnx import read_manifest

    read_manifest(expanded(sam_onnx, ConfigError))


def make_segmenter(
    models: ZoneModels, config: SamConfig, kind: str, device: torch.device, sam_onnx: Path | None = None,
    sam_dtype: torch.dtype = torch.float32,
) -> Segmenter:
    """torch: segment-anything's generator on the PyTorch SAM (its image encoder in `sam_dtype`); onnx:
    the same generator on an exported SAM (`sam_onnx`: a `zone export sam` folder) run by ONNX Runtime
    (TensorRT EP > CUDA EP > CPU EP). Both search for M_b's segment on their device (sam_torch.py). The
    pipeline checked the options (a SAM for torch, an export folder for onnx) when it was made."""
    if kind == "torch":
        from .sam_torch import TorchSamSegmenter

        return TorchSamSegmenter(models.sam, config, sam_dtype)
    from .sam_onnx import OnnxSamSegmenter

    if device.type != "cuda":
        return OnnxSamSegmenter(Path(sam_onnx), config, providers=["CPUExecutionProvider"])
    index = torch.cuda.current_device() if device.index is None else device.index
    return OnnxSamSegmenter(Path(sam_onnx), config, device_index=index)


def warn_if_bf16_is_emulated(device: torch.device, dtype: torch.dtype, sam_dtype: torch.dtype) -> None:
    """A warning when bf16 is asked of a GPU without bf16 units (compute capability under 8.0: a T4, a V100):
    PyTorch and Triton emulate it there in fp32 arithmetic, slower than fp16, which such a GPU runs natively."""
    if device.type != "cuda" or torch.bfloat16 not in (dtype, sam_dtype):
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return
    asked = [option(name, "bf16") for name, value in (("dtype", dtype), ("sam_precision", sam_dtype))
             if value == torch.bfloat16]
    warn_caller(f"{' and '.join(asked)} on {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}), "
                "which has no bf16 units: it is emulated, slower than fp16 there; use fp16 instead", UserWarning)


def make_localization_kernels(kind: str, device: torch.device) -> tuple[Accumulate, Binarize]:
    """(accumulate, binarize) for localization: the fused Triton kernels, or the plain-torch reference.

    auto: Triton on CUDA, torch elsewhere. The kernels fall back to torch by themselves where Triton
    cannot run, and ZONE_DISABLE_TRITON=1 switches them off.
    """
    check_backend_options(device.type, kernels=kind)
    if kind == "torch" or (kind == "auto" and device.type != "cuda"):
        return accumulate_attention_probabilities, binarize_reference
    from zone_kernels.attn_accumulate import attn_accumulate_, runs_on
    from zone_kernels.mask_binarize import binarize_mask

    if kind == "triton" and not runs_on(device):  # both kernels share the rule (kernels/runtime.py)
        _say_triton_cannot_run("kernels", device, "the torch reference")
    return attn_accumulate_, binarize_mask  # where Triton cannot run, they run the reference themselves


def _say_triton_cannot_run(option_name: str, device: torch.device, instead: str) -> None:
    """The warning for an option set to triton where Triton cannot run (auto falls back without a word: it
    asked for no kernel, and ZONE_DISABLE_TRITON=1 on CUDA is a choice)."""
    warn_caller(f"{option(option_name, 'triton')} cannot run on {device.type} here (Triton needs CUDA, or "
                f"TRITON_INTERPRET=1 on the CPU, and ZONE_DISABLE_TRITON unset): {instead} runs", UserWarning)


def make_group_norms(kind: str, device: torch.device, denoiser: str | Denoiser,
                     captured: bool) -> tuple[NormScope, NormScope]:
    """(the UNets' while denoising, the VAE's) GroupNorm: PyTorch's, or kernel 3 (kernels/group_norm.py),
    which keeps channels-last activations in their layout where PyTorch's CUDA norm converts them to NCHW.

    auto: the kernel on CUDA where the steps and the VAE are replayed from CUDA graphs (`captured`), except
    where another path owns the norms: the eager denoiser (the plain reference: PyTorch's everywhere), the
    compile backend's UNets (inductor generates its own fused norm), TensorRT's and a Denoiser instance's
    (configured when built). Uncaptured, PyTorch's: the kernel's Triton launches cost the host more than its
    device time saves (H200, 2026-12-04: the channels-last dual step 135.7 ms eager with the kernel against
    59.2 ms with PyTorch's; captured 17.7 against 22.7 ms). triton: the kernel for the VAE
    and a fused or compiled step's UNets, whatever the device (it falls back to PyTorch's, with a warning, where Triton
    cannot run, and ZONE_DISABLE_TRITON=1 switches it off); torch: PyTorch's everywhere.
    """
    check_backend_options(device.type, group_norm=kind)
    if kind == "torch" or (kind == "auto" and (device.type != "cuda" or denoiser == "eager" or not captured)):
        return pytorch_norms, pytorch_norms
    from zone_kernels.group_norm import runs_on, triton_group_norms

    if not runs_on(device):
        if kind == "triton":
            _say_triton_cannot_run("group_norm", device, "PyTorch's GroupNorm")
        return pytorch_norms, pytorch_norms
    unets_own = denoiser == "fused" or (kind == "triton" and denoiser == "compile")
    return (triton_group_norms if unets_own else pytorch_norms), triton_group_norms


def group_norm_names(denoiser: Denoiser, vae: NormScope) -> dict[str, str]:
    """Whose GroupNorms run, by name, for reports: {"unets": ..., "vae": ...}, "kernel 3" or "pytorch" (the
    compile backend's UNets: inductor's, generated from PyTorch's); the UNets' from the denoiser as built (a
    shared instance keeps its own), "the denoiser's own" where it holds none (a TensorRT engine's)."""
    def name(scope: NormScope) -> str:
        return "pytorch" if scope is pytorch_norms else "kernel 3"

    unets = getattr(denoiser, "norms", None)
    return {"unets": "the denoiser's own" if unets is None else name(unets), "vae": name(vae)}
