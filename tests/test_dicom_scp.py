"""The DICOM node against peers we did not write: dcmtk's echoscu/storescu and pynetdicom as the sending side."""
from __future__ import annotations

import datetime as dt
import errno
import functools
import ssl
import subprocess
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless,
                         generate_uid)
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification

from appliance.ingest.dicom_reader import Rejected, read_slice
from appliance.ingest.dicom_scp import (CallerPolicy, DicomNode, DirectorySink, atomic_write, safe_name,
                                        server_ssl_context)
from appliance.phantom import PhantomSpec, write_phantom

DCMTK_APT = "dcmtk"


@functools.cache
def _dcmtk_path(tool: str) -> str | None:
    """The dcmtk binary named tool on PATH (pynetdicom installs python shims with the same names: skipped)."""
    import os

    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        p = Path(d) / tool
        if not (p.is_file() and os.access(p, os.X_OK)):
            continue
        with open(p, "rb") as f:
            if f.read(2) == b"#!":
                continue  # a script, not dcmtk
        return str(p)
    return None


def dcmtk(tool: str) -> str:
    """Path of a dcmtk tool, or skip the test saying which package provides it."""
    p = _dcmtk_path(tool)
    if p is None:
        reason = f"dcmtk's {tool} is not installed (Debian/Ubuntu package: apt-get install {DCMTK_APT})"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return p


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("series")
    return write_phantom(d, PhantomSpec(slices=6, size=96))


@pytest.fixture
def sink(tmp_path) -> DirectorySink:
    return DirectorySink(tmp_path / "received")


@pytest.fixture
def node(sink):
    n = DicomNode(sink, ae_title="CTRIAGE", port=0, bind="127.0.0.1").start()
    yield n
    n.stop()


def _scu(aet: str = "TESTSCU", syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian)) -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, list(syntaxes))
    ae.add_requested_context(EnhancedCTImageStorage, list(syntaxes))
    return ae


def _raw_store(assoc, payload: bytes, sop_class: str, sop_instance: str) -> int:
    """Send a C-STORE whose data set is exactly `payload` (which pynetdicom's send_c_store would refuse to send)."""
    req = C_STORE()
    req.MessageID, req.Priority = 7, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_instance
    req.DataSet = BytesIO(payload)
    cx = assoc._get_valid_context(sop_class, ExplicitVRLittleEndian, "scu")
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    assoc.dimse.send_msg(req, cx.context_id)
    _, rsp = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    return int(rsp.Status)


def _encode(ds: Dataset) -> bytes:
    from pydicom.filewriter import write_dataset

    buf = BytesIO()
    write_dataset(pydicom.filebase.DicomFileLike(buf), ds)  # explicit VR little endian
    return buf.getvalue()


# -- echo ---------------------------------------------------------------------------------------------------------

