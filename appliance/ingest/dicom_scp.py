"""DICOM Storage SCP: the appliance as a DICOM node that CT consoles push studies to (C-STORE, C-ECHO).

Accepted: CT Image Storage (and Enhanced CT, stored so that the reader refuses it with its reason), in the transfer
syntaxes the reader decodes. Callers can be restricted to an allow-list of "AET", "AET@host" or "*@host"; anyone
else gets an association rejection. Every instance that passes a structural check is handed, complete, to an
`InstanceSink`; an instance that fails gets a DIMSE failure status with a comment and the node keeps serving.
An association release tells the sink which series it carried — one completeness signal among others (some
senders open one association per image).
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import (UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless,
                         JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless)
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification

from appliance import durable
from appliance.dicom_names import AE_TITLE_MAX, is_ae_title
from appliance.uid_names import safe_name

if TYPE_CHECKING:
    from appliance.config import DicomConfig
    from appliance.ingest.spool import Spool

log = logging.getLogger(__name__)

#: Transfer syntaxes that keep the HU values exact, in order of preference.
LOSSLESS_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1, JPEGLossless,
                                      JPEGLSLossless, JPEG2000Lossless, RLELossless)
#: Lossy syntaxes the reader can decode too; accepted only when asked for (lossy CT changes the HU values).
LOSSY_SYNTAXES: tuple[str, ...] = (JPEG2000, JPEGLSNearLossless)
STORAGE_CLASSES: tuple[str, ...] = (CTImageStorage, EnhancedCTImageStorage)

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_DECODE = 0xC210
MISSING_UID = 0xC001
PROCESSING_FAILURE = 0x0110


class NodeError(Exception):
    """The node cannot start (e.g. the port is taken); the message says which address and why."""


class OutOfSpace(Exception):
    """A sink cannot take an instance for lack of disk space (answered with status 0xA700)."""


class InstanceSink(Protocol):
    """Where received instances go. Both methods are called from the association threads: be thread-safe."""

    def accept(self, data: bytes, sop_instance_uid: str, series_uid: str) -> None:
        """Take one complete instance (a DICOM file: preamble, file meta, dataset as received).

        Return only once it is durably stored; raise OutOfSpace (or OSError ENOSPC) when the disk is full, any
        other exception for other failures (the sender gets a failure status either way and may retry).
        """

    def association_released(self, series_uids: set[str]) -> None:
        """The sender released an association normally after sending instances of these series."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write data to path completely or not at all (appliance.durable), creating its folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.atomic_write(path, data)


class DirectorySink:
    """Writes each instance to <path>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm, atomically (tests, standalone use).

    min_free_mb: refuse instances (0xA700) while the disk holding path has less free space than this.
    """

    def __init__(self, path: str | os.PathLike, min_free_mb: float = 0) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.released: list[set[str]] = []
        self._lock = threading.Lock()

    def accept(self, data: bytes, sop_instance_uid: str, series_uid: str) -> None:
        if self.min_free_bytes:
            free = shutil.disk_usage(self.path).free
            if free - len(data) < self.min_free_bytes:
                raise OutOfSpace(f"{free // 2**20} MiB free, {self.min_free_bytes // 2**20} MiB must stay free")
        atomic_write(self.path / safe_name(series_uid) / f"{safe_name(sop_instance_uid)}.dcm", data)

    def association_released(self, series_uids: set[str]) -> None:
        with self._lock:
            self.released.append(set(series_uids))

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*.dcm") if not p.name.startswith("."))


class SpoolSink:
    """The daemon's InstanceSink: each received instance into the spool (durably, before the sender gets its success
    status; SpoolFull is an ENOSPC OSError → 0xA700), each released association as a completion hint."""

    def __init__(self, spool: Spool, hint: Callable[[str, str, bool], None]) -> None:
        self.spool = spool
        self.hint = hint  # hint(series_uid, reason, weak): the daemon's series_complete_hint

    def accept(self, data: bytes, sop_instance_uid: str, series_uid: str) -> None:
        self.spool.accept(data)

    def association_released(self, series_uids: set[str]) -> None:
        for uid in sorted(series_uids):
            self.hint(uid, "sender: association released", True)  # weak: some senders release after every image


