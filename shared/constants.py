"""Names shared by every berth process: Redis keys, labels, versions.

All Redis keys berth writes start with ``berth:`` and are built here, so an
operator can find (and a test can sweep) everything berth keeps in Redis.
"""

from __future__ import annotations

REDIS_PREFIX = "berth:"

# Bump when the image build recipe changes in a way that changes image contents:
# it is part of every image_key, so old images are never served for the new recipe.
BUILD_RECIPE_VERSION = 2  # 2: environments in the per-host store, mounted into jobs

IMAGE_REPOSITORY = "berth/deps"

LABEL_MANAGED = "berth.managed"
LABEL_JOB_ID = "berth.job_id"
LABEL_IMAGE_KEY = "berth.image_key"
LABEL_ROLE = "berth.role"
LABEL_ENV_BYTES = "berth.env_bytes"  # on an image: the size of its environment in the store

# Retry schedules are data.
BUILD_BACKOFF_S = (1.0, 5.0, 30.0)
SERVICE_RETRY_S = (0.2, 0.5, 1.0, 2.0)


def image_record_key(image_key: str) -> str:
    return f"{REDIS_PREFIX}image:{image_key}"


def requirements_record_key(deps_hash: str, python_version: str) -> str:
    return f"{REDIS_PREFIX}requirements:{deps_hash}:{python_version}"


def failed_resolution_key(deps_hash: str, python_version: str) -> str:
    """The negative cache of a requirement set that did not resolve (uv's error)."""
    return f"{REDIS_PREFIX}resolve-failed:{deps_hash}:{python_version}"


def build_lease_key(image_key: str) -> str:
    return f"{REDIS_PREFIX}lease:build:{image_key}"


def eviction_lease_key(engine_id: str) -> str:
    """Held while one process sweeps one Docker engine's images."""
    return f"{REDIS_PREFIX}lease:evict:{engine_id}"


def job_finished_channel(job_id: str) -> str:
    """Pub/sub channel a worker publishes to once a job's row is final (Client.result waits)."""
    return f"{REDIS_PREFIX}finished:{job_id}"


def cancel_request_key(job_id: str) -> str:
    """Set by `cancel()` before it asks arq to abort, so the job knows why it stops."""
    return f"{REDIS_PREFIX}cancel:{job_id}"


CANCEL_REQUEST_TTL_S = 86400

STATS_KEY = f"{REDIS_PREFIX}stats"


def stats_hour_key(hour: str) -> str:
    """Hourly counters (``hour`` is ``YYYYMMDDHH`` in UTC), kept for two days."""
    return f"{REDIS_PREFIX}stats:{hour}"


STATS_HOUR_TTL_S = 2 * 86400
METRICS_SNAPSHOT_KEY = f"{REDIS_PREFIX}metrics:snapshot"


def image_tag(image_key: str) -> str:
    return f"{IMAGE_REPOSITORY}:{image_key}"


def image_key_of(ref: str) -> str | None:
    """The image key in a tag made by ``image_tag``; None for any other reference."""
    repository, _, key = ref.rpartition(":")
    return key if repository == IMAGE_REPOSITORY and key else None
