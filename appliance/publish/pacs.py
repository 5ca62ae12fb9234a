"""Results back to PACS: the verdict as a DICOM SR (and optionally a key image) sent by C-STORE from a durable outbox.

Off unless destinations are configured ([pacs] destinations = ["AET@host:port"], or `ctriage run --pacs`).
Everything goes through files under <state_dir>/pacs-outbox, written atomically, so nothing is lost when PACS is
down or the appliance restarts. submit() writes a small job (verdict, source references, key image); the delivery
thread builds the DICOM objects from it into a spool folder per destination and sends what is there, oldest first.
A file is deleted once PACS answered success (or a warning); while PACS cannot be reached, refuses the association
or is out of resources, delivery is retried with exponential backoff (retry_seconds doubling up to
max_retry_seconds); an instance PACS refuses for good (e.g. SOP class not supported) moves to `failed/` with the
reason beside it. The outbox is self-contained (a spool directory: appliance.publish.pacs_outbox), independent of
the appliance's SQLite store; the peer address and the association are appliance.publish.dicom_peer.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from appliance.publish.dicom_peer import ContextsRefused, Destination, DicomNetworkError, associate
from appliance.publish.pacs_outbox import Outbox

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.publish.sr import SourceSeries

log = logging.getLogger(__name__)

BATCH = 50  # instances per association


@dataclass
class _DestState:
    failures: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    delivered: int = 0


@dataclass
class KeyImage:
    """A rendered key image (overlays.render → PIL image, or PNG bytes) and the series index of the slice it shows."""

    index: int
    image: Any  # PIL.Image.Image | bytes


@dataclass
class PacsSender:
    """Builds the DICOM results of final verdicts and delivers them to every destination through the outbox.

    start() runs the delivery thread; submit() only writes to the outbox (fast, durable) and wakes the thread.
    """

    destinations: list[Destination]
    outbox_dir: Path
    calling_aet: str = "CTRIAGE"
    device_id: str = ""
    send_key_images: bool = True
    retry_seconds: float = 30.0
    max_retry_seconds: float = 900.0
    timeout: float = 30.0
    institution_name: str | None = None
    _state: dict[Destination, _DestState] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.destinations = [d if isinstance(d, Destination) else Destination.parse(d) for d in self.destinations]
        self.outbox = Outbox(self.outbox_dir)
        self._state = {d: _DestState() for d in self.destinations}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Config, destinations: Sequence[str] | None = None) -> PacsSender:
        """From [pacs] (destinations override it, e.g. from `ctriage run --pacs`); outbox under the state dir."""
        p = cfg.pacs
        return cls(destinations=[Destination.parse(d) for d in (destinations if destinations is not None
                                                                 else p.destinations)],
                   outbox_dir=cfg.state_path / "pacs-outbox",
                   calling_aet=p.calling_ae_title or cfg.dicom.ae_title,
                   device_id=cfg.device_id, send_key_images=p.send_key_images, retry_seconds=p.retry_seconds,
                   max_retry_seconds=p.max_retry_seconds, timeout=p.timeout_seconds)

    @property
    def enabled(self) -> bool:
        return bool(self.destinations)

    # -- producing ---------------------------------------------------------------------------------------------

    def submit(self, verdict: dict[str, Any], source: SourceSeries, key_slices: Sequence[dict] | None = None,
               key_image: KeyImage | None = None) -> list[str]:
        """Queue the SR of a verdict (and a key image) for every destination; returns their SOP Instance UIDs.

        verdict: the MQTT verdict payload; source: the analysed series (order = verdict slice indices);
        key_slices: the overlay's key slices (boxes → SCOORD regions); key_image: a rendered key image.
        Fast and durable: it writes one small job file; the delivery thread builds the DICOM objects (about a
        second for a long series) and sends them. The same verdict submitted twice is queued once.
        """
        if not self.destinations:
            return []
        from appliance.publish.sr import result_uids

        device = self._device(verdict)
        sr_uids = result_uids(verdict, source, "sr", device)
        job: dict[str, Any] = {"verdict": verdict, "source": source.as_dict(), "key_slices": list(key_slices or []),
                               "sr_uids": list(sr_uids)}
        if key_image is not None and self.send_key_images:
            image = key_image.image
            if not isinstance(image, (bytes, bytearray)):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                image = buf.getvalue()
            job["key_image"] = {"index": int(key_image.index), "png": base64.b64encode(image).decode(),
                                "uids": list(result_uids(verdict, source, f"key-image-{key_image.index}", device))}
        self.outbox.put_job(sr_uids[1], job)
        self._wake.set()
        return [sr_uids[1]] + ([job["key_image"]["uids"][1]] if "key_image" in job else [])

    def _device(self, verdict: dict[str, Any]) -> str:
        return self.device_id or str(verdict.get("device", "")) or "ctriage"

    def build_pending(self) -> int:
        """Build the queued results into DICOM files in each destination's outbox; returns how many were built.
        A result that cannot be built (bad input: it would fail again) is moved aside with the reason."""
        from appliance.publish.sr import SourceSeries, build_key_image, build_sr

        n = 0
        for job_file in self.outbox.jobs():
            try:
                job = json.loads(job_file.read_text())
                source, verdict = SourceSeries.from_dict(job["source"]), job["verdict"]
                device = self._device(verdict)
                datasets = [build_sr(verdict, source, job.get("key_slices"), device_id=device,
                                     institution_name=self.institution_name, uids=tuple(job["sr_uids"]))]
                ki = job.get("key_image")
                if ki:
                    datasets.append(build_key_image(base64.b64decode(ki["png"]), source, int(ki["index"]), verdict,
                                                    device_id=device, uids=tuple(ki["uids"])))
            except Exception as e:
                log.error("PACS: cannot build a result (kept in %s): %s: %s", job_file.parent / "failed",
                          type(e).__name__, e)
                self.outbox.fail(job_file, f"{type(e).__name__}: {e}")
                continue
            for ds in datasets:
                for d in self.destinations:
                    self.outbox.put(d, ds)
            job_file.unlink()
            n += 1
        return n

    def enqueue(self, ds: Dataset) -> None:
        """Put any DICOM instance into the outbox of every destination."""
        for d in self.destinations:
            self.outbox.put(d, ds)
        self._wake.set()

    # -- delivering --------------------------------------------------------------------------------------------

    def start(self) -> PacsSender:
        if self._thread is None and self.destinations:
            for name, n in self.outbox.orphans(self.destinations).items():
                log.warning("PACS outbox: %d instance(s) pending for %s, which is no longer a destination", n, name)
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="pacs-sender", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> PacsSender:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.build_pending()
            except Exception:  # e.g. the disk is full: try again on the next round
                log.exception("PACS: building results failed")
            wait = self.deliver_due()
            self._wake.wait(timeout=wait)
            self._wake.clear()

    def deliver_due(self) -> float:
        """One pass over the destinations whose retry time has come; returns seconds until the next one is due."""
        next_in = 3600.0
        for dest in self.destinations:
            if self._stop.is_set():
                break
            st = self._state[dest]
            now = time.monotonic()
            if st.next_attempt > now:
                next_in = min(next_in, st.next_attempt - now)
                continue
            try:
                while self.outbox.pending(dest) and not self._stop.is_set():
                    self._deliver(dest, self.outbox.pending(dest)[:BATCH])
            except Exception as e:  # network trouble, or anything unexpected: keep the files, retry later
                if not isinstance(e, DicomNetworkError):
                    log.exception("PACS %s: delivery failed", dest)
                with self._lock:
                    st.failures += 1
                    delay = min(self.max_retry_seconds, self.retry_seconds * 2 ** min(st.failures - 1, 20))
                    st.next_attempt = time.monotonic() + delay
                    st.last_error = str(e)
                log.warning("PACS %s: %s; %d instance(s) wait in the outbox, retry in %.1f s", dest, e,
                            len(self.outbox.pending(dest)), delay)
                next_in = min(next_in, delay)
            else:
                with self._lock:
                    if st.failures:
                        log.info("PACS %s reachable again", dest)
                    st.failures, st.next_attempt, st.last_error = 0, 0.0, ""
        return max(0.05, next_in)

    def _deliver(self, dest: Destination, files: list[Path]) -> None:
        metas = {}
        for f in files:
            try:
                metas[f] = read_file_meta_info(f)
            except Exception as e:
                self.outbox.fail(f, f"unreadable outbox file: {type(e).__name__}: {e}")
        contexts: dict[str, list[str]] = {}
        for m in metas.values():
            ts = [str(m.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            contexts.setdefault(str(m.MediaStorageSOPClassUID), list(dict.fromkeys(ts)))
        if not contexts:
            return
        try:
            assoc = associate(dest, self.calling_aet, list(contexts.items()), self.timeout)
        except ContextsRefused as e:
            for f in metas:
                self._refused(dest, f, f"not accepted: {e}")
            return
        try:
            for f in metas:
                try:
                    status = assoc.send_c_store(f)
                except ValueError as e:  # PACS accepted no presentation context for this SOP class
                    self._refused(dest, f, f"not accepted by {dest}: {e}")
                    continue
                except Exception as e:
                    if not assoc.is_established:
                        raise DicomNetworkError(f"association with {dest} lost: {type(e).__name__}") from None
                    self._refused(dest, f, f"cannot send this file: {type(e).__name__}: {e}")  # e.g. corrupt on disk
                    continue
                if not assoc.is_established or "Status" not in status:
                    raise DicomNetworkError(f"no C-STORE response from {dest} (association ended)")
                code = int(status.Status)
                comment = str(status.get("ErrorComment", "") or "")
                if code == 0 or 0xB000 <= code <= 0xBFFF:  # success or warning
                    with self._lock:  # one step for status(): gone from the outbox and counted as delivered
                        f.unlink(missing_ok=True)
                        self._state[dest].delivered += 1
                elif 0xA700 <= code <= 0xA7FF:
                    raise DicomNetworkError(f"{dest} out of resources (0x{code:04X}) {comment}".strip())
                else:
                    self._refused(dest, f, f"refused by {dest} with status 0x{code:04X} {comment}".strip())
        finally:
            if assoc.is_established:
                assoc.release()

    def _refused(self, dest: Destination, f: Path, reason: str) -> None:
        log.error("PACS %s refused an instance for good (kept in %s): %s", dest, f.parent / "failed", reason)
        self.outbox.fail(f, reason)

    def pending(self) -> dict[str, int]:
        return {str(d): len(self.outbox.pending(d)) for d in self.destinations}

    def status(self) -> list[dict[str, Any]]:
        """Per destination: pending, failed, delivered since start, last error, seconds to the next retry."""
        now = time.monotonic()
        with self._lock:
            building = len(self.outbox.jobs())
            return [{"destination": str(d), "building": building, "pending": len(self.outbox.pending(d)),
                     "failed": len(self.outbox.failed(d)), "delivered": st.delivered,
                     "last_error": st.last_error or None,
                     "retry_in_s": round(max(0.0, st.next_attempt - now), 1) if st.failures else None}
                    for d, st in self._state.items()]

    def wait_empty(self, timeout: float) -> bool:
        """Block until every result is built and every destination's outbox is empty (True), or timeout (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.outbox.jobs() and not any(self.pending().values()):
                return True
            time.sleep(0.05)
        return not self.outbox.jobs() and not any(self.pending().values())