def test_dcmtk_echoscu_gets_success(node):
    r = subprocess.run([dcmtk("echoscu"), "-aec", "CTRIAGE", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert node.stats.echoes == 1


# -- store --------------------------------------------------------------------------------------------------------

def _uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_storescu_one_association_for_the_series(node, sink, series):
    r = subprocess.run([dcmtk("storescu"), "-aec", "CTRIAGE", "127.0.0.1", str(node.port), *map(str, series)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = sink.files()
    assert _uids(got) == _uids(series)
    series_uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
    assert {p.parent.name for p in got} == {series_uid}
    # what arrived is what was sent, and the reader takes it as a CT slice
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in got}
    for src in series:
        a = pydicom.dcmread(src)
        b = pydicom.dcmread(by_uid[str(a.SOPInstanceUID)])
        assert a == b
        assert b.file_meta.SourceApplicationEntityTitle.strip() == "STORESCU"
    img = read_slice(got[0])
    assert img.series_uid == series_uid and img.hu is not None
    assert not list(sink.path.rglob(".tmp-*"))  # no leftovers of the atomic writes
    deadline = time.monotonic() + 10
    while not sink.released and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.released == [{series_uid}]
    assert node.stats.stored == len(series)


def test_storescu_one_association_per_image(node, sink, series):
    for p in series:
        r = subprocess.run([dcmtk("storescu"), "-aec", "CTRIAGE", "127.0.0.1", str(node.port), str(p)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    assert _uids(sink.files()) == _uids(series)
    deadline = time.monotonic() + 10
    while len(sink.released) < len(series) and time.monotonic() < deadline:
        time.sleep(0.05)
    series_uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
    assert sink.released == [{series_uid}] * len(series)
    assert node.stats.associations == len(series)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_transfer_syntaxes_are_stored_and_decodable(node, sink, tmp_path, syntax):
    paths = write_phantom(tmp_path / "c", PhantomSpec(slices=2, size=96), transfer_syntax=syntax)
    assoc = _scu(syntaxes=[syntax]).associate("127.0.0.1", node.port, ae_title="CTRIAGE")
    assert assoc.is_established
    try:
        assert all(assoc.send_c_store(pydicom.dcmread(p)).Status == 0 for p in paths)
    finally:
        assoc.release()
    got = sink.files()
    assert len(got) == 2
    ds = pydicom.dcmread(got[0])
    assert ds.file_meta.TransferSyntaxUID == syntax
    img = read_slice(got[0])
    ref = read_slice(next(p for p in paths if pydicom.dcmread(p).SOPInstanceUID == ds.SOPInstanceUID))
    assert np.array_equal(img.hu, ref.hu)


def test_enhanced_ct_is_stored_and_refused_by_the_reader_with_its_reason(node, sink, series):
    ds = pydicom.dcmread(series[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    assoc = _scu().associate("127.0.0.1", node.port, ae_title="CTRIAGE")
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    (f,) = sink.files()
    with pytest.raises(Rejected, match="multi-frame"):
        read_slice(f)


# -- refused callers ---------------------------------------------------------------------------------------------

def test_caller_not_in_the_allow_list_is_rejected_and_nothing_written(sink, series):
    with DicomNode(sink, port=0, bind="127.0.0.1", allowed_callers=["CONSOLE1", "CONSOLE2@127.0.0.1"]) as n:
        r = subprocess.run([dcmtk("storescu"), "-aet", "INTRUDER", "-aec", "CTRIAGE", "127.0.0.1", str(n.port),
                            str(series[0])], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        assert "Calling AE Title Not Recognized" in r.stderr
        assert sink.files() == []
        assert n.stats.refused == 1
        for aet in ("CONSOLE1", "CONSOLE2"):
            r = subprocess.run([dcmtk("storescu"), "-aet", aet, "-aec", "CTRIAGE", "127.0.0.1", str(n.port),
                                str(series[0])], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
        assert len(sink.files()) == 1


def test_caller_from_another_host_is_rejected(sink):
    with DicomNode(sink, port=0, bind="127.0.0.1", allowed_callers=["CONSOLE1@192.0.2.7"]) as n:
        assoc = _scu("CONSOLE1").associate("127.0.0.1", n.port, ae_title="CTRIAGE")
        assert assoc.is_rejected
        assert n.stats.refused == 1


def test_caller_policy_entries():
    p = CallerPolicy(["CT1", "CT2@127.0.0.1", "*@10.1.2.3", "CT3@localhost"])
    assert p.allows("CT1", "10.9.9.9")
    assert p.allows("CT2", "127.0.0.1") and not p.allows("CT2", "127.0.0.2")
    assert p.allows("ANY", "10.1.2.3") and not p.allows("ANY", "10.1.2.4")
    assert p.allows("CT3", "127.0.0.1")
    assert p.allows("CT2", "::ffff:127.0.0.1")  # IPv4 caller on a dual-stack socket
    assert CallerPolicy([]).allows("WHOEVER", "203.0.113.1")
    for bad in ("", "@host", "CT@", "A" * 17):
        with pytest.raises(ValueError, match="allowed caller"):
            CallerPolicy([bad])


# -- malformed instances and failures ----------------------------------------------------------------------------

def test_malformed_instances_get_failure_statuses_and_the_node_keeps_serving(node, sink, series):
    good = pydicom.dcmread(series[0])
    assoc = _scu().associate("127.0.0.1", node.port, ae_title="CTRIAGE")
    assert assoc.is_established
    try:
        mr = pydicom.dcmread(series[1])
        mr.Modality = "MR"
        assert assoc.send_c_store(mr).Status == 0xA900

        no_uid = pydicom.dcmread(series[2])
        uid = str(no_uid.SOPInstanceUID)
        del no_uid.SOPInstanceUID
        assert _raw_store(assoc, _encode(no_uid), CTImageStorage, uid) == 0xC001

        no_series = pydicom.dcmread(series[3])
        del no_series.SeriesInstanceUID
        st = assoc.send_c_store(no_series)
        assert st.Status == 0xC001 and "SeriesInstanceUID" in st.ErrorComment

        garbage = b"\x10\x00\x10\x00PN\xff\xffnot a data set at all"
        assert _raw_store(assoc, garbage, CTImageStorage, generate_uid()) == 0xC210

        truncated = _encode(pydicom.dcmread(series[4]))[:1500]
        assert _raw_store(assoc, truncated, CTImageStorage, str(pydicom.dcmread(series[4]).SOPInstanceUID)) == 0xA900

        assert assoc.send_c_store(good).Status == 0  # same association still works
    finally:
        assoc.release()
    assert [pydicom.dcmread(p).SOPInstanceUID for p in sink.files()] == [good.SOPInstanceUID]
    assert node.stats.failed == 5
    again = _scu().associate("127.0.0.1", node.port, ae_title="CTRIAGE")  # and a new one too
    assert again.is_established and again.send_c_echo().Status == 0
    again.release()


def test_disk_below_the_free_space_limit_answers_out_of_resources(tmp_path, series):
    full = DirectorySink(tmp_path / "full", min_free_mb=2.0 ** 40)  # more than any disk has
    with DicomNode(full, port=0, bind="127.0.0.1") as n:
        assoc = _scu().associate("127.0.0.1", n.port, ae_title="CTRIAGE")
        st = assoc.send_c_store(pydicom.dcmread(series[0]))
        assoc.release()
    assert st.Status == 0xA700 and "free" in st.ErrorComment
    assert full.files() == []


class _FaultySink(DirectorySink):
    """Injects the faults a test machine cannot produce on demand (a full disk), then behaves."""

    def __init__(self, path, faults):
        super().__init__(path)
        self.faults = list(faults)

    def accept(self, data, sop_instance_uid, series_uid):
        if self.faults:
            raise self.faults.pop(0)
        super().accept(data, sop_instance_uid, series_uid)


def test_sink_failures_map_to_statuses_and_the_node_survives(tmp_path, series):
    sink = _FaultySink(tmp_path / "r", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("bug")])
    with DicomNode(sink, port=0, bind="127.0.0.1") as n:
        assoc = _scu().associate("127.0.0.1", n.port, ae_title="CTRIAGE")
        statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in series[:3]]
        assoc.release()
    assert statuses == [0xA700, 0x0110, 0x0000]
    assert len(sink.files()) == 1


# -- TLS ----------------------------------------------------------------------------------------------------------

def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    c, k = tmp_path / "node.crt", tmp_path / "node.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def test_tls_node_serves_tls_callers_only(sink, tmp_path):
    crt, key = _self_signed(tmp_path)
    with DicomNode(sink, port=0, bind="127.0.0.1", ssl_context=server_ssl_context(str(crt), str(key))) as n:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(crt))
        assoc = _scu().associate("localhost", n.port, ae_title="CTRIAGE", tls_args=(client, "localhost"))
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        plain = _scu().associate("127.0.0.1", n.port, ae_title="CTRIAGE")
        assert not plain.is_established


# -- helpers ------------------------------------------------------------------------------------------------------

def test_atomic_write_and_safe_names(tmp_path):
    p = tmp_path / "a" / "b.dcm"
    atomic_write(p, b"x" * 10)
    assert p.read_bytes() == b"x" * 10 and [q.name for q in p.parent.iterdir()] == ["b.dcm"]
    assert safe_name("1.2.840.113619.2.55") == "1.2.840.113619.2.55"
    for hostile in ("../../etc/passwd", "1.2/3", "", "1." * 40):
        s = safe_name(hostile)
        assert "/" not in s and ".." not in s and s and len(s) <= 64



def test_node_from_config(tmp_path, sink):
    from appliance.config import ConfigError, from_dict

    crt, key = _self_signed(tmp_path)
    cfg = from_dict({"dicom": {"ae_title": "CT_AI", "port": 11112, "bind": "127.0.0.1", "allowed_callers": ["CT1"],
                               "tls_cert_file": str(crt), "tls_key_file": str(key)}}).dicom
    n = DicomNode.from_config(cfg, sink, port=0)
    assert n.ae_title == "CT_AI" and n.ssl_context is not None and n.policy.allows("CT1", "10.0.0.1")
    assert not n.policy.allows("CT2", "10.0.0.1") and n.port == 0
    with pytest.raises(ConfigError, match="allowed_callers"):
        from_dict({"dicom": {"allowed_callers": ["@somewhere"]}})
    with pytest.raises(ConfigError, match="set both"):
        from_dict({"dicom": {"tls_cert_file": str(crt)}})


def test_port_in_use_is_a_clear_error(node, tmp_path):
    from appliance.ingest.dicom_scp import NodeError

    with pytest.raises(NodeError, match=f"cannot listen on 127.0.0.1:{node.port}: Address already in use"):
        DicomNode(DirectorySink(tmp_path / "other"), port=node.port, bind="127.0.0.1").start()
