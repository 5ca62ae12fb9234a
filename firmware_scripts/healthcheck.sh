#!/usr/bin/env bash
# Liveness check for the ctriage daemon: the container HEALTHCHECK, monitoring agents, and
# `update-appliance.sh --health-cmd /opt/ctriage/firmware/healthcheck.sh`.
#
#   healthcheck.sh [STATE_DIR]        (default $CTRIAGE_STATE_DIR, else /var/lib/ctriage)
#
# Asks `ctriage status` (which reads the daemon's heartbeat in <state>/status.json): exit 0 while the daemon runs,
# healthy (status 0) or degraded (status 1: e.g. broker unreachable; a restart would not fix that, so the daemon
# counts as alive); exit 1 when it is not running, its heartbeat is stale, or the status cannot be read.
set -euo pipefail

STATE="${1:-${CTRIAGE_STATE_DIR:-/var/lib/ctriage}}"
if [[ -n "${CTRIAGE_BIN:-}" ]]; then
    read -r -a ctriage <<<"$CTRIAGE_BIN"   # may be a command with arguments, e.g. "python3 -m appliance.cli"
elif [[ -x /opt/ctriage/venv/bin/ctriage ]]; then
    ctriage=(/opt/ctriage/venv/bin/ctriage)
else
    ctriage=(ctriage)
fi

rc=0
out="$("${ctriage[@]}" status --state-dir "$STATE" 2>&1)" || rc=$?
printf '%s\n' "$out" | head -n 4
case $rc in
    0) exit 0 ;;
    1) echo "(degraded, but alive)"; exit 0 ;;
    *) echo "unhealthy: ctriage status exited $rc"; exit 1 ;;
esac
