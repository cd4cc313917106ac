"""`zone build-engine`: TensorRT engines from a `zone export unet` folder, cached by what built them.

Three separate steps, as NVIDIA's diffusion demo does them: `zone export unet` writes validated ONNX graphs
and a manifest (export/unet.py); this module builds an engine per graph; `TensorRTDenoiser` only loads what
this cache vouches for.

An engine is specific to the graph, the shapes it was built for, its precision, the TensorRT version and
the GPU. `engine_cache_key` hashes all of them; `EngineCache` stores each engine beside a sidecar JSON that
says what built it, and anything that does not match the key asked for (another key, no sidecar, another
TensorRT or GPU, an engine file that is not the one the sidecar describes) is rebuilt, never loaded.

Verified here: keys, the cache's decisions and every step before the build (export, validation, profiles),
by tests/test_export_unet.py on the CPU. NOT verified on any machine here: `build_engine` itself. TensorRT
cannot be installed on our machines, so it is written against the documented TensorRT 10 Python API
(Builder, strongly typed network, OnnxParser.parse_from_file, one optimization profile,
build_serialized_network) and kept to those calls; tests/test_export_unet.py's TensorRT class checks it
where TensorRT and a GPU are present.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zone_engine import __version__
from zone_engine.errors import ConfigError, DeviceError, ZoneError
from zone_engine.paths import check_output_folder, expanded, file_sha256, listed_file_problem
from zone_engine.tensorrt_denoiser import TENSORRT_MISSING, import_tensorrt  # noqa: F401  (re-exported)

from .unet import read_manifest

ENGINE_FORMAT = 1  # bump when what goes into a key, or how an engine is built, changes
PRECISIONS = ("fp32", "fp16", "bf16")
Profile = dict[str, list[list[int]]]  # input name -> [min, opt, max] shapes


def gpu_name(device: Any = None) -> str:
    """The GPU an engine is built for, e.g. 'NVIDIA H100 80GB HBM3 sm_90'; DeviceError without CUDA."""
    if not torch.cuda.is_available():
        raise DeviceError("TensorRT engines are built and run on an NVIDIA GPU, and this machine has no CUDA GPU")
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


# --------------------------------------------------------------------------------------------------
# Cache keys and the cache


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: tuples and lists alike, so equal content gives equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def engine_cache_key(onnx_manifest: dict, profile: Profile, precision: str, tensorrt_version: str,
                     gpu_name: str) -> str:
    """sha256 of everything an engine depends on, as canonical JSON.

    `onnx_manifest`: the graph's manifest entry (its files' sha256, the weights' checksums, shapes, opset,
    versions: every field counts). `profile`: input name -> [min, opt, max] shapes. `precision`: fp32, fp16
    or bf16. `tensorrt_version`: `tensorrt.__version__`. `gpu_name`: `gpu_name()`, model and compute capability.
    """
    payload = {
        "format": ENGINE_FORMAT,
        "onnx": onnx_manifest,
        "profile": {name: [list(map(int, shape)) for shape in shapes] for name, shapes in profile.items()},
        "precision": precision,
        "tensorrt_version": str(tensorrt_version),
        "gpu_name": str(gpu_name),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


class EngineCache:
    """Engine files under `root`, each `NAME.KEY.plan` with a sidecar `NAME.KEY.plan.json`.

    The sidecar records the key and what built the engine (graph, file checksums, profile, precision,
    TensorRT version, GPU, the engine's own sha256). `stale_reason` says why an engine must not be loaded;
    `get_or_build` rebuilds in that case. Engines for other keys (other GPUs sharing the folder) are left alone.
    """

    def __init__(self, root: Path) -> None:
        self.root = expanded(root, ConfigError)

    def engine_path(self, name: str, key: str) -> Path:
        return self.root / f"{name}.{key[:24]}.plan"

    @staticmethod
    def sidecar_path(engine_path: Path) -> Path:
        return engine_path.with_name(engine_path.name + ".json")

    def stale_reason(self, name: str, key: str, expected: dict[str, Any]) -> str | None:
        """None when the cached engine for `key` may be loaded; otherwise why it must be rebuilt.

        `expected`: the fields the sidecar must hold with these values (at least tensorrt_version, gpu_name).
        """
        path = self.engine_path(name, key)
        if not path.is_file():
            return "no engine built yet"
        sidecar = self.sidecar_path(path)
        try:
            description = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return f"{sidecar.name} is missing or unreadable: the engine's origin is unknown"
        if not isinstance(description, dict) or description.get("key") != key:
            return "the engine was built from other inputs (its key differs)"
        for field, value in expected.items():
            if description.get(field) != value:
                return f"the engine was built for {field} {description.get(field)!r}, not {value!r}"
        if description.get("engine_sha256") != file_sha256(path):
            return "the engine file is not the one its sidecar describes (replaced or truncated)"
        return None

    def get_or_build(self, name: str, key: str, description: dict[str, Any], build: Callable[[Path], None],
                     *, force: bool = False) -> tuple[Path, str | None]:
        """The engine for `key`, built with `build(path)` when missing or stale; (path, why it was built or None)."""
        reason = "rebuild asked for" if force else self.stale_reason(name, key, _identity(description))
        path = self.engine_path(name, key)
        if reason is None:
            return path, None
        self.root.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            build(partial)
            sidecar = {**description, "key": key, "engine_sha256": file_sha256(partial), "built_at": time.time(),
                       "zone_engine_version": __version__}
            self.sidecar_path(path).unlink(missing_ok=True)  # never a new engine beside an old sidecar
            os.replace(partial, path)
            self.sidecar_path(path).write_text(json.dumps(sidecar, indent=2) + "\n")
        finally:
            partial.unlink(missing_ok=True)
        return path, reason


    def drop_built_from_other_files(self, files_of: dict[str, dict[str, str]]) -> None:
        """Remove the engines of the graphs in `files_of` (graph name -> its files' checksums now) built from other
        files: a re-export's, never loaded again. One built from these very files stays, as do the other graphs'
        and what is not this cache's; an engine that cannot be removed is warned of, not failed on."""
        for sidecar in self.root.glob("*.plan.json"):
            try:
                built = json.loads(sidecar.read_text())
            except (OSError, ValueError):  # not the cache's: not ours to judge
                continue
            files = files_of.get(built.get("graph")) if isinstance(built, dict) else None
            if files is None or built.get("onnx_files") == files:
                continue
            engine = sidecar.with_suffix("")
            try:
                engine.unlink(missing_ok=True)  # the engine, then its sidecar
                sidecar.unlink()
            except OSError as error:
                warnings.warn(f"{engine} was built from the graph this export replaced but could not be removed "
                              f"({error})", stacklevel=3)


def _identity(description: dict[str, Any]) -> dict[str, Any]:
    return {field: description[field] for field in ("graph", "precision", "tensorrt_version", "gpu_name")
            if field in description}


# --------------------------------------------------------------------------------------------------
# Building


def build_engine(onnx_path: Path, engine_path: Path, profile: Profile, precision: str) -> None:
    """Build a TensorRT engine from `onnx_path` and write it to `engine_path`. Needs TensorRT 10+ and a GPU.

    The network is strongly typed: every tensor's type comes from the graph, so an fp16 engine is built
    from an fp16 ONNX (`zone export unet --fp16`); TensorRT 10.12 deprecates and 11 removes the FP16 builder
    flag. `precision` is the graph's (its manifest says it); for fp32 TF32 is switched off so an fp32 engine
    stays the fp32 reference. `profile`: input name -> [min, opt, max] shapes; only inputs with dynamic
    dimensions get a profile entry. parse_from_file (not parse of the bytes) so external weights beside the
    graph are found.
    """
    if precision not in PRECISIONS:
        raise ZoneError(f"unknown engine precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    trt = import_tensorrt()
    gpu_name()  # a clear DeviceError before TensorRT's own
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ZoneError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if unknown := set(profile) - {tensor.name for tensor in inputs}:
        raise ZoneError(f"the profile names inputs {sorted(unknown)} that {onnx_path.name} does not have")
    dynamic = [tensor for tensor in inputs if any(d < 0 for d in tuple(tensor.shape))]
    if dynamic:
        optimization_profile = builder.create_optimization_profile()
        for tensor in dynamic:
            if tensor.name not in profile:
                raise ZoneError(f"{onnx_path.name} input {tensor.name} has dynamic dimensions but no profile")
            low, opt, high = (tuple(shape) for shape in profile[tensor.name])
            optimization_profile.set_shape(tensor.name, low, opt, high)
        config.add_optimization_profile(optimization_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ZoneError(f"TensorRT could not build an engine from {onnx_path} (see TensorRT's messages above)")
    with open(engine_path, "wb") as file:
        file.write(serialized)


def default_cache_root(folder: Path) -> Path:
    return Path(folder) / "engines"


def check_graph_files(folder: Path, entry: dict[str, Any]) -> None:
    """The graph's files are there with the sha256 the manifest records; else a ZoneError."""
    for name, expected in entry["files"].items():
        if problem := listed_file_problem(folder, name, expected):
            raise ZoneError(f"{folder}: {problem}; re-run `zone export unet --out {folder}`")


def ensure_engine(folder: Path, graph: str, cache_root: Path | None = None, *, force: bool = False,
                  device: Any = None) -> tuple[Path, dict[str, Any], str | None]:
    """The engine for one graph of an export folder, built if missing or stale.

    Returns (engine path, the graph's manifest entry, why it was built or None when the cache had it).
    """
    trt = import_tensorrt()
    folder = expanded(folder, ConfigError)
    manifest = read_manifest(folder)
    if graph not in manifest["graphs"]:
        raise _no_such_graphs(folder, manifest, [graph])
    entry = manifest["graphs"][graph]
    gpu = gpu_name(device)
    key = engine_cache_key(entry, entry["profile"], entry["precision"], trt.__version__, gpu)
    description = {"graph": graph, "onnx": entry["onnx"], "onnx_files": entry["files"], "profile": entry["profile"],
                   "precision": entry["precision"], "tensorrt_version": trt.__version__, "gpu_name": gpu}

    def build(path: Path) -> None:
        check_graph_files(folder, entry)  # only what the manifest vouches for is built
        # TensorRT builds on the current GPU: make it the one the key names (None: the current one).
        with contextlib.nullcontext() if device is None else torch.cuda.device(device):
            build_engine(folder / entry["onnx"], path, entry["profile"], entry["precision"])

    cache = EngineCache(cache_root or default_cache_root(folder))
    path, reason = cache.get_or_build(graph, key, description, build, force=force)
    return path, entry, reason


# --------------------------------------------------------------------------------------------------
# Command line: `zone build-engine DIR` (its options: export/options.py).


def named_graphs(folder: Path, manifest: dict[str, Any], names: list[str] | None) -> list[str]:
    """The graphs `--graph` names (any case, each once), or every graph of the folder; a name the folder
    lacks is a ZoneError before TensorRT is looked for."""
    if not names:
        return list(manifest["graphs"])
    wanted = list(dict.fromkeys(name.strip().lower() for name in names))
    missing = [name for name in wanted if name not in manifest["graphs"]]
    if missing:
        raise _no_such_graphs(folder, manifest, missing)
    return wanted


def _no_such_graphs(folder: Path, manifest: dict[str, Any], missing: list[str]) -> ZoneError:
    return ZoneError(f"{folder} holds no {', '.join(missing)} graph (it has {', '.join(manifest['graphs'])}): name "
                     f"one of those, or re-run `zone export unet --out {folder}`")


def run_build_engine(args: argparse.Namespace) -> list[Path]:
    """`zone build-engine`: an engine for every graph of the folder (or those named); their paths."""
    manifest = read_manifest(args.folder)  # the clear errors first: not an export folder, no TensorRT, no GPU
    graphs = named_graphs(args.folder, manifest, args.graphs)
    for graph in graphs:  # a broken folder is said before the user installs TensorRT to learn of it
        check_graph_files(args.folder, manifest["graphs"][graph])
    if args.cache is not None:
        check_output_folder(args.cache, "--cache")
    import_tensorrt()
    gpu_name()
    paths = []
    for graph in graphs:
        if manifest["graphs"].get(graph, {}).get("precision") == "fp32":
            print(f"note: {graph} is an fp32 graph, so its engine is fp32; export with --fp16 for the fast "
                  "engine (networks are strongly typed)", file=sys.stderr)
        path, _, reason = ensure_engine(args.folder, graph, args.cache, force=args.force)
        print(f"{graph}: {'built (' + reason + ')' if reason else 'up to date'}: {path}", file=sys.stderr)
        paths.append(path)
    return paths
