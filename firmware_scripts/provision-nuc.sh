#!/usr/bin/env bash
# Provision an Intel NUC (x86-64, Debian 12 or Ubuntu 22.04/24.04) as a ctriage appliance: service accounts,
# /opt/ctriage venv, /etc/ctriage config and secrets, hardened systemd units, journald limits, time sync check,
# optionally the triage display and a kiosk screen. Idempotent; --dry-run prints the plan and changes nothing.
#
#   sudo firmware_scripts/provision-nuc.sh --device-id ct-room-1 --broker-url mqtts://broker.hospital.lan:8883 \
#        --ca-file ca.crt --mqtt-password-file ct-room-1.mqtt-password --wheel dist/ctriage-0.1.0-py3-none-any.whl
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/lib/common.sh
. "$HERE/lib/common.sh"
# shellcheck source=SCRIPTDIR/lib/provision.sh
. "$HERE/lib/provision.sh"

BOX=nuc
BOX_DESCRIPTION="Intel NUC (x86-64, Debian/Ubuntu)"
CONFIG_EXAMPLE="$REPO/config/site-nuc.example.toml"
BOX_PACKAGES=()
BOX_GROUPS=""
PY_MIN=11

box_checks() {
    local arch
    arch="$(uname -m)"
    if [[ "$arch" != x86_64 ]]; then
        [[ "$DRY_RUN" == 1 ]] || die "this is $arch; provision-nuc.sh is for x86-64 (Jetson: provision-jetson.sh)"
        warn "this is $arch, not x86-64 (dry run continues)"
    fi
    # OpenVINO needs SSE4.2 and is much faster with AVX2 / AVX-512 VNNI / AMX: say what this CPU has.
    local flags="" f have=()
    [[ -r /proc/cpuinfo ]] && flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
    for f in avx2 avx512_vnni avx_vnni amx_tile; do [[ " $flags " == *" $f "* ]] && have+=("$f"); done
    [[ " $flags " == *" sse4_2 "* ]] || warn "CPU without SSE4.2: OpenVINO will not run here"
    info "CPU: $(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //') [${have[*]:-no AVX2}]"
    local mem_kb
    mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)"
    ((mem_kb >= 3500000)) || warn "less than 4 GB of memory ($((mem_kb / 1024)) MB)"
}

box_packages() {
    # Ubuntu 22.04's python3 is 3.10; its archive also has 3.11, which the appliance needs.
    if ! pick_python "$PY_MIN" >/dev/null; then
        apt_install "python3.$PY_MIN" "python3.$PY_MIN-venv"
    fi
}

provision_main "$@"