@dataclass(frozen=True)
class Caller:
    """One allow-list entry: an AE title ("*" = any) and optionally a host (name or address)."""

    ae_title: str
    host: str = ""

    @classmethod
    def parse(cls, text: str) -> Caller:
        aet, sep, host = text.strip().rpartition("@") if "@" in text else (text.strip(), "", "")
        aet, host = aet.strip(), host.strip().strip("[]")
        if not is_ae_title(aet) or (sep and not host):
            raise ValueError(f"allowed caller {text!r}: expected 'AET', 'AET@host' or '*@host' (AE title 1-16 chars)")
        return cls(aet, host)

    def addresses(self) -> set[str]:
        """The host's addresses (resolved now); empty when no host is given."""
        if not self.host:
            return set()
        try:
            return {str(ipaddress.ip_address(self.host))}
        except ValueError:
            pass
        try:
            return {str(ipaddress.ip_address(ai[4][0].split("%")[0])) for ai in socket.getaddrinfo(self.host, None)}
        except OSError as e:
            log.warning("allowed caller host %s does not resolve (%s): callers from it will be refused", self.host, e)
            return set()


class CallerPolicy:
    """Decides whether a calling AE title from an address may associate. Empty list: anyone."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.callers = [Caller.parse(e) for e in entries]
        self._resolved: list[tuple[Caller, set[str]]] = [(c, c.addresses()) for c in self.callers]

    def allows(self, ae_title: str, address: str) -> bool:
        if not self.callers:
            return True
        ae_title = ae_title.strip()
        try:
            addr = str(ipaddress.ip_address(address.split("%")[0]))
            mapped = ipaddress.ip_address(addr)
            if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped:
                addr = str(mapped.ipv4_mapped)
        except ValueError:
            addr = address
        for c, addrs in self._resolved:
            if c.ae_title not in ("*", ae_title):
                continue
            if not c.host or addr in addrs:
                return True
        return False


def server_ssl_context(cert_file: str, key_file: str, ca_file: str = "") -> ssl.SSLContext:
    """TLS for the node: our certificate and key; with a CA file, callers must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if ca_file else ssl.CERT_NONE
    return ctx


@dataclass
class NodeStats:
    """Counters since start (for status reports); no identifiers."""

    associations: int = 0
    refused: int = 0
    stored: int = 0
    failed: int = 0
    echoes: int = 0
    last_failure: str = ""
    by_status: dict[int, int] = field(default_factory=dict)


