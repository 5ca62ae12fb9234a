"""Ed25519 key files for the fleet's TUF roles (root, targets, snapshot, timestamp).

A key pair is two PEM files: `<name>.key` (PKCS#8, unencrypted, mode 0600) and `<name>.pub`
(SubjectPublicKeyInfo). A key directory holds one pair per role, named after the role (`root.key`, `targets.key`,
…), as `ctriage models keygen DIR` writes it; the private halves stay on the operator's machines, never on an
appliance. Keys are named in TUF metadata by their TUF key id (sha256 of the canonical public key); `short_id` is
its first 16 hex digits, as the CLI and update reports print it.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from appliance.inference.bundle import BundleError

ROLES = ("root", "targets", "snapshot", "timestamp")


class KeyFileError(BundleError):
    """A key file is missing, unreadable or not an Ed25519 key."""


def short_id(keyid: str) -> str:
    return keyid[:16]


def generate_keypair(out_dir: str | Path, name: str = "signing") -> tuple[Path, Path]:
    """Write OUT_DIR/<name>.key (private, 0600) and OUT_DIR/<name>.pub; never overwrite an existing key."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise KeyFileError(f"{p} already exists (refusing to overwrite a key)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(key_path, 0o600)  # whatever the umask
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def generate_role_keys(out_dir: str | Path, roles: tuple[str, ...] = ROLES) -> list[Path]:
    """One key pair per role in OUT_DIR (root.key/root.pub, …); returns the private key files."""
    return [generate_keypair(out_dir, r)[0] for r in roles]


def load_signer(path: str | Path) -> CryptoSigner:
    """A TUF signer for an Ed25519 private key file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise KeyFileError(f"private key not found: {p}")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{p}: not an unencrypted PEM private key ({str(e).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p}: not an Ed25519 key ({type(key).__name__})")
    return CryptoSigner(key)


def load_public(path: str | Path) -> SSlibKey:
    """A TUF public key for an Ed25519 public (or private) key file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise KeyFileError(f"public key not found: {p}")
    data = p.read_bytes()
    if b"PRIVATE KEY" in data:
        return load_signer(p).public_key
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{p}: not a PEM public key ({str(e).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{p}: not an Ed25519 public key ({type(key).__name__})")
    return SSlibKey.from_crypto(key)


def load_signers(paths: list[str | Path]) -> list[CryptoSigner]:
    """Signers for key files and key directories (every *.key in a directory), duplicates removed."""
    files: list[Path] = []
    for p in map(lambda x: Path(x).expanduser(), paths):
        if p.is_dir():
            found = sorted(p.glob("*.key"))
            if not found:
                raise KeyFileError(f"{p}: no *.key files (a key directory holds root.key, targets.key, …)")
            files += found
        else:
            files.append(p)
    out: dict[str, CryptoSigner] = {}
    for f in files:
        s = load_signer(f)
        out.setdefault(s.public_key.keyid, s)
    return list(out.values())
