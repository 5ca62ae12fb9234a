"""File names from DICOM UIDs received from elsewhere (a sender, a source study): a well-formed UID is its own file
name; anything else (path separators, "..", over-long values) is replaced by a hash of it. Pure standard library:
every layer may use it (the DICOM node's received instances, the PACS outbox)."""
from __future__ import annotations

import hashlib
import re

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_name(uid: str) -> str:
    """A file-name-safe form of a UID: the UID itself when it is well formed, else a hash of it."""
    uid = uid.strip()
    if _UID_RE.fullmatch(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode()).hexdigest()[:32]
