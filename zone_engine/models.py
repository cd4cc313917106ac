"""The networks ZONE needs, loaded from local checkpoints or built tiny and random for tests.

Real and tiny models come from the same classes; they differ only in numbers (STYLE.md). Nothing
here ever downloads: Hugging Face ids resolve from the local cache only (`local_files_only=True`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from .config import DEFAULT_ACTION_CLASSIFIER, IP2P_ID, MAGICBRUSH_ID, SAM_TYPES, check_seed, option
from .errors import CheckpointError, ConfigError, first_line, warn_caller
from .paths import expanded, folder_problem

SAM_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}
ACTION_CLASSIFIER_SOURCE = "ckpts/action_classifier.pth of the ZONE reference repository, https://github.com/lsl001006/ZONE"


class ActionClassifier(nn.Module):
    """ZONE's action classifier: a 2-layer MLP applied to every CLIP token state (768 -> 128 -> 3).

    Attribute names match the reference checkpoint's state dict (fc1, fc2).
    """

    def __init__(self, input_size: int, hidden_size: int = 128, num_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, num_classes)

    def forward(self, token_states: torch.Tensor) -> torch.Tensor:
        """(B, 77, C) -> logits (B, 77, 3)."""
        return self.fc2(torch.relu(self.fc1(token_states)))


@dataclass(eq=False)  # one set of networks is itself: compared, and hashed, by identity
class ZoneModels:
    """Every network of one ZONE pipeline. Text encoder and VAE are IP2P's, shared by both UNets."""

    tokenizer: Any  # transformers CLIPTokenizer
    text_encoder: nn.Module  # transformers CLIPTextModel
    vae: nn.Module  # diffusers AutoencoderKL
    ip2p_unet: nn.Module  # diffusers UNet2DConditionModel, 8 input channels
    mb_unet: nn.Module  # MagicBrush: same architecture, other weights
    scheduler_config: dict
    sam: nn.Module | None  # segment_anything Sam; None when refinement runs on an exported SAM
    action_classifier: ActionClassifier | None

    def to(self, device: torch.device, dtype: torch.dtype, channels_last: bool | None = None) -> ZoneModels:
        """In place: every network to `device`; the diffusion networks to `dtype`, and their convolution
        weights to the channels-last (NHWC) layout or the contiguous one: True, the UNets' and the VAE's;
        False, none; None (default), the UNets' on CUDA in fp16/bf16 (`unets_channels_last`)."""
        for net in (self.text_encoder, self.vae, self.ip2p_unet, self.mb_unet):
            net.to(device=device).eval().requires_grad_(False)
            if next(net.parameters()).dtype != dtype:  # diffusers warns on any dtype cast, even a no-op
                net.to(dtype=dtype)
        unets = unets_channels_last(device, dtype, channels_last)
        for net, nhwc in ((self.vae, bool(channels_last)), (self.ip2p_unet, unets), (self.mb_unet, unets)):
            net.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        # SAM and the classifier stay fp32: the mask generator's thresholds are tuned on fp32 scores.
        for net in (self.sam, self.action_classifier):
            if net is not None:
                net.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        return self

    def weight_bytes(self) -> int:
        """Bytes of every network's parameters and buffers, in the dtypes they have now (after `to`)."""
        nets = (self.text_encoder, self.vae, self.ip2p_unet, self.mb_unet, self.sam, self.action_classifier)
        return sum(tensor.numel() * tensor.element_size() for net in nets if net is not None
                   for tensor in (*net.parameters(), *net.buffers()))


# How a stage runs its models' GroupNorms: called with the models, entered around their calls.
NormScope = Callable[..., contextlib.AbstractContextManager]


def pytorch_norms(*modules: nn.Module) -> contextlib.AbstractContextManager:
    """The `NormScope` that changes nothing: the modules' own (PyTorch's) GroupNorm. The other one is
    zone_kernels.group_norm.triton_group_norms, chosen by backends.make_group_norms."""
    return contextlib.nullcontext()


