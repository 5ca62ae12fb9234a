"""The durable PACS outbox: spool folders of DICOM files per destination under <state_dir>/pacs-outbox, written
atomically, plus the results still to be built (`_results/`), and `failed/` with the reason beside each file.
Self-contained, independent of the appliance's SQLite store."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from appliance.durable import atomic_write
from appliance.publish.dicom_peer import Destination
from appliance.uid_names import safe_name

JOBS = "_results"  # outbox folder of results still to be built (a destination slug always holds an '@')


class Outbox:
    """Spool folders of .dcm files per destination: <root>/<slug>/<ns>-<uid>.dcm, failed ones in <slug>/failed/."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def folder(self, dest: Destination) -> Path:
        d = self.root / dest.slug
        if not (d / "destination.txt").exists():
            d.mkdir(parents=True, exist_ok=True)
            (d / "destination.txt").write_text(str(dest) + "\n")
        return d

    def put(self, dest: Destination, ds: Dataset) -> Path:
        """Queue ds for dest (once: an instance already waiting under the same SOP Instance UID is kept as is)."""
        folder, uid = self.folder(dest), safe_name(str(ds.SOPInstanceUID))
        waiting = list(folder.glob(f"[0-9]*-{uid}.dcm"))
        if waiting:
            return waiting[0]
        p = folder / f"{time.time_ns():020d}-{uid}.dcm"
        atomic_write(p, _encode(ds))
        return p

    def put_job(self, key: str, job: dict[str, Any]) -> Path:
        """Queue a result to build (JSON), once per key (the SR's SOP Instance UID)."""
        d = self.root / JOBS
        d.mkdir(parents=True, exist_ok=True)
        name = safe_name(key)
        waiting = list(d.glob(f"[0-9]*-{name}.json"))
        if waiting:
            return waiting[0]
        p = d / f"{time.time_ns():020d}-{name}.json"
        atomic_write(p, json.dumps(job).encode())
        return p

    def jobs(self) -> list[Path]:
        d = self.root / JOBS
        return sorted(d.glob("[0-9]*.json")) if d.is_dir() else []

    def pending(self, dest: Destination) -> list[Path]:
        d = self.root / dest.slug
        return sorted(d.glob("[0-9]*.dcm")) if d.is_dir() else []

    def failed(self, dest: Destination) -> list[Path]:
        d = self.root / dest.slug / "failed"
        return sorted(d.glob("*.dcm")) if d.is_dir() else []

    def fail(self, path: Path, reason: str) -> None:
        d = path.parent / "failed"
        d.mkdir(exist_ok=True)
        (d / (path.stem + ".reason.txt")).write_text(reason + "\n")
        os.replace(path, d / path.name)

    def orphans(self, known: Sequence[Destination]) -> dict[str, int]:
        """Pending counts in folders of destinations that are no longer configured."""
        slugs = {d.slug for d in known} | {JOBS}
        out = {}
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.is_dir() and d.name not in slugs:
                    n = len(list(d.glob("[0-9]*.dcm")))
                    if n:
                        label = d / "destination.txt"
                        name = label.read_text().strip() if label.exists() else d.name
                        out[name] = n
        return out


def _encode(ds: Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
