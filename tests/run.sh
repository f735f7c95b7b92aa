#!/usr/bin/env bash
# The whole check, as CI runs it, on a fresh machine or a developer's:
#   1. installs PostgreSQL 15 and Redis 7 server binaries, Prometheus (with promtool) and
#      Alertmanager if they are missing (needs root/apt);
#   2. builds .venv and installs the package with its test, lint, typing and docs extras;
#   3. runs ruff (lint + format check) and mypy --strict;
#   4. runs the tests that need no server on the oldest supported CPython (3.10) and on the newest
#      one installed, in their own venvs kept in .venvs/ (tests/other_pythons.sh --ci: about
#      20 s of CPU each, in parallel; a missing 3.10 fails the run only when CI=true);
#   5. runs the whole pytest suite on .venv's Python (pytest args pass through), which also
#      builds the documentation site with mkdocs build --strict.
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
.venv/bin/python -m pip install -q -e '.[dev]'

echo "== ruff"
.venv/bin/ruff check --output-format concise .
.venv/bin/ruff format --check .
echo "== mypy --strict"
.venv/bin/mypy
echo "== other CPythons (no servers)"
bash tests/other_pythons.sh --ci
echo "== pytest"
exec .venv/bin/pytest "$@"
