"""The build recipe: what runs inside a build container, and the image it makes.

Fixed text only: the lock and the operator's settings arrive as files in
/berth-build, read into variables, never parsed as code. A change here that
changes what an image contains must bump constants.BUILD_RECIPE_VERSION (it is
part of every image key), so old images are never served for the new recipe.
"""

from __future__ import annotations

from typing import Final

TOOLS_MOUNT: Final = "/opt/berth-tools"
# The per-host store volume, in build containers only: uv's cache and every image's
# environment, in one mount so that installs hard-link files out of the cache.
STORE_MOUNT: Final = "/var/lib/berth-store"
UV_CACHE_DIR: Final = f"{STORE_MOUNT}/uv-cache"
ENVS_DIR: Final = "envs"  # under the store: one directory per image key
BUILD_DIR: Final = "berth-build"
VENV: Final = "/opt/venv"  # where jobs see their image's environment (read-only)

# The environment of every built image (and of its build container).
IMAGE_ENV: Final = (
    f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    f"VIRTUAL_ENV={VENV}",
    "PYTHONDONTWRITEBYTECODE=1",
    "PYTHONUNBUFFERED=1",
    "LANG=C.UTF-8",
)

TOOLS_MISSING_EXIT: Final = 97  # the build script's exit code when the tools volume is empty
PARENT_MISSING_EXIT: Final = 96  # a near build's parent environment is not in the store
ENV_BYTES_MARK: Final = "berth-env-bytes"  # the build's last line: "<mark> <bytes>"
# Not compiled to bytecode: test directories inside a package (compileall's -x, a
# regular expression searched in each path).
COMPILE_SKIP: Final = r"/site-packages/[^/]+/(.+/)?tests?/"

