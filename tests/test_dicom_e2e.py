"""DICOM in and out, end to end, with peers we did not write: dcmtk's storescu sends a series to the appliance's DICOM
node, mosquitto carries the verdict, dcmtk's storescp stands in for PACS and dsrdump reads the SR it received.

The shipped model bundles run on the 512² lesion phantom. What is asserted of the models: the DICOM path and the
watch-folder path give the same verdict, and it is positive (the phantom's lesion is large and runs over ~10 slices).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from appliance.config import Config
from appliance.daemon import Daemon
from appliance.phantom import PhantomSpec, write_phantom

from .test_daemon import check_messages, drop, verdicts, wait
from .test_dicom_scp import dcmtk, free_port
from .test_mqtt import Collector
from .test_pacs import StoreSCP

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = "CT_CONSOLE"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR


# -- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    """The committed bundles, loaded once for every daemon of this module."""
    from appliance.config import AnalysisConfig
    from appliance.inference.bundle import BundleError
    from appliance.pipeline.analyzer import Analyzer

    try:
        return Analyzer.load(AnalysisConfig())
    except BundleError as e:
        print(f"SKIP: no shipped bundles: {e}")
        pytest.skip(f"no shipped bundles: {e}")


@pytest.fixture(scope="module")
def lesion_model() -> tuple[str, str]:
    """(name, version) of the shipped lesion bundle, as its manifest says."""
    from appliance.inference.bundle import find_bundles

    b = find_bundles(ROOT / "models" / "bundles").get("lesion")
    if b is None:
        pytest.skip("no lesion bundle in models/bundles")
    return b.manifest["name"], b.manifest["version"]


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> dict:
    """The 512² lesion phantom (30 slices) and everything in it that must never leave the box over MQTT."""
    d = tmp_path_factory.mktemp("ct")
    files = write_phantom(d, PhantomSpec(slices=30, lesion=True))
    phi = {"PHANTOM^SYNTHETIC", "SYNTH-0001", "SYNTH-ACC-1"}
    sops = []
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        phi |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
        sops.append(str(ds.SOPInstanceUID))
    head = pydicom.dcmread(files[0], stop_before_pixels=True)
    return {"files": files, "phi": phi, "sops": set(sops), "study_uid": str(head.StudyInstanceUID),
            "series_uid": str(head.SeriesInstanceUID), "description": str(head.SeriesDescription)}


@pytest.fixture
def pacs(tmp_path):
    """A dcmtk storescp as PACS on a free port, not started yet (the test decides when it comes up)."""
    scp = StoreSCP(tmp_path / "pacs", free_port(), aet="PACS")
    yield scp
    scp.stop()


def make_cfg(tmp: Path, url: str, analyzer, **kw) -> Config:
    cfg = Config(device_id=kw.get("device", "ct-e2e"), state_dir=str(tmp / "state"))
    cfg.analysis.bundle_dir = str(Path(analyzer.lesion.bundle.path).parent)
    cfg.watch.min_free_mb = 0
    cfg.watch.stable_seconds, cfg.watch.rescan_seconds = 0.2, 0.5
    cfg.series.quiet_seconds = kw.get("quiet", 1.5)
    cfg.mqtt.url, cfg.mqtt.stats_interval_seconds = url, 1.0
    cfg.mqtt.reconnect_min_seconds, cfg.mqtt.reconnect_max_seconds = 0.2, 1.0
    cfg.pacs.retry_seconds, cfg.pacs.max_retry_seconds, cfg.pacs.timeout_seconds = 0.2, 0.5, 5.0
    return cfg


def storescu(port: int, files: list[Path], aet: str = CONSOLE, aec: str = "CTRIAGE") -> subprocess.CompletedProcess:
    """dcmtk's storescu: every file in one association, released at the end."""
    return subprocess.run([dcmtk("storescu"), "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def final_verdict(sub: Collector, timeout: float = 120.0) -> dict:
    return json.loads(sub.wait_for(lambda m: "/verdict/" in m[0] and b'"final"' in m[1], timeout=timeout)[1])


def received(scp: StoreSCP, n: int, timeout: float = 60.0) -> dict[str, Path]:
    """The n instances PACS received, by kind: {"sr": path, "sc": path}."""
    wait(lambda: scp.out.is_dir() and len(scp.files()) >= n, timeout, f"{n} instance(s) at PACS")
    files = scp.files()
    assert len(files) == n, files
    out = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out["sr" if ds.SOPClassUID == SR_CLASS else "sc"] = f
    return out


def check_results(got: dict[str, Path], ct: dict, verdict: dict, lesion_model: tuple[str, str]) -> str:
    """SR and key image filed in the source study, referencing its slices; dsrdump reads the model. Returns the
    dsrdump text."""
    r = subprocess.run([dcmtk("dsrdump"), str(got["sr"])], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    name, version = lesion_model
    assert f'Algorithm Name")="{name}"' in r.stdout and f'Algorithm Version")="{version}"' in r.stdout, r.stdout
    assert {"name": name, "version": version} == {k: v for b in verdict["bundles"] if b["name"] == name
                                                  for k, v in b.items() if k != "sha256"}
    assert '(10828004,SCT,"Positive")' in r.stdout and "SCOORD" in r.stdout
    sr = pydicom.dcmread(got["sr"])
    assert sr.StudyInstanceUID == ct["study_uid"] and sr.SeriesInstanceUID != ct["series_uid"]
    assert sr.CompletionFlag == "COMPLETE" and sr.PreliminaryFlag == "FINAL"
    refs = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
            for i in s.ReferencedSeriesSequence[0].ReferencedSOPSequence}
    assert refs == ct["sops"], "every analysed slice is referenced"
    sc = pydicom.dcmread(got["sc"])
    assert sc.StudyInstanceUID == ct["study_uid"] and sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in ct["sops"]
    assert "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
    return r.stdout


# -- tests -------------------------------------------------------------------------------------------------------
def test_storescu_and_the_watch_folder_give_the_same_verdict_and_pacs_gets_the_sr(tmp_path, mosquitto, shipped, ct,
                                                                                  lesion_model, pacs):
    from appliance.commands.status import _render, collect

    sub = Collector(mosquitto.url, ["ctriage/#"])
    # appliance A: the DICOM node, only the console may call; PACS is up
    pacs.start()
    a = make_cfg(tmp_path / "a", mosquitto.url, shipped, device="ct-dicom", quiet=60.0)  # only the release completes
    a.dicom.enabled, a.dicom.port, a.dicom.allowed_callers = True, free_port(), [CONSOLE]
    a.pacs.destinations = [f"PACS@127.0.0.1:{pacs.port}"]
    d = Daemon(a, analyzer=shipped)
    d.start()
    try:
        r = storescu(a.dicom.port, ct["files"])
        assert r.returncode == 0, r.stderr
        via_dicom = final_verdict(sub)
        got = received(pacs, 2)
        check_results(got, ct, via_dicom, lesion_model)
        wait(lambda: collect(Path(a.state_dir))["pacs"]["destinations"][0]["delivered"] == 2, 15,
             "`ctriage status` to count the deliveries")
        info = collect(Path(a.state_dir))
        (dest,) = info["pacs"]["destinations"]
        assert (dest["pending"], dest["failed"], dest["delivered"]) == (0, 0, 2) and info["pacs"]["queued"] == 0
        text = _render(info)
        assert f"PACS@127.0.0.1:{pacs.port}: 0 pending, 0 failed, 2 delivered since start" in text, text
        assert "DICOM node: CTRIAGE" in text and "30 instance(s) stored" in text
    finally:
        d.stop()
    assert via_dicom["complete_reason"] == "sender: association released"

    # appliance B: the same series through the watch folder; PACS is down when the verdict is made
    pacs.stop()
    pacs_b = StoreSCP(tmp_path / "pacs-b", free_port(), aet="PACS")
    b = make_cfg(tmp_path / "b", mosquitto.url, shipped, device="ct-watch")
    b.watch.dir = str(tmp_path / "b" / "export")
    b.pacs.destinations = [f"PACS@127.0.0.1:{pacs_b.port}"]
    d = Daemon(b, analyzer=shipped)
    d.start()
    try:
        drop(ct["files"], Path(b.watch.dir))
        via_watch = json.loads(sub.wait_for(lambda m: m[0].startswith("ctriage/ct-watch/verdict/")
                                            and b'"final"' in m[1], timeout=120)[1])
        wait(lambda: d.pacs.status()[0]["pending"] == 2 and d.pacs.status()[0]["last_error"], 30,
             "SR and key image to wait for PACS")
        wait(lambda: "pacs" in collect(Path(b.state_dir))["problems"], 15, "`ctriage status` to report PACS")
        info = collect(Path(b.state_dir))
        assert info["health"] == "degraded" and "results not delivered to PACS" in info["problems"]["pacs"]
        assert f"PACS@127.0.0.1:{pacs_b.port}: 2 pending, 0 failed" in _render(info)
        pacs_b.start()  # PACS comes up: the sender's next retry delivers
        got = received(pacs_b, 2)
        check_results(got, ct, via_watch, lesion_model)
    finally:
        d.stop()
        pacs_b.stop()
        sub.close()

    same = ("result", "state", "evidence", "counts", "bundles", "backend")
    assert {k: via_dicom[k] for k in same} == {k: via_watch[k] for k in same}
    assert via_dicom["result"] == "positive" and via_dicom["counts"]["slices"] == 30
    print(f"both paths: {via_dicom['result']} {via_dicom['evidence']} {via_dicom['counts']}")
    for v in verdicts(sub):
        assert all("description" not in s for s in v["series"]), "free-text SeriesDescription stays in the box"
    assert not any(ct["description"].encode() in m[1] for m in sub.messages)
    check_messages(sub.messages, ct["phi"])


def test_a_caller_not_allowed_is_refused_and_nothing_is_analysed(tmp_path, mosquitto, shipped, ct):
    cfg = make_cfg(tmp_path, mosquitto.url, shipped)
    cfg.dicom.enabled, cfg.dicom.port, cfg.dicom.allowed_callers = True, free_port(), [CONSOLE]
    d = Daemon(cfg, analyzer=shipped)
    d.start()
    try:
        r = storescu(cfg.dicom.port, ct["files"][:3], aet="INTRUDER")
        assert r.returncode != 0 and "Association Rejected" in r.stderr, r.stderr
        assert "Calling AE Title Not Recognized" in r.stderr
        assert d.dicom_node.stats.refused == 1 and d.dicom_node.stats.stored == 0
        assert d.wait_idle(5)
        assert d.spool.pending() == [] and d.store.counts()["analysed"] == 0 and d.store.verdicts() == []
        assert not list((Path(cfg.state_dir) / "processed").rglob("*.dcm"))
    finally:
        d.stop()


def _ctriage_run(tmp: Path, url: str, dicom_port: int, pacs_port: int, log) -> subprocess.Popen:
    conf = tmp / "ctriage.toml"
    conf.write_text('[watch]\nmin_free_mb = 0\n[pacs]\nretry_seconds = 0.2\nmax_retry_seconds = 0.5\n'
                    '[privacy]\nsend_patient_labels = true\n')
    cmd = [sys.executable, "-m", "appliance.cli", "run", "--config", str(conf), "--state-dir", str(tmp / "state"),
           "--mqtt-url", url, "--device-id", "ct-cli", "--quiet-seconds", "60", "--dicom-port", str(dicom_port),
           "--dicom-aet", "CT_AI", "--pacs", f"PACS@127.0.0.1:{pacs_port}", "--log-json"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_a_final_verdict_not_handed_to_pacs_is_sent_after_a_restart(tmp_path, mosquitto, ct, lesion_model, pacs):
    """`ctriage run --dicom-port --dicom-aet --pacs` as a process. The PACS outbox cannot take the result when the
    verdict is made (a file stands where its folder must go); the daemon stops; the fault is cleared; the next start
    hands the verdict over and PACS gets it."""
    from appliance.commands.status import _render, collect

    pacs.start()
    state, port = tmp_path / "state", free_port()
    blocker = state / "pacs-outbox" / "_results"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder\n")
    sub = Collector(mosquitto.url, ["ctriage/ct-cli/verdict/#"])
    logf = (tmp_path / "daemon.log").open("wb")
    proc = _ctriage_run(tmp_path, mosquitto.url, port, pacs.port, logf)
    try:
        wait(lambda: collect(state)["running"] and collect(state).get("dicom"), 90, "the daemon and its DICOM node")
        r = storescu(port, ct["files"], aec="CT_AI")
        assert r.returncode == 0, r.stderr
        v = final_verdict(sub)
        assert v["complete_reason"] == "sender: association released"
        assert any(s.get("description") == ct["description"] for s in v["series"]), "the site sends labels"
        wait(lambda: (collect(state).get("pacs") or {}).get("error"), 30, "the PACS hand-over to fail")
        info = collect(state)
        assert info["pacs"]["queued"] == 1 and "results cannot be queued for PACS" in info["problems"]["pacs"]
        assert pacs.files() == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "1 verdict(s) not yet queued" in _render(collect(state))

        blocker.unlink()
        proc = _ctriage_run(tmp_path, mosquitto.url, port, pacs.port, logf)
        got = received(pacs, 2, timeout=90)
        check_results(got, ct, v, lesion_model)
        wait(lambda: (collect(state).get("pacs") or {}).get("queued") == 0, 30, "the queue to empty")
        for f in got.values():
            assert pydicom.dcmread(f, stop_before_pixels=True).file_meta.SourceApplicationEntityTitle.strip() \
                == "CT_AI", "the calling AE title is --dicom-aet"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        logf.close()
        sub.close()
    assert len(verdicts(sub, "final")) == 1, "the restart published nothing new"
    lines = (tmp_path / "daemon.log").read_text().splitlines()
    msgs = [json.loads(x)["msg"] for x in lines if x.startswith("{")]
    assert any("handing 1 final verdict(s) to the PACS sender" in m for m in msgs)
    for line in lines:
        for secret in ct["phi"]:
            assert secret not in line, f"{secret!r} in the log"


def test_run_options_for_dicom_and_pacs(tmp_path, capsys):
    from appliance.cli import build_parser, main
    from appliance.commands.run import configure

    conf = tmp_path / "c.toml"
    conf.write_text('[pacs]\ndestinations = ["ARCHIVE@10.0.0.9:104"]\n')
    args = build_parser().parse_args(["run", "--config", str(conf), "--state-dir", str(tmp_path), "--dicom-port",
                                      "11113", "--dicom-aet", "CT2_TRIAGE", "--pacs", "PACS@pacs.local:104",
                                      "--pacs", "ARCHIVE@10.0.0.9:104", "--pacs", "VNA@[fd00::5]:11112"])
    cfg = configure(args)
    assert cfg.dicom.enabled and cfg.dicom.port == 11113 and cfg.dicom.ae_title == "CT2_TRIAGE"
    assert cfg.pacs.destinations == ["ARCHIVE@10.0.0.9:104", "PACS@pacs.local:104", "VNA@[fd00::5]:11112"]
    for bad, says in ((["--pacs", "PACS@host"], "--pacs 'PACS@host': expected AET@host:port"),
                      (["--pacs", "PACS@host:0"], "expected AET@host:port"),
                      (["--dicom-aet", "A" * 17], "--dicom-aet"), (["--dicom-aet", "A\\B"], "--dicom-aet")):
        assert main(["run", "--state-dir", str(tmp_path), *bad]) == 2
        assert says in capsys.readouterr().err
