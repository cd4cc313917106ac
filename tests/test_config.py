"""The settings every edit starts from: pinned to ZONE.md (the reference implementation's values) and to
segment-anything's own defaults, so a changed number is a failing test, not a quietly different edit."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
from segment_anything import SamAutomaticMaskGenerator

from zone_engine.config import (
    Action,
    EditConfig,
    SamConfig,
    check_backend_options,
    check_precision,
    check_seed,
    check_switch,
    command_line_spelling,
    option,
    parse_action,
    parse_hw,
)
from zone_engine.errors import ConfigError, DeviceError, InstructionError, a_type, first_line, with_article
from zone_engine.instruction import check_instruction
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


@pytest.mark.parametrize(("change", "said"), [
    (lambda: EditConfig(guidance_scale=7.0), r"has no field 'guidance_scale': did you mean text_guidance\? "),
    (lambda: EditConfig().replace(num_inference_steps=10), r"no field 'num_inference_steps': did you mean steps\? "),
    (lambda: EditConfig(generator=1), r"has no field 'generator': did you mean seed\? "),
    (lambda: EditConfig(image_guidance_scale=1.5), r"no field 'image_guidance_scale': did you mean image_guidance\? "),
    (lambda: EditConfig(points_per_side=16), r"^points_per_side is a field of SamConfig, EditConfig's sam: pass "
                                             r"sam=config.sam.replace\(points_per_side=...\)"),
    (lambda: EditConfig().replace(pred_iou_thresh=0.5), r"^pred_iou_thresh is a field of SamConfig"),
])
def test_a_config_says_where_a_field_it_lacks_is(change, said):
    """Diffusers' names and SamConfig's fields matched no field closely enough to be guessed: "its fields: ..."."""
    with pytest.raises(ConfigError, match=said):
        change()


def test_a_config_takes_its_fields_by_position_too():
    """EditConfig's constructor is wrapped (a SamConfig field said): the values given by position still reach it."""
    assert EditConfig(7, 5.0) == EditConfig(steps=7, text_guidance=5.0)


@pytest.mark.parametrize(("config", "name"), [(EditConfig(), "seed"), (SamConfig(), "points_per_side")],
                         ids=["EditConfig", "SamConfig"])
def test_assigning_a_configs_field_says_to_replace_it(config, name):
    """It was dataclasses' FrozenInstanceError, "cannot assign to field 'steps'", not a ConfigError saying what to do;
    still one, for a caller that catches it."""
    for caught in (ConfigError, dataclasses.FrozenInstanceError):
        with pytest.raises(caught, match=rf"^{type(config).__name__}'s fields cannot be assigned .*: make a changed "
                                         rf"copy, config.replace\({name}=\.\.\.\)$"):
            setattr(config, name, 3)
    assert config == type(config)()  # unchanged, and copies as before
    assert dataclasses.replace(config) == config and config.replace() == config


@pytest.mark.parametrize(("name", "replace_with"), [("stpes", "steps"), ("strength", "FIELD")])
def test_assigning_a_misspelt_field_names_the_field_to_replace(name, replace_with):
    """config.stpes = 3 was told to config.replace(stpes=...), a second mistake; a name near no field, FIELD."""
    with pytest.raises(dataclasses.FrozenInstanceError, match=rf"^EditConfig has no field '{name}'; EditConfig's "
                       rf"fields cannot be assigned .*config.replace\({replace_with}=\.\.\.\)$"):
        setattr(EditConfig(), name, 3)


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
    # A whole float as typed on the command line ("--timeout-s 0", not "0.0"), Python's own spelling beside it.
    assert option("timeout_s", 0.0) == "--timeout-s 0 (timeout_s=0.0)"
    assert option("max_upload_mb", 0.5) == "--max-upload-mb 0.5 (max_upload_mb=0.5)"
    assert option("timeout_s", float("inf")) == "--timeout-s inf (timeout_s=inf)"


def test_the_command_line_prints_its_own_spelling_alone():
    both = f"{option('denoiser', 'tensorrt')} needs {option('engines', 'DIR')}; drop {option('cuda_graphs', True)}"
    assert command_line_spelling(both) == "--denoiser tensorrt needs --engines DIR; drop --cuda-graphs"
    other = "--steps 3 (of 20) and --seed x (steps=3)"  # a parenthesis that is not the same option's: kept
    assert command_line_spelling(other) == other
    # Names with digits too: the missing-checkpoint line said "--ip2p DIR (ip2p=DIR)" on the command line.
    assert command_line_spelling(f"pass the folder with {option('ip2p', 'DIR')}") == "pass the folder with --ip2p DIR"


def test_the_command_line_leaves_out_a_python_field_named_beside_its_option():
    """`zone serve --allow-origin https://App.Example.com:443` said "(--allow-origin, allow_origins)"."""
    said = "allowed origin 'x' (--allow-origin, allow_origins) and warm-up size 1x1 (--warmup-size, warmup_sizes)"
    assert command_line_spelling(said) == "allowed origin 'x' (--allow-origin) and warm-up size 1x1 (--warmup-size)"
    other = "a size (--max-pixels, steps)"  # a parenthesis naming another field: kept
    assert command_line_spelling(other) == other


def test_the_errors_a_caller_catches_import_from_the_package():
    import zone_engine
    from zone_engine import errors

    for name in ("ZoneError", "ConfigError", "CheckpointError", "DeviceError", "InputImageError", "InstructionError",
                 "EditCancelled", "EditWarning"):
        assert getattr(zone_engine, name) is getattr(errors, name) and name in zone_engine.__all__


def test_a_librarys_error_is_said_by_its_first_line_or_else_by_its_kind():
    """From a mutation audit: torch's missing-keys error runs to a list of keys (its first line says what failed),
    a bare EOFError says nothing; neither was pinned (the serving 400s and checkpoint errors quote them)."""
    assert first_line(RuntimeError("Error(s) in loading state_dict for Sam:\n\tMissing key(s)")) == (
        "Error(s) in loading state_dict for Sam:")
    assert first_line(EOFError()) == "EOFError" and first_line(ValueError(" \n ")) == "ValueError"


@pytest.mark.parametrize("name, said", [
    ("array", "an array"), ("Event", "an Event"), ("int", "an int"), ("OSError", "an OSError"),
    ("unknown", "an unknown"), ("CMYK", "a CMYK"), ("str", "a str"), ("YCbr", "a YCbr"),
])
def test_a_name_gets_the_article_its_first_letter_takes(name, said):
    """From a mutation audit: each vowel, either case, was not pinned (the messages of a_type and of an image's
    colour profile read "an unknown", "a CMYK")."""
    assert with_article(name) == said


def test_a_type_says_the_type_as_python_names_it():
    assert (a_type(OSError()), a_type(3), a_type(None)) == ("an OSError", "an int", "a NoneType")


def test_a_generator_as_seed_says_how_to_get_its_seed():
    """diffusers' callers pass a torch.Generator; its repr alone did not say what to pass instead."""
    import torch

    with pytest.raises(ConfigError, match=r"whole number \(a generator's seed: generator.initial_seed\(\)\)"):
        EditConfig(seed=torch.Generator().manual_seed(1))


# Each limit just past its edge, against the ranges ZONE.md's settings and README's "Settings" give (steps 1..999,
# seeds 0..2**32 - 1, beta 0..1000, max_side up to 2048 and at least size_multiple, a multiple of 32, 8-bit levels).
@pytest.mark.parametrize(("changes", "words"), [
    ({"steps": 0}, "steps must be between 1 and 999"), ({"steps": 1000}, "steps must be between 1 and 999"),
    ({"seed": -1}, "seed must be between 0 and 4294967295"),
    ({"text_guidance": -0.5}, "text_guidance and image_guidance must be >= 0"),
    ({"image_guidance": -0.5}, "text_guidance and image_guidance must be >= 0"),
    ({"beta_remove": 1000.5}, "beta_remove and beta_add_change must be between 0 and 1000$"),
    ({"beta_add_change": 1000.5}, "beta_remove and beta_add_change must be between 0 and 1000$"),
    ({"max_side": 2049}, r"max_side must be at least size_multiple \(32\) and at most 2048, got 2049"),
    ({"max_side": 16}, r"max_side must be at least size_multiple \(32\) and at most 2048, got 16"),
    ({"size_multiple": 48}, "size_multiple must be a positive multiple of 32 .*, got 48"),
    ({"size_multiple": 0}, "size_multiple must be a positive multiple of 32 .*, got 0"),
    # A size_multiple past max_side is the size_multiple's mistake too, said with both values.
    ({"size_multiple": 4096}, r"max_side must be at least size_multiple \(4096\) and at most 2048, got 512"),
    ({"size_multiple": -32}, "size_multiple must be a positive multiple of 32 .*, got -32"),
    ({"seam_alpha": 1.01}, "seam_alpha must be between 0 and 1"),
    ({"seam_alpha": -0.01}, "seam_alpha must be between 0 and 1"),
    ({"min_region_area": -1}, "min_region_area must be >= 0"),
    ({"dilate_kernel": 0}, "kernel sizes must be between 1 and 1023"),
    ({"dilate_kernel": 1024}, "kernel sizes must be between 1 and 1023"),
    ({"close_kernel": 0}, "kernel sizes must be between 1 and 1023"),
    ({"close_kernel": 1024}, "kernel sizes must be between 1 and 1023"),
    ({"dilate_iterations": 1024}, "dilate_iterations must be at most 1023"),
    ({"reference_threshold": -1}, "8-bit levels"), ({"paper_threshold": 256}, "8-bit levels"),
    ({"fft_threshold": 256}, "8-bit levels"),
    ({"threshold_rule": "papers"}, "threshold_rule must be 'reference' or 'paper'"),
    ({"seam_alpha": True}, "seam_alpha must be a finite number"),  # a bool is no weight, as it is no count
])
def test_a_setting_just_past_its_limit_is_refused_by_name(changes, words):
    """A limit off by one either way is a value an edit silently runs with (a negative seed, a zero kernel)."""
    with pytest.raises(ConfigError, match=words):
        EditConfig(**changes)


