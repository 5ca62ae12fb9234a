"""Appliance state in SQLite (WAL, synchronous=FULL): files seen, findings per slice, series and study state,
verdicts, and the outbox of MQTT messages.

Everything a restart needs is here: a slice whose finding is stored is never analysed again, series verdicts are
recomputed from stored findings, and an outbox message stays until the broker acknowledged it. Writes that belong
together (a batch of findings with their files and series; a verdict with its outbox messages) are one
transaction (`with store.transaction():`). DICOM UIDs are kept here (local state, never published): they are the
identity of slices, series and studies.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.domain import Box, Core, Evidence, Rect, SeriesVerdict, SliceFinding, SliceMeasures, Solid

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL,             -- spool name (opaque, no patient data)
  ident TEXT,                     -- SOPInstanceUID, or sha256:<hex> when the file has none
  series_uid TEXT,
  status TEXT NOT NULL,           -- analysed | duplicate | rejected
  path TEXT,                      -- where the file ended (processed/ or quarantine/)
  reason TEXT,
  created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_ident ON files(ident);
CREATE INDEX IF NOT EXISTS files_name ON files(name);
CREATE TABLE IF NOT EXISTS slices (
  ident TEXT PRIMARY KEY,
  series_uid TEXT NOT NULL,
  position REAL NOT NULL,
  sort_key TEXT NOT NULL,         -- JSON of appliance.ingest.series.sort_key
  finding TEXT NOT NULL,          -- JSON: lung box, boxes (quadrant, score, area), timings
  created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS slices_series ON slices(series_uid);
CREATE TABLE IF NOT EXISTS series (
  series_uid TEXT PRIMARY KEY,
  study_uid TEXT NOT NULL,
  series_key TEXT NOT NULL,
  study_key TEXT NOT NULL,
  description TEXT NOT NULL DEFAULT '',
  expected INTEGER,
  first_seen REAL NOT NULL,
  last_seen REAL NOT NULL,
  state TEXT NOT NULL DEFAULT 'open',   -- open | complete
  announced TEXT,                       -- provisional result last announced
  verdict TEXT,                         -- JSON SeriesVerdict (latest)
  complete_reason TEXT,
  labels TEXT,                          -- JSON patient labels, only when the site sends them
  updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS studies (
  study_uid TEXT PRIMARY KEY,
  study_key TEXT NOT NULL,
  fingerprint TEXT,                     -- of the last verdict published (no duplicate verdicts)
  result TEXT,
  state TEXT,
  updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS verdicts (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  study_key TEXT NOT NULL,
  series_key TEXT NOT NULL,
  state TEXT NOT NULL,
  result TEXT NOT NULL,
  payload TEXT NOT NULL,
  created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  topic TEXT NOT NULL,
  payload BLOB NOT NULL,
  qos INTEGER NOT NULL,
  retain INTEGER NOT NULL,
  expiry INTEGER,                       -- MQTT 5 message expiry interval (s)
  created REAL NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# -- findings ⇄ JSON ---------------------------------------------------------------------------------------------
def finding_to_dict(f: SliceFinding) -> dict[str, Any]:
    return {"key": f.key, "position": f.position, "shape": list(f.shape),
            "lung": f.lung.as_list() if f.lung else None,
            "boxes": [{"rect": b.rect.as_list(), "area_512": b.area_512, "score": b.score, "quadrant": b.quadrant}
                      for b in f.boxes],
            "max_prob": f.max_prob, "lesion_fraction": f.lesion_fraction, "timings_ms": f.timings_ms,
            "solids": [x.to_dict() for x in f.solids], "cores": [x.to_dict() for x in f.cores],
            "measures": f.measures.to_dict() if f.measures else None,
            "noise": f.noise, "smoothed": f.smoothed, "flat_boxes": f.flat_boxes, "pixel_mm": f.pixel_mm,
            "patient_position": f.patient_position}


def finding_from_dict(d: dict[str, Any]) -> SliceFinding:
    return SliceFinding(key=d["key"], position=float(d["position"]), shape=tuple(d["shape"]),  # type: ignore[arg-type]
                        lung=Rect(*d["lung"]) if d.get("lung") else None,
                        boxes=[Box(Rect(*b["rect"]), float(b["area_512"]), float(b["score"]), b["quadrant"])
                               for b in d.get("boxes", [])],
                        max_prob=float(d.get("max_prob", 0.0)), lesion_fraction=float(d.get("lesion_fraction", 0.0)),
                        timings_ms=dict(d.get("timings_ms", {})),
                        solids=[Solid.from_dict(x) for x in d.get("solids") or []],
                        cores=[Core.from_dict(x) for x in d.get("cores") or []],
                        measures=SliceMeasures.from_dict(d["measures"]) if d.get("measures") else None,
                        noise=float(d["noise"]) if d.get("noise") is not None else None,
                        smoothed=float(d.get("smoothed") or 0.0), flat_boxes=int(d.get("flat_boxes") or 0),
                        pixel_mm=float(d["pixel_mm"]) if d.get("pixel_mm") else None,
                        patient_position=str(d.get("patient_position") or ""))


def verdict_to_dict(v: SeriesVerdict) -> dict[str, Any]:
    return {"result": v.result, "state": v.state, "evidence": v.evidence.as_dict() if v.evidence else None,
            "slices": v.slices, "lung_slices": v.lung_slices, "lesion_slices": v.lesion_slices, "reason": v.reason,
            "gaps": v.gaps, "focal": v.focal.as_dict() if v.focal else None, "foci": v.foci, "others": v.others,
            "grade": v.grade, "acquisition": v.acquisition, "patient_position": v.patient_position}


def verdict_from_dict(d: dict[str, Any]) -> SeriesVerdict:
    ev, fo = d.get("evidence"), d.get("focal")
    return SeriesVerdict(result=d["result"], state=d["state"], evidence=Evidence(**ev) if ev else None,
                         slices=int(d["slices"]), lung_slices=int(d["lung_slices"]),
                         lesion_slices=int(d["lesion_slices"]), reason=d.get("reason"), gaps=int(d.get("gaps", 0)),
                         focal=Evidence(**fo) if fo else None, foci=int(d.get("foci", 0)),
                         others=list(d.get("others") or []), grade=d.get("grade"), acquisition=d.get("acquisition"),
                         patient_position=str(d.get("patient_position") or ""))


def _tuple(x: Any) -> Any:
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


@dataclass
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    expiry: int | None
    created: float
    attempts: int


class Store:
    """One SQLite connection shared by the daemon's threads under a lock (writes are short)."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no appliance state at {self.path}")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None, timeout=5.0)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed finding survives power loss
            self._db.executescript(SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO kv(key, value) VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._depth = 0

    def close(self) -> None:
        with self._lock:
            if not self.readonly:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator["Store"]:
        """Group writes: all of them or none. Nested use joins the outer transaction."""
        with self._lock:
            if self._depth == 0:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("COMMIT")

    def _x(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    # -- files and slices --------------------------------------------------------------------------------------
    def has_slice(self, ident: str) -> bool:
        return self._one("SELECT 1 FROM slices WHERE ident = ?", (ident,)) is not None

    def add_file(self, name: str, status: str, *, ident: str | None = None, series_uid: str | None = None,
                 path: str | None = None, reason: str | None = None, now: float | None = None) -> None:
        self._x("INSERT INTO files(name, ident, series_uid, status, path, reason, created) VALUES (?,?,?,?,?,?,?)",
                (name, ident, series_uid, status, path, reason, now or time.time()))

    def file_by_name(self, name: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM files WHERE name = ? ORDER BY id DESC LIMIT 1", (name,))

    def file_path(self, ident: str) -> str | None:
        r = self._one("SELECT path FROM files WHERE ident = ? AND status = 'analysed' ORDER BY id LIMIT 1", (ident,))
        return r["path"] if r else None

    def add_slice(self, ident: str, series_uid: str, order: tuple, finding: SliceFinding,
                  now: float | None = None) -> None:
        self._x("INSERT INTO slices(ident, series_uid, position, sort_key, finding, created) VALUES (?,?,?,?,?,?)",
                (ident, series_uid, finding.position, json.dumps(list(order)), json.dumps(finding_to_dict(finding)),
                 now or time.time()))

    def series_slices(self, series_uid: str) -> list[tuple[tuple, SliceFinding, str]]:
        """(sort key, finding, ident) of every stored slice of a series."""
        rows = self._all("SELECT ident, sort_key, finding FROM slices WHERE series_uid = ?", (series_uid,))
        return [(_tuple(json.loads(r["sort_key"])), finding_from_dict(json.loads(r["finding"])), r["ident"])
                for r in rows]

    # -- series and studies ------------------------------------------------------------------------------------
    def series_seen(self, series_uid: str, study_uid: str, series_key: str, study_key: str, *, description: str = "",
                    expected: int | None = None, now: float | None = None, labels: dict | None = None,
                    arrived: float | None = None) -> None:
        """Create the series row or move its last_seen (to `arrived`, when the slice reached the appliance, else
        `now`: the quiet time and the verdict latency count from arrival); a late slice reopens a complete series."""
        now = now or time.time()
        seen = arrived or now
        self._x("""INSERT INTO series(series_uid, study_uid, series_key, study_key, description, expected, first_seen,
                   last_seen, labels, updated) VALUES (?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(series_uid) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen),
                   expected = coalesce(excluded.expected, expected), state = 'open', updated = excluded.updated,
                   labels = coalesce(labels, excluded.labels)""",
                (series_uid, study_uid, series_key, study_key, description, expected, seen, seen,
                 json.dumps(labels) if labels else None, now))

    def rejected_count(self, series_uid: str) -> int:
        """Files of this series that were quarantined."""
        r = self._one("SELECT count(*) AS n FROM files WHERE series_uid = ? AND status = 'rejected'", (series_uid,))
        return int(r["n"]) if r else 0

    def set_series(self, series_uid: str, *, verdict: SeriesVerdict | None = None, announced: str | None = None,
                   state: str | None = None, complete_reason: str | None = None, now: float | None = None) -> None:
        sets, args = ["updated = ?"], [now or time.time()]
        if verdict is not None:
            sets.append("verdict = ?")
            args.append(json.dumps(verdict_to_dict(verdict)))
        if announced is not None:
            sets.append("announced = ?")
            args.append(announced)
        if state is not None:
            sets.append("state = ?")
            args.append(state)
        if complete_reason is not None:
            sets.append("complete_reason = ?")
            args.append(complete_reason)
        self._x(f"UPDATE series SET {', '.join(sets)} WHERE series_uid = ?", (*args, series_uid))

    def series(self, series_uid: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM series WHERE series_uid = ?", (series_uid,))

    def open_series(self) -> list[sqlite3.Row]:
        return self._all("SELECT * FROM series WHERE state = 'open' ORDER BY first_seen")

    def study_series(self, study_uid: str) -> list[sqlite3.Row]:
        return self._all("SELECT * FROM series WHERE study_uid = ? ORDER BY first_seen", (study_uid,))

    def study(self, study_uid: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM studies WHERE study_uid = ?", (study_uid,))

    def set_study(self, study_uid: str, study_key: str, fingerprint: str, result: str, state: str,
                  now: float | None = None) -> None:
        self._x("""INSERT INTO studies(study_uid, study_key, fingerprint, result, state, updated) VALUES (?,?,?,?,?,?)
                   ON CONFLICT(study_uid) DO UPDATE SET fingerprint = excluded.fingerprint, result = excluded.result,
                   state = excluded.state, updated = excluded.updated""",
                (study_uid, study_key, fingerprint, result, state, now or time.time()))

    # -- verdicts ----------------------------------------------------------------------------------------------
    def add_verdict(self, payload: dict[str, Any], now: float | None = None) -> None:
        self._x("INSERT INTO verdicts(study_key, series_key, state, result, payload, created) VALUES (?,?,?,?,?,?)",
                (payload["study_key"], payload["series_key"], payload["state"], payload["result"], json.dumps(payload),
                 now or time.time()))

    def recent_verdicts(self, limit: int = 10) -> list[dict[str, Any]]:
        rows = self._all("SELECT payload FROM verdicts ORDER BY id DESC LIMIT ?", (limit,))
        return [json.loads(r["payload"]) for r in rows]

    def verdicts(self, study_key: str | None = None) -> list[dict[str, Any]]:
        if study_key is None:
            rows = self._all("SELECT payload FROM verdicts ORDER BY id")
        else:
            rows = self._all("SELECT payload FROM verdicts WHERE study_key = ? ORDER BY id", (study_key,))
        return [json.loads(r["payload"]) for r in rows]

    # -- outbox ------------------------------------------------------------------------------------------------
    def outbox_add(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry: int | None = None,
                   now: float | None = None) -> int:
        cur = self._x("INSERT INTO outbox(topic, payload, qos, retain, expiry, created) VALUES (?,?,?,?,?,?)",
                      (topic, payload, qos, int(retain), expiry, now or time.time()))
        return int(cur.lastrowid or 0)

    def outbox_next(self, after: int = 0) -> OutboxMessage | None:
        """The oldest message (id > after) not yet acknowledged."""
        r = self._one("SELECT * FROM outbox WHERE id > ? ORDER BY id LIMIT 1", (after,))
        if r is None:
            return None
        return OutboxMessage(r["id"], r["topic"], bytes(r["payload"]), r["qos"], bool(r["retain"]), r["expiry"],
                             r["created"], r["attempts"])

    def outbox_attempt(self, msg_id: int) -> None:
        self._x("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", (msg_id,))

    def outbox_done(self, msg_id: int) -> None:
        """The broker acknowledged it: the message leaves the outbox."""
        self._x("DELETE FROM outbox WHERE id = ?", (msg_id,))

    def outbox_count(self) -> int:
        r = self._one("SELECT count(*) AS n FROM outbox")
        return int(r["n"]) if r else 0

    # -- counters and small values -----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {"analysed": 0, "duplicate": 0, "rejected": 0}
        for r in self._all("SELECT status, count(*) AS n FROM files GROUP BY status"):
            out[r["status"]] = int(r["n"])
        r = self._one("SELECT count(*) AS n, coalesce(sum(state = 'open'), 0) AS o FROM series")
        out["open_series"], out["series"] = (int(r["o"]), int(r["n"])) if r else (0, 0)
        out["outbox"] = self.outbox_count()
        return out

    def kv_get(self, key: str, default: str | None = None) -> str | None:
        r = self._one("SELECT value FROM kv WHERE key = ?", (key,))
        return r["value"] if r else default

    def kv_set(self, key: str, value: str) -> None:
        self._x("INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value))
