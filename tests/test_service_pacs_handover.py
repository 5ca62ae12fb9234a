"""The PACS hand-over without a network: final verdicts waiting in the store go to the sender with their source
series and key image, stay (and are retried) while the PACS outbox cannot be written, and are dropped with a reason
when they can never be built."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.domain import Box, Rect, SliceFinding
from appliance.ingest.dicom_reader import read_slice
from appliance.ingest.spool import Spool
from appliance.phantom import PhantomSpec, write_phantom
from appliance.publish.pacs import KeyImage
from appliance.service.key_image import SourceImages
from appliance.service.pacs_handover import PACS_PENDING, PacsHandover, pacs_fingerprint
from appliance.store import Store

SERIES = "series-A"


class FakeSender:
    """What PacsHandover uses of appliance.publish.pacs.PacsSender."""

    destinations = ["PACS@127.0.0.1:104"]
    calling_aet = "CTRIAGE"
    send_key_images = True

    def __init__(self) -> None:
        self.submitted: list[tuple] = []
        self.fail: Exception | None = None
        self.last_error: str | None = None

    def submit(self, verdict, source, key_slices=None, key_image=None) -> None:
        if self.fail is not None:
            raise self.fail
        self.submitted.append((verdict, source, key_slices, key_image))

    def status(self) -> list[dict]:
        return [{"destination": self.destinations[0], "pending": 1 if self.last_error else 0,
                 "last_error": self.last_error}]


@pytest.fixture(scope="module")
def series_files(tmp_path_factory) -> list[Path]:
    return write_phantom(tmp_path_factory.mktemp("src"), PhantomSpec(slices=6, size=128, lesion=False))


@pytest.fixture
def handover(tmp_path, series_files):
    """A store holding one analysed series (its files in processed/ where the spool put them), slice 2 with boxes."""
    cfg = Config(device_id="ct-test", state_dir=str(tmp_path / "state"))
    cfg.state_path.mkdir(parents=True)
    cfg.pacs.retry_seconds = 30.0
    store = Store(cfg.state_path / "ctriage.db")
    spool = Spool(cfg.state_path)
    for i, src in enumerate(series_files):
        img = read_slice(src)
        dest = spool.processed_path(src.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
        boxes = [Box(Rect(40, 70, 60, 90), 300.0, 0.8, "lower-right")] if i == 2 else []
        f = SliceFinding(img.sop_uid, img.position, img.shape, Rect(10, 10, 118, 118), boxes)
        store.add_slice(img.sop_uid, SERIES, (float(i),), f)
        store.add_file(src.name, "analysed", ident=img.sop_uid, series_uid=SERIES, path=str(dest))
    h = PacsHandover(cfg, store, SourceImages(cfg, store, spool), sender=FakeSender())
    yield h
    store.close()


def waiting(h: PacsHandover, *results: str) -> None:
    """Verdicts committed for PACS (what Verdicts.on_update queues in its transaction)."""
    for r in results:
        h.queue(SERIES, {"state": "final", "result": r, "study_key": "study-key"}, "study-key", f"fp-{r}")


def test_flush_hands_each_waiting_verdict_with_its_source_and_key_image(handover, series_files):
    waiting(handover, "positive")
    assert len(handover.pending()) == 1 and handover.already_sent("study-key", "fp-positive")
    handover.flush()
    (verdict, source, ks, key_image), = handover.sender.submitted
    assert verdict["result"] == "positive" and handover.pending() == [] and handover.retry_at == 0.0
    assert len(source.instances) == len(series_files)  # in series order, headers only
    assert [k["index"] for k in ks] == [2]
    assert isinstance(key_image, KeyImage) and key_image.index == 2 and key_image.image[:8] == b"\x89PNG\r\n\x1a\n"
    assert handover.status() == {"calling_ae_title": "CTRIAGE", "queued": 0, "dropped": 0, "error": None,
                                 "destinations": handover.sender.status()}


def test_an_unwritable_outbox_keeps_the_verdicts_and_retries(handover, caplog):
    caplog.set_level(logging.INFO, logger="ctriage")
    handover.sender.fail = OSError(28, "No space left on device")
    waiting(handover, "positive")
    handover.flush()
    assert len(handover.pending()) == 1 and handover.retry_at > 0
    assert handover.problem() == "results cannot be queued for PACS: No space left on device"
    handover.retry_if_due()  # not due yet: nothing tried
    handover.sender.fail = None
    assert handover.sender.submitted == []
    handover.retry_at = 1.0  # due
    handover.retry_if_due()
    assert len(handover.sender.submitted) == 1 and handover.pending() == [] and handover.error is None
    assert handover.problem() is None and "PACS: results can be queued again" in caplog.text
    handover.sender.last_error = "association refused"
    assert handover.problem() == "results not delivered to PACS: PACS@127.0.0.1:104: association refused (1 waiting)"


def test_a_verdict_whose_files_are_gone_is_dropped_with_the_reason(handover, caplog):
    gone = Path(handover.store.file_path(handover.store.series_slices(SERIES)[0][2]))
    gone.unlink()
    waiting(handover, "negative")
    handover.flush()
    assert handover.pending() == [] and handover.dropped == 1 and handover.sender.submitted == []
    assert "1 of 6 source file(s) are no longer on disk" in caplog.text


def test_a_damaged_waiting_list_is_replaced_and_resume_without_a_sender_warns(handover, caplog):
    handover.store.kv_set(PACS_PENDING, "{not json")
    assert handover.pending() == []
    assert "damaged" in caplog.text
    handover.store.kv_set(PACS_PENDING, json.dumps([{"series_uid": SERIES, "verdict": {}}]))
    handover.sender = None
    handover.resume()
    assert "1 final verdict(s) wait for PACS, but no [pacs] destinations are configured" in caplog.text
    assert not handover.enabled and handover.status() is None and handover.problem() is None


def test_pacs_fingerprint_is_what_pacs_sees():
    p = {"series_key": "s", "state": "final", "result": "positive", "evidence": None, "counts": {"slices": 3},
         "bundles": [], "reason": None, "series": [{"series_key": "s"}], "created": "t1", "timings": {}}
    assert pacs_fingerprint(p) == pacs_fingerprint({**p, "series": [], "created": "t2", "timings": {"x": 1}})
    assert pacs_fingerprint(p) != pacs_fingerprint({**p, "result": "negative"})
