"""ZonePipeline: ZONE's stages composed into one edit (ZONE.md sections 0-5)."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, Literal, NamedTuple, NoReturn, ParamSpec, TypeVar, overload

import numpy as np
import torch

from . import blend, image_io
from .action import classify_action
from .backends import (
    DTYPES,
    captures_stages,
    check_backends,
    configure_attention,
    current_device,
    group_norm_names,
    make_denoiser,
    make_group_norms,
    make_localization_kernels,
    make_segmenter,
    resolve_device,
    resolve_dtype,
    warn_if_bf16_is_emulated,
)
from .config import (
    DEFAULT_ACTION_CLASSIFIER,
    DEFAULT_SAM,
    IP2P_ID,
    MAGICBRUSH_ID,
    Action,
    EditConfig,
    SamConfig,
    check_switch,
    lowered_backend_names,
    lowered_name,
    option,
)
from .denoise import BatchDenoiser, DenoiseInputs, Denoiser, initial_noise
from .errors import (
    DIFFUSERS_NAMES,
    MODELS_OUT_OF_MEMORY_HINT,
    OUT_OF_MEMORY_HINT,
    ConfigError,
    EditCancelled,
    OutOfDeviceMemory,
    a_type,
    first_line,
    refuse_unknown,
    unknown_keywords_refused,
    warn_caller,
)
from .graphs import CapturedCalls, Run, eager
from .instruction import check_instruction
from .localize import ATTENTION_CELL, AttentionAccumulator, Localization, attention_grid, heatmap_overlay, localize
from .models import (
    NormScope,
    ZoneModels,
    build_tiny_components,
    check_checkpoints_present,
    checked_sam_type,
    load_pretrained,
    pytorch_norms,
    unets_channels_last,
)
from .pillow_resize import to_input_size_on
from .progress import progress_bar
from .refine import Refinement, Segmenter, refine_with_sam
from .text import TRUNCATED, EncodedInstruction, encode_instruction, encode_prompt
from .timing import Stopwatch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

T = TypeVar("T")
P = ParamSpec("P")  # a decorated method's parameters, kept for type checkers
log = logging.getLogger(__name__)  # under "zone_engine", which `zone serve` logs

STAGES = ("text", "action", "vae_encode", "denoise", "localize", "vae_decode", "refine", "blend")


def _brief_repr(self) -> str:
    """A dataclass's fields, arrays and tensors by type, dtype and shape: a REPL shows the edit, not its pixels."""
    def brief(value: object) -> str:
        if isinstance(value, np.ndarray | torch.Tensor):
            return f"<{type(value).__name__} {value.dtype} {tuple(value.shape)}>"
        return repr(value)

    shown = (item for item in fields(self) if item.repr)
    return f"{type(self).__name__}({', '.join(f'{item.name}={brief(getattr(self, item.name))}' for item in shown)})"


@dataclass(frozen=True, eq=False)  # equal and hashed by identity: == on arrays has no single truth value
class EditResult:
    """One edit's output, every array at the input image's size (H, W), its own copy:

    image: uint8 (H, W, 3), the edited image; pixels outside `region` are the input's.
    mask_b: bool (H, W), M_b, the attention-derived edit mask.
    mask_f: bool (H, W), M_f, the SAM-refined mask.
    region: bool (H, W), R, where the FFT edge smoother found a real change.
    seam: bool (H, W), R without M_f, where styled and input are mixed.
    styled: uint8 (H, W, 3), I_sty, the whole denoised image.
    heatmap: uint8 (H, W, 3), `difference` as a JET colour map over the input (blue low, red high: M_b is blue).
    difference: uint8 (H, W), d = max(a1 - aL, 0), the levels M_b thresholds (reference rule: min(2d, 255) <= 108;
    paper: d < 128), resized as the masks are, so thresholding it gives M_b before its small regions are dropped.
    action: the Action the edit ran with (given, or classified from the instruction).
    used_fallback: no SAM segment overlapped M_b, so M_f = M_b.
    instruction_truncated: the instruction was over CLIP's 77 tokens; its tail was not read.
    timings: seconds per stage ("text", "action", "vae_encode", "denoise", ...), plus "total".
    notes: what the edit did not take as given, each also an EditWarning: transparency dropped, frames after
    the first skipped, the instruction truncated, an image under one cell of the attention grid, nothing edited
    (`region` empty: `image` is the input).
    """

    image: np.ndarray
    mask_b: np.ndarray
    mask_f: np.ndarray
    region: np.ndarray
    seam: np.ndarray
    styled: np.ndarray
    heatmap: np.ndarray
    difference: np.ndarray
    action: Action
    used_fallback: bool
    instruction_truncated: bool
    timings: dict[str, float]
    notes: tuple[str, ...] = ()

    __repr__ = _brief_repr


class BatchKey(NamedTuple):
    """What edits denoised in one batch must share; seeds, actions and everything after denoising may differ."""

    latent_size: tuple[int, int]
    steps: int
    text_guidance: float
    image_guidance: float


def batch_key(image_size: tuple[int, int], config: EditConfig) -> BatchKey:
    """The batch key of an edit of an (H, W) image: known before any model runs (a server buckets by it)."""
    geometry = image_io.working_geometry(*image_size, config.max_side, config.size_multiple)
    return BatchKey(geometry.latent_size, config.steps, config.text_guidance, config.image_guidance)


@dataclass(frozen=True, eq=False)  # equal and hashed by identity: == on arrays has no single truth value
class EditRequest:
    """One edit of `edit_batch`. Setting `cancel` stops its work at the next step boundary once every request of
    its batch is cancelled; a cancelled request among live ones rides the loop to its end, then is dropped before
    decoding and refinement."""

    image: image_io.ImageSource  # path, PIL image or array, as `edit` takes
    instruction: str
    config: EditConfig | None = None
    cancel: threading.Event | None = None

    def __post_init__(self) -> None:
        if self.cancel is not None and not isinstance(self.cancel, threading.Event):
            # "not an Event" said nothing to an asyncio app whose Event is named so.
            given = ("an asyncio.Event, which is not safe to use across threads: pass a threading.Event and "
                     "set() it where your task is cancelled" if type(self.cancel).__module__ == "asyncio.locks"
                     else a_type(self.cancel))
            raise ConfigError(f"EditRequest's cancel must be a threading.Event or None, not {given}")

    def cancelled(self) -> bool:
        """Whether `cancel` is set (False without one)."""
        return self.cancel is not None and self.cancel.is_set()

    __repr__ = _brief_repr


