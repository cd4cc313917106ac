"""The `zone` command line: `zone edit` for real checkpoints, `zone demo` for a zero-setup run."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from zone_export.options import add_build_engine_arguments, add_export_sam_arguments, add_export_unet_arguments

from . import __version__
from .config import (
    ATTENTION,
    BACKEND_OPTIONS,
    DECIMAL_INTEGER,
    DEFAULT_ACTION_CLASSIFIER,
    DEFAULT_SAM,
    DENOISERS,
    GROUP_NORMS,
    IP2P_ID,
    LOCALIZATION_KERNELS,
    MAGICBRUSH_ID,
    MAX_BATCH,
    MAX_PIXELS,
    MAX_SEED,
    MAX_STEPS,
    MODEL_SIZES,
    SAM_PRECISIONS,
    SAM_TYPES,
    SAMPLE_INSTRUCTION,
    SEGMENTERS,
    Action,
    EditConfig,
    check_backend_options,
    check_precision,
    command_line_spelling,
    device_kind,
    error_line,
    parse_action,
    parse_hw,
)
from .edit_files import (
    MASK_OUTPUTS,
    EditJob,
    check_list_kept,
    check_masks_folder,
    check_report_path,
    edit_all,
    output_argument,
    plan_jobs,
    print_summary,
    report_argument,
    reported_outputs,
    save_masks,
    settings_record,
    suffix_argument,
)
from .errors import ConfigError, ZoneError, nearest
from .instruction import check_instruction
from .manifest import EXAMPLE as MANIFEST_EXAMPLE
from .manifest import plan_manifest
from .paths import (
    check_output_folder,
    file_argument,
    folder_argument,
    refused_path_line,
    remove_stale_partials,
    written_atomically,
    written_together,
)
from .serving import SERVE_MODULES
from .serving.settings import PipelineSpec, ServeSettings
from .streams import file_names_on_stderr_as_their_bytes, is_terminal, print_path, stderr_kept

RANDOM_WEIGHTS_NOTICE = (
    "note: the demo runs tiny RANDOM models, so the edit itself is meaningless; it shows that every stage runs.\n"
    "      For real edits get the checkpoints (see README, 'Real checkpoints') and run:\n"
    '      zone edit photo.jpg -i "make the dog a golden statue" -o edited.png --sam sam_vit_h_4b8939.pth'
)


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("edit options")
    group.add_argument("--action", type=str.lower, default="auto", choices=["auto", *(a.value for a in Action)],
                       help="force the action instead of classifying the instruction (default: auto)")
    group.add_argument("--steps", type=int, default=None,
                       help=f"denoising steps, 1..{MAX_STEPS} (default: {EditConfig.steps})")
    group.add_argument("--seed", type=int, default=None,
                       help=f"seed of the initial noise, 0..{MAX_SEED} (default: {EditConfig.seed})")
    group.add_argument("--threshold-rule", type=str.lower, choices=["reference", "paper"], default="reference",
                       help="M_b rule: reference min(2d,255)<=108 (default) or the paper's d<128")


def _add_backend_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backends")
    group.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    group.add_argument("--denoiser", type=str.lower, default="fused", choices=DENOISERS,
                       help="fused (default): one fused dual step of tensor ops, the same edit as eager on the "
                       "CPU, CUDA graphs on a GPU, batches several edits; eager: the sequential reference; "
                       "compile: fused + torch.compile (slow first edit); tensorrt: exported engine (see --engines; "
                       "written for TensorRT 10, not yet run on a GPU)")
    group.add_argument("--engines", type=folder_argument, metavar="DIR",
                       help="with --denoiser tensorrt: the folder written by `zone export unet`")
    group.add_argument("--attention", type=str.lower, default="sdpa", choices=ATTENTION,
                       help="attention kernels of the UNets and VAE: sdpa (PyTorch, default) or xformers (CUDA, "
                       "needs `pip install xformers`)")
    group.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay each denoising step (fused, compile, tensorrt), the text encoder and the VAE "
                       "from captured CUDA graphs, one capture per shape; default: on with CUDA, but for "
                       "--denoiser eager")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="run the UNets' and the VAE's convolutions in the channels-last (NHWC) layout, where "
                       "GPUs have their fastest fp16/bf16 convolution kernels; --no-channels-last: neither. Default: "
                       "the UNets' only, on CUDA in fp16/bf16 (a 10%% faster step on an H200); none on the CPU, "
                       "where it is slower")
    group.add_argument("--segmenter", type=str.lower, default="torch", choices=SEGMENTERS,
                       help="refinement SAM: torch (segment-anything, default) or onnx (exported, see --sam-onnx)")
    group.add_argument("--sam-onnx", type=folder_argument, metavar="DIR",
                       help="with --segmenter onnx: the folder written by `zone export sam` (it replaces --sam)")
    group.add_argument("--sam-precision", type=str.lower, default="fp32", choices=SAM_PRECISIONS,
                       help="with --segmenter torch: precision of SAM's image encoder (nearly all its FLOPs); "
                       "prompt decoding, scores and thresholds stay fp32. fp32 (default, the reference), bf16, "
                       "fp16 (CUDA only): faster, masks may differ slightly; SAM's weights stay fp32 either way")
    group.add_argument("--kernels", type=str.lower, default="auto", choices=LOCALIZATION_KERNELS,
                       help="localization math: triton (fused kernels), torch (reference); default auto: triton on "
                       "CUDA, torch elsewhere")
    group.add_argument("--group-norm", type=str.lower, default="auto", choices=GROUP_NORMS,
                       help="the UNets' and VAE's GroupNorm: triton (a kernel that keeps channels-last activations "
                       "in their layout), torch (PyTorch's, which converts them to NCHW on CUDA); default auto: triton "
                       "on CUDA where the steps and VAE are CUDA graphs, but for --denoiser eager (the reference) and "
                       "compile's UNets (inductor's own norm); torch elsewhere and with --no-cuda-graphs (its "
                       "launches would cost more than it saves)")


MASKS_WRITTEN = ("mask_b.png, mask_f.png, region.png (white: in the mask), styled.png (I_sty), heatmap.png and "
                 "difference.png (d, the gray levels M_b thresholds)")
SAVE_MASKS_HELP = (f"also write {MASKS_WRITTEN} to DIR (of several edits, each's to DIR/NAME/, NAME its output's file "
                   "name without the suffix)")


def _add_output_options(parser: argparse.ArgumentParser, save_masks_help: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--save-masks", type=folder_argument, metavar="DIR", help=save_masks_help)
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_many_options(parser: argparse.ArgumentParser, suffix_when: str) -> None:
    parser.add_argument("--suffix", type=suffix_argument,
                        help=f"{suffix_when}: the edits' file suffix, which names their format, e.g. .png (default: "
                        "each input's own where Pillow writes it, else .png)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="leave out the edits whose output file is there already, as after an interrupted run "
                        "(an edit's output is written last, whole, so it being there means the edit is done)")
    parser.add_argument("--report", type=report_argument, metavar="FILE",
                        help="also write FILE, one JSON line per edit as it ends: its name, image, output, "
                        "instruction, action, seed, steps, beta, threshold rule, seconds per stage, edited pixels, "
                        "fallback and warnings, or its error and the settings it ran with: the record to reproduce it "
                        "by (a run cut short keeps the lines of the edits it ended; with --skip-existing the lines are "
                        "added to FILE's, those of the edits done before kept)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help=f"how many edits run at once, those of one size denoised as one batch (faster on a GPU; "
                        f"results equal to one at a time up to float rounding); 1..{MAX_BATCH} (default: 1)")


def _add_edit_options(parser: argparse.ArgumentParser, save_masks_help: str = SAVE_MASKS_HELP) -> None:
    _add_request_options(parser)
    _add_backend_options(parser)
    _add_output_options(parser, save_masks_help)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    # No argparse defaults: PipelineSpec holds them, and --tiny/--random-weights must see what was given.
    models.add_argument("--ip2p", help=f"InstructPix2Pix folder or cached id (default: {IP2P_ID})")
    models.add_argument("--magicbrush", help=f"MagicBrush folder or cached id (default: {MAGICBRUSH_ID})")
    models.add_argument("--sam", type=file_argument,
                        help=f"SAM checkpoint .pth, for --segmenter torch (default: {DEFAULT_SAM})")
    models.add_argument("--sam-type", type=str.lower, choices=SAM_TYPES,
                        help="SAM size, when the file name does not say it: vit_h (ZONE's; 2.4 GiB of fp32 "
                        "weights), vit_l (1.2 GiB) or vit_b (0.35 GiB), whose segments differ")
    models.add_argument("--action-classifier", type=file_argument,
                        help=f"ZONE's action classifier (default: {DEFAULT_ACTION_CLASSIFIER} when that file is "
                             "there); without it a keyword rule decides the action")
    models.add_argument("--dtype", type=str.lower, default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="precision of the diffusion models (fp16/bf16 need CUDA; default fp32, the "
                        "reference): their weights take 7.2 GiB in fp32, 3.6 GiB in fp16/bf16, beside SAM's; "
                        "on a 16-24 GB GPU use fp16")
    models.add_argument("--tiny", action="store_true", help="use tiny random models instead (for trying the CLI)")
    models.add_argument("--random-weights", type=str.lower, choices=[size for size in MODEL_SIZES if size != "tiny"],
                        help="SD1.5-sized architectures (and SAM --sam-type, default vit_b) with random weights: "
                        "real costs, meaningless edits; for load tests")


class WrapAtSpaces(argparse.HelpFormatter):
    """argparse's help, wrapped at spaces only: `--no-channels-last` or `zone build-engine` copied from a
    wrapped line must still work (textwrap breaks at hyphens by default)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(self._whitespace_matcher.sub(" ", text).strip(), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


def whole_number(text: str) -> int:
    """An integer option's value, in decimal digits: int() also reads "4_2" and "４２" as 42 (a typo passed as a
    number), which the server's form fields refuse; one spelling for both."""
    if not DECIMAL_INTEGER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: write a whole number in decimal digits")
    return int(text)


class CommandParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors that point to the command's --help (not a 20-line usage block
    first), an unknown option said by the command it was given to, and no abbreviated options (a script's
    `--ste 1` would break the day another option began with --ste)."""

    def __init__(self, *args: Any, written_here: dict[str, str] | None = None, **kwargs: Any) -> None:
        """`written_here`: another command's option and this one's way to say it (`--tiny`: `--models tiny`)."""
        super().__init__(*args, **{"allow_abbrev": False, "formatter_class": WrapAtSpaces, **kwargs})
        self.register("type", int, whole_number)  # every `type=int` option, of every command and subcommand
        self._given: list[str] = []
        self._written_here = written_here or {}

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        self._given = list(sys.argv[1:] if args is None else args)  # a subcommand's: what follows its name
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            message += self._misspelt()
        self.exit(2, f"{error_line(message + self._dash_files())} (see {self.prog} --help)\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """argparse's check of a value among choices, a mistyped command's error naming the one it likely meant:
        `zone edti` was told the list of commands alone."""
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as error:
            meant = isinstance(action, argparse._SubParsersAction) and nearest(str(value), action.choices)
            if not meant:
                raise
            raise argparse.ArgumentError(action, f"{error.message}; did you mean {meant!r}?") from None

    def _options_given(self) -> list[str]:
        """The tokens given before a `--`: after it every one is an argument, `--` itself none of the options."""
        return self._given[:self._given.index("--")] if "--" in self._given else self._given

    def _dash_files(self, tokens: Sequence[str] | None = None) -> str:
        """The files among `tokens` (default: those given, but this command's options) whose names begin with a
        dash, which argparse reads as options: `zone edit -1.png ...` was told "required: image", not why."""
        if tokens is None:
            tokens = [token for token in self._options_given() if token not in self._option_string_actions]
        return "".join(f" ({name} is read as an option: for the file, write ./{name})" for name in tokens
                       if _is_dash_file(name))

    def _misspelt(self) -> str:
        """The options given that this command does not have: argparse says a required one missing first, so
        `--instrucion "..."` was reported as a missing --instruction alone, its typo never named."""
        said = [f"{name} is not an option" + (f": did you mean {meant}?" if meant else "")
                for name, meant in self._meant(self._options_given())]
        return f" ({'; '.join(said)})" if said else ""

    def _meant(self, tokens: Sequence[str]) -> list[tuple[str, str | None]]:
        """The `--options` among `tokens` that this command does not have, each with the one it likely meant."""
        given = [token.partition("=")[0] for token in tokens if token.startswith("--") and not _is_dash_file(token)]
        options = {option.lstrip("-"): option for option in self._option_string_actions}
        # Compared without the dashes: with them, --bogus was near --out.
        return [(name, self._written_here.get(name) or options.get(nearest(name.lstrip("-"), options) or ""))
                for name in given if name not in self._option_string_actions]

    def _command_parser(self, parsed: argparse.Namespace) -> CommandParser:
        """The parser of the (sub)command `parsed` names (`zone export unet`'s), whose options a mistake is near."""
        parser = self
        for name in ("command", "target"):
            chosen = getattr(parsed, name, None)
            commands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
            if not chosen or not commands:
                break
            parser = commands[0].choices[chosen]
        return parser

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:  # argparse says these as the top level's ("zone: ... unrecognized"), whichever command had them
            command = " ".join([self.prog, *(getattr(parsed, name) for name in ("command", "target")
                                             if getattr(parsed, name, None))])
            guessed = [(name, option) for name, option in self._command_parser(parsed)._meant(unknown) if option]
            guesses = [f"{name + ': ' if len(guessed) > 1 else ''}did you mean {option}?" for name, option in guessed]
            hint = (f" ({'; '.join(guesses)})" if guesses else "") + self._dash_files(unknown)
            self.exit(2, f"error: unrecognized arguments: {' '.join(unknown)}{hint} (see {command} --help)\n")
        return parsed


def _is_dash_file(token: str) -> bool:
    """Whether `token` begins with a dash and names something there (a file given as `-photo.png`)."""
    return token.startswith("-") and token != "-" and os.path.lexists(token)


EXIT_CODES = ("Exit codes: 0 success, 2 bad input or setup (one line on stderr says what to do), 130 interrupted "
              "(Ctrl-C), 143 stopped by SIGTERM, 129 hung up (SIGHUP: its terminal closed; ignored under nohup).")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="zone",
        description="ZONE: zero-shot instruction-guided local image editing. Give an image and an "
        "instruction; only the region the instruction is about changes, every other pixel stays as it was.",
        epilog=f"{EXIT_CODES} A command's options: `zone COMMAND --help`, or `zone help COMMAND`.",
    )
    parser.add_argument("--version", action="version", version=f"zone-engine {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edit = commands.add_parser(
        "edit", help="edit an image, or several, with real checkpoints (or --tiny random models)",
        description="Edit IMAGE as INSTRUCTION says and write the result to OUTPUT (-o); several images load the "
        "models once, and their edits go to the folder OUTPUT, each under its input's file name. Models load from "
        "local folders or the offline Hugging Face cache; nothing is downloaded.",
        epilog="Exit codes: 0 every image edited, 2 bad input or setup (one `error:` line says what to do; with "
        "several images also: some not edited, each said, and the edited ones written), 130 interrupted (Ctrl-C), "
        "143 stopped by SIGTERM, 129 hung up (SIGHUP: its terminal closed; ignored under nohup); the edits written "
        "before any of these are whole.",
    )
    edit.add_argument("image", type=file_argument, nargs="+",
                      help="input image(s) (PNG, JPEG, WebP, TIFF, ...); of several, one that cannot be read is said "
                      "and skipped, the others edited (exit code 2 at the end), and folders are left out")
    edit.add_argument("-i", "--instruction", required=True, help='what to do, e.g. "make the dog a golden statue"')
    edit.add_argument("-o", "--output", type=output_argument, required=True,
                      help="where to write the edited image; a folder (created if missing) for several images, or "
                      "one that exists or ends in / for one: each edit keeps its input's file name there (its format "
                      "too, where Pillow writes it; else .png)")
    _add_many_options(edit, "with -o a folder")
    _add_model_options(edit)
    _add_edit_options(edit)

    batch = commands.add_parser(
        "batch", help="run the edits a JSON Lines file lists, each its own image and instruction",
        description="Run every edit MANIFEST lists, the models loaded once: a JSON Lines file, one object a line, "
        f"such as {MANIFEST_EXAMPLE}. Fields: image (relative to MANIFEST's folder) and instruction, required; "
        "output (a path inside -o; default: the image's file name), action, steps and seed, each over the options "
        "below. One image may be edited several ways (give each its own output). Every line is checked before any "
        "model loads, a mistake said with its line's number.",
        epilog="Exit codes: 0 every edit done, 2 bad input or setup (one `error:` line says what to do; or some "
        "edits not done, each said, the others written), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM, 129 hung "
        "up (SIGHUP: its terminal closed; ignored under nohup).",
    )
    batch.add_argument("manifest", type=file_argument, metavar="MANIFEST",
                       help="the JSON Lines file of edits; - reads it from standard input, its images relative to the "
                       "current folder")
    batch.add_argument("-o", "--output", type=output_argument, required=True,
                       help="the folder the edits go to (created if missing)")
    _add_many_options(batch, "for an edit without an output")
    _add_model_options(batch)
    _add_edit_options(batch)

    demo = commands.add_parser(
        "demo", help="run every stage on tiny random models and a built-in image (no checkpoints needed)",
        description="Zero-setup run: tiny random models and a sample image generated in code. Writes "
        "input.png, output.png, mask_b.png, mask_f.png, region.png, styled.png, heatmap.png, difference.png and "
        "timings.json.",
        epilog=EXIT_CODES,
    )
    demo.add_argument("--out", type=folder_argument, required=True, help="folder to write the results to")
    demo.add_argument("-i", "--instruction", default=SAMPLE_INSTRUCTION,
                      help="instruction to run (default: %(default)r, for the built-in picture's house)")
    # zone edit's wording spoke of several edits, and of masks written nowhere else: the demo's one edit has them
    # in --out already.
    _add_edit_options(demo, f"write {MASKS_WRITTEN}, which --out gets in any case, to DIR as well")
    _add_serve_command(commands)
    _add_export_commands(commands)
    commands.add_parser(
        "bench", add_help=False, help="per-stage latency: baseline vs engine backends (`zone bench --help`)",
    )
    commands.add_parser(
        "profile", add_help=False,
        help="one edit under torch.profiler: per stage, device-busy share and launches (`zone profile --help`)",
    )
    return parser


def _add_serve_command(commands) -> None:
    serve = commands.add_parser(
        "serve", help="run the HTTP edit service (dynamic batching; Ray Serve with --ray)",
        description="Serve POST /v1/edit (multipart: image, instruction[, action, steps, seed, return=png|json]), "
        "GET /healthz, /readyz, /metrics and /docs. Concurrent edits of one image size are denoised as one "
        "batch (up to --max-batch, waiting at most --max-wait-ms). A full queue answers 503 with Retry-After; "
        "an edit over --timeout-s answers 504 and is cancelled. Edit options below set the server's defaults.",
        epilog="Exit codes: 2 bad options or setup (one line on stderr says what to do), 130 interrupted (Ctrl-C), "
        "143 stopped by SIGTERM (after the running batch: uvicorn's way, the process ended by the signal; with "
        "--ray, said `terminated`).",
    )
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    limits = ServeSettings()  # the defaults: a server built in Python (PipelineSpec, ServeSettings) gets the same
    server.add_argument("--max-batch", type=int, default=limits.max_batch,
                        help=f"most edits denoised together, at most --queue-size and {MAX_BATCH} "
                        "(default: %(default)s; on a 16-24 GB GPU, --warmup-size 512x512 tries each batch size "
                        "before ready)")
    server.add_argument("--max-wait-ms", type=float, default=limits.max_wait_ms,
                        help="longest a request waits for others to batch with; 0 or more, under --timeout-s "
                        "(default: %(default)g)")
    server.add_argument("--queue-size", type=int, default=limits.queue_size,
                        help="most edits waiting; more get 503 (default: %(default)s)")
    server.add_argument("--timeout-s", type=float, default=limits.timeout_s,
                        help="per-request limit, queueing included; then 504 and the edit is cancelled "
                        "(default: %(default)g)")
    server.add_argument("--max-upload-mb", type=float, default=limits.max_upload_mb,
                        help="largest upload accepted, in MiB (default: %(default)g)")
    server.add_argument("--max-pixels", type=int, default=limits.max_pixels,
                        help="most pixels (height x width) an image may have; a larger one gets 413 "
                        f"(default: %(default)s; at most {MAX_PIXELS})")
    server.add_argument("--max-steps", type=int, default=limits.max_steps,
                        help=f"most steps a request may ask for (default: %(default)s; at most {MAX_STEPS})")
    server.add_argument("--image-threads", type=int, default=limits.image_threads,
                        help="most uploads decoded and answers encoded at once (each a thread; a 25 MP image takes "
                        "0.3 GB and seconds of CPU); the others wait, uploads within --timeout-s (default: "
                        "%(default)s)")
    server.add_argument("--no-warmup", action="store_true",
                        help="skip the default warm-up edit (a small image); --warmup-size sizes still warm up")
    server.add_argument("--warmup-size", type=parse_size, action="append", default=[], metavar="HxW",
                        help="also warm up at this image size before being ready: edits at the server's steps and "
                        "every batch size the denoiser pads to, so the first requests of that size pay no CUDA-graph "
                        "capture or compilation (minutes with --denoiser compile); repeatable (default: none)")
    server.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="let browser pages of this origin call the API (CORS: preflight answered, the X-Zone-* "
                        "headers readable), e.g. https://app.example.com (as browsers write it: lower case, no "
                        "default port), or * for any page; repeatable (default: none: edits posted by pages of "
                        "other origins get 403; clients that are not browsers need none)")
    server.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="answer requests addressed to this DNS name (as clients write it in the URL, no port), "
                        "e.g. zone.example.com, or * for any; repeatable (default: none beyond IP addresses, "
                        "localhost, a name given as --host and the --allow-origin names; others get 421, as a page "
                        "elsewhere could point its own name at this server and read its answers)")
    server.add_argument("--log-level", type=str.lower, default="info", choices=["debug", "info", "warning", "error"],
                        help="the server's log: requests, readiness, warm-up, failed edits (default: info)")
    scale = serve.add_argument_group("Ray Serve")
    scale.add_argument("--ray", action="store_true",
                       help="run as a Ray Serve deployment (one replica per GPU; needs `pip install 'ray[serve]'`)")
    scale.add_argument("--replicas", type=int, default=1, help="with --ray: number of replicas (default: 1)")
    _add_model_options(serve)
    _add_request_options(serve)
    _add_backend_options(serve)


