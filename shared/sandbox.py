"""One job's container: limits, files in, one command, outputs out, always removed.

A ``Sandbox`` is created before the job's command is known (files go in first),
so the container's command is a fixed launcher. ``run()`` starts it and writes its
launch data to the container's stdin: the job's files (unless too big, or already
copied in because an archive operation came first), the argv (never parsed by a
shell) and the job's stdin, if any. The launcher writes the files into /work as
the job user, points stdin at the job's (or /dev/null) and execs. User text only
ever travels as data and as separate argv entries.

Why stdin and not an archive upload: the engine extracts an archive through a
helper process it starts each time, about 40 ms a job on a 2-core machine — a
sixth of a print(1) job. Big file sets (``STDIN_FILES_MAX_BYTES``) still go as an
archive, so the upload time does not count against the job's timeout.

The launch data is a sequence of records: a 17-byte header (a tag byte, the name's
length as 4 bytes, a file mode as 4 bytes, the data's size as 8 bytes, big-endian),
the name, the data. Tags: ``F`` a file for /work, ``A`` the argv (NUL-terminated
entries), ``I`` the job's stdin, ``P`` the job's stdin is /work/<name> already,
``E`` the end.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self, TypeVar

import structlog

from shared import constants
from shared.docker_api import CALL_TIMEOUT_S, DockerApi, EngineNotFound, JsonObject, run_attached
from shared.settings import Settings
from shared.tarstream import files_tar, regular_files, relative_parts

log = structlog.stdlib.get_logger(__name__)

ARCHIVE_TIMEOUT_S: Final = 900.0  # a whole archive upload (path caches: hundreds of MB)
WORKDIR: Final = "/work"
STDIN_FILE: Final = ".berth-stdin"
STDIN_FILES_MAX_BYTES: Final = 4 * 1024 * 1024  # more than this goes as an archive
STDOUT: Final = 1
STDERR: Final = 2
ROLE_JOB: Final = "job"

# The sandbox's command. Fixed text; what to run arrives as data on stdin.
LAUNCHER: Final = """\
import os
r = open(0, 'rb', closefd=False)
def take(n):
    b = r.read(n)
    if len(b) != n:
        os.write(2, b'berth: the launch data ended early\\n')
        os._exit(125)
    return b
a = None
i = b'/dev/null'
while True:
    h = take(17)
    t, m, z = h[:1], int.from_bytes(h[5:9], 'big'), int.from_bytes(h[9:], 'big')
    p = b'/work/' + take(int.from_bytes(h[1:5], 'big'))
    if t == b'E':
        break
    if t == b'A':
        a = take(z).split(b'\\0')[:-1]
        continue
    if t == b'P':
        i = p
        continue
    try:
        os.makedirs(os.path.dirname(p), 0o755, exist_ok=True)
        f = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        while z:
            v = memoryview(take(min(z, 1048576)))
            z -= len(v)
            while v:
                v = v[os.write(f, v):]
        os.fchmod(f, m)
        os.close(f)
    except OSError as e:
        os.write(2, b'berth: cannot write ' + p + b': ' + os.fsencode(e.strerror or '') + b'\\n')
        os._exit(125)
    if t == b'I':
        i = p
f = os.open(i, os.O_RDONLY)
os.dup2(f, 0)
os.close(f)
if i != b'/dev/null':
    try:
        os.unlink(i)
    except OSError:
        pass
try:
    os.execvp(a[0], a)
except OSError as e:
    os.write(2, b'berth: cannot run ' + a[0] + b': ' + os.fsencode(e.strerror or '') + b'\\n')
    os._exit(127 if isinstance(e, FileNotFoundError) else 126)
