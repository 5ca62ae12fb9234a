#!/usr/bin/env bash
# Install and configure the site's mosquitto broker for ctriage (TLS on 8883, passwords, ACL).
#
#   sudo install-broker.sh --certs /root/ctriage-pki     # the folder make-certs.sh wrote (ca.key is not copied)
#
# Idempotent: the config drop-in and certificates are (re)installed; an existing ACL or password file is kept
# (accounts are managed with add-client.sh). Debian/Ubuntu's mosquitto package runs mosquitto as the
# "mosquitto" user, which reads the password file, the ACL and the server key after dropping root.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib/common.sh
. "$HERE/../lib/common.sh"

CERTS=""
START=1
ETC=/etc/mosquitto/ctriage

usage() {
    cat <<'EOF'
Usage: install-broker.sh --certs DIR [--no-start] [--dry-run]
  --certs DIR   folder with ca.crt, server.crt and server.key (from make-certs.sh)
  --no-start    install only; do not (re)start mosquitto
  --dry-run     print the plan, change nothing
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --certs) CERTS="${2:?}"; shift 2 ;;
        --no-start) START=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

[[ -n "$CERTS" ]] || { usage >&2; die "--certs is required (run make-certs.sh first)"; }
for f in ca.crt server.crt server.key; do [[ -f "$CERTS/$f" ]] || die "missing $CERTS/$f"; done
openssl verify -CAfile "$CERTS/ca.crt" "$CERTS/server.crt" >/dev/null || die "server.crt is not signed by ca.crt"
require_root
require_debian_family

log "packages"
apt_install mosquitto mosquitto-clients openssl

# The mosquitto account exists once the package is installed; in a dry run on a bare machine it may not yet.
group=mosquitto
getent group mosquitto >/dev/null || { [[ "$DRY_RUN" == 1 ]] || die "no mosquitto group after install"; }

log "configuration in $ETC"
ensure_dir "$ETC" 0750 "root:$group"
ensure_dir "$ETC/certs" 0750 "root:$group"
install_file "$CERTS/ca.crt" "$ETC/certs/ca.crt" 0644 root:root
install_file "$CERTS/server.crt" "$ETC/certs/server.crt" 0644 root:root
(write_file "$ETC/certs/server.key" 0640 "root:$group" secret <"$CERTS/server.key")
install_file "$HERE/ctriage.conf" /etc/mosquitto/conf.d/ctriage.conf 0644 root:root
if [[ -f "$ETC/acl" ]]; then
    info "keeping the existing ACL $ETC/acl"
else
    install_file "$HERE/acl" "$ETC/acl" 0600 "mosquitto:$group"
fi
if [[ -f "$ETC/passwd" ]]; then
    info "keeping the existing password file $ETC/passwd"
else
    : | write_file "$ETC/passwd" 0600 "mosquitto:$group"
fi

if [[ $START == 1 ]]; then
    log "starting mosquitto"
    run systemctl enable mosquitto.service
    run systemctl restart mosquitto.service
    if [[ "$DRY_RUN" != 1 ]]; then
        sleep 2
        systemctl is-active --quiet mosquitto.service \
            || die "mosquitto did not start; see: journalctl -u mosquitto -n 50"
    fi
fi

log "done"
cat <<EOF
Next steps:
  * accounts: $HERE/add-client.sh <device id> --generate <file>   (one per appliance)
              $HERE/add-client.sh --role display triage-display --generate <file>
              $HERE/add-client.sh --role fleet-operator fleet-operator --generate <file>
  * firewall: allow TCP 8883 from the appliances' and displays' addresses only
  * clients need $ETC/certs/ca.crt (public) as [mqtt] ca_file
EOF
