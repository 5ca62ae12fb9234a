"""Results to PACS: the SR and key image as built, and delivered by C-STORE to dcmtk's storescp (a PACS we did not
write), through the durable outbox — including PACS down, an appliance restart, and PACS refusing an instance."""
from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, CTImageStorage

from appliance.domain import Box, Rect, SliceFinding
from appliance.ingest.dicom_reader import Rejected, read_slice, to_display
from appliance.phantom import PhantomSpec, write_phantom
from appliance.publish.overlays import render, slice_grey
from appliance.publish.dicom_peer import Destination, DicomNetworkError, associate
from appliance.publish.pacs import KeyImage, PacsSender
from appliance.publish.sr import (NOT_FOR_DIAGNOSIS, SourceInstance, SourceSeries, build_key_image, build_sr,
                                  display_box_to_stored)

from .test_dicom_scp import dcmtk, free_port

BUNDLES = [{"name": "valid-area", "version": "1.0.3", "sha256": "ab" * 32},
           {"name": "lesion", "version": "1.2.0", "sha256": "cd" * 32}]


def _verdict(result="positive", state="final"):
    return {"schema": "ctriage.verdict/1", "device": "ct-room-2", "study_key": "9f3a61c2d07e4b18",
            "series_key": "0123456789abcdef", "state": state, "result": result, "reason": None,
            "evidence": {"quadrant": "upper-right", "first_slice": 1, "last_slice": 4, "run": 4}
            if result == "positive" else None,
            "counts": {"slices": 6, "lung_slices": 5, "lesion_slices": 4, "rejected": 0, "gaps": 0},
            "bundles": BUNDLES, "backend": "openvino", "device_type": "CPU", "created": "2026-11-27T12:00:00Z"}


KEY_SLICES = [{"index": 2, "score": 0.91, "quadrants": ["upper-right"],
               "boxes": [{"box": [0.25, 0.6, 0.45, 0.8], "quadrant": "upper-right", "score": 0.91}]},
              {"index": 3, "score": 0.8, "quadrants": ["upper-right"],
               "boxes": [{"box": [0.3, 0.62, 0.4, 0.75], "quadrant": "upper-right", "score": 0.8}]}]


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    return write_phantom(tmp_path_factory.mktemp("src"), PhantomSpec(slices=6, size=96))


@pytest.fixture(scope="module")
def source(series) -> SourceSeries:
    return SourceSeries.from_files(series)


@pytest.fixture(scope="module")
def key_image(series) -> KeyImage:
    img = read_slice(series[2])
    h, w = img.hu.shape
    box = Box(Rect(int(0.25 * h), int(0.6 * w), int(0.45 * h), int(0.8 * w)), 300.0, 0.91, "upper-right")
    finding = SliceFinding(key=img.key, position=img.position, shape=(h, w), lung=Rect(10, 10, h - 10, w - 10),
                           boxes=[box])
    return KeyImage(2, render(slice_grey(img.hu, None), finding, title="POSITIVE upper-right"))


