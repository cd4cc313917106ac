"""Configuration: every number of ZONE (../shared/ZONE.md) as small frozen dataclasses.

Defaults follow the authors' reference implementation; where the paper differs, its value is a
documented option (`threshold_rule="paper"`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import numbers
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal

from .errors import ConfigError, DeviceError, nearest, unknown_keywords_refused


class Action(str, Enum):
    """What the instruction does to the image; decides the MagicBrush blend weight and SAM's input."""

    CHANGE = "change"
    ADD = "add"
    REMOVE = "remove"

    @classmethod
    def _missing_(cls, value: object) -> Action:
        """A name in any case, with spaces around ("REMOVE", " remove "), as EditConfig and the command line take
        it (Action("REMOVE") was a bare "is not a valid Action"); an unknown one a ValueError naming the actions."""
        name = value.strip().lower() if isinstance(value, str) else value
        if member := next((action for action in cls if action.value == name), None):
            return member
        raise ValueError(f"{value!r} is not an action: use {', '.join(action.value for action in cls)}")


# Below the scheduler's 1000 training timesteps: at 1000 its linspace spacing (999/1000 apart) rounds two
# timesteps to the same one, a zero step size, and the solver (diffusers' own as well) divides by it: NaN.
MAX_STEPS = 999
# torch's CPU generator (the initial noise's, and the random weights') keeps a seed's low 32 bits: 2**32 would
# repeat seed 0.
MAX_SEED = 2**32 - 1
# A whole number as people write it, for the command line and the server's form fields alike: not Python's
# "4_2" and "４２" or pydantic's "10.0", each read as a number the user may not have meant.
DECIMAL_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")
# The largest working size a side (EditConfig.max_side, an export's image size, a benchmark's resolution): four
# times SD1.5's 512 a side. Larger is a typo more likely than a use (an export at 1000000 px died allocating).
MAX_WORKING_SIDE = 2048
LATENT_SCALE = 8  # SD's VAE: one latent pixel per 8x8 image pixels
MIN_SIDE = LATENT_SCALE  # the smallest image side accepted: one latent pixel
# What to do to image_io.make_sample_image's house: the demo's, a server's warm-up's and the load tests' edit.
SAMPLE_INSTRUCTION = "make the house a golden statue"
# The largest image accepted, in pixels (an input, an upload: zone serve --max-pixels at most this): 100
# megapixels, decoded, is 300 MB of RGB before any model runs.
MAX_PIXELS = 100_000_000
# The most edits one batch takes (zone serve --max-batch, zone bench --batch): 64 times the server's default.
# A server warms up every padded batch size up to its --max-batch: 100000 was still warming up after minutes.
MAX_BATCH = 256
# segment-anything's default is 32 a side (1,024 prompts); 256 a side is 65,536, each a decoder pass.
MAX_POINTS_PER_SIDE = 256
# Mask morphology: the working image is at most 512 pixels a side by default, so a kernel (or a dilation's
# iterations) beyond this covers any image many times over; larger ones only exhaust memory.
MAX_KERNEL = 1023
MAX_CROP_LAYERS = 3  # SamConfig.crop_n_layers (segment-anything's examples use 1)
# β weighs MagicBrush's next latents against IP2P's (ZONE's are 0.2 and 0.01): at 1000 MagicBrush alone is within
# 0.1 %; far beyond, β·z overflows (float32 near 1e37, fp16 near 1e4) and the edit diverges, blaming the guidance.
MAX_BETA = 1000.0

# Output order of the reference action classifier's logits (ckpts/action_classifier.pth).
CLASSIFIER_ACTIONS: tuple[Action, ...] = (Action.CHANGE, Action.ADD, Action.REMOVE)

