"""`berth paths ls|stats|rm|clear` against real Postgres, Redis and a blob directory."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest
from arq.connections import ArqRedis

from shared.blobstore import DirectoryBlobStore
from shared.cli import build_parser, run
from shared.pathcache_admin import record
from shared.settings import Settings
from tests.test_pathcache import put_entry


@pytest.fixture
def cli_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"path_cache_dir": tmp_path / "blobs"})


@pytest.fixture
def store(cli_settings: Settings) -> DirectoryBlobStore:
    return DirectoryBlobStore(cli_settings.path_cache_dir)


async def berth(settings: Settings, *argv: str) -> int:
    """Run one `berth paths ...` command in this event loop, with these settings."""
    args = build_parser().parse_args(["paths", *argv])
    code: int = await args.handler(args, settings)
    return code


@pytest.fixture
async def entries(pool: asyncpg.Pool, store: DirectoryBlobStore) -> None:
    """Three entries: two in scope t1 (one key under two path sets), one in t2."""
    await put_entry(pool, store, scope="t1", key="deps-1", paths=["a"], files={"f": b"1" * 100})
    await put_entry(pool, store, scope="t1", key="deps-1", paths=["b"], files={"f": b"2"})
    await put_entry(pool, store, scope="t2", key="deps-9", paths=["a"], files={"f": b"3"})


@pytest.mark.usefixtures("entries")
async def test_ls_lists_entries_and_filters_by_scope(
    cli_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """ls shows every ready entry (a table, or JSON with the metadata); --scope filters."""
    assert await berth(cli_settings, "ls") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "SCOPE",
        "KEY",
        "SIZE",
        "HITS",
        "LAST",
        "USED",
        "CREATED",
        "PATHS",
    ]
    assert out.count("deps-1") == 2
    assert "deps-9" in out
    assert await berth(cli_settings, "ls", "--scope", "t2", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["scope"], e["key"], e["paths"]) for e in listed] == [("t2", "deps-9", ["a"])]
    assert {
        "size_bytes",
        "version",
        "created_at",
        "last_accessed_at",
        "access_count",
        "compression",
        "storage_path",
        "created_by_job",
    } <= set(listed[0])


async def test_ls_when_empty(
    cli_settings: Settings, pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    """ls on an empty scope says so instead of printing an empty table."""
    assert await berth(cli_settings, "ls", "--scope", "nobody") == 0
    assert capsys.readouterr().out == "no path caches in scope 'nobody'\n"


@pytest.mark.usefixtures("entries")
async def test_stats_combines_counters_and_stored_sizes(
    cli_settings: Settings, redis: ArqRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    """stats reports, per scope and overall, entries, size, hits, prefix hits, misses, bytes."""
    await record(redis, "t1", "path_exact", path_bytes_restored=1000)
    await record(redis, "t1", "path_prefix", path_bytes_restored=10)
    await record(redis, "t1", "path_miss")
    await record(redis, "t3", "path_miss")
    await record(redis, "t3", "path_saved", path_bytes_saved=70)
    assert await berth(cli_settings, "stats", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    t1 = report["scopes"]["t1"]
    assert (t1["entries"], t1["exact"], t1["prefix"], t1["miss"]) == (2, 1, 1, 1)
    assert t1["hit_ratio"] == pytest.approx(2 / 3)
    assert t1["bytes_restored"] == 1010
    assert report["scopes"]["t3"]["entries"] == 0
    assert report["scopes"]["t3"]["bytes_saved"] == 70
    overall = report["overall"]
    assert (overall["entries"], overall["miss"], overall["bytes_saved"]) == (3, 2, 70)
    assert overall["size_bytes"] == sum(s["size_bytes"] for s in report["scopes"].values())
    assert await berth(cli_settings, "stats") == 0
    text = capsys.readouterr().out
    assert "(all)" in text
    assert "66.7%" in text


@pytest.mark.usefixtures("entries")
async def test_rm_removes_every_version_of_a_key_in_one_scope(
    cli_settings: Settings,
    pool: asyncpg.Pool,
    store: DirectoryBlobStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """rm SCOPE KEY deletes the key's entries and blobs there, and nothing elsewhere."""
    assert await berth(cli_settings, "rm", "t1", "deps-1", "--json") == 0
    removed = json.loads(capsys.readouterr().out)
    assert removed["removed"] == 2
    assert removed["bytes_freed"] > 0
    rows = await pool.fetch("select scope, key from path_caches")
    assert [(r["scope"], r["key"]) for r in rows] == [("t2", "deps-9")]
    assert len([b async for b in store.scan()]) == 1
    assert await berth(cli_settings, "rm", "t1", "deps-1") == 1
    assert "no entry with key 'deps-1' in 't1'" in capsys.readouterr().err


@pytest.mark.usefixtures("entries")
async def test_clear_needs_yes_and_clears_one_scope(
    cli_settings: Settings, pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    """clear refuses without --yes; with it, it empties that scope only."""
    assert await berth(cli_settings, "clear", "--scope", "t1") == 2
    assert "add --yes" in capsys.readouterr().err
    assert await pool.fetchval("select count(*) from path_caches") == 3
    assert await berth(cli_settings, "clear", "--scope", "t1", "--yes") == 0
    assert capsys.readouterr().out.startswith("removed 2 entries")
    assert await pool.fetchval("select count(*) from path_caches where scope = 't1'") == 0
    assert await pool.fetchval("select count(*) from path_caches") == 1


def test_paths_is_a_berth_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`berth paths` is wired into the CLI, lists its actions, and needs one."""
    with pytest.raises(SystemExit) as exit_info:
        run(["paths", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for action in ("ls", "stats", "rm", "clear"):
        assert f"\n    {action} " in out
    with pytest.raises(SystemExit) as exit_info:
        run(["paths"])
    assert exit_info.value.code == 2
    assert "required: ACTION" in capsys.readouterr().err
