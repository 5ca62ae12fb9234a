"""Bundle signatures: Ed25519 over the exact bytes of manifest.json, written next to it as manifest.sig.

manifest.json pins every file by sha256, so one signature covers the whole bundle. A bundle verifies when
manifest.sig verifies with one of the trusted public keys, every listed file has its recorded sha256, and the
directory holds nothing else (no unlisted file, no symlink). Keys are PEM files: the private key PKCS#8
(mode 0600), the public key SubjectPublicKeyInfo.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.durable import atomic_write
from appliance.inference.bundle import Bundle, BundleError, load_bundle, sha256_file

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CONTROL_FILES = frozenset({MANIFEST, SIGNATURE})
KEY_FILE = "signing.key"
PUB_FILE = "signing.pub"


class SignatureError(BundleError):
    """A bundle or message is unsigned, signed by no trusted key, or does not match what was signed."""


@dataclass(frozen=True)
class TrustedKey:
    """A public key the appliance accepts bundles from; `source` says where it came from."""

    key: Ed25519PublicKey
    source: str

    @property
    def key_id(self) -> str:
        return key_id(self.key)


def key_id(key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: first 16 hex digits of sha256 over its raw 32 bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: str | Path) -> tuple[Path, Path]:
    """Write OUT_DIR/signing.key (private, 0600) and OUT_DIR/signing.pub; never overwrite an existing key."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / KEY_FILE, out / PUB_FILE
    for p in (key_path, pub_path):
        if p.exists():
            raise SignatureError(f"{p} already exists (refusing to overwrite a key)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(key_path, 0o600)  # whatever the umask
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_path.write_bytes(pub)
    return key_path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SignatureError(f"private key not found: {p}")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{p}: not an unencrypted PEM private key ({str(e).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{p}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> TrustedKey:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SignatureError(f"public key not found: {p}")
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{p}: not a PEM public key ({str(e).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{p}: not an Ed25519 public key ({type(key).__name__})")
    return TrustedKey(key, str(p))


def load_trust(keys: list[str | Path | TrustedKey] | tuple) -> list[TrustedKey]:
    """Public key files (or TrustedKey objects) → TrustedKeys, duplicates removed."""
    out: list[TrustedKey] = []
    seen: set[str] = set()
    for k in keys:
        tk = k if isinstance(k, TrustedKey) else load_public_key(k)
        if tk.key_id not in seen:
            seen.add(tk.key_id)
            out.append(tk)
    return out


def public_of(key: Ed25519PrivateKey, source: str = "signing key") -> TrustedKey:
    return TrustedKey(key.public_key(), source)


def encode_signature(sig: bytes) -> str:
    return base64.b64encode(sig).decode("ascii")


def decode_signature(data: bytes | str) -> bytes:
    """manifest.sig holds the 64-byte signature in base64 (one line); raw 64 bytes are accepted too."""
    if isinstance(data, bytes) and len(data) == 64:
        return data
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    try:
        sig = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signature is not base64") from None
    if len(sig) != 64:
        raise SignatureError(f"signature has {len(sig)} bytes, an Ed25519 signature has 64")
    return sig


def verify_bytes(data: bytes, sig: bytes, trust: list[TrustedKey]) -> TrustedKey:
    """The trusted key that signed `data`, or SignatureError."""
    if not trust:
        raise SignatureError("no trusted keys configured (fleet.trust_keys or --trust)")
    for tk in trust:
        try:
            tk.key.verify(sig, data)
            return tk
        except InvalidSignature:
            continue
    raise SignatureError("signature does not verify with any trusted key")


def safe_relpath(rel: str) -> PurePosixPath:
    """A manifest path must stay inside the bundle: relative, no '..', no backslashes."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or p.parts[0] in CONTROL_FILES:
        raise BundleError(f"manifest lists an unsafe path {rel!r}")
    return p


def check_contents(path: str | Path, manifest: dict) -> int:
    """Every listed file present with its sha256, nothing unlisted, no symlinks. Returns the number of files."""
    root = Path(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError("manifest lists no files")
    listed = {str(safe_relpath(rel)): digest for rel, digest in files.items()}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            full = Path(dirpath) / n
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                raise BundleError(f"unexpected symlink {rel}")
            if n in filenames and rel not in listed and rel not in CONTROL_FILES:
                raise BundleError(f"unlisted file {rel}")
    for rel, digest in sorted(listed.items()):
        p = root / rel
        if not p.is_file():
            raise BundleError(f"file {rel} missing")
        if sha256_file(p) != str(digest).lower():
            raise BundleError(f"file {rel} sha256 mismatch")
    return len(listed)


def rehash(path: str | Path) -> dict:
    """Rewrite manifest.json's files{} from what is in the directory (after editing a bundle on purpose)."""
    root = Path(path)
    mf = root / MANIFEST
    manifest = json.loads(mf.read_text())
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.is_symlink() and rel not in CONTROL_FILES:
            files[rel] = sha256_file(p)
    manifest["files"] = files
    atomic_write(mf, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def sign_bundle(path: str | Path, key: Ed25519PrivateKey, rehash_files: bool = False) -> tuple[Bundle, bytes]:
    """Check the bundle is whole, then write manifest.sig over the exact bytes of manifest.json."""
    root = Path(path)
    if rehash_files:
        rehash(root)
    b = load_bundle(root, verify=False)
    check_contents(root, b.manifest)
    data = (root / MANIFEST).read_bytes()
    sig = key.sign(data)
    atomic_write(root / SIGNATURE, (encode_signature(sig) + "\n").encode())
    return b, sig


def verify_bundle(path: str | Path, trust: list[TrustedKey]) -> tuple[Bundle, TrustedKey]:
    """Signature first (nothing in an unsigned manifest is trusted), then the files. Raises BundleError."""
    root = Path(path)
    mf, sf = root / MANIFEST, root / SIGNATURE
    if not mf.is_file():
        raise BundleError(f"{root}: no manifest.json (not a model bundle)")
    if not sf.is_file():
        raise SignatureError("no manifest.sig (the bundle is not signed)")
    data = mf.read_bytes()
    signer = verify_bytes(data, decode_signature(sf.read_bytes()), trust)
    b = load_bundle(root, verify=False)
    if b.sha256 != hashlib.sha256(data).hexdigest():  # manifest changed while we read it
        raise SignatureError("manifest.json changed during verification")
    check_contents(root, b.manifest)
    return b, signer