# The names a user picks from: the implementations behind them (zone_engine.backends, zone_engine.models)
# and the checkpoints' defaults. Kept here, free of torch, so `zone --help` and a mistyped option answer
# at once instead of after torch's import.
DENOISERS = ("eager", "fused", "compile", "tensorrt")
SEGMENTERS = ("torch", "onnx")
LOCALIZATION_KERNELS = ("auto", "torch", "triton")
GROUP_NORMS = ("auto", "torch", "triton")
ATTENTION = ("sdpa", "xformers")
SAM_PRECISIONS = ("fp32", "bf16", "fp16")
MODEL_SIZES = ("tiny", "sd15")  # zone_engine.models.PRESETS: random-weight architectures
SAM_TYPES = ("vit_h", "vit_l", "vit_b")  # segment-anything's checkpoints (zone_engine.models.SAM_SIZES adds tiny)
IP2P_ID = "timbrooks/instruct-pix2pix"
MAGICBRUSH_ID = "vinesmsuic/magicbrush-jul7"
DEFAULT_SAM = Path("ckpts/sam_vit_h_4b8939.pth")  # where the reference repository keeps it
DEFAULT_ACTION_CLASSIFIER = Path("ckpts/action_classifier.pth")  # read when there (the keyword rule otherwise)


_SIZE = re.compile(r"\s*(\d+)\s*x\s*(\d+)\s*", re.IGNORECASE)


def parse_hw(text: str) -> tuple[int, int]:
    """'512x768' (any case, spaces around the parts) -> (512, 768): an image size as (height, width)."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ConfigError(f"cannot read size {text!r}: write HEIGHTxWIDTH in pixels, e.g. 512x512")
    return int(match[1]), int(match[2])


_DEVICE_NAME = re.compile(r"auto|cpu(?::0)?|cuda(?::(?:0|[1-9][0-9]*))?")  # what torch.device takes, of these


def device_kind(name: str) -> str:
    """auto, cpu or cuda for a device name the engine runs on (auto, cpu, cuda, cuda:N; any case), else a
    DeviceError."""
    if not isinstance(name, str):
        raise DeviceError(f"device must be a name (auto, cpu, cuda or cuda:N) or a torch.device, got {name!r}")
    text = name.strip().lower()
    if not _DEVICE_NAME.fullmatch(text):
        raise DeviceError(f"device {name!r} is not one the engine runs on: use auto, cpu, cuda or cuda:N")
    return text.partition(":")[0]


def check_precision(dtype: str, kind: str) -> None:
    """Half precision (fp16, bf16) runs only on CUDA; `kind` auto passes (what it finds is not known yet)."""
    if dtype != "fp32" and kind == "cpu":
        raise DeviceError(f"{option('dtype', dtype)} runs only on CUDA here; on the CPU use fp32")


# ZonePipeline's options that choose how an edit runs (not what it computes): the command line's, a server's
# PipelineSpec's and check_backend_options' names for them; those of them that take a backend's name.
BACKEND_OPTIONS = ("denoiser", "kernels", "engines", "segmenter", "sam_onnx", "cuda_graphs", "attention",
                   "sam_precision", "channels_last", "group_norm")
BACKEND_NAME_OPTIONS = ("denoiser", "segmenter", "kernels", "attention", "sam_precision", "group_norm")


def option(name: str, value: object) -> str:
    """An option as the command line and the Python API each write it, for the errors both reach:
    option("denoiser", "fused") -> "--denoiser fused (denoiser='fused')"; a placeholder in capitals stays bare,
    option("engines", "DIR") -> "--engines DIR (engines=DIR)"; True is a switch: "--cuda-graphs (cuda_graphs=True)";
    a whole float as it is typed, option("timeout_s", 5.0) -> "--timeout-s 5 (timeout_s=5.0)"."""
    flag = "--" + name.replace("_", "-")
    if value is True:
        return f"{flag} ({name}=True)"
    keyword_value = value if isinstance(value, str) and value.isupper() else repr(value)
    typed = int(value) if isinstance(value, float) and value.is_integer() else value  # "--timeout-s 5" as typed
    return f"{flag} {typed} ({name}={keyword_value})"


_BOTH_SPELLINGS = re.compile(r"(--(?P<flag>[a-z][a-z0-9-]*)(?: [^\s()]+)?) \((?P<keyword>[a-z][a-z0-9_]*)=[^()]*\)")
# "(--allow-origin, allow_origins)": an option named beside its Python field, with no value.
_NAMED_BOTH_WAYS = re.compile(r"\((?P<flag>--[a-z][a-z0-9-]*), (?P<keyword>[a-z][a-z0-9_]*)\)")


def command_line_spelling(message: str) -> str:
    """`message` with `option`'s Python spelling left out, for the command line to print: "--denoiser tensorrt"."""
    def one(match: re.Match) -> str:
        same = match["flag"].replace("-", "_") == match["keyword"]
        return match[1] if same else match[0]

    def named(match: re.Match) -> str:
        field = match["flag"][2:].replace("-", "_")
        return f"({match['flag']})" if match["keyword"] in (field, field + "s") else match[0]

    return _NAMED_BOTH_WAYS.sub(named, _BOTH_SPELLINGS.sub(one, message))


