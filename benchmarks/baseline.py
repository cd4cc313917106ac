"""ZONE done the way the reference implementation does it: the benchmarks' baseline.

Written from ../shared/ZONE.md and the shape of the authors' code (lsl001006/ZONE: `inference.py`,
`text2image_instructpix2pix_blend`, the prompt-to-prompt `AttentionStore`, `show_diff_cross_attention`,
`get_finemask_everything`, `subtract_fft_images`), and kept outside `zone_engine` on purpose: it
imports no engine stage. What it shares with the engine is only plumbing: `image_io` to load, shrink,
pad and map back; `Stopwatch` so both are timed by the same clock; `EditConfig` for the numbers;
`EditResult` as the return type; `solver.set_timesteps`, diffusers' own call with NumPy 2's deprecation warning
hushed; and two decisions the reference left to chance that the outputs must agree on: `denoise.REFERENCE_SCHEDULER`
(the scheduler's settings) and `blend.energy_levels` (E's uint8 levels, its wrap-around defect mended).

What is reference-style (the costs the engine is measured against):
- two separate diffusers `StableDiffusionInstructPix2PixPipeline` objects (IP2P and MagicBrush),
  each with its own `DPMSolverMultistepScheduler.from_config`, stepped in turn: MB's step, IP2P's
  step, then the latent blend — six UNet rows per step as two batch-3 calls;
- on IP2P's UNet, an attention processor for EVERY attention layer (self and cross) that
  materialises softmax(Q K^T) with `baddbmm` (no memory-efficient attention) and hands the
  probabilities to an `AttentionStore`, which keeps every layer's map with at most 32^2 queries in
  Python lists each step and adds each step into the running store;
- mask math in numpy / OpenCV / PIL on uint8 images; `SamAutomaticMaskGenerator` in PyTorch;
  the FFT edge smoother in numpy.

What is NOT the reference: the semantics. Where ZONE.md's defects table says the engine fixes a
reference defect, this baseline implements the *engine's* fixed behaviour, so that its output is
comparable pixel for pixel and any speed-up can be checked against the same result:
seam = R and not M_f (not the uint8 wrap), E clipped to 0..255 before the threshold (and its whole
numbers kept whole, not left to FFT rounding), the FFT disc centred at (rows/2, cols/2), luma with
RGB weights, small components dropped exactly (their own pixels, 4-connectivity, true area < 64), no
crash when no segment overlaps M_b (M_b is used and flagged), the empty-prompt rows P[heads:]
recorded, the padding cropped away at the end. The action is forced (the reference classifier
still runs, so its cost is measured, but its answer is not used).
MagicBrush's own text encoder and VAE are not loaded: both pipelines get IP2P's (the reference
loaded and never used MagicBrush's copies, which only costs memory). Left out as well: the files
and visualisations the reference writes (per-token attention images, intermediate masks) and its
reloading of the classifier checkpoint on every call.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

import cv2
import numpy as np
import torch
from PIL import Image

from zone_engine import image_io
from zone_engine.blend import energy_levels
from zone_engine.config import Action, EditConfig
from zone_engine.denoise import REFERENCE_SCHEDULER
from zone_engine.models import ZoneModels
from zone_engine.pipeline import STAGES, EditResult
from zone_engine.solver import set_timesteps
from zone_engine.text import as_clip_reads
from zone_engine.timing import Stopwatch

# Reference attention store: maps with more queries than this are not kept ("avoid memory overhead").
STORED_MAX_QUERIES = 32**2
CLASS_NAMES = ("CHANGE", "ADD", "REMOVE")  # the reference classifier's output order


# ------------------------------------------------------------------------------------ attention store


class AttentionStore:
    """prompt-to-prompt's AttentionStore as the reference uses it: every layer, every step, in lists.

    `step_store[key]` collects this step's maps (key = "down_cross", "up_self", ...); when every
    registered layer has been called once, the step's maps are added into `attention_store` (the
    first step's tensors become the running sums).
    """

    def __init__(self) -> None:
        self.num_att_layers = 0
        self.cur_att_layer = 0
        self.cur_step = 0
        self.step_store = self.empty_store()
        self.attention_store: dict[str, list[torch.Tensor]] = {}

    @staticmethod
    def empty_store() -> dict[str, list[torch.Tensor]]:
        return {f"{place}_{kind}": [] for place in ("down", "mid", "up") for kind in ("cross", "self")}

    def __call__(self, probs: torch.Tensor, is_cross: bool, place_in_unet: str, heads: int) -> None:
        """probs (3*heads, N, K): keep the empty-prompt rows P[heads:] of maps with N <= 32^2."""
        if probs.shape[1] <= STORED_MAX_QUERIES:
            self.step_store[f"{place_in_unet}_{'cross' if is_cross else 'self'}"].append(probs[heads:])
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()

    def between_steps(self) -> None:
        if not self.attention_store:
            self.attention_store = self.step_store
        else:
            for key, maps in self.attention_store.items():
                for index in range(len(maps)):
                    maps[index] += self.step_store[key][index]
        self.step_store = self.empty_store()

    def average(self) -> dict[str, list[torch.Tensor]]:
        return {key: [item / self.cur_step for item in maps] for key, maps in self.attention_store.items()}

    def stored_layer_count(self) -> int:
        return sum(len(maps) for maps in self.attention_store.values())


class StoringAttnProcessor:
    """diffusers' classic AttnProcessor (baddbmm + softmax + bmm) that shows every map to the store."""

    def __init__(self, store: AttentionStore, place_in_unet: str) -> None:
        self.store = store
        self.place_in_unet = place_in_unet

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        keys_from = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = keys_from.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)

        probs = attn.get_attention_scores(query, key, attention_mask)  # (3*heads, N, K), batch-major
        self.store(probs, is_cross, self.place_in_unet, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def register_attention_store(unet: torch.nn.Module, store: AttentionStore) -> dict:
    """Put a storing processor on every attention layer of `unet`; returns the processors it replaced."""
    originals = unet.attn_processors
    processors = {name: StoringAttnProcessor(store, name.split("_")[0]) for name in originals}  # down/mid/up
    store.num_att_layers = len(processors)
    unet.set_attn_processor(processors)  # diffusers empties the dict it is given
    return originals


# ---------------------------------------------------------------------------------------- mask math


def drop_small_components(mask: np.ndarray, min_area: int = 64) -> np.ndarray:
    """uint8 0/255 mask -> the same with 4-connected components of fewer than `min_area` pixels removed."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=4)
    out = mask.copy()
    for label in range(1, count):
        if stats[label, cv2.CC_STAT_AREA] < min_area:
            out[labels == label] = 0
    return out


def show_diff_cross_attention(
    store: AttentionStore, token_count: int, grid: tuple[int, int], size: tuple[int, int], config: EditConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's rule: (M_b as uint8 0/255 (H, W), difference d as uint8 (H, W))."""
    res_h, res_w = grid
    average = store.average()
    maps = [
        item.reshape(1, -1, res_h, res_w, item.shape[-1])[0]
        for location in ("up", "down")
        for item in average[f"{location}_cross"]
        if item.shape[1] == res_h * res_w
    ]
    attention = torch.cat(maps, dim=0)
    attention = (attention.sum(0) / attention.shape[0]).cpu()  # (h, w, 77)
    images = []
    for index in range(token_count):
        image = attention[:, :, index]
        image = 255 * image / image.max()
        images.append(image.unsqueeze(-1).expand(*image.shape, 3).numpy().astype(np.uint8))
    difference = cv2.subtract(images[0], images[-1])
    difference = np.array(Image.fromarray(difference).resize((size[1], size[0])))  # PIL's bicubic
    if config.threshold_rule == "reference":
        scaled = cv2.convertScaleAbs(difference, alpha=2, beta=0)
        mask = np.where(scaled <= config.reference_threshold, 255, 0).astype(np.uint8)
    else:
        mask = np.where(difference < config.paper_threshold, 255, 0).astype(np.uint8)
    return drop_small_components(mask[..., 0], config.min_region_area), difference[..., 0]


def get_finemask_everything(
    rough_mask: np.ndarray, image: np.ndarray, sam: torch.nn.Module, config: EditConfig
) -> tuple[np.ndarray, bool]:
    """SAM's automatic masks, the one with the best IoU with M_b (first on ties); (M_f 0/255, fell back)."""
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(sam, **dataclasses.asdict(config.sam))
    with torch.inference_mode():
        segmentations = generator.generate(image)
    rough = rough_mask > 0
    best_iou, best = 0.0, None
    for record in segmentations:
        segmentation = record["segmentation"]
        union = np.logical_or(rough, segmentation).sum()
        iou = np.logical_and(rough, segmentation).sum() / union if union else 0.0
        if iou > best_iou:
            best_iou, best = iou, segmentation
    fine = rough_mask if best is None else best.astype(np.uint8) * 255
    return drop_small_components(fine, config.min_region_area), best is None


def subtract_fft_images(styled_masked: np.ndarray, original_masked: np.ndarray, config: EditConfig) -> np.ndarray:
    """Region R (uint8 0/255) from two RGB images already zeroed outside D."""
    def gray(image):  # the reference's cv2 call, on RGB data (its BGR data swapped the R and B weights)
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)

    f1 = np.fft.fftshift(np.fft.fft2(gray(styled_masked)))
    f2 = np.fft.fftshift(np.fft.fft2(gray(original_masked)))
    rows, cols = f1.shape
    disc = np.zeros((rows, cols), np.uint8)
    cv2.circle(disc, (cols // 2, rows // 2), config.fft_radius, 1, -1)
    energy = np.abs(np.fft.ifft2(np.fft.ifftshift(f1 * disc - f2 * disc)))
    energy = energy_levels(energy)  # clipped, and whole numbers kept whole, as the engine decides
    energy[energy > config.fft_threshold] = 255
    energy[energy <= config.fft_threshold] = 0
    energy = cv2.morphologyEx(energy, cv2.MORPH_CLOSE, np.ones((config.close_kernel, config.close_kernel), np.uint8))
    contours, _ = cv2.findContours(energy, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    region = np.zeros((rows, cols, 3), np.uint8)
    cv2.drawContours(region, contours, -1, (255, 255, 255), cv2.FILLED)
    return region[..., 0]


def paste_region(original: np.ndarray, working: np.ndarray, style_image: np.ndarray, dilated: np.ndarray,
                 mask_b: np.ndarray, mask_f: np.ndarray, geometry: image_io.Geometry,
                 config: EditConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The reference's blending: R from the FFT of both images inside the dilated mask, I_sty pasted over
    R and alpha-blended on R's seam outside M_f, at the input size. Returns the composite and the masks
    (mask_b, mask_f, region, seam) and styled image at the input size."""
    sty_edge, gt_edge = style_image.copy(), working.copy()
    sty_edge[dilated == 0] = 0
    gt_edge[dilated == 0] = 0
    region = subtract_fft_images(sty_edge, gt_edge, config)
    at_input = {name: image_io.to_input_size(mask, geometry, is_mask=True)
                for name, mask in (("mask_b", mask_b), ("mask_f", mask_f), ("region", region))}
    styled = image_io.to_input_size(style_image, geometry, is_mask=False)
    seam = at_input["region"] & ~at_input["mask_f"]
    canvas = original.copy()
    canvas[at_input["region"]] = styled[at_input["region"]]
    canvas[seam] = styled[seam] * config.seam_alpha + original[seam] * (1 - config.seam_alpha)
    return canvas, {**at_input, "seam": seam, "styled": styled}


# ----------------------------------------------------------------------------------------- pipeline


class StepClock(Protocol):
    """What the harness hands in to time each denoising step (zone_benchmarks.measure.StepClock)."""

    def start(self) -> None: ...

    def tick(self, index: int) -> None: ...


class ReferenceStyleZone:
    """The baseline: `ReferenceStyleZone(models, device).edit(image, instruction, config)` -> EditResult.

    Runs in fp32 (the reference's precision) on whatever device `models` already sit on.
    """

    def __init__(self, models: ZoneModels, device: torch.device) -> None:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionInstructPix2PixPipeline

        self.models = models
        self.device = device

        def pipeline(unet):
            # diffusers 0.18 (the reference's) defaults, as ZONE.md section 0 pins them (tests/test_parity.py).
            scheduler = DPMSolverMultistepScheduler.from_config(models.scheduler_config, **REFERENCE_SCHEDULER)
            pipe = StableDiffusionInstructPix2PixPipeline(
                vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            return pipe

        self.ip2p_pipe = pipeline(models.ip2p_unet)
        self.mb_pipe = pipeline(models.mb_unet)
        self.last_store: AttentionStore | None = None

    @torch.no_grad()
    def encode_prompt(self, instruction: str) -> torch.Tensor:
        """[c_T, empty, empty] (3, 77, C), each prompt encoded on its own as the reference does."""
        tokenizer, text_encoder = self.ip2p_pipe.tokenizer, self.ip2p_pipe.text_encoder
        text_input = tokenizer([instruction], padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
        text_embeddings = text_encoder(text_input.input_ids.to(self.device))[0]
        uncond_input = tokenizer([""], padding="max_length", max_length=text_input.input_ids.shape[-1],
                                 return_tensors="pt")
        uncond_embeddings = text_encoder(uncond_input.input_ids.to(self.device))[0]
        return torch.cat([text_embeddings, uncond_embeddings, uncond_embeddings])

    @torch.no_grad()
    def classify(self, instruction: str) -> str:
        """The reference's cls_predict: per-token MLP logits, max over tokens, argmax of the positions."""
        tokenizer = self.ip2p_pipe.tokenizer
        encodings = tokenizer(instruction, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        embeddings = self.ip2p_pipe.text_encoder(
            encodings["input_ids"].to(self.device), encodings["attention_mask"].to(self.device)
        )[0]
        if self.models.action_classifier is None:
            return "CHANGE"
        outputs = self.models.action_classifier(embeddings.float())
        _, predicted = torch.max(outputs, 1)
        return CLASS_NAMES[int(predicted[0].argmax())]

    @torch.no_grad()
    def text2image_instructpix2pix_blend(
        self, image: Image.Image, context: torch.Tensor, beta: float, config: EditConfig,
        watch: Stopwatch, step_clock: StepClock | None,
    ) -> torch.Tensor:
        model, model_mb = self.ip2p_pipe, self.mb_pipe
        with watch("vae_encode"):
            pixels = model.image_processor.preprocess(image)
            image_latents = model.prepare_image_latents(pixels, 1, 1, context.dtype, self.device, True, None)
            height, width = (side * model.vae_scale_factor for side in image_latents.shape[-2:])
            generator = torch.Generator().manual_seed(config.seed)
            latents = model.prepare_latents(1, model.vae.config.latent_channels, height, width, context.dtype,
                                            self.device, generator)

        with watch("denoise"):
            set_timesteps(model.scheduler, config.steps, self.device)  # diffusers' own, NumPy 2's warning hushed
            set_timesteps(model_mb.scheduler, config.steps, self.device)
            latents_mb, latents_ip2p = latents.clone(), latents.clone()
            if step_clock is not None:
                step_clock.start()
            for index, t in enumerate(model.scheduler.timesteps):
                latents_mb = self._guided_step(model_mb, latents_mb, t, image_latents, context, config)
                latent_mb_to_insert = latents_mb.detach().clone()
                latents_ip2p = self._guided_step(model, latents_ip2p, t, image_latents, context, config)
                latents_ip2p = (latents_ip2p + beta * latent_mb_to_insert) / (1 + beta)
                torch.cuda.empty_cache()  # the reference frees the allocator's cache every step (no-op on CPU)
                if step_clock is not None:
                    step_clock.tick(index)
        return latents_ip2p

    @staticmethod
    def _guided_step(pipe, latents, t, image_latents, context, config: EditConfig) -> torch.Tensor:
        latent_model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 3), t)
        latent_model_input = torch.cat([latent_model_input, image_latents], dim=1)
        noise_pred = pipe.unet(latent_model_input, t, encoder_hidden_states=context, return_dict=False)[0]
        noise_pred_text, noise_pred_image, noise_pred_uncond = noise_pred.chunk(3)
        noise_pred = (
            noise_pred_uncond
            + config.text_guidance * (noise_pred_text - noise_pred_image)
            + config.image_guidance * (noise_pred_image - noise_pred_uncond)
        )
        return pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    @torch.no_grad()
    def edit(self, image: image_io.ImageSource, instruction: str, config: EditConfig, *,
             step_clock: StepClock | None = None) -> EditResult:
        """One reference-style edit. `config.action` must be set (the action is forced)."""
        if config.action is None:
            raise ValueError("the baseline runs with a forced action: set config.action")
        watch = Stopwatch(self.device)
        started = time.perf_counter()
        original = image_io.load_image(image)
        geometry = image_io.working_geometry(*original.shape[:2], config.max_side, config.size_multiple)
        working = image_io.to_working(original, geometry)
        padded_h, padded_w = geometry.padded_size
        instruction = as_clip_reads(instruction)  # the reference's transformers 4.27 + ftfy did it in its tokenizer
        tokens = self.ip2p_pipe.tokenizer.encode(instruction)[:77]

        with watch("text"):
            context = self.encode_prompt(instruction)
        with watch("action"):
            self.classify(instruction)  # the reference's cost; its answer is overridden by the forced action
        action = Action(config.action)
        beta = config.beta_for(action)

        store = AttentionStore()
        originals = register_attention_store(self.ip2p_pipe.unet, store)
        try:
            latents = self.text2image_instructpix2pix_blend(
                Image.fromarray(working), context, beta, config, watch, step_clock
            )
        finally:
            self.ip2p_pipe.unet.set_attn_processor(originals)  # the UNet is shared with the engine
        self.last_store = store

        with watch("localize"):
            grid = (-(-padded_h // 32), -(-padded_w // 32))
            mask_b, difference = show_diff_cross_attention(store, len(tokens), grid, (padded_h, padded_w), config)

        with watch("vae_decode"):
            decoded = self.ip2p_pipe.vae.decode(latents / self.ip2p_pipe.vae.config.scaling_factor).sample
            style_image = np.array(self.ip2p_pipe.image_processor.postprocess(decoded, output_type="pil")[0])

        with watch("refine"):
            segmented = working if action is Action.REMOVE else style_image
            mask_f, used_fallback = get_finemask_everything(mask_b, segmented, self.models.sam, config)
            kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (config.dilate_kernel, config.dilate_kernel))
            dilated = cv2.dilate(mask_f, kernel, iterations=config.dilate_iterations)

        with watch("blend"):
            canvas, at_input = paste_region(original, working, style_image, dilated, mask_b, mask_f, geometry, config)

        timings = {stage: watch.seconds.get(stage, 0.0) for stage in STAGES}
        timings["total"] = time.perf_counter() - started  # before the heatmap, a picture for people, as the engine's
        colours = cv2.cvtColor(cv2.applyColorMap(difference, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        heatmap = cv2.addWeighted(working, 0.5, colours, 0.5, 0)
        return EditResult(
            image=canvas,
            **at_input,
            heatmap=image_io.to_input_size(heatmap, geometry, is_mask=False),
            difference=image_io.levels_to_input_size(difference, geometry),
            action=action,
            used_fallback=used_fallback,
            instruction_truncated=len(self.ip2p_pipe.tokenizer.encode(instruction)) > 77,
            timings=timings,
        )
