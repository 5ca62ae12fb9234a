"""Study verdicts: a series tracker update → the study's verdict over its series → payload, fingerprint, overlay
(with its key image) → the durable outbox, and final verdicts on to the PACS hand-over, all in one store transaction.

A study's final verdict is published once; after it only a final result that differs goes out, as a correction
(`after_final`), and one update of the same result when prone images, or a smoother series beside a noisy
positive, arrive after a positive's final (what they show is the reader's to see). A verdict identical to the last
published one (fingerprint, times excluded) is not re-published.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from appliance.domain import Evidence, SliceFinding
from appliance.pipeline.case_logic import SeriesSummary, note_kind, reader_notes, study_verdict
from appliance.pipeline.tracker import Update
from appliance.publish import messages as msg
from appliance.publish.key_slices import key_slices, lead_run
from appliance.service import compact_json
from appliance.service.key_image import SourceImages
from appliance.service.pacs_handover import PacsHandover, pacs_fingerprint
from appliance.service.stats import Stats
from appliance.store import verdict_from_dict

log = logging.getLogger("ctriage.daemon")

OVERLAY_IMAGE_SIZE = 384


def fingerprint(payload: dict[str, Any]) -> str:
    """What makes a verdict different from the last one (times excluded): no duplicate verdicts."""
    core = {k: v for k, v in payload.items() if k not in ("created", "timings")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


class Verdicts:
    """Turns tracker updates into published study verdicts (worker thread; also at start, for recovered series).

    analyzer: returns the analyzer in use now (its bundles and runtime go into the payload); kick: called after
    messages were committed to the outbox (wake the outbox pump).
    """

    def __init__(self, cfg: Any, store: Any, topics: msg.Topics, analyzer: Callable[[], Any],
                 images: SourceImages, pacs: PacsHandover, stats: Stats,
                 kick: Callable[[], None] = lambda: None) -> None:
        self.cfg, self.store, self.topics = cfg, store, topics
        self.analyzer, self.images, self.pacs, self.stats, self.kick = analyzer, images, pacs, stats, kick

    def on_update(self, u: Update, now: float) -> None:
        row = self.store.series(u.series_uid)
        if row is None:
            return
        study_uid = row["study_uid"]
        rows = self.store.study_series(study_uid)
        summaries = []
        for r in rows:
            if r["series_uid"] == u.series_uid:
                v = u.verdict
            elif r["verdict"]:
                v = verdict_from_dict(json.loads(r["verdict"]))
            else:
                continue
            summaries.append(SeriesSummary(r["series_key"], v, r["description"],
                                           now if r["series_uid"] == u.series_uid else r["updated"]))
        sv, lead = study_verdict(summaries)
        lead_row = next(r for r in rows if r["series_key"] == lead.series_key)
        findings = [f for _, f, _ in sorted(self.store.series_slices(lead_row["series_uid"]), key=lambda t: t[0])]
        analyzer = self.analyzer()
        final_lead = lead.verdict.state == "final"
        ms = [sum(f.timings_ms.values()) for f in findings if f.timings_ms]
        timings = {"first_slice_to_verdict_s": round(now - lead_row["first_seen"], 3),
                   "last_slice_to_verdict_s": round(now - lead_row["last_seen"], 3) if final_lead else None,
                   "ms_per_slice": round(sum(ms) / len(ms), 3) if ms else 0.0}
        complete_reason = (u.complete_reason if lead_row["series_uid"] == u.series_uid
                           else lead_row["complete_reason"]) if sv.state == "final" else None
        labels = json.loads(lead_row["labels"]) if lead_row["labels"] and self.cfg.privacy.send_patient_labels else None
        prev = self.store.study(study_uid)
        publish, correction = self.after_final(prev, sv, lead_row["study_key"])
        payload = msg.verdict_payload(
            device=self.cfg.device_id, study_key=lead_row["study_key"], series_key=lead.series_key, verdict=sv,
            bundles=analyzer.bundles, backend=analyzer.backend, device_type=analyzer.device,
            complete_reason=complete_reason or ("series complete" if sv.state == "final" else None), timings=timings,
            series=[self.series_item(s) for s in summaries],
            rejected=self.store.rejected_count(lead_row["series_uid"]), labels=labels, correction=correction)
        fp = fingerprint(payload)
        changed = publish and (prev is None or prev["fingerprint"] != fp)
        overlay = self.overlay_payload(lead_row, payload["state"], sv.result, findings, lead_run(sv)) if changed else None
        study_key = lead_row["study_key"]
        expiry = self.cfg.mqtt.verdict_expiry_seconds or None
        same = correction is not None and correction["previous_result"] == sv.result  # news, not a new result
        pacs_fp = pacs_fingerprint(payload) if changed and sv.state == "final" and self.pacs.enabled and not same \
            else None  # the SR carries no reasons: a same-result update has nothing new for PACS
        if pacs_fp is not None and self.pacs.already_sent(study_key, pacs_fp):
            pacs_fp = None  # PACS has this result already (the study changed elsewhere)
        with self.store.transaction():
            if u.kind == "provisional":
                self.store.set_series(u.series_uid, verdict=u.verdict, announced=u.verdict.result, now=now)
            else:
                self.store.set_series(u.series_uid, verdict=u.verdict, state="complete",
                                      complete_reason=u.complete_reason, now=now)
            if changed:
                self.store.outbox_add(self.topics.verdict(study_key), compact_json(payload), self.cfg.mqtt.qos, True,
                                      expiry, now)
                if overlay is not None:
                    self.store.outbox_add(self.topics.overlay(study_key), compact_json(overlay), self.cfg.mqtt.qos,
                                          True, expiry, now)
                self.store.add_verdict(payload, now)
                self.store.set_study(study_uid, study_key, fp, sv.result, payload["state"], now)
            if pacs_fp is not None:  # committed with the verdict: a crash before the hand-over loses nothing
                self.pacs.queue(lead_row["series_uid"], payload, study_key, pacs_fp)
        if changed:
            self.stats.last_latency = timings["last_slice_to_verdict_s"] or timings["first_slice_to_verdict_s"]
            self.kick()
        if pacs_fp is not None:
            self.pacs.flush()
        ev, fo = sv.evidence, sv.focal
        held = ("" if changed else " unchanged, not re-published" if publish else
                f" not published: the study's final verdict ({prev['result']}) stands" if prev else "")
        log.info("verdict %s %s for study %s (series %s%s)%s%s", payload["state"], sv.result, study_key,
                 lead.series_key, f", {ev.quadrant} run {ev.run}" if ev else
                 f", one focal lesion {fo.quadrant} run {fo.run}" if fo else "",
                 f"; complete: {complete_reason}" if complete_reason else "", held)

    def after_final(self, prev: Any, sv: Any, study_key: str) -> tuple[bool, dict[str, Any] | None]:
        """(publish?, correction) for a study verdict. A study's final verdict is published once. After it, the
        study's verdicts (late slices, another series) go out only when a final result differs from the one
        published: as a correction naming what it replaces; or, with the same result, once when its grade gains
        what the study's later series show (`reader_notes`: prone images, a smoother series beside a noisy
        positive), as a correction saying so. Provisional states after a final, and finals that agree with it, are
        stored and not published (no provisional after a final, no second final)."""
        if prev is None or prev["state"] not in ("final", "corrected"):
            return True, None
        news = reader_notes(sv.grade) if sv.result == prev["result"] else []
        if sv.state != "final" or (sv.result == prev["result"] and not news):
            return False, None
        published = self.store.verdicts(study_key)
        last = published[-1] if published else {"result": prev["result"], "state": prev["state"], "created": None}
        if sv.result != prev["result"]:
            return True, msg.correction(last, sv.result)
        said = {note_kind(n) for n in reader_notes(last.get("grade"))}
        fresh = [n for n in news if note_kind(n) not in said]
        if not fresh:  # the same result, and the later series said nothing new
            return False, None
        # the news first: the tile shows the start of `what`
        return True, msg.correction(last, sv.result, f"{fresh[-1]} — images taken after the final verdict")


    def overlay_payload(self, row: Any, state: str, result: str, findings: list[SliceFinding],
                        lead: Evidence | None = None) -> dict[str, Any]:
        ks = key_slices(findings, lead=lead)
        png = index = size = None
        if ks and self.cfg.mqtt.key_images:
            index = int(ks[0]["index"])
            try:
                png, size = self.images.key_image(findings, index, result, state, max_size=OVERLAY_IMAGE_SIZE,
                                                  words=False)
            except Exception as e:  # noqa: BLE001 - the overlay goes out without an image
                log.warning("key image not rendered: %s: %s", type(e).__name__, e)
                png = None
        return msg.overlay_payload(device=self.cfg.device_id, study_key=row["study_key"], series_key=row["series_key"],
                                   state=state, slices=len(findings), key_slices=ks, image_png=png,
                                   image_index=index if png else None, image_size=size if png else None)

    def series_item(self, s: SeriesSummary) -> dict[str, Any]:
        """A study verdict's entry for one series. SeriesDescription is free text typed at the console (it can hold
        a name or an ID): it goes out only where the site sends patient labels."""
        d = s.as_dict()
        if not self.cfg.privacy.send_patient_labels:
            d.pop("description", None)
        return d