def lowered_name(value: object) -> object:
    """A backend option's name in any case (`denoiser="Fused"`), as `device`, `dtype` and the command line take
    them; anything else (a Denoiser instance, None) as it is, for the checks to say."""
    return value.lower() if isinstance(value, str) else value


def lowered_backend_names(options: dict[str, object]) -> dict[str, object]:
    """`options` with the backend options' names lowered (lowered_name); other options as they are."""
    return {key: lowered_name(value) if key in BACKEND_NAME_OPTIONS else value for key, value in options.items()}


def check_backend_options(
    kind: str, denoiser: str | object = "fused", engines: object = None, *, segmenter: str = "torch",
    kernels: str = "auto", sam_onnx: object = None, sam_precision: str = "fp32", group_norm: str = "auto",
    attention: str = "sdpa", cuda_graphs: bool | None = None, channels_last: bool | None = None,
    **_other_options: object,
) -> None:
    """ConfigError / DeviceError for a backend option that names nothing, that its backend would not read
    (silently ignored otherwise), that lacks what it needs, or that needs CUDA on the CPU (device `kind` auto
    passes those). Free of torch, so `zone edit` says it at once, and ZonePipeline before any weights move."""
    named = [("segmenter", segmenter, SEGMENTERS), ("localization kernels", kernels, LOCALIZATION_KERNELS),
             ("GroupNorm implementation", group_norm, GROUP_NORMS),
             ("attention backend", attention, ATTENTION), ("SAM precision", sam_precision, SAM_PRECISIONS)]
    if isinstance(denoiser, str):  # else a Denoiser instance, configured already (make_denoiser checks it)
        named.append(("denoiser backend", denoiser, DENOISERS))
    for what, value, names in named:
        if value not in names:
            raise ConfigError(f"unknown {what} {value!r}: available {', '.join(names)}")
    check_switch("cuda_graphs", cuda_graphs, none_means="the engine's choice")
    check_switch("channels_last", channels_last, none_means="the engine's choice")
    # Errors name each option both ways (`option`): the command line and the Python API reach them alike.
    _check_device_needs(kind == "cpu", denoiser, attention, cuda_graphs, sam_precision)
    _check_pairings(denoiser, engines, segmenter, sam_onnx, sam_precision, cuda_graphs)


def _check_device_needs(on_cpu: bool, denoiser: object, attention: str, cuda_graphs: bool | None,
                        sam_precision: str) -> None:
    """DeviceError for an option that needs CUDA (or xformers) where it is not."""
    if attention == "xformers" and on_cpu:
        raise DeviceError(f"{option('attention', 'xformers')} needs a CUDA device; on the CPU use "
                          f"{option('attention', 'sdpa')}")
    if attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise DeviceError(f"{option('attention', 'xformers')} needs xformers, which runs on CUDA GPUs: pip install "
                          f"xformers on such a machine (or use {option('attention', 'sdpa')})")
    if cuda_graphs and on_cpu:
        raise DeviceError(f"CUDA graphs need a CUDA device: drop {option('cuda_graphs', True)} or use "
                          f"{option('device', 'cuda')}")
    if denoiser == "tensorrt" and on_cpu:
        raise DeviceError(f"{option('denoiser', 'tensorrt')} needs a CUDA GPU; on the CPU use "
                          f"{option('denoiser', 'fused')}")
    if sam_precision == "fp16" and on_cpu:
        raise DeviceError(f"{option('sam_precision', 'fp16')} runs only on CUDA; on the CPU use fp32 or bf16")


def _check_pairings(denoiser: object, engines: object, segmenter: str, sam_onnx: object, sam_precision: str,
                    cuda_graphs: bool | None) -> None:
    """ConfigError for an option its backend would not read, or a backend without what it needs."""
    if cuda_graphs and denoiser == "eager":
        raise ConfigError(f"the eager reference denoiser has no CUDA-graph path: use {option('denoiser', 'fused')}")
    if denoiser == "tensorrt" and engines is None:
        raise ConfigError(f"{option('denoiser', 'tensorrt')} needs {option('engines', 'DIR')}: a folder written by "
                          "`zone export unet`")
    if engines is not None and denoiser != "tensorrt":
        raise ConfigError(f"{option('engines', 'DIR')} is read by {option('denoiser', 'tensorrt')} only: add that "
                          "denoiser, or drop the engines folder")
    if sam_precision != "fp32" and segmenter != "torch":
        raise ConfigError(f"{option('sam_precision', sam_precision)} is for {option('segmenter', 'torch')}; an ONNX "
                          "export has its own precision (zone export sam --fp16)")
    if segmenter == "onnx" and sam_onnx is None:
        raise ConfigError(f"{option('segmenter', 'onnx')} needs {option('sam_onnx', 'DIR')}: a folder written by "
                          "`zone export sam`")
    if sam_onnx is not None and segmenter != "onnx":
        raise ConfigError(f"{option('sam_onnx', 'DIR')} is read by {option('segmenter', 'onnx')} only: add that "
                          "segmenter, or drop the export folder")


def check_switch(name: str, value: object, *, none_means: str | None = None) -> None:
    """ConfigError unless `value` is True or False (or None, where `none_means` says what it means): a Python
    caller's "no" would be taken as True."""
    if isinstance(value, bool) or (none_means is not None and value is None):
        return
    allowed = f"True, False or None ({none_means})" if none_means else "True or False"
    raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def check_seed(seed: object, name: str = "seed") -> int:
    """A seed as int, else a ConfigError (a bool or 1.5 would be taken as 1, 2**32 as 0)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{name} must be a whole number between 0 and {MAX_SEED} (2**32 - 1), got {seed!r}")
    return int(seed)


def _check_numbers(config: object) -> None:
    """Whole numbers in the `int` fields (counts, sizes, seeds), finite numbers in the `float` ones
    (weights, thresholds), stored as plain int / float: a wrong value is said here, not as a TypeError
    deep in numpy or torch (steps=2.5, seed=1.5) or as a silently broken image (guidance=nan)."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.type == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                hint = " (a generator's seed: generator.initial_seed())" if hasattr(value, "initial_seed") else ""
                raise ConfigError(f"{item.name} must be a whole number{hint}, got {value!r}")
            object.__setattr__(config, item.name, int(value))
        elif item.type == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value):
                raise ConfigError(f"{item.name} must be a finite number, got {value!r}")
            object.__setattr__(config, item.name, float(value))


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past a float's range (10**400): not a number a float field can hold
        return False