def _refuse_config_fields(names: Iterable[str], not_of: str) -> None:
    """An EditConfig field (or diffusers' name of one) given beside `config=` as a ConfigError saying where it goes:
    EditRequest(image, text, steps=10), pipe.edit(image, text, num_inference_steps=10)."""
    for name in names:
        setting = name if name in EditConfig.__dataclass_fields__ else DIFFUSERS_NAMES.get(name)
        if setting in EditConfig.__dataclass_fields__:
            called = "" if setting == name else f" is called {setting} here, and"
            raise ConfigError(f"{name}{called} is a field of EditConfig, not {not_of}: pass "
                              f"config=pipe.default_config.replace({setting}=...) (or EditConfig({setting}=...))")


def _keywords_said(method: Callable[P, T], owner: str, known: Sequence[str], noun: str) -> Callable[P, T]:
    """`method` (EditRequest's constructor, a stage) saying an unknown keyword as a ConfigError before it runs, as
    EditConfig's are (it was a TypeError): where it takes `config`, an EditConfig field (or diffusers' name of one)
    said to go in it (EditRequest(image, text, steps=10), pipe.edit(image, text, num_inference_steps=10)); else the
    nearest `noun`."""
    refusing = unknown_keywords_refused(method, owner, known, noun)

    @functools.wraps(method)
    def checked(*args: P.args, **kwargs: P.kwargs) -> T:
        if "config" in known:
            _refuse_config_fields([name for name in kwargs if name not in known], f"one of {owner}'s {noun}s")
        return refusing(*args, **kwargs)

    return checked


EditRequest.__init__ = _keywords_said(EditRequest.__init__, "EditRequest", [item.name for item in fields(EditRequest)],
                                      "field")


@dataclass(frozen=True, eq=False)  # equal and hashed by identity: == on arrays has no single truth value
class PreparedEdit:
    """An edit after steps 1-4, ready to be denoised (alone or in a batch) and finished. For callers: `batch_key`
    (edits denoised together share it), `config`, `action`, `geometry`, `notes` and `restart()`; the rest is the
    stages' own state (tensors, the attention record, timings)."""

    original: np.ndarray
    working: np.ndarray
    geometry: image_io.Geometry
    config: EditConfig
    encoded: EncodedInstruction = field(repr=False)
    action: Action
    inputs: DenoiseInputs = field(repr=False)  # tensors: their shapes follow from geometry
    attention: AttentionAccumulator = field(repr=False)
    watch: Stopwatch = field(repr=False)
    started: float = field(repr=False)
    notes: tuple[str, ...]  # EditResult.notes
    # The models that made its inputs (a weak reference: an edit kept by a caller does not keep them alive): another
    # pipeline's UNets would denoise them silently into a wrong edit (or fail deep in torch on another device).
    models: Callable[[], ZoneModels | None] = field(default=lambda: None, repr=False)

    __repr__ = _brief_repr

    @property
    def batch_key(self) -> BatchKey:
        return batch_key(self.geometry.input_size, self.config)

    def restart(self) -> PreparedEdit:
        """The same edit with an empty attention record, to denoise it again."""
        return replace(self, attention=AttentionAccumulator(self.attention.accumulate))