def unets_channels_last(device: torch.device, dtype: torch.dtype, asked: bool | None = None) -> bool:
    """Whether the UNets run in NHWC: as `asked` (channels_last=True/False), or by default on CUDA in half
    precision. On an H200 the captured fused step took
    22.87 ms with NHWC UNets against 25.55 ms (cuDNN otherwise converts every fp16 convolution's input
    and output, a quarter of the step's device time; benchmarks/RESULTS.md, 2026-11-30). On the CPU it
    was slower. The VAE stays contiguous unless asked: its layout has not been measured on a GPU."""
    if asked is not None:
        return asked
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Random-weight models: tiny (tests, demo) and SD1.5-sized (benchmarks), one builder. SD1.5's block
# topology in both, so the recorded layers are the real ones.


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level BPE alphabet (256 printable stand-ins for the 256 byte values)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


TINY_MERGES = ("t h", "th e</w>", "a n", "an d</w>", "i n", "m a", "ma k", "mak e</w>", "d o", "do g</w>")


def build_tiny_tokenizer() -> Any:
    """A real CLIPTokenizer over a tiny byte-level vocabulary, read from vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="zone-tiny-tokenizer-") as name:
        folder = Path(name)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
        return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


@dataclass(frozen=True)
class ModelPreset:
    """The numbers that tell SD1.5-sized ZONE models from tiny test ones; the code path is the same.

    `unet_heads` is SD1.5's `attention_head_dim` config key, which diffusers reads as the number of
    heads. `text_vocab` None means the tokenizer's own length.
    """

    unet_channels: tuple[int, ...]
    unet_heads: int
    unet_groups: int
    unet_sample_size: int
    context_dim: int  # CLIP hidden size = the UNet's cross_attention_dim
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_projection: int
    text_vocab: int | None
    vae_channels: tuple[int, ...]
    vae_layers: int
    vae_groups: int
    vae_sample_size: int
    sam_type: str


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        unet_channels=(16, 16, 32, 32), unet_heads=2, unet_groups=8, unet_sample_size=8,
        context_dim=32, text_intermediate=37, text_layers=2, text_heads=4, text_projection=512, text_vocab=None,
        vae_channels=(8, 16, 16, 16), vae_layers=1, vae_groups=8, vae_sample_size=64, sam_type="tiny",
    ),
    # timbrooks/instruct-pix2pix: SD1.5's UNet with 8 input channels, SD's VAE, CLIP ViT-L/14's text tower.
    "sd15": ModelPreset(
        unet_channels=(320, 640, 1280, 1280), unet_heads=8, unet_groups=32, unet_sample_size=64,
        context_dim=768, text_intermediate=3072, text_layers=12, text_heads=12, text_projection=768, text_vocab=49408,
        vae_channels=(128, 256, 512, 512), vae_layers=2, vae_groups=32, vae_sample_size=512, sam_type="vit_h",
    ),
}


def build_unet(preset: ModelPreset) -> nn.Module:
    """IP2P's UNet topology (SD1.5's blocks, 8 input channels) with the preset's widths."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=preset.unet_sample_size,
        in_channels=8,  # 4 noisy latent + 4 image latent, as IP2P
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=preset.unet_channels,
        layers_per_block=2,
        cross_attention_dim=preset.context_dim,
        attention_head_dim=preset.unet_heads,
        norm_num_groups=preset.unet_groups,
    )


def build_vae(preset: ModelPreset) -> nn.Module:
    """SD's VAE topology (AutoencoderKL, 8x downsampling) with the preset's widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: SD's 8x downsampling
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=preset.vae_channels,
        layers_per_block=preset.vae_layers,
        latent_channels=4,
        norm_num_groups=preset.vae_groups,
        sample_size=preset.vae_sample_size,
    )


def check_torch_cache_folder() -> None:
    """A ConfigError unless PyTorch can make the folder TORCHINDUCTOR_CACHE_DIR names (unset: unless there is a
    temporary folder to write, where its default is). Diffusers imports
    torch._dynamo, which makes that folder as it loads, for every denoiser (not only `compile`): a path where none
    can be made failed there, deep in torch, naming neither the variable nor what to do."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if path is None:  # PyTorch's default, in the temporary folder
        check_temporary_folder("PyTorch keeps its cache in the temporary folder (and the server its uploads over 1 "
                               "MiB); set TMPDIR (or TORCHINDUCTOR_CACHE_DIR) to a folder you can write")
        return
    try:
        os.makedirs(os.path.abspath(path), exist_ok=True)
    except OSError as error:
        raise ConfigError(f"TORCHINDUCTOR_CACHE_DIR={path!r}: PyTorch cannot make its cache folder there "
                          f"({error.strerror}); set it to a folder you can write, or unset it") from None


