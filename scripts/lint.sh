#!/usr/bin/env bash
# Lint, formatting and types, as CI checks them before the tests (`scripts/setup.sh --test` installs ruff and
# mypy; their settings are in pyproject.toml). Fix formatting with `python3 -m ruff format .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy
