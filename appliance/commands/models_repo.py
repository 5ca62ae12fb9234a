"""`ctriage models` for the fleet operator: keys, the TUF repository (init, sign, withdraw, timestamp, rotate,
revoke, show) and publishing it to the broker; `appliance.commands.models` registers these parsers."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from appliance.commands.common import add_config_argument, load_config
from appliance.errors import UsageError

PROJECT_REPO = Path(__file__).resolve().parents[2] / "models" / "repository"
OPERATOR = ("keygen", "init", "sign", "withdraw", "timestamp", "rotate", "revoke", "show", "publish")


def repo_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--repo", metavar="REPO", help=f"TUF repository directory (default: the project's, {PROJECT_REPO})")


def repo_path(args: argparse.Namespace) -> Path:
    return Path(args.repo).expanduser().resolve() if getattr(args, "repo", None) else PROJECT_REPO.resolve()


def _keys_arg(sp: argparse.ArgumentParser, what: str) -> None:
    sp.add_argument("--keys", action="append", default=[], metavar="DIR_OR_KEY", required=True,
                    help=f"private key directory (root.key, targets.key, …) or key file; repeatable. Used: {what}")


def _days_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--expires", action="append", default=[], metavar="ROLE=DAYS",
                    help="expiry of new metadata per role (defaults: root 365, targets 365, snapshot 30, timestamp 7)")


def add_operator_parsers(sub) -> None:
    sp = sub.add_parser("keygen", help="create Ed25519 key pair(s): one per TUF role with --roles")
    sp.add_argument("out_dir", metavar="OUT_DIR")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--roles", action="store_true", help="root, targets, snapshot and timestamp key pairs")
    g.add_argument("--name", default="signing", help="file name of one key pair (default signing: signing.key/.pub)")

    sp = sub.add_parser("init", help="create a TUF repository: root v1, empty targets, snapshot, timestamp")
    sp.add_argument("repo", metavar="REPO")
    _keys_arg(sp, "the public half of each role's key names the role's key; all four sign")
    sp.add_argument("--threshold", action="append", default=[], metavar="ROLE=N", help="signatures a role needs")
    sp.add_argument("--legacy-key", action="append", default=[], metavar="PRIVATE_KEY",
                    help="a flat (pre-TUF) signing key the deployed appliances trust: it also signs root v1, so "
                         "they accept it once (migration)")
    _days_arg(sp)

    sp = sub.add_parser("sign", help="name a bundle as a release in the targets metadata (new targets, snapshot, "
                                     "timestamp)")
    sp.add_argument("bundle", metavar="BUNDLE")
    repo_arg(sp)
    _keys_arg(sp, "targets, snapshot and timestamp keys")
    sp.add_argument("--devices", default="", metavar="A,B", help="only these devices (default: all)")
    sp.add_argument("--groups", default="", metavar="G1,G2", help="only devices in these rollout groups")
    sp.add_argument("--rollback-from", action="append", metavar="VERSION",
                    help="a rollback order: this older release may replace exactly these active versions")
    sp.add_argument("--url", metavar="URL", help="an HTTP(S) mirror of the archive (publish --archive-out writes it)")
    sp.add_argument("--no-inline", action="store_true", help="the files do not travel over MQTT (needs --url)")
    sp.add_argument("--chunk-kb", type=int, default=512, help="inline chunk size in KiB (default 512)")
    sp.add_argument("--rehash", action="store_true",
                    help="first rewrite manifest.json's file hashes from the files present (after editing a bundle)")
    _days_arg(sp)

    sp = sub.add_parser("withdraw", help="remove a release from the targets metadata")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("version", metavar="VERSION")
    repo_arg(sp)
    _keys_arg(sp, "targets, snapshot and timestamp keys")
    _days_arg(sp)

    sp = sub.add_parser("timestamp", help="new timestamp (and with --snapshot a new snapshot): the freshness step")
    repo_arg(sp)
    _keys_arg(sp, "timestamp (and snapshot) keys")
    sp.add_argument("--snapshot", action="store_true", help="also a new snapshot (before it expires)")
    _days_arg(sp)

    sp = sub.add_parser("rotate", help="new root version: add or remove keys of a role, change its threshold")
    repo_arg(sp)
    _keys_arg(sp, "the old root keys and the new ones sign the new root; re-signed roles need their keys")
    sp.add_argument("--role", required=True, choices=["root", "targets", "snapshot", "timestamp"])
    sp.add_argument("--add", action="append", default=[], metavar="PUBLIC_KEY", help="a key for the role")
    sp.add_argument("--remove", action="append", default=[], metavar="KEY_ID", help="key id (or prefix) to drop")
    sp.add_argument("--threshold", type=int, help="signatures the role needs from now on")
    _days_arg(sp)

    sp = sub.add_parser("revoke", help="new root version without a key, in every role it had (lost or leaked)")
    sp.add_argument("key", metavar="KEY_ID_OR_PUBLIC_KEY")
    repo_arg(sp)
    _keys_arg(sp, "the root keys sign; re-signed roles need their keys")
    sp.add_argument("--add", action="append", default=[], metavar="PUBLIC_KEY",
                    help="replacement key, added to the same roles")
    _days_arg(sp)

    sp = sub.add_parser("show", help="roles, keys, thresholds, versions, expiries and releases of a repository")
    repo_arg(sp)
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("publish", help="send the repository metadata (and the files of BUNDLEs) to the broker")
    sp.add_argument("bundles", nargs="*", metavar="BUNDLE", help="bundle directories whose archives travel inline")
    repo_arg(sp)
    sp.add_argument("--mqtt-url", metavar="URL", help="mqtt[s]://[user:pass@]host:port (default: config mqtt.url)")
    sp.add_argument("--archive-out", metavar="DIR", help="also write each BUNDLE's archive here (for a --url mirror)")
    sp.add_argument("--prefix", help="topic prefix (default: config mqtt.prefix)")
    add_config_argument(sp)


def run(args: argparse.Namespace) -> int:
    return {"keygen": _keygen, "init": _init, "sign": _sign, "withdraw": _withdraw, "timestamp": _timestamp,
            "rotate": _rotate, "revoke": _revoke, "show": _show, "publish": _publish}[args.action](args)


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _pairs(items: list[str], what: str, conv=float) -> dict[str, Any]:
    out = {}
    for it in items:
        role, _, v = it.partition("=")
        if role not in ("root", "targets", "snapshot", "timestamp") or not v:
            raise UsageError(f"{what} {it!r}: expected ROLE=VALUE with ROLE root, targets, snapshot or timestamp")
        try:
            out[role] = conv(v)
        except ValueError:
            raise UsageError(f"{what} {it!r}: {v!r} is not a number") from None
        if out[role] <= 0:
            raise UsageError(f"{what} {it!r}: must be positive")
    return out


def _signers(args: argparse.Namespace):
    from appliance.fleet.keys import load_signers

    for k in args.keys:
        p = Path(k).expanduser()
        if p.is_file() and os.stat(p).st_mode & 0o077:
            print(f"warning: {p} is readable by other users (chmod 600 it)", file=sys.stderr)
    return load_signers(args.keys)


def _repo(args: argparse.Namespace):
    from appliance.fleet.repository import Repository

    r = Repository(repo_path(args))
    if not r.exists():
        raise UsageError(f"{r.dir} is not a fleet repository (no root.json; create one with `ctriage models init`)")
    return r


def _keygen(args: argparse.Namespace) -> int:
    from appliance.fleet.keys import generate_keypair, generate_role_keys, load_public, short_id

    keys = generate_role_keys(args.out_dir) if args.roles else [generate_keypair(args.out_dir, args.name)[0]]
    for k in keys:
        print(f"{k} (0600: keep it off the appliances) · {k.with_suffix('.pub')} key id "
              f"{short_id(load_public(k.with_suffix('.pub')).keyid)}")
    return 0


def _init(args: argparse.Namespace) -> int:
    from appliance.fleet.keys import ROLES, load_public, load_signers
    from appliance.fleet.repository import Repository

    signers = _signers(args)
    keys: dict[str, list] = {r: [] for r in ROLES}
    for d in map(Path, args.keys):
        for role in ROLES:
            pub = d / f"{role}.pub" if d.is_dir() else None
            if pub is not None and pub.is_file():
                keys[role].append(load_public(pub))
    repo = Repository.init(args.repo, keys, signers, _pairs(args.threshold, "--threshold", int),
                           _pairs(args.expires, "--expires"), load_signers(args.legacy_key) if args.legacy_key else [])
    print(f"created {repo.dir}: root v1 (" + "; ".join(f"{r} {len(k)} key(s)" for r, k in keys.items()) + ")"
          + (f", also signed by {len(args.legacy_key)} legacy key(s) for migration" if args.legacy_key else ""))
    print(f"appliances start from {repo.dir / 'root.json'} (fleet.trust_root); keep root.key offline")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from appliance.fleet.bundle_files import rehash

    if args.chunk_kb < 1 or args.chunk_kb > 256 * 1024:
        raise UsageError("--chunk-kb must be between 1 and 262144")
    repo, signers = _repo(args), _signers(args)
    if args.rehash:
        rehash(args.bundle)
    rel, _ = repo.add_bundle(args.bundle, signers, devices=_split(args.devices), groups=_split(args.groups),
                             rollback_from=args.rollback_from, url=args.url, inline=not args.no_inline,
                             chunk_size=args.chunk_kb * 1024, days=_pairs(args.expires, "--expires"))
    d = repo.describe()
    who = ", ".join([*rel.devices, *(f"group {g}" for g in rel.groups)]) or "every device"
    print(f"signed {rel.name} {rel.version} (manifest sha256 {rel.manifest_sha256}) as {rel.path} for {who} in "
          f"{repo.dir}: targets v{d['targets']['version']}, snapshot v{d['snapshot']['version']}, timestamp "
          f"v{d['timestamp']['version']} (expires {d['timestamp']['expires']}). Next: ctriage models publish "
          f"{args.bundle}" + (f" --repo {repo.dir}" if args.repo else ""))
    return 0


def _withdraw(args: argparse.Namespace) -> int:
    repo = _repo(args)
    repo.remove_release(args.name, args.version, _signers(args), _pairs(args.expires, "--expires"))
    print(f"withdrew {args.name} {args.version}: targets v{repo.describe()['targets']['version']}")
    return 0


def _timestamp(args: argparse.Namespace) -> int:
    repo = _repo(args)
    snap, ts = repo.refresh(_signers(args), _pairs(args.expires, "--expires"), snapshot=args.snapshot)
    print(f"timestamp v{ts} (expires {repo.describe()['timestamp']['expires']}), snapshot v{snap}; publish it: "
          "ctriage models publish" + (f" --repo {repo.dir}" if args.repo else ""))
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from appliance.fleet.keys import load_public
    from appliance.fleet.repository import Change

    repo = _repo(args)
    change = Change(args.role, tuple(load_public(p) for p in args.add), tuple(args.remove), args.threshold)
    if not (change.add or change.remove or change.threshold):
        raise UsageError("nothing to rotate: give --add, --remove or --threshold")
    v = repo.rotate([change], _signers(args), _pairs(args.expires, "--expires"))
    r = repo.describe()["roles"][args.role]
    print(f"root v{v}: {args.role} trusts {', '.join(r['keys'])} (threshold {r['threshold']}); publish it so the "
          "appliances follow")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from appliance.fleet.keys import load_public
    from appliance.fleet.repository import Change

    repo = _repo(args)
    ref = load_public(args.key).keyid if Path(args.key).is_file() else args.key.lower()
    roles = {role: r for role, r in repo.root().signed.roles.items() if any(k.startswith(ref) for k in r.keyids)}
    if not roles:
        raise UsageError(f"no role of {repo.dir} trusts key {args.key}")
    add = tuple(load_public(p) for p in args.add)
    v = repo.rotate([Change(role, add, (ref,)) for role in roles], _signers(args), _pairs(args.expires, "--expires"))
    print(f"root v{v}: key {ref[:16]} revoked from {', '.join(roles)}; publish it so the appliances follow")
    return 0


def describe_text(d: dict[str, Any], title: str) -> str:
    lines = [title]
    if "root" not in d:
        return title + ": no root trusted yet"
    for role in ("root", "timestamp", "snapshot", "targets"):
        if role in d:
            m, r = d[role], d.get("roles", {}).get(role)
            keys = f"  keys {', '.join(r['keys'])} (threshold {r['threshold']})" if r else ""
            lines.append(f"  {role:<9} v{m['version']:<4} expires {m['expires']}{' EXPIRED' if m['expired'] else ''}"
                         + keys)
    for r in d.get("releases", []):
        who = ", ".join([*r["devices"], *(f"group {g}" for g in r["groups"])]) or "every device"
        lines.append(f"  release {r['name']} {r['version']} for {who}")
    if d.get("stale"):
        lines.append(f"  stale: {d['stale']}")
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    d = _repo(args).describe()
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(describe_text(d, str(d["repository"])))
    return 0


def _mqtt(args: argparse.Namespace):
    from appliance.fleet.distribution import mqtt_client

    m = load_config(args).mqtt
    password = os.environ.get("CTRIAGE_MQTT_PASSWORD", "")
    if m.password_file:
        password = Path(m.password_file).expanduser().read_text().strip()
    return mqtt_client(args.mqtt_url or m.url, username=m.username, password=password, ca_file=m.ca_file,
                       cert_file=m.cert_file, key_file=m.key_file, tls_insecure=m.tls_insecure)


def _publish(args: argparse.Namespace) -> int:
    from appliance.fleet.bundle_files import whole_bundle
    from appliance.fleet.distribution import chunk_base, publish_files
    from appliance.fleet.transfer import pack, split
    from appliance.inference.bundle import BundleError

    repo = _repo(args)
    prefix = args.prefix or load_config(args).mqtt.prefix
    rels = {r.manifest_sha256: r for r in repo.releases()}
    chunks: dict[str, list[bytes]] = {}
    for bdir in args.bundles:
        b = whole_bundle(bdir)
        rel = rels.get(b.sha256)
        if rel is None:
            raise BundleError(f"{bdir}: {b.name} {b.version} is not a release of {repo.dir} (sign it first)")
        archive = pack(bdir)
        if len(archive) != rel.length or hashlib.sha256(archive).hexdigest() != rel.sha256:
            raise BundleError(f"{bdir}: its archive differs from the signed one (sign it again)")
        if args.archive_out:
            Path(args.archive_out).mkdir(parents=True, exist_ok=True)
            (Path(args.archive_out) / rel.path).write_bytes(archive)
            print(f"archive {Path(args.archive_out) / rel.path}: {len(archive)} bytes, sha256 {rel.sha256}")
        if rel.chunks:
            chunks[chunk_base(prefix, rel.name, rel.version)] = split(archive, rel.chunk_size)
    client = _mqtt(args)
    try:
        n = publish_files(client, repo.files(), chunks, prefix=prefix)
    finally:
        client.disconnect()
        client.loop_stop()
    d = repo.describe()
    print(f"published {repo.dir} to {prefix}/fleet/metadata/ (retained): {n['metadata']} metadata files (root "
          f"v{d['root']['version']}, targets v{d['targets']['version']}, timestamp v{d['timestamp']['version']}), "
          f"{n['chunks']} chunks of {len(chunks)} bundle(s)")
    return 0


def fleet_trust(args: argparse.Namespace) -> int:
    """What every device reports it trusts (retained `<prefix>/+/trust`)."""
    prefix = load_config(args).mqtt.prefix
    client = _mqtt(args)
    got: dict[str, dict] = {}
    done = threading.Event()
    client.on_message = lambda c, u, m: got.__setitem__(m.topic.split("/")[-2], json.loads(m.payload or b"{}"))
    client.on_subscribe = lambda *a: done.set()
    client.subscribe(f"{prefix}/+/trust", qos=1)
    done.wait(5)
    threading.Event().wait(1.0)  # retained messages follow the subscription's acknowledgement
    client.disconnect()
    client.loop_stop()
    if args.json:
        print(json.dumps(got, indent=1))
    for dev, p in sorted(got.items()):
        if not args.json:
            print(describe_text(p, dev))
    if not got:
        print("no device has reported what it trusts", file=sys.stderr)
    return 0
