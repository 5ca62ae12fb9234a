#!/usr/bin/env bash
# Open the triage display full screen: wait until the display answers, then exec Chromium in kiosk mode.
# Started by ctriage-kiosk.service (inside cage) or ctriage-kiosk-session.service (desktop session).
set -euo pipefail

URL="${CTRIAGE_DISPLAY_URL:-http://127.0.0.1:8080/}"
WAIT_S="${CTRIAGE_KIOSK_WAIT_S:-120}"
PROFILE="${STATE_DIRECTORY:-${XDG_STATE_HOME:-$HOME/.local/state}/ctriage-kiosk}/chromium"

if [[ ! "$URL" =~ ^https?:// ]]; then
    echo "ctriage-kiosk: CTRIAGE_DISPLAY_URL must be an http(s) URL, got '$URL'" >&2
    exit 2
fi

browser=""
for b in chromium chromium-browser /snap/bin/chromium google-chrome-stable; do  # Ubuntu: Chromium is a snap
    if command -v "$b" >/dev/null 2>&1; then browser="$(command -v "$b")"; break; fi
done
[[ -n "$browser" ]] || { echo "ctriage-kiosk: no Chromium found (apt-get install chromium)" >&2; exit 1; }

# The display may start after the screen (or on another box): keep the screen black until it answers, then go.
deadline=$((SECONDS + WAIT_S))
until curl -fsS -o /dev/null --max-time 3 "$URL" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
        echo "ctriage-kiosk: $URL did not answer in ${WAIT_S}s; opening it anyway (the page retries)" >&2
        break
    fi
    sleep 2
done

mkdir -p "$PROFILE"
# After a power cut Chromium would offer to "restore pages" over the display: mark the last exit as clean.
prefs="$PROFILE/Default/Preferences"
if [[ -f "$prefs" ]]; then
    sed -i -e 's/"exited_cleanly":false/"exited_cleanly":true/' -e 's/"exit_type":"[A-Za-z]*"/"exit_type":"Normal"/' \
        "$prefs" || true
fi
# shellcheck disable=SC2054  # the commas belong to Chromium's --disable-features list
flags=(
    --kiosk "$URL"
    --user-data-dir="$PROFILE"
    --no-first-run
    --noerrdialogs
    --disable-infobars
    --disable-session-crashed-bubble
    --disable-features=Translate,TranslateUI,MediaRouter
    --check-for-update-interval=31536000
    --password-store=basic
    --autoplay-policy=no-user-gesture-required
    --overscroll-history-navigation=0
    --disable-pinch
)
if [[ -n "${WAYLAND_DISPLAY:-}" ]]; then
    flags+=(--ozone-platform=wayland)
elif [[ -n "${DISPLAY:-}" ]] && command -v xset >/dev/null 2>&1; then
    xset s off -dpms || true   # X11 desktop: no screen saver, no power-down on the triage screen
fi
exec "$browser" "${flags[@]}"
