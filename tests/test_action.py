"""ZONE.md section 2: action classification."""

from __future__ import annotations

import pytest
import torch

from zone_engine.action import action_from_logits, classify_action, keyword_action
from zone_engine.config import Action, EditConfig, parse_action
from zone_engine.errors import ConfigError
from zone_engine.models import ActionClassifier


def test_intended_rule_max_pools_logits_over_tokens():
    logits = torch.zeros(77, 3)
    logits[3] = torch.tensor([5.0, 0.0, 0.0])  # CHANGE has the strongest token, early
    logits[40] = torch.tensor([0.0, 1.0, 0.0])  # ADD's best token comes latest
    assert action_from_logits(logits, "intended") is Action.CHANGE
    # The reference's defect: argmax over the *positions* of each class's maximum.
    assert action_from_logits(logits, "reference") is Action.ADD


def test_intended_rule_is_a_max_not_a_sum_or_mean_over_tokens():
    """ZONE.md: max-pool over the 77 tokens. REMOVE's single token at 4.0 beats ADD's ten tokens at 1.0 each,
    though ADD's sum (10) and mean (10/77) are larger than REMOVE's (4, 4/77)."""
    logits = torch.zeros(77, 3)
    logits[2, 2] = 4.0
    logits[5:15, 1] = 1.0
    assert action_from_logits(logits, "intended") is Action.REMOVE


def test_class_order_is_change_add_remove():
    for index, action in enumerate((Action.CHANGE, Action.ADD, Action.REMOVE)):
        logits = torch.full((77, 3), -1.0)
        logits[10, index] = 3.0
        assert action_from_logits(logits) is action


def test_mlp_semantics_with_known_weights(tiny_models):
    """fc2(relu(fc1(h))) per token on the masked CLIP states; weights chosen so REMOVE wins."""
    classifier = ActionClassifier(input_size=32, hidden_size=4)
    with torch.no_grad():
        classifier.fc1.weight.zero_()
        classifier.fc1.bias.copy_(torch.tensor([1.0, -1.0, 2.0, 0.0]))
        classifier.fc2.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
        classifier.fc2.bias.zero_()
    states = torch.randn(1, 77, 32)
    logits = classifier(states)[0]
    assert torch.allclose(logits, torch.tensor([1.0, 0.0, 2.0]).expand(77, 3))
    action = classify_action("make it red", tiny_models.tokenizer, tiny_models.text_encoder, classifier)
    assert action is Action.REMOVE


def test_classifier_uses_the_attention_mask(tiny_models, monkeypatch):
    seen = {}
    encoder = tiny_models.text_encoder
    original = encoder.forward

    def spy(input_ids, attention_mask=None, **kwargs):
        seen["mask"] = attention_mask
        return original(input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(encoder, "forward", spy)
    classify_action("add a hat", tiny_models.tokenizer, encoder, ActionClassifier(32))
    assert seen["mask"] is not None and seen["mask"].shape == (1, 77)
    assert 0 < int(seen["mask"].sum()) < 77  # padding masked out


@pytest.mark.parametrize(
    "instruction,expected",
    [
        ("Remove the cat", Action.REMOVE),
        ("please delete the car", Action.REMOVE),
        ("erase the sign", Action.REMOVE),
        ("get rid of the lamp", Action.REMOVE),
        ("add a hat to the dog", Action.ADD),
        ("Put sunglasses on her", Action.ADD),
        ("place a vase on the table", Action.ADD),
        ("insert a moon in the sky", Action.ADD),
        ("make the dog a golden statue", Action.CHANGE),
        ("turn the address into text", Action.CHANGE),  # 'add' inside a word is not ADD
        ("remove the hat and add a scarf", Action.REMOVE),  # ZONE.md's order: the REMOVE words first
        ("add a scarf, then erase the hat", Action.REMOVE),
    ],
)
def test_keyword_fallback(instruction, expected):
    assert keyword_action(instruction) is expected


def test_no_classifier_uses_keywords(tiny_models):
    assert classify_action("remove the dog", tiny_models.tokenizer, tiny_models.text_encoder, None) is Action.REMOVE


def test_forced_action(tiny_pipe):
    from conftest import smooth_image

    config = tiny_pipe.default_config.replace(steps=1, action=Action.REMOVE)
    assert tiny_pipe.edit(smooth_image(64, 64), "make it blue", config).action is Action.REMOVE
    assert EditConfig(action="add").action is Action.ADD
    assert parse_action("auto") is None
    with pytest.raises(ConfigError, match="unknown action"):
        parse_action("explode")


@pytest.mark.parametrize(("name", "expected"), [("REMOVE", Action.REMOVE), (" Add\n", Action.ADD),
                                                ("change", Action.CHANGE)])
def test_an_action_is_named_in_any_case_as_editconfig_takes_it(name, expected):
    """Action("REMOVE") was a bare ValueError while EditConfig(action="REMOVE") and --action REMOVE took it."""
    assert Action(name) is expected is EditConfig(action=name).action


@pytest.mark.parametrize("value", ["explode", "", 3, ["remove"]])
def test_an_unknown_action_is_a_value_error_naming_the_actions(value):
    with pytest.raises(ValueError, match=r"is not an action: use change, add, remove$"):
        Action(value)