def _add_export_commands(commands) -> None:
    export = commands.add_parser(
        "export", help="export networks to ONNX for TensorRT / ONNX Runtime",
        description="Export networks to ONNX, validated against PyTorch with ONNX Runtime before they are kept.",
        epilog=EXIT_CODES,
    )
    targets = export.add_subparsers(dest="target", required=True, metavar="TARGET")
    add_export_unet_arguments(targets.add_parser(
        "unet", help="the dual-UNet step (both weight sets, guidance, attention output) and the VAE",
        description="Export the dual-UNet step and the VAE encoder/decoder to ONNX, with a manifest.",
        epilog=EXIT_CODES,
    ))
    add_export_sam_arguments(targets.add_parser(
        "sam", help="SAM's image encoder and batched prompt decoder (for --segmenter onnx)",
        description="Export SAM to ONNX: the image encoder and a prompt decoder that takes a whole batch of "
        "points per call, with a manifest (model type, input size, opset, precision, checksums).",
        epilog=EXIT_CODES,
    ))
    add_build_engine_arguments(commands.add_parser(
        "build-engine", help="build TensorRT engines from a `zone export unet` folder (needs TensorRT and a GPU)",
        description="Build (or reuse from the cache) TensorRT engines for an export folder. Engines are keyed by "
        "model checksums, shapes, precision, TensorRT version and GPU; a stale or foreign engine is rebuilt. "
        "Written for TensorRT 10 and not yet run on a GPU: TensorRT is not installable on the project's machines.",
        epilog=EXIT_CODES,
    ))