class StoreSCP:
    """dcmtk's storescp in a temp folder on a free port (a stand-in PACS), stopped by the test."""

    def __init__(self, out: Path, port: int, aet: str = "PACS") -> None:
        self.out, self.port, self.aet = out, port, aet
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([dcmtk("storescp"), "-aet", self.aet, "-od", str(self.out), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()
                time.sleep(0.05)
        raise AssertionError("storescp did not start listening")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path):
    scp = StoreSCP(tmp_path / "pacs", free_port())
    yield scp
    scp.stop()


# -- destinations -------------------------------------------------------------------------------------------------

def test_destination_parsing():
    d = Destination.parse("PACS_MAIN@10.1.2.3:104")
    assert (d.ae_title, d.host, d.port) == ("PACS_MAIN", "10.1.2.3", 104)
    assert str(Destination.parse("ARCH@[fd00::5]:11112")) == "ARCH@[fd00::5]:11112"
    assert Destination.parse("ARCH@[fd00::5]:11112").host == "fd00::5"
    assert Destination.parse("A@pacs.example.org:4242").host == "pacs.example.org"
    for bad in ("PACS@host", "@host:104", "PACS", "PACS@host:0", "PACS@host:70000", "A" * 17 + "@h:1", "P@h:1:2"):
        with pytest.raises(ValueError, match="AET@host:port"):
            Destination.parse(bad)


# -- SR and key image ---------------------------------------------------------------------------------------------

def content_items(sr) -> list:
    """Every content item of an SR, depth first."""
    flat: list = []

    def walk(items):
        for it in items:
            flat.append(it)
            walk(it.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return flat


def test_sr_joins_the_source_study_and_carries_the_verdict(source, series):
    sr = build_sr(_verdict(), source, KEY_SLICES, device_id="ct-room-2")
    src = pydicom.dcmread(series[0], stop_before_pixels=True)
    for k in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
        assert sr[k].value == src[k].value, k
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sr.Modality == "SR"
    assert sr.CompletionFlag == "COMPLETE" and sr.PreliminaryFlag == "FINAL"
    refs = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
            for i in s.ReferencedSeriesSequence[0].ReferencedSOPSequence}
    assert refs == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series}

    flat = content_items(sr)
    coded = {it.ConceptNameCodeSequence[0].CodeMeaning: it.ConceptCodeSequence[0] for it in flat
             if it.ValueType == "CODE"}
    assert coded["COVID-19 pneumonia triage result"].CodeValue == codes.SCT.Positive.value
    assert coded["Verdict state"].CodeValue == "FINAL"
    assert coded["Quadrant of the evidence run"].CodeValue == "UR"
    texts = {(it.ConceptNameCodeSequence[0].CodeMeaning, it.TextValue) for it in flat if it.ValueType == "TEXT"}
    assert ("Algorithm Name", "lesion") in texts and ("Algorithm Version", "1.2.0") in texts
    assert any(v.startswith("model lesion 1.2.0 sha256:" + "cd" * 32) for _, v in texts)
    scoords = [it for it in flat if it.ValueType == "SCOORD"]
    assert len(scoords) == 2
    slice3 = str(pydicom.dcmread(series[2], stop_before_pixels=True).SOPInstanceUID)
    first = scoords[0]  # best score first: key slice index 2
    assert first.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == slice3
    pts = np.asarray(first.GraphicData, dtype=float).reshape(-1, 2)
    assert np.allclose(pts[0], [0.6 * 96, 0.25 * 96], atol=0.01)  # (column, row), identity orientation
    assert np.allclose(pts[0], pts[-1])  # closed polyline


def test_a_focal_negative_names_its_lesion_in_the_sr(source, series):
    v = _verdict("negative") | {"focal": {"quadrant": "lower-right", "first_slice": 1, "last_slice": 4, "run": 4},
                                "reason": "a single focal lesion (lower-right, slices 2–5): …"}
    v["counts"]["foci"] = 1
    sr = build_sr(v, source, KEY_SLICES)
    flat = content_items(sr)
    coded = {it.ConceptNameCodeSequence[0].CodeMeaning: it.ConceptCodeSequence[0].CodeValue for it in flat
             if it.ValueType == "CODE"}
    nums = {it.ConceptNameCodeSequence[0].CodeValue: float(it.MeasuredValueSequence[0].NumericValue) for it in flat
            if it.ValueType == "NUM"}
    assert coded["COVID-19 pneumonia triage result"] == codes.SCT.Negative.value
    assert coded["Quadrant of a single focal lesion (not the COVID-19 pattern)"] == "LR"
    assert "Quadrant of the evidence run" not in coded
    assert (nums["FOCAL-RUN"], nums["FOCAL-FIRST"], nums["FOCAL-LAST"], nums["FOCI"]) == (4, 2, 5, 1)
    assert "RUN-LENGTH" not in nums
    refs = {it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for it in flat if it.ValueType == "IMAGE"}
    assert str(pydicom.dcmread(series[1], stop_before_pixels=True).SOPInstanceUID) in refs  # the focus's slices


