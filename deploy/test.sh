#!/usr/bin/env bash
# The test command: set this machine up (deploy/bootstrap.sh installs and starts
# whatever is missing), then lint, type-check and run the whole suite against the
# real Redis, Postgres and Docker engine.
#
#   bash deploy/test.sh              # everything
#   bash deploy/test.sh -k cache     # extra arguments go to pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash deploy/bootstrap.sh
venv="${BERTH_VENV:-$root/.venv}"
echo "[test] ruff" >&2
"$venv/bin/ruff" check shared worker scheduler tests bench
"$venv/bin/ruff" format --check shared worker scheduler tests bench
echo "[test] mypy" >&2
"$venv/bin/mypy"
echo "[test] pytest" >&2
exec "$venv/bin/pytest" "$@"