def test_every_limit_itself_is_accepted():
    """The ends of each documented range are values a user may pass: an edge refused is a limit off by one."""
    for changes in ({"steps": 1}, {"steps": 999}, {"seed": 0}, {"seed": 2**32 - 1},
                    {"text_guidance": 0, "image_guidance": 0}, {"beta_remove": 0, "beta_add_change": 0},
                    {"beta_remove": 1000, "beta_add_change": 1000}, {"max_side": 2048}, {"max_side": 32},
                    {"max_side": 64, "size_multiple": 64}, {"seam_alpha": 0}, {"seam_alpha": 1},
                    {"min_region_area": 0}, {"dilate_kernel": 1, "close_kernel": 1},
                    {"dilate_kernel": 1023, "close_kernel": 1023}, {"dilate_iterations": 0, "fft_radius": 0},
                    {"dilate_iterations": 1023},
                    {"reference_threshold": 0, "paper_threshold": 0, "fft_threshold": 0},
                    {"reference_threshold": 255, "paper_threshold": 255, "fft_threshold": 255}):
        config = EditConfig(**changes)
        assert {name: getattr(config, name) for name in changes} == changes


def test_whole_and_finite_numbers_are_stored_as_plain_int_and_float():
    """A float field given an int holds a float, as the dataclass says (JSON, reprs and comparisons read it)."""
    config = EditConfig(seam_alpha=1, text_guidance=7)
    assert type(config.seam_alpha) is float and type(config.text_guidance) is float


@pytest.mark.parametrize(("changes", "words"), [
    ({"points_per_side": 257}, "points_per_side must be at most 256"),
    ({"points_per_batch": 0}, "points_per_side and points_per_batch must be >= 1"),
    ({"min_mask_region_area": -1}, "crop_n_layers and min_mask_region_area must be >= 0"),
    ({"crop_n_layers": 4}, "crop_n_layers must be at most 3"),
    ({"crop_nms_thresh": 1.01}, "NMS thresholds"), ({"box_nms_thresh": -0.01}, "NMS thresholds"),
    ({"box_nms_thresh": 1.01}, "NMS thresholds"), ({"stability_score_offset": -0.5}, "stability_score_offset"),
])
def test_a_sam_setting_just_past_its_limit_is_refused_by_name(changes, words):
    """The limits, not only values far past them: 4 crop layers are 341 encoder runs."""
    with pytest.raises(ConfigError, match=words):
        SamConfig(**changes)


def test_sam_limits_themselves_are_accepted():
    config = SamConfig(points_per_side=256, points_per_batch=1, crop_n_layers=3, min_mask_region_area=0,
                       box_nms_thresh=1.0, crop_nms_thresh=0.0, stability_score_offset=0.0)
    assert (config.points_per_side, config.crop_n_layers, config.stability_score_offset) == (256, 3, 0.0)