"""
LAUNCH_CMD: Final = ("python3", "-I", "-S", "-c", LAUNCHER)

T = TypeVar("T")


def _record(kind: bytes, name: str, data: bytes, mode: int) -> bytes:
    """One record of the launch data (see the module's docstring)."""
    encoded = os.fsencode(name)
    header = kind + len(encoded).to_bytes(4, "big") + mode.to_bytes(4, "big")
    return header + len(data).to_bytes(8, "big") + encoded + data


def parse_user(user: str) -> tuple[int, int]:
    """``"65534:65534"`` -> (65534, 65534); ``"1000"`` -> (1000, 1000)."""
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or not (gid or uid).isdigit():
        raise ValueError(f"job user {user!r} must be numeric: uid or uid:gid")
    return int(uid), int(gid or uid)


class _Capped:
    """Keeps the first ``limit`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    @property
    def truncated(self) -> bool:
        return self.total > self.limit


@dataclass(frozen=True)
class SandboxLimits:
    """What one job may use. ``user`` is numeric (``uid:gid``): files are chowned to it."""

    memory_bytes: int
    cpus: float
    pids: int
    timeout_s: float
    max_stdout_bytes: int
    max_stderr_bytes: int
    user: str = "65534:65534"
    network: bool = False

    def __post_init__(self) -> None:
        parse_user(self.user)

    @classmethod
    def from_settings(cls, settings: Settings) -> SandboxLimits:
        """The operator's defaults, before a job asks for more (up to the maxima)."""
        return cls(
            memory_bytes=settings.default_memory_bytes,
            cpus=settings.default_cpus,
            pids=settings.default_pids,
            timeout_s=settings.default_timeout_s,
            max_stdout_bytes=settings.max_stdout_bytes,
            max_stderr_bytes=settings.max_stderr_bytes,
            user=settings.job_user,
        )


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    oom_killed: bool
    duration_s: float
    stdout_total_bytes: int
    stderr_total_bytes: int


def sandbox_config(
    *,
    image: str,
    job_id: str,
    image_key: str,
    limits: SandboxLimits,
    env: Mapping[str, str],
    labels: Mapping[str, str] | None = None,
    mounts: Sequence[JsonObject] = (),
) -> JsonObject:
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"environment variable {key!r} has a name or value docker refuses")
    return {
        "Image": image,
        "Cmd": list(LAUNCH_CMD),
        "User": limits.user,
        "WorkingDir": WORKDIR,
        "Env": [f"{key}={value}" for key, value in env.items()],
        "Labels": {
            **(labels or {}),
            constants.LABEL_MANAGED: "true",
            constants.LABEL_ROLE: ROLE_JOB,
            constants.LABEL_JOB_ID: job_id,
            constants.LABEL_IMAGE_KEY: image_key,
        },
        "AttachStdout": True,
        "AttachStderr": True,
        # The launch data arrives on stdin; the launcher swaps in the job's own stdin.
        "AttachStdin": True,
        "OpenStdin": True,
        "StdinOnce": True,
        "HostConfig": {
            "NetworkMode": "bridge" if limits.network else "none",
            "Memory": limits.memory_bytes,
            "MemorySwap": limits.memory_bytes,
            "NanoCpus": int(limits.cpus * 1e9),
            "PidsLimit": limits.pids,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "Privileged": False,
            "ReadonlyRootfs": True,
            "Tmpfs": {"/tmp": "rw,nosuid,nodev,size=64m"},  # noqa: S108 (the job's own tmpfs)
            "Mounts": [{"Type": "volume", "Target": WORKDIR}, *mounts],
            "Init": True,
            "Ulimits": [{"Name": "core", "Soft": 0, "Hard": 0}],
            # Output is read from the attach stream only: a logging driver would copy
            # every line of an output flood to disk (json-file: minutes for 200 MB of
            # short lines) and json-file mangles bytes that are not UTF-8.
            "LogConfig": {"Type": "none", "Config": {}},
        },
    }


