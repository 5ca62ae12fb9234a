#!/usr/bin/env bash
# Install a ctriage release next to the running one and switch to it atomically; roll back when it does not come up.
#
#   sudo update-appliance.sh ctriage-0.2.0-py3-none-any.whl
#   sudo update-appliance.sh --wheelhouse /media/usb/wheels /media/usb/wheels/ctriage-0.2.0-py3-none-any.whl
#
# Layout: /opt/ctriage/venvs/<version>-<UTC time>/ (one virtual environment per release) and the symlink
# /opt/ctriage/venv -> the active one (the systemd units run /opt/ctriage/venv/bin/ctriage). Steps:
#   1. new venv, pip install the wheel (offline with --wheelhouse), optional onnxruntime-gpu swap (Jetson)
#   2. smoke test in the new venv (ctriage --version, optional --health-cmd later)
#   3. switch the symlink with rename(2) (atomic: a unit starting at that moment sees the old or the new tree)
#   4. restart the services; they must be active within --timeout and stay up (no restarts) for --settle seconds
#   5. otherwise switch back to the previous venv, restart, exit 1; the failed venv is kept as *.failed
#   6. prune old venvs (keeps the active, the previous and --keep more)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/lib/common.sh
. "$HERE/lib/common.sh"

PREFIX=/opt/ctriage
PYTHON=""
WHEELHOUSE=""
ORT_GPU=""
SERVICES=""
RESTART=1
TIMEOUT=60
SETTLE=15
KEEP=2
HEALTH_CMD=""
PACKAGE=""
PIP_ARGS=()
PIP_ARGS_DEFAULT=()
DEFAULTS=/etc/ctriage/update.conf

usage() {
    cat <<'EOF'
Usage: update-appliance.sh [options] PACKAGE
  PACKAGE                a ctriage wheel (ctriage-<version>-*.whl) or a source checkout
  --prefix DIR           install root (default /opt/ctriage)
  --python CMD           interpreter for the new venv (default: newest python3.10+ on PATH)
  --wheelhouse DIR       install offline from this folder of wheels (pip --no-index --find-links DIR)
  --ort-gpu WHEEL|URL    replace onnxruntime by this onnxruntime-gpu wheel (Jetson; URL may end in #sha256=...)
  --pip-arg ARG          extra argument for pip install (repeatable)
  --services "A B"       units to restart (default: ctriage.service, plus ctriage-display.service if enabled)
  --no-restart           install and switch only (first installation)
  --timeout S            seconds the services may take to become active (default 60)
  --settle S             seconds they must then stay active without restarting (default 15)
  --health-cmd CMD       extra check after settling, run with the new release active (non-zero = roll back)
  --keep N               old releases to keep besides the active and previous one (default 2)
  --defaults FILE        box defaults (default /etc/ctriage/update.conf, written by provision-jetson.sh):
                         lines ORT_GPU=<wheel or URL> and PIP_ARG=<argument>, used when not given here
  --dry-run              print the plan, change nothing
  -h, --help             this help
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) PREFIX="${2:?}"; shift 2 ;;
        --python) PYTHON="${2:?}"; shift 2 ;;
        --wheelhouse) WHEELHOUSE="${2:?}"; shift 2 ;;
        --ort-gpu) ORT_GPU="${2:?}"; shift 2 ;;
        --pip-arg) PIP_ARGS+=("${2:?}"); shift 2 ;;
        --services) SERVICES="${2:?}"; shift 2 ;;
        --no-restart) RESTART=0; shift ;;
        --timeout) TIMEOUT="${2:?}"; shift 2 ;;
        --settle) SETTLE="${2:?}"; shift 2 ;;
        --health-cmd) HEALTH_CMD="${2:?}"; shift 2 ;;
        --keep) KEEP="${2:?}"; shift 2 ;;
        --defaults) DEFAULTS="${2:?}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) [[ -z "$PACKAGE" ]] || die "one package at a time (got '$PACKAGE' and '$1')"; PACKAGE="$1"; shift ;;
    esac
done