def test_a_seed_is_a_whole_number_of_32_bits_named_as_its_caller_calls_it():
    """check_seed guards ZonePipeline.tiny and the server's seeds: 2**32 - 1 is the last one torch keeps whole."""
    assert check_seed(2**32 - 1) == 4294967295 and check_seed(0) == 0
    assert type(check_seed(np.int64(7))) is int
    for bad in (True, -1, 2**32, 1.0):
        with pytest.raises(ConfigError, match=r"^seed must be a whole number between 0 and 4294967295"):
            check_seed(bad)
    with pytest.raises(ConfigError, match=r"^--seed must be a whole number"):
        check_seed(2**32, name="--seed")


def test_actions_read_by_name_with_spaces_and_any_case_and_empty_means_classify():
    assert parse_action(" Add ") is Action.ADD and parse_action("") is None and parse_action(" AUTO ") is None
    assert parse_action(None) is None and parse_action(Action.CHANGE) is Action.CHANGE
    assert EditConfig(action="remove").action is Action.REMOVE  # the name, stored as the Action


def test_half_precision_of_either_kind_is_refused_on_the_cpu():
    """bf16 as fp16: the engine's half precision runs on CUDA only (check_precision's own rule)."""
    for dtype in ("fp16", "bf16"):
        with pytest.raises(DeviceError, match=f"--dtype {dtype}"):
            check_precision(dtype, "cpu")
        check_precision(dtype, "auto")
    check_precision("fp32", "cpu")


def test_fp16_sam_is_refused_on_the_cpu_and_bf16_sam_is_not():
    """SAM in fp16 needs CUDA; bf16 runs on the CPU (README's --sam-precision), so only fp16 is a DeviceError."""
    with pytest.raises(DeviceError, match=r"--sam-precision fp16 \(sam_precision='fp16'\) runs only on CUDA"):
        check_backend_options("cpu", sam_precision="fp16")
    check_backend_options("cpu", sam_precision="bf16")
    check_backend_options("auto", sam_precision="fp16")


def test_a_switch_without_a_meaning_for_none_refuses_none():
    """progress=None is no switch: only the options whose None means "the engine's choice" take it."""
    with pytest.raises(ConfigError, match=r"^progress must be True or False, got None$"):
        check_switch("progress", None)
    check_switch("cuda_graphs", None, none_means="the engine's choice")


def test_an_instruction_over_the_length_limit_says_its_stripped_length():
    """The length said is what was checked: the text without the spaces around it."""
    with pytest.raises(InstructionError, match=r"is 10,001 characters long, over 10,000"):
        check_instruction("  " + "a" * 10_001 + "\n")
    assert check_instruction("\t make it red \n") == "make it red"


def test_an_instruction_with_a_lone_surrogate_is_refused_as_not_unicode():
    """Bytes the terminal could not decode arrive as lone surrogates: refused here, not as an encode error later."""
    with pytest.raises(InstructionError, match="not valid Unicode text"):
        check_instruction("make it \udc80red")


def test_importing_the_engine_puts_this_checkouts_root_after_the_installed_packages():
    """`python -m` in the checkout (pytest, the benchmark tools) put its root first on sys.path, where kernels/
    shadowed Hugging Face's `kernels`: with transformers 5.25, which imports it, every diffusers pipeline failed
    ("cannot import name 'CUDAProperties' from 'kernels'")."""
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    order = "import sys, zone_engine; print('\\n'.join(sys.path))"
    found = subprocess.run([sys.executable, "-c", order], cwd=root, capture_output=True, text=True, check=True)
    paths = [str(Path(entry or root).resolve()) for entry in found.stdout.splitlines()]
    packages = str(Path(sysconfig.get_paths()["purelib"]).resolve())
    assert paths.index(str(root)) > paths.index(packages)  # it was first: `python -c` puts the current folder there


def test_the_package_is_typed_and_its_lazy_names_are_typed_as_their_classes():
    """For a type checker: without py.typed an installed package's hints are not read, and the names imported
    lazily through the module's __getattr__ were typed as its `object` (`ZonePipeline.tiny()`: "object" has no
    attribute "tiny"). Each is imported for type checkers alone, under TYPE_CHECKING."""
    import ast
    from pathlib import Path

    import zone_engine

    package = Path(zone_engine.__file__).parent
    assert (package / "py.typed").is_file()
    tree = ast.parse((package / "__init__.py").read_text())
    for_checkers = {alias.asname or alias.name for node in ast.walk(tree)
                    if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
                    for statement in node.body if isinstance(statement, ast.ImportFrom) for alias in statement.names}
    assert for_checkers == set(zone_engine._FROM_PIPELINE)
    assert "TYPE_CHECKING" not in dir(zone_engine)  # its namespace is its API
