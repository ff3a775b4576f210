"""The job a producer hands to berth, and what berth hands back.

`JobSpec` is validated twice: by the producer before it enqueues (so a bad job
is refused at the door) and by the worker when it picks the job up (whoever can
write to Redis is not trusted to have validated). Limits are checked against
the settings of the process doing the check.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import InvalidJob
from shared.pathcache import CacheSpec
from shared.settings import Settings

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
SCOPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
# Names berth sets itself inside the container; a job may not override them.
RESERVED_ENV = frozenset(
    {"PATH", "HOME", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "LD_PRELOAD", "LD_LIBRARY_PATH"}
)
SCRIPT_NAME = "main.py"
OUTPUT_DIR = "out"
MAX_FILE_NAME_CHARS = 255
MAX_ARG_CHARS = 4096
MAX_ENV_VALUE_CHARS = 32 * 1024


class Status(StrEnum):
    QUEUED = "queued"
    BUILDING = "building"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    OOM = "oom"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self not in (Status.QUEUED, Status.BUILDING, Status.RUNNING)


class JobSpec(BaseModel):
    """What to run: a script, its requirements, a runtime, inputs and limits."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    script: str
    runtime: str
    requirements: str = ""
    files: dict[str, bytes] = Field(default_factory=dict)
    args: list[str] = Field(default_factory=list)
    stdin: bytes | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float | None = None
    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None
    network: bool = False
    reuse_result: bool = False
    idempotency_key: str | None = None
    scope: str = "default"
    caches: list[CacheSpec] = Field(default_factory=list)
    save_caches_on_failure: bool = False

    @classmethod
    def from_payload(cls, payload: Any, settings: Settings) -> JobSpec:
        """Parse a JSON payload (bytes as base64) and check it against the settings."""
        try:
            spec = (
                cls.model_validate_json(payload)
                if isinstance(payload, str | bytes)
                else (cls.model_validate(payload, strict=False))
            )
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "job"
            raise InvalidJob(field, first["msg"]) from e
        spec.check(settings)
        return spec

    def to_payload(self) -> dict[str, Any]:
        """The JSON-safe form that travels through the queue."""
        return self.model_dump(mode="json", exclude_defaults=True)

    def check(self, settings: Settings) -> None:
        """Raise InvalidJob naming the first field that breaks a rule or a cap."""
        allowed = ", ".join(sorted(settings.runtime_images))
        if self.runtime not in settings.runtime_images:
            raise InvalidJob("runtime", f"{self.runtime!r} is not available; allowed: {allowed}")
        _cap("script", len(self.script.encode()), settings.max_script_bytes, "bytes")
        if not self.script.strip():
            raise InvalidJob("script", "is empty")
        _cap(
            "requirements",
            len(self.requirements.encode()),
            settings.max_requirements_bytes,
            "bytes",
        )
        self._check_files(settings)
        _cap("args", len(self.args), settings.max_args, "arguments")
        for i, arg in enumerate(self.args):
            _cap(f"args[{i}]", len(arg), MAX_ARG_CHARS, "characters")
            if "\x00" in arg:
                raise InvalidJob(f"args[{i}]", "must not contain NUL characters")
        if self.stdin is not None:
            _cap("stdin", len(self.stdin), settings.max_stdin_bytes, "bytes")
        self._check_env(settings)
        if self.timeout_s is not None and not 0 < self.timeout_s <= settings.max_timeout_s:
            raise InvalidJob("timeout_s", f"must be > 0 and at most {settings.max_timeout_s:g}")
        if self.memory_bytes is not None and not (
            6 * 1024 * 1024 <= self.memory_bytes <= settings.max_memory_bytes
        ):
            raise InvalidJob(
                "memory_bytes", f"must be between 6 MiB and {settings.max_memory_bytes} bytes"
            )
        if self.cpus is not None and not 0 < self.cpus <= settings.max_cpus:
            raise InvalidJob("cpus", f"must be > 0 and at most {settings.max_cpus:g}")
        if self.pids is not None and not 8 <= self.pids <= settings.max_pids:
            raise InvalidJob("pids", f"must be between 8 and {settings.max_pids}")
        if self.network and not settings.allow_network:
            raise InvalidJob("network", "is not allowed on this fleet (BERTH_ALLOW_NETWORK=false)")
        if self.idempotency_key is not None and not JOB_ID.match(self.idempotency_key):
            raise InvalidJob(
                "idempotency_key", "must be 1-128 characters of letters, digits and . _ : -"
            )
        if not SCOPE.match(self.scope):
            raise InvalidJob("scope", "must be 1-128 characters of letters, digits and . _ : / -")
        _cap("caches", len(self.caches), settings.max_caches_per_job, "caches")

    def _check_files(self, settings: Settings) -> None:
        _cap("files", len(self.files), settings.max_input_files, "files")
        total = 0
        for name, content in self.files.items():
            field = f"files[{name!r}]"
            check_relative_path(field, name)
            if name == SCRIPT_NAME:
                raise InvalidJob(field, f"{SCRIPT_NAME} is the script's own name; pick another")
            if PurePosixPath(name).parts[0] == OUTPUT_DIR:
                raise InvalidJob(field, f"{OUTPUT_DIR}/ is where the job writes its outputs")
            _cap(field, len(content), settings.max_input_file_bytes, "bytes")
            total += len(content)
        _cap("files", total, settings.max_input_total_bytes, "bytes in total")

    def _check_env(self, settings: Settings) -> None:
        _cap("env", len(self.env), settings.max_env_vars, "variables")
        for name, value in self.env.items():
            if not ENV_NAME.match(name):
                raise InvalidJob(
                    f"env[{name!r}]", "names are letters, digits and _, not starting with a digit"
                )
            if name in RESERVED_ENV:
                raise InvalidJob(
                    f"env[{name!r}]",
                    f"is set by berth; reserved: {', '.join(sorted(RESERVED_ENV))}",
                )
            _cap(f"env[{name!r}]", len(value), MAX_ENV_VALUE_CHARS, "characters")
            if "\x00" in value:
                raise InvalidJob(f"env[{name!r}]", "must not contain NUL characters")

    def limits(self, settings: Settings) -> dict[str, Any]:
        """Effective limits: the job's own, else the fleet's defaults."""
        return {
            "timeout_s": self.timeout_s or settings.default_timeout_s,
            "memory_bytes": self.memory_bytes or settings.default_memory_bytes,
            "cpus": self.cpus or settings.default_cpus,
            "pids": self.pids or settings.default_pids,
            "network": self.network,
        }


def check_relative_path(field: str, name: str) -> None:
    """A file name is relative, normalised, without `..`, control characters or NUL."""
    allowed = "a relative path like data/input.csv (no leading /, no .., at most 255 characters)"
    if not name or len(name) > MAX_FILE_NAME_CHARS:
        raise InvalidJob(field, f"name length must be 1-{MAX_FILE_NAME_CHARS}; use {allowed}")
    if any(ord(c) < 32 or c == "\x7f" for c in name) or "\\" in name:
        raise InvalidJob(field, f"name has control characters or backslashes; use {allowed}")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise InvalidJob(field, f"absolute paths are not allowed; use {allowed}")
    if any(part in ("..", ".") for part in name.split("/")) or "//" in name or name.endswith("/"):
        raise InvalidJob(field, f"'..', '.' and empty path parts are not allowed; use {allowed}")


def _cap(field: str, value: int, cap: int, unit: str) -> None:
    if value > cap:
        raise InvalidJob(field, f"has {value} {unit}, over the limit of {cap}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256m', '1.5G', '512MiB', '1024' -> bytes (binary multiples, as docker does)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size; use a number with an optional k, m, g or t")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))
