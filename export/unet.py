"""`zone export unet`: the dual-UNet step and IP2P's VAE as ONNX graphs, the input of `zone build-engine`.

One folder holds:
- dual_step.onnx: one ZONE step of both UNets with guidance (ZONE.md section 1) and the attention that
  localization reads (section 3):
    sample (6, 8, h, w) rows [MagicBrush x3, IP2P x3], each row noisy latent ++ image latent
    timestep (1,) (an integer value; float32 so every runtime takes it), context (3, 77, C) [c_T, empty, empty],
    guidance (2,) = (text, image) scales
    -> eps_mb, eps_ip2p (1, 4, h, w): each model's guided noise (`zone_engine.denoise.guided_noise`)
    -> attention (N, 77), N = H/32 * W/32: the sum of softmax(Q K^T) over IP2P's recorded layers and kept rows
       for this step, exactly what `record_cross_attention`'s accumulator adds per step; the manifest records
       how many rows that sum holds (`attention.rows_per_step`), so the mask's average is total / rows.
- vae_encoder.onnx: image (1, 3, H, W) in [-1, 1] -> latent (1, 4, h, w) = latent_dist.mode(), unscaled (the
  image conditioning, as `pipeline.encode_image_latents`).
- vae_decoder.onnx: latent (1, 4, h, w) as the denoising loop returns it -> image (1, 3, H, W), the VAE's raw
  output in about [-1, 1]. The division by `scaling_factor` is inside the graph, in the model precision as
  `pipeline.decode_latents` does it; the caller still maps to [0, 1] and clamps.
- manifest.json: per graph its files' sha256, the weights' checksums, shapes and TensorRT profile, precision,
  opset, the validation report and the versions that wrote it. `export/engine.py` keys its engines on it.

Every input and output is float32 whatever the precision: with --fp16 the casts sit inside the graphs, so
the runtime does not change (and fp32 -> fp16 inside the graph rounds exactly as the PyTorch path's cast).
Each graph is compared with PyTorch on ONNX Runtime (CPU) at every size of its profile before it is kept;
nothing is written to the output folder unless all pass.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zone_engine import __version__
from zone_engine.config import IP2P_ID, LATENT_SCALE, MAGICBRUSH_ID, MAX_WORKING_SIDE, parse_hw
from zone_engine.denoise import guided_noise
from zone_engine.dual_step import DualUNet
from zone_engine.errors import ConfigError, ZoneError
from zone_engine.localize import EMPTY_PROMPT_ROWS, attention_grid, record_cross_attention, recorded_layers
from zone_engine.models import ZoneModels
from zone_engine.paths import (
    MANIFEST_FILE,
    check_output_folder,
    expanded,
    export_kind,
    export_manifest_path,
    file_sha256,
)

from .onnx_graph import (
    check_export_target,
    check_opset,
    compare,
    export_graph,
    install,
    installing,
    log,
    require,
    session,
    staging_folder,
)
from .options import DEFAULT_SIZE, TINY_SEED

DUAL_STEP = "dual_step"
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
GRAPHS = (DUAL_STEP, VAE_ENCODER, VAE_DECODER)  # what `zone export unet` writes, as NAME.onnx
MANIFEST_FORMAT = 1
SIZE_MULTIPLE = 32  # the pipeline pads to multiples of 32 (ZONE.md section 0); attention is read at 1/32
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# Validation, |onnxruntime - torch| <= atol + rtol * max|torch| on every output, against PyTorch in the
# models' own precision (fp32 for `zone export unet`):
# - fp32: both sides compute in fp32 and differ only in fusion and summation order (~1e-6 relative per
#   layer). Guidance then multiplies the branches' differences: eps = -0.5 u + 7.5 t - 6 i at the default
#   scales, up to 14x. The tiny models measure ~1e-5 absolute on guided noise of magnitude ~10 and ~1e-7 on
#   the attention sums; 1e-4 + 1e-4 x max leaves room for SD1.5's depth and other CPUs' kernels.
# - fp16: weights and activations rounded to fp16 (eps 1e-3) through every block, then the same guidance
#   amplification. On the CPU, ONNX Runtime runs most fp16 nodes through inserted fp32 casts, so this checks
#   the graph and its rounded weights, not a GPU's fp16 arithmetic (tests/test_export_unet.py's TensorRT
#   class compares the engine with PyTorch fp16 on the GPU).
TOLERANCES = {"fp32": dict(atol=1e-4, rtol=1e-4), "fp16": dict(atol=2e-2, rtol=2e-2)}
GUIDANCE_FOR_VALIDATION = (7.5, 1.5)  # ZONE's defaults: the amplification the tolerance is sized for


# --------------------------------------------------------------------------------------------------
# Sizes and profiles


Size = tuple[int, int]  # (height, width) of the padded working image, in pixels


def check_size(size: Size, what: str = "size") -> Size:
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ConfigError(
            f"{what} {height}x{width} is not a positive multiple of {SIZE_MULTIPLE} on both sides: the pipeline "
            f"pads images to multiples of {SIZE_MULTIPLE}, so an engine only ever sees such sizes"
        )
    if max(height, width) > MAX_WORKING_SIDE:
        raise ConfigError(f"{what} {height}x{width} is over {MAX_WORKING_SIDE} pixels a side, the engine's largest "
                          "working size (EditConfig.max_side; 512 by default)")
    return height, width


@dataclass(frozen=True)
class ShapeProfile:
    """Image sizes (height, width) in pixels that one export serves: min <= opt <= max on each side.

    A static export has min == opt == max. TensorRT tunes its kernels for `opt`.
    """

    min: Size
    opt: Size
    max: Size

    def __post_init__(self) -> None:
        for what in ("min", "opt", "max"):
            check_size(getattr(self, what), f"{what} size")
        if not all(lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True)):
            raise ConfigError(f"dynamic shapes need min <= opt <= max on each side, got {self.describe()}")

    @classmethod
    def static(cls, height: int, width: int, what: str = "size") -> ShapeProfile:
        size = check_size((height, width), what)
        return cls(size, size, size)

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    def describe(self) -> str:
        return ":".join(f"{h}x{w}" for h, w in (self.min, self.opt, self.max))

    def sizes(self) -> list[Size]:
        """The distinct sizes every export is validated at: opt first, then min and max."""
        return list(dict.fromkeys([self.opt, self.min, self.max]))

    def trace_size(self) -> Size:
        """The size to trace at: `opt`, except that a dynamic side is traced at an odd multiple of 32.

        diffusers' UNet picks its upsampling path from the traced latent size: at a multiple of 8 (image
        multiple of 64) it upsamples by a fixed factor 2, which breaks at latent sizes that are not (the skip
        connection is one pixel smaller); otherwise it upsamples to the skip connection's size, which is right
        for every size. Tracing a dynamic side at an odd multiple of 32 records the path that serves them all.
        """
        return tuple(
            mid if lo == hi else _nearest_odd_multiple(mid, lo, hi)
            for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True)
        )

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def _nearest_odd_multiple(value: int, low: int, high: int) -> int:
    """The odd multiple of 32 in [low, high] closest to `value` (the smaller on ties); low < high."""
    candidates = [v for v in range(low, high + 1, SIZE_MULTIPLE) if (v // SIZE_MULTIPLE) % 2]
    return min(candidates, key=lambda v: (abs(v - value), v))


def parse_size(text: str) -> Size:
    """'512x768' -> (512, 768): HEIGHTxWIDTH in pixels, multiples of 32."""
    return check_size(parse_hw(text), f"size {text.strip()!r}:")


def parse_dynamic_shapes(text: str) -> ShapeProfile:
    """'256x256:512x512:768x768' -> ShapeProfile(min, opt, max); each HEIGHTxWIDTH, multiples of 32."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ConfigError(
            f"--dynamic-shapes {text!r} needs three sizes MIN:OPT:MAX, each HEIGHTxWIDTH in pixels "
            "(multiples of 32), e.g. 256x256:512x512:768x768"
        )
    try:
        return ShapeProfile(*(parse_size(part) for part in parts))
    except ConfigError as error:  # named: "cannot read size '256'" left the option at fault to be guessed
        raise ConfigError(f"--dynamic-shapes {text!r}: {error}") from None


