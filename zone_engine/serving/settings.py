"""What a server is built from: how to load the pipeline, and the service's limits. Both plain data,
so a Ray Serve replica can rebuild the same service in its own process."""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import BACKEND_OPTIONS, IP2P_ID, MAGICBRUSH_ID, MAX_BATCH, MAX_PIXELS, MAX_STEPS, MIN_SIDE, option
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..pipeline import ZonePipeline


@dataclass(frozen=True)
class PipelineSpec:
    """How to build a `ZonePipeline`: tiny random models, real-size architectures with random weights
    (`random_weights="sd15"`: costs as real, edits meaningless; for load tests), or real checkpoints."""

    tiny: bool = False
    random_weights: str | None = None
    ip2p: str = IP2P_ID
    magicbrush: str = MAGICBRUSH_ID
    sam: Path | None = None  # None: DEFAULT_SAM for --segmenter torch, none for onnx
    sam_type: str | None = None
    action_classifier: Path | None = None
    device: str = "auto"
    dtype: str = "fp32"
    denoiser: str = "fused"
    kernels: str = "auto"
    engines: Path | None = None
    segmenter: str = "torch"
    sam_onnx: Path | None = None
    cuda_graphs: bool | None = None
    attention: str = "sdpa"
    sam_precision: str = "fp32"
    channels_last: bool | None = None  # None: the UNets' on CUDA in fp16/bf16 (ZonePipeline's default)
    group_norm: str = "auto"

    def __post_init__(self) -> None:
        # Said when the command line is read, before torch loads (seconds), not when the models are built.
        if self.tiny and self.random_weights:
            raise ConfigError("--tiny and --random-weights exclude each other: choose one")
        if self.tiny and self.sam_type:
            raise ConfigError(f"--tiny builds its own tiny SAM: drop --sam-type {self.sam_type}")
        if self.random_weights not in (None, "sd15"):
            raise ConfigError(f"--random-weights {self.random_weights}: only sd15 (real-size architectures)")

    def check_checkpoints(self) -> None:
        """Every checkpoint `build` would load, located, not loaded (Ray Serve's replicas load their own, where a
        missing one would show as a replica's traceback)."""
        if not (self.tiny or self.random_weights):
            from ..pipeline import check_pretrained_present

            check_pretrained_present(self.ip2p, self.magicbrush, self.sam, self.action_classifier, self.sam_type,
                                     self.segmenter)

    def build(self) -> ZonePipeline:
        from ..pipeline import ZonePipeline

        backends = {name: getattr(self, name) for name in BACKEND_OPTIONS}
        if self.tiny:
            return ZonePipeline.tiny(device=self.device, dtype=self.dtype, **backends)
        if self.random_weights:
            from ..models import build_random_components

            models = build_random_components(self.random_weights, 0, self.sam_type or "vit_b")
            return ZonePipeline(models, self.device, self.dtype, **backends)
        return ZonePipeline.from_pretrained(
            ip2p=self.ip2p, magicbrush=self.magicbrush, sam=self.sam,
            sam_type=self.sam_type, action_classifier=self.action_classifier, device=self.device, dtype=self.dtype,
            **backends,
        )


_ORIGIN = re.compile(r"https?://[^\s/?#]+")  # what a browser sends as Origin: scheme, host, port; no path
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")  # a DNS name as a Host header writes it, no port
_IPV4_PART = re.compile(r"0[xX][0-9A-Fa-f]*|[0-9]+")  # a number in a URL's IPv4 host: hex, octal (0...) or decimal
MIN_UPLOAD_BYTES = 1024  # below it hardly the smallest image and its form fit: every edit would be a 413


