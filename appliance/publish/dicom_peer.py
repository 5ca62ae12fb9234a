"""A DICOM peer (PACS, or any node reached by C-STORE / C-ECHO): its address "AET@host:port", and an association
to it, or a one-line reason why there is none."""
from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.dicom_names import parse_peer


class DicomNetworkError(Exception):
    """A peer could not be reached or refused us; the message is one line naming the reason."""


class ContextsRefused(DicomNetworkError):
    """The peer accepted none of the SOP classes / transfer syntaxes offered (retrying will not help)."""


@dataclass(frozen=True)
class Destination:
    """A DICOM peer: called AE title, host and port ("AET@host:port", IPv6 as "AET@[::1]:104")."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        peer = parse_peer(text)
        if peer is None:
            raise ValueError(f"{text!r}: expected AET@host:port (AE title 1-16 characters, port 1-65535)")
        return cls(*peer)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.ae_title}@{self.host}_{self.port}")


def connect_error(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to host:port fails (one line), or None when it opens."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"unknown host {host}"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as e:
        return f"cannot connect to {host}:{port}: {e.strerror or e}"


def associate(dest: Destination, calling_aet: str, contexts: Sequence[tuple[str, Sequence[str]]],
              timeout: float = 30.0, ssl_context=None):
    """An established association to dest, or DicomNetworkError saying why not."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop, syntaxes in contexts:
        ae.add_requested_context(sop, list(syntaxes))
    tls = (ssl_context, dest.host) if ssl_context is not None else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    except socket.gaierror:
        raise DicomNetworkError(f"unknown host {dest.host}") from None
    except OSError as e:
        raise DicomNetworkError(f"cannot connect to {dest.host}:{dest.port}: {e.strerror or e}") from None
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        why = getattr(rsp, "reason_str", "") or "no reason given"
        kind = getattr(rsp, "result_str", "") or "Rejected"
        raise DicomNetworkError(f"association rejected by {dest} ({kind}): {why}")
    if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
        names = sorted({str(getattr(cx.abstract_syntax, "name", cx.abstract_syntax)) for cx in assoc.rejected_contexts})
        raise ContextsRefused(f"{dest} accepts none of: {', '.join(names)}")
    if assoc.is_aborted:
        detail = connect_error(dest.host, dest.port, min(timeout, 5.0))
        raise DicomNetworkError(detail or f"association aborted by {dest}")
    detail = connect_error(dest.host, dest.port, min(timeout, 5.0))
    raise DicomNetworkError(detail or f"no association with {dest} within {timeout:g} s")
