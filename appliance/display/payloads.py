"""The MQTT payloads the triage screen consumes, checked: JSON Schemas (widened in memory to what this screen
understands), dates, key images. Pure: no sockets, no threads.

Problems are reported with where and which rule failed, never with payload values (they could hold identifiers).
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import io
import json
import re
from pathlib import Path
from typing import Any

KEY_RE = re.compile(r"^[0-9a-f]{16}$")
DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_PAYLOAD = 4 * 1024 * 1024  # bytes; overlays carry a small PNG, anything larger is refused
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FINAL_STATES = ("final", "corrected")  # a corrected verdict is a final one that replaces an earlier final
RESULTS = ("positive", "negative", "indeterminate")
QUADRANTS = ("upper-left", "upper-right", "lower-left", "lower-right")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time(s: Any) -> dt.datetime | None:
    if not isinstance(s, str):
        return None
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def schema_dir() -> Path:
    """The JSON Schemas of the MQTT payloads: shipped in the package, or config/schemas in a checkout."""
    here = Path(__file__).resolve().parent
    for d in (here.parent / "schemas", here.parents[1] / "config" / "schemas"):
        if (d / "verdict.schema.json").is_file():
            return d
    raise FileNotFoundError("MQTT payload schemas not found (appliance/schemas or config/schemas)")


class Ignored(ValueError):
    """A message the screen does not use; the text says why (and never contains payload values)."""


class Validators:
    """jsonschema validators for the payloads the screen consumes and publishes."""

    def __init__(self, directory: Path | None = None) -> None:
        from jsonschema import Draft202012Validator

        d = directory or schema_dir()
        schemas = {name: json.loads((d / f"{name}.schema.json").read_text())
                   for name in ("verdict", "overlay", "status", "stats", "ack")}
        schemas["verdict"] = allow_corrections(schemas["verdict"])
        schemas["overlay"] = allow_corrections(schemas["overlay"], correction=False)
        self.by_name = {name: Draft202012Validator(schema) for name, schema in schemas.items()}

    def problem(self, name: str, payload: Any) -> str | None:
        """None when valid, else where and which rule failed (no values: they may be identifiers)."""
        err = next(iter(self.by_name[name].iter_errors(payload)), None)
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path) or "(root)"
            return f"{where}: {err.validator} rule failed"
        if name == "verdict":
            return correction_problem(payload)
        return None


#: what a corrected verdict says of the final it replaces (the display's own check; the schema may say more)
CORRECTION_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"], "additionalProperties": False,
    "required": ["previous_result", "previous_state", "previous_created", "what"],
    "properties": {"previous_result": {"enum": list(RESULTS)}, "previous_state": {"enum": list(FINAL_STATES)},
                   "previous_created": {"type": ["string", "null"]}, "what": {"type": "string", "maxLength": 500}}}

_PCT = {"type": "number", "minimum": 0, "maximum": 100}

#: the viral-pneumonia-pattern grade (ctriage.verdict/2), as far as this screen reads it
GRADE_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"], "required": ["category"],
    "properties": {"category": {"enum": ["typical", "indeterminate", "atypical", "negative"]},
                   "reasons": {"type": "array", "maxItems": 20, "items": {"type": "string", "maxLength": 200}},
                   "severity": {"type": "integer", "minimum": 0, "maximum": 25},
                   "regions": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0,
                                                                          "maximum": 5}},
                   "extent": {"type": "object", "additionalProperties": _PCT},
                   "zones": {"type": "object", "additionalProperties": _PCT},
                   "lesion_ml": {"type": "number", "minimum": 0}, "ground_glass_pct": _PCT, "peripheral_pct": _PCT,
                   "posterior_pct": _PCT}}

#: solid nodules and masses whose halo explained lesion runs (ctriage.verdict/2), as far as this screen reads them
OTHERS_SCHEMA: dict[str, Any] = {
    "type": "array", "maxItems": 50,
    "items": {"type": "object", "required": ["kind", "text"],
              "properties": {"kind": {"enum": ["nodule", "mass"]}, "diameter_mm": {"type": "number", "minimum": 0},
                             "first_slice": {"type": "integer", "minimum": 0},
                             "last_slice": {"type": "integer", "minimum": 0}, "quadrant": {"enum": list(QUADRANTS)},
                             "zone": {"enum": ["upper", "middle", "lower"]}, "mean_hu": {"type": "number"},
                             "z_mm": {"type": "number"}, "text": {"type": "string", "maxLength": 300}}}}


#: the series' image noise (ctriage.verdict/2, optional), as far as this screen reads it
ACQUISITION_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"], "required": ["noisy"],
    "properties": {"noise": {"type": "number", "minimum": 0}, "noisy": {"type": "boolean"},
                   "limit": {"type": "number", "minimum": 0}, "smoothed_slices": {"type": "integer", "minimum": 0},
                   "slices_measured": {"type": "integer", "minimum": 0},
                   "flat_boxes": {"type": "integer", "minimum": 0}}}

def allow_corrections(schema: dict[str, Any], correction: bool = True) -> dict[str, Any]:
    """The payload schema, widened (in memory) to state "corrected" and, for verdicts, the `correction` object, the
    `grade`, `others` and `acquisition` of ctriage.verdict/2 and its tag — whether or not the shipped schema file says so yet. A
    file that already allows them is returned unchanged in meaning."""
    out = json.loads(json.dumps(schema))
    props = out.setdefault("properties", {})
    state = props.get("state")
    if isinstance(state, dict) and isinstance(state.get("enum"), list) and "corrected" not in state["enum"]:
        state["enum"] = [*state["enum"], "corrected"]
    if correction:
        props.setdefault("correction", CORRECTION_SCHEMA)
        props.setdefault("grade", GRADE_SCHEMA)
        props.setdefault("others", OTHERS_SCHEMA)
        props.setdefault("acquisition", ACQUISITION_SCHEMA)
        tag = props.get("schema")
        if isinstance(tag, dict) and tag.get("const") == "ctriage.verdict/1":
            props["schema"] = {"enum": ["ctriage.verdict/1", "ctriage.verdict/2"]}
    return out


def correction_problem(v: dict[str, Any]) -> str | None:
    """A corrected verdict must say what it corrects; None when the verdict is fine."""
    if v.get("state") == "corrected" and not isinstance(v.get("correction"), dict):
        return "correction: required with state corrected"
    return None


def checked_png(data: str) -> bytes:
    """The key image's bytes from base64, when they are a whole PNG; else Ignored."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Ignored("image/data: not base64") from None
    if not raw.startswith(PNG_MAGIC):
        raise Ignored("image/data: not a PNG")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise Ignored("image/data: damaged PNG") from None
    return raw
