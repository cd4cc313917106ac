"""The settings every edit starts from: pinned to ZONE.md (the reference implementation's values) and to
segment-anything's own defaults, so a changed number is a failing test, not a quietly different edit."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from segment_anything import SamAutomaticMaskGenerator

from zone_engine.config import Action, EditConfig, SamConfig, command_line_spelling, option, parse_hw
from zone_engine.errors import ConfigError
from zone_engine.localize import localize
from zone_engine.refine import refine_mask

# ZONE.md, section by section.
REFERENCE_DEFAULTS = {
    # 0: 20 steps, text guidance 7.5, image guidance 1.5, seed 42; longest side 512, padded to multiples of 32.
    "steps": 20, "text_guidance": 7.5, "image_guidance": 1.5, "seed": 42, "max_side": 512, "size_multiple": 32,
    # 1: beta 0.2 for REMOVE, 0.01 for ADD / CHANGE.
    "beta_remove": 0.2, "beta_add_change": 0.01,
    # 2: the intended rule by default (the reference's defect on request); classified unless forced.
    "action": None, "action_rule": "intended",
    # 3: the reference rule min(2d, 255) <= 108 by default, the paper's d < 128; components under 64 px dropped.
    "threshold_rule": "reference", "reference_threshold": 108, "paper_threshold": 128, "min_region_area": 64,
    # 4: D = dilate(M_f, 3x3 rectangle, 4 iterations).
    "dilate_kernel": 3, "dilate_iterations": 4,
    # 5: disc radius 200 px, E > 30, close with 21x21, seam alpha 0.6.
    "fft_radius": 200, "fft_threshold": 30, "close_kernel": 21, "seam_alpha": 0.6,
}


def test_every_edit_setting_defaults_to_the_reference_implementations_value():
    defaults = {field.name: getattr(EditConfig(), field.name) for field in dataclasses.fields(EditConfig)}
    assert defaults.pop("sam") == SamConfig()
    assert defaults == REFERENCE_DEFAULTS


def test_sam_settings_default_to_segment_anythings_own():
    """ZONE.md section 4: SAM's automatic mask generation with segment-anything's defaults."""
    theirs = inspect.signature(SamAutomaticMaskGenerator).parameters
    for field in dataclasses.fields(SamConfig):
        assert getattr(SamConfig(), field.name) == theirs[field.name].default, field.name


@pytest.mark.parametrize(("action", "beta"), [(Action.REMOVE, 0.2), (Action.ADD, 0.01), (Action.CHANGE, 0.01)])
def test_beta_follows_the_action(action, beta):
    assert EditConfig().beta_for(action) == beta
    assert EditConfig(beta_remove=0.5, beta_add_change=0.07).beta_for(action) == (0.5 if beta == 0.2 else 0.07)
    assert EditConfig().beta_for(action.value.upper()) == beta  # by name too: "remove" had add/change's 0.01


def test_beta_needs_an_action():
    with pytest.raises(ConfigError, match="beta_for takes an action"):
        EditConfig().beta_for("auto")


@pytest.mark.parametrize(("function", "names"), [
    (localize, {"reference_threshold": "reference_threshold", "paper_threshold": "paper_threshold",
                "min_area": "min_region_area", "rule": "threshold_rule"}),
    (refine_mask, {"min_area": "min_region_area", "dilate_kernel": "dilate_kernel",
                   "dilate_iterations": "dilate_iterations"}),
])
def test_the_stage_functions_defaults_are_the_configs(function, names):
    """Called without them (as a user of the stage functions may), they do what an edit does."""
    parameters = inspect.signature(function).parameters
    for parameter, field in names.items():
        assert parameters[parameter].default == getattr(EditConfig(), field), parameter


def test_sizes_read_as_height_by_width_in_any_case_with_spaces_around_the_parts():
    assert parse_hw("512x768") == (512, 768)
    assert parse_hw(" 64 X 96 ") == (64, 96)


@pytest.mark.parametrize("text", ["64", "64x", "x64", "64x64x3", "-64x64", "64.0x64", "sixtyx64", "6 4x64", ""])
def test_a_size_that_is_not_two_whole_numbers_says_how_to_write_one(text):
    with pytest.raises(ConfigError, match="write HEIGHTxWIDTH in pixels"):
        parse_hw(text)


def test_errors_name_an_option_as_the_command_line_and_python_write_it():
    """The backend checks reach `zone edit` and ZonePipeline(...) alike: each spelling beside the other."""
    assert option("denoiser", "fused") == "--denoiser fused (denoiser='fused')"
    assert option("sam_onnx", "DIR") == "--sam-onnx DIR (sam_onnx=DIR)"  # a placeholder stays bare
    assert option("cuda_graphs", True) == "--cuda-graphs (cuda_graphs=True)"  # a switch takes no value


def test_the_command_line_prints_its_own_spelling_alone():
    both = f"{option('denoiser', 'tensorrt')} needs {option('engines', 'DIR')}; drop {option('cuda_graphs', True)}"
    assert command_line_spelling(both) == "--denoiser tensorrt needs --engines DIR; drop --cuda-graphs"
    other = "--steps 3 (of 20) and --seed x (steps=3)"  # a parenthesis that is not the same option's: kept
    assert command_line_spelling(other) == other
    # Names with digits too: the missing-checkpoint line said "--ip2p DIR (ip2p=DIR)" on the command line.
    assert command_line_spelling(f"pass the folder with {option('ip2p', 'DIR')}") == "pass the folder with --ip2p DIR"


def test_the_errors_a_caller_catches_import_from_the_package():
    import zone_engine
    from zone_engine import errors

    for name in ("ZoneError", "ConfigError", "CheckpointError", "DeviceError", "InputImageError", "InstructionError",
                 "EditCancelled", "EditWarning"):
        assert getattr(zone_engine, name) is getattr(errors, name) and name in zone_engine.__all__


def test_a_generator_as_seed_says_how_to_get_its_seed():
    """diffusers' callers pass a torch.Generator; its repr alone did not say what to pass instead."""
    import torch

    with pytest.raises(ConfigError, match=r"whole number \(a generator's seed: generator.initial_seed\(\)\)"):
        EditConfig(seed=torch.Generator().manual_seed(1))