def test_the_sr_carries_the_pattern_grade_and_names_solid_lesions(source, series):
    v = _verdict() | {"schema": "ctriage.verdict/2",
                      "grade": {"category": "typical", "reasons": ["bilateral"], "severity": 7,
                                "extent": {"right": 3.0, "left": 2.0, "total": 2.5}},
                      "others": [{"kind": "nodule", "diameter_mm": 12.5, "first_slice": 3, "last_slice": 5,
                                  "quadrant": "upper-left", "zone": "upper", "text": "solid nodule 12 mm, …"}]}
    flat = content_items(build_sr(v, source, KEY_SLICES))
    coded = {it.ConceptNameCodeSequence[0].value: it.ConceptCodeSequence[0].value for it in flat
             if it.ValueType == "CODE"}
    nums = {it.ConceptNameCodeSequence[0].CodeValue: float(it.MeasuredValueSequence[0].NumericValue) for it in flat
            if it.ValueType == "NUM"}
    assert coded["PATTERN"] == "TYPICAL" and nums["SEVERITY"] == 7 and nums["EXTENT"] == 2.5
    assert nums["SOLID-DIAMETER"] == 12.5
    assert any(it.ValueType == "CODE" and it.ConceptCodeSequence[0].meaning == "Nodule" for it in flat)
    # a negative carries no pattern grade even when one was measured
    neg = _verdict("negative") | {"grade": v["grade"], "others": []}
    assert "PATTERN" not in {it.ConceptNameCodeSequence[0].value for it in content_items(build_sr(neg, source))}


def test_the_sr_gives_the_series_noise_and_says_when_the_scan_is_noisy(source):
    def read(acq):
        flat = content_items(build_sr(_verdict("negative") | {"acquisition": acq}, source))
        coded = {it.ConceptNameCodeSequence[0].value: it.ConceptCodeSequence[0].value for it in flat
                 if it.ValueType == "CODE"}
        nums = {it.ConceptNameCodeSequence[0].CodeValue: float(it.MeasuredValueSequence[0].NumericValue)
                for it in flat if it.ValueType == "NUM"}
        return coded, nums

    acq = {"noise": 0.0205, "noisy": True, "limit": 0.016, "smoothed_slices": 49, "slices_measured": 49}
    coded, nums = read(acq)
    assert nums["IMAGE-NOISE"] == pytest.approx(0.0205) and coded["ACQUISITION"] == "NOISY-SCAN"
    coded, nums = read(acq | {"noise": 0.008, "noisy": False})
    assert nums["IMAGE-NOISE"] == pytest.approx(0.008) and "ACQUISITION" not in coded
    coded, nums = read(None)  # crop images, older appliances: nothing said
    assert "IMAGE-NOISE" not in nums and "ACQUISITION" not in coded


def test_provisional_negative_sr(source):
    sr = build_sr(_verdict("negative", "provisional"), source)
    assert sr.CompletionFlag == "PARTIAL" and sr.PreliminaryFlag == "PRELIMINARY"


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, -1, 0), (0, 1, 0, 1, 0, 0), (0, -1, 0, -1, 0, 0)],
                         ids=["standard", "flipped", "transposed", "transposed-flipped"])
def test_boxes_map_back_into_the_stored_pixel_grid(iop):
    rows, cols = 40, 60
    stored = np.zeros((rows, cols), np.int16)
    disp = to_display(stored, list(iop))
    h, w = disp.shape
    y0, x0, y1, x1 = 5, 7, 12, 20  # a box in display pixels
    marked = np.zeros_like(disp)
    marked[y0:y1, x0:x1] = 1
    # the stored image that displays as `marked`: apply the display transform to an index grid and invert it
    idx = np.arange(rows * cols).reshape(rows, cols)
    didx = to_display(idx, list(iop))
    back = np.zeros(rows * cols, np.int16)
    back[didx.ravel()] = marked.ravel()
    back = back.reshape(rows, cols)
    pts = display_box_to_stored([y0 / h, x0 / w, y1 / h, x1 / w], SourceInstance("1.2", "1.2.3", rows, cols, iop))
    c0, r0 = pts[:, 0].min(), pts[:, 1].min()
    c1, r1 = pts[:, 0].max(), pts[:, 1].max()
    ys, xs = np.nonzero(back)
    assert (r0, c0, r1, c1) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)


