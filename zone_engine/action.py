"""Action classification (ZONE.md section 2): ADD, CHANGE or REMOVE from the instruction."""

from __future__ import annotations

import re
from typing import Any, Literal

import torch

from .config import CLASSIFIER_ACTIONS, Action
from .graphs import Run, eager
from .models import ActionClassifier
from .text import padded_ids

_KEYWORDS: tuple[tuple[Action, re.Pattern[str]], ...] = (
    (Action.REMOVE, re.compile(r"\b(remove|delete|erase|get rid of)\b", re.IGNORECASE)),
    (Action.ADD, re.compile(r"\b(add|put|place|insert)\b", re.IGNORECASE)),
)


def keyword_action(instruction: str) -> Action:
    """The documented fallback when no classifier weights are given."""
    return next((action for action, pattern in _KEYWORDS if pattern.search(instruction)), Action.CHANGE)


def action_from_logits(logits: torch.Tensor, rule: Literal["intended", "reference"] = "intended") -> Action:
    """Decide the action from per-token logits (77, 3).

    intended: max-pool each class's logit over the tokens, then argmax over classes.
    reference: the reference's `max(dim=tokens)` keeps the *positions* of the maxima and takes the
    argmax of those — the class whose best token comes latest (a defect, kept for parity checks).
    """
    best_logit, best_position = logits.max(dim=0)  # (3,), (3,)
    chosen = best_logit if rule == "intended" else best_position
    return CLASSIFIER_ACTIONS[int(chosen.argmax())]


@torch.inference_mode()
def classify_action(
    instruction: str, tokenizer: Any, text_encoder: torch.nn.Module, classifier: ActionClassifier | None,
    rule: Literal["intended", "reference"] = "intended", run: Run = eager,
) -> Action:
    """The action from the classifier's logits, or from keywords without a classifier. `run`: how the
    text encoder is called (`graphs.eager`, or replayed from a CUDA graph)."""
    if classifier is None:
        return keyword_action(instruction)
    device = next(text_encoder.parameters()).device
    ids, attention_mask = padded_ids(tokenizer, [instruction], device)
    # The reference encodes with the attention mask here (unlike the UNet conditioning).
    states = run("text_encoder_masked", lambda ids, mask: text_encoder(ids, attention_mask=mask)[0],
                 ids, attention_mask).float()
    return action_from_logits(classifier(states)[0], rule)
