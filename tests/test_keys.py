"""Key files for the TUF roles (appliance/fleet/keys.py)."""
from __future__ import annotations

import os
import stat

import pytest

from appliance.fleet.keys import (ROLES, KeyFileError, generate_keypair, generate_role_keys, load_public, load_signer,
                                  load_signers)


def test_keygen_writes_private_key_0600_and_refuses_to_overwrite(tmp_path):
    key, pub = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert load_public(pub).keyid == load_signer(key).public_key.keyid == load_public(key).keyid
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path / "k")


def test_role_keys_and_key_directories(tmp_path):
    generate_role_keys(tmp_path / "keys")
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted(
        f"{r}.{x}" for r in ROLES for x in ("key", "pub"))
    assert len(load_signers([tmp_path / "keys", tmp_path / "keys" / "root.key"])) == 4  # duplicates removed
    with pytest.raises(KeyFileError, match="no \\*.key files"):
        load_signers([tmp_path])


def test_the_project_release_keys_load_when_present():
    """The project's own keys (outside the repository) are Ed25519 PEM, as keys.py reads them."""
    from pathlib import Path

    d = Path(__file__).resolve().parents[2] / "shared" / "release-keys"
    if not (d / "root.pub").is_file():
        pytest.skip(f"{d} is not on this machine")
    assert {load_public(d / f"{r}.pub").keyid for r in ROLES} == {s.public_key.keyid for s in load_signers([d])}


def test_other_files_are_refused_with_the_reason(tmp_path):
    key, pub = generate_keypair(tmp_path / "k")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_signer(pub)
    with pytest.raises(KeyFileError, match="private key not found"):
        load_signer(tmp_path / "nope")
    (tmp_path / "junk.pub").write_text("junk")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public(tmp_path / "junk.pub")
