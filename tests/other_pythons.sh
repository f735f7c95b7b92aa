#!/usr/bin/env bash
# The core tests (no servers) on every other CPython found here, each with the compiled fast path
# built from a wheel and required: `bash tests/other_pythons.sh [pytest args]`.
# Looks for python3.10 ... python3.14 in ~/.pyenv/versions and on PATH. Not part of CI's run.
set -euo pipefail
cd "$(dirname "$0")/.."

found=()
for minor in 10 11 12 13 14; do
  for candidate in "$HOME"/.pyenv/versions/3."$minor".*/bin/python "$(command -v "python3.$minor" || true)"; do
    if [ -x "$candidate" ] && "$candidate" -c pass 2>/dev/null; then
      found+=("$candidate")
      break
    fi
  done
done
[ ${#found[@]} -gt 0 ] || { echo "no other CPython found" >&2; exit 1; }

core_tests=(tests/test_circuit_breaker.py tests/test_circuit_breaker_compiled.py
  tests/test_circuit_breaker_model.py tests/test_metrics.py tests/test_limits.py
  tests/test_pipeline.py tests/test_fallback.py tests/test_retry.py tests/test_public_api.py
  tests/test_testing_clock.py)
export VERITAS_RESILIENCE_REQUIRE_EXTENSIONS=1
status=0
for python in "${found[@]}"; do
  version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  venv="${TMPDIR:-/tmp}/veritas-py$version"
  echo "== Python $version ($python)"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  # A wheel, not an editable install: the source tree holds only this Python's compiled module.
  "$venv/bin/python" -m pip install -q --force-reinstall --no-deps . >/dev/null
  "$venv/bin/python" -m pip install -q '.[tests]' >/dev/null
  # Run from outside the source tree so that the installed package is the one imported.
  (cd tests && "$venv/bin/pytest" -q -p no:cacheprovider --rootdir .. -c ../pyproject.toml \
    "${core_tests[@]/#tests\//}" "$@") || status=1
done
exit $status