def run_export(args: argparse.Namespace) -> None:
    from zone_export.sam import run_export_sam
    from zone_export.unet import run_export_unet

    with _progress_lines("zone_export", shown=not args.no_progress):
        print_path({"unet": run_export_unet, "sam": run_export_sam}[args.target](args))


@contextlib.contextmanager
def _progress_lines(logger_name: str, shown: bool) -> Iterator[None]:
    """A library's INFO log lines on stderr, bare, as a command's progress, for the block's length (a handler
    left on would write to the stderr of before, in a caller that swaps it)."""
    if not shown:
        yield
        return
    logger, handler = logging.getLogger(logger_name), logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_build_engine(args: argparse.Namespace) -> None:
    from zone_export.engine import run_build_engine as build

    for path in build(args):
        print_path(path)


def _backend_options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in BACKEND_OPTIONS}


CHECKPOINT_OPTIONS = ("ip2p", "magicbrush", "sam", "action_classifier")


def _pipeline_spec(args: argparse.Namespace):
    from .serving.settings import PipelineSpec

    given = {name: getattr(args, name) for name in CHECKPOINT_OPTIONS if getattr(args, name) is not None}
    random_models = "--tiny" if args.tiny else args.random_weights and f"--random-weights {args.random_weights}"
    if random_models and given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise ConfigError(f"{random_models} builds random models and reads no checkpoint: drop {flags}")
    return PipelineSpec(tiny=args.tiny, random_weights=args.random_weights, sam_type=args.sam_type, device=args.device,
                        dtype=args.dtype, **given, **_backend_options(args))


