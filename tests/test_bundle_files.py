"""What a bundle directory holds (appliance/fleet/bundle_files.py) and its transfer archive (transfer.py)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from appliance.fleet import transfer
from appliance.fleet.bundle_files import rehash, whole_bundle
from appliance.inference.bundle import BundleError, find_bundles, load_bundle

from .fleet_helpers import flip_byte, make_variant, set_version, source_bundles  # noqa: F401


@pytest.fixture
def lesion(tmp_path, source_bundles) -> Path:
    return make_variant(source_bundles["lesion"], tmp_path / "lesion")


@pytest.mark.parametrize("damage, reason", [
    (lambda d: flip_byte(d / "selftest.npz"), "file selftest.npz sha256 mismatch"),
    (lambda d: (d / "notes.txt").write_text("extra"), "unlisted file notes.txt"),
    (lambda d: (d / "model.onnx").unlink(), "file model.onnx missing"),
    (lambda d: os.symlink("/etc/passwd", d / "link"), "unexpected symlink link"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
])
def test_whole_bundle_names_the_problem(lesion, damage, reason):
    damage(lesion)
    with pytest.raises(BundleError, match=reason):
        whole_bundle(lesion)


def test_unsafe_manifest_path_is_refused(lesion):
    m = json.loads((lesion / "manifest.json").read_text())
    m["files"]["../outside"] = "0" * 64
    (lesion / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="unsafe path '../outside'"):
        whole_bundle(lesion)


def test_rehash_after_an_edit_on_purpose(lesion):
    (lesion / "model.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="file model.onnx sha256 mismatch"):
        whole_bundle(lesion)
    rehash(lesion)
    assert whole_bundle(lesion).sha256 == load_bundle(lesion, verify=False).sha256


def test_archive_is_deterministic_and_unpacks_to_a_whole_bundle(lesion, tmp_path):
    (lesion / "manifest.sig").write_text("a legacy signature: not listed, not sent\n")
    whole_bundle(lesion)  # tolerated in a bundle dir from before TUF
    a1, a2 = transfer.pack(lesion), transfer.pack(lesion)
    assert a1 == a2
    (tmp_path / "a.tar").write_bytes(a1)
    out = transfer.unpack(tmp_path / "a.tar", tmp_path / "out")
    assert whole_bundle(out).sha256 == load_bundle(lesion, verify=False).sha256
    assert not (out / "manifest.sig").exists()


@pytest.mark.parametrize("member, reason", [
    (lambda: _ti("../evil", b"x"), "unsafe path"),
    (lambda: _ti("/abs", b"x"), "unsafe path"),
    (lambda: _ti("link", b"", tarfile.SYMTYPE, "/etc/passwd"), "not a regular file"),
])
def test_unpack_refuses_unsafe_members(tmp_path, member, reason):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti, data = member()
        tar.addfile(ti, io.BytesIO(data) if data else None)
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    with pytest.raises(transfer.TransferError, match=reason):
        transfer.unpack(tmp_path / "a.tar", tmp_path / "out")


def _ti(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname = kind, len(data), link
    return ti, data


def test_find_bundles_resolves_symlinked_bundles(lesion, tmp_path):
    d = tmp_path / "active"
    d.mkdir()
    (d / "lesion").symlink_to(lesion)
    b = find_bundles(d)["lesion"]
    assert b.path == lesion.resolve()
    set_version(lesion, "9.9.9")
    assert load_bundle(b.path, verify=False).version == "9.9.9"
