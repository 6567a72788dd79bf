#!/usr/bin/env bash
# Makes a fresh Debian machine ready: PostgreSQL, Redis, Docker Engine, Pebble, certbot and
# nginx, Prometheus' promtool and Alertmanager (the tests and the sandbox start their own servers from them) and the Python environment in .venv, pinned by
# constraints.txt. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need+=(postgresql postgresql-contrib)
command -v redis-server >/dev/null || need+=(redis-server)
# The docker controller's tests run a real Docker Engine with an image built from busybox.
command -v dockerd >/dev/null || need+=(docker.io)
[ -x /bin/busybox ] || need+=(busybox-static)
# Workers are scaled through docker compose (the project's own service definition); Debian 12
# packages the standalone docker-compose (v1), not the v2 plugin.
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 \
  || need+=(docker-compose)
# The TLS renewal is tested for real: Pebble (a test ACME server), certbot and nginx.
command -v pebble >/dev/null || need+=(pebble)
command -v certbot >/dev/null || need+=(certbot)
command -v nginx >/dev/null || need+=(nginx-light)
# Alert rules are checked by promtool; the alert path is tested through a real Alertmanager.
command -v promtool >/dev/null || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need+=(prometheus-alertmanager)
command -v runuser >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  echo "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "Python 3.11 or newer is needed, found $(python3 --version)" >&2; exit 2; }

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
  touch "$stamp"
fi
