"""Environments in the per-host store: what a build leaves there, what a job sees of it,
and how environments leave it again."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import aiodocker
import pytest

from scheduler.eviction import prune_environments
from shared import constants
from shared.build_recipe import COMPILE_SKIP
from shared.engine import BuiltImage, Engine
from shared.errors import ImageMissing
from shared.sandbox import ROLE_JOB
from shared.settings import Settings
from tests.docker_fixtures import BASE_IMAGE, build_lock, env_dir, open_sandbox, run_script

pytestmark = pytest.mark.docker


async def build(engine: Engine, key: str, lock: str = "six==1.16.0\n") -> BuiltImage:
    return await build_lock(engine, key, lock)


async def run(engine: Engine, image: BuiltImage, prefix: str, script: str) -> str:
    """The script's stdout; it must succeed."""
    result = await run_script(engine, image, prefix, script)
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


def du_bytes(path: Path) -> int:
    """What `du -sb` counts: every file, directory and link once (by inode)."""
    seen: set[int] = set()
    total = 0
    for entry in [path, *path.rglob("*")]:
        stat = entry.lstat()
        if stat.st_ino not in seen:
            seen.add(stat.st_ino)
            total += stat.st_size
    return total


async def test_the_image_holds_no_packages_its_environment_does(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """The committed layer is tiny; the size berth reports is the environment's in the store."""
    docker = aiodocker.Docker(url=engine.settings.docker_url)
    try:
        image = await docker.images.inspect(six_image.tag)
        base = await docker.images.inspect(BASE_IMAGE)
    finally:
        await docker.close()
    assert image["Size"] - base["Size"] < 64 * 1024
    env = await env_dir(engine, f"{docker_prefix}-six")
    assert (env / "pyvenv.cfg").is_file()
    assert six_image.size_bytes == du_bytes(env)
    assert image["Config"]["Labels"][constants.LABEL_ENV_BYTES] == str(du_bytes(env))


async def test_environment_files_are_hard_links_into_the_uv_cache(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """Installed files share their inode with uv's cache: no package data was copied."""
    env = await env_dir(engine, f"{docker_prefix}-six")
    six = next(env.glob("lib/python3*/site-packages/six.py"))
    cached = {p.stat().st_ino for p in (env.parents[1] / "uv-cache").rglob("six.py") if p.is_file()}
    assert six.stat().st_ino in cached
    assert six.stat().st_nlink >= 2


async def test_job_sees_only_its_environment_read_only(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """/opt/venv is the image's environment, mounted read-only; nothing else of the store."""
    script = (
        "import json, os, six\n"
        "mounts = [line.split() for line in open('/proc/mounts')]\n"
        "venv = [m[3].split(',') for m in mounts if m[1] == '/opt/venv']\n"
        "print(json.dumps({\n"
        "  'six': six.__file__, 'ro': [('ro' in options) for options in venv],\n"
        "  'store': os.path.isdir('/var/lib/berth-store') and os.listdir('/var/lib/berth-store'),\n"
        "  'shebang': open('/opt/venv/bin/activate').read().count('/opt/venv') > 0,\n"
        "}))\n"
    )
    facts = json.loads(await run(engine, six_image, docker_prefix, script))
    assert facts == {
        "six": "/opt/venv/lib/python3.11/site-packages/six.py",
        "ro": [True],
        "store": [],  # the build container's mount point, left empty
        "shebang": True,
    }


async def test_package_test_suites_get_no_bytecode(engine: Engine, docker_prefix: str) -> None:
    """Modules get .pyc; a package's tests/ directories do not (jobs never import them)."""
    key = f"{docker_prefix}-nx-tests"
    built = await build(engine, key, "networkx==3.4.2\n")  # pure Python, ships its tests
    site = next((await env_dir(engine, key)).glob("lib/python3*/site-packages"))
    algorithms = site / "networkx" / "algorithms"
    assert list((algorithms / "__pycache__").glob("cycles.*.pyc"))
    assert list((algorithms / "tests").glob("test_cycles.py"))
    assert not (algorithms / "tests" / "__pycache__").exists()
    compiled = {p.parent.parent.relative_to(site) for p in site.rglob("__pycache__/*.pyc")}
    assert not [d for d in compiled if re.search(COMPILE_SKIP, f"{site}/{d}/x.py")]
    assert not re.search(COMPILE_SKIP, "/opt/venv/lib/python3.11/site-packages/pytest/main.py")
    # A job importing one compiles it in memory (test modules mostly need pytest).
    script = "import networkx.algorithms.tests as t\nprint(t.__name__)\n"
    assert await run(engine, built, docker_prefix, script) == "networkx.algorithms.tests\n"


async def test_missing_environment_is_an_image_missing(engine: Engine, docker_prefix: str) -> None:
    """An image whose environment left the store fails to open as ImageMissing (stale)."""
    key = f"{docker_prefix}-lost-env"
    built = await build(engine, key)
    shutil.rmtree(await env_dir(engine, key))
    with pytest.raises(ImageMissing, match="is not in the store"):
        async with open_sandbox(engine, built, docker_prefix):
            pass
    assert not [
        c
        for c in await engine.list_berth_containers()
        if c.labels.get(constants.LABEL_IMAGE_KEY) == key
        and c.labels.get(constants.LABEL_ROLE) == ROLE_JOB
    ]


async def test_rebuild_of_a_key_leaves_running_jobs_their_environment(
    engine: Engine, docker_prefix: str
) -> None:
    """A second build of a key replaces its environment; a job made before keeps the old one."""
    key = f"{docker_prefix}-twice"
    first = await build(engine, key)
    env = await env_dir(engine, key)
    inode = env.stat().st_ino
    async with open_sandbox(engine, first, docker_prefix) as box:
        second = await build(engine, key)
        assert env.stat().st_ino != inode
        moved = [p for p in env.parent.glob(".old-*") if p.stat().st_ino == inode]
        assert len(moved) == 1
        await box.put_files({"main.py": b"import six\nprint(six.__version__)\n"})
        result = await box.run(["python3", "main.py"])
    assert (result.exit_code, result.stdout) == (0, b"1.16.0\n")
    assert (await run(engine, second, docker_prefix, "import six\nprint(six.__file__)\n")).strip()
    # Moved aside, it goes once no job can still use it.
    removed = await engine.prune_envs(await _all_keys(engine), stale_after_s=0, grace_s=3600)
    assert moved[0].name in removed
    assert not moved[0].exists()
    assert env.is_dir()


async def _all_keys(engine: Engine) -> set[str]:
    images = await engine.list_berth_images()
    return {i.labels[constants.LABEL_IMAGE_KEY] for i in images} | await engine.image_keys_in_use()


async def test_prune_keeps_what_is_needed_and_young(
    engine: Engine, docker_settings: Settings, docker_prefix: str
) -> None:
    """Pruning removes the environment of a removed image; kept keys, young ones and
    builds in progress stay."""
    gone = await build(engine, f"{docker_prefix}-prune-gone")
    kept = await build(engine, f"{docker_prefix}-prune-kept")
    gone_env = await env_dir(engine, f"{docker_prefix}-prune-gone")
    staging = gone_env.parent / f".build-{docker_prefix}"
    staging.mkdir()
    assert await engine.remove_image(gone.tag)

    young = await prune_environments(engine, docker_settings)  # older leftovers may go
    assert f"{docker_prefix}-prune-gone" not in young
    assert gone_env.is_dir()
    removed = await prune_environments(engine, docker_settings, grace_s=0)
    assert f"{docker_prefix}-prune-gone" in removed
    assert not gone_env.exists()
    assert staging.is_dir()  # a build's stage stays as long as a build may last
    assert (await env_dir(engine, f"{docker_prefix}-prune-kept")).is_dir()
    assert (await run(engine, kept, docker_prefix, "import six\nprint(1)\n")) == "1\n"
    assert staging.name in await engine.prune_envs(set(), stale_after_s=0, grace_s=3600)
    assert not staging.exists()
    assert os.listdir(gone_env.parent)  # the others are still there
