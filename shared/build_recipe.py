"""The build recipe: what runs inside a build container, and the image it makes.

Fixed text only: the lock and the operator's settings arrive as files in
/berth-build, read into variables, never parsed as code. A change here that
changes what an image contains must bump constants.BUILD_RECIPE_VERSION (it is
part of every image key), so old images are never served for the new recipe.
"""

from __future__ import annotations

from typing import Final

TOOLS_MOUNT: Final = "/opt/berth-tools"
UV_CACHE_MOUNT: Final = "/var/cache/berth-uv"
BUILD_DIR: Final = "berth-build"
VENV: Final = "/opt/venv"

# The environment of every built image (and of its build container, so that the
# commit's merge adds nothing).
IMAGE_ENV: Final = (
    f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    f"VIRTUAL_ENV={VENV}",
    "PYTHONDONTWRITEBYTECODE=1",
    "PYTHONUNBUFFERED=1",
    "LANG=C.UTF-8",
)

TOOLS_MISSING_EXIT: Final = 97  # the build script's exit code when the tools volume is empty

# Fixed text: values come from files, read into variables (never parsed as code).
_PREAMBLE: Final = f"""\
export UV_CACHE_DIR={UV_CACHE_MOUNT} UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never \\
  UV_NO_CONFIG=1 UV_COMPILE_BYTECODE=1 NO_COLOR=1
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
"""
_FINISH: Final = """\
mkdir -p /work
chown "$(cat "$b/job-user")" /work
rm -rf "$b"
"""
BUILD_SCRIPT: Final = f"""{_PREAMBLE}\
python3 -m venv --without-pip {VENV}
{TOOLS_MOUNT}/uv pip install "$@" --python {VENV}/bin/python -r "$b/requirements.lock"
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
# A near build, in a container of the parent image: the lock resolved on its own
# (what `uv pip install` resolves into an empty venv, the parent's packages no
# preference), then synced: the venv ends up exactly the lock's, whatever the parent had.
SYNC_SCRIPT: Final = f"""{_PREAMBLE}\
{TOOLS_MOUNT}/uv pip compile "$@" --python {VENV}/bin/python --no-header --no-annotate --quiet \\
  "$b/requirements.lock" > "$b/resolved.txt"
{TOOLS_MOUNT}/uv pip sync "$@" --python {VENV}/bin/python "$b/resolved.txt"
python3 -I -c '{_DROP_ORPHAN_PYC}' {VENV}
{_FINISH}"""

# Moves a freshly copied uv into place in one rename: a reader never sees half a binary.
TOOLS_SCRIPT: Final = f'mv -f "$1" {TOOLS_MOUNT}/uv'
