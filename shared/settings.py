"""berth's one settings class.

Built once in each entrypoint (worker, scheduler, CLI) and handed down; nothing
else reads the environment. Every field can be set as ``BERTH_<FIELD>``; dicts
and lists are given as JSON (``BERTH_RUNTIME_IMAGES='{"python3.11": "..."}'``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB

RUNTIME_NAME = re.compile(r"^python3\.(\d{1,2})$")


class Settings(BaseSettings):
    """Everything an operator can tune, with safe defaults for one machine."""

    model_config = SettingsConfigDict(env_prefix="BERTH_", extra="ignore", frozen=True)

    # --- services ---
    redis_url: str = "redis://127.0.0.1:6379/0"
    postgres_dsn: SecretStr = SecretStr("postgresql://berth:berth@127.0.0.1:5432/berth")
    docker_url: str = "unix:///var/run/docker.sock"
    queue_name: str = "berth:queue"
    postgres_pool_max: int = Field(default=10, ge=1)

    # --- runtimes and builds ---
    runtime_images: dict[str, str] = Field(
        default_factory=lambda: {
            "python3.11": "python:3.11-slim",
            "python3.12": "python:3.12-slim",
        }
    )
    index_url: str | None = None
    extra_index_urls: list[str] = Field(default_factory=list)
    ca_bundle_path: Path | None = None
    allow_index_options: bool = False
    # Install packages that ship only source (their build code runs as root in the
    # build container, beside the read-write store). Off: wheels only. Resolution on
    # the worker host never builds.
    allow_source_builds: bool = False
    build_network: str = "bridge"
    build_timeout_s: float = Field(default=900.0, gt=0)
    build_lease_ttl_s: float = Field(default=30.0, gt=0)
    build_wait_timeout_s: float = Field(default=1200.0, gt=0)
    # Per-host volume holding uv's cache and every image's environment (hard-linked
    # out of the cache; jobs mount their image's, read-only).
    store_volume: str = "berth-store"
    # Extra labels on every container and image berth makes (e.g. a deployment or
    # test-run name, so leftovers of exactly that run can be swept).
    extra_labels: dict[str, str] = Field(default_factory=dict)
    resolve_timeout_s: float = Field(default=300.0, gt=0)

    # --- job limits (defaults, and the caps a job may ask up to) ---
    max_script_bytes: int = Field(default=1 * MiB, gt=0)
    max_requirements_bytes: int = Field(default=64 * 1024, gt=0)
    max_input_files: int = Field(default=32, ge=0)
    max_input_file_bytes: int = Field(default=10 * MiB, gt=0)
    max_input_total_bytes: int = Field(default=50 * MiB, gt=0)
    max_args: int = Field(default=64, ge=0)
    max_env_vars: int = Field(default=64, ge=0)
    max_stdin_bytes: int = Field(default=1 * MiB, ge=0)
    default_timeout_s: float = Field(default=60.0, gt=0)
    max_timeout_s: float = Field(default=3600.0, gt=0)
    default_memory_bytes: int = Field(default=512 * MiB, gt=0)
    max_memory_bytes: int = Field(default=8 * GiB, gt=0)
    default_cpus: float = Field(default=1.0, gt=0)
    max_cpus: float = Field(default=4.0, gt=0)
    default_pids: int = Field(default=256, gt=0)
    max_pids: int = Field(default=4096, gt=0)
    max_stdout_bytes: int = Field(default=1 * MiB, gt=0)
    max_stderr_bytes: int = Field(default=1 * MiB, gt=0)
    max_output_files: int = Field(default=64, ge=0)
    max_output_bytes: int = Field(default=50 * MiB, ge=0)
    allow_network: bool = False
    job_user: str = "65534:65534"
    max_queue_depth: int = Field(default=10_000, gt=0)

    # --- caches ---
    image_cache_ttl_s: int = Field(default=7 * 86400, gt=0)
    requirements_cache_ttl_s: int = Field(default=86400, gt=0)
    lock_ttl_s: int = Field(default=86400, gt=0)
    failed_build_ttl_s: int = Field(default=300, gt=0)
    warm_limit: int = Field(default=1000, ge=0)
    result_ttl_s: int = Field(default=86400, gt=0)

    # --- worker ---
    worker_concurrency: int = Field(default=4, ge=1)
    # How often an idle worker looks at the queue (arq polls; its default is 0.5 s):
    # on average half of it is added to a job's start. Each look is two Redis round
    # trips, so an idle worker makes about 100 a second.
    poll_delay_s: float = Field(default=0.02, gt=0)
    job_max_tries: int = Field(default=3, ge=1)
    # A running job's claim lapses this long after its worker dies; another takes it.
    job_claim_ttl_s: float = Field(default=60.0, ge=1)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    # --- scheduler: eviction, retention, reaping ---
    image_budget_bytes: int = Field(default=20 * GiB, gt=0)
    image_unused_days: float = Field(default=7.0, gt=0)
    execution_retention_days: float = Field(default=30.0, gt=0)
    stuck_grace_s: float = Field(default=120.0, ge=0)
    eviction_interval_s: int = Field(default=300, gt=0)
    metrics_interval_s: int = Field(default=60, gt=0)

    # --- path caches (actions/cache semantics) ---
    path_cache_dir: Path = Path("/var/lib/berth/path-caches")
    path_cache_budget_bytes: int = Field(default=10 * GiB, gt=0)
    path_cache_scope_budget_bytes: int = Field(default=2 * GiB, gt=0)
    path_cache_unused_days: float = Field(default=7.0, gt=0)
    path_cache_shared_scope: str | None = None
    max_caches_per_job: int = Field(default=4, ge=0)
    path_cache_max_entry_bytes: int = Field(default=2 * GiB, gt=0)

    # --- logging ---
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("runtime_images")
    @classmethod
    def _runtime_names(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one runtime must be configured")
        for name, image in value.items():
            if not RUNTIME_NAME.match(name):
                raise ValueError(f"runtime {name!r} must look like python3.<minor>")
            if not image.strip():
                raise ValueError(f"runtime {name!r} has an empty image reference")
        return value

    def job_timeout_s(self) -> float:
        """The longest a job may hold a worker: lock resolution, build wait, run, grace.

        arq keeps a job's in-progress marker this long (+10 s): a job whose worker died
        is picked up again by another worker once it lapses. No job or build container
        lives longer: housekeeping removes what is older (plus a margin).
        """
        return (
            self.resolve_timeout_s
            + max(self.build_wait_timeout_s, self.build_timeout_s)
            + self.max_timeout_s
            + self.stuck_grace_s
        )

    def python_version(self, runtime: str) -> str:
        """``python3.11`` -> ``3.11`` (the version locks are resolved for)."""
        match = RUNTIME_NAME.match(runtime)
        if match is None:
            raise ValueError(f"runtime {runtime!r} must look like python3.<minor>")
        return f"3.{match.group(1)}"
