"""Verdict assembly without a broker: tracker updates → study verdict payloads in a real store's outbox, one final
per study then corrections only, the overlay's key slices, and the hand-over of final verdicts to PACS."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from appliance.config import Config
from appliance.domain import Box, Evidence, Rect, SeriesVerdict, SliceFinding
from appliance.ingest.spool import Spool
from appliance.pipeline.tracker import Update
from appliance.publish import messages as msg
from appliance.service import compact_json
from appliance.service.key_image import SourceImages
from appliance.service.pacs_handover import PACS_SENT, PacsHandover
from appliance.service.stats import Stats
from appliance.service.verdicts import Verdicts, fingerprint
from appliance.store import Store

STUDY = "1.2.3.4"
ANALYZER = SimpleNamespace(bundles=[{"name": "lesion", "version": "0.0.1"}], backend="onnxruntime", device="CPU")


class Parts(SimpleNamespace):
    def outbox(self) -> list:
        out, after = [], 0
        while (m := self.store.outbox_next(after)) is not None:
            out.append(m)
            after = m.id
        return out

    def published(self) -> list[dict]:
        return [json.loads(m.payload) for m in self.outbox() if "/verdict/" in m.topic]


@pytest.fixture
def parts(tmp_path):
    cfg = Config(device_id="ct-test", state_dir=str(tmp_path / "state"))
    cfg.state_path.mkdir(parents=True)
    store = Store(cfg.state_path / "ctriage.db")
    spool = Spool(cfg.state_path)
    images = SourceImages(cfg, store, spool)
    pacs = PacsHandover(cfg, store, images)
    kicks: list[int] = []
    stats = Stats()
    v = Verdicts(cfg, store, msg.Topics(cfg.mqtt.prefix, cfg.device_id), lambda: ANALYZER, images, pacs, stats,
                 kick=lambda: kicks.append(1))
    yield Parts(cfg=cfg, store=store, pacs=pacs, verdicts=v, kicks=kicks, stats=stats)
    store.close()


def finding(i: int, boxes: int = 0, score: float = 0.9) -> SliceFinding:
    bs = [Box(Rect(100 + 10 * k, 300, 120 + 10 * k, 330), 200.0, score - 0.01 * k, "lower-right") for k in range(boxes)]
    return SliceFinding(f"sop.{i}", float(i), (512, 512), Rect(50, 50, 450, 450), bs, timings_ms={"lesion": 2.0})


def store_series(store: Store, uid: str, n: int, lesions: range = range(0), *, description: str = "",
                 now: float = 1000.0) -> None:
    store.series_seen(uid, STUDY, f"key-{uid}", "study-key", description=description, now=now)
    for i in range(n):
        store.add_slice(f"{uid}.{i}", uid, (float(i),), finding(i, 2 if i in lesions else 0, 0.5 + 0.01 * i), now)


def verdict(result: str, state: str, n: int = 10, run: int = 0) -> SeriesVerdict:
    ev = Evidence("lower-right", 3, 3 + run - 1, run) if run else None
    return SeriesVerdict(result, state, ev, n, n, run, foci=2 if run else 0)  # type: ignore[arg-type]


def test_provisional_then_final_each_published_once_with_overlay(parts, caplog):
    store, v = parts.store, parts.verdicts
    store_series(store, "A", 10, range(3, 7))
    v.on_update(Update("A", "provisional", verdict("positive", "provisional", run=4)), 1001.0)
    out = parts.outbox()
    assert [m.topic for m in out] == ["ctriage/ct-test/verdict/study-key", "ctriage/ct-test/overlay/study-key"]
    assert all(m.retain for m in out) and parts.kicks == [1]
    first = json.loads(out[0].payload)
    assert out[0].payload == compact_json(first)
    assert (first["state"], first["result"], first["series_key"]) == ("provisional", "positive", "key-A")
    assert first["bundles"] == ANALYZER.bundles and first["complete_reason"] is None
    assert first["timings"]["first_slice_to_verdict_s"] == 1.0 and first["timings"]["ms_per_slice"] == 2.0
    overlay = json.loads(out[1].payload)
    # key slices: the slices with boxes, best score first; no image (the source files are not on disk)
    assert [k["index"] for k in overlay["key_slices"]] == [6, 5, 4, 3] and overlay["image"] is None
    assert store.series("A")["announced"] == "positive" and store.study(STUDY)["state"] == "provisional"
    # the same provisional verdict again (times differ): same fingerprint, not re-published
    caplog.set_level(logging.INFO, logger="ctriage")
    v.on_update(Update("A", "provisional", verdict("positive", "provisional", run=4)), 1001.5)
    assert len(parts.outbox()) == 2 and "unchanged, not re-published" in caplog.text

    v.on_update(Update("A", "final", verdict("positive", "final", run=4), "expected count: 10 of 10"), 1002.0)
    final = parts.published()[-1]
    assert (final["state"], final["complete_reason"]) == ("final", "expected count: 10 of 10")
    assert store.series("A")["state"] == "complete" and store.study(STUDY)["fingerprint"] == fingerprint(final)
    assert parts.stats.last_latency == final["timings"]["last_slice_to_verdict_s"]

    # the series again (a late slice reopened it): the study has its final, nothing more is published
    n = len(parts.outbox())
    v.on_update(Update("A", "final", verdict("positive", "final", run=4), "quiet"), 1010.0)
    assert len(parts.outbox()) == n and len(store.verdicts("study-key")) == 2
    assert "not published: the study's final verdict (positive) stands" in caplog.text


def test_one_final_per_study_then_only_a_differing_final_as_a_correction(parts, caplog):
    store, v = parts.store, parts.verdicts
    caplog.set_level(logging.INFO, logger="ctriage")
    store_series(store, "A", 10)
    v.on_update(Update("A", "final", verdict("negative", "final"), "quiet"), 1001.0)
    (neg,) = parts.published()
    assert (neg["state"], neg["result"]) == ("final", "negative")

    # a late series of the same study turns positive mid-way: stored, not published (no provisional after a final)
    store_series(store, "B", 12, range(4, 9), now=1005.0)
    v.on_update(Update("B", "provisional", verdict("positive", "provisional", 12, run=5)), 1006.0)
    assert len(parts.published()) == 1
    assert "not published: the study's final verdict (negative) stands" in caplog.text
    assert json.loads(store.series("B")["verdict"])["result"] == "positive"

    # ... and its final differs from the published final: one correction naming what it replaces
    v.on_update(Update("B", "final", verdict("positive", "final", 12, run=5), "quiet"), 1007.0)
    fixed = parts.published()[-1]
    assert (fixed["state"], fixed["result"], fixed["series_key"]) == ("corrected", "positive", "key-B")
    c = fixed["correction"]
    assert (c["previous_result"], c["previous_state"], c["previous_created"]) == ("negative", "final", neg["created"])
    assert sorted(s["result"] for s in fixed["series"]) == ["negative", "positive"]
    assert store.study(STUDY)["state"] == "corrected"

    # a third series that agrees with the correction: nothing more
    store_series(store, "C", 10, range(2, 6), now=1008.0)
    v.on_update(Update("C", "final", verdict("positive", "final", run=4), "quiet"), 1009.0)
    assert [(p["state"], p["result"]) for p in parts.published()] == [("final", "negative"), ("corrected", "positive")]


def test_after_final_rule(parts):
    v = parts.verdicts
    final_neg = {"state": "final", "result": "negative"}
    assert v.after_final(None, verdict("positive", "provisional"), "k") == (True, None)
    assert v.after_final({"state": "provisional", "result": "negative"}, verdict("positive", "final"), "k") == \
        (True, None)
    assert v.after_final(final_neg, verdict("positive", "provisional"), "k") == (False, None)
    assert v.after_final(final_neg, verdict("negative", "final"), "k") == (False, None)
    publish, correction = v.after_final(final_neg, verdict("positive", "final"), "k")
    assert publish and correction["previous_result"] == "negative" and correction["previous_created"] is None
    corrected = {"state": "corrected", "result": "positive"}
    assert v.after_final(corrected, verdict("positive", "final"), "k") == (False, None)
    assert v.after_final(corrected, verdict("negative", "final"), "k")[0] is True


def test_fingerprint_ignores_times_only():
    p = {"state": "final", "result": "positive", "created": "a", "timings": {"x": 1}}
    assert fingerprint(p) == fingerprint({**p, "created": "b", "timings": {"x": 2}})
    assert fingerprint(p) != fingerprint({**p, "result": "negative"})


def test_series_descriptions_go_out_only_with_patient_labels(parts):
    store_series(parts.store, "A", 10, description="Thorax 1.0 B70f")
    parts.verdicts.on_update(Update("A", "final", verdict("negative", "final"), "quiet"), 1001.0)
    assert "description" not in parts.published()[-1]["series"][0]
    parts.cfg.privacy.send_patient_labels = True
    store_series(parts.store, "B", 10, description="Lung 1.0", now=1002.0)
    parts.verdicts.on_update(Update("B", "final", verdict("positive", "final", run=3), "quiet"), 1003.0)
    assert {s.get("description") for s in parts.published()[-1]["series"]} == {"Thorax 1.0 B70f", "Lung 1.0"}


def test_a_final_verdict_is_queued_for_pacs_in_its_transaction_once(parts):
    store, v, pacs = parts.store, parts.verdicts, parts.pacs
    pacs.sender = SimpleNamespace(destinations=["PACS@host:104"], send_key_images=False)  # enabled
    flushed: list[int] = []
    pacs.flush = lambda: flushed.append(len(pacs.pending()))  # keep the list as the verdict left it
    store_series(store, "A", 10, range(3, 7))
    v.on_update(Update("A", "provisional", verdict("positive", "provisional", run=4)), 1001.0)
    assert pacs.pending() == [] and flushed == []  # provisional verdicts do not go to PACS
    v.on_update(Update("A", "final", verdict("positive", "final", run=4), "quiet"), 1002.0)
    (entry,) = pacs.pending()
    assert entry["series_uid"] == "A" and entry["verdict"] == parts.published()[-1] and flushed == [1]
    assert store.kv_get(PACS_SENT + "study-key")
    # another series that does not change the study's result: nothing published, nothing more for PACS
    store_series(store, "B", 10, now=1003.0)
    v.on_update(Update("B", "final", verdict("negative", "final"), "quiet"), 1004.0)
    assert len(pacs.pending()) == 1 and flushed == [1]


def test_prone_images_after_a_positive_final_go_out_once_as_an_update_of_the_same_result(parts, caplog):
    """A supine positive advising prone images is final; the prone series arrives later (repositioning takes
    minutes): what it shows is published once, as a correction with the same result saying so; a repeat is not."""
    from appliance.pipeline.case_logic import PRONE_CLEAR
    from appliance.pipeline.grading import DEPENDENT_ADVICE

    store, v, pacs = parts.store, parts.verdicts, parts.pacs
    pacs.sender = SimpleNamespace(destinations=["PACS@host:104"], send_key_images=False)  # enabled
    pacs.flush = lambda: None
    caplog.set_level(logging.INFO, logger="ctriage")
    advice = f"posterior 84 % ({DEPENDENT_ADVICE})"

    def graded(result: str, n: int, run: int, position: str, reasons: list[str]) -> SeriesVerdict:
        sv = verdict(result, "final", n, run)
        sv.grade, sv.patient_position = {"category": "typical", "reasons": reasons}, position
        return sv

    store_series(store, "S", 10, range(3, 7))
    v.on_update(Update("S", "final", graded("positive", 10, 4, "HFS", ["bilateral", advice]), "quiet"), 1001.0)
    (final,) = parts.published()
    assert final["state"] == "final" and final["grade"]["reasons"] == ["bilateral", advice]

    store_series(store, "P", 8, now=1100.0)  # prone images, no lesion run
    v.on_update(Update("P", "final", graded("indeterminate", 8, 0, "HFP", []), "quiet"), 1101.0)
    upd = parts.published()[-1]
    assert (upd["state"], upd["result"], upd["series_key"]) == ("corrected", "positive", "key-S")
    assert upd["grade"]["reasons"] == ["bilateral", advice, PRONE_CLEAR]
    c = upd["correction"]
    assert c["previous_result"] == "positive" and c["previous_created"] == final["created"]
    assert c["what"] == f"{PRONE_CLEAR} — images taken after the final verdict"
    assert len(pacs.pending()) == 1  # the final's SR only: the SR carries no reasons, the update adds nothing there
    # the same again (a late prone slice): nothing new to say
    v.on_update(Update("P", "final", graded("indeterminate", 9, 0, "HFP", []), "quiet"), 1102.0)
    assert len(parts.published()) == 2
    assert "not published: the study's final verdict (positive) stands" in caplog.text


def test_a_smoother_negative_series_after_a_noisy_positive_final_goes_out_once_as_an_update(parts):
    """The thin lung-kernel series is positive and final; the soft-kernel series of the same scan arrives later and
    is negative: the study stays positive and says, once, that only the noisy series is; a later change of the
    figures alone is not news."""
    from appliance.pipeline.case_logic import NOISY_ONLY

    store, v = parts.store, parts.verdicts

    def measured(result: str, n: int, run: int, noise: float, noisy: bool) -> SeriesVerdict:
        sv = verdict(result, "final", n, run)
        sv.grade, sv.patient_position = {"category": "typical", "reasons": ["bilateral"]}, "HFS"
        sv.acquisition = {"noise": noise, "noisy": noisy, "limit": 0.016, "smoothed_slices": n,
                          "slices_measured": n, "flat_boxes": 0}
        return sv

    store_series(store, "N", 10, range(3, 7))
    v.on_update(Update("N", "final", measured("positive", 10, 4, 0.034, True), "quiet"), 1001.0)
    (final,) = parts.published()
    assert final["grade"]["reasons"] == ["bilateral"]

    store_series(store, "Q", 10, now=1100.0)
    v.on_update(Update("Q", "final", measured("negative", 10, 0, 0.009, False), "quiet"), 1101.0)
    upd = parts.published()[-1]
    assert (upd["state"], upd["result"], upd["series_key"]) == ("corrected", "positive", "key-N")
    assert upd["grade"]["reasons"][0].startswith(NOISY_ONLY) and upd["grade"]["reasons"][1:] == ["bilateral"]
    assert upd["correction"]["what"].startswith(NOISY_ONLY) and upd["correction"]["what"].endswith(
        "— images taken after the final verdict")
    # the smoother series re-analysed with another figure: the same news, not published again
    v.on_update(Update("Q", "final", measured("negative", 11, 0, 0.010, False), "quiet"), 1102.0)
    assert len(parts.published()) == 2
