"""The daemon's parts, each testable without a broker; `appliance.daemon.Daemon` wires them and owns their threads.

    intake.py         spool → decode (prefetched) → analyzer → store → series tracker; duplicates, quarantine,
                      deferral during a model swap, completion hints, open series rebuilt after a restart
    verdicts.py       tracker update → study verdict payload → outbox (one final per study, then corrections only),
                      overlay with its key image
    pacs_handover.py  final verdicts waiting for the PACS sender (durable list), hand-over and retries
    health.py         problems, status and stats payloads, the status file, the housekeeping round
    key_image.py      where an analysed slice's file is now, and its rendering with boxes (overlay, PACS)
    stats.py          counters the data path keeps and health reports
    analyzer_factory.py  the Analyzer a configuration asks for: [analysis] bundle_dir, else the bundles the fleet
                      updater activated, else the shipped ones (the daemon and the commands use it)

Dependencies point one way: intake and health know nothing of verdicts; verdicts hands final verdicts to
pacs_handover; nothing here imports the daemon.
"""
from __future__ import annotations

import json
from typing import Any


def compact_json(payload: dict[str, Any]) -> bytes:
    """A message body as it goes on the wire and into the outbox."""
    return json.dumps(payload, separators=(",", ":")).encode()
