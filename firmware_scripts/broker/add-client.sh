#!/usr/bin/env bash
# Add (or change, or remove) a broker account for an appliance, a triage display or a fleet operator.
#
#   add-client.sh ct-room-1 --generate /root/ct-room-1.mqtt-password      # appliance; copy the file to the box
#   add-client.sh --role display triage-display --password-file pw.txt
#   add-client.sh --delete ct-room-4
#
# The password never appears on a command line (ps): it is read from a file, from stdin, or generated.
# Appliance accounts need no ACL entry (the "ctriage/%u/#" pattern covers them: username = device id).
# A display or fleet-operator account with a new name gets its own ACL block, appended to the ACL file.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib/common.sh
. "$HERE/../lib/common.sh"

PASSWD=/etc/mosquitto/ctriage/passwd
ACL=/etc/mosquitto/ctriage/acl
ROLE=appliance
PW_FILE=""
GENERATE=""
DELETE=0
RELOAD=1
NAME=""
RESERVED=(fleet triage-display fleet-operator)

usage() {
    cat <<'EOF'
Usage: add-client.sh [options] NAME
  --role R               appliance (default; NAME = the device_id), display or fleet-operator
  --password-file FILE   read the password from FILE (first line)
  --generate FILE        generate a random password and write it to FILE (mode 0600) for the client
                         (without --password-file/--generate: read it from stdin)
  --delete               remove the account NAME
  --passwd FILE          password file (default /etc/mosquitto/ctriage/passwd)
  --acl FILE             ACL file (default /etc/mosquitto/ctriage/acl)
  --no-reload            do not reload mosquitto afterwards
  --dry-run              print the plan, change nothing
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --role) ROLE="${2:?}"; shift 2 ;;
        --password-file) PW_FILE="${2:?}"; shift 2 ;;
        --generate) GENERATE="${2:?}"; shift 2 ;;
        --delete) DELETE=1; shift ;;
        --passwd) PASSWD="${2:?}"; shift 2 ;;
        --acl) ACL="${2:?}"; shift 2 ;;
        --no-reload) RELOAD=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) [[ -z "$NAME" ]] || die "one account at a time"; NAME="$1"; shift ;;
    esac
done

[[ -n "$NAME" ]] || { usage >&2; die "no account name given"; }
[[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] \
    || die "account name '$NAME': letters, digits, '-', '_' and '.' only (it is an MQTT topic level)"
command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found (apt-get install mosquitto)"
[[ -f "$ACL" ]] || die "ACL file not found: $ACL (run install-broker.sh first)"

has_acl_block() { grep -qE "^user[[:space:]]+$1[[:space:]]*$" "$ACL"; }

case "$ROLE" in
    appliance)
        for r in "${RESERVED[@]}"; do
            [[ "$NAME" != "$r" ]] || die "'$NAME' is reserved for the broker's role accounts; pick another device id"
        done
        if has_acl_block "$NAME"; then die "'$NAME' has its own ACL block (a role account), not an appliance"; fi ;;
    display|fleet-operator) ;;
    *) die "--role must be appliance, display or fleet-operator (got '$ROLE')" ;;
esac

reload() {
    if [[ $RELOAD == 1 ]]; then run systemctl reload mosquitto.service; fi
}

if [[ $DELETE == 1 ]]; then
    run mosquitto_passwd -D "$PASSWD" "$NAME"
    reload
    log "account $NAME removed"
    exit 0
fi

if [[ -n "$PW_FILE" && -n "$GENERATE" ]]; then die "--password-file and --generate exclude each other"; fi
if [[ -n "$PW_FILE" ]]; then
    [[ -r "$PW_FILE" ]] || die "cannot read $PW_FILE"
    IFS= read -r password <"$PW_FILE" || true
elif [[ -n "$GENERATE" ]]; then
    password="$(random_secret)"
else
    [[ -t 0 ]] && echo "password for $NAME (one line):" >&2
    IFS= read -r password || true
fi
[[ ${#password} -ge 12 ]] || die "the password must have at least 12 characters"

if [[ -n "$GENERATE" ]]; then
    (umask 077; printf '%s\n' "$password" | write_file "$GENERATE" 0600 "$(id -u):$(id -g)" secret)
    info "password for $NAME written to $GENERATE; install it on the client as the file its config names"
fi

# mosquitto_passwd reads the password twice from stdin; -c only when the file does not exist yet.
create=()
[[ -f "$PASSWD" ]] || create=(-c)
if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ mosquitto_passwd %s %q %q  (password on stdin)\n' "${create[*]}" "$PASSWD" "$NAME"
else
    (umask 077; printf '%s\n%s\n' "$password" "$password" \
        | mosquitto_passwd "${create[@]}" "$PASSWD" "$NAME" >/dev/null)
    # the broker reads it as the mosquitto user (Debian/Ubuntu packages drop root before loading it)
    if [[ "$(id -u)" == 0 ]] && getent passwd mosquitto >/dev/null; then chown mosquitto:mosquitto "$PASSWD"; fi
    chmod 0600 "$PASSWD"
fi

if [[ "$ROLE" != appliance ]] && ! has_acl_block "$NAME"; then
    if [[ "$ROLE" == display ]]; then
        block="user $NAME
topic deny ctriage/$NAME/#
topic read ctriage/+/verdict/+
topic read ctriage/+/overlay/+
topic read ctriage/+/status
topic read ctriage/+/stats
topic readwrite ctriage/+/ack/+"
    else
        block="user $NAME
topic deny ctriage/$NAME/#
topic readwrite ctriage/fleet/#
topic read ctriage/+/status
topic read ctriage/+/update
topic read ctriage/+/trust
topic read ctriage/+/stats"
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '+ append to %s:\n%s\n' "$ACL" "$block"
    else
        printf '\n# --- %s (%s), added %s ---\n%s\n' "$NAME" "$ROLE" "$(date -u +%Y-%m-%d)" "$block" >>"$ACL"
    fi
fi
reload
log "account $NAME ($ROLE) ready"
