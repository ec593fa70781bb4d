#!/bin/sh
# Make sure nginx and wrk are installed for load_tests/bench.py (used by `make bench`).
#
# Idempotent and quiet: does nothing when both binaries are present. Otherwise installs them with
# apt-get (Debian/Ubuntu), running `apt-get update` only then. Needs root, or sudo without a password.
#
# The benchmark starts its own nginx instances with private configs; it never uses the system nginx
# service. So while installing, this script forbids package scripts from starting services (the usual
# policy-rc.d convention), unless the machine already has a policy-rc.d of its own.
set -eu

missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
# nginx lives in /usr/sbin, which is not always on a non-root PATH.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    missing="$missing nginx"
fi
[ -z "$missing" ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_tools: missing:$missing; install them with your package manager (no apt-get here)" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
else
    echo "ensure_tools: missing:$missing; run as root (or install sudo) to install them" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
made_policy=""
log=$(mktemp)  # apt's chatter goes here, and is shown only if something fails
cleanup() {
    if [ -n "$made_policy" ]; then $SUDO rm -f "$policy"; fi
    rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # through the EXIT trap, so the temporary policy-rc.d is removed
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    made_policy=1
fi

apt() {
    # `env` because sudo drops the caller's environment.
    if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "ensure_tools: apt-get $* failed" >&2
        exit 1
    fi
}

echo "ensure_tools: installing$missing ..." >&2
apt update -qq
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt install -y -qq --no-install-recommends $missing
echo "ensure_tools: installed$missing" >&2
