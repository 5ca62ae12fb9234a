# shellcheck shell=bash
# Helpers shared by the ctriage provisioning and update scripts (sourced, not executed).
#
# Every action that changes the machine goes through `run`, `write_file` or `install_file`: with DRY_RUN=1 they
# print what they would do ("+ ...") and change nothing, so `--dry-run` shows the whole plan on any machine.
# Reads (id, getent, stat, systemctl is-active, timedatectl) run in both modes.

DRY_RUN="${DRY_RUN:-0}"
WARNINGS=0

log()  { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; WARNINGS=$((WARNINGS + 1)); }
die()  { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# run CMD [ARGS...]: execute, or print in dry-run mode.
run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

# write_file PATH MODE OWNER:GROUP [secret]  (content on stdin). Leaves an identical file alone (idempotent).
# With "secret", a dry run does not print the content.
write_file() {
    local path="$1" mode="$2" owner="$3" secret="${4:-}" tmp
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '+ write %s (mode %s, %s)\n' "$path" "$mode" "$owner"
        if [[ "$secret" == secret ]]; then
            cat >/dev/null
            printf '|   (secret, not shown)\n'
        else
            awk 'NR <= 8 { print "|   " $0 } END { if (NR > 8) printf "|   ... (%d lines in all)\n", NR }'
        fi
        return 0
    fi
    tmp="$(mktemp "${path}.XXXXXX")"   # mktemp creates it 0600: a secret is never readable by others
    cat >"$tmp"
    if [[ -f "$path" ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$path"
        info "wrote $path"
    fi
    chmod "$mode" "$path"
    chown "$owner" "$path"
}

# install_file SRC DEST MODE OWNER:GROUP
install_file() {
    [[ -f "$1" ]] || die "missing file in the release: $1"
    write_file "$2" "$3" "$4" <"$1"
}

# ensure_dir PATH MODE OWNER:GROUP
ensure_dir() {
    local path="$1" mode="$2" owner="$3"
    if [[ -d "$path" ]] && [[ "$(stat -c '%a %U:%G' "$path")" == "${mode#0} $owner" ]]; then
        return 0
    fi
    run install -d -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$path"
}

# ensure_group NAME
ensure_group() {
    getent group "$1" >/dev/null || run groupadd --system "$1"
}

# ensure_user NAME HOME [EXTRA_GROUPS]: a system account without login shell or password.
ensure_user() {
    local name="$1" home="$2" groups="${3:-}"
    if ! id -u "$name" >/dev/null 2>&1; then
        ensure_group "$name"
        run useradd --system --gid "$name" --home-dir "$home" --no-create-home --shell /usr/sbin/nologin \
            --comment "ctriage service account" "$name"
    fi
    if [[ -n "$groups" ]]; then
        local g
        for g in ${groups//,/ }; do
            if ! getent group "$g" >/dev/null && [[ "$DRY_RUN" != 1 ]]; then
                warn "group $g does not exist (not added to $name)"
                continue
            fi
            id -nG "$name" 2>/dev/null | tr ' ' '\n' | grep -qx "$g" || run usermod -a -G "$g" "$name"
        done
    fi
}

require_root() {
    if [[ "$DRY_RUN" != 1 && "$(id -u)" != 0 ]]; then
        die "run as root (sudo $0 ...), or with --dry-run to see the plan"
    fi
}

# os_release_field KEY: a field of /etc/os-release ("" when absent).
os_release_field() {
    [[ -r /etc/os-release ]] || return 0
    sed -n "s/^$1=//p" /etc/os-release | tr -d '"' | head -n 1
}

require_debian_family() {
    local id like
    id="$(os_release_field ID)"
    like="$(os_release_field ID_LIKE)"
    if [[ "$id" != debian && "$id" != ubuntu && " $like " != *" debian "* ]]; then
        if [[ "$DRY_RUN" == 1 ]]; then
            warn "not a Debian/Ubuntu system (ID=$id); the plan below assumes apt and systemd"
        else
            die "this script supports Debian and Ubuntu (found ID=$id)"
        fi
    fi
}

apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        info "packages present: $*"
        return 0
    fi
    run env DEBIAN_FRONTEND=noninteractive apt-get update -q
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# pick_python MIN_MINOR: the newest python3.X (X >= MIN_MINOR) on PATH, printed as a command name.
pick_python() {
    local min="$1" v
    for v in 13 12 11 10; do
        [[ "$v" -ge "$min" ]] || continue
        if command -v "python3.$v" >/dev/null 2>&1; then echo "python3.$v"; return 0; fi
    done
    return 1
}

# check_time_sync: warn (never fail) when the clock is not NTP-synchronised. Verdict timestamps and TLS
# certificate checks depend on a correct clock.
check_time_sync() {
    local synced=""
    if command -v timedatectl >/dev/null 2>&1; then
        synced="$(timedatectl show -p NTPSynchronized --value 2>/dev/null || true)"
    fi
    if [[ "$synced" == yes ]]; then
        info "clock: NTP-synchronised (timedatectl)"
    elif command -v chronyc >/dev/null 2>&1 && chronyc -n tracking 2>/dev/null | grep -q '^Leap status *: Normal'; then
        info "clock: synchronised (chronyc tracking)"
    elif [[ -z "$synced" ]]; then
        warn "clock: cannot tell whether the clock is synchronised (timedatectl unavailable here); check it by hand"
    else
        warn "clock: NOT synchronised; set the hospital NTP server (--ntp-server HOST) and check 'chronyc sources'"
    fi
}

# configure_ntp HOST: point chrony (preferred) or systemd-timesyncd at the hospital's NTP server.
configure_ntp() {
    local host="$1"
    [[ "$host" =~ ^[A-Za-z0-9.:-]+$ ]] || die "--ntp-server: not a host name or address: $host"
    if [[ -d /etc/chrony ]] || [[ "$DRY_RUN" == 1 && ! -d /etc/systemd/timesyncd.conf.d ]]; then
        ensure_dir /etc/chrony/sources.d 0755 root:root
        printf 'server %s iburst\n' "$host" | write_file /etc/chrony/sources.d/ctriage.sources 0644 root:root
        run systemctl restart chrony.service
    else
        ensure_dir /etc/systemd/timesyncd.conf.d 0755 root:root
        printf '[Time]\nNTP=%s\n' "$host" | write_file /etc/systemd/timesyncd.conf.d/ctriage.conf 0644 root:root
        run systemctl restart systemd-timesyncd.service
    fi
}

# random_secret: 32 random bytes, base64 (for the study-key secret and generated MQTT passwords).
random_secret() {
    head -c 32 /dev/urandom | base64 | tr -d '\n='
}
