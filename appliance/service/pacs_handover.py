"""Final verdicts to the PACS sender: a durable list of those committed but not yet handed over (store kv
`pacs.pending`, written in the verdict's own transaction), the hand-over of each with its source series and key
image, retries while the PACS outbox cannot be written, and what health and status say about it.

The sender itself (appliance.publish.pacs.PacsSender, with [pacs] destinations) keeps what it took in
<state>/pacs-outbox until PACS has it; this part only makes sure every final verdict reaches it once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from appliance.publish.key_slices import key_slices, lead_run
from appliance.service.key_image import SourceImages

log = logging.getLogger("ctriage.daemon")

PACS_PENDING = "pacs.pending"  # store kv: final verdicts committed but not yet handed to the PACS sender (JSON list)
PACS_SENT = "pacs.sent."  # store kv, + study key: what PACS last got for the study (no second identical SR)
PACS_KEY_IMAGE_SIZE = 512


def pacs_fingerprint(payload: dict[str, Any]) -> str:
    """What PACS sees of a study verdict: the lead series and its result, evidence, counts and models. A new final
    verdict that differs only in what else the study holds (other series, times) sends no second SR."""
    core = {k: payload.get(k) for k in ("series_key", "state", "result", "reason", "evidence", "counts", "bundles")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


class Unsendable(Exception):
    """A PACS result that can never be built (its source files are gone, the source has no UIDs)."""


class PacsHandover:
    def __init__(self, cfg: Any, store: Any, images: SourceImages, sender: Any = None) -> None:
        self.cfg, self.store, self.images = cfg, store, images
        self.sender = sender  # appliance.publish.pacs.PacsSender when [pacs] destinations are configured
        self.retry_at = 0.0
        self.error: str | None = None
        self.dropped = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the sender when [pacs] destinations are configured."""
        if self.cfg.pacs.destinations:
            from appliance.publish.pacs import PacsSender

            self.sender = PacsSender.from_config(self.cfg).start()

    def stop(self) -> None:
        if self.sender is not None:  # what it has not delivered waits in <state>/pacs-outbox for the next start
            self.sender.stop()

    def resume(self) -> None:
        """At start: hand the sender the final verdicts it had not taken before the last stop (or crash)."""
        waiting = self.pending()
        if waiting and self.sender is None:
            log.warning("%d final verdict(s) wait for PACS, but no [pacs] destinations are configured", len(waiting))
        elif waiting:
            log.info("resuming: handing %d final verdict(s) to the PACS sender", len(waiting))
            self.flush()

    # -- what the verdicts hand over ---------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.sender is not None

    def already_sent(self, study_key: str, fp: str) -> bool:
        """PACS has this result for the study already (the study changed elsewhere)."""
        return self.store.kv_get(PACS_SENT + study_key) == fp

    def queue(self, series_uid: str, payload: dict[str, Any], study_key: str, fp: str) -> None:
        """Add a final verdict to the waiting list; call it inside the verdict's store transaction, so that a
        crash before the hand-over loses nothing. flush() afterwards."""
        waiting = self.pending() + [{"series_uid": series_uid, "verdict": payload}]
        self.store.kv_set(PACS_PENDING, json.dumps(waiting))
        self.store.kv_set(PACS_SENT + study_key, fp)

    def pending(self) -> list[dict[str, Any]]:
        try:
            return list(json.loads(self.store.kv_get(PACS_PENDING) or "[]"))
        except (json.JSONDecodeError, TypeError):
            log.error("PACS: the list of verdicts waiting for the sender is damaged; starting a new one")
            return []

    def retry_if_due(self) -> None:
        if self.retry_at and time.time() >= self.retry_at:
            self.flush()

    def flush(self) -> None:
        """Hand every committed final verdict the PACS sender has not taken yet to it (worker thread, start).
        Re-submitting one it took before is harmless: the sender derives the results' UIDs from the verdict."""
        waiting = self.pending()
        if self.sender is None or not waiting:
            self.retry_at = 0.0
            return
        keep, error = [], None
        for entry in waiting:
            v = entry.get("verdict") or {}
            what = f"{v.get('state')} {v.get('result')} verdict of study {v.get('study_key')}"
            try:
                self.submit(entry)
                log.info("PACS: %s queued for %d destination(s)", what, len(self.sender.destinations))
            except OSError as e:  # the outbox cannot be written (disk full, permissions): keep it, try again
                error = f"results cannot be queued for PACS: {e.strerror or e}"
                keep.append(entry)
            except Exception as e:  # noqa: BLE001 - it would fail again: say why and let it go
                self.dropped += 1
                msg_ = str(e) if isinstance(e, Unsendable) else f"{type(e).__name__}: {e}"
                log.error("PACS: %s cannot be sent: %s", what, msg_)
        self.store.kv_set(PACS_PENDING, json.dumps(keep))
        if keep:
            self.retry_at = time.time() + self.cfg.pacs.retry_seconds
            (log.warning if error != self.error else log.debug)(
                "%s; %d verdict(s) wait, trying again every %g s", error, len(keep), self.cfg.pacs.retry_seconds)
        else:
            self.retry_at = 0.0
            if self.error:
                log.info("PACS: results can be queued again")
        self.error = error

    def submit(self, entry: dict[str, Any]) -> None:
        """The SR (and key image) of one final verdict, its source the lead series in the analyzer's order."""
        from appliance.publish.pacs import KeyImage
        from appliance.publish.sr import SourceSeries

        verdict = entry["verdict"]
        rows = sorted(self.store.series_slices(entry["series_uid"]), key=lambda t: t[0])
        if not rows:
            raise Unsendable("no analysed slices stored for its series")
        findings = [f for _, f, _ in rows]
        paths = [self.images.path(ident) for _, _, ident in rows]
        gone = sum(p is None for p in paths)
        if gone:
            raise Unsendable(f"{gone} of {len(paths)} source file(s) are no longer on disk "
                             "(pruned after watch.keep_processed_days?)")
        source = SourceSeries.from_files(paths)  # headers only
        ks = key_slices(findings, lead=lead_run(verdict))
        key_image = None
        if ks and self.sender.send_key_images:
            index = int(ks[0]["index"])
            try:
                png, _ = self.images.key_image(findings, index, str(verdict.get("result")),
                                               str(verdict.get("state")), max_size=PACS_KEY_IMAGE_SIZE)
                key_image = KeyImage(index, png) if png else None
            except Exception as e:  # noqa: BLE001 - the SR goes without a key image
                log.warning("PACS key image not rendered: %s: %s", type(e).__name__, e)
        self.sender.submit(verdict, source, key_slices=ks, key_image=key_image)

    # -- health and status -------------------------------------------------------------------------------------
    def problem(self) -> str | None:
        if self.sender is None:
            return None
        if self.error:
            return self.error
        down = [f"{d['destination']}: {d['last_error']} ({d['pending']} waiting)" for d in self.sender.status()
                if d["last_error"] and d["pending"]]
        return "results not delivered to PACS: " + "; ".join(down) if down else None

    def status(self) -> dict[str, Any] | None:
        """Delivery per destination: counts and the last error only (no identifiers)."""
        if self.sender is None:
            return None
        try:
            queued = len(self.pending())
        except Exception:  # noqa: BLE001 - store closed
            queued = 0
        return {"calling_ae_title": self.sender.calling_aet, "queued": queued, "dropped": self.dropped,
                "error": self.error, "destinations": self.sender.status()}