def check_compile_cache_writable() -> None:
    """A ConfigError unless PyTorch can write in its inductor cache folder, where `--denoiser compile` keeps the
    kernels it compiles: one that can be made but not written (a read-only image's pre-warmed cache, another user's
    /tmp/torchinductor_NAME) failed at the first edit, after the models loaded, with inductor's long traceback."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if path is None:
        try:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        except ImportError:  # an older torch keeps its default elsewhere: left to it
            return
        path = default_cache_dir()
    if problem := folder_problem(Path(path)):
        raise ConfigError(f"{option('denoiser', 'compile')} keeps the kernels it compiles in PyTorch's cache folder "
                          f"(TORCHINDUCTOR_CACHE_DIR, here {path}), but {problem}: set TORCHINDUCTOR_CACHE_DIR to a "
                          "folder you can write (a cache compiled elsewhere can be copied there), or use "
                          f"{option('denoiser', 'fused')}")


def check_triton_cache_writable() -> None:
    """A ConfigError unless Triton can write in its kernel cache folder, for a pipeline whose Triton kernels run
    on a GPU: their first launch compiles them and keeps them there, and with a read-only or missing home (a
    container's) the first edit failed deep in Triton, after the models loaded, naming no variable."""
    path = triton_cache_dir()
    if problem := folder_problem(Path(path)):
        raise ConfigError(f"the Triton kernels (--kernels, --group-norm) keep their compiled code in Triton's cache "
                          f"folder (TRITON_CACHE_DIR, else TRITON_HOME/.triton/cache, else ~/.triton/cache; here "
                          f"{path}), but {problem}: set TRITON_CACHE_DIR to a folder you can write, or use "
                          f"{option('kernels', 'torch')} and {option('group_norm', 'torch')}")


def triton_cache_dir() -> str:
    """The folder Triton compiles its kernels into, as the installed Triton reads it (its `knobs`); else (no
    Triton, or an older one) TRITON_CACHE_DIR, else TRITON_HOME/.triton/cache, else ~/.triton/cache."""
    try:
        from triton import knobs

        return knobs.cache.dir
    except (ImportError, AttributeError):  # no Triton, or one without knobs
        home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
        return os.environ.get("TRITON_CACHE_DIR") or os.path.join(home, ".triton", "cache")


def check_temporary_folder(why_and_what_to_do: str) -> None:
    """A ConfigError saying `why_and_what_to_do` unless there is a temporary folder to write (a read-only
    filesystem with TMPDIR unset has none: tempfile's traceback)."""
    try:
        tempfile.gettempdir()
    except FileNotFoundError as error:
        raise ConfigError(f"{error.strerror}: {why_and_what_to_do}") from None


def build_tiny_unet() -> nn.Module:
    return build_unet(PRESETS["tiny"])


def build_components(preset: ModelPreset, seed: int = 0, sam_type: str | None = None) -> ZoneModels:
    """Random-weight ZONE models of the preset's sizes, entirely offline; the same seed gives the same weights.

    The tokenizer is always the tiny one: its ids all fall inside any vocabulary, and tokenization
    costs nothing next to the networks. Default initialisation: cost does not depend on weight values.
    """
    seed = check_seed(seed)
    # First: its advice covers the cache folder's too (TORCHINDUCTOR_CACHE_DIR set, the tokenizer still needs it).
    check_temporary_folder("the tokenizer of random-weight models is written in the temporary folder as they are "
                           "built (and PyTorch keeps its cache there unless TORCHINDUCTOR_CACHE_DIR says otherwise); "
                           "set TMPDIR to a folder you can write")
    check_torch_cache_folder()
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.default_generator.manual_seed(seed)  # the CPU's only: torch.manual_seed would reseed CUDA's too
        return _build_seeded_components(preset, sam_type)


def _build_seeded_components(preset: ModelPreset, sam_type: str | None) -> ZoneModels:
    from diffusers import DPMSolverMultistepScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=preset.text_vocab or len(tokenizer),
            hidden_size=preset.context_dim,
            intermediate_size=preset.text_intermediate,
            num_attention_heads=preset.text_heads,
            num_hidden_layers=preset.text_layers,
            max_position_embeddings=77,
            projection_dim=preset.text_projection,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = build_vae(preset)
    ip2p_unet = build_unet(preset)
    mb_unet = build_unet(preset)
    scheduler_config = dict(DPMSolverMultistepScheduler().config)
    return ZoneModels(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        ip2p_unet=ip2p_unet,
        mb_unet=mb_unet,
        scheduler_config=scheduler_config,
        sam=build_sam(sam_type or preset.sam_type),
        action_classifier=ActionClassifier(input_size=preset.context_dim),
    )


def build_tiny_components(seed: int = 0) -> ZoneModels:
    """Tiny random ZONE models, built in seconds (tests, demo)."""
    return build_components(PRESETS["tiny"], seed)


def build_random_components(preset: str = "sd15", seed: int = 0, sam_type: str = "vit_b") -> ZoneModels:
    """Real-size architectures with random weights (benchmarks): `preset` names an entry of PRESETS.

    sd15 allocates about 3.5 GB of fp32 weights for the two UNets alone.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}: use one of {', '.join(PRESETS)}")
    if sam_type not in SAM_SIZES:
        raise ConfigError(f"unknown SAM type {sam_type!r}: use one of {', '.join(SAM_SIZES)}")
    return build_components(PRESETS[preset], seed, sam_type)


# --------------------------------------------------------------------------------------------------
# SAM: one builder for every size (segment-anything's registry numbers, plus a tiny one).

SAM_SIZES: dict[str, dict[str, Any]] = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "tiny": dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=64, window_size=2,
                 prompt_dim=32, mask_in_chans=8, mlp_dim=64, decoder_heads=2, iou_hidden=32),
}


def build_sam(model_type: str) -> nn.Module:
    """An uninitialised-weights SAM of the given size (vit_h, vit_l, vit_b or tiny)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    size = SAM_SIZES[model_type]
    img_size, prompt_dim = size.get("img_size", 1024), size.get("prompt_dim", 256)
    embedding_side = img_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=size["depth"],
            embed_dim=size["embed_dim"],
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=size["num_heads"],
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=size["global_attn_indexes"],
            window_size=size.get("window_size", 14),
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(embedding_side, embedding_side),
            input_image_size=(img_size, img_size),
            mask_in_chans=size.get("mask_in_chans", 16),
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=prompt_dim, mlp_dim=size.get("mlp_dim", 2048),
                num_heads=size.get("decoder_heads", 8),
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=size.get("iou_hidden", 256),
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def sam_type_from_path(path: Path) -> str | None:
    """'vit_h' for sam_vit_h_4b8939.pth etc.; None when the name does not say."""
    return next((name for name in SAM_TYPES if name in path.name), None)


# The options that name SAM's checkpoint and model type, as load_sam's errors say them (the export's are its own).
SAM_OPTIONS = (option("sam", "PATH"), option("sam_type", "TYPE"))


def checked_sam_type(model_type: str | None, type_flag: str = SAM_OPTIONS[1]) -> str | None:
    """A SAM checkpoint's model type in lower case, or None (from the file name): said before anything loads."""
    given = model_type.strip().lower() if isinstance(model_type, str) else model_type
    if given in (None, ""):
        return None
    if given not in SAM_TYPES:
        raise ConfigError(f"unknown SAM type {model_type!r}: {type_flag} takes {', '.join(SAM_TYPES)}")
    return given


def load_sam(checkpoint: str | Path, model_type: str | None = None, *,
             flags: tuple[str, str] = SAM_OPTIONS) -> nn.Module:
    """SAM from a segment-anything .pth; `flags`: the caller's options for the path and the model type
    (with a placeholder: "--checkpoint PATH"), which the errors name."""
    path_flag, type_flag = flags
    path = sam_checkpoint_path(checkpoint, path_flag)
    model_type = checked_sam_type(model_type, type_flag) or sam_type_from_path(path)
    if model_type is None:
        raise CheckpointError(
            f"cannot tell the SAM model type of {path.name} from its name: pass {type_flag}, one of "
            f"{', '.join(SAM_TYPES)}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and I/O errors all mean the same to the user
        raise CheckpointError(
            f"cannot read the SAM checkpoint {path}: not a PyTorch checkpoint, or corrupt or truncated "
            f"({type(error).__name__}); download it again from {SAM_URLS[model_type]}"
        ) from None
    sam = build_sam(model_type)
    try:
        sam.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{path} is not a SAM {model_type} checkpoint ({first_line(error)}); "
            f"check {type_flag}"
        ) from None
    return sam


def sam_checkpoint_path(checkpoint: str | Path, flag: str = SAM_OPTIONS[0]) -> Path:
    """The SAM .pth file, checked to be there (before anything heavier loads)."""
    path = expanded(checkpoint, CheckpointError)
    if path.is_dir():  # there, but not what is asked for: not "not found"
        raise CheckpointError(f"{path} is a folder: pass the SAM checkpoint file itself with {flag}, such as "
                              f"{path / 'sam_vit_h_4b8939.pth'}")
    if not path.is_file():
        raise CheckpointError(
            f"SAM checkpoint not found: {path}. Download {SAM_URLS['vit_h']} (or the vit_l / vit_b file) "
            f"and pass its path with {flag}."
        )
    return path


# --------------------------------------------------------------------------------------------------
# InstructPix2Pix, MagicBrush and the action classifier from local folders or the offline HF cache.


# What diffusers and transformers raise for a model folder that is there but damaged: a missing or truncated file
# (OSError, safetensors' own error), JSON that parses to the wrong shape ({} or [] as model_index.json: KeyError,
# TypeError), a config whose values have the wrong types (TypeError, AttributeError), unparsable JSON (ValueError).
MODEL_FOLDER_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError)