class DicomNode:
    """The Storage SCP running in background threads: start() binds and serves, stop() shuts it down.

    port=0 binds a free port (see `port` after start()).
    """

    def __init__(self, sink: InstanceSink, *, ae_title: str = "CTRIAGE", port: int = 11112, bind: str = "",
                 allowed_callers: Iterable[str] = (), ssl_context: ssl.SSLContext | None = None,
                 accept_lossy: bool = False, max_associations: int = 8, timeout: float = 60.0) -> None:
        if not is_ae_title(ae_title):
            raise ValueError(f"AE title must be 1 to 16 characters, got {ae_title!r}")
        self.sink = sink
        self.ae_title = ae_title.strip()
        self.bind, self._port = bind, port
        self.policy = CallerPolicy(allowed_callers)
        self.ssl_context = ssl_context
        self.syntaxes = list(LOSSLESS_SYNTAXES) + (list(LOSSY_SYNTAXES) if accept_lossy else [])
        self.max_associations = max_associations
        self.timeout = timeout
        self.stats = NodeStats()
        self._server = None
        self._series: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: DicomConfig, sink: InstanceSink, **kw) -> DicomNode:
        """From the [dicom] table; keyword arguments override it (e.g. port from `ctriage run --dicom-port`)."""
        ctx = server_ssl_context(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_ca_file) if cfg.tls_cert_file else None
        opts = {"ae_title": cfg.ae_title, "port": cfg.port, "bind": cfg.bind, "allowed_callers": cfg.allowed_callers,
                "ssl_context": ctx, "accept_lossy": cfg.accept_lossy, "max_associations": cfg.max_associations,
                "timeout": cfg.timeout_seconds}
        opts.update(kw)
        return cls(sink, **opts)

    @property
    def port(self) -> int:
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> DicomNode:
        if self._server is not None:
            return self
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_supported_context(Verification)
        for sop in STORAGE_CLASSES:
            ae.add_supported_context(sop, self.syntaxes)
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_RELEASED, self._on_released),
                    (evt.EVT_ABORTED, self._on_gone), (evt.EVT_CONN_CLOSE, self._on_gone)]
        self._ae = ae
        try:
            self._server = ae.start_server((self.bind, self._port), block=False, evt_handlers=handlers,
                                           ssl_context=self.ssl_context)
        except OSError as e:
            raise NodeError(f"DICOM node cannot listen on {self.bind or '*'}:{self._port}: {e.strerror or e}") from None
        log.info("DICOM node %s listening on port %d%s", self.ae_title, self.port, " (TLS)" if self.ssl_context else "")
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            log.info("DICOM node %s stopped", self.ae_title)

    def __enter__(self) -> DicomNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- event handlers (association threads) ------------------------------------------------------------------

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title or "").strip()
        address = str(assoc.requestor.address)
        if self.policy.allows(calling, address):
            with self._lock:
                self.stats.associations += 1
            return
        with self._lock:
            self.stats.refused += 1
        log.warning("refused association from %s@%s: not in dicom.allowed_callers", calling, address)
        assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE title not recognised
        assoc.kill()

    def _on_echo(self, event) -> int:
        with self._lock:
            self.stats.echoes += 1
        return SUCCESS

    def _on_store(self, event) -> Dataset | int:
        status, comment, series = self._store(event)
        with self._lock:
            self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
            if status == SUCCESS:
                self.stats.stored += 1
                self._series.setdefault(id(event.assoc), set()).add(series)
            else:
                self.stats.failed += 1
                self.stats.last_failure = comment
        if status == SUCCESS:
            return SUCCESS
        log.warning("C-STORE from %s refused with 0x%04X: %s", event.assoc.requestor.ae_title, status, comment)
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = comment[:64]  # LO
        return rsp

    def _store(self, event) -> tuple[int, str, str]:
        req = event.request
        sop_class = str(req.AffectedSOPClassUID or "")
        sop_instance = str(req.AffectedSOPInstanceUID or "")
        try:
            ds = event.dataset
            header = {k: str(ds.get(k, "") or "").strip() for k in
                      ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")}
        except Exception as e:  # the bytes do not parse as a dataset in the negotiated transfer syntax
            return CANNOT_DECODE, f"cannot decode data set: {type(e).__name__}", ""
        if not any(header[k] for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")):
            return CANNOT_DECODE, "cannot understand the data set (no SOP, study or series UID)", ""
        if not header["SOPInstanceUID"]:
            return MISSING_UID, "data set has no SOPInstanceUID", ""
        if header["SOPInstanceUID"] != sop_instance:
            return MISSING_UID, "SOPInstanceUID differs from the request's", ""
        if header["SOPClassUID"] and header["SOPClassUID"] != sop_class:
            return DATASET_MISMATCH, "SOPClassUID differs from the request's", ""
        if header["Modality"] and header["Modality"].upper() != "CT":
            return DATASET_MISMATCH, f"Modality {header['Modality'][:16]} in a CT storage request", ""
        for k in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not header[k]:
                return MISSING_UID, f"data set has no {k}", ""
        if "PixelData" not in ds:  # Type 1 in a CT image; also what a truncated file usually lacks
            return DATASET_MISMATCH, "no pixel data in a CT image (truncated?)", ""
        short = _short_pixel_data(ds, event.context.transfer_syntax)
        if short:
            return DATASET_MISMATCH, short, ""
        series = header["SeriesInstanceUID"]
        try:
            meta = event.file_meta
            meta.SourceApplicationEntityTitle = str(event.assoc.requestor.ae_title).strip()[:AE_TITLE_MAX] or "UNKNOWN"
            data = b"".join((b"\0" * 128, b"DICM", encode_file_meta(meta), event.encoded_dataset(include_meta=False)))
            self.sink.accept(data, sop_instance, series)
        except OutOfSpace as e:
            return OUT_OF_RESOURCES, f"out of resources: {e}", ""
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return OUT_OF_RESOURCES, "out of resources: no space left on device", ""
            return OUT_OF_RESOURCES, f"out of resources: cannot store ({e.strerror or type(e).__name__})", ""
        except Exception as e:  # a sink bug must not take the node down
            log.exception("sink failed to take an instance")
            return PROCESSING_FAILURE, f"processing failure: {type(e).__name__}", ""
        return SUCCESS, "", series

    def _on_released(self, event) -> None:
        with self._lock:
            series = self._series.pop(id(event.assoc), set())
        if series:
            try:
                self.sink.association_released(series)
            except Exception:
                log.exception("sink failed on association release")

    def _on_gone(self, event) -> None:
        with self._lock:
            self._series.pop(id(event.assoc), None)


def _short_pixel_data(ds: Dataset, syntax: str) -> str:
    """For native (uncompressed) pixel data: a reason when it is shorter than its attributes say, else ''."""
    if UID(syntax).is_compressed:
        return ""
    try:
        n = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
             * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
        have = len(ds.PixelData)
    except (AttributeError, TypeError, ValueError):
        return "pixel data without valid Rows, Columns or BitsAllocated"
    return f"pixel data has {have} bytes, {n} expected (truncated?)" if have < n else ""


def supported_syntax_names(accept_lossy: bool = False) -> list[str]:
    """Human-readable names of the transfer syntaxes the node accepts (for `ctriage config` and docs)."""
    return [UID(u).name for u in LOSSLESS_SYNTAXES + (LOSSY_SYNTAXES if accept_lossy else ())]
