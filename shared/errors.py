"""berth's errors: one root, a few with the facts as fields.

Every error a user can cause names what was wrong and what is allowed; ``str()``
of any of them is a one-line message fit for a CLI or a job result.
"""

from __future__ import annotations


class BerthError(Exception):
    """Root of every error berth raises on purpose."""


class InvalidRequirement(BerthError):
    """A requirements line berth will not build."""

    def __init__(self, line_no: int, line: str, reason: str) -> None:
        self.line_no = line_no
        self.line = line
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"requirements line {self.line_no} ({self.line.strip()!r}): {self.reason}"


class InvalidJob(BerthError):
    """A job spec that names a field and what is allowed for it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class ServiceUnavailable(BerthError):
    """Redis, Postgres or the Docker engine cannot be reached."""

    def __init__(self, service: str, target: str, reason: str) -> None:
        self.service = service
        self.target = target
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.service} at {self.target} is unreachable: {self.reason}"


class BuildFailed(BerthError):
    """Installing a dependency set into an image failed."""

    def __init__(
        self, image_key: str, reason: str, log_tail: str = "", *, cached: bool = False
    ) -> None:
        self.image_key = image_key
        self.reason = reason
        self.log_tail = log_tail
        self.cached = cached  # a remembered failure (negative cache), not a build just run
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"image build {self.image_key[:12]} failed: {self.reason}"
        return f"{text}\n{self.log_tail}" if self.log_tail else text


class ResolutionFailed(BerthError):
    """The requirements could not be resolved to a lock."""

    def __init__(self, reason: str, log_tail: str = "") -> None:
        self.reason = reason
        self.log_tail = log_tail
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"resolving requirements failed: {self.reason}"
        return f"{text}\n{self.log_tail}" if self.log_tail else text


class JobNotFound(BerthError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"no job with id {self.job_id!r}"


class QueueFull(BerthError):
    def __init__(self, depth: int, limit: int) -> None:
        self.depth = depth
        self.limit = limit
        super().__init__(str(self))

    def __str__(self) -> str:
        return (
            f"the queue holds {self.depth} jobs, at or over its limit of {self.limit} "
            "(BERTH_MAX_QUEUE_DEPTH); try again later"
        )


class EngineError(BerthError):
    """The Docker engine refused or failed an operation."""

    def __init__(self, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"docker {self.operation} failed: {self.reason}"


class ImageMissing(EngineError):
    """The image a record points at is no longer on this engine."""

    def __init__(self, image: str, reason: str | None = None) -> None:
        self.image = image
        super().__init__("image lookup", reason or f"image {image} is not on this engine")


class EntryNotFound(BerthError):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"no cache entry has a key starting with {self.prefix!r} (see `berth cache ls`)"


class AmbiguousPrefix(BerthError):
    def __init__(self, prefix: str, matches: list[str]) -> None:
        self.prefix = prefix
        self.matches = matches
        super().__init__(str(self))

    def __str__(self) -> str:
        shown = ", ".join(m[:16] for m in self.matches[:5])
        more = "…" if len(self.matches) > 5 else ""
        return (
            f"{self.prefix!r} matches {len(self.matches)} entries ({shown}{more});"
            " give more characters of the key"
        )


class ImageBusy(BerthError):
    """The entry's image is used by a container or being built: not removed."""

    def __init__(self, image_key: str, reason: str) -> None:
        self.image_key = image_key
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"cache entry {self.image_key[:12]} was not removed: {self.reason}"


class BlobNotFound(BerthError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"no blob named {self.name!r} in the store"


class MigrationError(BerthError):
    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"migration {self.name}: {self.reason}"
