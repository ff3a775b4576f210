"""Resolve a requirement set to exact pins (the lock an image is built from) with uv.

A fully pinned set is its own lock. Anything else goes through ``uv pip compile`` for
the runtime's Python version and a Linux platform of this machine's architecture.

uv runs as a plain subprocess (never a shell) with a small, explicit environment: no
host uv config (``UV_NO_CONFIG``), no inherited ``UV_*`` settings (but ``UV_CACHE_DIR``),
no berth secrets.
The configured indexes go in through ``UV_DEFAULT_INDEX``/``UV_INDEX`` rather than the
command line, where credentials in an index URL would show in the process list; the
operator's ``index_url`` wins over a file's ``--index-url`` (other option lines of the
set are passed through to uv and kept at the top of the lock, for the image build).
``--no-build``: uv must never build a source distribution on the worker, since that runs
the package's own code outside any sandbox; a package only resolvable by building fails.
"""

from __future__ import annotations

import asyncio
import os
import platform
from collections.abc import Mapping

from uv import find_uv_bin

from shared.errors import InvalidRequirement, ResolutionFailed
from shared.requirements import RequirementSet, parse_requirements
from shared.settings import Settings

LOG_TAIL_LINES = 20
# Passed through from the worker's own environment: what a network client needs.
PASSED_ENV = (
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "UV_CACHE_DIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)
LINUX_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def linux_platform(machine: str | None = None) -> str:
    """uv's ``--python-platform`` for glibc Linux on ``machine`` (default: this one)."""
    arch = LINUX_ARCHES.get((machine or platform.machine()).lower())
    return f"{arch}-unknown-linux-gnu" if arch else "linux"


async def resolve_lock(req: RequirementSet, *, python_version: str, settings: Settings) -> str:
    """The lock for ``req``: sorted ``name==version`` lines (after ``req``'s option lines).

    Raises ``ResolutionFailed`` with uv's last stderr lines when uv cannot resolve, fails
    or runs past ``settings.resolve_timeout_s`` (the process is then killed).
    """
    if req.pinned:
        return req.canonical
    command = [
        find_uv_bin(),
        "pip",
        "compile",
        "-",
        "--python-version",
        python_version,
        "--python-platform",
        linux_platform(),
        "--no-build",
        "--no-header",
        "--no-annotate",
        "--no-progress",
        "--quiet",
        "--color",
        "never",
    ]
    stdout, stderr, returncode = await _run(
        command, req.canonical.encode(), _uv_env(settings), settings.resolve_timeout_s
    )
    if returncode != 0:
        raise ResolutionFailed(_first_error(stderr, returncode), _tail(stderr))
    try:
        pins = parse_requirements(stdout.decode("utf-8", "replace"))
    except InvalidRequirement as e:
        raise ResolutionFailed(f"uv returned a lock berth cannot use: {e}", _tail(stderr)) from e
    return "".join(f"{line}\n" for line in (*req.options, *pins.requirements))


def _uv_env(settings: Settings) -> dict[str, str]:
    """The whole environment uv runs with."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env["UV_NO_CONFIG"] = "1"
    env["UV_PYTHON_DOWNLOADS"] = "never"
    if settings.ca_bundle_path is not None:
        env["SSL_CERT_FILE"] = str(settings.ca_bundle_path)
    if settings.index_url:
        env["UV_DEFAULT_INDEX"] = settings.index_url
    if settings.extra_index_urls:
        env["UV_INDEX"] = " ".join(settings.extra_index_urls)
    return env


async def _run(
    command: list[str], stdin: bytes, env: Mapping[str, str], timeout_s: float
) -> tuple[bytes, bytes, int]:
    """Run ``command`` with ``stdin``; kill it on timeout or cancellation."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await process.communicate(stdin)
    except TimeoutError as e:
        raise ResolutionFailed(f"uv did not finish within {timeout_s:g} s", "") from e
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return stdout, stderr, process.returncode if process.returncode is not None else -1


def _first_error(stderr: bytes, returncode: int) -> str:
    """uv's own ``error:`` line, else its exit status."""
    for line in stderr.decode("utf-8", "replace").splitlines():
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    return f"uv exited with status {returncode}"


def _tail(stderr: bytes) -> str:
    return "\n".join(stderr.decode("utf-8", "replace").strip().splitlines()[-LOG_TAIL_LINES:])
