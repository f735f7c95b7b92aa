#!/usr/bin/env bash
# The whole check, as CI runs it, on a fresh machine or a developer's:
#   1. installs PostgreSQL 15 and Redis 7 server binaries, Prometheus (with promtool) and
#      Alertmanager if they are missing (needs root/apt);
#   2. builds .venv and installs the package with its test, lint and typing extras, compiling the
#      breaker's C fast path (required here: the tests run it and the pure-Python path both);
#   3. runs ruff (lint + format check), mypy --strict, then pytest (pytest args pass through).
# The tests start their own servers on free loopback ports; nothing else is started here.
set -euo pipefail
cd "$(dirname "$0")/.."

have_postgres() {
  command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ] && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

missing=()
have_postgres || missing+=(postgresql-15)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
# promtool and Prometheus (the rules' tests and the alerting end-to-end test), Alertmanager.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
    exit 1
  fi
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps the packages from starting their own services: the tests start theirs.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
export VERITAS_RESILIENCE_REQUIRE_EXTENSIONS=1
.venv/bin/python -m pip install -q -e '.[dev]'

echo "== ruff"
.venv/bin/ruff check --output-format concise .
.venv/bin/ruff format --check .
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/pytest "$@"
