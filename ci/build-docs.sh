#!/usr/bin/env bash
# Build the documentation with warnings as errors (about 10 s once installed).
#
# The docs' tools go into their own directory, on PYTHONPATH for the build only, not into
# the test environment: that environment is what the tests' clusters ship to their VMs
# (environment="local"), and the docs' tools would ship too (beautifulsoup4's soupsieve
# 4.1.3 needs Python >= 3.11.5, which a lock for "Python 3.11" VMs cannot satisfy).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DOCS_DEPS=${DOCS_DEPS:-.docs-deps}
if [ ! -d "$DOCS_DEPS" ]; then
    # The "docs" extra of pyproject.toml, the one list of the docs' tools.
    "$VENV/bin/python" - <<'PY' > /tmp/rawvm-docs-requirements.txt
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["docs"]))
PY
    "$VENV/bin/python" -m pip install --quiet --target "$DOCS_DEPS" \
        -r /tmp/rawvm-docs-requirements.txt
fi
PYTHONPATH="$PWD/$DOCS_DEPS" "$VENV/bin/python" -m sphinx -W --keep-going -q -b html \
    docs docs/_build/html "$@"