def _raise_first_failing(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


class FrozenConfigError(ConfigError, dataclasses.FrozenInstanceError):
    """A field of a config assigned: a ConfigError that is still the FrozenInstanceError dataclasses raise."""


def _unknown_fields_said(cls: type) -> type:
    """The dataclass's constructor (and so `replace`) says an unknown field name as a ConfigError, not a
    TypeError: EditConfig(strength=0.5); and an assignment, `config.steps = 10`, says how to change a frozen
    config (dataclasses said only "cannot assign to field 'steps'")."""
    fields = [item.name for item in dataclasses.fields(cls)]
    cls.__init__ = unknown_keywords_refused(cls.__init__, cls.__name__, fields, noun="field")

    def refuse_assignment(self: object, name: str, value: object) -> None:
        unknown = ""
        if name not in fields:  # config.stpes = 3 was told to replace(stpes=...), a second mistake
            unknown, name = f"{cls.__name__} has no field {name!r}; ", nearest(name, fields) or "FIELD"
        raise FrozenConfigError(f"{unknown}{cls.__name__}'s fields cannot be assigned (one config may serve many "
                                f"edits): make a changed copy, config.replace({name}=...)")

    cls.__setattr__ = refuse_assignment
    return cls


@_unknown_fields_said
@dataclass(frozen=True)
class SamConfig:
    """segment-anything `SamAutomaticMaskGenerator` settings (its own defaults)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    min_mask_region_area: int = 0

    def __post_init__(self) -> None:
        _check_numbers(self)
        _raise_first_failing([
            (self.points_per_side >= 1 and self.points_per_batch >= 1, "points_per_side and points_per_batch must be "
             ">= 1"),
            (self.points_per_side <= MAX_POINTS_PER_SIDE, f"points_per_side must be at most {MAX_POINTS_PER_SIDE}"),
            (self.crop_n_layers >= 0 and self.min_mask_region_area >= 0, "crop_n_layers and min_mask_region_area "
             "must be >= 0"),
            # Layer i adds 4**i crops, each its own image-encoder run: 3 layers are 85 runs (4: 341, minutes each).
            (self.crop_n_layers <= MAX_CROP_LAYERS, f"crop_n_layers must be at most {MAX_CROP_LAYERS}"),
            (0.0 <= self.box_nms_thresh <= 1.0 and 0.0 <= self.crop_nms_thresh <= 1.0, "NMS thresholds (IoU) must be "
             "between 0 and 1"),
            # Scores of 0..1: a threshold above 1 keeps no segment, one below 0 is 0.
            (0.0 <= self.pred_iou_thresh <= 1.0 and 0.0 <= self.stability_score_thresh <= 1.0,
             "pred_iou_thresh and stability_score_thresh must be between 0 and 1"),
            (self.stability_score_offset >= 0, "stability_score_offset must be >= 0"),
        ])

    def replace(self, **changes: object) -> SamConfig:
        """A copy with `changes` (field=value), checked as a new SamConfig is (a ConfigError names a bad one)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_random_weights(cls) -> SamConfig:
        """Thresholds low enough that a randomly initialised SAM still yields segments (tests, demo)."""
        return cls(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def _sam_fields_said(cls: type) -> type:
    """A SamConfig field given to EditConfig (and so its `replace`) as a ConfigError saying it goes in `sam` (it
    named no field and guessed none: EditConfig(points_per_side=16))."""
    init = cls.__init__

    @functools.wraps(init)
    def checked(self: object, *args: object, **kwargs: object) -> None:
        if setting := next((name for name in kwargs if name in SamConfig.__dataclass_fields__), None):
            raise ConfigError(f"{setting} is a field of SamConfig, EditConfig's sam: pass "
                              f"sam=config.sam.replace({setting}=...), config the EditConfig you start from "
                              "(pipe.default_config, say)")
        init(self, *args, **kwargs)

    cls.__init__ = checked
    return cls


@_sam_fields_said
@_unknown_fields_said
@dataclass(frozen=True)
class EditConfig:
    """One edit's settings. Every field has the reference implementation's default, but `action_rule`: "intended"
    max-pools the classifier's logits where the reference took an argmax of token positions ("reference").

    Attributes (ZONE.md's sections):
        steps: denoising steps (DPM-Solver++ 2M). text_guidance, image_guidance: IP2P's two guidance scales.
        seed: the initial noise's seed, 0..4294967295. beta_remove, beta_add_change: how far IP2P's latents are
            pulled towards MagicBrush's each step, by action (`beta_for`).
        action: None classifies the instruction; an Action (or its name) forces it. action_rule: see above.
        max_side, size_multiple: the working size: the longest side shrunk to at most max_side, padded to a
            multiple of size_multiple.
        threshold_rule: "reference" (M_b where min(2d, 255) <= reference_threshold) or "paper" (d <
            paper_threshold). min_region_area: M_b's components under this many pixels are dropped.
        sam: SAM's automatic-mask settings (`SamConfig`). dilate_kernel, dilate_iterations: M_f's dilation D.
        fft_radius, fft_threshold: the FFT low-pass disc and the energy threshold giving the region R.
        close_kernel: R's morphological close. seam_alpha: the styled image's weight on the seam.
    """

    # Denoising (ZONE.md sections 0 and 1).
    steps: int = 20
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    seed: int = 42
    beta_remove: float = 0.2
    beta_add_change: float = 0.01

    # Action (section 2): None classifies the instruction; an Action forces it.
    action: Action | None = None
    action_rule: Literal["intended", "reference"] = "intended"

    # Working size (section 0): shrink the longest side to at most `max_side`, pad to `size_multiple`.
    max_side: int = 512
    size_multiple: int = 32

    # Localization (section 3).
    threshold_rule: Literal["reference", "paper"] = "reference"
    reference_threshold: int = 108  # M_b where min(2*d, 255) <= 108
    paper_threshold: int = 128  # M_b where d < T
    min_region_area: int = 64

    # Refinement (section 4).
    sam: SamConfig = field(default_factory=SamConfig)
    dilate_kernel: int = 3
    dilate_iterations: int = 4

    # Blending (section 5).
    fft_radius: int = 200
    fft_threshold: int = 30
    close_kernel: int = 21
    seam_alpha: float = 0.6

    def __post_init__(self) -> None:
        _check_numbers(self)
        if isinstance(self.action, str) and not isinstance(self.action, Action):
            object.__setattr__(self, "action", parse_action(self.action))
        for name in ("action_rule", "threshold_rule"):  # any case, as action and the command line's names
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, getattr(self, name).lower())
        _raise_first_failing([
            (self.action is None or isinstance(self.action, Action), f"action must be None or 'auto' (classify), "
             f"or add, change or remove (an Action or its name); got {self.action!r}"),
            (isinstance(self.sam, SamConfig), f"sam must be a SamConfig, got {type(self.sam).__name__}"),
            (1 <= self.steps <= MAX_STEPS, f"steps must be between 1 and {MAX_STEPS}"),
            (self.text_guidance >= 0 and self.image_guidance >= 0, "text_guidance and image_guidance must be >= 0 "
             "(1: no guidance; IP2P's defaults 7.5 and 1.5): a negative scale steers away from the instruction"),
            (all(0 <= beta <= MAX_BETA for beta in (self.beta_remove, self.beta_add_change)),
             f"beta_remove and beta_add_change must be between 0 and {MAX_BETA:g}"),
            (self.action_rule in ("intended", "reference"), "action_rule must be 'intended' or 'reference'"),
            (self.threshold_rule in ("reference", "paper"), "threshold_rule must be 'reference' or 'paper'"),
            (self.size_multiple > 0 and self.size_multiple % 32 == 0,  # said first: max_side's range rests on it
             f"size_multiple must be a positive multiple of 32 (the UNet's down-sampling), got {self.size_multiple}"),
            (self.size_multiple <= self.max_side <= MAX_WORKING_SIDE, f"max_side must be at least size_multiple "
             f"({self.size_multiple}) and at most {MAX_WORKING_SIDE}, got {self.max_side}"),
            (0.0 <= self.seam_alpha <= 1.0, "seam_alpha must be between 0 and 1"),
            (self.min_region_area >= 0, "min_region_area must be >= 0"),
            (1 <= self.dilate_kernel <= MAX_KERNEL and 1 <= self.close_kernel <= MAX_KERNEL,
             f"kernel sizes must be between 1 and {MAX_KERNEL}"),
            (self.dilate_iterations >= 0 and self.fft_radius >= 0, "dilate_iterations and fft_radius must be >= 0"),
            (self.dilate_iterations <= MAX_KERNEL, f"dilate_iterations must be at most {MAX_KERNEL}"),
            (all(0 <= t <= 255 for t in (self.reference_threshold, self.paper_threshold, self.fft_threshold)),
             "reference_threshold, paper_threshold and fft_threshold are 8-bit levels: between 0 and 255"),
            (0 <= self.seed <= MAX_SEED, f"seed must be between 0 and {MAX_SEED} (2**32 - 1)"),
        ])

    def beta_for(self, action: Action | str) -> float:
        """MagicBrush blend weight for an action (ZONE.md section 1): an Action or its name ("remove")."""
        chosen = parse_action(action)  # the string "remove" is no `Action.REMOVE`: it got add/change's weight
        if chosen is None:
            raise ConfigError(f"beta_for takes an action (add, change or remove), not {action!r}")
        return self.beta_remove if chosen is Action.REMOVE else self.beta_add_change

    def replace(self, **changes: object) -> EditConfig:
        """A copy with `changes` (field=value), checked as a new EditConfig is (a ConfigError names a bad one)."""
        return dataclasses.replace(self, **changes)


def parse_action(value: str | Action | None) -> Action | None:
    """'auto'/None -> None (classify); 'add'/'change'/'remove' in any case -> Action."""
    if value is None or isinstance(value, Action):
        return value
    name = str(value).strip().lower()
    if name in ("", "auto"):
        return None
    try:
        return Action(name)
    except ValueError:
        raise ConfigError(f"unknown action {value!r}: use auto (classify), add, change or remove") from None


def error_line(error: BaseException | str) -> str:
    """What a command prints for a user's mistake: one line, its options as the command line writes them (the
    Python API's spelling beside them left out)."""
    return f"error: {command_line_spelling(str(error))}"