# Box defaults: KEY=VALUE lines (read, never sourced).
if [[ -f "$DEFAULTS" ]]; then
    while IFS= read -r line || [[ -n "$line" ]]; do
        [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
        key="${line%%=*}"
        value="${line#*=}"
        case "$key" in
            ORT_GPU) [[ -n "$ORT_GPU" ]] || ORT_GPU="$value" ;;
            PIP_ARG) [[ ${#PIP_ARGS[@]} -gt 0 ]] || PIP_ARGS_DEFAULT+=("$value") ;;
            *) die "$DEFAULTS: unknown key '$key'" ;;
        esac
    done <"$DEFAULTS"
    PIP_ARGS+=("${PIP_ARGS_DEFAULT[@]}")
fi

[[ -n "$PACKAGE" ]] || { usage >&2; die "no package given"; }
[[ -e "$PACKAGE" ]] || die "package not found: $PACKAGE"
for n in "$TIMEOUT" "$SETTLE" "$KEEP"; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "--timeout, --settle and --keep take whole numbers (got '$n')"
done
[[ -z "$WHEELHOUSE" || -d "$WHEELHOUSE" ]] || die "--wheelhouse: not a directory: $WHEELHOUSE"
VENVS="$PREFIX/venvs"
LINK="$PREFIX/venv"
# Default interpreter: the one the active release runs on (a Jetson's GPU wheel is built for exactly that one),
# else the newest python3.10+ on PATH.
if [[ -z "$PYTHON" && -f "$LINK/pyvenv.cfg" ]]; then
    home="$(sed -n 's/^home *= *//p' "$LINK/pyvenv.cfg")"
    minor="$(sed -n 's/^version *= *\([0-9]*\.[0-9]*\).*/\1/p' "$LINK/pyvenv.cfg")"
    if [[ -n "$home" && -n "$minor" && -x "$home/python$minor" ]]; then PYTHON="$home/python$minor"; fi
fi
if [[ -z "$PYTHON" ]]; then
    PYTHON="$(pick_python 10)" || die "no python3.10 or newer found (apt-get install python3-venv)"
fi
command -v "$PYTHON" >/dev/null || die "--python: not found: $PYTHON"
base="$(basename "$PACKAGE")"
if [[ "$base" =~ ^ctriage-([0-9][^-]*)-.*\.whl$ ]]; then
    version="${BASH_REMATCH[1]}"
elif [[ -d "$PACKAGE" ]]; then
    version="src"
else
    die "not a ctriage wheel (ctriage-<version>-*.whl) or a source directory: $PACKAGE"
fi
NEW="$VENVS/$version-$(date -u +%Y%m%dT%H%M%SZ)"

if [[ "$DRY_RUN" != 1 ]]; then
    mkdir -p "$VENVS"
    exec 9>"$PREFIX/.update.lock"
    flock -n 9 || die "another update is running (lock $PREFIX/.update.lock)"
fi
if [[ -e "$LINK" && ! -L "$LINK" ]]; then
    die "$LINK exists and is not a symlink; move it into $VENVS/ and link it, then retry"
fi
PREV=""
[[ -L "$LINK" ]] && PREV="$(readlink -f "$LINK")"

# switch_to DIR: point $LINK at DIR with one rename(2).
switch_to() {
    run ln -sfn "$1" "$LINK.new"
    run mv -Tf "$LINK.new" "$LINK"
}

default_services() {
    local s="ctriage.service"
    if systemctl is-enabled --quiet ctriage-display.service 2>/dev/null; then s+=" ctriage-display.service"; fi
    echo "$s"
}

# wait_up: all services active within TIMEOUT, then active for SETTLE seconds with an unchanged restart count.
wait_up() {
    local s deadline start state restarts0=() i
    # shellcheck disable=SC2206
    local svc=($SERVICES)
    deadline=$((SECONDS + TIMEOUT))
    while :; do
        local all=1
        for s in "${svc[@]}"; do
            state="$(systemctl is-active "$s" 2>/dev/null || true)"
            [[ "$state" == failed ]] && { warn "$s failed"; return 1; }
            [[ "$state" == active ]] || all=0
        done
        [[ $all == 1 ]] && break
        ((SECONDS < deadline)) || { warn "services not active after ${TIMEOUT}s"; return 1; }
        sleep 1
    done
    for i in "${!svc[@]}"; do
        restarts0[i]="$(systemctl show -p NRestarts --value "${svc[i]}" 2>/dev/null || echo 0)"
    done
    start=$SECONDS
    while ((SECONDS - start < SETTLE)); do
        sleep 1
        for i in "${!svc[@]}"; do
            state="$(systemctl is-active "${svc[i]}" 2>/dev/null || true)"
            [[ "$state" == active ]] || { warn "${svc[i]} went $state while settling"; return 1; }
            [[ "$(systemctl show -p NRestarts --value "${svc[i]}" 2>/dev/null || echo 0)" == "${restarts0[i]}" ]] \
                || { warn "${svc[i]} restarted while settling"; return 1; }
        done
    done
    if [[ -n "$HEALTH_CMD" ]]; then
        bash -c "$HEALTH_CMD" || { warn "health check failed: $HEALTH_CMD"; return 1; }
    fi
    return 0
}

log "ctriage $version -> $NEW (active now: ${PREV:-none})"
run "$PYTHON" -m venv "$NEW"
pip_cmd=("$NEW/bin/python" -m pip install --quiet --disable-pip-version-check)
[[ -n "$WHEELHOUSE" ]] && pip_cmd+=(--no-index --find-links "$WHEELHOUSE")
if ! run "${pip_cmd[@]}" "${PIP_ARGS[@]}" "$PACKAGE"; then
    run rm -rf "$NEW"
    die "pip could not install $PACKAGE; nothing changed"
fi
if [[ -n "$ORT_GPU" ]]; then
    log "replacing onnxruntime (CPU) by onnxruntime-gpu: $ORT_GPU"
    # ctriage depends on "onnxruntime"; the GPU build is a different distribution that ships the same module.
    run "$NEW/bin/python" -m pip uninstall --quiet -y onnxruntime
    run "${pip_cmd[@]}" --no-deps --force-reinstall "$ORT_GPU"
    run "$NEW/bin/python" -c "import onnxruntime as o, sys; p = o.get_available_providers(); print(p); \
sys.exit(0 if 'CUDAExecutionProvider' in p else 1)"
fi
log "smoke test"
if ! run "$NEW/bin/ctriage" --version; then
    run mv -T "$NEW" "$NEW.failed"
    die "the new release does not start (ctriage --version failed); nothing changed, kept $NEW.failed"
fi

log "switching $LINK -> $NEW"
switch_to "$NEW"

if [[ $RESTART == 1 ]]; then
    [[ -n "$SERVICES" ]] || SERVICES="$(default_services)"
    # shellcheck disable=SC2086
    run systemctl restart $SERVICES
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '+ wait until %s are active (%ss) and stay up (%ss)\n' "$SERVICES" "$TIMEOUT" "$SETTLE"
    elif ! wait_up; then
        if [[ -n "$PREV" ]]; then
            log "rolling back to $PREV"
            switch_to "$PREV"
            # shellcheck disable=SC2086
            systemctl restart $SERVICES || true
            mv -T "$NEW" "$NEW.failed"
            die "update to $version failed; rolled back to $(basename "$PREV") (see journalctl -u ctriage)"
        fi
        die "update to $version failed and there is no previous release to go back to (see journalctl -u ctriage)"
    fi
fi

# Prune: keep the active, the previous and KEEP more releases (newest first); *.failed are kept KEEP deep too.
if [[ "$DRY_RUN" != 1 ]]; then
    mapfile -t old < <(find "$VENVS" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn | cut -d' ' -f2-)
    n=0
    for d in "${old[@]}"; do
        [[ "$d" == "$NEW" || "$d" == "$PREV" ]] && continue
        n=$((n + 1))
        if ((n > KEEP)); then rm -rf -- "$d"; info "removed old release $d"; fi
    done
fi
log "ctriage $version is active"
