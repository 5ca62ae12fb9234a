# shellcheck shell=bash
# The provisioning steps shared by provision-nuc.sh and provision-jetson.sh (sourced after lib/common.sh).
# The box script sets BOX (nuc | jetson), CONFIG_EXAMPLE, BOX_PACKAGES and may define box_checks, box_packages,
# box_install_args and box_units (hooks), then calls provision_main "$@".
#
# What a provisioned box looks like:
#   /opt/ctriage/venvs/<release>/        one virtual environment per release; /opt/ctriage/venv -> active one
#   /opt/ctriage/firmware/               these scripts (update-appliance.sh, kiosk launcher, broker tools)
#   /etc/ctriage/ctriage.toml            appliance config            root:ctriage          0640
#   /etc/ctriage/display.toml            display config (optional)   root:ctriage-display  0640
#   /etc/ctriage/ca.crt                  site CA certificate         root:root             0644
#   /etc/ctriage/secrets/                secrets, one file each      root:root             0711
#       mqtt-password, study-key         appliance                   root:ctriage          0640
#       display-mqtt-password            display                     root:ctriage-display  0640
#   /var/lib/ctriage/                    state (store, spool, bundles)  ctriage:ctriage    0750
#   /srv/ctriage/incoming/               watch folder                ctriage:ctriage-ingest 2770
#   systemd: ctriage.service, ctriage-display.service, ctriage-kiosk.service; journald drop-in

FIRMWARE="$(cd "$HERE" && pwd)"
REPO="$(cd "$FIRMWARE/.." && pwd)"
PREFIX=/opt/ctriage
ETC=/etc/ctriage
STATE=/var/lib/ctriage
INCOMING=/srv/ctriage/incoming
SYSTEMD=/etc/systemd/system

PACKAGE=""
WHEELHOUSE=""
DEVICE_ID=""
BROKER_URL=""
CA_FILE=""
MQTT_PW_FILE=""
DISPLAY_PW_FILE=""
WITH_DISPLAY=0
KIOSK_URL=""
NTP_SERVER=""
START=1
UPGRADE=0
EXTRA_INSTALL_ARGS=()

provision_usage() {
    cat <<EOF
Usage: provision-$BOX.sh [options]
Turns a stock $BOX_DESCRIPTION into a ctriage appliance. Safe to run again (idempotent).
  --wheel FILE|DIR            ctriage wheel or source checkout (default: $REPO)
  --wheelhouse DIR            install offline from this folder of wheels
  --upgrade                   reinstall the package even when a release is already active
  --device-id ID              device id for a new config (default: the host name)
  --broker-url URL            e.g. mqtts://broker.hospital.lan:8883 (for a new config)
  --ca-file FILE              the site CA certificate (ca.crt from make-certs.sh)
  --mqtt-password-file FILE   this appliance's broker password (else one is generated: register it on the
                              broker with add-client.sh <device id> --password-file <copy of it>)
  --with-display              also run the triage display on this box (ctriage-display.service)
  --display-password-file F   the display's broker password (account triage-display)
  --kiosk URL                 also drive the screen of this box: Chromium kiosk on tty1 showing URL
  --ntp-server HOST           the hospital's NTP server (chrony or systemd-timesyncd)
  --no-start                  install and enable the services, do not start them
  --dry-run                   print every step, change nothing
  -h, --help                  this help
EOF
}

