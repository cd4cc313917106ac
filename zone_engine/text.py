"""Instruction encoding: computed once with IP2P's tokenizer and text encoder, shared by both UNets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import warn_caller
from .graphs import Run, eager
from .instruction import MAX_TOKENS, check_instruction

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer

TRUNCATED = f"the instruction is longer than {MAX_TOKENS} CLIP tokens and was truncated"


@dataclass(frozen=True)
class EncodedInstruction:
    context: torch.Tensor  # (3, 77, C): [c_T, empty, empty] — IP2P's guidance branch order
    token_count: int  # L: tokens of c_T including start and end, at most 77
    truncated: bool


def as_clip_reads(text: str) -> str:
    """`text` as the reference's tokenizer read it: its transformers 4.27 ran ftfy.fix_text first (ftfy pinned
    beside it), which straightens curly quotes and mends mojibake, ligatures and full-width letters; transformers 5
    dropped that, and "the cat’s fur" took two tokens more than "the cat's fur", moving L. Idempotent: a
    transformers 4 with ftfy that fixes the text again changes nothing."""
    import ftfy

    return ftfy.fix_text(text)


def count_tokens(tokenizer: CLIPTokenizer, text: str) -> tuple[int, bool]:
    """(L, truncated): tokens of `text` (`as_clip_reads`) with start and end, capped at 77 as CLIP truncates."""
    # verbose=False: transformers would print that the ids are too long for the model, which never sees them
    # (padded_ids truncates); the truncation is said once, as EditWarning's TRUNCATED.
    full = len(tokenizer(as_clip_reads(text), truncation=False, verbose=False).input_ids)
    return min(full, MAX_TOKENS), full > MAX_TOKENS


def padded_ids(tokenizer: CLIPTokenizer, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (len(texts), 77), of the texts `as_clip_reads`."""
    batch = tokenizer([as_clip_reads(text) for text in texts], padding="max_length", max_length=MAX_TOKENS,
                      truncation=True, return_tensors="pt")
    return batch.input_ids.to(device), batch.attention_mask.to(device)


@torch.inference_mode()
def encode_prompt(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, text: str, run: Run = eager) -> torch.Tensor:
    """One prompt alone (1, 77, C), as diffusers' IP2P pipeline encodes it (no attention mask).
    `run`: how the encoder is called (`graphs.eager`, or replayed from a CUDA graph)."""
    device = next(text_encoder.parameters()).device
    return run("text_encoder", lambda ids: text_encoder(ids)[0], padded_ids(tokenizer, [text], device)[0])


@torch.inference_mode()
def encode_instruction(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, instruction: str, empty: torch.Tensor | None = None,
    run: Run = eager,
) -> EncodedInstruction:
    """Encode c_T and the empty prompt as diffusers' IP2P pipeline does (no attention mask).

    `empty`: `encode_prompt(tokenizer, text_encoder, "")` computed before, which is the same for every
    instruction (the pipeline keeps it); None encodes it here. `run`: as for `encode_prompt`.
    """
    text = check_instruction(instruction)
    token_count, truncated = count_tokens(tokenizer, text)
    if truncated:
        warn_caller(TRUNCATED)
    # One call each, as diffusers and the reference encode them: a batch of two rounds differently.
    prompt = encode_prompt(tokenizer, text_encoder, text, run)
    empty = encode_prompt(tokenizer, text_encoder, "", run) if empty is None else empty
    context = torch.cat([prompt, empty, empty])  # (3, 77, C)
    return EncodedInstruction(context=context, token_count=token_count, truncated=truncated)
