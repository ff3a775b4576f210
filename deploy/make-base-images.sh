#!/usr/bin/env bash
# Make berth's runtime base images locally, for machines that cannot pull from a
# registry: a minimal Debian root filesystem with Python (debootstrap), imported
# into the Docker engine with `docker import`.
#
# Which runtimes it made is written to var/runtime-images.json, a JSON object
# runtime -> image reference, ready for BERTH_RUNTIME_IMAGES. An image that is
# already in the engine is not made again.
#
#   python3.11  Debian 12 (bookworm), whose python3 is 3.11
#
# Environment: BERTH_DEBIAN_MIRROR overrides the mirror (default: the one apt uses).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
state_dir="$root/var"
mkdir -p "$state_dir"
log() { printf '[base-images] %s\n' "$*" >&2; }

mirror="${BERTH_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
fi
if [ -z "$mirror" ]; then
  mirror="$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

# runtime  suite     image
runtimes=(
  "python3.11 bookworm berth-base/python:3.11"
)

make_image() {
  local suite="$1" image="$2" rootfs
  rootfs="$(mktemp -d "$state_dir/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' RETURN
  log "debootstrap $suite into $rootfs (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$state_dir/debootstrap-$suite.log" 2>&1 || {
      log "debootstrap failed; see $state_dir/debootstrap-$suite.log"; return 1; }
  # Trim what a runtime never needs: apt lists, docs, man pages, locales.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/var/cache/apt/*.bin
  log "importing $image"
  tar -C "$rootfs" --exclude=./proc --exclude=./sys --exclude=./dev -c . \
    | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        - "$image" >/dev/null
}

made="{"
sep=""
for entry in "${runtimes[@]}"; do
  read -r runtime suite image <<<"$entry"
  if ! docker image inspect "$image" >/dev/null 2>&1; then
    make_image "$suite" "$image"
  fi
  made+="$sep\"$runtime\": \"$image\""
  sep=", "
done
made+="}"
printf '%s\n' "$made" >"$state_dir/runtime-images.json"
log "runtime images: $made"