def _check_backend_arguments(args: argparse.Namespace) -> None:
    """Backend options that name nothing, contradict each other or need CUDA on `--device cpu`: said before
    torch's import (seconds); what `--device auto` finds is checked once it is known."""
    kind = device_kind(args.device)
    check_precision(getattr(args, "dtype", "fp32"), kind)
    check_backend_options(kind, **_backend_options(args))


def _config_changes(args: argparse.Namespace) -> dict:
    """The EditConfig fields the command line sets; validated at once, before any weights load."""
    changes = {"action": parse_action(args.action), "threshold_rule": args.threshold_rule}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.seed is not None:
        changes["seed"] = args.seed
    try:
        EditConfig(**changes)
    except ConfigError as error:  # the option named as the command line writes it: "--steps must be between ..."
        raise ConfigError(re.sub(r"^(steps|seed) ", r"--\1 ", str(error))) from None
    return changes


def run_edit(args: argparse.Namespace) -> None:
    # Every check that can fail runs before gigabytes of weights load; all that need no torch before its import
    # (seconds): the checkpoints' presence and what --device auto finds are checked once it is loaded.
    changes = _config_changes(args)
    _check_backend_arguments(args)
    spec = _pipeline_spec(args)
    jobs = plan_jobs(args, check_instruction(args.instruction))
    _edit_all(args, jobs, spec, changes, several=len(args.image) > 1)


