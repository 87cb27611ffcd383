#!/usr/bin/env bash
# Install everything the project needs into a fresh virtual environment, then lint,
# type-check and run the test suite. This is the README's test command; .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl; }
bash ci/install-system-deps.sh  # openssh-server for the SSH provider's tests
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
"$VENV/bin/ruff" check dask_rawvm tests benchmarks
"$VENV/bin/mypy"
# The documentation, warnings as errors (~10 s); its examples run in tests/docs.
VENV="$VENV" bash ci/build-docs.sh
# Two test processes (pytest-xdist), a file each at a time (module fixtures stay one cluster):
# the suite waits on VM boots more than it computes, so two halve its time on two cores
# (measured: 32.9 min on one process, 21.5 on two). The slowest tests are listed at the end.
"$VENV/bin/pytest" -q -n "${TEST_PROCESSES:-2}" --dist loadfile --durations=20 "$@"