# Fixed text: values come from files, read into variables (never parsed as code).
# The environment is made in a staging directory of the store, seen through the
# symlink /opt/venv (so every path inside it, shebangs and .pyc included, reads
# /opt/venv, where jobs mount it), then renamed to envs/<key> in one step.
_PREAMBLE: Final = f"""\
export UV_CACHE_DIR={UV_CACHE_DIR} UV_LINK_MODE=hardlink UV_PYTHON_DOWNLOADS=never \\
  UV_PYTHON_PREFERENCE=only-system UV_NO_CONFIG=1 NO_COLOR=1
b=/{BUILD_DIR}
if [ ! -x {TOOLS_MOUNT}/uv ]; then
  echo "berth: no uv in the tools volume" >&2; exit {TOOLS_MISSING_EXIT}
fi
if [ -s "$b/ca.pem" ]; then export SSL_CERT_FILE="$b/ca.pem"; fi
if [ -s "$b/index-url" ]; then UV_INDEX_URL=$(cat "$b/index-url"); export UV_INDEX_URL; fi
if [ -s "$b/extra-index-urls" ]; then
  UV_EXTRA_INDEX_URL=$(cat "$b/extra-index-urls"); export UV_EXTRA_INDEX_URL
fi
# uv's own flags for the installs below, as positional parameters ("$@").
if [ -e "$b/wheels-only" ]; then set -- --no-build; else set --; fi
envs={STORE_MOUNT}/{ENVS_DIR}
key=$(cat "$b/env-key")
mkdir -p "$envs" {UV_CACHE_DIR}
stage=$(mktemp -d "$envs/.build-XXXXXXXXXX")
trap 'rm -rf "$stage"' EXIT
chmod 755 "$stage"
"""
_LINK_VENV: Final = f"""\
rm -rf {VENV}
mkdir -p "$(dirname {VENV})"
ln -s "$stage" {VENV}
"""
# Bytecode, in parallel, for every module but the test suites packages ship inside
# them (about half of numpy's and pandas' files, never imported by a job; were one
# imported, Python would compile it in memory). Jobs cannot write .pyc: /opt/venv is
# read-only. Up-to-date .pyc (a near build's, from the parent) are kept. A file that
# does not compile (a template, another Python's syntax) is left as it is, as pip does.
_COMPILE: Final = f"""\
if ! python3 -I -m compileall -qq -j 0 -x '{COMPILE_SKIP}' {VENV}/lib; then
  echo "berth: some files did not compile to bytecode" >&2
fi
"""
# Publish: a previous environment of this key (its image gone, or replaced) is moved
# aside, not deleted: a running job may still have it mounted. Eviction removes it.
_FINISH: Final = f"""\
bytes=$(du -sb "$stage" | cut -f1)
if [ -e "$envs/$key" ]; then mv "$envs/$key" "$envs/.old-${{stage##*.build-}}"; fi
mv -T "$stage" "$envs/$key"
touch "$envs/$key"  # its ctime is when it was published (prune's grace counts from it)
trap - EXIT
rm -f {VENV}
mkdir {VENV}
mkdir -p /work
chown "$(cat "$b/job-user")" /work
rm -rf "$b"
echo "{ENV_BYTES_MARK} $bytes"
"""
BUILD_SCRIPT: Final = f"""{_PREAMBLE}\
{_LINK_VENV}\
{TOOLS_MOUNT}/uv venv --quiet --python python3 {VENV}
{TOOLS_MOUNT}/uv pip install "$@" --python {VENV}/bin/python -r "$b/requirements.lock"
{_COMPILE}\
{_FINISH}"""
# Bytecode an uninstall leaves behind: a top-level module's .pyc lives in the
# shared site-packages/__pycache__, which no package's RECORD owns. A __pycache__
# .pyc whose source is gone is never used by Python; removing it leaves the venv as
# a fresh install would be.
_DROP_ORPHAN_PYC: Final = """\
import pathlib, sys
for pyc in pathlib.Path(sys.argv[1]).rglob("__pycache__/*.pyc"):
    if not (pyc.parent.parent / (pyc.name.split(".")[0] + ".py")).exists():
        pyc.unlink()
        if not any(pyc.parent.iterdir()):
            pyc.parent.rmdir()
"""
# A near build: the parent's environment hard-linked into the stage (no data is
# copied; every change below replaces files, never writes into them), the lock
# resolved on its own (what `uv pip install` resolves into an empty venv, the
# parent's packages no preference), then synced: the venv ends up exactly the
# lock's, whatever the parent had.
SYNC_SCRIPT: Final = f"""{_PREAMBLE}\
parent="$envs/$(cat "$b/parent-key")"
if [ ! -d "$parent" ]; then
  echo "berth: the parent environment is not in the store" >&2; exit {PARENT_MISSING_EXIT}
fi
cp -a --link "$parent/." "$stage/"
{_LINK_VENV}\
{TOOLS_MOUNT}/uv pip compile "$@" --python {VENV}/bin/python --no-header --no-annotate --quiet \\
  "$b/requirements.lock" > "$b/resolved.txt"
{TOOLS_MOUNT}/uv pip sync "$@" --python {VENV}/bin/python "$b/resolved.txt"
python3 -I -c '{_DROP_ORPHAN_PYC}' {VENV}/
{_COMPILE}\
{_FINISH}"""

# Removes environments from the store: argv is the envs directory, the ages (s)
# after which an unknown environment / a staging or moved-aside one may go, then
# the keys to keep. Prints what it removed, one name per line (what it could not
# remove is tried again by the next sweep).
PRUNE_SCRIPT: Final = """\
import os, shutil, sys, time
root, grace, stale, keep = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), set(sys.argv[4:])
try:
    names = sorted(os.listdir(root))
except FileNotFoundError:
    names = []
now = time.time()
for name in names:
    path = os.path.join(root, name)
    if name in keep:
        continue
    age = now - os.lstat(path).st_ctime
    if age < (stale if name.startswith(".") else grace):
        continue
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        print(name, flush=True)
"""

# Moves a freshly copied uv into place in one rename: a reader never sees half a binary.
TOOLS_SCRIPT: Final = f'mv -f "$1" {TOOLS_MOUNT}/uv'
