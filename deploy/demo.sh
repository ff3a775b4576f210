#!/usr/bin/env bash
# berth's main job, end to end, on this machine:
#   1. install and start what is missing (Redis, Postgres, Docker engine, base image)
#   2. migrate the database and warm the cache
#   3. start a worker
#   4. submit the example script with a real dependency twice: the first job builds
#      its image (on a machine that never built it), the second reuses it at once
# Then it stops the worker. Run it again and both jobs are cache hits.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash deploy/bootstrap.sh
venv="${BERTH_VENV:-$root/.venv}"
export PATH="$venv/bin:$PATH"
# Local base images (no registry here) and the HTTPS CA that builds need.
export BERTH_RUNTIME_IMAGES="${BERTH_RUNTIME_IMAGES:-$(cat var/runtime-images.json)}"
if [ -z "${BERTH_CA_BUNDLE_PATH:-}" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  export BERTH_CA_BUNDLE_PATH=/etc/ssl/certs/ca-certificates.crt
fi
export BERTH_PATH_CACHE_DIR="${BERTH_PATH_CACHE_DIR:-$root/var/path-caches}"

berth migrate
berth warm
berth worker >var/demo-worker.log 2>&1 &
worker=$!
trap 'kill "$worker" 2>/dev/null; wait "$worker" 2>/dev/null || true' EXIT

for run in first second; do
  echo
  echo "== $run job: deploy/example/report.py with $(cat deploy/example/requirements.txt)"
  berth submit deploy/example/report.py -r deploy/example/requirements.txt \
    --runtime python3.11 --arg "$run run" --wait --wait-timeout 600
done
echo
echo "worker log: var/demo-worker.log"