provision_parse() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --wheel) PACKAGE="${2:?}"; shift 2 ;;
            --wheelhouse) WHEELHOUSE="${2:?}"; shift 2 ;;
            --upgrade) UPGRADE=1; shift ;;
            --device-id) DEVICE_ID="${2:?}"; shift 2 ;;
            --broker-url) BROKER_URL="${2:?}"; shift 2 ;;
            --ca-file) CA_FILE="${2:?}"; shift 2 ;;
            --mqtt-password-file) MQTT_PW_FILE="${2:?}"; shift 2 ;;
            --display-password-file) DISPLAY_PW_FILE="${2:?}"; shift 2 ;;
            --with-display) WITH_DISPLAY=1; shift ;;
            --kiosk) KIOSK_URL="${2:?}"; shift 2 ;;
            --ntp-server) NTP_SERVER="${2:?}"; shift 2 ;;
            --no-start) START=0; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            -h|--help) provision_usage; exit 0 ;;
            *) provision_usage >&2; die "unknown option: $1" ;;
        esac
    done
    PACKAGE="${PACKAGE:-$REPO}"
    [[ -e "$PACKAGE" ]] || die "--wheel: not found: $PACKAGE"
    [[ -z "$WHEELHOUSE" || -d "$WHEELHOUSE" ]] || die "--wheelhouse: not a directory: $WHEELHOUSE"
    DEVICE_ID="${DEVICE_ID:-$(hostname -s 2>/dev/null || hostname)}"
    [[ "$DEVICE_ID" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] \
        || die "device id '$DEVICE_ID': letters, digits, '-', '_' and '.' only (use --device-id)"
    case "$DEVICE_ID" in fleet|triage-display|fleet-operator) die "device id '$DEVICE_ID' is reserved" ;; esac
    local url_re='^mqtts?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(:[0-9]{1,5})?$'
    [[ -z "$BROKER_URL" || "$BROKER_URL" =~ $url_re ]] \
        || die "--broker-url: expected mqtts://host:port, got '$BROKER_URL'"
    local f
    for f in "$CA_FILE" "$MQTT_PW_FILE" "$DISPLAY_PW_FILE"; do
        [[ -z "$f" || -r "$f" ]] || die "cannot read $f"
    done
    if [[ -n "$CA_FILE" ]] && ! openssl x509 -in "$CA_FILE" -noout 2>/dev/null; then
        die "--ca-file: not a PEM certificate: $CA_FILE"
    fi
    [[ -z "$KIOSK_URL" || "$KIOSK_URL" =~ ^https?:// ]] || die "--kiosk: expected an http(s) URL, got '$KIOSK_URL'"
}

# secret_file DEST GROUP [SOURCE]: install SOURCE, or keep DEST, or generate a random one.
secret_file() {
    local dest="$1" group="$2" src="${3:-}"
    if [[ -n "$src" ]]; then
        (write_file "$dest" 0640 "root:$group" secret <"$src")
    elif [[ -f "$dest" ]]; then
        info "keeping $dest"
        run chown "root:$group" "$dest"
        run chmod 0640 "$dest"
    else
        random_secret | write_file "$dest" 0640 "root:$group" secret
        GENERATED+=("$dest")
    fi
}

# new_config EXAMPLE DEST GROUP: a config from the example, with this box's names, unless DEST exists.
new_config() {
    local example="$1" dest="$2" group="$3"
    if [[ -f "$dest" ]]; then
        info "keeping $dest (edit it by hand; the example is $example)"
        run chown "root:$group" "$dest"
        run chmod 0640 "$dest"
        return 0
    fi
    local sed_args=(-e "")
    if [[ "$dest" == "$ETC/ctriage.toml" ]]; then
        sed_args+=(-e "s/^device_id = \".*\"/device_id = \"$DEVICE_ID\"/")
        sed_args+=(-e "s/^username = \".*\"/username = \"$DEVICE_ID\"/")
    fi
    if [[ -n "$BROKER_URL" ]]; then sed_args+=(-e "s#^url = \".*\"#url = \"$BROKER_URL\"#"); fi
    sed "${sed_args[@]}" "$example" | write_file "$dest" 0640 "root:$group"
}

provision_main() {
    GENERATED=()
    provision_parse "$@"
    require_root
    require_debian_family
    log "ctriage provisioning ($BOX_DESCRIPTION)$([[ "$DRY_RUN" == 1 ]] && echo ' - dry run, nothing is changed')"
    if declare -F box_checks >/dev/null; then box_checks; fi

    # --- packages -------------------------------------------------------------------------------------------
    log "packages"
    local pkgs=(ca-certificates openssl curl python3-venv chrony unattended-upgrades mosquitto-clients)
    pkgs+=("${BOX_PACKAGES[@]}")
    if [[ -n "$KIOSK_URL" ]]; then pkgs+=(cage chromium fonts-dejavu-core); fi
    apt_install "${pkgs[@]}"
    if declare -F box_packages >/dev/null; then box_packages; fi
    local python="${PYTHON_CMD:-}"
    [[ -n "$python" ]] && command -v "$python" >/dev/null 2>&1 || python="$(pick_python "$PY_MIN")" || {
        [[ "$DRY_RUN" == 1 ]] || die "no python3.$PY_MIN or newer after installing packages"
        python=python3
    }
    info "python for the appliance: $python"

    # --- accounts -------------------------------------------------------------------------------------------
    log "service accounts"
    ensure_group ctriage-ingest
    ensure_user ctriage "$STATE" "ctriage-ingest${BOX_GROUPS:+,$BOX_GROUPS}"
    if [[ $WITH_DISPLAY == 1 ]]; then ensure_user ctriage-display /var/lib/ctriage-display; fi
    if [[ -n "$KIOSK_URL" ]]; then ensure_user ctriage-kiosk /var/lib/ctriage-kiosk video,render,input; fi

    # --- directories ----------------------------------------------------------------------------------------
    log "directories"
    ensure_dir "$PREFIX" 0755 root:root
    ensure_dir "$PREFIX/venvs" 0755 root:root
    ensure_dir "$ETC" 0755 root:root
    ensure_dir "$ETC/secrets" 0711 root:root
    ensure_dir "$STATE" 0750 ctriage:ctriage
    ensure_dir /srv/ctriage 0755 root:root
    # setgid: files dropped by the export account (member of ctriage-ingest) stay group-readable for ctriage
    ensure_dir "$INCOMING" 2770 ctriage:ctriage-ingest
    ensure_dir /usr/share/doc/ctriage 0755 root:root
    if [[ -f "$REPO/docs/DEPLOYMENT.md" ]]; then
        install_file "$REPO/docs/DEPLOYMENT.md" /usr/share/doc/ctriage/DEPLOYMENT.md 0644 root:root
    fi

    # --- these scripts, for later updates and the kiosk --------------------------------------------------------
    log "firmware scripts -> $PREFIX/firmware"
    if [[ "$FIRMWARE" != "$PREFIX/firmware" ]]; then
        # the config examples beside them, so that the installed copy can provision again ($REPO/config)
        ensure_dir "$PREFIX/config" 0755 root:root
        local example
        for example in "$REPO"/config/site-*.example.toml; do
            install_file "$example" "$PREFIX/config/$(basename "$example")" 0644 root:root
        done
        run rm -rf "$PREFIX/firmware.new"
        run cp -r "$FIRMWARE" "$PREFIX/firmware.new"
        run chown -R root:root "$PREFIX/firmware.new"
        run chmod -R go-w "$PREFIX/firmware.new"
        run rm -rf "$PREFIX/firmware"
        run mv -T "$PREFIX/firmware.new" "$PREFIX/firmware"
    fi

    # --- the package ----------------------------------------------------------------------------------------
    log "ctriage package"
    if [[ -L "$PREFIX/venv" && $UPGRADE == 0 ]]; then
        info "a release is active ($(readlink "$PREFIX/venv")); use --upgrade or update-appliance.sh to change it"
    else
        local args=(--prefix "$PREFIX" --python "$python" --no-restart)
        if [[ -n "$WHEELHOUSE" ]]; then args+=(--wheelhouse "$WHEELHOUSE"); fi
        if [[ "$DRY_RUN" == 1 ]]; then args+=(--dry-run); fi
        if declare -F box_install_args >/dev/null; then box_install_args; fi
        args+=("${EXTRA_INSTALL_ARGS[@]}")
        "$FIRMWARE/update-appliance.sh" "${args[@]}" "$PACKAGE"
    fi

    # --- configuration and secrets --------------------------------------------------------------------------
    log "configuration in $ETC"
    new_config "$CONFIG_EXAMPLE" "$ETC/ctriage.toml" ctriage
    if [[ -n "$CA_FILE" ]]; then
        install_file "$CA_FILE" "$ETC/ca.crt" 0644 root:root
    elif [[ ! -f "$ETC/ca.crt" ]]; then
        warn "no site CA yet: copy the broker's ca.crt to $ETC/ca.crt (or pass --ca-file)"
    fi
    secret_file "$ETC/secrets/study-key" ctriage
    secret_file "$ETC/secrets/mqtt-password" ctriage "$MQTT_PW_FILE"
    if [[ $WITH_DISPLAY == 1 ]]; then
        new_config "$REPO/config/site-display.example.toml" "$ETC/display.toml" ctriage-display
        secret_file "$ETC/secrets/display-mqtt-password" ctriage-display "$DISPLAY_PW_FILE"
    fi

    # --- security updates -----------------------------------------------------------------------------------
    log "automatic security updates"
    local auto=/etc/apt/apt.conf.d/20auto-upgrades
    if [[ -f "$auto" ]] && grep -q 'Unattended-Upgrade "1"' "$auto"; then
        info "unattended-upgrades already enabled"
    else
        printf 'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n' \
            | write_file "$auto" 0644 root:root
    fi

    # --- logging --------------------------------------------------------------------------------------------
    log "journald: persistent, bounded"
    ensure_dir /etc/systemd/journald.conf.d 0755 root:root
    install_file "$FIRMWARE/systemd/journald-ctriage.conf" /etc/systemd/journald.conf.d/ctriage.conf 0644 root:root
    run systemctl restart systemd-journald.service

    # --- time -----------------------------------------------------------------------------------------------
    log "time synchronisation"
    if [[ -n "$NTP_SERVER" ]]; then configure_ntp "$NTP_SERVER"; fi
    check_time_sync

    # --- services -------------------------------------------------------------------------------------------
    log "systemd units"
    local units=(ctriage.service)
    install_file "$FIRMWARE/systemd/ctriage.service" "$SYSTEMD/ctriage.service" 0644 root:root
    if declare -F box_units >/dev/null; then box_units; fi
    if [[ $WITH_DISPLAY == 1 ]]; then
        install_file "$FIRMWARE/systemd/ctriage-display.service" "$SYSTEMD/ctriage-display.service" 0644 root:root
        units+=(ctriage-display.service)
    fi
    if [[ -n "$KIOSK_URL" ]]; then
        printf '# The triage display as the kiosk browser opens it.\nCTRIAGE_DISPLAY_URL=%s\n' "$KIOSK_URL" \
            | write_file "$ETC/kiosk.env" 0644 root:root
        install_file "$FIRMWARE/kiosk/pam-ctriage-kiosk" /etc/pam.d/ctriage-kiosk 0644 root:root
        install_file "$FIRMWARE/kiosk/ctriage-kiosk.service" "$SYSTEMD/ctriage-kiosk.service" 0644 root:root
        run systemctl set-default graphical.target
        units+=(ctriage-kiosk.service)
    fi
    run systemctl daemon-reload
    run systemctl enable "${units[@]}"

    if [[ $START == 0 ]]; then
        info "not starting (--no-start): systemctl start ${units[*]}"
    elif config_ready; then
        run systemctl restart "${units[@]}"
    else
        warn "services enabled but not started: finish the configuration above, then: systemctl start ${units[*]}"
    fi

    # --- summary --------------------------------------------------------------------------------------------
    log "done ($WARNINGS warning(s))"
    local g
    for g in "${GENERATED[@]}"; do
        case "$g" in
            */mqtt-password) info "generated $g: register it on the broker:" \
                "add-client.sh $DEVICE_ID --password-file <copy of $g>" ;;
            */display-mqtt-password) info "generated $g: register it on the broker:" \
                "add-client.sh --role display triage-display --password-file <copy of $g>" ;;
        esac
    done
    info "config: $ETC/ctriage.toml · logs: journalctl -u ctriage -f · state: $PREFIX/venv/bin/ctriage status"
    info "export folder for the CT console: $INCOMING (writable by the ctriage-ingest group; see DEPLOYMENT.md)"
}

# config_ready: the appliance config loads (as the service account, so permissions are checked too).
config_ready() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '+ check %s loads as user ctriage, then start\n' "$ETC/ctriage.toml"
        return 0
    fi
    local out
    if out="$(runuser -u ctriage -- "$PREFIX/venv/bin/python" -c \
        "import sys; from appliance.config import load; load(sys.argv[1])" "$ETC/ctriage.toml" 2>&1)"; then
        return 0
    fi
    warn "$ETC/ctriage.toml does not load yet: ${out##*$'\n'}"
    return 1
}