def test_key_image_is_a_marked_secondary_capture(source, key_image, tmp_path, series):
    sc = build_key_image(key_image.image, source, key_image.index, _verdict(), device_id="ct-room-2")
    assert sc.BurnedInAnnotation == "YES" and NOT_FOR_DIAGNOSIS in sc.ImageComments
    assert sc.StudyInstanceUID == source.study_uid and sc.PatientID == source.header.PatientID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.instances[2].sop_instance_uid
    px = sc.pixel_array
    original = np.asarray(key_image.image.convert("RGB"))
    band = px.shape[0] - original.shape[0]
    assert band > 10 and px.shape[1:] == original.shape[1:]
    assert np.array_equal(px[band:], original)  # the rendered key image, whole, below the banner
    assert (px[:band] == [255, 255, 0]).all(axis=-1).any()  # yellow banner text burned in above it
    p = tmp_path / "sc.dcm"
    sc.save_as(p, enforce_file_format=True)
    with pytest.raises(Rejected, match="secondary capture"):
        read_slice(p)  # the appliance never analyses its own output


def test_source_series_round_trips_through_json(source, series):
    again = SourceSeries.from_dict(json.loads(json.dumps(source.as_dict())))
    assert again.instances == source.instances and again.study_uid == source.study_uid
    assert again.header.PatientName == source.header.PatientName
    # collected slice by slice at ingest (what a daemon keeps before the spool files go)
    header = SourceSeries.header_of(pydicom.dcmread(series[0], stop_before_pixels=True))
    rows = [json.loads(json.dumps(SourceInstance.from_file(p).as_list())) for p in series]
    piecewise = SourceSeries(Dataset.from_json(json.dumps(header.to_json_dict())), [SourceInstance(*r) for r in rows])
    assert piecewise.instances == source.instances and piecewise.header == source.header


# -- delivery -----------------------------------------------------------------------------------------------------

def test_sr_and_key_image_reach_dcmtk_storescp_and_dsrdump_reads_the_models(tmp_path, storescp, source, key_image):
    storescp.start()
    sender = PacsSender([Destination("PACS", "127.0.0.1", storescp.port)], tmp_path / "outbox",
                        calling_aet="CTRIAGE", device_id="ct-room-2", retry_seconds=0.2)
    with sender:
        uids = sender.submit(_verdict(), source, KEY_SLICES, key_image)
        assert len(uids) == 2
        assert sender.wait_empty(30), sender.status()
    files = storescp.files()
    assert len(files) == 2
    got = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    assert set(got) == set(uids)
    sr_file = next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SR")
    r = subprocess.run([dcmtk("dsrdump"), str(sr_file)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert 'Algorithm Name")="lesion"' in r.stdout and 'Algorithm Version")="1.2.0"' in r.stdout
    assert '(10828004,SCT,"Positive")' in r.stdout and "SCOORD" in r.stdout
    assert "PHANTOM^SYNTHETIC" in r.stdout  # filed under the source patient
    sc_file = next(f for f in files if f != sr_file)
    r = subprocess.run([dcmtk("dcmdump"), str(sc_file)], capture_output=True, text=True, timeout=30)
    assert "NOT FOR DIAGNOSTIC USE" in r.stdout and "BurnedInAnnotation" in r.stdout
    assert sender.status()[0]["delivered"] == 2


def test_pacs_down_then_up_across_a_restart(tmp_path, storescp, source):
    dest = Destination("PACS", "127.0.0.1", storescp.port)  # nothing listens there yet
    first = PacsSender([dest], tmp_path / "outbox", retry_seconds=0.2, max_retry_seconds=0.5, timeout=5)
    with first:
        (uid,) = first.submit(_verdict(), source, KEY_SLICES)
        deadline = time.monotonic() + 15
        while not first.status()[0]["last_error"] and time.monotonic() < deadline:
            time.sleep(0.05)
        st = first.status()[0]
        assert st["pending"] == 1 and "cannot connect" in st["last_error"], st
    # the appliance restarts; the SR waits on disk
    assert len(list((tmp_path / "outbox").rglob("*.dcm"))) == 1
    second = PacsSender([dest], tmp_path / "outbox", retry_seconds=0.2, max_retry_seconds=0.5, timeout=5)
    with second:
        time.sleep(0.5)
        assert second.pending() == {str(dest): 1}
        storescp.start()
        assert second.wait_empty(30), second.status()
    (f,) = storescp.files()
    assert str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) == uid


def _pacs_ae(handler=None, sop_classes=(ComprehensiveSRStorage,)):
    ae = AE(ae_title="PACS")
    for s in sop_classes:
        ae.add_supported_context(s)
    handlers = [(evt.EVT_C_STORE, handler)] if handler else []
    port = free_port()
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers), port


