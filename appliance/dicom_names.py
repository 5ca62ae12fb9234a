"""DICOM network names, one rule each: the AE title and the "AET@host:port" peer address.

AE title (PS3.5, value representation AE): at most 16 characters, no backslash and no control characters, not
all spaces (leading and trailing spaces are not significant, so they are not counted).
"""
from __future__ import annotations

import re

AE_TITLE_MAX = 16
_PEER_RE = re.compile(r"^(?P<aet>[^@]+)@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\[\]\s]+):(?P<port>\d{1,5})$")


def is_ae_title(text: str) -> bool:
    """Whether text (spaces around it ignored) is a valid AE title."""
    t = text.strip(" ")
    return 1 <= len(t) <= AE_TITLE_MAX and "\\" not in t and t.isprintable()


def parse_peer(text: str) -> tuple[str, str, int] | None:
    """"AET@host:port" (IPv6 as "AET@[::1]:104") → (AE title, host, port); None when it is not one."""
    m = _PEER_RE.match(text.strip())
    if not m or not is_ae_title(m["aet"]) or not 1 <= int(m["port"]) <= 65535:
        return None
    return m["aet"].strip(), m["host"].strip("[]"), int(m["port"])