def _model_load_error(what: str, source: str, hub_id: str, flag: str, error: Exception) -> CheckpointError:
    """A folder that is there but does not load says why (a corrupt or missing file); else not found."""
    # A missing file says itself; a KeyError's text alone ('_class_name') would not say what is wrong.
    missing = isinstance(error, OSError | ValueError)
    said = first_line(error) if missing else f"{type(error).__name__}: {first_line(error)}"
    if expanded(source, CheckpointError).is_dir():
        return CheckpointError(
            f"cannot load {what} from the folder '{source}': {said.rstrip('.')}. Download it "
            f"again (`hf download {hub_id}`) and pass the folder with {flag}."
        )
    # There in the cache, but it loads wrong: a file missing from the snapshot (an interrupted download), a damaged
    # one, another library version. "not found" sent the user looking for a model the cache has.
    if not missing or _in_offline_cache(source):
        return CheckpointError(
            f"cannot load {what} '{source}' from the offline Hugging Face cache ({said.rstrip('.')}): download it "
            f"again (`hf download {_download_id(source, hub_id)}`), or pass a folder with {flag}."
        )
    return _not_found(what, source, hub_id, flag)


def _not_found(what: str, source: str, hub_id: str, flag: str) -> CheckpointError:
    # The cache's folder named: a cache copied into a container whose home is elsewhere (or unset) is looked for
    # under that home, and "not found" alone did not say where, nor which variable moves it.
    from huggingface_hub import constants

    return CheckpointError(
        f"{what} weights not found at '{source}' (local folder or offline Hugging Face cache, here "
        f"{os.path.abspath(constants.HF_HUB_CACHE)}: HF_HUB_CACHE or HF_HOME name another). "
        f"On a machine with internet run `hf download {_download_id(source, hub_id)}` (or `git clone` the "
        f"model repo) and pass the folder with {flag}."
    )


