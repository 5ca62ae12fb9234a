"""Model bundles and the fleet's trust in them (The Update Framework; docs/FLEET.md).

Operator (a repository of TUF metadata; REPO defaults to the project's, models/repository):
  ctriage models keygen OUT_DIR [--roles | --name NAME]   Ed25519 key pair(s) (private 0600)
  ctriage models init REPO --keys DIR [--threshold ROLE=N] [--expires ROLE=DAYS] [--legacy-key KEY]
  ctriage models sign BUNDLE --keys DIR [--repo REPO] [--devices a,b] [--groups g] [--rollback-from V] [--url URL]
  ctriage models withdraw NAME VERSION --keys DIR [--repo REPO]
  ctriage models timestamp --keys DIR [--repo REPO] [--snapshot]     the routine freshness step
  ctriage models rotate --role ROLE --keys DIR… [--add PUB] [--remove KEY] [--threshold N] [--repo REPO]
  ctriage models revoke KEY --keys DIR… [--add PUB] [--repo REPO]   a key out of every role (a rotation)
  ctriage models show [--repo REPO] [--json]
  ctriage models publish [BUNDLE …] [--repo REPO] [--mqtt-url URL] [--archive-out DIR]
Appliance:
  ctriage models verify BUNDLE [--repo REPO] [--root ROOT]           bundle named by a repository's verified chain
  ctriage models trust [--state-dir DIR | --mqtt-url URL] [--json]   what this appliance (or each device) trusts
  ctriage models install BUNDLE [--repo REPO] [--trust-root ROOT] [--state-dir DIR]
  ctriage models rollback NAME [--state-dir DIR]
  ctriage models list [--state-dir DIR] [--json]

Exit status: 0 on success; 1 when an install or rollback was refused or failed (the reason is printed);
2 for bad input, including a bundle or metadata that does not verify (one line says exactly why).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appliance.commands import models_repo
from appliance.commands.common import add_config_argument, load_config, table
from appliance.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    models_repo.add_operator_parsers(sub)

    def state_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--state-dir", metavar="DIR", help="appliance state directory (default: config state_dir)")
        sp.add_argument("--shipped", metavar="DIR", help="bundles shipped with the software (default: models/bundles)")
        add_config_argument(sp)

    sp = sub.add_parser("verify", help="check a bundle against a repository's TUF metadata, from a trusted root")
    sp.add_argument("bundle", metavar="BUNDLE")
    models_repo.repo_arg(sp)
    sp.add_argument("--root", metavar="ROOT_JSON",
                    help="trusted root to start the chain from (default: the shipped config/trust/root.json for the "
                         "project repository, else the repository's own 1.root.json)")

    sp = sub.add_parser("trust", help="what this appliance trusts (root, keys, thresholds, metadata versions)")
    state_args(sp)
    sp.add_argument("--mqtt-url", metavar="URL", help="instead: what every device reports (retained …/trust topics)")
    sp.add_argument("--json", action="store_true", help="JSON output")

    sp = sub.add_parser("list", help="shipped, installed and active bundles with versions and hashes")
    state_args(sp)
    sp.add_argument("--json", action="store_true", help="one JSON object per bundle")

    sp = sub.add_parser("install", help="verify, self-test and activate a bundle in a state directory")
    sp.add_argument("bundle", metavar="BUNDLE", help="bundle directory or .tar archive")
    sp.add_argument("--repo", metavar="REPO", help="take the TUF metadata from this repository first (else what the "
                                                  "appliance already trusts)")
    sp.add_argument("--trust-root", metavar="ROOT_JSON", help="root to start from when the state trusts none yet "
                                                             "(default: config fleet.trust_root or the project root)")
    sp.add_argument("--backend", choices=["auto", "openvino", "onnxruntime"],
                    help="self-test backend (default: config)")
    sp.add_argument("--precision", choices=["int8", "fp32"], help="self-test precision (default: config)")
    state_args(sp)

    sp = sub.add_parser("rollback", help="go back to the previous bundle of NAME")
    sp.add_argument("name", metavar="NAME", help="bundle name (lesion, valid-area)")
    state_args(sp)


def run(args: argparse.Namespace) -> int:
    device = {"verify": _verify, "trust": _trust, "install": _install, "rollback": _rollback, "list": _list}
    if args.action in device:
        return device[args.action](args)
    return models_repo.run(args)


def _verify(args: argparse.Namespace) -> int:
    from appliance.fleet.bundle_files import whole_bundle
    from appliance.fleet.release import releases
    from appliance.fleet.trust import PROJECT_ANCHOR, verify_at_rest
    from appliance.inference.bundle import BundleError

    repo = models_repo.repo_path(args)
    anchor = Path(args.root) if args.root else (PROJECT_ANCHOR if repo == models_repo.PROJECT_REPO.resolve()
                                                else repo / "1.root.json")
    if not anchor.is_file():
        raise UsageError(f"trusted root {anchor} not found")
    try:
        b = whole_bundle(args.bundle)
    except BundleError as e:
        raise BundleError(f"{args.bundle}: {e}") from None
    root, targets, notes = verify_at_rest(repo, anchor.read_bytes())
    match = [r for r in releases(targets.targets)[0] if r.manifest_sha256 == b.sha256]
    if not match:
        raise BundleError(f"{args.bundle}: {b.name} {b.version} (manifest sha256 {b.sha256[:12]}…) is not in the "
                          f"targets metadata of {repo} (v{targets.version}): not signed by the targets role")
    r = root.roles["targets"]
    print(f"OK {b.name} {b.version} (manifest sha256 {b.sha256}): release {match[0].path} in targets "
          f"v{targets.version}, signed by {r.threshold} of {len(r.keyids)} targets key(s) of root v{root.version} "
          f"(chain from {anchor}); {len(b.manifest['files'])} files verified")
    for n in notes:
        print(f"note: {n} (bundles at rest still verify; refresh before publishing: ctriage models timestamp)")
    return 0


def _trust(args: argparse.Namespace) -> int:
    from appliance.fleet.release import releases
    from appliance.fleet.reports import trust_payload
    from appliance.fleet.trust import TrustStore

    if args.mqtt_url:
        return models_repo.fleet_trust(args)
    cfg = load_config(args)
    ts = TrustStore(cfg.state_path, None)
    p = trust_payload(cfg.device_id, ts.describe(), ts.stale())
    t = ts.trusted_targets()
    p["releases"] = [{"name": r.name, "version": r.version, "devices": list(r.devices), "groups": list(r.groups)}
                     for r in (releases(t.targets)[0] if t else [])]
    if args.json:
        print(json.dumps(p, indent=1))
        return 0
    print(models_repo.describe_text(p, f"{cfg.device_id} ({ts.dir})"))
    return 0


def _updater(args: argparse.Namespace):
    from appliance.fleet.trust import trust_anchor
    from appliance.fleet.updater import Updater

    cfg = load_config(args)
    if getattr(args, "backend", None):
        cfg.analysis.backend = args.backend
    if getattr(args, "precision", None):
        cfg.analysis.precision = args.precision
    anchor = trust_anchor(getattr(args, "trust_root", None) or cfg.fleet.trust_root, cfg.fleet.trust_keys)
    return Updater(cfg.state_path, anchor, cfg.analysis, None, None, legacy_keys=cfg.fleet.trust_keys,
                   device=cfg.device_id, prefix=cfg.mqtt.prefix, shipped_dir=args.shipped)


def _install(args: argparse.Namespace) -> int:
    from appliance.fleet.trust import TrustError

    up = _updater(args)
    if args.repo:
        try:
            up.refresh_from(args.repo)
        except TrustError as e:
            print(f"refused: the metadata of {args.repo}: {e.reason}", file=sys.stderr)
            return 1
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
    up = _updater(args)
    res = up.rollback(args.name)
    print(f"rolled back {args.name} from {res.previous['version']} to {res.bundle['version']}; "  # type: ignore[index]
          f"{res.previous['version']} will not be installed automatically again. "  # type: ignore[index]
          "A running appliance uses it after its next restart.")
    return 0


def _list(args: argparse.Namespace) -> int:
    from appliance.fleet.bundle_files import whole_bundle
    from appliance.fleet.bundle_store import BundleState, active_bundle_dir
    from appliance.fleet.release import releases
    from appliance.fleet.trust import TrustStore
    from appliance.inference.bundle import BundleError, find_bundles, load_bundle

    cfg = load_config(args)
    st = BundleState(cfg.state_path, args.shipped)
    t = TrustStore(cfg.state_path, None).trusted_targets()
    trusted = {r.manifest_sha256: r for r in (releases(t.targets)[0] if t else [])}
    in_use_active = active_bundle_dir(cfg.state_path) is not None
    active = {n: x for n, x in st.links("active").items() if x}
    previous = {n: x for n, x in st.links("previous").items() if x}
    rows: list[dict] = []

    def add(path: Path, where: str, in_use: bool) -> None:
        try:
            b = load_bundle(path, verify=False)
        except BundleError as e:
            rows.append({"name": path.name, "version": "?", "where": where, "in_use": False, "sha256": "",
                         "trust": f"broken: {e}", "path": str(path)})
            return
        try:
            whole_bundle(path)
            rel = trusted.get(b.sha256)
            why = (f"release {rel.path} in targets v{t.version}" if rel and t
                   else "shipped with the software" if where == "shipped" else "not in the trusted targets")
        except BundleError as e:
            why = str(e)
        rows.append({"name": b.name, "version": b.version, "where": where, "in_use": in_use, "sha256": b.sha256,
                     "trust": why, "path": str(path)})

    for name, b in sorted(find_bundles(st.shipped_dir).items()):
        add(b.path, "shipped", not in_use_active)
    refs = {}
    for name, x in sorted(active.items()):
        refs[x] = "active"
        add(x, "active", in_use_active)
    for name, x in sorted(previous.items()):
        refs.setdefault(x, "previous")
        if refs[x] == "previous":
            add(x, "previous", False)
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
                  r["trust"][:48], r["path"]] for r in rows],
                ["  name", "version", "where", "sha256", "trust", "path"]))
    print("\n* in use" + ("" if in_use_active else " (the shipped bundles: nothing installed in "
                                                   f"{st.active})"))
    return 0
