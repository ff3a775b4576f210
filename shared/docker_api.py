"""The typed edge of aiodocker: the one module of berth that imports it.

``DockerApi`` wraps every engine call in ``asyncio.timeout()`` and turns aiodocker's
``DockerError`` into berth's errors (404 -> ``EngineNotFound``, no connection ->
``ServiceUnavailable``); answers leave this module as plain typed values.
Long transfers (archives, attach) are streams with a per-chunk idle timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import structlog
from aiodocker import Docker
from aiodocker.exceptions import DockerError
from aiodocker.stream import Message, Stream
from yarl import URL

from shared.errors import EngineError, ImageMissing, ServiceUnavailable

log = structlog.stdlib.get_logger(__name__)

CONNECT_TIMEOUT_S: Final = 5.0
CALL_TIMEOUT_S: Final = 30.0  # one short API call
STREAM_IDLE_TIMEOUT_S: Final = 60.0  # a stream that sends nothing for this long is stuck
KILL_GRACE_S: Final = 15.0  # after a kill, how long the engine gets to report the exit
REMOVE_TIMEOUT_S: Final = 60.0
STDIN_CHUNK_BYTES: Final = 1024 * 1024  # also the largest body sent as one bytes object

JsonObject = dict[str, Any]


class EngineNotFound(EngineError):
    """The engine answered 404: no such container, image, volume or path."""


class DockerApi:
    """aiodocker's ``Docker``, reduced to the typed calls berth makes."""

    def __init__(self, docker: Docker, url: str) -> None:
        self.docker = docker
        self.url = url
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(cls, url: str) -> DockerApi:
        """Open a session and ask the engine's version; ServiceUnavailable if no answer."""
        try:
            docker = Docker(url=url)
        except ValueError as e:
            raise ServiceUnavailable("docker", url, str(e)) from e
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await docker.version()
        except (DockerError, aiohttp.ClientError, OSError) as e:
            await docker.close()
            reason = e.message if isinstance(e, DockerError) else str(e)
            raise ServiceUnavailable("docker", url, reason) from e
        except TimeoutError as e:
            await docker.close()
            raise ServiceUnavailable("docker", url, f"no answer in {CONNECT_TIMEOUT_S:g} s") from e
        except BaseException:
            await docker.close()
            raise
        return cls(docker, url)

    async def close(self) -> None:
        """Finish the removals still running in the background, then close the session."""
        try:
            if self._background:
                await asyncio.wait(set(self._background), timeout=REMOVE_TIMEOUT_S)
        finally:
            await self.docker.close()

    @asynccontextmanager
    async def call(self, operation: str, timeout_s: float = CALL_TIMEOUT_S) -> AsyncIterator[None]:
        """Bound the block by ``timeout_s`` and translate the engine's errors."""
        try:
            async with asyncio.timeout(timeout_s):
                yield
        except DockerError as e:
            if e.status == 900:  # aiodocker: cannot connect
                raise ServiceUnavailable("docker", self.url, e.message) from e
            error = EngineNotFound if e.status == 404 else EngineError
            raise error(operation, f"{e.message} (HTTP {e.status})") from e
        except TimeoutError as e:
            raise EngineError(operation, f"no answer within {timeout_s:g} s") from e
        except aiohttp.ClientError as e:
            raise EngineError(operation, f"{type(e).__name__}: {e}") from e

    async def json(
        self,
        operation: str,
        path: str,
        *,
        method: str = "GET",
        params: Mapping[str, Any] | None = None,
        body: JsonObject | None = None,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> Any:
        async with self.call(operation, timeout_s):
            return await self.docker._query_json(
                path, method, params=dict(params or {}), data=body, timeout=None
            )

    async def send(
        self,
        operation: str,
        path: str,
        *,
        method: str = "POST",
        params: Mapping[str, Any] | None = None,
        data: bytes | AsyncIterable[bytes] | None = None,
        content_type: str = "application/json",
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> int:
        """A request whose answer body does not matter; returns the HTTP status."""
        if isinstance(data, bytes) and len(data) > STDIN_CHUNK_BYTES:
            data = _chunks(data)  # aiohttp warns about (and blocks on) big bytes bodies
        async with (
            self.call(operation, timeout_s),
            self.docker._query(
                path,
                method,
                params=dict(params or {}),
                data=data,
                headers={"Content-Type": content_type},
                timeout=None,
            ) as response,
        ):
            await response.read()
            return response.status

    async def download(
        self, operation: str, path: str, *, params: Mapping[str, Any]
    ) -> AsyncGenerator[bytes, None]:
        """The answer body as chunks, as they arrive (never the whole body at once)."""
        async with (
            self.call(operation),
            self.docker._query(path, "GET", params=dict(params), timeout=None) as response,
        ):
            pass
        done = False
        try:
            while True:
                async with self.call(operation, STREAM_IDLE_TIMEOUT_S):
                    chunk = await response.content.readany()
                if not chunk:
                    done = True
                    return
                yield chunk
        finally:
            if done:
                response.release()
            else:
                response.close()

    async def attach(self, container_id: str, *, stdin: bool = False) -> _AttachStream:
        """Attach to stdout and stderr (frames kept apart, bytes untouched), and stdin.

        stdin needs a container created with OpenStdin and StdinOnce: the end of what
        ``send_stdin()`` writes is then the end of its input.
        """

        async def setup() -> tuple[URL, bytes | None, bool]:
            url = URL(f"containers/{container_id}/attach").with_query(
                {"stream": 1, "stdout": 1, "stderr": 1, "stdin": int(stdin), "logs": 0}
            )
            return url, None, False  # tty is never on: frames carry the stream number

        stream = _AttachStream(self.docker, setup, None)
        try:
            async with self.call("container attach"):
                await stream.open()
        except BaseException:
            await stream.close()
            raise
        return stream

    # --- containers, shared by sandboxes, builds and the tools volume

    async def create_container(self, name: str, config: JsonObject) -> str:
        """Create and return the id; the name lets an interrupted create be cleaned up."""
        try:
            data = await self.json(
                "container create",
                "containers/create",
                method="POST",
                params={"name": name},
                body=config,
            )
        except EngineNotFound as e:  # the only 404 of a create: no such image
            raise ImageMissing(str(config["Image"])) from e
        except EngineError as e:
            if "bind source path does not exist" in e.reason:
                # An image's environment is a bind mount from the store: gone with it.
                image = str(config["Image"])
                raise ImageMissing(image, f"the environment of {image} is not in the store") from e
            self.remove_container_soon(name)  # perhaps made (no answer in time)
            raise
        except BaseException:  # perhaps made (cancelled): remove by name
            self.remove_container_soon(name)
            raise
        return str(_obj(data, "container create")["Id"])

    async def remove_container(self, ref: str) -> bool:
        try:
            await self.send(
                "container remove",
                f"containers/{ref}",
                method="DELETE",
                params={"force": True, "v": True},
                timeout_s=REMOVE_TIMEOUT_S,
            )
        except EngineNotFound:
            return False
        return True

    def remove_container_soon(self, ref: str) -> asyncio.Task[None]:
        """Remove in a task of its own, so that cancelling the caller cannot stop it."""

        async def remove() -> None:
            try:
                await self.remove_container(ref)
            except (EngineError, ServiceUnavailable) as e:
                log.warning("container removal failed", container=ref, error=str(e))

        task = asyncio.get_running_loop().create_task(remove())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def remove_container_shielded(self, ref: str) -> None:
        await asyncio.shield(self.remove_container_soon(ref))

    async def put_archive(
        self, container_id: str, path: str, data: bytes | AsyncIterable[bytes], timeout_s: float
    ) -> None:
        """Extract a tar (bytes, or chunks sent as they come: chunked encoding) at path."""
        await self.send(
            "archive put",
            f"containers/{container_id}/archive",
            method="PUT",
            params={"path": path},
            data=data,
            content_type="application/x-tar",
            timeout_s=timeout_s,
        )

    async def path_exists(self, container_id: str, path: str) -> bool:
        # Not HEAD: aiodocker fails to parse the empty body of a HEAD 404.
        chunks = self.download(
            "archive stat", f"containers/{container_id}/archive", params={"path": path}
        )
        try:
            await anext(chunks, b"")
        except EngineNotFound:
            return False
        finally:
            await chunks.aclose()
        return True

    async def kill(self, container_id: str) -> None:
        try:
            await self.send("container kill", f"containers/{container_id}/kill")
        except EngineNotFound:
            pass
        except EngineError as e:
            if "is not running" not in e.reason:
                raise

    async def wait(self, container_id: str, timeout_s: float) -> int:
        data = await self.json(
            "container wait", f"containers/{container_id}/wait", method="POST", timeout_s=timeout_s
        )
        return int(_obj(data, "container wait")["StatusCode"])

    async def inspect_container(self, container_id: str) -> JsonObject:
        return _obj(
            await self.json("container inspect", f"containers/{container_id}/json"),
            "container inspect",
        )

    async def pull(self, ref: str, timeout_s: float) -> str:
        """Try to pull an image; returns what happened (the engine's error, or "pulled")."""
        name, tag = _split_ref(ref)
        try:
            async with self.call("image pull", timeout_s):
                items = await self.docker.images.pull(name, tag=tag, timeout=None)
        except EngineError as e:
            return e.reason
        errors = [str(item["error"]) for item in items if "error" in item]
        return "; ".join(errors) or "pulled"

    async def list_containers(self, **filters: list[str]) -> list[JsonObject]:
        items = await self.json(
            "container list", "containers/json", params={"all": True, "filters": filters}
        )
        return [item for item in items if isinstance(item, dict)]


class _AttachStream(Stream):
    """aiodocker's hijacked attach stream, made safe to close before it opened."""

    async def open(self) -> None:
        await self._init()

    async def read(self) -> Message | None:
        try:
            return await self.read_out()
        except (aiohttp.ClientError, OSError) as e:
            raise EngineError("container attach", f"{type(e).__name__}: {e}") from e

    async def send_stdin(self, data: bytes) -> None:
        """Write all of ``data`` to the container's stdin, then close it (end of input)."""
        try:
            for start in range(0, len(data), STDIN_CHUNK_BYTES):
                await self.write_in(data[start : start + STDIN_CHUNK_BYTES])
            connection = self._resp.connection if self._resp is not None else None
            transport = connection.transport if connection is not None else None
            if transport is not None and transport.can_write_eof():
                transport.write_eof()  # a half-close: the output keeps coming
        except (aiohttp.ClientError, OSError) as e:
            raise EngineError("container attach", f"{type(e).__name__}: {e}") from e

    async def close(self) -> None:
        await super().close()
        self._closed = True


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), STDIN_CHUNK_BYTES):
        yield data[start : start + STDIN_CHUNK_BYTES]


def _split_ref(ref: str) -> tuple[str, str | None]:
    """``repo/name:tag`` -> (``repo/name``, ``tag``); digests pass whole, no tag is latest."""
    if "@" in ref:
        return ref, None
    name, colon, tag = ref.rpartition(":")
    if colon and "/" not in tag:
        return name, tag
    return ref, "latest"


def _obj(value: object, operation: str) -> JsonObject:
    if not isinstance(value, dict):
        raise EngineError(operation, f"unexpected answer from the engine: {value!r:.200}")
    return value


@dataclass(frozen=True)
class Exit:
    exit_code: int
    timed_out: bool
    duration_s: float


async def run_attached(
    api: DockerApi,
    container_id: str,
    *,
    timeout_s: float,
    on_output: Callable[[int, bytes], None],
    stdin: bytes | None = None,
) -> Exit:
    """Attach, start, feed every output frame to ``on_output``, wait for the exit.

    ``stdin`` (for a container created with OpenStdin and StdinOnce) is written once
    it has started, while its output is read, then closed. On timeout the container
    is killed; output read until then has been fed.
    """
    stream = await api.attach(container_id, stdin=stdin is not None)
    timed_out = False
    writer: asyncio.Task[None] | None = None
    try:
        await api.send("container start", f"containers/{container_id}/start")
        started = time.monotonic()
        if stdin is not None:
            writer = asyncio.create_task(stream.send_stdin(stdin))
        try:
            async with asyncio.timeout(timeout_s):
                while (message := await stream.read()) is not None:
                    on_output(message.stream, message.data)
                exit_code = await api.wait(container_id, timeout_s + KILL_GRACE_S)
        except TimeoutError:
            timed_out = True
            await api.kill(container_id)
            exit_code = await api.wait(container_id, KILL_GRACE_S)
        duration_s = time.monotonic() - started
    finally:
        if writer is not None:
            await _finish_writer(writer)
        await stream.close()
    return Exit(exit_code, timed_out, duration_s)


async def _finish_writer(writer: asyncio.Task[None]) -> None:
    """The process has exited (or we are leaving): the rest of its input is moot."""
    if not writer.done():
        writer.cancel()
    try:
        await writer
    except asyncio.CancelledError:
        if not writer.cancelled():
            raise
    except EngineError as e:  # it exited without reading all: its own output says why
        log.debug("stdin not fully written", error=str(e))