def _download_id(source: str, hub_id: str) -> str:
    """The hub id to download for `source`: itself where it is one (`owner/name`: `--ip2p some/fine-tune` was told
    to download the default model), else the default `hub_id` (a folder's path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:  # a path: /models/ip2p, ./ip2p, ~/ip2p
        return hub_id
    return source if "/" in source else hub_id


def _in_offline_cache(source: str) -> bool:
    """Whether the offline Hugging Face cache has a snapshot of the model id `source`, whole or not."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(source, local_files_only=True)
    except Exception:  # not cached, or not even a model id
        return False
    return True


def _folder_or_hub_id(source: str) -> str:
    """A model's folder with `~` expanded (`locate_model` found it so; diffusers would take `~/ip2p` for a hub id),
    else the hub id as given."""
    folder = expanded(source, CheckpointError)
    return str(folder) if folder.is_dir() else source


def load_ip2p(source: str, dtype: torch.dtype = torch.float32) -> Any:
    """IP2P's diffusers pipeline (tokenizer, text encoder, VAE, UNet, scheduler), from disk only."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    try:
        return StableDiffusionInstructPix2PixPipeline.from_pretrained(
            _folder_or_hub_id(source), safety_checker=None, requires_safety_checker=False, local_files_only=True,
            torch_dtype=dtype,
        )
    except MODEL_FOLDER_ERRORS as error:
        raise _model_load_error("InstructPix2Pix", source, IP2P_ID, option("ip2p", "DIR"), error) from error


def load_magicbrush_unet(source: str, ip2p: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """MagicBrush's UNet, loaded through the IP2P pipeline class.

    Its hub folder is tagged StableDiffusionPipeline, so a generic loader would pick the wrong
    class. IP2P's text encoder, tokenizer and VAE are passed in so MagicBrush's own copies are never
    loaded: ZONE uses IP2P's for both trajectories.
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline

    try:
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            _folder_or_hub_id(source),
            text_encoder=ip2p.text_encoder,
            tokenizer=ip2p.tokenizer,
            vae=ip2p.vae,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
            torch_dtype=dtype,
        )
    except MODEL_FOLDER_ERRORS as error:
        raise _model_load_error("MagicBrush", source, MAGICBRUSH_ID, option("magicbrush", "DIR"), error) from error
    check_same_unet(ip2p.unet, pipe.unet, source)
    return pipe.unet


