#!/usr/bin/env bash
# Site PKI for the ctriage broker: a site CA, the broker's server certificate and (optionally) client certificates.
#
#   make-certs.sh --out /root/ctriage-pki --server broker.hospital.lan --server-ip 10.20.0.5 \
#                 --client ct-room-1 --client triage-display
#
# Idempotent: an existing CA is reused (never overwritten); an existing leaf certificate is kept unless --force.
# Keys are EC P-256, written with mode 0600. Keep ca.key offline (USB stick in a safe), not on the broker.
set -euo pipefail

OUT="./site-pki"
CA_NAME="ctriage site CA"
DAYS=825          # leaf validity (browsers and many TLS stacks refuse longer lifetimes)
CA_DAYS=3650
FORCE=0
SERVER_NAMES=()
SERVER_IPS=()
CLIENTS=()

usage() {
    cat <<'EOF'
Usage: make-certs.sh [options]
  -o, --out DIR        output directory (default ./site-pki)
      --ca-name NAME   CA common name (default "ctriage site CA")
      --server NAME    broker DNS name for the server certificate (repeatable; the first is the CN)
      --server-ip IP   broker IP address for the server certificate (repeatable)
      --client NAME    issue a client certificate with CN=NAME (repeatable; NAME = MQTT username)
      --days N         leaf certificate validity in days (default 825)
      --ca-days N      CA validity in days (default 3650)
      --force          reissue leaf certificates that already exist (the CA is never reissued)
  -h, --help           this help
Writes DIR/ca.crt, DIR/ca.key, DIR/server.{crt,key}, DIR/clients/NAME.{crt,key}.
EOF
}

die() { echo "make-certs: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -o|--out) OUT="${2:?--out needs a directory}"; shift 2 ;;
        --ca-name) CA_NAME="${2:?--ca-name needs a value}"; shift 2 ;;
        --server) SERVER_NAMES+=("${2:?--server needs a name}"); shift 2 ;;
        --server-ip) SERVER_IPS+=("${2:?--server-ip needs an address}"); shift 2 ;;
        --client) CLIENTS+=("${2:?--client needs a name}"); shift 2 ;;
        --days) DAYS="${2:?--days needs a number}"; shift 2 ;;
        --ca-days) CA_DAYS="${2:?--ca-days needs a number}"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

command -v openssl >/dev/null || die "openssl is not installed (apt-get install openssl)"
[[ "$DAYS" =~ ^[0-9]+$ && "$CA_DAYS" =~ ^[0-9]+$ ]] || die "--days and --ca-days take whole numbers"
name_re='^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'
for c in "${CLIENTS[@]}"; do
    [[ "$c" =~ $name_re ]] || die "client name '$c': letters, digits, '-', '_' and '.' only"
done
for n in "${SERVER_NAMES[@]}"; do
    [[ "$n" =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] || die "server name '$n' is not a DNS name"
done
for ip in "${SERVER_IPS[@]}"; do
    [[ "$ip" =~ ^[0-9.]+$ || "$ip" =~ ^[0-9A-Fa-f:]+$ ]] || die "server IP '$ip' is not an IPv4/IPv6 address"
done

umask 077
mkdir -p "$OUT/clients"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

newkey() {  # newkey FILE
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 0600 "$1"
}

# --- CA -------------------------------------------------------------------------------------------------------
if [[ -f "$OUT/ca.key" && -f "$OUT/ca.crt" ]]; then
    echo "CA: reusing $OUT/ca.crt"
elif [[ -f "$OUT/ca.key" || -f "$OUT/ca.crt" ]]; then
    die "$OUT has only one of ca.key / ca.crt; restore the other or move both away"
else
    newkey "$OUT/ca.key"
    openssl req -new -x509 -sha256 -key "$OUT/ca.key" -days "$CA_DAYS" -subj "/CN=$CA_NAME" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" -out "$OUT/ca.crt"
    chmod 0644 "$OUT/ca.crt"
    echo "CA: created $OUT/ca.crt (keep $OUT/ca.key offline)"
fi

sign() {  # sign NAME_STEM CN EXTFILE
    local stem="$1" cn="$2" ext="$3"
    newkey "$stem.key"
    openssl req -new -sha256 -key "$stem.key" -subj "/CN=$cn" -out "$TMP/req.csr"
    openssl x509 -req -sha256 -in "$TMP/req.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
        -CAserial "$OUT/ca.srl" -CAcreateserial -days "$DAYS" -extfile "$ext" -out "$stem.crt" 2>/dev/null
    chmod 0644 "$stem.crt"
    openssl verify -CAfile "$OUT/ca.crt" "$stem.crt" >/dev/null
}

# --- server ---------------------------------------------------------------------------------------------------
if [[ ${#SERVER_NAMES[@]} -gt 0 || ${#SERVER_IPS[@]} -gt 0 ]]; then
    if [[ -f "$OUT/server.crt" && $FORCE -eq 0 ]]; then
        echo "server: keeping $OUT/server.crt (--force to reissue)"
    else
        san=""
        for n in "${SERVER_NAMES[@]}"; do san+="${san:+,}DNS:$n"; done
        for ip in "${SERVER_IPS[@]}"; do san+="${san:+,}IP:$ip"; done
        cn="${SERVER_NAMES[0]:-${SERVER_IPS[0]}}"
        cat >"$TMP/server.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyAgreement
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
        sign "$OUT/server" "$cn" "$TMP/server.ext"
        echo "server: issued $OUT/server.crt for $san"
    fi
elif [[ ! -f "$OUT/server.crt" ]]; then
    echo "server: no --server/--server-ip given, no server certificate issued" >&2
fi

# --- clients --------------------------------------------------------------------------------------------------
cat >"$TMP/client.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
for c in "${CLIENTS[@]}"; do
    if [[ -f "$OUT/clients/$c.crt" && $FORCE -eq 0 ]]; then
        echo "client $c: keeping $OUT/clients/$c.crt"
    else
        sign "$OUT/clients/$c" "$c" "$TMP/client.ext"
        echo "client $c: issued $OUT/clients/$c.crt"
    fi
done
