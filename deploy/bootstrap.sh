#!/usr/bin/env bash
# Make this machine able to run berth and its tests: install and start what is
# missing (Redis, Postgres, the Docker engine), create berth's database role,
# make the runtime base images, and create the virtual environment.
#
# Idempotent: every step checks before it acts, so running it again is cheap.
# Meant for a Debian 12 machine where you are root (a laptop, a CI runner, a VM).
#
# Environment (all optional):
#   BERTH_VENV            where the virtual environment goes (default .venv)
#   BERTH_PG_PASSWORD     password of the local `berth` role (default berth)
#   BERTH_SKIP_BASE_IMAGES=1  do not make base images (foundation-only work)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${BERTH_VENV:-$root/.venv}"
pg_password="${BERTH_PG_PASSWORD:-berth}"
state_dir="$root/var"
mkdir -p "$state_dir"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "this step needs root: $*"
    exit 1
  fi
}

apt_packages=()
command -v redis-server >/dev/null || apt_packages+=(redis-server)
command -v pg_ctlcluster >/dev/null || apt_packages+=(postgresql)
command -v dockerd >/dev/null || apt_packages+=(docker.io)
command -v debootstrap >/dev/null || apt_packages+=(debootstrap)
command -v zstd >/dev/null || apt_packages+=(zstd)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_packages+=(python3-venv python3-pip)
command -v git >/dev/null || apt_packages+=(git)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  need_root "apt-get install ${apt_packages[*]}"
  log "installing ${apt_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

# --- Redis -------------------------------------------------------------------
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile "$state_dir/redis.log"
  for _ in $(seq 1 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# --- Postgres ----------------------------------------------------------------
pg_version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
if [ -z "$pg_version" ]; then
  log "no postgres cluster found under /etc/postgresql"
  exit 1
fi
if ! pg_lsclusters -h | awk -v v="$pg_version" '$1==v && $2=="main" {print $4}' | grep -q online; then
  log "starting postgres $pg_version/main"
  pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start
fi
for _ in $(seq 1 50); do su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break; sleep 0.2; done
if [ "$(su postgres -c "psql -qAtc \"select 1 from pg_roles where rolname='berth'\"")" != 1 ]; then
  log "creating postgres role berth"
  su postgres -c "psql -qc \"create role berth login createdb password '$pg_password'\""
fi
if [ "$(su postgres -c "psql -qAtc \"select 1 from pg_database where datname='berth'\"")" != 1 ]; then
  log "creating database berth"
  su postgres -c "createdb -O berth berth"
fi

# --- Docker engine -----------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  need_root "start dockerd"
  log "starting dockerd"
  nohup dockerd >"$state_dir/dockerd.log" 2>&1 &
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { log "dockerd did not start; see $state_dir/dockerd.log"; exit 1; }
fi

# --- Virtual environment -----------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.berth-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  log "installing berth and its development dependencies"
  if ! { "$venv/bin/python" -m pip install -q --upgrade pip &&
         "$venv/bin/python" -m pip install -q -e "$root[dev]"; } >"$state_dir/pip.log" 2>&1; then
    cat "$state_dir/pip.log" >&2
    log "installing berth failed (log above, also in $state_dir/pip.log)"
    exit 1
  fi
  touch "$stamp"
fi

# --- Base images -------------------------------------------------------------
if [ "${BERTH_SKIP_BASE_IMAGES:-0}" != 1 ]; then
  "$here/make-base-images.sh"
fi
log "ready"
