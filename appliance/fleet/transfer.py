"""Moving a bundle: one deterministic tar archive, sent inline as MQTT chunks or fetched over HTTP(S).

The archive holds manifest.json and the listed files, nothing else. The TUF targets metadata signs the archive's
length and sha256 (and each inline chunk's sha256), so an archive is checked before it is unpacked; the file hashes
manifest.json pins are checked after. Unpacking accepts regular files and directories with safe relative names,
within a size limit.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import ssl
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from appliance.durable import fsync_dir
from appliance.fleet.bundle_files import MANIFEST, safe_relpath
from appliance.inference.bundle import BundleError, load_bundle

MAX_BUNDLE_BYTES = 512 * 1024 * 1024
DEFAULT_CHUNK = 512 * 1024


class TransferError(BundleError):
    """A download or archive is incomplete, damaged or unsafe."""


@dataclass(frozen=True)
class ChunkSpec:
    size: int
    sha256: str


def pack(bundle_dir: str | Path) -> bytes:
    """Deterministic tar (sorted names, zero times and owners) of manifest.json and the listed files."""
    root = Path(bundle_dir)
    b = load_bundle(root, verify=False)
    names = [MANIFEST]
    names += sorted(str(safe_relpath(r)) for r in b.manifest["files"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in names:
            for parent in reversed(PurePosixPath(name).parents[:-1]):
                if str(parent) not in dirs:
                    dirs.add(str(parent))
                    ti = tarfile.TarInfo(str(parent))
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(ti)
            data = (root / name).read_bytes()
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def split(data: bytes, chunk_size: int = DEFAULT_CHUNK) -> list[bytes]:
    if chunk_size < 1024:
        raise ValueError("chunk size must be at least 1 KiB")
    return [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


def chunk_specs(chunks: list[bytes]) -> list[ChunkSpec]:
    return [ChunkSpec(len(c), hashlib.sha256(c).hexdigest()) for c in chunks]


def check_chunk(index: int, data: bytes, specs: list[ChunkSpec]) -> None:
    if not 0 <= index < len(specs):
        raise TransferError(f"chunk {index} is not in the release (it has {len(specs)} chunks)")
    want = specs[index]
    if len(data) != want.size:
        raise TransferError(f"chunk {index} has {len(data)} bytes, {want.size} signed (truncated or damaged)")
    if hashlib.sha256(data).hexdigest() != want.sha256:
        raise TransferError(f"chunk {index} sha256 differs from the signed targets metadata (damaged or altered in transfer)")


def assemble(chunk_dir: Path, count: int, out: Path, size: int, sha256: str) -> Path:
    """Concatenate chunk files 0..count-1 into `out` and check the archive's size and sha256."""
    h = hashlib.sha256()
    n = 0
    with open(out, "wb") as f:
        for i in range(count):
            data = (chunk_dir / str(i)).read_bytes()
            h.update(data)
            n += len(data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if n != size or h.hexdigest() != sha256:
        raise TransferError(f"assembled archive is {n} bytes with sha256 {h.hexdigest()[:12]}…, "
                            f"announced {size} bytes {sha256[:12]}…")
    return out


def fetch_url(url: str, out: Path, size: int, sha256: str, timeout: float = 60.0, ca_file: str = "",
              max_bytes: int = MAX_BUNDLE_BYTES) -> Path:
    """Download `url` (http/https/file) to `out`, checking size and sha256 while streaming."""
    if not url.startswith(("https://", "http://", "file://")):
        raise TransferError(f"unsupported URL scheme in {url!r} (https, http or file)")
    if size > max_bytes:
        raise TransferError(f"archive of {size} bytes exceeds the limit of {max_bytes}")
    ctx = ssl.create_default_context(cafile=ca_file or None) if url.startswith("https://") else None
    h = hashlib.sha256()
    n = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r, open(out, "wb") as f:
            while True:
                block = r.read(1 << 20)
                if not block:
                    break
                n += len(block)
                if n > size:
                    raise TransferError(f"{url}: more than the announced {size} bytes")
                h.update(block)
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except (urllib.error.URLError, OSError, ssl.SSLError) as e:
        raise TransferError(f"download failed: {getattr(e, 'reason', e)}") from None
    if n != size:
        raise TransferError(f"download ended after {n} of {size} bytes (truncated)")
    if h.hexdigest() != sha256:
        raise TransferError("downloaded archive sha256 mismatch")
    return out


def unpack(archive: Path, dest: Path, max_bytes: int = MAX_BUNDLE_BYTES) -> Path:
    """Extract regular files and directories with safe names into `dest` (created), fsync each file."""
    dest.mkdir(parents=True, exist_ok=False)
    total = 0
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for m in tar:
                rel = m.name.rstrip("/")
                if rel in ("", "."):
                    continue
                try:
                    p = PurePosixPath(rel) if rel == MANIFEST else safe_relpath(rel)
                except BundleError:
                    raise TransferError(f"archive member {m.name!r} has an unsafe path") from None
                target = dest.joinpath(*p.parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not m.isreg():
                    raise TransferError(f"archive member {m.name!r} is not a regular file")
                total += m.size
                if total > max_bytes:
                    raise TransferError(f"archive unpacks to more than {max_bytes} bytes")
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    raise TransferError(f"archive member {m.name!r} appears twice")
                src = tar.extractfile(m)
                assert src is not None
                with open(target, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
                    f.flush()
                    os.fsync(f.fileno())
    except tarfile.TarError as e:
        raise TransferError(f"archive is damaged ({e})") from None
    for d in sorted({p for p in dest.rglob("*") if p.is_dir()} | {dest}, key=lambda p: -len(p.parts)):
        fsync_dir(d)
    return dest


def copy_durable(src: Path, dest: Path) -> Path:
    """Copy a bundle directory (regular files only) into `dest` with every file fsynced."""
    dest.mkdir(parents=True, exist_ok=False)
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_symlink():
            raise TransferError(f"unexpected symlink {rel.as_posix()} in {src}")
        if p.is_dir():
            (dest / rel).mkdir(parents=True, exist_ok=True)
        elif p.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(p, "rb") as fi, open(dest / rel, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
    for d in sorted({p for p in dest.rglob("*") if p.is_dir()} | {dest}, key=lambda p: -len(p.parts)):
        fsync_dir(d)
    return dest
