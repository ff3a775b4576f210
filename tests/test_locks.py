"""Resolving requirement sets to locks with uv (shared.locks); real uv and PyPI."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from shared import locks
from shared.errors import ResolutionFailed
from shared.locks import linux_platform, resolve_lock
from shared.requirements import parse_requirements
from shared.settings import Settings

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.fixture
def settings() -> Settings:
    return Settings(
        ca_bundle_path=CA_BUNDLE if CA_BUNDLE.exists() else None,
        index_url=None,
        extra_index_urls=[],
        resolve_timeout_s=120.0,
    )


async def test_pinned_set_is_its_own_lock(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fully pinned set is returned unchanged and uv is never started."""

    def no_uv() -> str:
        raise AssertionError("uv must not run for a pinned set")

    monkeypatch.setattr(locks, "find_uv_bin", no_uv)
    req = parse_requirements('Six==1.16.0\nidna==3.7; python_version >= "3"\n')
    assert await resolve_lock(req, python_version="3.11", settings=settings) == req.canonical


async def test_unpinned_set_resolves_to_pins(settings: Settings) -> None:
    """An unpinned set resolves to sorted ``name==version`` lines for the Python version."""
    lock = await resolve_lock(
        parse_requirements("six\nidna<3.8\n"), python_version="3.11", settings=settings
    )
    lines = lock.splitlines()
    assert lock.endswith("\n")
    assert lines == sorted(lines)
    assert [line.split("==")[0] for line in lines] == ["idna", "six"]
    for line in lines:
        specs = list(Requirement(line).specifier)
        assert len(specs) == 1
        assert specs[0].operator == "=="
    assert Version(lines[0].split("==")[1]) < Version("3.8")
    assert parse_requirements(lock).pinned


async def test_unknown_package_fails_with_uv_message(settings: Settings) -> None:
    """A package missing from the index raises ResolutionFailed carrying uv's own words."""
    with pytest.raises(ResolutionFailed) as info:
        await resolve_lock(
            parse_requirements("berth-no-such-package-xyz"),
            python_version="3.11",
            settings=settings,
        )
    assert "berth-no-such-package-xyz" in str(info.value)
    assert "not found" in info.value.log_tail


async def test_timeout_kills_uv_and_fails(settings: Settings) -> None:
    """Running past resolve_timeout_s raises ResolutionFailed saying so."""
    quick = settings.model_copy(update={"resolve_timeout_s": 0.001})
    with pytest.raises(ResolutionFailed, match="did not finish"):
        await resolve_lock(parse_requirements("six"), python_version="3.11", settings=quick)


def test_linux_platform_follows_the_architecture() -> None:
    """x86_64 and arm64 hosts map to glibc Linux targets; unknown ones to generic linux."""
    assert linux_platform("x86_64") == "x86_64-unknown-linux-gnu"
    assert linux_platform("arm64") == "aarch64-unknown-linux-gnu"
    assert linux_platform("riscv64") == "linux"