def run_batch(args: argparse.Namespace) -> None:
    changes = _config_changes(args)  # checked before any weights load, as run_edit's
    _check_backend_arguments(args)
    spec = _pipeline_spec(args)
    _edit_all(args, plan_manifest(args, changes), spec, changes, several=True, list_file=args.manifest)


def _edit_all(args: argparse.Namespace, jobs: list[EditJob], spec: PipelineSpec, changes: dict, several: bool,
              list_file: Path | None = None) -> None:
    """edit_all as `zone edit` and `zone batch` ask: checked first, no edit's file over `list_file` (zone batch's
    list of edits) and --report's file (not over it either); --skip-existing's done left out and their lines of
    --report kept."""
    if list_file is not None:
        check_list_kept(jobs, list_file)
    if args.report:
        check_report_path(args.report, jobs, list_file)
    _say_removed_partials(remove_stale_partials(path for job in jobs for path in job.written()))
    # Their bars (redrawn with carriage returns, and cursor moves) only where ours are bars too: on a terminal.
    shown = not args.no_progress and is_terminal(sys.stderr)
    build = spec.build if shown else lambda: _without_library_progress_bars(spec.build)
    edit_all(_not_done(jobs, args.skip_existing, args.report), build, changes, args.batch_size, not args.no_progress,
             several, args.report, append=args.skip_existing)


def _say_removed_partials(removed: list[Path]) -> None:
    """A line for the partial files an earlier run left as it was killed mid-write, now removed (a few named)."""
    if removed:
        named = ", ".join(str(path) for path in removed[:3]) + (", ..." if len(removed) > 3 else "")
        print(f"removed {len(removed)} partial file(s) left by an earlier run killed while writing them: {named}",
              file=sys.stderr)


def _without_library_progress_bars(build: Callable[[], Any]) -> Any:
    """`build()` with diffusers' and transformers' own bars hidden (`Loading pipeline components...`, `Loading
    weights`): --no-progress hid only ours, and a log read by a script still got theirs. TORCHINDUCTOR_CACHE_DIR
    checked first, as `build()` would: importing diffusers makes its folder (a bare "[Errno 2]" where it cannot)."""
    from .models import check_torch_cache_folder

    check_torch_cache_folder()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    return build()


def _not_done(jobs: list[EditJob], skip_existing: bool, report: Path | None = None) -> list[EditJob]:
    """The jobs, less (with --skip-existing) those whose output is there, said in a line. With a report that is
    there, an output is done only with its line: a run killed (`kill -9`) between writing an edit's file and its
    line left it, and the resumed report lacked that edit, unsaid; such an edit is done again."""
    if not skip_existing:
        return jobs
    reported = reported_outputs(report) if report else None
    left, unreported = [], []  # in the list's order; one pass (`job in unreported` was a scan per job)
    for job in jobs:
        there = job.output.exists()
        if there and (reported is None or os.path.realpath(job.output) in reported):
            continue
        left.append(job)
        if there:  # its file written, its line not: done again
            unreported.append(job)
    if not left:
        print(f"--skip-existing: all {len(jobs)} edits done already, their outputs there: nothing to do",
              file=sys.stderr)
    elif len(left) < len(jobs):
        print(f"--skip-existing: {len(jobs) - len(left)} of {len(jobs)} edits left out, their outputs there",
              file=sys.stderr)
    if unreported:
        print(f"--skip-existing: {len(unreported)} edit(s) done again, their outputs there but no line of them in "
              f"{report} (a run killed between the two): {unreported[0].name()}{', ...' * (len(unreported) > 1)}",
              file=sys.stderr)
    return left


DEMO_OUTPUTS = ("input.png", "output.png", "timings.json")  # what zone demo writes in --out besides the masks


def run_demo(args: argparse.Namespace) -> None:
    from .image_io import make_sample_image, save_image

    demo_files = [*DEMO_OUTPUTS, *(f"{mask}.png" for mask in MASK_OUTPUTS)]  # its masks go to --out too
    check_output_folder(args.out, "--out", demo_files)
    if args.save_masks and args.save_masks.absolute() != args.out.absolute():  # the same folder: the same files
        check_masks_folder(args.save_masks, {args.out / name: f"the demo's {name}" for name in demo_files})
    changes = _config_changes(args)
    _check_backend_arguments(args)
    instruction = check_instruction(args.instruction)
    from .pipeline import ZonePipeline  # after the checks: torch's import takes seconds

    pipe = ZonePipeline.tiny(device=args.device, **_backend_options(args))
    # Once the setup passed (device, caches, temporary folder): it came before their `error:` line.
    print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
    image = make_sample_image()
    config = pipe.default_config.replace(**changes)
    result = pipe.edit(image, instruction, config, progress=not args.no_progress)
    summary = {"instruction": instruction, **settings_record(config, result.action),
               "used_fallback": result.used_fallback, "timings": result.timings, "random_weights": True}
    with written_together():  # a write that fails (a full disk) leaves an earlier demo's files, not a mix
        save_image(image, args.out / "input.png")
        save_image(result.image, args.out / "output.png")
        for folder in {args.out, args.save_masks or args.out}:
            save_masks(result, folder)
        with written_atomically(args.out / "timings.json") as temporary:
            temporary.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(result)
    print_path(args.out)