class Sandbox:
    """One job's container: ``async with engine.sandbox(...) as box``.

    The container (and its anonymous /work volume) is removed on exit, whatever
    happened inside, cancellation included.
    """

    def __init__(
        self,
        api: DockerApi,
        *,
        image: str,
        job_id: str,
        image_key: str,
        limits: SandboxLimits,
        env: Mapping[str, str],
        labels: Mapping[str, str] | None = None,
        mounts: Sequence[JsonObject] = (),
    ) -> None:
        self._api = api
        self.image = image
        self.job_id = job_id
        self.image_key = image_key
        self.limits = limits
        self._config = sandbox_config(
            image=image,
            job_id=job_id,
            image_key=image_key,
            limits=limits,
            env=env,
            labels=labels,
            mounts=mounts,
        )
        self._owner = parse_user(limits.user)
        self._name = f"berth-job-{secrets.token_hex(8)}"
        self._id: str | None = None
        self._ran = False
        self._staged: dict[str, tuple[bytes, int]] = {}
        self._result: RunResult | None = None
        self.timings: dict[str, float] = {}

    @property
    def id(self) -> str:
        if self._id is None:
            raise RuntimeError("the sandbox is not entered")
        return self._id

    async def _timed(self, phase: str, step: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            return await step
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.monotonic() - started

    async def __aenter__(self) -> Self:
        self._id = await self._timed(
            "create_s", self._api.create_container(self._name, self._config)
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        started = time.monotonic()
        try:
            await self._api.remove_container_shielded(self._id or self._name)
        finally:
            self.timings["remove_s"] = time.monotonic() - started
            outcome: dict[str, object] = {}
            if (result := self._result) is not None:
                outcome = {
                    "exit_code": result.exit_code,
                    "timed_out": result.timed_out,
                    "oom_killed": result.oom_killed,
                    "stdout_bytes": result.stdout_total_bytes,
                    "stderr_bytes": result.stderr_total_bytes,
                }
            log.info(
                "sandbox finished",
                job_id=self.job_id,
                image_key=self.image_key,
                error=None if exc_type is None else exc_type.__name__,
                **outcome,
                **{phase: round(seconds, 4) for phase, seconds in self.timings.items()},
            )

    async def put_files(self, files: Mapping[str, bytes], *, mode: int = 0o644) -> None:
        """Stage files (relative names) for /work, owned by the job user.

        Staged files travel with ``run()``'s launch data (no engine round trip of
        their own), or as one archive when an archive operation comes first or they
        are bigger than ``STDIN_FILES_MAX_BYTES``.
        """
        for name, data in files.items():
            relative_parts(name)
            self._staged[name] = (data, mode)

    async def _flush(self, extra: Mapping[str, bytes] | None = None) -> None:
        """Copy the staged files (and ``extra``, mode 0600) into /work as an archive."""
        entries = [(name, data, mode) for name, (data, mode) in self._staged.items()]
        entries += [(name, data, 0o600) for name, data in (extra or {}).items()]
        if not entries:
            return
        uid, gid = self._owner
        tar = files_tar(entries, uid=uid, gid=gid)
        await self._timed(
            "put_s", self._api.put_archive(self.id, WORKDIR, tar, timeout_s=CALL_TIMEOUT_S)
        )
        self._staged.clear()

    async def put_archive_stream(self, chunks: AsyncIterable[bytes]) -> None:
        """Extract a tar stream into /work as it arrives (aiohttp sends it chunked)."""
        await self._flush()
        await self._timed(
            "put_s", self._api.put_archive(self.id, WORKDIR, chunks, timeout_s=ARCHIVE_TIMEOUT_S)
        )

    async def run(self, argv: Sequence[str], *, stdin: bytes | None = None) -> RunResult:
        """Run ``argv`` once, with the limits; stdout and stderr kept apart and capped."""
        if self._ran:
            raise RuntimeError("a sandbox runs one command")
        if not argv:
            raise ValueError("argv is empty")
        self._ran = True
        encoded = [os.fsencode(arg) for arg in argv]
        if any(b"\0" in arg for arg in encoded):
            raise ValueError("arguments cannot contain NUL bytes")
        staged = sum(len(data) for data, _ in self._staged.values()) + len(stdin or b"")
        if staged > STDIN_FILES_MAX_BYTES:
            await self._flush({STDIN_FILE: stdin} if stdin is not None else None)
        records = [_record(b"F", name, data, mode) for name, (data, mode) in self._staged.items()]
        self._staged.clear()
        if stdin is not None:
            kind = b"I" if staged <= STDIN_FILES_MAX_BYTES else b"P"
            records.append(_record(kind, STDIN_FILE, stdin if kind == b"I" else b"", 0o600))
        records.append(_record(b"A", "", b"".join(arg + b"\0" for arg in encoded), 0))
        records.append(_record(b"E", "", b"", 0))
        launch = b"".join(records)

        outputs = {STDOUT: _Capped(self.limits.max_stdout_bytes)}
        outputs[STDERR] = _Capped(self.limits.max_stderr_bytes)

        def on_output(stream: int, data: bytes) -> None:
            outputs[STDERR if stream == STDERR else STDOUT].add(data)

        started = time.monotonic()
        done = await run_attached(
            self._api, self.id, timeout_s=self.limits.timeout_s, on_output=on_output, stdin=launch
        )
        self.timings["run_s"] = time.monotonic() - started
        oom_killed = False
        if done.exit_code != 0:
            state = await self._timed("inspect_s", self._api.inspect_container(self.id))
            oom_killed = bool(state.get("State", {}).get("OOMKilled", False))
        out, err = outputs[STDOUT], outputs[STDERR]
        self._result = RunResult(
            exit_code=done.exit_code,
            stdout=bytes(out.kept),
            stderr=bytes(err.kept),
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
            timed_out=done.timed_out,
            oom_killed=oom_killed,
            duration_s=done.duration_s,
            stdout_total_bytes=out.total,
            stderr_total_bytes=err.total,
        )
        return self._result

    async def collect_outputs(
        self, path: str = "out", *, max_files: int, max_bytes: int
    ) -> tuple[dict[str, bytes], bool]:
        """Regular files under /work/<path> (names relative to it), up to the caps.

        Returns (files, truncated); no such directory gives ({}, False).
        """
        chunks = self.get_archive_stream(path)
        started = time.monotonic()
        try:
            return await regular_files(chunks, max_files=max_files, max_bytes=max_bytes)
        except FileNotFoundError:
            return {}, False
        finally:
            await chunks.aclose()
            self.timings["collect_s"] = time.monotonic() - started

    async def get_archive_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        """The engine's tar of a path (relative ones are under /work), chunk by chunk.

        Raises FileNotFoundError (on first iteration) when the path does not exist.
        """
        target = path if path.startswith("/") else f"{WORKDIR}/{'/'.join(relative_parts(path))}"
        await self._flush()
        chunks = self._api.download(
            "archive get", f"containers/{self.id}/archive", params={"path": target}
        )
        try:
            try:
                first = await anext(chunks, b"")
            except EngineNotFound as e:
                raise FileNotFoundError(target) from e
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()