def check_same_unet(reference: nn.Module, other: nn.Module, source: str) -> None:
    """MagicBrush must be an IP2P fine-tune: same UNet config and the same state-dict shapes."""
    keys = ("in_channels", "out_channels", "block_out_channels", "cross_attention_dim", "down_block_types",
            "up_block_types", "layers_per_block", "attention_head_dim")
    differing = [k for k in keys if reference.config.get(k) != other.config.get(k)]
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    other_shapes = {k: tuple(v.shape) for k, v in other.state_dict().items()}
    if differing or ref_shapes != other_shapes:
        detail = f"config differs in {', '.join(differing)}" if differing else "state-dict shapes differ"
        raise CheckpointError(
            f"the MagicBrush UNet at '{source}' does not match InstructPix2Pix's architecture ({detail}); "
            f"expected an IP2P fine-tune such as {MAGICBRUSH_ID}"
        )


def load_action_classifier(checkpoint: str | Path | None, hidden_size: int) -> ActionClassifier | None:
    """The reference action classifier, or None (then the keyword rule is used, with a warning)."""
    if checkpoint is None:
        warn_caller(
            f"no action classifier given, and none at {DEFAULT_ACTION_CLASSIFIER}: actions come from the keyword "
            f"rule. For the learned classifier get {ACTION_CLASSIFIER_SOURCE} and put it there or pass "
            "--action-classifier PATH (action_classifier=PATH).",
            UserWarning,
        )
        return None
    path = action_classifier_path(checkpoint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and I/O errors all mean the same to the user
        raise CheckpointError(f"cannot read the action classifier {path}: not a PyTorch checkpoint, or corrupt "
                              f"({type(error).__name__}); get {ACTION_CLASSIFIER_SOURCE} again") from None
    classifier = ActionClassifier(input_size=hidden_size)
    try:
        classifier.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path} is not the ZONE action classifier for a {hidden_size}-wide text encoder "
                              f"({first_line(error)})") from None
    return classifier


