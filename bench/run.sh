#!/usr/bin/env bash
# The benchmark: set this machine up (deploy/bootstrap.sh), then measure berth against
# raw `docker run` and naive pip builds. Results: bench/results/*.json and the
# `current` table in docs/benchmarks.md. 7-9 minutes on 2 cores.
#
#   bash bench/run.sh                     # everything
#   bash bench/run.sh --cases hit,lookup  # arguments go to `python -m bench.run`
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash deploy/bootstrap.sh
exec "${BERTH_VENV:-$root/.venv}/bin/python" -m bench.run "$@"
