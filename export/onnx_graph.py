"""What `zone export unet` and `zone export sam` share: tracing a module to one ONNX file (its weights
beside it past protobuf's 2 GB), checking the file on ONNX Runtime against PyTorch, and importing onnx /
onnxruntime only when an export runs (they are the `[onnx]` extra)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from zone_engine.cli import signals_handled
from zone_engine.errors import ConfigError, ZoneError
from zone_engine.paths import MANIFEST_FILE, exclusive_lock, export_kind

# A protobuf message cannot pass 2 GiB: larger weights (two SD1.5 UNets, 3.4 GB in fp16; vit_h's fp32
# encoder, 2.5 GB) go to one `<graph>.onnx.data` file beside the graph, where TensorRT's parse_from_file
# and ONNX Runtime find it; the manifests list and checksum it like the graphs.
EXTERNAL_DATA_BYTES = 2**31 - 2**26


# The TorchScript exporter's last opset (torch.onnx's ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET).
LAST_OPSET = 20


# What an export is doing, a line per graph traced and checked (minutes each with real weights): `zone export`
# shows these lines on stderr; a Python caller sees them when it turns this logger's INFO level on.
log = logging.getLogger("zone_export")


def check_opset(opset: int, lowest: int, graphs: str) -> int:
    """`--opset` within what the TorchScript exporter writes for `graphs`, else a one-line ConfigError (not
    torch's traceback)."""
    if not lowest <= opset <= LAST_OPSET:
        raise ConfigError(f"--opset {opset} is not supported: the TorchScript exporter writes opsets {lowest} to "
                          f"{LAST_OPSET} for {graphs}")
    return opset


def check_export_target(out_dir: Path, kind: str) -> None:
    """ZoneError when `out_dir` holds a manifest.json that is not a `zone export {kind}` one: the export would
    replace it, leaving the other export's graphs without a manifest (it did, silently). Said before any weights
    load. An unreadable manifest.json is refused too: not knowing whose it is, it is not ours to replace."""
    path = Path(out_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except ValueError:  # not JSON (UnicodeDecodeError included)
        manifest = None
    except OSError as error:
        raise ZoneError(f"--out {out_dir}: cannot read its {path.name} ({error.strerror or error}), so cannot tell "
                        "whose it is; choose another folder") from None
    found = export_kind(manifest)
    if found != kind:
        held = f"a `zone export {found}` folder" if found else "a manifest.json that is no zone export's"
        raise ZoneError(f"--out {out_dir} holds {held}: `zone export {kind}` would replace its manifest; choose "
                        "another folder, or empty this one")


def require(module: str) -> ModuleType:
    """onnx or onnxruntime, or a ZoneError that says how to install them."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ZoneError("exporting needs onnx and onnxruntime: pip install 'zone-engine[onnx]'") from None


def _exporting(scratch: Path) -> bool:
    """Whether the export whose scratch folder this is (`.export-PID-...`) still runs on this machine: it holds
    the folder's lock (`_locked`), which a process in another PID namespace (a container sharing the folder) sees
    too, where its PID names no process or another one (the running export's scratch was swept, and it failed as
    "No such file or directory"); else its PID runs (an older engine's export, or a file system without locks)."""
    try:
        folder = os.open(scratch, os.O_RDONLY)
    except OSError:  # gone since, or not ours to open (another user's): not ours to sweep either
        return True
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks here (some network file systems): its PID says
        pass
    finally:
        os.close(folder)
    pid = scratch.name.split("-")[1]
    if not pid.isdigit():  # an older engine's name, without its pid
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def _locked(folder: Path, wait: bool = False) -> Iterator[None]:
    """An exclusive lock on `folder` while the block runs, released by the system when the process dies (SIGKILL,
    out of memory): how another export tells a running export's scratch folder from a killed one's. `wait`: until
    another process's lock on it is released. None where the file system has no locks."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        with exclusive_lock(descriptor, wait):
            yield
    finally:
        os.close(descriptor)


# The files each export (by its scratch folder) has moved into its output folder: what it takes back when cut short
# in a folder it created, where another export may have put its own files meanwhile.
_installed: dict[Path, list[str]] = {}


@contextmanager
def staging_folder(out_dir: Path) -> Iterator[Path]:
    """A scratch folder inside `out_dir` for the files of one export, removed on exit. Inside `out_dir`, so
    on its filesystem: os.replace (`install`) then moves each finished file in at once, and a failed export leaves
    `out_dir` as it was (removed, when this call created it; with what another export, run at the same time into
    the same new folder, put there kept: its scratch folder, or its files)."""
    created = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]  # the deepest first
    out_dir.mkdir(parents=True, exist_ok=True)
    for scratch in out_dir.glob(".export-*"):  # a killed export's (SIGKILL, out of memory): gigabytes for vit_h
        if not _exporting(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".export-{os.getpid()}-", dir=out_dir))
    _installed[staging] = []
    try:
        with _locked(staging):
            yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:  # the whole folder went, the other export's files with it (its scratch: a FileNotFoundError)
            for name in _installed[staging]:
                (out_dir / name).unlink(missing_ok=True)
            for folder in created:  # `--out a/b/c` made a and b too: they go with it
                with contextlib.suppress(OSError):  # only while empty
                    folder.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        del _installed[staging]


def install(staging: Path, out_dir: Path, name: str) -> None:
    """Move the finished file `name` from `staging` (a `staging_folder`) into `out_dir`, over the file there."""
    os.replace(staging / name, out_dir / name)
    if (installed := _installed.get(staging)) is not None:  # None: a folder of the caller's, not staging_folder's
        installed.append(name)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held off for a block (main thread only), then delivered to the handlers of before it:
    installing an export is a few moves that all happen or none. A signal between two of them left the old
    manifest with a new graph beside it, the folder's previous export lost (refused as corrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    try:
        with signals_handled(dict.fromkeys((signal.SIGINT, signal.SIGTERM), lambda number, _: held.append(number))):
            yield
    finally:  # the handlers of before back first: the held signal reaches them
        if held:
            signal.raise_signal(held[0])  # as it would have been: KeyboardInterrupt, the CLI's Terminated, ...


@contextmanager
def installing(out_dir: Path, kind: str) -> Iterator[None]:
    """The block that moves a `zone export {kind}`'s finished files into `out_dir`: Ctrl-C and SIGTERM held off
    (`signals_held`), the folder locked against other exports' installs and checked again under the lock
    (`check_export_target`). Another kind of export run into the same folder meanwhile had its manifest replaced,
    both exports saying they succeeded."""
    with signals_held(), _locked(out_dir, wait=True):
        check_export_target(out_dir, kind)
        yield


def export_graph(module: nn.Module, args: tuple, path: Path, opset: int, *, input_names: list[str],
                 output_names: list[str], dynamic_axes: dict | None, metadata: dict[str, str]) -> list[str]:
    """Trace `module` on `args` to `path` with `metadata`; the files written (the graph, and its weights
    when they pass EXTERNAL_DATA_BYTES)."""
    onnx = require("onnx")
    log.info("%s: tracing to ONNX (opset %d)", path.name, opset)
    raw = path.parent / f"raw-{path.stem}" / path.name
    raw.parent.mkdir()
    # The legacy TorchScript exporter (dynamo=False), as NVIDIA's diffusion demo and segment-anything's own
    # export script use it. It writes the opset asked for and keeps the latent sizes symbolic through every
    # reshape and upsampling; the dynamo exporter (torch 2.14) has failed on the UNet with dynamic axes,
    # implements opset >= 18 only, and when asked for 17 silently keeps 18 after its down-conversion of
    # SAM's graphs fails, so --opset and the manifest would not say what the file holds.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # Shapes the tracer freezes hold for every size the caller validates (one size per SAM export).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # strided slices stay
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    model = onnx.load(str(raw))  # pulls in the per-tensor files the exporter writes past protobuf's 2 GB
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    external = (len(list(raw.parent.iterdir())) > 1  # the exporter already had to write them apart
                or sum(len(tensor.raw_data) for tensor in model.graph.initializer) > EXTERNAL_DATA_BYTES)
    data = f"{path.name}.data"
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data)
    shutil.rmtree(raw.parent)
    return [path.name, data] if external else [path.name]


def session(path: Path) -> Any:
    """An ONNX Runtime session on the CPU provider, quiet and without spinning threads."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns about every fp16 node it runs through fp32 casts
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would starve torch
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(graph: Any, file: str, inputs: dict[str, torch.Tensor], expected: list[torch.Tensor],
            names: list[str], tolerance: dict[str, float], where: str = "") -> dict[str, float]:
    """Run `graph` (a session of `file`) and check each output against PyTorch's `expected`:
    |onnxruntime - torch| <= atol + rtol * max|torch|. The largest difference of each output, by name;
    a ZoneError naming the output (and `where`, e.g. the input size) when one is off."""
    outputs = graph.run(names, {name: tensor.detach().cpu().numpy() for name, tensor in inputs.items()})
    report = {}
    for name, output, want in zip(names, outputs, expected, strict=True):
        got, want = torch.from_numpy(output), want.detach().cpu().float()
        if got.shape != want.shape:
            raise ZoneError(f"exported {file} gives {name} of shape {tuple(got.shape)}, PyTorch "
                            f"{tuple(want.shape)}; nothing was written")
        difference = (got - want).abs().max().item()
        allowed = tolerance["atol"] + tolerance["rtol"] * want.abs().max().item()
        if not difference <= allowed:
            raise ZoneError(
                f"exported {file} differs from PyTorch on {name} by {difference:.3g} (allowed {allowed:.3g})"
                f"{where}; nothing was written. Try another --opset or onnxruntime version."
            )
        report[name] = difference
    log.info("%s: matches PyTorch%s (largest difference %.3g)", file, where, max(report.values()))
    return report