def latent_size(size: Size) -> Size:
    return size[0] // LATENT_SCALE, size[1] // LATENT_SCALE


# --------------------------------------------------------------------------------------------------
# The graphs


class DualStepForExport(nn.Module):
    """One dual-UNet step as a graph: `DualUNet` with the guidance and the recorded cross-attention.

    The UNet call is `zone_engine.dual_step.DualUNet`'s and the recording is `record_cross_attention`'s own
    processor and accumulator, installed for the one forward: the graph's attention is the engine's math,
    not a copy. `latent_size` only picks the recorded layers; they are the same for every multiple of 32
    (`check_recorded_layers`), so one graph serves the whole profile.
    """

    def __init__(self, ip2p_unet: nn.Module, mb_unet: nn.Module, size: Size) -> None:
        super().__init__()
        self.unet = DualUNet(mb_unet, ip2p_unet)
        self.latent_size = latent_size(size)
        self.grid = attention_grid(self.latent_size)
        self.dtype = next(ip2p_unet.parameters()).dtype
        self.attention_rows = 0  # rows the last eager forward summed; `export_dual_step` stores it

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(6, 8, h, w), (1,), (3, 77, C), (2,) float32 -> eps_mb, eps_ip2p (1, 4, h, w), attention (N, 77) fp32."""
        with record_cross_attention(self.unet.ip2p_unet, self.latent_size, self.grid) as attention:
            eps = self.unet(sample.to(self.dtype), timestep, context.to(self.dtype)).float()  # (6, 4, h, w)
        if not torch.jit.is_tracing():
            self.attention_rows = attention.rows
        text_scale, image_scale = guidance[0], guidance[1]
        return (guided_noise(eps[:3], text_scale, image_scale), guided_noise(eps[3:], text_scale, image_scale),
                attention.total)


class VaeEncoderForExport(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.dtype = next(vae.parameters()).dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) float32 in [-1, 1] -> latent_dist.mode() (1, 4, H/8, W/8) float32, unscaled."""
        return self.vae.encode(image.to(self.dtype)).latent_dist.mode().float()