def parse_size(text: str) -> tuple[int, int]:
    """An image size `HxW` (e.g. 512x768) as (height, width), for argparse."""
    try:
        height, width = parse_hw(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if min(height, width) < 1:
        raise argparse.ArgumentTypeError(f"height and width must be positive, got {text!r}")
    return height, width


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ZoneError(f"`zone serve` needs {module}: pip install 'zone-engine[{extra}]'")


def run_serve(args: argparse.Namespace) -> None:
    for module in (*SERVE_MODULES, "ray") if args.ray else SERVE_MODULES:
        _require(module, "ray" if args.ray else "serve")  # [ray] holds [serve]: one install, not two in turn
    changes = _config_changes(args)
    # Said whether given or not: a --max-steps under the engine's default steps would otherwise show only at
    # the first request that asks for none.
    changes.setdefault("steps", EditConfig.steps)
    _check_backend_arguments(args)
    if args.port < 0 or args.port > 65535:
        raise ZoneError(f"--port {args.port} is not a TCP port (0..65535)")
    if args.replicas != 1 and not args.ray:
        raise ConfigError("--replicas is read with --ray only (one process serves one pipeline): add --ray")
    spec = _pipeline_spec(args)
    from .backends import resolve_device  # after the checks: torch's import takes seconds
    from .serving import LocalEditService, ServeSettings, run_server
    settings = ServeSettings(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, timeout_s=args.timeout_s,
        max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, max_steps=args.max_steps,
        image_threads=args.image_threads, warmup=not args.no_warmup, warmup_sizes=tuple(args.warmup_size),
        edit_changes=tuple(changes.items()), allow_origins=tuple(args.allow_origin),
        allow_hosts=(*args.allow_host, *_dns_name_of(args.host)),
    )
    if not args.ray:  # a replica's device is its own machine's
        settings.check_local_batching()
        resolve_device(args.device)
    spec.check_checkpoints()  # located, not loaded: one `error:` line (under Ray, not a replica's traceback)
    # After every option's, the device's and the checkpoints' checks: a busy port would otherwise hide their
    # mistakes until it is freed.
    _check_listen_address(args.host, args.port)
    if args.ray:
        from .serving.ray_serve import run_ray

        with terminated_as_interrupt():  # uvicorn handles the signals below; here SIGTERM ends run_ray as Ctrl-C does
            run_ray(spec, settings, host=args.host, port=args.port, replicas=args.replicas, log_level=args.log_level)
    else:
        # Before binding the port: a missing checkpoint is one `error:` line, exit 2. The libraries' loading bars
        # only on a terminal: a log (systemd, docker, `2> log`) got them redrawn with carriage returns.
        pipe = spec.build() if is_terminal(sys.stderr) else _without_library_progress_bars(spec.build)
        run_server(LocalEditService(lambda: pipe, settings), args.host, args.port, args.log_level)


def _check_listen_address(host: str, port: int) -> None:
    """ZoneError unless the server could listen on host:port now (checked before the models load)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ZoneError(f"--host {host}: {error.strerror}; give an address of this machine, e.g. 127.0.0.1") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            raise ZoneError(f"cannot listen on {host}:{port}: {error.strerror}; choose another --port or --host, "
                            "or stop what uses it") from None
    if not ipaddress.ip_address(address[0]).is_loopback:
        print(f"warning: --host {host} takes requests from other machines, and the API has no authentication: put "
              "it behind a reverse proxy that authenticates callers, limits connections and times out slow clients "
              "(README, Serving); requests addressed to a DNS name need --allow-host NAME", file=sys.stderr)


def _dns_name_of(host: str) -> tuple[str, ...]:
    """(host,) when --host is a DNS name (clients then address the server by it), else (); a ZoneError naming
    --host when it is neither a name nor an address (it had been blamed on an --allow-host never given)."""
    from .serving.settings import dns_name, is_host_name

    try:
        ipaddress.ip_address(host)
    except ValueError:
        if is_host_name(dns_name(host)):
            return (host,)
        if host.startswith("[") and host.endswith("]"):  # as a URL writes an IPv6 address
            raise ZoneError(f"--host {host}: write the IPv6 address without brackets, --host {host[1:-1]}") from None
        raise ZoneError(f"--host {host!r} is neither an IP address nor a host name: give an address of this "
                        "machine, e.g. 127.0.0.1, 0.0.0.0 (every IPv4 interface) or :: (every IPv6 one)") from None
    return ()


def _quiet_libraries() -> None:
    """Our own warnings as one line each; the libraries' deprecation chatter hidden, and their logging below
    errors (unless DIFFUSERS_VERBOSITY / TRANSFORMERS_VERBOSITY says otherwise before they are imported), and
    onnxruntime's telemetry off (unless ORT_DISABLE_TELEMETRY says otherwise)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.showwarning = lambda message, *_args, **_kw: print(f"warning: {command_line_spelling(str(message))}",
                                                                file=sys.stderr)
    for library in ("diffusers", "transformers"):
        # Read when the library is imported: not imported here (seconds), a command's checks may fail before it.
        os.environ.setdefault(f"{library.upper()}_VERBOSITY", "error")
        if library in sys.modules:  # already imported (main called from Python)
            sys.modules[library].utils.logging.set_verbosity_error()
    # onnxruntime, which diffusers imports as a checkpoint loads, otherwise writes a device id and a telemetry store
    # in XDG_CACHE_HOME (~/.cache/Microsoft), and prints a coloured warning on every run where that cannot be written
    # (a container's read-only or missing home). Read as it is imported; ORT_DISABLE_TELEMETRY=0 given is kept.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def _current_folder_exists() -> bool:
    """False in a folder deleted under the shell: relative paths name nothing there, and the checks' os.getcwd()
    was a traceback (FileNotFoundError, no file named), exit 1, even for a command of absolute paths."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return False
    return True


TOOLS = {"bench": "bench_main", "profile": "profile_main"}  # `zone NAME`: zone_benchmarks.options' function


def main(argv: Sequence[str] | None = None) -> int:
    # The warning filters and printer _quiet_libraries sets are the command's: a Python program that calls main
    # got its own warnings as `warning: ...` lines, its deprecations hidden, ever after.
    with stderr_kept(), warnings.catch_warnings():
        status = _main(argv)
        if argv is None and status in (130, 143, 128 + HANGUP) and \
                threading.current_thread() is threading.main_thread():
            # The process ends (the console script's): a Ctrl-C hammered on was a KeyboardInterrupt's traceback in
            # the streams' restoring and torch's atexit finalizers, after `interrupted`.
            for number in (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])):
                signal.signal(number, signal.SIG_IGN)
        return status


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    file_names_on_stderr_as_their_bytes()
    if argv[:1] == ["help"]:  # `zone help edit` is `zone edit --help`, `zone help` zone's own; exit 0 either way
        argv = [*argv[1:], "--help"]
    if argv[:1] and argv[0] in TOOLS:  # the benchmark tools own their options
        return getattr(importlib.import_module("zone_benchmarks.options"), TOOLS[argv[0]])(argv[1:])
    args = build_parser().parse_args(argv)
    if not _current_folder_exists():
        print("error: the current folder was deleted (after this shell went into it): cd to a folder "
              "that exists and run the command again", file=sys.stderr)
        return 2
    _quiet_libraries()
    commands = {"edit": run_edit, "batch": run_batch, "demo": run_demo, "serve": run_serve, "export": run_export,
                "build-engine": run_build_engine}
    try:
        with contextlib.nullcontext() if args.command == "serve" else terminated_as_interrupt():  # serve: uvicorn's
            commands[args.command](args)
    except ZoneError as error:
        print(error_line(error), file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None and error.errno != errno.EMFILE:  # no path the system refused: a bug, its traceback
            raise
        print(f"error: {refused_path_line(error)}", file=sys.stderr)  # a path refused past the checks
        return 2
    except KeyboardInterrupt as stop:
        return said_stopped(stop)
    return 0


def said_stopped(stop: KeyboardInterrupt) -> int:
    """The exit status of a run `stop` ended, said in a line: `interrupted` (Ctrl-C, 130), `terminated`
    (SIGTERM, 143) or `hung up` (SIGHUP, 129)."""
    if isinstance(stop, HungUp):
        print("hung up", file=sys.stderr)
        return 128 + HANGUP
    terminated = isinstance(stop, Terminated)
    print("terminated" if terminated else "interrupted", file=sys.stderr)
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, `kill` and orchestrators send), raised where the work is, so that what Ctrl-C
    cleans up is cleaned up: an export's scratch files and the folder it created, an output's temporary file (an
    edit's write under way in `zone edit`'s writer thread finishes, whole, and is said: edit_files.cut_short)."""


class HungUp(Terminated):
    """SIGHUP, the terminal that started the command closing (an SSH session ended), taken as SIGTERM: it killed
    a `zone batch ... 2> log &` at once, its write under way left as a partial file and the log silent on the
    edits not done."""


HANGUP = getattr(signal, "SIGHUP", 1)  # none on Windows, where no handler is set for it


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises Terminated and SIGHUP HungUp (in the main thread; elsewhere signals cannot be
    caught); a SIGHUP ignored (nohup) stays ignored, as `zone serve` keeps it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(_signum: int, _frame: object) -> None:
        raise Terminated

    def hang_up(_signum: int, _frame: object) -> None:
        raise HungUp

    handlers = {signal.SIGTERM: terminate}
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        handlers[signal.SIGHUP] = hang_up
    with signals_handled(handlers):
        yield


@contextlib.contextmanager
def signals_handled(handlers: dict[int, Callable[[int, Any], None]]) -> Iterator[None]:
    """These signal handlers for a block (main thread only), the previous ones back after it."""
    previous = {number: signal.signal(number, handler) for number, handler in handlers.items()}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
