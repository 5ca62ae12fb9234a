"""Typed configuration from TOML (config/ctriage.toml): one dataclass per concern, defaults, clear errors.

Errors name the key and what is wrong: `[mqtt] port: expected an integer, got 'abc'`. Unknown keys are errors
too (with a suggestion), so a typo never silently falls back to a default. Secrets are never written in the TOML:
use `*_file` keys or environment variables (CTRIAGE_MQTT_PASSWORD, CTRIAGE_STUDY_KEY_SECRET).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6 on Jetson)
    import tomli as tomllib  # type: ignore[no-redef]
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.dicom_names import is_ae_title, parse_peer


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


@dataclass
class AnalysisConfig:
    backend: str = "auto"  # auto | openvino | onnxruntime
    precision: str = "int8"  # int8 | fp32
    threads: int = 0  # 0: all cores this process may use
    batch: int = 4  # slices per model call (per worker); activation memory grows with it, speed does not
    workers: int = 0  # batches analysed at once, each on its own inference stream; 0: 2 with 2+ threads, else 1
    min_run: int = 3  # consecutive slices with lesion in one quadrant for a positive
    min_slices: int = 20  # a series needs this many axial slices for a negative
    min_run_mm: float = 5.0  # ... and the run must cover at least this many mm along z (DICOM series)
    min_foci: int = 2  # separate lesion foci, each spanning such a run, for a positive (1: Chen et al. 2020's rule)
    other_findings: bool = True  # lesion foci that are the halo of a solid nodule or mass do not count (named)
    min_focus_peak: float = 0.8  # a positive needs one counted focus the lesion model is this sure of (0: off)
    gap_factor: float = 1.5  # a gap > factor × median spacing breaks a run
    max_tilt_deg: float = 10.0  # slices tilted more than this from axial are rejected
    denoise: bool = True  # DICOM crops noisier than noise_target are smoothed down to it (appliance.pipeline.noise)
    noise_target: float = 0.010  # ... on the noise scale of appliance.pipeline.noise
    noise_limit: float = 0.016  # a series noisier than this gets the "noisy acquisition" note
    density_check: bool = True  # lesion boxes no denser than the aerated lung are dropped (appliance.pipeline.opacity)
    bundle_dir: str = ""  # empty: <state_dir>/bundles when it has bundles, else the shipped ones

    def validate(self, where: str) -> None:
        _choice(where, "backend", self.backend, ("auto", "openvino", "onnxruntime"))
        _choice(where, "precision", self.precision, ("int8", "fp32"))
        _range(where, "threads", self.threads, 0, 256)
        _range(where, "batch", self.batch, 1, 256)
        _range(where, "workers", self.workers, 0, 64)
        _range(where, "min_run", self.min_run, 1, 100)
        _range(where, "min_slices", self.min_slices, 1, 10000)
        _range(where, "gap_factor", self.gap_factor, 1.0, 10.0)
        _range(where, "min_run_mm", self.min_run_mm, 0.0, 100.0)
        _range(where, "min_foci", self.min_foci, 1, 20)
        _range(where, "min_focus_peak", self.min_focus_peak, 0.0, 1.0)
        _range(where, "max_tilt_deg", self.max_tilt_deg, 0.0, 45.0)
        _range(where, "noise_target", self.noise_target, 0.001, 0.2)
        _range(where, "noise_limit", self.noise_limit, 0.001, 0.2)


@dataclass
class WatchConfig:
    dir: str = ""  # the export folder; empty disables the watch folder
    rescan_seconds: float = 5.0  # periodic rescan (network shares often send no file events)
    stable_seconds: float = 0.5  # a file is taken when its size has not changed for this long
    min_free_mb: int = 500  # stop taking files when the state disk has less free space than this
    ignore: list[str] = field(default_factory=lambda: [".*", "*.part", "*.tmp", "*.partial", "*.crdownload", "*~"])
    incomplete_seconds: float = 30.0  # a stable file that still does not parse is taken (and quarantined) after this
    end_markers: list[str] = field(default_factory=lambda: ["DICOMDIR", "COMPLETE", "*.done"])  # series-complete signals
    keep_processed_days: float = 7.0  # processed files are deleted after this many days; 0 keeps them
    max_file_mb: int = 64  # a larger file is quarantined unread (a CT slice is well under 1 MB)
    quarantine_keep_days: float = 30.0  # quarantined files are deleted after this many days; 0 keeps them
    quarantine_max_mb: int = 2048  # beyond this much in quarantine the oldest files are deleted; 0: no limit

    def validate(self, where: str) -> None:
        _range(where, "rescan_seconds", self.rescan_seconds, 0.2, 3600)
        _range(where, "stable_seconds", self.stable_seconds, 0.0, 600)
        _range(where, "min_free_mb", self.min_free_mb, 0, 10**7)
        _range(where, "incomplete_seconds", self.incomplete_seconds, 0.0, 86400)
        _range(where, "keep_processed_days", self.keep_processed_days, 0.0, 3650)
        _range(where, "max_file_mb", self.max_file_mb, 1, 4096)
        _range(where, "quarantine_keep_days", self.quarantine_keep_days, 0.0, 3650)
        _range(where, "quarantine_max_mb", self.quarantine_max_mb, 0, 10**7)


@dataclass
class SeriesConfig:
    quiet_seconds: float = 5.0  # a series is complete after this long without a new slice
    # ... or after this long, when its slices look like part of a series (the lung goes on past an end slice,
    # slices missing in between: a paused export); not longer than quiet_seconds: off
    partial_quiet_seconds: float = 60.0
    max_open_series: int = 16  # beyond this many series in flight, the one quiet the longest is completed

    def validate(self, where: str) -> None:
        _range(where, "quiet_seconds", self.quiet_seconds, 0.1, 3600)
        _range(where, "partial_quiet_seconds", self.partial_quiet_seconds, 0.0, 3600)
        _range(where, "max_open_series", self.max_open_series, 1, 1000)


@dataclass
class MQTTConfig:
    url: str = "mqtt://127.0.0.1:1883"  # mqtt[s]://[user:pass@]host:port
    prefix: str = "ctriage"
    qos: int = 1
    keepalive: int = 30
    client_id: str = ""  # empty: ctriage-<device id>
    username: str = ""
    password_file: str = ""  # or CTRIAGE_MQTT_PASSWORD
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_insecure: bool = False  # skip hostname check (test labs only)
    verdict_expiry_seconds: int = 86400  # retained verdicts/overlays expire (MQTT 5 message expiry)
    stats_interval_seconds: float = 10.0
    key_images: bool = True  # attach a small PNG key image to overlays
    protocol: str = "auto"  # auto (MQTT 5, falling back to 3.1.1) | 5 | 3.1.1
    session_expiry_seconds: int = 604800  # persistent session kept by the broker this long (MQTT 5)
    reconnect_min_seconds: float = 1.0  # reconnect backoff starts here and doubles ...
    reconnect_max_seconds: float = 5.0  # ... up to this (a local broker is back within seconds)

    def validate(self, where: str) -> None:
        if not self.url.startswith(("mqtt://", "mqtts://")):
            raise ConfigError(f"{where} url: must start with mqtt:// or mqtts://, got {self.url!r}")
        _range(where, "qos", self.qos, 0, 2)
        _range(where, "keepalive", self.keepalive, 5, 3600)
        _range(where, "verdict_expiry_seconds", self.verdict_expiry_seconds, 0, 10**8)
        _range(where, "stats_interval_seconds", self.stats_interval_seconds, 0.5, 86400)
        _choice(where, "protocol", self.protocol, ("auto", "5", "3.1.1"))
        _range(where, "session_expiry_seconds", self.session_expiry_seconds, 0, 2**32 - 1)
        _range(where, "reconnect_min_seconds", self.reconnect_min_seconds, 0.1, 3600)
        _range(where, "reconnect_max_seconds", self.reconnect_max_seconds, self.reconnect_min_seconds, 86400)
        for k in ("password_file", "ca_file", "cert_file", "key_file"):
            v = getattr(self, k)
            if v and not Path(v).expanduser().is_file():
                raise ConfigError(f"{where} {k}: file not found: {v}")


@dataclass
class PrivacyConfig:
    study_key_secret_file: str = ""  # site secret for study keys; or CTRIAGE_STUDY_KEY_SECRET; else generated
    send_patient_labels: bool = False  # when true, patient name/ID go into payloads (site decision)


@dataclass
class DicomConfig:
    enabled: bool = False
    port: int = 11112
    ae_title: str = "CTRIAGE"
    bind: str = ""  # address to listen on; empty: all interfaces
    allowed_callers: list[str] = field(default_factory=list)  # "AET", "AET@host" or "*@host"; empty: any
    tls_cert_file: str = ""  # with tls_key_file: the node speaks DICOM over TLS only
    tls_key_file: str = ""
    tls_ca_file: str = ""  # callers must present a certificate signed by this CA
    accept_lossy: bool = False  # also accept lossy JPEG 2000 / JPEG-LS near-lossless (HU values change)
    max_associations: int = 8
    timeout_seconds: float = 60.0  # ACSE, DIMSE and network timeouts

    def validate(self, where: str) -> None:
        _range(where, "port", self.port, 1, 65535)
        if not is_ae_title(self.ae_title):
            raise ConfigError(f"{where} ae_title: 1 to 16 characters, got {self.ae_title!r}")
        _range(where, "max_associations", self.max_associations, 1, 100)
        _range(where, "timeout_seconds", self.timeout_seconds, 1, 3600)
        for i, c in enumerate(self.allowed_callers):
            aet, _, host = c.partition("@")
            if not is_ae_title(aet) or ("@" in c and not host.strip()):
                raise ConfigError(f"{where} allowed_callers[{i}]: expected 'AET', 'AET@host' or '*@host', got {c!r}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError(f"{where} tls_cert_file and tls_key_file: set both or neither")
        if self.tls_ca_file and not self.tls_cert_file:
            raise ConfigError(f"{where} tls_ca_file: needs tls_cert_file and tls_key_file")
        for k in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
            v = getattr(self, k)
            if v and not Path(v).expanduser().is_file():
                raise ConfigError(f"{where} {k}: file not found: {v}")


@dataclass
class PacsConfig:
    destinations: list[str] = field(default_factory=list)  # AET@host:port; empty: no results sent to PACS
    calling_ae_title: str = ""  # empty: [dicom] ae_title
    send_key_images: bool = True  # a Secondary Capture key image with the SR
    retry_seconds: float = 30.0  # first retry after a failed delivery; doubles up to max_retry_seconds
    max_retry_seconds: float = 900.0
    timeout_seconds: float = 30.0

    def validate(self, where: str) -> None:
        for i, d in enumerate(self.destinations):
            if parse_peer(d) is None:
                raise ConfigError(f"{where} destinations[{i}]: expected AET@host:port, got {d!r}")
        if self.calling_ae_title and not is_ae_title(self.calling_ae_title):
            raise ConfigError(f"{where} calling_ae_title: at most 16 characters, got {self.calling_ae_title!r}")
        _range(where, "retry_seconds", self.retry_seconds, 0.1, 86400)
        _range(where, "max_retry_seconds", self.max_retry_seconds, self.retry_seconds, 86400)
        _range(where, "timeout_seconds", self.timeout_seconds, 1, 600)


@dataclass
class FleetConfig:
    trust_root: str = ""  # TUF root.json this device starts from; empty: the project root shipped in config/trust
    trust_keys: list[str] = field(default_factory=list)  # legacy flat Ed25519 keys: may vouch for a first root once
    auto_install: bool = True
    groups: list[str] = field(default_factory=list)  # rollout groups this device belongs to


@dataclass
class DisplayConfig:
    bind: str = "127.0.0.1"
    port: int = 8080
    expire_minutes: int = 720  # studies older than this leave the screen
    sound: bool = False  # a chime on each new positive (the kiosk browser must allow autoplay)
    name: str = ""  # this screen in acknowledgements ("seen_by"); empty: display@<hostname>

    def validate(self, where: str) -> None:
        _range(where, "port", self.port, 1, 65535)
        _range(where, "expire_minutes", self.expire_minutes, 1, 7 * 24 * 60)
        if len(self.name) > 64:
            raise ConfigError(f"{where} name: at most 64 characters, got {len(self.name)}")


@dataclass
class Config:
    device_id: str = "ct-room-1"
    state_dir: str = "~/.local/state/ctriage"
    log_level: str = "INFO"
    log_json: bool = False
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    mqtt: MQTTConfig = field(default_factory=MQTTConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    display: DisplayConfig = field(default_factory=DisplayConfig)

    def validate(self, where: str = "") -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.device_id):
            raise ConfigError(f"device_id: letters, digits, '-', '_' and '.' only (it is an MQTT topic level), "
                              f"got {self.device_id!r}")
        _choice("", "log_level", self.log_level.upper(), ("DEBUG", "INFO", "WARNING", "ERROR"))

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with overrides applied ({"watch.dir": "/srv/ct", "device_id": "ct-2"}: "[table].key" or a
        top-level key), each value type-checked as the TOML's would be, then the whole configuration checked
        once; ConfigError names the key."""
        new = copy.deepcopy(self)
        for dotted, value in overrides.items():
            table, _, key = dotted.rpartition(".")
            obj = getattr(new, table, None) if table else new
            if not dataclasses.is_dataclass(obj) or key not in {f.name for f in dataclasses.fields(obj)}:
                raise ConfigError(f"unknown key {dotted!r}")
            where = f"[{table}]" if table else ""
            setattr(obj, key, _coerce(where, key, typing.get_type_hints(type(obj))[key], value))
        new.validate()
        for f in dataclasses.fields(new):
            sub = getattr(new, f.name)
            if dataclasses.is_dataclass(sub) and hasattr(sub, "validate"):
                sub.validate(f"[{f.name}]")
        return new

    @property
    def state_path(self) -> Path:
        return Path(os.path.expandvars(self.state_dir)).expanduser()