def test_an_instance_refused_for_good_moves_to_failed(tmp_path, source):
    server, port = _pacs_ae(sop_classes=(CTImageStorage,))  # a PACS that takes no SR
    try:
        dest = Destination("PACS", "127.0.0.1", port)
        with PacsSender([dest], tmp_path / "outbox", retry_seconds=0.2) as sender:
            sender.submit(_verdict(), source)
            assert sender.wait_empty(20)
            st = sender.status()[0]
        assert st["failed"] == 1 and st["delivered"] == 0
        (reason,) = (tmp_path / "outbox").rglob("*.reason.txt")
        assert "not accepted" in reason.read_text()
    finally:
        server.shutdown()


def test_out_of_resources_is_retried(tmp_path, source):
    answers = [0xA700, 0x0000]

    def on_store(event):
        return answers.pop(0) if answers else 0x0000

    server, port = _pacs_ae(on_store)
    try:
        with PacsSender([Destination("PACS", "127.0.0.1", port)], tmp_path / "outbox", retry_seconds=0.2) as sender:
            sender.submit(_verdict(), source)
            assert sender.wait_empty(20), sender.status()
            assert sender.status()[0]["delivered"] == 1 and answers == []
    finally:
        server.shutdown()


def test_rejected_association_names_the_reason(tmp_path):
    ae = AE(ae_title="PACS")
    ae.add_supported_context(ComprehensiveSRStorage)
    ae.require_calling_aet = ["FRIEND"]
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        with pytest.raises(DicomNetworkError, match="Calling AE title not recognised|Calling AE Title"):
            associate(Destination("PACS", "127.0.0.1", port), "STRANGER",
                      [(ComprehensiveSRStorage, ["1.2.840.10008.1.2.1"])], 5)
    finally:
        server.shutdown()


def test_no_destinations_sends_nothing(tmp_path, source):
    sender = PacsSender([], tmp_path / "outbox")
    assert not sender.enabled and sender.submit(_verdict(), source) == []
    assert not (tmp_path / "outbox").exists()


def test_submitting_the_same_verdict_twice_queues_it_once(tmp_path, source):
    sender = PacsSender([Destination("PACS", "127.0.0.1", 104)], tmp_path / "outbox", device_id="ct-room-2")
    a = sender.submit(_verdict(), source, KEY_SLICES)
    b = sender.submit(_verdict(), source, KEY_SLICES)  # e.g. re-submitted after a restart
    assert a == b and len(sender.outbox.jobs()) == 1
    later = dict(_verdict(), created="2026-11-27T12:05:00Z")
    assert sender.submit(later, source) != a  # a new verdict is a new instance
    assert sender.build_pending() == 2 and sender.pending() == {"PACS@127.0.0.1:104": 2}
    assert sender.outbox.jobs() == []


def test_a_result_that_cannot_be_built_is_set_aside(tmp_path, source):
    sender = PacsSender([Destination("PACS", "127.0.0.1", 104)], tmp_path / "outbox")
    sender.submit(dict(_verdict(), result="maybe"), source)
    sender.submit(_verdict(), source)
    assert sender.build_pending() == 1 and sender.pending() == {"PACS@127.0.0.1:104": 1}
    (reason,) = (tmp_path / "outbox").rglob("*.reason.txt")
    assert "unknown result" in reason.read_text()


def test_sender_from_config(tmp_path):
    from appliance.config import from_dict

    cfg = from_dict({"state_dir": str(tmp_path), "dicom": {"ae_title": "CT_AI"},
                     "pacs": {"destinations": ["PACS@10.0.0.5:104"], "retry_seconds": 5, "max_retry_seconds": 60}})
    s = PacsSender.from_config(cfg)
    assert s.destinations == [Destination("PACS", "10.0.0.5", 104)] and s.calling_aet == "CT_AI"
    assert s.outbox.root == tmp_path / "pacs-outbox" and (s.retry_seconds, s.max_retry_seconds) == (5, 60)
    assert PacsSender.from_config(cfg, ["ARCH@[::1]:11112"]).destinations == [Destination("ARCH", "::1", 11112)]
