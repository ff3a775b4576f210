"""Near builds: a new set built on top of the closest cached image, exactly as from scratch."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared import constants
from shared.engine import LABEL_PARENT_KEY, BuiltImage, Engine, ImageInfo
from shared.hashing import image_key
from shared.models import Status
from shared.settings import Settings
from tests.docker_fixtures import BASE_IMAGE, SANDBOX_LIMITS, MiB, build_lock, env_dir, run_script
from tests.jobs_fixtures import Submit
from worker import near

pytestmark = pytest.mark.docker

LIMITS = replace(SANDBOX_LIMITS, max_stdout_bytes=4 * MiB)

# What a venv holds, as the job user sees it: distributions (importlib.metadata), every
# file under site-packages (so a leftover of an uninstalled package shows) and bin/.
ENVIRONMENT_SCRIPT = """\
import importlib.metadata as md, json, os, sys, sysconfig
site = sysconfig.get_paths()["purelib"]
print(json.dumps({
    "dists": sorted(f"{d.metadata['Name'].lower()}=={d.version}" for d in md.distributions()),
    "files": sorted(
        os.path.relpath(os.path.join(root, name), site)
        for root, _, names in os.walk(site) for name in names
    ),
    "bin": sorted(os.listdir(os.path.join(sys.prefix, "bin"))),
}))
"""


async def environment(engine: Engine, image: BuiltImage, prefix: str) -> dict[str, list[str]]:
    result = await run_script(engine, image, prefix, ENVIRONMENT_SCRIPT, limits=LIMITS)
    assert result.exit_code == 0, result.stderr
    facts: dict[str, list[str]] = json.loads(result.stdout)
    return facts


# ------------------------------------------------------------------- the engine


async def test_near_build_equals_a_build_from_scratch(engine: Engine, docker_prefix: str) -> None:
    """Synced onto a parent, a lock gives the from-scratch venv: added, changed, removed alike."""
    parent = await build_lock(engine, f"{docker_prefix}-np", "requests==2.32.3\nsix==1.16.0\n")
    parent_info = await engine.image_info(parent.image_id)
    assert parent_info is not None
    parent_env = await env_dir(engine, f"{docker_prefix}-np")
    parent_files = snapshot(parent_env)
    # requests' own dependencies are not in the lock (a pinned set is its own lock):
    # they must stay; six is not in the lock: it must go; idna moves to another version.
    lock = "idna==3.8\nrequests==2.32.3\ntabulate==0.9.0\n"
    layered = await build_lock(engine, f"{docker_prefix}-nc", lock, parent_info)
    scratch = await build_lock(engine, f"{docker_prefix}-ns", lock)

    assert (layered.parent_key, scratch.parent_key) == (f"{docker_prefix}-np", None)
    layered_info = await engine.image_info(layered.image_id)
    assert layered_info is not None
    assert layered_info.labels[LABEL_PARENT_KEY] == f"{docker_prefix}-np"
    assert layered_info.labels[constants.LABEL_IMAGE_KEY] == f"{docker_prefix}-nc"

    got, want = (
        await environment(engine, layered, docker_prefix),
        await environment(engine, scratch, docker_prefix),
    )
    assert got == want
    names = {dist.partition("==")[0] for dist in got["dists"]}
    assert {"requests", "tabulate", "urllib3", "certifi", "charset-normalizer"} <= names
    assert "six" not in names
    leftovers = [p for p in got["files"] if p.startswith("six") or "/six." in p]
    assert leftovers == []  # its dist-info, module and the shared __pycache__'s .pyc
    assert "idna==3.8" in got["dists"]
    assert "idna==3.8" not in (await environment(engine, parent, docker_prefix))["dists"]
    # The near build started from hard links to the parent's files: it replaced files
    # (idna, six removed), never wrote into them.
    assert snapshot(parent_env) == parent_files


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: its mode and content digest (links: their target)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(root))] = (0, os.readlink(path))
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            files[str(path.relative_to(root))] = (path.stat().st_mode, digest)
    return files


async def test_near_build_with_a_vanished_parent_builds_from_scratch(
    engine: Engine, docker_prefix: str
) -> None:
    """A parent that is gone by the time of the build does not fail it: scratch instead."""
    gone = ImageInfo(
        id="sha256:" + "0" * 64,
        tags=(),
        size_bytes=0,
        labels={constants.LABEL_IMAGE_KEY: f"{docker_prefix}-gone"},
        created=datetime.now(UTC),
    )
    built = await build_lock(engine, f"{docker_prefix}-orphan", "six==1.16.0\n", gone)
    assert built.parent_key is None
    facts = await environment(engine, built, docker_prefix)
    assert facts["dists"] == ["six==1.16.0"]


# ------------------------------------------------------------------ whole jobs


async def test_superset_job_is_built_on_the_cached_image_with_the_same_key(
    run_one: Submit, job_settings: Settings
) -> None:
    """A job whose set adds a package to a cached set is near-built; its key is unchanged."""
    first = await run_one("import idna, six\nprint(1)\n", "idna==3.7\nsix==1.16.0\n")
    assert first.status is Status.SUCCEEDED, first.error
    lock = "idna==3.7\nsix==1.16.0\ntabulate==0.9.0\n"
    script = "import idna, six, tabulate\nprint(tabulate.tabulate([[idna.__version__]]))\n"
    second = await run_one(script, lock)
    assert second.status is Status.SUCCEEDED, second.error
    assert second.stdout == b"---\n3.7\n---\n"
    assert second.details is not None
    assert second.details["image_source"] == "built"
    assert second.details["parent_image_key"] == first.image_key

    engine = await Engine.connect(job_settings)
    try:
        digest = await engine.base_image_digest(BASE_IMAGE)
        info = await engine.image_info(constants.image_tag(str(second.image_key)))
    finally:
        await engine.close()
    assert second.image_key == image_key(base_digest=digest, lock_text=lock, runtime="python3.11")
    assert info is not None
    assert info.labels[LABEL_PARENT_KEY] == first.image_key
    assert info.labels[near.LABEL_PINS] == "idna==3.7 six==1.16.0 tabulate==0.9.0"


# -------------------------------------------------------------- choosing a parent

DIGEST = "sha256:" + "a" * 64
NOW = datetime.now(UTC)


def candidate(key: str, pins: str | None, *, age_s: float = 0, **labels: str) -> ImageInfo:
    base = near.image_labels(
        runtime="python3.11", base_digest=DIGEST, recipe_version=1, lock_text=""
    )
    base[constants.LABEL_IMAGE_KEY] = key
    if pins is None:
        del base[near.LABEL_PINS]
    else:
        base[near.LABEL_PINS] = pins
    return ImageInfo(
        id=f"sha256:{key}",
        tags=(),
        size_bytes=1,
        labels=base | labels,
        created=NOW - timedelta(seconds=age_s),
    )


def pick(images: list[ImageInfo], lock: str, **required: str) -> str | None:
    found = near.closest_parent(
        images,
        runtime="python3.11",
        base_digest=DIGEST,
        recipe_version=1,
        lock_text=lock,
        required_labels=required,
        exclude_key="self",
    )
    return None if found is None else found[0].labels[constants.LABEL_IMAGE_KEY]


def test_lock_pins_drop_markers_and_extras_and_refuse_options() -> None:
    """Pins are name==version; option lines or non-pins keep a lock out of near builds."""
    lock = 'Pandas[excel]==2.2.3 ; python_version >= "3.9"\n# c\n\nsix==1.16.0\n'
    assert near.lock_pins(lock) == {"pandas==2.2.3", "six==1.16.0"}
    assert near.lock_pins("--index-url https://x/simple\nsix==1.16.0\n") is None
    assert near.lock_pins("six>=1\n") is None
    assert near.lock_pins("") == frozenset()


def test_closest_parent_is_the_largest_subset_of_the_lock() -> None:
    """The parent shares the most pins and has none the lock lacks; ties go to the newest."""
    images = [
        candidate("one", "six==1.16.0", age_s=10),
        candidate("two", "idna==3.7 six==1.16.0", age_s=20),
        candidate("two-newer", "idna==3.7 six==1.16.0", age_s=5),
        candidate("extra", "idna==3.7 six==1.16.0 tabulate==0.9.0 wheel==0.44.0"),
        candidate("other-version", "idna==3.8 six==1.16.0 tabulate==0.9.0"),
        candidate("self", "idna==3.7 six==1.16.0 tabulate==0.9.0"),
    ]
    assert pick(images, "idna==3.7\nsix==1.16.0\ntabulate==0.9.0\n") == "two-newer"
    assert pick(images, "six==1.16.0\n") == "one"
    assert pick(images, "numpy==2.1.3\n") is None
    assert pick(images, "") is None
    assert pick(images, "--index-url https://x/simple\nsix==1.16.0\n") is None


@pytest.mark.parametrize(
    "labels",
    [
        {near.LABEL_BASE_DIGEST: "sha256:" + "b" * 64},
        {near.LABEL_RUNTIME: "python3.12"},
        {near.LABEL_RECIPE: "2"},
    ],
)
def test_closest_parent_needs_the_same_base_runtime_and_recipe(labels: dict[str, str]) -> None:
    """An image of another base digest, runtime or recipe is never a parent."""
    assert pick([candidate("x", "six==1.16.0", **labels)], "six==1.16.0\nidna==3.7\n") is None


def test_closest_parent_needs_the_deployment_labels_and_pins() -> None:
    """Images of another deployment (extra_labels) or without pins are never parents."""
    images = [
        candidate("theirs", "six==1.16.0", **{"berth.test_run": "other"}),
        candidate("no-pins", None),
        candidate("ours", "six==1.16.0", age_s=60, **{"berth.test_run": "mine"}),
    ]
    assert pick(images, "six==1.16.0\nidna==3.7\n", **{"berth.test_run": "mine"}) == "ours"
