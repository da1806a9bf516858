#!/usr/bin/env bash
# Installs everything anomalyd needs on a fresh machine, idempotently:
#   - the Mosquitto broker binary (tests start their own broker on a free port),
#   - the NATS server binary (the scale-out tests start their own),
#   - Prometheus and promtool (the monitoring tests start their own server on a free port),
#   - a virtual environment in .venv with the project (editable) and its train + dev extras.
# Called by `make run` and `make test`; safe to run again (it skips what is already there).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-train,dev}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "anomalyd needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi

# Mosquitto: Debian/Ubuntu package `mosquitto` (the binary lands in /usr/sbin). Mosquitto 2's
# package also ships the dynamic security plugin (mosquitto_dynamic_security.so) that the
# broker-permission tests load; an older or plugin-less Mosquitto fails those tests.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing mosquitto with apt-get" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
    else
        echo "bootstrap: the 'mosquitto' broker is required (tests and 'make run' start one)." >&2
        echo "  Debian/Ubuntu: sudo apt-get install mosquitto   Fedora: sudo dnf install mosquitto" >&2
        echo "  macOS: brew install mosquitto" >&2
        exit 1
    fi
fi

# NATS server: Debian/Ubuntu package `nats-server` (2.9 or newer: its MQTT gateway and subject
# mapping with partition()), for the scale-out tests (tests start their own server on free
# ports). The package's own service, if it has one, is left as it is.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing nats-server with apt-get" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server >/dev/null
    else
        echo "bootstrap: 'nats-server' is required (the scale-out tests start one)." >&2
        echo "  Debian/Ubuntu: sudo apt-get install nats-server   macOS: brew install nats-server" >&2
        echo "  elsewhere: the nats-server binary (2.9 or newer) from nats.io on PATH" >&2
        exit 1
    fi
fi

# Prometheus and promtool: Debian/Ubuntu package `prometheus`, for the monitoring tests
# (tests/e2e/test_monitoring.py starts its own server on a free port). The package's own
# service, a server on :9090, is kept from starting (policy-rc.d) and left disabled.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing prometheus (server and promtool) with apt-get" >&2
        apt-get update -qq
        policy=/usr/sbin/policy-rc.d
        own_policy=
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
        fi
        status=0
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
            || status=$?
        [ -z "$own_policy" ] || rm -f "$policy"
        [ "$status" = 0 ] || exit "$status"
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            systemctl disable --now prometheus.service >/dev/null 2>&1 || true
        fi
    else
        echo "bootstrap: 'prometheus' and 'promtool' are required (the monitoring tests run them)." >&2
        echo "  Debian/Ubuntu: sudo apt-get install prometheus && sudo systemctl disable --now prometheus" >&2
        echo "  macOS: brew install prometheus   elsewhere: prometheus and promtool from prometheus.io on PATH" >&2
        exit 1
    fi
fi

# Re-install only when pyproject.toml changed since the last successful install.
stamp="$VENV/.anomalyd-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/anomalyd" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
echo "$want" >"$stamp"
echo "bootstrap: installed anomalyd into $VENV" >&2