@dataclass(frozen=True)
class ServeSettings:
    """The service's batching, backpressure and input limits (`zone serve --help` explains each)."""

    max_batch: int = 4  # at most MAX_BATCH
    max_wait_ms: float = 10.0
    queue_size: int = 32
    timeout_s: float = 120.0
    max_upload_mb: float = 20.0
    max_pixels: int = 25_000_000
    max_instruction_chars: int = 1000
    max_steps: int = 100
    image_threads: int = 2  # uploads decoded and answers encoded at once
    warmup: bool = True
    # Image sizes (H, W) also warmed up before ready: every padded batch size, at the server's steps.
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    # EditConfig fields every request starts from, over the pipeline's defaults (e.g. (("steps", 10),)).
    edit_changes: tuple[tuple[str, Any], ...] = ()
    # Origins whose browser pages may call the API (CORS), e.g. ("https://app.example.com",); "*" any. None: a
    # page's cross-origin requests are refused by its browser (a server-side client needs no CORS).
    allow_origins: tuple[str, ...] = ()
    # DNS names requests may be addressed to (their Host header), e.g. ("zone.example.com",); "*" any. IP
    # addresses, localhost and the allowed origins' names always may; any other gets 421 (app.HostCheck).
    allow_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Each option said as `zone serve` and Python both write it ("--max-batch 0 (max_batch=0)"; the command
        # line prints its own spelling alone).
        self._check_counts()
        self._check_request_defaults()
        self._check_durations_and_upload()
        self._check_name_tuples()
        self._check_origins()
        self._check_hosts()

    def _check_counts(self) -> None:
        for name in ("max_batch", "queue_size", "max_instruction_chars", "max_steps", "image_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{option(name, getattr(self, name))} must be at least 1")
        if self.max_pixels < MIN_SIDE**2:  # no image would fit: every edit a 413
            raise ConfigError(f"{option('max_pixels', self.max_pixels)} is under {MIN_SIDE**2} ({MIN_SIDE}x{MIN_SIDE}, "
                              "the smallest image the engine takes): no image would be accepted; it counts height x "
                              "width")
        if self.max_steps > MAX_STEPS:
            raise ConfigError(f"{option('max_steps', self.max_steps)} must be at most {MAX_STEPS} (the engine's limit)")
        if self.max_pixels > MAX_PIXELS:
            raise ConfigError(f"{option('max_pixels', self.max_pixels)} must be at most {MAX_PIXELS:,} (the engine's "
                              "limit)")
        if self.max_batch > MAX_BATCH:  # beyond it: no GPU's memory, and a warm-up of every padded size up to it
            raise ConfigError(f"{option('max_batch', self.max_batch)} must be at most {MAX_BATCH}")

    def _check_request_defaults(self) -> None:
        if (steps := dict(self.edit_changes).get("steps")) is not None:
            self.check_default_steps(steps)
        for height, width in self.warmup_sizes:
            if min(height, width) < MIN_SIDE or height * width > self.max_pixels:
                raise ConfigError(f"warm-up size {height}x{width} (--warmup-size, warmup_sizes): at least {MIN_SIDE} "
                                  f"pixels a side and at most {option('max_pixels', self.max_pixels)} in all")

    def _check_durations_and_upload(self) -> None:
        for name in ("max_wait_ms", "timeout_s", "max_upload_mb"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name != "max_wait_ms" and value == 0):
                least = "0 or more" if name == "max_wait_ms" else "more than 0"
                raise ConfigError(f"{option(name, value)} must be a finite number, {least}")
        if self.max_wait_ms >= self.timeout_s * 1000:  # every request would time out waiting for batch-mates
            raise ConfigError(f"{option('max_wait_ms', self.max_wait_ms)} must be shorter than "
                              f"{option('timeout_s', self.timeout_s)}: a request would time out waiting for others "
                              "to batch with")
        if self.max_upload_bytes < MIN_UPLOAD_BYTES:  # no image would fit: every edit a 413
            raise ConfigError(f"{option('max_upload_mb', self.max_upload_mb)} is under 1 KiB, which no image fits "
                              "in; the default is 20")

    def _check_name_tuples(self) -> None:
        for name in ("allow_origins", "allow_hosts"):  # a string is iterable too: its letters would be the names
            if isinstance(value := getattr(self, name), str):
                raise ConfigError(f"{name}={value!r} is one string: give a tuple, {name}=({value!r},)")

    def _check_origins(self) -> None:
        """Each origin as a browser sends it in its Origin header, which a request's is compared with as text: any
        other spelling ("https://App.Example.com:443") would start the server, then fail every call of the page."""
        for origin in self.allow_origins:
            if origin == "*":
                continue
            said = f"allowed origin {origin!r} (--allow-origin, allow_origins)"
            sent = _origin_as_sent(origin) if _ORIGIN.fullmatch(origin) else None
            if sent is None:
                raise ConfigError(f"{said} is not an origin: write scheme://host[:port] with no path, user name or "
                                  "wildcard (e.g. https://app.example.com or http://localhost:3000), or * for any")
            if sent != origin:
                raise ConfigError(f"{said} is not written as browsers send it (lower case, no default port, "
                                  f"a name in ASCII, IPv4 in dotted decimal), so no page would match it: write {sent}")

    def _check_hosts(self) -> None:
        for host in self.allow_hosts:
            if host != "*" and not is_host_name(host):
                raise ConfigError(f"allowed host {host!r} (--allow-host, allow_hosts) is not a host name: write the "
                                  "name clients put in the address, without scheme or port (e.g. zone.example.com), "
                                  "or * for any")

    def host_names(self) -> frozenset[str] | None:
        """The DNS names requests may be addressed to, beyond IP addresses and localhost (lower case, no final
        dot): --allow-host's and those of the allowed origins (a page the operator lets call the API may be
        served from this server's own name). None: any, as with "*" either way (a page of any origin may then
        read every answer through CORS: checking the Host would protect nothing)."""
        if "*" in self.allow_hosts or "*" in self.allow_origins:
            return None
        return frozenset(dns_name(host) for host in (*self.allow_hosts, *map(_host_of, self.allow_origins)))

    def check_default_steps(self, steps: int) -> None:
        """A request that asks for no steps gets the server's default: refused if above --max-steps."""
        if steps > self.max_steps:
            raise ConfigError(f"the server's default {option('steps', steps)} is above "
                              f"{option('max_steps', self.max_steps)}, which bounds what a request may ask for: lower "
                              "the one or raise the other")

    def check_local_batching(self) -> None:
        """The single-process batcher forms batches from its queue: a larger batch could never fill. (Ray Serve
        counts its queue beyond the requests its batches form from: not checked there.)"""
        if self.max_batch > self.queue_size:
            raise ConfigError(f"{option('max_batch', self.max_batch)} is above {option('queue_size', self.queue_size)}"
                              ": such a batch could never fill; raise the queue size or lower the batch")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def is_host_name(host: str) -> bool:
    """Whether `host` is a DNS name as --allow-host takes it: ASCII letters, digits, "-" and "_" in dotted labels."""
    return _HOST_NAME.fullmatch(host) is not None


def dns_name(host: str) -> str:
    """A host name as compared: lower case, without the final dot ("Zone.Example.com." is "zone.example.com")."""
    return host.lower().removesuffix(".")


def _origin_as_sent(origin: str) -> str | None:
    """`origin` as a browser writes it in an Origin header ("https://App.Example.com:443":
    "https://app.example.com"); None for what no browser sends: a user name, a port out of 1..65535, a host
    that is no DNS name or IP address ("*.example.com")."""
    try:
        parts = urllib.parse.urlsplit(origin)
        port = parts.port
    except ValueError:  # "http://[::1", "http://host:99999", "http://host:abc"
        return None
    host = parts.hostname
    if host is None or "@" in parts.netloc or port == 0:
        return None
    if ":" in host:  # urlsplit took it from brackets: an IPv6 address, with no zone ("%eth0") in an Origin
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            return None
        if "%" in host:
            return None
    else:
        try:  # a name in other letters goes in its ASCII form ("café.example": "xn--caf-dma.example")
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
        host = _ipv4_as_browsers_read(host)
        if host is None or not is_host_name(host):
            return None
    default_port = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default_port) else "")