def image_to_tensor(image: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1], exactly as diffusers' VaeImageProcessor builds it.

    Same values *and* the same channels-last memory layout: the VAE's convolutions round differently
    per layout, and a 1e-6 difference in the image latents grows through 20 guided steps.
    """
    pixels = torch.from_numpy(image[None].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return (2.0 * pixels - 1.0).to(device=device, dtype=dtype)


@torch.inference_mode()
def encode_image_latents(vae: AutoencoderKL, image: np.ndarray, dtype: torch.dtype, run: Run = eager,
                         norms: NormScope = pytorch_norms) -> torch.Tensor:
    """IP2P's image conditioning (3, 4, h, w): [latents, latents, zeros], unscaled latent_dist.mode().
    `run`: how the VAE is called (`graphs.eager`, or replayed from a CUDA graph); `norms`: how its
    GroupNorms run (`backends.make_group_norms`)."""
    device = next(vae.parameters()).device
    with norms(vae):
        latents = run("vae_encode", lambda pixels: vae.encode(pixels).latent_dist.mode(),
                      image_to_tensor(image, device, dtype))
    return torch.cat([latents, latents, torch.zeros_like(latents)])


@torch.inference_mode()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, run: Run = eager,
                   norms: NormScope = pytorch_norms) -> torch.Tensor:
    """(1, 4, h, w) -> float (1, 3, H, W) in [0, 1] (NaN where the decoder overflowed). `run`, `norms`: as for
    `encode_image_latents`.

    SD's VAE can overflow in fp16 (inf/NaN activations in the decoder). Decoding stays in the
    chosen precision; only when the result is not finite is it decoded again, by an fp32 copy of
    the VAE (the VAE itself is never converted: its CUDA graphs point at its weights).
    """
    with norms(vae):
        image = run("vae_decode", lambda scaled: vae.decode(scaled, return_dict=False)[0],
                    latents / vae.config.scaling_factor)
    if image.dtype == torch.float16 and not torch.isfinite(image).all():
        fp32 = copy.deepcopy(vae).to(torch.float32)
        image = fp32.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
    pixels = image.float() / 2 + 0.5
    # A value that overflowed stays NaN (clamp made inf a plausible 0 or 1): the caller can tell, and refuse it.
    return pixels.clamp(0, 1).where(torch.isfinite(pixels), torch.nan)


def _diverged(config: EditConfig, why: str) -> ConfigError:
    return ConfigError(f"the denoising diverged ({why}): lower the guidance (text_guidance {config.text_guidance:g}, "
                       f"image_guidance {config.image_guidance:g}), or, in fp16, run in bf16 or fp32")


def _coarse_grid_note(geometry: image_io.Geometry) -> str | None:
    """ZONE locates the edit on a grid of 32-pixel cells of the working image: a short side under one cell
    there (a small image, or a very elongated one shrunk to 512 on its long side) is edited with a mask
    coarser than the image. Said, not refused: the edit still runs."""
    (height, width), (given_h, given_w) = geometry.scaled_size, geometry.input_size
    if min(height, width) >= ATTENTION_CELL:
        return None
    scaled = "" if (height, width) == (given_h, given_w) else f" ({width}x{height} at the working size)"
    return (f"the image is {given_w}x{given_h}{scaled}, its short side under one "
            f"{ATTENTION_CELL}-pixel cell of the grid ZONE locates the edit on, so the edit region will be coarse: "
            "a larger or less elongated (cropped) image edits better")


def _unedited_note(located: Localization, region: np.ndarray) -> str | None:
    """An edit whose region R is empty returns the input as it was: said, as nothing in the result said why (a
    threshold or min_region_area that left M_b empty, say)."""
    if region.any():
        return None
    why = ("M_b, the edit mask, is empty: no region of the attention difference passed the threshold rule with "
           "min_region_area pixels" if not located.mask_b.any() else
           "the styled image differs from the input nowhere past fft_threshold inside M_f's dilation")
    return f"nothing was edited, the output is the input: {why}"


def _raise_for_request(error: Exception, index: int) -> NoReturn:
    if hasattr(error, "add_note"):  # Python 3.11+: the traceback says which request failed
        error.add_note(f"(edit_batch: request {index})")
    raise error


def _type_names(values: object) -> str:
    """What a caller passed for a list, by type ("[ndarray, str]"): the values themselves (an image's array) would
    fill the message."""
    if isinstance(values, Sequence) and not isinstance(values, str):
        return f"[{', '.join(type(value).__name__ for value in values)}]"
    return a_type(values)


def _check_denoised(edit: object, latents: object, denoised: Mapping[PreparedEdit, torch.Tensor]) -> None:
    """ConfigError unless `latents` are what `denoise` returned for `edit` (as `denoised` holds it): finish's
    inputs, from a caller's own scheduling, where two lists are easily paired wrong."""
    if not isinstance(edit, PreparedEdit):
        raise ConfigError(f"finish takes the PreparedEdit prepare() returned, not {a_type(edit)}")
    expected = tuple(edit.inputs.noise.shape)
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
        given = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ConfigError(f"finish takes the latents denoise() returned for this edit, a tensor of shape {expected}; "
                          f"got {given}")
    returned = denoised.get(edit)
    if returned is None and edit.attention.total is not None:  # stopped: its restart() has the latents
        raise ConfigError("this edit's denoising by this pipeline did not end (it stopped part way, or another "
                          "pipeline denoised it): finish the edit you denoised (after a stop, its restart()) with the "
                          "latents denoise returned for it")
    if returned is None:
        raise ConfigError("this edit was not denoised by this pipeline: finish it with the latents denoise([edit]) "
                          "returns for it")
    if latents is not returned and not torch.equal(latents.to(returned.device, returned.dtype), returned):
        # Another edit's latents gave a plausible image: this edit's masks over another's styled image.
        raise ConfigError("these are not the latents denoise() returned for this edit (another edit's?): pass each "
                          "edit with the latents at its place in denoise's list")


_STOP_EXAMPLE = "e.g. stop=event.is_set"


def _check_stop(stop: object) -> None:
    """ConfigError unless `stop` is None or callable with no arguments: else a TypeError after the first step's
    work, the edit's attention record no longer empty."""
    if stop is None:
        return
    if not callable(stop):
        raise ConfigError(f"stop must be a function of no arguments that says whether to stop (or None), got "
                          f"{type(stop).__name__}: {_STOP_EXAMPLE}")
    try:
        inspect.signature(stop).bind()
    except TypeError:
        name = getattr(stop, "__qualname__", type(stop).__name__)
        raise ConfigError(f"stop is called with no arguments, and {name} needs some: {_STOP_EXAMPLE}, or "
                          "functools.partial(check, request)") from None
    except ValueError:  # a builtin without a signature: called as it is
        pass


def _stop_says(answer: object) -> bool:
    """stop()'s answer, True or False (None: go on); anything else (`lambda: event` for `event.is_set`) is a
    ConfigError, not taken as a request to stop every edit at its first step."""
    if answer is not None and not isinstance(answer, bool | np.bool_):
        raise ConfigError(f"stop must return True or False, got {a_type(answer)}: {_STOP_EXAMPLE}, not lambda: event")
    return bool(answer)


def _checked_edit_config(config: object, what: str) -> EditConfig:
    if not isinstance(config, EditConfig):
        raise ConfigError(f"{what} must be an EditConfig, e.g. EditConfig(steps=10), not {a_type(config)}")
    return config


def to_uint8_image(pixels: torch.Tensor) -> np.ndarray:
    """float (1, 3, H, W) in [0, 1] -> uint8 (H, W, 3), rounding as diffusers' numpy_to_pil.

    Computed where the pixels are: the same float32 product and round-half-to-even as numpy's, and a
    quarter of the bytes to the host (the numpy pass took 5.35 ms at 512² on the 2-core CPU)."""
    return (pixels[0] * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()


def _locked_on_device(method: Callable[Concatenate[ZonePipeline, P], T]) -> Callable[Concatenate[ZonePipeline, P], T]:
    """Run a pipeline method (prepare, denoise, finish, empty_prompt, segmenter) holding the pipeline's lock, with
    its CUDA device current. The lock: the stages' CUDA graphs (`graphs.py`), the denoiser's static buffers and
    CUDA graphs and SAM's predictor hold one edit's state at a time, so threads sharing a pipeline
    take turns; the pipelines over one ZoneModels share it (`_ModelHolders`). The device: CUDA streams, graphs
    and Triton launch on the current device, so a pipeline on cuda:1 would otherwise launch on cuda:0."""
    @functools.wraps(method)
    def stage(self: ZonePipeline, *args: P.args, **kwargs: P.kwargs) -> T:
        with self._lock, current_device(self.device), _out_of_memory_said(f"in {method.__name__}"):
            return method(self, *args, **kwargs)

    return stage


@contextlib.contextmanager
def _out_of_memory_said(doing: str, hint: str = OUT_OF_MEMORY_HINT) -> Iterator[None]:
    """A CUDA out-of-memory inside as OutOfDeviceMemory: the GPU's limit, not a bug, in a line saying what to try."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise OutOfDeviceMemory(f"out of GPU memory {doing} ({first_line(error)}): {hint}") from error


def _unknown_keywords_said(method: Callable[P, T]) -> Callable[P, T]:
    """The stage `method` saying an unknown keyword (`_keywords_said`) with its own options."""
    known = [name for name in inspect.signature(method).parameters if name != "self"]
    return _keywords_said(method, f"{method.__name__}()", known, "option")


def _refuse_unknown_builder_options(cls: type, caller: str, options: dict[str, object],
                                    others: tuple[str, ...] = ()) -> None:
    """A misspelt keyword option as a ConfigError naming it and the nearest option (not a TypeError), and `models`,
    which `caller` builds itself (a TypeError once the checkpoints had loaded). `others`: `caller`'s own options."""
    if "models" in options:
        raise ConfigError(f"{caller}() builds the models itself: drop models=, or pass them to ZonePipeline(models)")
    known = [*others, *(name for name in inspect.signature(cls).parameters if name != "models")]
    refuse_unknown(f"{caller}()", options, known)


def _unknown_init_options_refused(init: Callable[P, None]) -> Callable[P, None]:
    """The constructor's misspelt keyword option as the same ConfigError as tiny()'s, not a TypeError."""
    return unknown_keywords_refused(init, "ZonePipeline()", list(inspect.signature(init).parameters)[1:])  # no self


CHECKPOINT_OPTIONS = ("ip2p", "magicbrush", "sam", "action_classifier", "sam_type")  # from_pretrained's own


@dataclass(eq=False)
class _ModelHolders:
    """The live pipelines over one ZoneModels, how they placed the models, and the lock their stages share: an
    edit swaps its recording processors into the shared UNet while it denoises, so two pipelines over the same
    models editing at once from two threads mixed their attention records (wrong masks, without a word)."""

    placement: tuple
    pipelines: weakref.WeakSet[ZonePipeline] = field(default_factory=weakref.WeakSet)
    # Re-entered: prepare and finish call the public empty_prompt and segmenter.
    lock: threading.RLock = field(default_factory=threading.RLock)


# Which pipelines hold a ZoneModels, and how they placed them (not on the models: a deep copy would carry it).
_MODEL_HOLDERS: weakref.WeakKeyDictionary[ZoneModels, _ModelHolders] = weakref.WeakKeyDictionary()


def _take_models(models: ZoneModels, pipeline: ZonePipeline, placement: tuple) -> threading.RLock:
    """A pipeline moves, casts and lays out its models in place (and sets their attention): a second pipeline over
    the same models with another (device, dtype, VAE and UNet layouts, attention) would silently change the first
    one's, whose CUDA graphs would then read freed memory. Refused while any pipeline over them lives (not only the
    latest: once a second one with the same settings was gone, a third could change the first one's models).
    Returns the lock the pipelines over these models share."""
    holders = _MODEL_HOLDERS.setdefault(models, _ModelHolders(placement))
    if holders.placement != placement and holders.pipelines:
        gc.collect()  # a pipeline that only a reference cycle keeps (a caught exception's frames, say) is no holder
    if holders.placement != placement and holders.pipelines:
        device, dtype, vae_nhwc, unets_nhwc, attention = holders.placement
        raise ConfigError(f"these models are in use by another ZonePipeline ({device}, {dtype}, UNets "
                          f"{'channels-last' if unets_nhwc else 'contiguous'}, VAE "
                          f"{'channels-last' if vae_nhwc else 'contiguous'}, {attention} attention), and a pipeline "
                          "changes its models in place: give this one the same settings, or copy.deepcopy(models)")
    holders.placement = placement
    holders.pipelines.add(pipeline)
    return holders.lock


def check_pretrained_present(ip2p: str, magicbrush: str, sam: str | Path | None,
                             action_classifier: str | Path | None, sam_type: str | None, segmenter: str) -> None:
    """CheckpointError naming every checkpoint `from_pretrained` would miss, none loaded (for a process that
    does not load them itself: Ray Serve's replicas each load their own)."""
    sam, action_classifier = _checkpoint_files(sam, checked_sam_type(sam_type), segmenter, action_classifier)
    check_checkpoints_present(ip2p, magicbrush, sam, action_classifier)


def _checkpoint_files(sam: str | Path | None, sam_type: str | None, segmenter: str,
                      action_classifier: str | Path | None) -> tuple[str | Path | None, str | Path | None]:
    """The SAM and action-classifier files `from_pretrained` loads, defaults resolved."""
    if action_classifier is None and DEFAULT_ACTION_CLASSIFIER.is_file():  # ZONE's section 2: the classifier
        action_classifier = DEFAULT_ACTION_CLASSIFIER  # when its weights are there, the keyword rule otherwise
    return _sam_checkpoint(sam, sam_type, segmenter), action_classifier


def _sam_checkpoint(sam: str | Path | None, sam_type: str | None, segmenter: str) -> str | Path | None:
    """The SAM .pth to load: none for the ONNX segmenter (its export names its own model), where a
    given checkpoint or type would be silently unread; else `sam`, by default `DEFAULT_SAM`."""
    if segmenter != "onnx":
        return DEFAULT_SAM if sam is None else sam
    pairs = (("sam", sam, "PATH"), ("sam_type", sam_type, "TYPE"))
    given = [option(name, placeholder) for name, value, placeholder in pairs if value is not None]
    if given:
        raise ConfigError(f"{option('segmenter', 'onnx')} runs the SAM export in {option('sam_onnx', 'DIR')} and "
                          f"reads no SAM checkpoint: drop {' and '.join(given)}")
    return None


class ZonePipeline:
    """Zero-shot instruction-guided local editing: `pipe.edit(image, "make the dog a golden statue")`.

    Built by `from_pretrained` (real checkpoints), `tiny` (random test models) or from loaded `ZoneModels`, with
    these options (each also a `zone edit` flag: `sam_onnx` is `--sam-onnx`):

    - device: auto (CUDA where there is one), cpu, cuda, cuda:N. dtype: fp32 (the reference's; default), fp16
      or bf16 (CUDA only).
    - default_config: the EditConfig of an edit that passes none.
    - denoiser: fused (default: both UNets as one batched step), eager (the plain reference), compile
      (torch.compile), tensorrt (with engines=DIR from `zone export unet`), or a Denoiser instance to share.
    - segmenter: torch (SAM in PyTorch; default), onnx (with sam_onnx=DIR from `zone export sam`).
      sam_precision: SAM's image encoder in fp32 (default), bf16, or fp16 (CUDA only).
    - kernels, group_norm: auto (Triton on CUDA; default), torch or triton, for localization and GroupNorm.
      attention: sdpa (default) or xformers.
    - cuda_graphs, channels_last: None (the engine's choice on CUDA), True or False.

    README.md's "Denoisers", "Localization kernels" and "Speed" sections say which to pick.
    """

    @_unknown_init_options_refused
    def __init__(
        self, models: ZoneModels, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
        default_config: EditConfig | None = None, denoiser: str | Denoiser = "fused", segmenter: str = "torch",
        kernels: str = "auto", engines: str | Path | None = None, sam_onnx: str | Path | None = None,
        cuda_graphs: bool | None = None, attention: str = "sdpa", sam_precision: str = "fp32",
        channels_last: bool | None = None, group_norm: str = "auto",
    ) -> None:
        if not isinstance(models, ZoneModels):  # a model id or a folder, say: what from_pretrained takes
            raise ConfigError(f"ZonePipeline takes the loaded ZoneModels, not {a_type(models)}: load "
                              "checkpoints with ZonePipeline.from_pretrained(ip2p=..., magicbrush=..., sam=...), or "
                              "use ZonePipeline.tiny() for random test models")
        denoiser, segmenter, kernels, attention, sam_precision, group_norm = map(
            lowered_name, (denoiser, segmenter, kernels, attention, sam_precision, group_norm))
        if segmenter == "torch" and models.sam is None:
            raise ConfigError("no SAM checkpoint was loaded: pass sam=CKPT, or segmenter='onnx' with sam_onnx=DIR")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        check_backends(self.device, denoiser=denoiser, engines=engines, segmenter=segmenter, kernels=kernels,
                       sam_onnx=sam_onnx, sam_precision=sam_precision, group_norm=group_norm, attention=attention,
                       cuda_graphs=cuda_graphs, channels_last=channels_last)
        self.sam_dtype = DTYPES[sam_precision]
        warn_if_bf16_is_emulated(self.device, self.dtype, self.sam_dtype)
        # Checked before gigabytes move:
        self.default_config = EditConfig() if default_config is None else default_config
        # Shared by every pipeline over these models: their stages run the same modules.
        placement = (self.device, self.dtype, bool(channels_last),
                     unets_channels_last(self.device, self.dtype, channels_last), attention)
        self._lock = _take_models(models, self, placement)
        # Not under another pipeline's edit: xformers would replace its recording processors. Weights that do not
        # fit the GPU: a line saying what to try, not torch's traceback.
        with self._lock, _out_of_memory_said(f"moving the models to {self.device}", MODELS_OUT_OF_MEMORY_HINT):
            configure_attention(models, attention, self.device)
            # channels_last: convolutions in NHWC, where GPUs have their fastest fp16/bf16 kernels; None: the
            # UNets' only, on CUDA in half precision (models.unets_channels_last). The models change in place.
            self.models = models.to(self.device, self.dtype, channels_last)
        # The text encoder and VAE replayed from CUDA graphs wherever the denoiser's steps are: on CUDA,
        # unless graphs are turned off or the plain reference (eager) is asked for.
        graphed = captures_stages(self.device, cuda_graphs, denoiser)
        # group_norm: the UNets' and VAE's GroupNorms by kernel 3 or PyTorch (make_group_norms says where).
        unet_norms, self.vae_norms = make_group_norms(group_norm, self.device, denoiser, graphed)
        self.denoiser = make_denoiser(self.models, denoiser, self.device, engines, cuda_graphs, unet_norms)
        # The backend's name (fused and compile are one class), or a Denoiser instance's class, for repr.
        self.denoiser_kind = denoiser if isinstance(denoiser, str) else type(denoiser).__name__
        self.group_norms = group_norm_names(self.denoiser, self.vae_norms)  # what runs, for reports
        self.run: Run = CapturedCalls() if graphed else eager
        self.accumulate, self.binarize = make_localization_kernels(kernels, self.device)
        self.segmenter_kind, self.sam_onnx = segmenter, sam_onnx
        self._segmenters: dict[SamConfig, Segmenter] = {}
        # Each edit's latents as denoise returned them, for finish to check it is given those.
        self._denoised: weakref.WeakKeyDictionary[PreparedEdit, torch.Tensor] = weakref.WeakKeyDictionary()
        self._empty_prompt: torch.Tensor | None = None
        if segmenter == "onnx":  # its sessions opened now: a graph ONNX Runtime cannot load, or an encoder and
            self.segmenter(self.default_config.sam)  # decoder of two SAMs, was said after an edit's denoising

    @classmethod
    def from_pretrained(
        cls, ip2p: str = IP2P_ID, magicbrush: str = MAGICBRUSH_ID,
        sam: str | Path | None = None, action_classifier: str | Path | None = None,
        device: str | torch.device = "auto", dtype: str | torch.dtype | None = None, sam_type: str | None = None,
        **kwargs: object,
    ) -> ZonePipeline:
        """Real checkpoints from local folders, the offline Hugging Face cache, and a SAM .pth file
        (`sam`, default `DEFAULT_SAM`); `action_classifier`: by default `DEFAULT_ACTION_CLASSIFIER` where that
        file is, else none (the keyword rule decides, with a warning). With `segmenter="onnx", sam_onnx=DIR` the
        PyTorch SAM is never loaded: pass neither `sam` nor `sam_type` then."""
        # Now, not once the checkpoints have loaded (minutes).
        _refuse_unknown_builder_options(cls, "from_pretrained", kwargs, CHECKPOINT_OPTIONS)
        kwargs = lowered_backend_names(kwargs)
        for name, value in (("ip2p", ip2p), ("magicbrush", magicbrush), ("sam", sam),
                            ("action_classifier", action_classifier)):
            if not isinstance(value, str | os.PathLike) and (value is not None or name in ("ip2p", "magicbrush")):
                raise ConfigError(f"from_pretrained: {name} must be a model id or a path, got {value!r}")
            if isinstance(value, str) and not value.strip():  # '' read as the current folder: "no model_index.json"
                raise ConfigError(f"from_pretrained: {name} is empty: pass a model id or a path, or leave it out "
                                  "for its default")
        sam_type = checked_sam_type(sam_type)
        sam, action_classifier = _checkpoint_files(sam, sam_type, kwargs.get("segmenter", "torch"), action_classifier)
        target = resolve_device(device)
        load_dtype = resolve_dtype(dtype, target)
        check_backends(target, **kwargs)
        models = load_pretrained(ip2p, magicbrush, sam, action_classifier, sam_type, load_dtype)
        return cls(models, target, load_dtype, **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", **kwargs: object) -> ZonePipeline:
        """Tiny random models, built offline in seconds: for tests and the demo (the edit is meaningless).
        Their default config keeps SAM's masks of random weights (`SamConfig.for_random_weights()`), unless
        `default_config=` is given."""
        if checkpoints := [name for name in kwargs if name in CHECKPOINT_OPTIONS]:
            raise ConfigError(f"tiny() builds tiny random models and reads no checkpoint: drop "
                              f"{', '.join(checkpoints)} (from_pretrained takes them)")
        _refuse_unknown_builder_options(cls, "tiny", kwargs, ("seed",))
        kwargs.setdefault("default_config", EditConfig(sam=SamConfig.for_random_weights()))
        return cls(build_tiny_components(seed), device, **kwargs)

    @property
    def default_config(self) -> EditConfig:
        """The config of an edit that passes none."""
        return self._default_config

    @default_config.setter
    def default_config(self, config: EditConfig) -> None:
        self._default_config = _checked_edit_config(config, "default_config")  # checked now, not inside the next edit

    @_locked_on_device
    def empty_prompt(self) -> torch.Tensor:
        """The empty prompt's text embedding (1, 77, C): the same for every edit, so encoded once."""
        if self._empty_prompt is None:
            self._empty_prompt = encode_prompt(self.models.tokenizer, self.models.text_encoder, "", self.run)
        return self._empty_prompt

    @_locked_on_device
    def segmenter(self, config: SamConfig) -> Segmenter:
        """The refinement segmenter for `config`'s SAM settings, made on first use and kept; configs of one
        `points_per_batch` share its networks (SAM, or ONNX Runtime's sessions)."""
        if config not in self._segmenters:
            # One made for other thresholds lends its networks: ONNX Runtime's sessions were loaded anew for every
            # config an edit passed, and kept (a service's per-request thresholds grew memory without bound).
            twin = next((made for known, made in self._segmenters.items()
                         if known.points_per_batch == config.points_per_batch and hasattr(made, "with_config")), None)
            self._segmenters[config] = twin.with_config(config) if twin is not None else make_segmenter(
                self.models, config, self.segmenter_kind, self.device, self.sam_onnx, self.sam_dtype
            )
        return self._segmenters[config]

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        # pool.map(pipe.edit, images) pickles the pipeline: "cannot pickle '_thread.RLock' object" said not what to do.
        raise ConfigError("a ZonePipeline cannot be pickled or deep-copied (it holds loaded models on its device and "
                          "a lock): build one in each process that edits (say in a multiprocessing Pool's initializer) "
                          "and send it images, EditConfigs and EditRequests without cancel, which pickle, as "
                          "EditResults do; for another pipeline here, ZonePipeline(copy.deepcopy(pipe.models), ...)")

    def __copy__(self) -> ZonePipeline:
        """copy.copy(pipe), as before __reduce_ex__ refused pickling: the same models, lock and state (another
        default_config, say), and a holder of the models as the pipeline is."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        _MODEL_HOLDERS[self.models].pipelines.add(twin)
        return twin

    def __repr__(self) -> str:  # a REPL shows where and how it edits, not an address
        return (f"ZonePipeline(device={self.device}, dtype={self.dtype}, denoiser={self.denoiser_kind!r}, "
                f"segmenter={self.segmenter_kind!r}, sam_dtype={self.sam_dtype})")

    @_unknown_keywords_said
    def edit(
        self, image: image_io.ImageSource, instruction: str, config: EditConfig | None = None, *, progress: bool = False
    ) -> EditResult:
        """Edit `image` (path, PIL image or array) as `instruction` says; only the edited region changes."""
        check_switch("progress", progress)
        prepared = self.prepare(image, instruction, config)
        (latents,) = self.denoise([prepared], progress=progress)
        return self.finish(prepared, latents, progress=progress)

    # Typed by return_exceptions: without it every item is an EditResult (a type checker said
    # `results[0].image` was no attribute of Exception).
    @overload
    def edit_batch(self, requests: Sequence[EditRequest], *, progress: bool = ...,
                   return_exceptions: Literal[False] = ...) -> list[EditResult]: ...

    @overload
    def edit_batch(self, requests: Sequence[EditRequest], *, progress: bool = ...,
                   return_exceptions: bool) -> list[EditResult | Exception]: ...

    @_unknown_keywords_said
    def edit_batch(
        self, requests: Sequence[EditRequest], *, progress: bool = False, return_exceptions: bool = False
    ) -> list[EditResult] | list[EditResult | Exception]:
        """Several edits, those of one batch key denoised together; results in the order of `requests`.

        Each edit gets the result it would get from `edit` alone, up to float rounding of a larger
        batch (tests/test_batching.py: masks identical, images within one uint8 level; rarely, a level's
        difference in I_sty tips a SAM threshold, and a pixel or a few of M_f and the output differ). With
        `return_exceptions`, a request that fails (bad input, cancelled, a fault in its own work)
        has its exception in its place and the others go on; else the first failure raises as soon as it is
        known (a request's bad input before any edit is denoised), noting on Python 3.11+ which request it was.
        """
        if not isinstance(requests, Sequence) or not all(isinstance(r, EditRequest) for r in requests):
            raise ConfigError(f"edit_batch takes a list of EditRequest(image, instruction[, config, cancel]), got "
                              f"{_type_names(requests)}")
        check_switch("progress", progress)
        check_switch("return_exceptions", return_exceptions)
        outcomes: list[EditResult | Exception | None] = [None] * len(requests)
        groups: dict[BatchKey, list[tuple[int, PreparedEdit]]] = {}
        for index, request in enumerate(requests):
            outcomes[index] = self._attempt(request, lambda r=request: self.prepare(r.image, r.instruction, r.config))
            if isinstance(outcomes[index], PreparedEdit):
                groups.setdefault(outcomes[index].batch_key, []).append((index, outcomes[index]))
            elif not return_exceptions:  # before the other requests' minutes of work, which would be lost
                _raise_for_request(outcomes[index], index)
        for members in groups.values():
            finished = self._denoise_and_finish([requests[i] for i, _ in members], [p for _, p in members], progress)
            for (index, _), outcome in zip(members, finished, strict=True):
                outcomes[index] = outcome
                if isinstance(outcome, Exception) and not return_exceptions:  # before the next group's work
                    _raise_for_request(outcome, index)
        return outcomes

    def _denoise_and_finish(
        self, requests: list[EditRequest], prepared: list[PreparedEdit], progress: bool
    ) -> list[EditResult | Exception]:
        """One group of one batch key. If the batched denoise fails, each edit is retried alone, so a
        fault that belongs to one request fails that request only."""
        def all_cancelled() -> bool:
            return all(request.cancelled() for request in requests)

        try:
            latents = self.denoise(prepared, progress=progress, stop=all_cancelled)
        except EditCancelled as error:
            return [error] * len(requests)
        except Exception as error:
            if len(prepared) == 1:
                return [error]
            if isinstance(error, OutOfDeviceMemory):  # said: the retries are slower, and a warm-up passes through them
                log.warning("a batch of %d edits ran out of GPU memory in denoising: each is retried alone (a smaller "
                            "batch, --max-batch or --batch-size, may fit)", len(prepared))
            return [outcome for request, edit in zip(requests, prepared, strict=True)
                    for outcome in self._denoise_and_finish([request], [edit.restart()], progress)]
        return [
            self._attempt(request, lambda e=edit, z=z: self.finish(e, z, progress=progress))
            for request, edit, z in zip(requests, prepared, latents, strict=True)
        ]

    @staticmethod
    def _attempt(request: EditRequest, work: Callable[[], T]) -> T | Exception:
        if request.cancelled():
            return EditCancelled("the edit was cancelled before it finished")
        try:
            return work()
        except Exception as error:  # one request's fault stays with that request
            return error

    @_unknown_keywords_said
    @_locked_on_device
    def prepare(self, image: image_io.ImageSource, instruction: str, config: EditConfig | None = None) -> PreparedEdit:
        """Steps 1-4 of one edit: check the inputs, encode the instruction, pick the action, encode the image."""
        config = self.default_config if config is None else _checked_edit_config(config, "config")
        models, watch = self.models, Stopwatch(self.device)
        started = time.perf_counter()

        # 1. Check inputs; shrink and pad to the working size.
        original, notes = image_io.read_image(image)
        instruction = check_instruction(instruction)
        geometry = image_io.working_geometry(*original.shape[:2], config.max_side, config.size_multiple)
        coarse = _coarse_grid_note(geometry)
        notes += (coarse,) if coarse else ()
        for note in notes:  # the truncation note's warning is encode_instruction's own
            warn_caller(note)
        working = image_io.to_working(original, geometry)
        latent_size = geometry.latent_size

        # 2. Encode the instruction once, for both UNets.
        with watch("text"):
            encoded = encode_instruction(models.tokenizer, models.text_encoder, instruction, self.empty_prompt(),
                                         self.run)

        # 3. Decide the action.
        with watch("action"):
            action = config.action or classify_action(
                instruction, models.tokenizer, models.text_encoder, models.action_classifier,
                config.action_rule, self.run,
            )

        # 4. Image latents and the shared initial noise.
        with watch("vae_encode"):
            inputs = DenoiseInputs(
                context=encoded.context,
                image_latents=encode_image_latents(models.vae, working, self.dtype, self.run, self.vae_norms),
                noise=initial_noise(config.seed, latent_size, self.device, self.dtype),
            )
        if encoded.truncated:
            notes += (TRUNCATED,)
        return PreparedEdit(
            original, working, geometry, config, encoded, action, inputs, AttentionAccumulator(self.accumulate),
            watch, started, notes, models=weakref.ref(models),
        )

    @_unknown_keywords_said
    @_locked_on_device
    def denoise(
        self, edits: Sequence[PreparedEdit], *, progress: bool = False, stop: Callable[[], bool] | None = None
    ) -> list[torch.Tensor]:
        """Step 5 for edits of one batch key: dual denoising, recording IP2P's cross-attention into
        each edit's accumulator. One batched loop if the denoiser can batch, else one loop an edit.
        `stop` is polled before the first step and after every step; when it says so, the loop ends with
        `EditCancelled` (before the first: the edits untouched, no restart() needed)."""
        check_switch("progress", progress)
        _check_stop(stop)
        if not isinstance(edits, Sequence) or not edits or not all(isinstance(e, PreparedEdit) for e in edits):
            raise ConfigError(f"denoise takes a non-empty list of the PreparedEdits prepare() returns, got "
                              f"{_type_names(edits)}")
        if any(edit.models() is not self.models for edit in edits):  # another pipeline's encoders made its inputs
            raise ConfigError("an edit given to denoise was prepared by a pipeline over other models: its text "
                              "embedding and image latents are theirs; prepare it with this pipeline")
        if any(edit.attention.total is not None for edit in edits):  # its record would mix two runs' attention
            raise ConfigError("an edit given to denoise was denoised before (or stopped part way): its attention "
                              "record is not empty; pass edit.restart() to denoise it again")
        if len({edit.batch_key for edit in edits}) != 1:
            raise ConfigError("edits denoised together need one batch key (latent size, steps, guidance): "
                              "group them by PreparedEdit.batch_key, as edit_batch does")
        # Asked once before any work: a stop already set costs no step, and one answering no bool is said at once.
        if stop is not None and _stop_says(stop()):
            raise EditCancelled("the edit was cancelled before denoising")
        config = edits[0].config
        runs = [list(edits)] if isinstance(self.denoiser, BatchDenoiser) and len(edits) > 1 else [[e] for e in edits]
        watch, latents = Stopwatch(self.device), []
        with watch("denoise"), progress_bar(
            total=config.steps * len(runs), desc="denoising", unit="step", disable=not progress
        ) as bar:
            def on_step(_: int) -> None:
                bar.update(1)
                if stop is not None and _stop_says(stop()):
                    raise EditCancelled("the edit was cancelled while denoising")

            for run in runs:
                latents += self._denoise_run(run, on_step)
        for edit, denoised in zip(edits, latents, strict=True):
            edit.watch.seconds["denoise"] = watch.seconds["denoise"]  # the wall time each edit waited for
            self._denoised[edit] = denoised
        return latents

    def _denoise_run(self, run: list[PreparedEdit], on_step: Callable[[int], None]) -> list[torch.Tensor]:
        betas = [edit.config.beta_for(edit.action) for edit in run]  # each edit's own: beta is not in the key
        if len(run) == 1:
            edit = run[0]
            return [self.denoiser(edit.inputs, edit.config, betas[0], edit.attention, on_step=on_step)]
        # A denoiser reads only the batch key's fields of a config (steps, guidance): the first edit's serves all.
        return self.denoiser.denoise_batch([e.inputs for e in run], run[0].config, betas, [e.attention for e in run],
                                           on_step=on_step)

    @_unknown_keywords_said
    @_locked_on_device
    def finish(self, edit: PreparedEdit, latents: torch.Tensor, *, progress: bool = False) -> EditResult:
        """Steps 6-9 of one edit: localize, decode, refine, blend; results at the input size."""
        check_switch("progress", progress)
        _check_denoised(edit, latents, self._denoised)
        config, watch = edit.config, edit.watch.copy()  # finishing an edit again times that finish, not both
        if not torch.isfinite(latents).all():  # else a black I_sty and a region over the whole image, unsaid
            raise _diverged(config, "inf/NaN latents")
        with watch("localize"):  # 6. The edit mask M_b.
            located = self._localize(edit)
        with watch("vae_decode"):  # 7. I_sty.
            pixels = decode_latents(self.models.vae, latents, self.run, self.vae_norms)
            if not torch.isfinite(pixels).all():  # latents of 1e30 (finite: one step) overflow in the decoder
                raise _diverged(config, "latents too large to decode")
            styled = to_uint8_image(pixels)
        with watch("refine"):  # 8. Refine M_b with SAM (on the input for REMOVE: the object is gone from I_sty).
            segmented = edit.working if edit.action is Action.REMOVE else styled
            refined = refine_with_sam(self.segmenter(config.sam), segmented, located.mask_b, config, progress=progress)
        with watch("blend"):  # 9. Find R at the working size, composite at the input size; the heatmap.
            blended = self._blend(edit, styled, located, refined)
        unedited = _unedited_note(located, blended["region"])
        if unedited:
            warn_caller(unedited)
        timings = {stage: watch.seconds.get(stage, 0.0) for stage in STAGES}
        timings["total"] = time.perf_counter() - edit.started
        return EditResult(
            **blended, action=edit.action,
            used_fallback=refined.used_fallback, instruction_truncated=edit.encoded.truncated, timings=timings,
            notes=edit.notes + ((unedited,) if unedited else ()),
        )

    def _localize(self, edit: PreparedEdit) -> Localization:
        config, geometry = edit.config, edit.geometry
        return localize(
            edit.attention.average(), attention_grid(geometry.latent_size), edit.encoded.token_count - 1,
            geometry.padded_size, rule=config.threshold_rule, reference_threshold=config.reference_threshold,
            paper_threshold=config.paper_threshold, min_area=config.min_region_area, binarize=self.binarize,
        )

    def _enlarged(self, image: np.ndarray, geometry: image_io.Geometry) -> np.ndarray:
        """A uint8 RGB image at the working size, at the input size: on CUDA enlarged on the device (Pillow's
        bytes, pillow_resize.py), else by Pillow on the host (where Pillow is the faster)."""
        if self.device.type == "cuda":
            return to_input_size_on(self.device, image, geometry)
        return image_io.to_input_size(image, geometry, is_mask=False)

    def _blend(self, edit: PreparedEdit, styled: np.ndarray, located: Localization,
               refined: Refinement) -> dict[str, np.ndarray]:
        """The edited image, the masks and the heatmap EditResult holds, at the input size. R is found at the
        working size (its FFTs on the pipeline's device); the composite is made at the input size."""
        config, geometry = edit.config, edit.geometry
        heatmap = heatmap_overlay(edit.working, located.difference)
        # The heatmap is resized beside the rest (Pillow lets go of the GIL): on a 12 MP photo each of the two
        # bicubic resizes takes about 0.3 s of one core.
        with ThreadPoolExecutor(1) as beside:
            heatmap = beside.submit(self._enlarged, heatmap, geometry)
            region = blend.fft_edit_region(
                styled, edit.working, refined.dilated, radius=config.fft_radius, threshold=config.fft_threshold,
                close_kernel=config.close_kernel, device=self.device,
            )
            masks = {name: image_io.to_input_size(mask, geometry, is_mask=True)
                     for name, mask in (("mask_b", located.mask_b), ("mask_f", refined.mask_f), ("region", region))}
            styled = self._enlarged(styled, geometry)
            image = blend.composite(edit.original, styled, masks["region"], masks["mask_f"], alpha=config.seam_alpha)
            difference = image_io.levels_to_input_size(located.difference, geometry)
            return dict(image=image, styled=styled, seam=blend.seam(masks["region"], masks["mask_f"]),
                        heatmap=heatmap.result(), difference=difference, **masks)