class VaeDecoderForExport(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.dtype = next(vae.parameters()).dtype
        self.scaling_factor = vae.config.scaling_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """(1, 4, h, w) float32, the loop's latents (not yet divided by scaling_factor) -> (1, 3, 8h, 8w) float32."""
        return self.vae.decode(latent.to(self.dtype) / self.scaling_factor, return_dict=False)[0].float()


def check_recorded_layers(ip2p_unet: nn.Module, profile: ShapeProfile) -> list[str]:
    """The layers recorded at every size of the profile; one set, or a ConfigError."""
    sets = {size: recorded_layers(ip2p_unet, latent_size(size), attention_grid(latent_size(size)))
            for size in [*profile.sizes(), profile.trace_size()]}
    first = next(iter(sets.values()))
    if not first or any(layers != first for layers in sets.values()):
        raise ConfigError(
            f"the IP2P UNet's recorded cross-attention layers differ across {profile.describe()} "
            f"({ {f'{h}x{w}': len(v) for (h, w), v in sets.items()} }): export one static size instead"
        )
    return first


# --------------------------------------------------------------------------------------------------
# Export


@dataclass
class GraphSpec:
    """One graph to export: the module to trace, its reference, sample inputs and names."""

    name: str
    module: nn.Module  # in the export precision
    reference: nn.Module  # the same computation in the models' own precision
    make_inputs: Callable[[Size, torch.Generator], dict[str, torch.Tensor]]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    weights: dict[str, str]  # model name -> weights checksum
    extra: Callable[[], dict[str, Any]]  # more manifest fields, read after validation ran the reference

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def weights_sha256(module: nn.Module) -> str:
    """sha256 over every state-dict tensor's name, dtype, shape and bytes, in name order.

    Taken on the weights as exported (after the cast to the export precision): the checksum of what the
    graph holds, and equal to a pipeline's when it loaded the same checkpoint in that precision.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())  # the buffer itself: no 3 GB copy
    return digest.hexdigest()


def export_dual_step(
    models: ZoneModels, out_dir: Path, *, height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1],
    dtype: str = "fp32", dynamic: tuple[Size, Size, Size] | ShapeProfile | None = None, opset: int = 19,
    sources: dict[str, str] | None = None,
) -> Path:
    """Write dual_step.onnx and its manifest entry to `out_dir`; returns `out_dir`.

    `models`: only `ip2p_unet` and `mb_unet` are read (left unchanged). `dtype`: fp32 or fp16 (the graph's
    precision; TensorRT builds strongly typed engines, so this is the engine's precision). `dynamic`:
    (min, opt, max) image sizes, or None for the one size `height` x `width`. `sources`: where the weights
    came from, for the manifest. Raises ZoneError when a graph does not match PyTorch; nothing is written then.
    """
    return _export_graphs(models, out_dir, [_dual_step_specs], height, width, dtype, dynamic, opset, sources)


def export_unet_graphs(
    models: ZoneModels, out_dir: Path, *, height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1],
    dtype: str = "fp32", dynamic: tuple[Size, Size, Size] | ShapeProfile | None = None, opset: int = 19,
    sources: dict[str, str] | None = None,
) -> Path:
    """`export_dual_step` and `export_vae` as one export: every graph validated before any is installed, so
    an interrupted or failed export leaves `out_dir` as it was, never one graph at another size than the
    others. Arguments as `export_dual_step`."""
    return _export_graphs(models, out_dir, [_dual_step_specs, _vae_specs], height, width, dtype, dynamic, opset,
                          sources)


def _export_graphs(models: ZoneModels, out_dir: Path, builders: list[Callable[..., list[GraphSpec]]], height: int,
                   width: int, dtype: str, dynamic: tuple[Size, Size, Size] | ShapeProfile | None, opset: int,
                   sources: dict[str, str] | None) -> Path:
    precision, profile, opset = _precision(dtype), _profile(height, width, dynamic), _check_opset(opset)
    specs = [spec for build in builders for spec in build(models, profile, precision)]
    return _export(out_dir, specs, profile, precision, opset, sources)


def _dual_step_specs(models: ZoneModels, profile: ShapeProfile, precision: str) -> list[GraphSpec]:
    model_dtype = PRECISIONS[precision]
    layers = check_recorded_layers(models.ip2p_unet, profile)
    ip2p, mb = (_in_precision(unet, model_dtype) for unet in (models.ip2p_unet, models.mb_unet))
    module = DualStepForExport(ip2p, mb, profile.opt)
    reference = DualStepForExport(models.ip2p_unet.eval(), models.mb_unet.eval(), profile.opt)
    context_dim = models.ip2p_unet.config.cross_attention_dim

    def make_inputs(size: Size, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            "sample": torch.randn(6, 8, *latent_size(size), generator=generator),
            "timestep": torch.tensor([999.0]),  # the first step: the largest time embedding
            "context": torch.randn(3, 77, context_dim, generator=generator),
            "guidance": torch.tensor(GUIDANCE_FOR_VALIDATION),
        }

    latent_axes = {2: "latent_height", 3: "latent_width"}
    spec = GraphSpec(
        name=DUAL_STEP, module=module, reference=reference, make_inputs=make_inputs,
        output_names=["eps_mb", "eps_ip2p", "attention"],
        dynamic_axes={"sample": latent_axes, "eps_mb": latent_axes, "eps_ip2p": latent_axes,
                      "attention": {0: "attention_queries"}},
        weights={"ip2p_unet": weights_sha256(ip2p), "mb_unet": weights_sha256(mb)},
        extra=lambda: {"attention": {
            "rows_per_step": reference.attention_rows,  # as counted by the accumulator in the validation run
            "recorded_layers": layers,
            "kept_rows": f"IP2P batch rows {EMPTY_PROMPT_ROWS.start}..{EMPTY_PROMPT_ROWS.stop - 1} (the two "
                         "empty-prompt branches), all heads",
            "queries": "H/32 * W/32, row-major over the attention grid",
        }},
    )
    return [spec]


def export_vae(
    models: ZoneModels, out_dir: Path, *, height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1],
    dtype: str = "fp32", dynamic: tuple[Size, Size, Size] | ShapeProfile | None = None, opset: int = 19,
    sources: dict[str, str] | None = None,
) -> Path:
    """Write vae_encoder.onnx, vae_decoder.onnx and their manifest entries to `out_dir`; returns `out_dir`.

    `models`: only `vae` is read (left unchanged). Other arguments as `export_dual_step`.
    """
    return _export_graphs(models, out_dir, [_vae_specs], height, width, dtype, dynamic, opset, sources)


def _vae_specs(models: ZoneModels, profile: ShapeProfile, precision: str) -> list[GraphSpec]:
    vae = _in_precision(models.vae, PRECISIONS[precision])
    checksum = {"vae": weights_sha256(vae)}
    image_axes, latent_axes = {2: "height", 3: "width"}, {2: "latent_height", 3: "latent_width"}
    scaling = float(models.vae.config.scaling_factor)
    specs = [
        GraphSpec(
            name=VAE_ENCODER, module=VaeEncoderForExport(vae), reference=VaeEncoderForExport(models.vae.eval()),
            make_inputs=lambda size, generator: {"image": torch.rand(1, 3, *size, generator=generator) * 2 - 1},
            output_names=["latent"], dynamic_axes={"image": image_axes, "latent": latent_axes},
            weights=checksum, extra=lambda: {"output": "latent_dist.mode(), unscaled"},
        ),
        GraphSpec(
            name=VAE_DECODER, module=VaeDecoderForExport(vae), reference=VaeDecoderForExport(models.vae.eval()),
            make_inputs=lambda size, generator: {"latent": torch.randn(1, 4, *latent_size(size), generator=generator)},
            output_names=["image"], dynamic_axes={"latent": latent_axes, "image": image_axes},
            weights=checksum,
            extra=lambda: {"input": f"the loop's latents; divided by scaling_factor {scaling} inside the graph",
                           "output": "the VAE decoder's raw output, about [-1, 1]: map to [0, 1] and clamp"},
        ),
    ]
    return specs


def _precision(dtype: str | torch.dtype) -> str:
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    name = names.get(dtype, dtype) if isinstance(dtype, torch.dtype) else str(dtype).strip().lower()
    name = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, name)
    if name == "bf16":
        # ONNX admits bfloat16 Conv only from opset 22; the TorchScript exporter writes opset 20 at most, so a
        # bf16 graph would be invalid ONNX that no runtime here could check.
        raise ConfigError("bf16 ONNX export is not supported: bfloat16 convolutions need ONNX opset 22 and the "
                          "TorchScript exporter stops at opset 20; export with --fp16 instead")
    if name not in PRECISIONS:
        raise ConfigError(f"unknown export precision {dtype!r}: use fp32 or fp16")
    return name


def _check_opset(opset: int) -> int:
    # 14: SDPA's first opset in the TorchScript exporter (19 is NVIDIA's choice for diffusion UNets).
    return check_opset(opset, 14, "these graphs")


def _profile(height: int, width: int, dynamic: tuple[Size, Size, Size] | ShapeProfile | None) -> ShapeProfile:
    if dynamic is None:
        return ShapeProfile.static(height, width)
    return dynamic if isinstance(dynamic, ShapeProfile) else ShapeProfile(*dynamic)


def _in_precision(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    module = module.eval()
    if next(module.parameters()).dtype == dtype:
        return module
    return copy.deepcopy(module).to(dtype)  # the caller's model stays as it was


def _export(out_dir: Path, specs: list[GraphSpec], profile: ShapeProfile, precision: str, opset: int,
            sources: dict[str, str] | None) -> Path:
    """Trace, validate at every profile size, then move the files and the manifest entries into `out_dir`."""
    require("onnx"), require("onnxruntime")  # before any tracing: both are needed, and the [onnx] extra
    out_dir = Path(out_dir)
    check_export_target(out_dir, "unet")  # before the tracing; again as the files are moved in (`installing`)
    with staging_folder(out_dir) as staging:
        entries = {spec.name: _export_spec(spec, staging, profile, precision, opset, sources) for spec in specs}
        with installing(out_dir, "unet"):  # the three graphs and the manifest all installed, or none
            _install(entries, staging, out_dir)
    _drop_engines_of_replaced_graphs(out_dir, entries)
    return out_dir


def _drop_engines_of_replaced_graphs(out_dir: Path, entries: dict[str, dict[str, Any]]) -> None:
    """The engines in the folder's default cache built from graph files this export replaced, removed: their keys
    name the old files, so they are never loaded again (each re-export left a dual-step engine behind: both SD1.5
    UNets, 3.4 GB in fp16)."""
    from .engine import EngineCache, default_cache_root  # which imports this module

    EngineCache(default_cache_root(out_dir)).drop_built_from_other_files(
        {name: entry["files"] for name, entry in entries.items()})


def _export_spec(spec: GraphSpec, staging: Path, profile: ShapeProfile, precision: str, opset: int,
                 sources: dict[str, str] | None) -> dict[str, Any]:
    """One graph traced into `staging` and checked at every size of the profile; its manifest entry."""
    generator = torch.Generator().manual_seed(0)
    trace_inputs = spec.make_inputs(profile.trace_size(), generator)
    metadata = {"zone.graph": spec.name, "zone.precision": precision, "zone.version": __version__}
    files = export_graph(spec.module, tuple(trace_inputs.values()), staging / spec.file, opset,
                         input_names=list(trace_inputs), output_names=spec.output_names,
                         dynamic_axes=spec.dynamic_axes if profile.dynamic else None, metadata=metadata)
    report = {"tolerance": TOLERANCES[precision]}
    shapes = {}
    graph = session(staging / spec.file)
    for size in profile.sizes():
        inputs = spec.make_inputs(size, generator)
        with torch.no_grad():
            expected = spec.reference(**inputs)
        expected = list(expected) if isinstance(expected, tuple) else [expected]
        report[f"{size[0]}x{size[1]}"] = compare(graph, spec.file, inputs, expected, spec.output_names,
                                                 TOLERANCES[precision], f" at input size {size[0]}x{size[1]}")
        shapes[size] = {name: list(t.shape) for name, t in inputs.items()}
    del graph  # ONNX Runtime holds the file open (and its weights in memory) until then
    return {
        "files": {name: file_sha256(staging / name) for name in files},
        "onnx": spec.file,
        "precision": precision,
        "opset": opset,
        "inputs": list(trace_inputs),
        "outputs": spec.output_names,
        "io_dtype": "float32",
        "image_sizes": profile.to_json(),
        "traced_at": list(profile.trace_size()),
        # TensorRT's optimization profile: input name -> [min, opt, max] shapes.
        "profile": {name: [shapes[profile.min][name], shapes[profile.opt][name], shapes[profile.max][name]]
                    for name in trace_inputs},
        "weights_sha256": spec.weights,
        "sources": sources or {},
        **spec.extra(),
        "validation": report,
        "zone_engine_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": require("onnx").__version__,
        "onnxruntime_version": require("onnxruntime").__version__,
    }


def _install(entries: dict[str, dict[str, Any]], staging: Path, out_dir: Path) -> None:
    """Move the graphs' files from `staging` into `out_dir` and add their entries to its manifest, the
    manifest last: it vouches for the files before it."""
    manifest = _read_manifest_for_update(out_dir)
    for name, entry in entries.items():
        for old in manifest["graphs"].get(name, {}).get("files", {}):  # a re-export may drop its .data file
            if old not in entry["files"] and (out_dir / old).is_file():
                (out_dir / old).unlink()
        for file in entry["files"]:
            install(staging, out_dir, file)
        manifest["graphs"][name] = entry
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    install(staging, out_dir, MANIFEST_FILE)


def _read_manifest_for_update(out_dir: Path) -> dict[str, Any]:
    """The folder's manifest, to add graphs to; a fresh one when there is none or it is of another format."""
    path = out_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "graphs" not in manifest:
        manifest = {"format": MANIFEST_FORMAT, "graphs": {}}
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """A `zone export unet` folder's manifest (format checked; files are checked before an engine is built)."""
    folder = expanded(folder, ConfigError)
    again = f"write one with `zone export unet --out {folder}`"
    path = export_manifest_path(folder, "unet", str(folder), again)
    # `zone export unet` refuses to replace another export's manifest, or one it cannot read: another folder, then.
    elsewhere = ("which `zone export unet` will not replace: pass the folder it wrote, or write one into another "
                 "with `zone export unet --out NEW_FOLDER`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ZoneError(f"cannot read {path} ({error}), {elsewhere}") from None
    if export_kind(manifest) == "sam":
        raise ZoneError(f"{folder} is a `zone export sam` folder (SAM's graphs, for --sam-onnx), not a `zone export "
                        f"unet` one, {elsewhere}")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not manifest.get("graphs"):
        then = f"; {again}" if export_kind(manifest) == "unet" else f", {elsewhere}"
        raise ZoneError(f"{path} is not a format-{MANIFEST_FORMAT} `zone export unet` manifest{then}")
    return manifest


# --------------------------------------------------------------------------------------------------
# Command line: `zone export unet` (its options: export/options.py).


def profile_from_args(args: argparse.Namespace) -> ShapeProfile:
    if args.dynamic_shapes is not None:
        if args.height is not None or args.width is not None:
            raise ConfigError("give either --height/--width or --dynamic-shapes, not both")
        return parse_dynamic_shapes(args.dynamic_shapes)
    return ShapeProfile.static(*(DEFAULT_SIZE[side] if given is None else given
                                 for side, given in enumerate((args.height, args.width))), "--height/--width size")


def run_export_unet(args: argparse.Namespace) -> Path:
    """`zone export unet`: load (or build, with --tiny) both UNets and the VAE and export them; the folder."""
    from zone_engine.models import build_tiny_components, check_checkpoints_present, load_ip2p, load_magicbrush_unet

    profile = profile_from_args(args)  # every check that can fail runs before gigabytes of weights load
    graphs = [f"{graph}.onnx" for graph in GRAPHS]  # each with the weights it may write beside it (export_graph)
    check_output_folder(args.out, "--out", [*graphs, *(f"{graph}.data" for graph in graphs), MANIFEST_FILE])
    check_export_target(args.out, "unet")
    precision = _precision("bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")
    _check_opset(args.opset)
    if args.tiny:
        if args.ip2p is not None or args.magicbrush is not None:
            raise ConfigError("--tiny exports random weights: leave out --ip2p and --magicbrush")
        models = build_tiny_components(TINY_SEED)
        sources = {"ip2p": f"tiny:seed={TINY_SEED}", "magicbrush": f"tiny:seed={TINY_SEED}"}
    else:
        sources = {"ip2p": args.ip2p or IP2P_ID, "magicbrush": args.magicbrush or MAGICBRUSH_ID}
        check_checkpoints_present(sources["ip2p"], sources["magicbrush"], None, None)  # each one missing, at once
        log.info("loading the UNets and the VAE: %s, %s", sources["ip2p"], sources["magicbrush"])
        ip2p = load_ip2p(sources["ip2p"], torch.float32)  # fp32: the reference the graphs are checked against
        models = ZoneModels(
            tokenizer=ip2p.tokenizer, text_encoder=ip2p.text_encoder, vae=ip2p.vae, ip2p_unet=ip2p.unet,
            mb_unet=load_magicbrush_unet(sources["magicbrush"], ip2p, torch.float32),
            scheduler_config=dict(ip2p.scheduler.config), sam=None, action_classifier=None,
        )
    return export_unet_graphs(models, args.out, dtype=precision, dynamic=profile, opset=args.opset, sources=sources)
