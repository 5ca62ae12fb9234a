"""Model bundles: list what is shipped, installed and active; sign, verify, publish to the fleet, install, roll back.

  ctriage models keygen OUT_DIR                      Ed25519 key pair: OUT_DIR/signing.key (0600), signing.pub
  ctriage models sign BUNDLE --key KEY [--rehash]    write manifest.sig over manifest.json
  ctriage models verify BUNDLE [--trust PUB ...]     signature + every file hash + nothing unlisted (exit 0 = good)
  ctriage models publish BUNDLE --key KEY [--mqtt-url URL] [--devices a,b] [--groups g] [--url URL]
  ctriage models install BUNDLE [--trust PUB ...] [--state-dir DIR]   (a directory or a published .tar archive)
  ctriage models rollback NAME [--state-dir DIR]
  ctriage models list [--state-dir DIR] [--json]

Exit status: 0 on success; 1 when an install or rollback was refused or failed (the reason is printed);
2 for bad input, including a bundle that does not verify (one line says exactly why).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from appliance.errors import UsageError
from appliance.commands.common import add_config_argument, load_config, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def state_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--state-dir", metavar="DIR", help="appliance state directory (default: config state_dir)")
        sp.add_argument("--shipped", metavar="DIR", help="bundles shipped with the software (default: models/bundles)")
        add_config_argument(sp)

    sp = sub.add_parser("list", help="shipped, installed and active bundles with versions and hashes")
    state_args(sp)
    sp.add_argument("--json", action="store_true", help="one JSON object per bundle")
    sp.add_argument("--trust", action="append", default=[], metavar="PUBLIC_KEY",
                    help="check signatures against this key (repeatable; default: fleet.trust_keys or the project key)")

    sp = sub.add_parser("keygen", help="create an Ed25519 signing key pair")
    sp.add_argument("out_dir", metavar="OUT_DIR")

    sp = sub.add_parser("sign", help="sign a bundle (writes manifest.sig)")
    sp.add_argument("bundle", metavar="BUNDLE")
    sp.add_argument("--key", required=True, metavar="PRIVATE_KEY")
    sp.add_argument("--rehash", action="store_true",
                    help="first rewrite manifest.json's file hashes from the files present (after editing a bundle)")

    sp = sub.add_parser("verify", help="check a bundle's signature and files")
    sp.add_argument("bundle", metavar="BUNDLE")
    sp.add_argument("--trust", action="append", default=[], metavar="PUBLIC_KEY",
                    help="trusted public key (repeatable; default: fleet.trust_keys or the project key)")
    add_config_argument(sp)

    sp = sub.add_parser("publish", help="announce a signed bundle to the fleet over MQTT")
    sp.add_argument("bundle", metavar="BUNDLE")
    sp.add_argument("--key", required=True, metavar="PRIVATE_KEY", help="the key the bundle is signed with")
    sp.add_argument("--mqtt-url", metavar="URL", help="mqtt[s]://[user:pass@]host:port (default: config mqtt.url)")
    sp.add_argument("--devices", default="", metavar="A,B", help="only these devices (default: all)")
    sp.add_argument("--groups", default="", metavar="G1,G2", help="only devices in these rollout groups")
    sp.add_argument("--url", metavar="URL", help="also announce this HTTP(S) URL of the archive (see --archive-out)")
    sp.add_argument("--archive-out", metavar="FILE", help="write the bundle archive here (to host it for --url)")
    sp.add_argument("--no-inline", action="store_true", help="do not send the files over MQTT (needs --url)")
    sp.add_argument("--chunk-kb", type=int, default=512, help="inline chunk size in KiB (default 512)")
    sp.add_argument("--prefix", help="topic prefix (default: config mqtt.prefix)")
    add_config_argument(sp)

    sp = sub.add_parser("install", help="verify, self-test and activate a bundle in a state directory")
    sp.add_argument("bundle", metavar="BUNDLE", help="bundle directory or .tar archive")
    sp.add_argument("--trust", action="append", default=[], metavar="PUBLIC_KEY",
                    help="trusted public key (repeatable; default: fleet.trust_keys or the project key)")
    sp.add_argument("--backend", choices=["auto", "openvino", "onnxruntime"],
                    help="self-test backend (default: config)")
    sp.add_argument("--precision", choices=["int8", "fp32"], help="self-test precision (default: config)")
    state_args(sp)

    sp = sub.add_parser("rollback", help="go back to the previous bundle of NAME")
    sp.add_argument("name", metavar="NAME", help="bundle name (lesion, valid-area)")
    state_args(sp)


def run(args: argparse.Namespace) -> int:
    return {"list": _list, "keygen": _keygen, "sign": _sign, "verify": _verify, "publish": _publish,
            "install": _install, "rollback": _rollback}[args.action](args)


def _trust(args: argparse.Namespace) -> list[str]:
    from appliance.fleet.updater import default_trust_keys

    cfg = load_config(args)
    keys = default_trust_keys(cfg.fleet.trust_keys, args.trust)
    if not keys:
        raise UsageError("no trusted public key: give --trust FILE or set fleet.trust_keys")
    return keys


def _keygen(args: argparse.Namespace) -> int:
    from appliance.fleet.signing import generate_keypair, load_public_key

    key, pub = generate_keypair(args.out_dir)
    print(f"private key {key} (mode 0600: keep it off the appliances, e.g. on the release machine or an HSM)")
    print(f"public key  {pub} (key id {load_public_key(pub).key_id}: list it in fleet.trust_keys on the appliances)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from appliance.fleet.signing import key_id, load_private_key, sign_bundle

    kp = Path(args.key)
    if kp.is_file() and os.stat(kp).st_mode & 0o077:
        print(f"warning: {kp} is readable by other users (chmod 600 it)", file=sys.stderr)
    key = load_private_key(kp)
    b, _ = sign_bundle(args.bundle, key, rehash_files=args.rehash)
    print(f"signed {b.name} {b.version} (manifest sha256 {b.sha256}) with key {key_id(key.public_key())}: "
          f"{Path(args.bundle) / 'manifest.sig'}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from appliance.fleet.signing import load_trust, verify_bundle
    from appliance.inference.bundle import BundleError

    trust = load_trust(_trust(args))
    try:
        b, signer = verify_bundle(args.bundle, trust)
    except BundleError as e:
        raise BundleError(f"{args.bundle}: {e}") from None
    print(f"OK {b.name} {b.version} (manifest sha256 {b.sha256}): signature by key {signer.key_id} "
          f"({signer.source}), {len(b.manifest['files'])} files verified")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from appliance.fleet import announce
    from appliance.fleet.signing import load_private_key

    cfg = load_config(args)
    m = cfg.mqtt
    prefix = args.prefix or m.prefix
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    if args.chunk_kb < 1 or args.chunk_kb > 256 * 1024:
        raise UsageError("--chunk-kb must be between 1 and 262144")
    key = load_private_key(args.key)
    ann, archive, chunks = announce.build(args.bundle, key, prefix=prefix, devices=split(args.devices),
                                          groups=split(args.groups), inline=not args.no_inline, url=args.url,
                                          chunk_size=args.chunk_kb * 1024)
    if args.archive_out:
        Path(args.archive_out).write_bytes(archive)
        print(f"archive {args.archive_out}: {len(archive)} bytes, sha256 {ann['archive']['sha256']}")
    password = os.environ.get("CTRIAGE_MQTT_PASSWORD", "")
    if m.password_file:
        password = Path(m.password_file).expanduser().read_text().strip()
    client = announce.mqtt_client(args.mqtt_url or m.url, username=m.username, password=password, ca_file=m.ca_file,
                                  cert_file=m.cert_file, key_file=m.key_file, tls_insecure=m.tls_insecure)
    try:
        res = announce.publish_announcement(client, ann, chunks, prefix=prefix)
    finally:
        client.disconnect()
        client.loop_stop()
    targets = [",".join(ann["targets"]["devices"]), ",".join(f"group {g}" for g in ann["targets"]["groups"])]
    who = ", ".join(x for x in targets if x) or "all devices"
    print(f"announced {ann['name']} {ann['version']} on {res['topic']} (retained) for {who}: {len(archive)} bytes"
          + (f" in {res['chunks']} chunks at {res['chunk_topic']}/<i>" if res["chunks"] else "")
          + (f", url {args.url}" if args.url else "")
          + (f"; cleared {res['cleared_previous_chunks']} chunks of the previous version"
             if res["cleared_previous_chunks"] else ""))
    return 0


def _updater(args: argparse.Namespace, trust: list[str]):
    from appliance.fleet.updater import Updater

    cfg = load_config(args)
    if getattr(args, "backend", None):
        cfg.analysis.backend = args.backend
    if getattr(args, "precision", None):
        cfg.analysis.precision = args.precision
    return Updater(cfg.state_path, trust, cfg.analysis, None, None, device=cfg.device_id, prefix=cfg.mqtt.prefix,
                   shipped_dir=args.shipped)


def _install(args: argparse.Namespace) -> int:
    up = _updater(args, _trust(args))
    res = up.install_path(args.bundle)
    b = res.bundle or {}
    if res.outcome == "installed":
        prev = f" (previous {res.previous['version']})" if res.previous else ""
        st = res.detail.get("selftest", {})
        print(f"installed {b['name']} {b['version']}{prev}: self-test on {st.get('backend')} {st.get('precision')} "
              f"mask agreement {st.get('mask_agreement')}; active in {up.state.active}. "
              "A running appliance uses it after its next restart.")
        return 0
    if res.outcome == "unchanged":
        print(res.reason)
        return 0
    print(f"{res.outcome} at {res.step}: {res.reason}", file=sys.stderr)
    return 1


def _rollback(args: argparse.Namespace) -> int:
    up = _updater(args, [])
    res = up.rollback(args.name)
    print(f"rolled back {args.name} from {res.previous['version']} to {res.bundle['version']}; "  # type: ignore[index]
          f"{res.previous['version']} will not be installed automatically again. "  # type: ignore[index]
          "A running appliance uses it after its next restart.")
    return 0


def _list(args: argparse.Namespace) -> int:
    from appliance.fleet.signing import load_trust, verify_bundle
    from appliance.fleet.bundle_store import BundleState, active_bundle_dir
    from appliance.fleet.updater import default_trust_keys
    from appliance.inference.bundle import BundleError, find_bundles, load_bundle

    cfg = load_config(args)
    st = BundleState(cfg.state_path, args.shipped)
    try:
        trust = load_trust(default_trust_keys(cfg.fleet.trust_keys, args.trust))
    except BundleError:
        trust = []
    in_use_active = active_bundle_dir(cfg.state_path) is not None
    active = {n: t for n, t in st.links("active").items() if t}
    previous = {n: t for n, t in st.links("previous").items() if t}
    rows: list[dict] = []

    def add(path: Path, where: str, in_use: bool) -> None:
        try:
            b = load_bundle(path, verify=False)
        except BundleError as e:
            rows.append({"name": path.name, "version": "?", "where": where, "in_use": False, "sha256": "",
                         "signature": f"broken: {e}", "path": str(path)})
            return
        try:
            _, signer = verify_bundle(path, trust)
            sig = f"ok ({signer.key_id})"
        except BundleError as e:
            sig = str(e)
        rows.append({"name": b.name, "version": b.version, "where": where, "in_use": in_use, "sha256": b.sha256,
                     "signature": sig, "path": str(path)})

    for name, b in sorted(find_bundles(st.shipped_dir).items()):
        add(b.path, "shipped", not in_use_active)
    refs = {}
    for name, t in sorted(active.items()):
        refs[t] = "active"
        add(t, "active", in_use_active)
    for name, t in sorted(previous.items()):
        refs.setdefault(t, "previous")
        if refs[t] == "previous":
            add(t, "previous", False)
    if st.store.is_dir():
        for d in sorted(st.store.iterdir()):
            if d.resolve() not in refs:
                add(d, "store", False)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print("no bundles found")
        return 0
    print(table([[("* " if r["in_use"] else "  ") + r["name"], r["version"], r["where"], r["sha256"][:16],
                  r["signature"][:48], r["path"]] for r in rows],
                ["  name", "version", "where", "sha256", "signature", "path"]))
    print("\n* in use" + ("" if in_use_active else " (the shipped bundles: nothing installed in "
                                                   f"{st.active})"))
    return 0
