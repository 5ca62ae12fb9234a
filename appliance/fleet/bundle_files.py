"""What a bundle directory holds, checked without any key: manifest.json pins every file by sha256, so the sha256
of manifest.json (the bundle's identity, which the TUF targets metadata names) covers the whole bundle. A bundle is
whole when every listed file has its recorded sha256 and the directory holds nothing else (no unlisted file, no
symlink)."""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from appliance.durable import atomic_write
from appliance.inference.bundle import Bundle, BundleError, load_bundle, sha256_file

MANIFEST = "manifest.json"
CONTROL_FILES = frozenset({MANIFEST})
LEGACY_SIGNATURE = "manifest.sig"  # before TUF: a flat Ed25519 signature; ignored and not transferred


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
            if n in filenames and rel not in listed and rel not in CONTROL_FILES and rel != LEGACY_SIGNATURE:
                raise BundleError(f"unlisted file {rel}")
    for rel, digest in sorted(listed.items()):
        p = root / rel
        if not p.is_file():
            raise BundleError(f"file {rel} missing")
        if sha256_file(p) != str(digest).lower():
            raise BundleError(f"file {rel} sha256 mismatch")
    return len(listed)


def whole_bundle(path: str | Path) -> Bundle:
    """The bundle at `path` after checking it is whole (BundleError naming the first problem)."""
    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{root}: no manifest.json (not a model bundle)")
    b = load_bundle(root, verify=False)
    check_contents(root, b.manifest)
    return b


def rehash(path: str | Path) -> dict:
    """Rewrite manifest.json's files{} from what is in the directory (after editing a bundle on purpose)."""
    root = Path(path)
    mf = root / MANIFEST
    manifest = json.loads(mf.read_text())
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.is_symlink() and rel not in CONTROL_FILES and rel != LEGACY_SIGNATURE:
            files[rel] = sha256_file(p)
    manifest["files"] = files
    atomic_write(mf, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest
