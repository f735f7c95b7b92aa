#!/usr/bin/env bash
# The tests that need no server, on other CPythons than the one of .venv:
#   bash tests/other_pythons.sh [--ci] [pytest args]
# Without --ci: every CPython 3.10 ... 3.14 found (in ~/.pyenv/versions or on PATH).
# With --ci (tests/run.sh): the oldest supported CPython (3.10, requires-python in pyproject.toml)
# and the newest one found, in parallel, each with a fifth of the property tests' examples.
# A version that .venv runs already is skipped: the main run covers it.
#
# Each version has a venv in .venvs/py3.X, kept between runs; it is (re)installed, editable with
# the tests extra, only when pyproject.toml has changed since its last install.
#
# A missing 3.10 is reported clearly; it fails the run only when CI=true. On a developer's
# machine without pyenv the main run still checks everything else, and CI (which sets CI=true)
# cannot silently lose the oldest supported version.
set -euo pipefail
cd "$(dirname "$0")/.."

ci=0
if [ "${1:-}" = "--ci" ]; then
  ci=1
  shift
fi
oldest=10

find_python() {  # find_python MINOR -> the path of a working CPython 3.MINOR, or nothing
  local candidate
  for candidate in "$HOME"/.pyenv/versions/3."$1".*/bin/python "$(command -v "python3.$1" || true)"; do
    if [ -x "$candidate" ] && "$candidate" -c 'import sys; assert sys.implementation.name == "cpython"' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
}

declare -A pythons=()
for minor in 10 11 12 13 14; do
  python=$(find_python "$minor")
  [ -n "$python" ] && pythons[$minor]=$python
done

selected=()
if [ "$ci" = 1 ]; then
  if [ -z "${pythons[$oldest]:-}" ]; then
    echo "!! CPython 3.$oldest (the oldest supported) was not found in ~/.pyenv/versions or on PATH;" \
      "install it (pyenv install 3.$oldest) to test it" >&2
    [ "${CI:-}" = "true" ] && exit 1
  else
    selected+=("$oldest")
  fi
  newest=$(printf '%s\n' "${!pythons[@]}" | sort -n | tail -n 1)
  [ -n "$newest" ] && [ "$newest" != "$oldest" ] && selected+=("$newest")
else
  selected=($(printf '%s\n' "${!pythons[@]}" | sort -n))
fi

main_minor=$(.venv/bin/python -c 'import sys; print(sys.version_info[1])' 2>/dev/null || true)
core_tests=(tests/test_circuit_breaker.py tests/test_circuit_breaker_forms.py
  tests/test_circuit_breaker_model.py tests/test_metrics.py tests/test_limits.py
  tests/test_pipeline.py tests/test_fallback.py tests/test_retry.py tests/test_cache.py
  tests/test_logging.py tests/test_public_api.py tests/test_testing_clock.py
  tests/test_redis_unit.py tests/test_postgres_config.py tests/test_postgres_errors.py
  tests/test_postgres_node.py tests/test_postgres_topology.py)
stamp_of() { cat pyproject.toml "$1/bin/python" 2>/dev/null | sha256sum | cut -c1-16; }

run_one() {  # run_one MINOR [pytest args]: set up the venv and run the tests, quietly
  local minor=$1 venv=".venvs/py3.$1"
  shift
  if [ ! -x "$venv/bin/python" ]; then
    "${pythons[$minor]}" -m venv "$venv"
  fi
  if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$(stamp_of "$venv")" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e '.[tests]'
    stamp_of "$venv" > "$venv/.installed"
  fi
  "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not integration" \
    --hypothesis-profile="$( [ "$ci" = 1 ] && echo other-pythons || echo default )" \
    "${core_tests[@]}" "$@"
}

mkdir -p .venvs
declare -A jobs=()
for minor in "${selected[@]}"; do
  if [ "$minor" = "$main_minor" ]; then
    echo "== Python 3.$minor: the main run (.venv) covers it"
    continue
  fi
  # In parallel: each run is one process, and these machines have two cores or more.
  run_one "$minor" "$@" > ".venvs/py3.$minor.log" 2>&1 &
  jobs[$minor]=$!
done
status=0
for minor in $(printf '%s\n' "${!jobs[@]}" | sort -n); do
  if wait "${jobs[$minor]}"; then result=passed; else result=FAILED; status=1; fi
  echo "== Python 3.$minor (${pythons[$minor]}): $result"
  if [ "$result" = FAILED ]; then cat ".venvs/py3.$minor.log"; else tail -n 1 ".venvs/py3.$minor.log"; fi
done
exit $status
