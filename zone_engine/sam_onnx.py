"""The `onnx` refinement backend: SAM's automatic mask generation with its networks on ONNX Runtime.

Only the two network calls differ from `TorchSamSegmenter`: its `select` (the search for M_b's
segment, sam_torch.best_segment) and its `segment` run here unchanged. segment-anything's own
`SamAutomaticMaskGenerator` still builds the point grid, batches it, filters by predicted IoU and
stability, runs box NMS and encodes the masks; its `SamPredictor.set_image` still resizes the image;
`Sam.preprocess` and `Sam.postprocess_masks` still normalise and pad the image and upscale the logits.
`OnnxSamPredictor` swaps the image encoder and the prompt encoder + mask decoder for the graphs that
`zone export sam` writes (export/sam.py), so the masks match PyTorch's up to the networks' rounding.

No shortcut is taken: every grid point is decoded and every segment is returned, as the generator does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam

from .config import SamConfig
from .errors import CheckpointError, ConfigError, DeviceError, first_line, nearest, warn_caller
from .paths import MANIFEST_FILE, expanded, export_kind, export_manifest_path, listed_file_problem
from .sam_torch import TorchSamSegmenter, passing_masks

ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "mask_decoder.onnx"
TRT_CACHE = "trt_cache"  # ORT's TensorRT engines, one folder per export (engine_cache_folder)
MANIFEST_FORMAT = 1
MANIFEST_KEYS = ("format", "model_type", "input_size", "embedding_shape", "low_res_size", "precision",
                 "pixel_mean", "pixel_std", "mask_threshold", "image_format", "files")
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


TINY_EXPORT = "(`--tiny` in place of --checkpoint for the tiny models)"  # the export command's other source


def export_error(folder: Path, problem: str, ours: bool = True) -> CheckpointError:
    """What is wrong with a `zone export sam` folder (--sam-onnx, sam_onnx=), the folder named first, and the
    command that writes it afresh (the folder in it: a placeholder there was one more thing to fill in). `ours`:
    whether its manifest.json is a `zone export sam` one; the export refuses to replace any other (a `zone export
    unet` one, an unreadable one), where the command it was told to run then failed: another folder is named."""
    if ours:
        return CheckpointError(f"the SAM export {folder}: {problem}; re-run `zone export sam --checkpoint SAM.pth "
                               f"--out {folder}` {TINY_EXPORT} to write it afresh")
    return CheckpointError(f"the SAM export {folder}: {problem}, which `zone export sam` will not replace: pass the "
                           "folder it wrote, or write one into another with `zone export sam --checkpoint SAM.pth "
                           f"--out NEW_FOLDER` {TINY_EXPORT}")


class OnnxSamSegmenter(TorchSamSegmenter):
    """segment-anything's `SamAutomaticMaskGenerator` with both networks on ONNX Runtime.

    `folder`: written by `zone export sam`; checked (manifest, checksums, encoder/decoder pair) before
    use. `providers`: ONNX Runtime execution providers to try, in order (default: TensorRT, CUDA, CPU,
    whichever the installed onnxruntime offers). Both sessions are created here, once. `segment` is
    `TorchSamSegmenter`'s `segment` and `select`: same input checks, same generator, same order.
    """

    def __init__(self, folder: Path, config: SamConfig, providers: list[str] | None = None,
                 device_index: int = 0) -> None:
        # TorchSamSegmenter.__init__ would want a torch Sam: only `segment` and `select` are inherited.
        ort = _import_onnxruntime()
        self.folder, self.device_index = expanded(folder, ConfigError), device_index
        self.manifest = read_manifest(self.folder)
        requested = choose_providers(ort, providers)
        encoder = self._session(ort, ENCODER_FILE, requested, config)
        decoder = self._session(ort, DECODER_FILE, requested, config)
        check_pair(self.folder, self.manifest, encoder, decoder)
        self.providers = decoder.get_providers()  # what ORT kept: a provider that fails to start drops out

        frame = SamFrame(self.manifest, session_device(decoder, device_index))
        self.generator = SamAutomaticMaskGenerator(frame, **dataclasses.asdict(config))
        self.generator.predictor = OnnxSamPredictor(
            frame, OrtGraph(encoder, session_device(encoder, device_index)), OrtGraph(decoder, frame.device),
            self.manifest,
        )

    def _session(self, ort: Any, name: str, providers: list[str], config: SamConfig) -> Any:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT warns about every node it leaves on the CPU
        # Idle ORT threads would spin between decoder runs and starve torch's post-processing on the CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path, tried, failed = self.folder / name, list(providers), []
        # A provider that cannot start (TensorRT's or CUDA's libraries) drops out here, not in ORT's own fallback
        # (enable_fallback=0): that one retries CUDA and CPU without their options, on GPU 0 whatever device_id.
        # Where ORT does not raise (on Linux it mostly logs and builds the session without it), its absence from
        # the session's providers says so.
        while True:
            try:
                session = ort.InferenceSession(
                    str(path), options, providers=tried, enable_fallback=0,
                    provider_options=[self._provider_options(provider, name, config) for provider in tried],
                )
            except Exception as error:  # ORT raises its own Fail/InvalidProtobuf/... types
                if tried[0] not in GPU_PROVIDERS:  # the checksums passed: the CPU's failure is the graph's
                    reason = onnx_runtime_reason(error)
                    raise export_error(self.folder, f"ONNX Runtime cannot load {name}: {reason}") from None
                failed.append(f"{tried[0]} ({first_line(error)[:200]})")
                tried = tried[1:]
                if not tried:  # GPU providers only, none started: the machine's libraries, not the export
                    raise DeviceError(f"ONNX Runtime could start none of {' or '.join(failed)} for {name}: install "
                                      "the libraries onnxruntime-gpu needs (CUDA and cuDNN; TensorRT for its "
                                      "provider), or add CPUExecutionProvider to the providers") from None
                continue
            kept = session.get_providers()
            failed += [f"{provider} (left out by ONNX Runtime, whose log says why: its libraries may be missing)"
                       for provider in tried if provider in GPU_PROVIDERS and provider not in kept]
            if failed:
                warn_caller(f"ONNX Runtime could not start {' or '.join(failed)} for {name}: it runs on {kept[0]}")
            return session

    def _provider_options(self, provider: str, name: str, config: SamConfig) -> dict[str, Any]:
        if provider not in GPU_PROVIDERS:
            return {}
        if provider == "CUDAExecutionProvider":
            return {"device_id": self.device_index}
        # TensorRT builds an engine per input shape: cache them beside the graphs (ORT makes only the cache
        # folder's last level), and give the decoder one profile for every batch size the generator sends (the
        # last batch may be smaller). No trt_fp16_enable: an fp16 export carries its types, its prompt encoder
        # fp32 on purpose (export/sam.py), and the flag would let TensorRT run that in fp16 too.
        cache = engine_cache_folder(self.folder, self.manifest, config.points_per_batch)
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointError(f"the SAM export {self.folder}: TensorRT's engine cache {cache} cannot be made "
                                  f"({error.strerror}): make the folder writable") from None
        options = {"device_id": self.device_index, "trt_engine_cache_enable": True,
                   "trt_engine_cache_path": str(cache)}
        if name == DECODER_FILE:
            embedding = "x".join(str(d) for d in (1, *self.manifest["embedding_shape"]))
            for bound, batch in (("min", 1), ("opt", config.points_per_batch), ("max", config.points_per_batch)):
                options[f"trt_profile_{bound}_shapes"] = (
                    f"image_embeddings:{embedding},point_coords:{batch}x1x2,point_labels:{batch}x1"
                )
        return options


def onnx_runtime_reason(error: Exception, limit: int = 300) -> str:
    """ONNX Runtime's error on one line, shortened in its middle: its reason comes last, after the source file and
    C++ signature it names first (cut at 300 characters, "Unsupported model IR version: 99, max supported IR
    version: 14" was lost)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else f"{text[:100]} ... {text[100 - limit:]}"


class SamFrame:
    """What segment-anything reads from a `Sam` besides its networks: sizes, normalisation, threshold.

    `preprocess` and `postprocess_masks` are `Sam`'s own methods, so the image normalisation and the
    logit upscaling are the very code PyTorch runs; the numbers come from the export's manifest.
    """

    preprocess = Sam.preprocess
    postprocess_masks = Sam.postprocess_masks

    def __init__(self, manifest: dict[str, Any], device: torch.device) -> None:
        self.image_encoder = SimpleNamespace(img_size=manifest["input_size"])
        self.pixel_mean = torch.tensor(manifest["pixel_mean"], device=device).view(-1, 1, 1)
        self.pixel_std = torch.tensor(manifest["pixel_std"], device=device).view(-1, 1, 1)
        self.mask_threshold = float(manifest["mask_threshold"])
        self.image_format = manifest["image_format"]
        self.device = device


class OrtGraph:
    """One ONNX Runtime session run on torch tensors of `device` in place (IOBinding: no copies)."""

    def __init__(self, session: Any, device: torch.device) -> None:
        self.session = session
        self.device = device

    def __call__(self, output_shapes: dict[str, tuple[int, ...]], **inputs: torch.Tensor) -> list[torch.Tensor]:
        """float32 inputs by name -> float32 outputs of the given shapes, in `output_shapes`' order."""
        binding = self.session.io_binding()
        kept = []  # the bound buffers must outlive the run
        for name, tensor in inputs.items():
            tensor = tensor.to(self.device, torch.float32).contiguous()
            kept.append(tensor)
            binding.bind_input(name, self.device.type, self.device.index or 0, np.float32, tuple(tensor.shape),
                               tensor.data_ptr())
        outputs = [torch.empty(shape, dtype=torch.float32, device=self.device) for shape in output_shapes.values()]
        for name, tensor in zip(output_shapes, outputs, strict=True):
            binding.bind_output(name, self.device.type, self.device.index or 0, np.float32, tuple(tensor.shape),
                                tensor.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)  # returns once ORT's stream is done
        return outputs


class OnnxSamPredictor(SamPredictor):
    """`SamPredictor` whose image encoder and prompt encoder + mask decoder run on ONNX Runtime.

    `set_image` and `reset_image` are SamPredictor's; `set_torch_image` and `predict_torch` mirror
    SamPredictor's with the two network calls replaced. Point prompts with multimask output only: all
    that `SamAutomaticMaskGenerator` asks for.
    """

    def __init__(self, frame: SamFrame, encoder: OrtGraph, decoder: OrtGraph, manifest: dict[str, Any]) -> None:
        super().__init__(frame)
        self.encoder, self.decoder = encoder, decoder
        self.embedding_shape = (1, *manifest["embedding_shape"])  # (1, C, S/16, S/16)
        self.low_res_size = manifest["low_res_size"]  # S/4

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """transformed_image: uint8 (1, 3, h, w), longest side S; original_image_size: (H, W)."""
        self.reset_image()
        self.original_size = original_image_size
        self.input_size = tuple(transformed_image.shape[-2:])
        image = self.model.preprocess(transformed_image)  # (1, 3, S, S) float32
        (self.features,) = self.encoder({"image_embeddings": self.embedding_shape}, image=image)
        self.is_image_set = True

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """point_coords (B, P, 2) in the S-scale input frame, point_labels (B, P) -> masks (B, 3, H, W),
        IoU predictions (B, 3), low-res logits (B, 3, S/4, S/4)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if point_coords is None or boxes is not None or mask_input is not None or not multimask_output:
            raise NotImplementedError("the exported SAM decoder takes point prompts and gives multimask output only")
        low_res_masks, iou_predictions = self.predict_low_res(point_coords, point_labels)
        masks = self.model.postprocess_masks(low_res_masks, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou_predictions, low_res_masks

    def prompts_per_run(self, points_per_batch: int, prompts: int, image_size: tuple[int, int]) -> int:
        """`points_per_batch`: the TensorRT provider's decoder profile stops at that batch size."""
        return points_per_batch

    def predict_passing(
        self, point_coords: torch.Tensor, point_labels: torch.Tensor, min_score: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`TorchSamPredictor.predict_passing` on the decoder graph: the multimask outputs whose
        predicted IoU is over `min_score` (all when it is <= 0), as (M, S/4, S/4) logits and (M,) IoUs."""
        low_res_masks, iou_predictions = self.predict_low_res(point_coords, point_labels)
        passing = passing_masks(iou_predictions, min_score)
        return low_res_masks[passing], iou_predictions[passing]

    def predict_low_res(
        self, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder graph alone: low-res logits (B, 3, S/4, S/4) and IoU predictions (B, 3)."""
        batch, side = point_coords.shape[0], self.low_res_size
        # The coordinates go in as float32; PyTorch's prompt encoder adds the half-pixel offset in the
        # generator's float64 before its own cast: a 1e-7 relative difference, far inside the tolerance.
        low_res_masks, iou_predictions = self.decoder(
            {"low_res_logits": (batch, 3, side, side), "iou_predictions": (batch, 3)},
            image_embeddings=self.features, point_coords=point_coords, point_labels=point_labels,
        )
        return low_res_masks, iou_predictions


# --------------------------------------------------------------------------------------------------
# Checking an export folder.


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest, after checking that every file it lists is there with its checksum."""
    write_one = f"write one with `zone export sam --checkpoint SAM.pth --out {folder}` {TINY_EXPORT}"
    path = export_manifest_path(folder, "sam", f"the SAM export {folder}", write_one, CheckpointError)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise export_error(folder, f"cannot read {MANIFEST_FILE} ({error})", ours=False) from None
    if export_kind(manifest) == "unet":
        raise export_error(folder, "a `zone export unet` folder (the UNets' graphs), not a `zone export sam` one",
                           ours=False)
    missing = [key for key in MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise export_error(folder, f"{MANIFEST_FILE} lacks {', '.join(missing)}", ours=export_kind(manifest) == "sam")
    if manifest["format"] != MANIFEST_FORMAT:
        raise export_error(folder, f"{MANIFEST_FILE} has format {manifest['format']}, this zone-engine reads "
                                   f"format {MANIFEST_FORMAT}")
    if problems := _value_problems(manifest):  # a hand edit: said here, not as ONNX Runtime's or numpy's error
        raise export_error(folder, f"{MANIFEST_FILE}: {'; '.join(problems)}")
    files = manifest["files"]
    for name in (ENCODER_FILE, DECODER_FILE):
        if name not in files:
            raise export_error(folder, f"{MANIFEST_FILE} does not list {name}")
    for name, expected in files.items():
        if problem := listed_file_problem(folder, name, expected):
            raise export_error(folder, problem)
    return manifest


def _value_problems(manifest: dict[str, Any]) -> list[str]:
    """What in the manifest's values the segmenter could not use, as `zone export sam` writes them."""
    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def numbers(value: object, positive: bool = False) -> bool:
        return isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
            for v in value)

    size, embedding, threshold = manifest["input_size"], manifest["embedding_shape"], manifest["mask_threshold"]
    checks = [
        (whole(size) and size % 16 == 0, "input_size must be a positive multiple of 16"),
        (whole(size) and isinstance(embedding, list) and len(embedding) == 3 and all(whole(d) for d in embedding)
         and embedding[1:] == [size // 16] * 2, "embedding_shape must be [channels, input_size/16, input_size/16]"),
        (whole(size) and manifest["low_res_size"] == size // 4, "low_res_size must be input_size/4"),
        (manifest["precision"] in ("fp32", "fp16"), "precision must be fp32 or fp16"),
        (numbers(manifest["pixel_mean"]), "pixel_mean must be 3 numbers"),
        (numbers(manifest["pixel_std"], positive=True), "pixel_std must be 3 positive numbers"),
        (isinstance(threshold, int | float) and not isinstance(threshold, bool) and math.isfinite(threshold),
         "mask_threshold must be a finite number"),
        (manifest["image_format"] in ("RGB", "BGR"), "image_format must be RGB or BGR"),
        (isinstance(manifest["files"], dict) and all(isinstance(v, str) for v in manifest["files"].values()),
         "files must map file names to sha256 digests"),
    ]
    return [message for ok, message in checks if not ok]


def check_pair(folder: Path, manifest: dict[str, Any], encoder: Any, decoder: Any) -> None:
    """The two sessions are the encoder and decoder of one SAM, the one the manifest describes."""

    def fail(problems: list[str]) -> None:
        if problems:
            raise export_error(folder, f"not one matching SAM export: {'; '.join(problems)}")

    parts = ((ENCODER_FILE, encoder, "image_encoder"), (DECODER_FILE, decoder, "mask_decoder"))
    metadata = {name: session.get_modelmeta().custom_metadata_map for name, session, _ in parts}
    fail([f"{name} is not a SAM {part.replace('_', ' ')} (it says {metadata[name].get('zone.part')!r})"
          for name, _, part in parts if metadata[name].get("zone.part") != part])

    problems = [f"{name} was exported from a {metadata[name].get('zone.model_type')} SAM but {MANIFEST_FILE} "
                f"says {manifest['model_type']}"
                for name, _, _ in parts if metadata[name].get("zone.model_type") != manifest["model_type"]]
    embeddings_out = encoder.get_outputs()[0].shape
    embeddings_in = decoder.get_inputs()[0].shape  # image_embeddings, as export/sam.py orders the inputs
    if list(embeddings_out) != list(embeddings_in):
        problems.append(f"{ENCODER_FILE} gives embeddings {embeddings_out} but {DECODER_FILE} takes {embeddings_in}")
    elif list(embeddings_out[1:]) != list(manifest["embedding_shape"]):
        problems.append(f"the graphs' embeddings {embeddings_out} differ from {MANIFEST_FILE}'s "
                        f"{manifest['embedding_shape']}")
    size = manifest["input_size"]
    if list(encoder.get_inputs()[0].shape) != [1, 3, size, size]:
        problems.append(f"{ENCODER_FILE} takes {encoder.get_inputs()[0].shape}, not a (1, 3, {size}, {size}) image")
    fail(problems)


def session_device(session: Any, device_index: int = 0) -> torch.device:
    """Where a session reads its inputs and writes its outputs: its GPU for TensorRT and CUDA."""
    return torch.device("cuda", device_index) if session.get_providers()[0] in GPU_PROVIDERS else torch.device("cpu")


def engine_cache_folder(folder: Path, manifest: dict[str, Any], points_per_batch: int) -> Path:
    """Where ORT's TensorRT provider caches its engines for this export: keyed by what ORT's own cache
    names (the GPU's compute capability) do not cover: the graphs' checksums (an export of other weights
    into the same folder would otherwise load the old weights' engines), ONNX Runtime's version (and so the
    TensorRT it links; its documentation asks for a clean cache when either changes) and the decoder's batch
    profile (`points_per_batch`)."""
    key = json.dumps({"files": manifest["files"], "onnxruntime": _import_onnxruntime().__version__,
                      "points_per_batch": points_per_batch}, sort_keys=True)
    return folder / TRT_CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]


def choose_providers(ort: Any, requested: list[str] | None) -> list[str]:
    """The requested providers (default: TensorRT, CUDA, CPU) that this onnxruntime offers, in order; a name
    ONNX Runtime does not know is a ConfigError (among known ones it was dropped without a word)."""
    available = ort.get_available_providers()
    wanted = list(requested) if requested is not None else list(PROVIDER_ORDER)
    known = ort.get_all_providers()
    for name in wanted:
        if name not in known:
            meant = next((full for full in known if full.lower().startswith(name.lower())), None)
            if meant is None:  # a misspelt full name (CUDAExecutionProvidr), in any case
                by_lower = {full.lower(): full for full in known}
                meant = by_lower.get(nearest(name.lower(), by_lower) or "")
            hint = f"did you mean {meant}? " if meant else ""
            raise ConfigError(f"unknown ONNX Runtime provider {name!r}: {hint}ONNX Runtime names them in full, "
                              f"e.g. {' '.join(PROVIDER_ORDER)}")
    chosen = [provider for provider in wanted if provider in available]
    if not chosen:
        raise DeviceError(f"none of the ONNX Runtime providers {', '.join(wanted)} is available here "
                          f"(this onnxruntime offers {', '.join(available)})")
    return chosen


def check_providers(requested: list[str]) -> list[str]:
    """choose_providers with this machine's onnxruntime, for a command line to say a bad name before any work."""
    return choose_providers(_import_onnxruntime(), requested)


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise DeviceError("the onnx refinement backend needs onnxruntime: pip install 'zone-engine[onnx]' "
                          "(onnxruntime-gpu for CUDA and TensorRT)") from None
    return onnxruntime