def action_classifier_path(checkpoint: str | Path) -> Path:
    """The classifier's file, checked to be there (before anything heavier loads)."""
    path = expanded(checkpoint, CheckpointError)
    if not path.is_file():
        raise CheckpointError(f"action classifier not found: {path}. Get {ACTION_CLASSIFIER_SOURCE}.")
    return path


def locate_model(what: str, source: str, hub_id: str, flag: str) -> None:
    """CheckpointError unless `source` is a folder or a model in the offline Hugging Face cache: found in
    milliseconds, where loading it takes seconds to minutes. A folder must hold diffusers' model_index.json: an empty
    one (an interrupted download) passed here and failed only once the models before it had loaded."""
    folder = expanded(source, CheckpointError)
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise CheckpointError(f"the {what} folder '{source}' has no model_index.json: not a diffusers pipeline "
                                  f"folder, or an unfinished download. Run `hf download {hub_id}` and "
                                  f"pass the folder with {flag}.")
        return
    if not _in_offline_cache(source):
        raise _not_found(what, source, hub_id, flag)


def check_checkpoints_present(ip2p: str, magicbrush: str, sam: str | Path | None,
                              action_classifier: str | Path | None) -> None:
    """Every checkpoint located before any loads, and all that are missing said at once: a first run learns
    the whole list (IP2P, MagicBrush, SAM), not one name a run."""
    checks: list[Callable[[], object]] = [
        lambda: locate_model("InstructPix2Pix", ip2p, IP2P_ID, option("ip2p", "DIR")),
        lambda: locate_model("MagicBrush", magicbrush, MAGICBRUSH_ID, option("magicbrush", "DIR"))]
    if sam is not None:
        checks.append(lambda: sam_checkpoint_path(sam))
    if action_classifier is not None:
        checks.append(lambda: action_classifier_path(action_classifier))
    problems = []
    for check in checks:
        try:
            check()
        except CheckpointError as error:
            problems.append(str(error))
    if len(problems) > 1:
        raise CheckpointError(f"{len(problems)} checkpoints are missing:\n  - " + "\n  - ".join(problems))
    if problems:
        raise CheckpointError(problems[0])


def load_pretrained(
    ip2p: str, magicbrush: str, sam: str | Path | None, action_classifier: str | Path | None = None,
    sam_type: str | None = None, dtype: torch.dtype = torch.float32,
) -> ZoneModels:
    """sam None: no PyTorch SAM (refinement then runs on an exported SAM, `zone export sam`)."""
    check_checkpoints_present(ip2p, magicbrush, sam, action_classifier)
    check_torch_cache_folder()
    sam_model = None if sam is None else load_sam(sam, sam_type)
    ip2p_pipe = load_ip2p(ip2p, dtype)
    return ZoneModels(
        tokenizer=ip2p_pipe.tokenizer,
        text_encoder=ip2p_pipe.text_encoder,
        vae=ip2p_pipe.vae,
        ip2p_unet=ip2p_pipe.unet,
        mb_unet=load_magicbrush_unet(magicbrush, ip2p_pipe, dtype),
        scheduler_config=dict(ip2p_pipe.scheduler.config),
        sam=sam_model,
        action_classifier=load_action_classifier(action_classifier, ip2p_pipe.text_encoder.config.hidden_size),
    )
