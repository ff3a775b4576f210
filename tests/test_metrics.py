"""The Prometheus metrics: names, recording functions, the endpoint, the queue-depth gauge."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from arq import Worker, func
from arq.connections import ArqRedis
from prometheus_client.parser import text_string_to_metric_families

from shared.connections import deserialize_job, serialize_job
from shared.metrics import FINAL_STATUSES, Metrics, read_queue_depth, start_metrics_server
from shared.models import Status
from shared.settings import Settings


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, f"no sample {name}{labels}"
    return found


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int]]:
    """A worker's metrics served on a free port, stopped after the test."""
    metrics = Metrics("worker", version="test")
    server = start_metrics_server(0, metrics, addr="127.0.0.1")
    yield metrics, server.port
    server.stop()


def test_worker_series_exist_at_zero_before_any_job() -> None:
    """A fresh worker exports every status, build result and cache lookup at zero."""
    metrics = Metrics("worker")
    for status in FINAL_STATUSES:
        assert value(metrics, "berth_jobs_total", status=status) == 0
    assert value(metrics, "berth_builds_total", result="failed") == 0
    assert value(metrics, "berth_cache_lookups_total", kind="image", result="miss") == 0
    assert value(metrics, "berth_cache_lookups_total", kind="path", result="prefix_hit") == 0
    assert value(metrics, "berth_process_info", role="worker", version="") == 1


def test_record_job_counts_status_durations_and_image_lookup() -> None:
    """record_job adds to the status counter, both histograms and the image hit/miss counter."""
    metrics = Metrics("worker")
    metrics.record_job("succeeded", 1.5, queue_wait_s=0.2, cache_hit=True)
    metrics.record_job("succeeded", 0.5, queue_wait_s=3.0, cache_hit=False)
    metrics.record_job("error", 0.01)
    assert value(metrics, "berth_jobs_total", status="succeeded") == 2
    assert value(metrics, "berth_jobs_total", status="error") == 1
    assert value(metrics, "berth_job_duration_seconds_count") == 3
    assert value(metrics, "berth_job_duration_seconds_sum") == pytest.approx(2.01)
    assert value(metrics, "berth_queue_wait_seconds_count") == 2
    assert value(metrics, "berth_queue_wait_seconds_bucket", le="0.25") == 1
    assert value(metrics, "berth_cache_lookups_total", kind="image", result="hit") == 1
    assert value(metrics, "berth_cache_lookups_total", kind="image", result="miss") == 1


def test_record_job_refuses_a_status_that_is_not_final() -> None:
    """A non-final or unknown status is a programming error, not a new label value."""
    metrics = Metrics("worker")
    with pytest.raises(ValueError, match="running"):
        metrics.record_job("running", 1.0)


def test_record_job_takes_the_models_status_enum() -> None:
    """A shared.models.Status member is counted under its value."""
    metrics = Metrics("worker")
    metrics.record_job(Status.OOM, 1.0)
    assert value(metrics, "berth_jobs_total", status="oom") == 1


def test_negative_durations_are_clamped_to_zero() -> None:
    """A clock step backwards records zero, never a negative observation."""
    metrics = Metrics("worker")
    metrics.record_job("failed", -2.0, queue_wait_s=-1.0)
    metrics.record_build("succeeded", -0.5)
    assert value(metrics, "berth_job_duration_seconds_sum") == 0
    assert value(metrics, "berth_queue_wait_seconds_sum") == 0
    assert value(metrics, "berth_build_duration_seconds_sum") == 0


def test_builds_lookups_and_evictions_are_recorded() -> None:
    """Builds by result, lock and path-cache lookups, and evictions by kind and reason."""
    metrics = Metrics("worker")
    metrics.record_build("succeeded", 12.0)
    metrics.record_build("failed", 3.0)
    metrics.record_cache_lookup("requirements", "hit")
    metrics.record_cache_lookup("path", "prefix_hit")
    metrics.record_evictions(3, kind="image", reason="over budget")
    metrics.record_evictions(0, kind="path_cache", reason="expired")
    assert value(metrics, "berth_builds_total", result="succeeded") == 1
    assert value(metrics, "berth_builds_total", result="failed") == 1
    assert value(metrics, "berth_build_duration_seconds_sum") == 15
    assert value(metrics, "berth_cache_lookups_total", kind="requirements", result="hit") == 1
    assert value(metrics, "berth_cache_lookups_total", kind="path", result="prefix_hit") == 1
    assert value(metrics, "berth_evictions_total", kind="image", reason="over_budget") == 3
    assert value(metrics, "berth_evictions_total", kind="path_cache", reason="expired") == 0
    with pytest.raises(ValueError, match="because"):
        metrics.record_evictions(1, kind="image", reason="because")


