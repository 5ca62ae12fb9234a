"""Pseudonymous keys: a keyed hash of a DICOM UID, so no identifier leaves the box.

The site secret comes from a file (config `privacy.study_key_secret_file`), the environment
(CTRIAGE_STUDY_KEY_SECRET), or is generated once into the state directory (mode 0600).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from appliance.durable import atomic_write

ENV = "CTRIAGE_STUDY_KEY_SECRET"


def load_secret(secret_file: str = "", state_dir: Path | None = None) -> bytes:
    if secret_file:
        data = Path(secret_file).expanduser().read_bytes().strip()
        if len(data) < 16:
            raise ValueError(f"study key secret in {secret_file} is too short (need ≥ 16 bytes)")
        return data
    env = os.environ.get(ENV, "")
    if env:
        return env.encode()
    if state_dir is None:
        state_dir = Path("~/.local/state/ctriage").expanduser()
    p = Path(state_dir) / "study_key.secret"
    if p.is_file():
        return p.read_bytes().strip()
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, secrets.token_hex(32), mode=0o600)
    return p.read_bytes().strip()


def pseudonym(secret: bytes, uid: str, length: int = 16) -> str:
    """Stable, non-reversible key for a UID: HMAC-SHA256 truncated to `length` hex characters."""
    return hmac.new(secret, uid.encode(), hashlib.sha256).hexdigest()[:length]
