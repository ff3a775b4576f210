"""Fixtures for tests that talk to the real Docker engine.

Import them into conftest (``from tests.docker_fixtures import *`` or
``pytest_plugins = ["tests.docker_fixtures"]``). Everything a test makes is
named or labelled with ``docker_prefix`` (random per run): job ids, image keys,
the store volume. After each test no container of the run may remain; at
the end of the session the run's containers, images and volumes are removed.
The tools volume (``berth-tools-<uv version>``) stays, like the base image: other
sessions on the same engine may be using it.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TypeVar

import pytest

from shared import constants
from shared.build_recipe import ENVS_DIR
from shared.engine import BuiltImage, Engine, ImageInfo, RunResult, Sandbox, SandboxLimits
from shared.settings import Settings

__all__ = [
    "BASE_IMAGE",
    "belongs_to_run",
    "build_lock",
    "docker_cleanup",
    "docker_prefix",
    "docker_settings",
    "engine",
    "env_dir",
    "new_job_id",
    "open_sandbox",
    "remove_images",
    "run_script",
    "six_image",
]

DOCKER_URL = "unix:///var/run/docker.sock"
BASE_IMAGE = "berth-base/python:3.11"
MiB = 1024 * 1024
# Sandbox limits for engine-level tests; a test changes what it needs with replace().
SANDBOX_LIMITS = SandboxLimits(
    memory_bytes=256 * MiB,
    cpus=1.0,
    pids=128,
    timeout_s=60,
    max_stdout_bytes=1 * MiB,
    max_stderr_bytes=1 * MiB,
)
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def new_job_id(prefix: str) -> str:
    """A job id under this run's prefix (the cleanup finds its containers by it)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def open_sandbox(
    engine: Engine,
    image: BuiltImage,
    prefix: str,
    *,
    limits: SandboxLimits = SANDBOX_LIMITS,
    env: Mapping[str, str] | None = None,
) -> AbstractAsyncContextManager[Sandbox]:
    """``async with open_sandbox(...) as box``: a sandbox on a test image of this run."""
    return engine.sandbox(
        image=image.tag,
        job_id=new_job_id(prefix),
        image_key=image.tag.rpartition(":")[2],
        limits=limits,
        env=env or {},
    )


async def run_script(
    engine: Engine,
    image: BuiltImage,
    prefix: str,
    script: str,
    *,
    args: Sequence[str] = (),
    stdin: bytes | None = None,
    limits: SandboxLimits = SANDBOX_LIMITS,
    env: Mapping[str, str] | None = None,
) -> RunResult:
    """Run ``script`` as main.py in a sandbox on a test image of this run."""
    async with open_sandbox(engine, image, prefix, limits=limits, env=env) as box:
        await box.put_files({"main.py": script.encode()})
        return await box.run(["python3", "main.py", *args], stdin=stdin)


async def build_lock(
    engine: Engine, key: str, lock: str, parent: ImageInfo | None = None
) -> BuiltImage:
    """Build ``lock`` on the base image as image key ``key`` (a near build with ``parent``)."""
    return await engine.build_image(
        image_key=key, base_image=BASE_IMAGE, lock_text=lock, labels={}, parent=parent
    )


async def env_dir(engine: Engine, key: str) -> Path:
    """An image's environment directory on this host (the tests run beside the engine)."""
    return Path(await engine.store_path()) / ENVS_DIR / key


T = TypeVar("T")


def _run_in_thread(step: Awaitable[T]) -> T:
    """Run a coroutine on a loop of its own, away from pytest-asyncio's loops."""

    async def main() -> T:
        return await step

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


async def remove_images(ids: Sequence[str], remove: Callable[..., Awaitable[object]]) -> None:
    """Force-remove images, children before parents (a near build's image is a child).

    The engine refuses to remove an image another image is built on; retry those
    after the others, and let the last pass raise.
    """
    pending = list(ids)
    for attempt in range(4):
        failed = []
        for image_id in pending:
            try:
                await remove(image_id, force=True)
            except Exception:
                if attempt == 3:
                    raise
                failed.append(image_id)
        if not failed:
            return
        pending = failed


def belongs_to_run(labels: Mapping[str, str], prefix: str) -> bool:
    """True for a container or image labelled with one of this run's job ids or keys."""
    return any(
        str(labels.get(label, "")).startswith(prefix)
        for label in (constants.LABEL_JOB_ID, constants.LABEL_IMAGE_KEY)
    )


@pytest.fixture(scope="session")
def docker_prefix() -> str:
    """Random per run: every job id, image key and volume of the run starts with it."""
    return f"berthtest-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def docker_settings(docker_prefix: str) -> Settings:
    return Settings(
        docker_url=DOCKER_URL,
        runtime_images={"python3.11": BASE_IMAGE},
        store_volume=f"{docker_prefix}-store",
        ca_bundle_path=CA_BUNDLE if CA_BUNDLE.exists() else None,
        build_timeout_s=300,
    )


async def _check_engine(settings: Settings) -> None:
    engine = await Engine.connect(settings)
    try:
        if await engine.image_info(BASE_IMAGE) is None:
            pytest.fail(f"{BASE_IMAGE} is missing: make it with deploy/make-base-images.sh")
    finally:
        await engine.close()


async def _cleanup(settings: Settings, prefix: str) -> None:
    engine = await Engine.connect(settings)
    try:
        for container in await engine.list_berth_containers():
            if belongs_to_run(container.labels, prefix):
                await engine.remove_container(container.id)
        images = [i for i in await engine.list_berth_images() if belongs_to_run(i.labels, prefix)]
        await remove_images([i.id for i in images], engine.remove_image)
        for volume in await engine.list_berth_volumes():
            if volume.startswith(prefix):
                await engine.remove_volume(volume)
    finally:
        await engine.close()


@pytest.fixture(scope="session")
def docker_cleanup(docker_settings: Settings, docker_prefix: str) -> Iterator[None]:
    """Checks the engine and base image once; removes what the run made at the end."""
    _run_in_thread(_check_engine(docker_settings))
    yield
    _run_in_thread(_cleanup(docker_settings, docker_prefix))


@pytest.fixture
async def engine(
    docker_settings: Settings, docker_prefix: str, docker_cleanup: None
) -> AsyncIterator[Engine]:
    """A connected Engine; the test fails if it leaves a container of this run behind."""
    connected = await Engine.connect(docker_settings)
    try:
        yield connected
    finally:
        await connected.close()  # also waits for removals still in flight
    checker = await Engine.connect(docker_settings)
    try:
        leftovers = [
            container
            for container in await checker.list_berth_containers()
            if belongs_to_run(container.labels, docker_prefix)
        ]
        for container in leftovers:
            await checker.remove_container(container.id)
    finally:
        await checker.close()
    if leftovers:
        pytest.fail(f"containers left behind: {[c.name for c in leftovers]}")


@pytest.fixture(scope="session")
def _built_images() -> dict[str, BuiltImage]:
    return {}


@pytest.fixture
async def six_image(
    engine: Engine, docker_prefix: str, _built_images: dict[str, BuiltImage]
) -> BuiltImage:
    """An image with six==1.16.0, built once per run."""
    if "six" not in _built_images:
        _built_images["six"] = await engine.build_image(
            image_key=f"{docker_prefix}-six",
            base_image=BASE_IMAGE,
            lock_text="six==1.16.0\n",
            labels={"berth.test": docker_prefix},
        )
    return _built_images["six"]