def test_scheduler_gauges_image_cache_and_queue_depth() -> None:
    """Scheduler gauges: image totals, bytes per engine (replaced each time), budget, queue."""
    metrics = Metrics("scheduler")
    metrics.set_image_cache(
        total_bytes=5_300,
        images=3,
        budget_bytes=10_000,
        per_engine={"a" * 64: 5_000, "b" * 64: 300},
    )
    metrics.set_image_cache(
        total_bytes=6_000, images=3, budget_bytes=10_000, per_engine={"a" * 64: 6_000}
    )
    metrics.set_queue_depth(7, now_s=1_700_000_000.0)
    assert value(metrics, "berth_image_bytes") == 6_000
    assert value(metrics, "berth_images") == 3
    assert value(metrics, "berth_engine_image_bytes", engine="a" * 12) == 6_000
    assert (
        metrics.registry.get_sample_value("berth_engine_image_bytes", {"engine": "b" * 12}) is None
    )
    assert value(metrics, "berth_image_budget_bytes") == 10_000
    assert value(metrics, "berth_queue_depth") == 7
    assert value(metrics, "berth_queue_depth_updated_timestamp_seconds") == 1_700_000_000.0
    assert metrics.registry.get_sample_value("berth_jobs_total", {"status": "failed"}) is None


def test_two_instances_do_not_share_counters() -> None:
    """Each Metrics has its own registry: no duplicate-series error, no shared state."""
    first, second = Metrics("worker"), Metrics("worker")
    first.record_job("succeeded", 1.0)
    assert value(first, "berth_jobs_total", status="succeeded") == 1
    assert value(second, "berth_jobs_total", status="succeeded") == 0


def test_endpoint_serves_the_counters_after_a_few_jobs(served: tuple[Metrics, int]) -> None:
    """GET /metrics answers in Prometheus' text format with the jobs recorded so far."""
    metrics, port = served
    for status in ("succeeded", "succeeded", "failed", "timeout"):
        metrics.record_job(status, 0.3, queue_wait_s=0.1, cache_hit=True)
    metrics.record_build("succeeded", 4.2)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    scraped = samples(text)
    assert scraped[("berth_jobs_total", frozenset({("status", "succeeded")}))] == 2
    assert scraped[("berth_jobs_total", frozenset({("status", "timeout")}))] == 1
    assert scraped[("berth_job_duration_seconds_count", frozenset())] == 4
    assert scraped[("berth_builds_total", frozenset({("result", "succeeded")}))] == 1
    hit = frozenset({("kind", "image"), ("result", "hit")})
    assert scraped[("berth_cache_lookups_total", hit)] == 4
    assert ("process_resident_memory_bytes", frozenset()) in scraped


async def test_queue_depth_counts_arq_sorted_set(redis: ArqRedis, settings: Settings) -> None:
    """read_queue_depth counts waiting and deferred jobs in arq's sorted set (no list)."""
    queue = settings.queue_name
    await redis.enqueue_job("probe", _queue_name=queue, _job_id="a")
    await redis.enqueue_job("probe", _queue_name=queue, _job_id="b")
    await redis.enqueue_job("probe", _queue_name=queue, _job_id="c", _defer_by=3600)
    assert await redis.type(queue) == b"zset"
    assert await read_queue_depth(redis, queue) == 3


async def test_queue_depth_counts_a_running_job_until_it_finishes(
    redis: ArqRedis, settings: Settings
) -> None:
    """arq keeps a running job in its sorted set: the depth includes work in progress."""
    queue = settings.queue_name
    seen: list[int] = []

    async def probe(ctx: dict[str, object]) -> None:
        seen.append(await read_queue_depth(redis, queue))

    await redis.enqueue_job("probe", _queue_name=queue)
    worker = Worker(
        functions=[func(probe, name="probe")],
        redis_pool=redis,
        queue_name=queue,
        burst=True,
        poll_delay=0,
        handle_signals=False,
        job_serializer=serialize_job,
        job_deserializer=deserialize_job,
    )
    await worker.main()  # burst: returns once the queue is empty; the pool is the fixture's
    assert seen == [1]
    assert await read_queue_depth(redis, queue) == 0