def _choice(where: str, key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{where} {key}: must be one of {', '.join(map(str, options))}, got {value!r}".strip())


def _range(where: str, key: str, value: float, lo: float, hi: float) -> None:
    if not (lo <= value <= hi):
        raise ConfigError(f"{where} {key}: must be between {lo:g} and {hi:g}, got {value!r}".strip())


def _coerce(where: str, key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} {key}: expected true or false, got {value!r}".strip())
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} {key}: expected an integer, got {value!r}".strip())
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} {key}: expected a number, got {value!r}".strip())
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} {key}: expected a string, got {value!r}".strip())
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} {key}: expected a list, got {value!r}".strip())
        return [_coerce(where, f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if isinstance(tp, types.UnionType):
        return value
    raise ConfigError(f"{where} {key}: unsupported type")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{where} unknown key {key!r}{hint}".strip())
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}]: expected a table")
            kwargs[key] = _build(tp, value, f"[{key}]")
        else:
            kwargs[key] = _coerce(where, key, tp, value)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub) and f.name not in data and hasattr(sub, "validate"):
            sub.validate(f"[{f.name}]")
    return cfg


def load(path: str | Path | None = None) -> Config:
    """Load TOML (or defaults when path is None); raise ConfigError with the key on any problem."""
    if path is None:
        env = os.environ.get("CTRIAGE_CONFIG")
        path = env if env else None
    if path is None:
        return from_dict({})
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    return from_dict(data)


def to_toml(cfg: Config) -> str:
    """Render a Config as TOML (for `ctriage config --show`)."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines, tables = [], []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            tables.append((f.name, v))
        else:
            lines.append(f"{f.name} = {val(v)}")
    for name, sub in tables:
        lines.append(f"\n[{name}]")
        for f in dataclasses.fields(sub):
            lines.append(f"{f.name} = {val(getattr(sub, f.name))}")
    return "\n".join(lines) + "\n"
