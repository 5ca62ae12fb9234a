"""C-ECHO a DICOM peer (PACS, a CT console, another node) from this appliance: checks the network path, the AE
titles and that the peer answers, and prints the round-trip time.

Exit status: 0 when the peer answered success, 2 with one line saying why otherwise
(unknown host, connection refused, association rejected and why, no answer within --timeout, failure status).
"""
from __future__ import annotations

import argparse
import logging
import time

from appliance.dicom_names import is_ae_title
from appliance.errors import UsageError
from appliance.commands.common import add_config_argument, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("peer", metavar="AE@host:port", help="the peer's AE title, host and port, e.g. PACS@10.0.0.5:104")
    p.add_argument("--aet", metavar="CALLING", help="calling AE title (default: [dicom] ae_title, CTRIAGE)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for each step (10)")
    add_config_argument(p)


def run(args: argparse.Namespace) -> int:
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom.sop_class import Verification

    from appliance.publish.dicom_peer import Destination, DicomNetworkError, associate

    try:
        dest = Destination.parse(args.peer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout:g}")
    aet = (args.aet or load_config(args).dicom.ae_title).strip()
    if not is_ae_title(aet):
        raise UsageError(f"calling AE title must be 1 to 16 characters, got {aet!r}")
    quiet = logging.getLogger("pynetdicom")
    level = quiet.level
    if not getattr(args, "verbose", False):
        quiet.setLevel(logging.CRITICAL)  # its errors would repeat ours over several lines
    try:
        t0 = time.perf_counter()
        try:
            assoc = associate(dest, aet, [(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])],
                              timeout=args.timeout)
        except DicomNetworkError as e:
            raise UsageError(f"C-ECHO {dest} failed: {e}") from None
        t1 = time.perf_counter()
        try:
            status = assoc.send_c_echo()
            t2 = time.perf_counter()
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        quiet.setLevel(level)
    if "Status" not in status:
        raise UsageError(f"C-ECHO {dest} failed: no response within {args.timeout:g} s")
    if int(status.Status) != 0:
        raise UsageError(f"C-ECHO {dest} failed: status 0x{int(status.Status):04X}")
    print(f"C-ECHO {dest} (calling AE {aet}): success, round trip {(t2 - t1) * 1000:.1f} ms "
          f"(association {(t1 - t0) * 1000:.1f} ms)")
    return 0