def _ipv4_as_browsers_read(host: str) -> str | None:
    """`host` as a browser's URL parser (WHATWG) leaves it: a name whose last label is a number is an IPv4
    address, its parts in decimal, octal or hex as inet_aton reads them ("127.000.000.001", "127.1", "0x7f.1":
    "127.0.0.1"); other names as they are. None for such an address no browser accepts ("1.2.3.08")."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":  # "127.0.0.1." is 127.0.0.1; a name's final dot stays
        parts.pop()
    if not _IPV4_PART.fullmatch(parts[-1]):
        return host
    if len(parts) > 4 or not all(_IPV4_PART.fullmatch(part) for part in parts):
        return None
    try:
        numbers = [int(part[2:] or "0", 16) if part[:2] in ("0x", "0X") else int(part, 8 if part[0] == "0" else 10)
                   for part in parts]
    except ValueError:  # "08": not octal
        return None
    *leading, last = numbers
    if any(number > 255 for number in leading) or last >= 256 ** (5 - len(numbers)):
        return None
    return str(ipaddress.IPv4Address(sum(n << 8 * (3 - i) for i, n in enumerate(leading)) + last))


def _host_of(origin: str) -> str | None:
    """The host an origin names ("https://app.example.com:8443": "app.example.com"); None for one that does
    not parse ("http://[::1")."""
    try:
        return urllib.parse.urlsplit(origin).hostname
    except ValueError:
        return None
