"""berth's Docker engine: images, dependency builds, sandboxes, housekeeping.

An image is two things on one host: a small image committed from the base image
(the job user's /work, an empty /opt/venv, the environment variables, berth's
labels) and its *environment*, the venv, kept in the per-host store volume
(``settings.store_volume``) as ``envs/<image key>``. Every job container of the
image gets that directory bind-mounted read-only at /opt/venv. The store also
holds uv's cache, so an install hard-links files out of it: a build copies no
package data and commits no package data (a commit tars and unpacks its whole
layer), and images that share packages share their files on disk.

Builds do not use ``docker build``: a container from the base image runs a fixed
script (``BUILD_SCRIPT`` in shared/build_recipe.py) that makes the venv in a staging
directory of the store, installs the lock with ``uv`` (from a shared tools volume),
renames it to ``envs/<key>`` and is committed. Nothing from the request is ever part
of the script: the lock and the operator's index settings arrive as files in
/berth-build, which the script deletes before the commit.

Build-only settings are never the build container's environment: a commit merges
the container's Env and Labels into the image, where every job would see them
(an index URL may carry credentials).

Near builds: given a ``parent`` (a berth image of the same base and recipe whose
packages the lock mostly shares), ``SYNC_SCRIPT`` starts from a hard-linked copy of
the parent's environment and makes it exactly the lock: ``uv pip compile`` resolves
the lock on its own (the parent's packages are no preference), ``uv pip sync``
installs what is missing, changes what differs and removes what the lock lacks
(each by replacing files, so the parent's stay as they were). The image key does
not change (it never names the parent); the label ``berth.parent_image_key`` says
which parent was used. A near build that fails falls back to a build from scratch.

Environments leave the store through ``prune_envs``, run by the eviction sweep:
those of keys with no image on the engine, no container and no build.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import secrets
import tarfile
import time
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog
import uv

from shared import constants
from shared.build_recipe import (
    BUILD_DIR,
    BUILD_SCRIPT,
    ENV_BYTES_MARK,
    ENVS_DIR,
    IMAGE_ENV,
    PARENT_MISSING_EXIT,
    PRUNE_SCRIPT,
    STORE_MOUNT,
    SYNC_SCRIPT,
    TOOLS_MISSING_EXIT,
    TOOLS_MOUNT,
    TOOLS_SCRIPT,
    VENV,
)
from shared.docker_api import CALL_TIMEOUT_S, DockerApi, EngineNotFound, JsonObject, run_attached
from shared.errors import BuildFailed, EngineError, ImageMissing
from shared.sandbox import ROLE_JOB, RunResult, Sandbox, SandboxLimits, parse_user
from shared.settings import Settings
from shared.tarstream import files_tar

__all__ = [
    "BuiltImage",
    "ContainerInfo",
    "Engine",
    "ImageInfo",
    "RunResult",
    "Sandbox",
    "SandboxLimits",
]

log = structlog.stdlib.get_logger(__name__)

PULL_TIMEOUT_S: Final = 300.0
COMMIT_TIMEOUT_S: Final = 300.0
TOOLS_TIMEOUT_S: Final = 120.0
LOG_TAIL_LINES: Final = 30
LOG_TAIL_BYTES: Final = 64 * 1024
# How long a base image's digest is trusted without asking the engine again: one
# inspect per job otherwise. A base rebuilt under the same tag is seen this late.
BASE_DIGEST_TTL_S: Final = 10.0
LABEL_PARENT_KEY: Final = "berth.parent_image_key"  # on a near-built image: its parent
PRUNE_TIMEOUT_S: Final = 300.0
# An environment of no known key is left this long after it was published: an image
# is committed (and its key known) a moment after its environment is renamed in.
ENV_GRACE_S: Final = 60.0
# An image key names a directory of the store: no separators, no leading dot.
_ENV_KEY: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_ENV_BYTES_LINE: Final = re.compile(rf"^{ENV_BYTES_MARK} (\d+)$", re.MULTILINE)

ROLE_BUILD: Final = "build"
ROLE_TOOLS: Final = "tools"
ROLE_PRUNE: Final = "prune"
ROLE_IMAGE: Final = "image"  # on images, so that containers made from them by hand are not swept
ROLE_STORE: Final = "store"
SWEPT_ROLES: Final = frozenset({ROLE_BUILD, ROLE_TOOLS, ROLE_PRUNE, ROLE_JOB})


@dataclass(frozen=True)
class ImageInfo:
    id: str
    tags: tuple[str, ...]
    size_bytes: int
    labels: Mapping[str, str]
    created: datetime


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    labels: Mapping[str, str]
    state: str
    created: datetime


@dataclass(frozen=True)
class BuiltImage:
    image_id: str
    tag: str
    size_bytes: int
    build_seconds: float
    log_tail: str
    parent_key: str | None = None  # the image key a near build started from
    phases: Mapping[str, float] = field(default_factory=dict)  # seconds per build step


class _Tail:
    """The last bytes of a build's combined output."""

    def __init__(self) -> None:
        self._data = bytearray()

    def add(self, _stream: int, data: bytes) -> None:
        self._data += data
        if len(self._data) > 2 * LOG_TAIL_BYTES:
            del self._data[:-LOG_TAIL_BYTES]

    def text(self) -> str:
        text = bytes(self._data[-LOG_TAIL_BYTES:]).decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


class Engine:
    """The Docker engine of this host; build with ``await Engine.connect(settings)``."""

    def __init__(self, settings: Settings, api: DockerApi) -> None:
        self.settings = settings
        self._api = api
        self._engine_id: str | None = None
        self._tools_volume: str | None = None
        self._tools_lock = asyncio.Lock()
        self._store: str | None = None  # the store volume's directory on the engine's host
        self._base_digests: dict[str, tuple[str, float]] = {}  # ref -> (digest, expires)

    @classmethod
    async def connect(cls, settings: Settings) -> Engine:
        """Open a session and ping the engine; ServiceUnavailable if it does not answer."""
        return cls(settings, await DockerApi.connect(settings.docker_url))

    async def close(self) -> None:
        """Finish pending container removals, then close the session."""
        await self._api.close()

    async def engine_id(self) -> str:
        if self._engine_id is None:
            info = await self._api.json("info", "info")
            self._engine_id = str(info["ID"])
        return self._engine_id

    # ------------------------------------------------------------------ images

    async def image_info(self, ref: str) -> ImageInfo | None:
        """The image as the engine knows it, or None when it is not there."""
        try:
            data = await self._api.json("image inspect", f"images/{ref}/json")
        except EngineNotFound:
            return None
        return ImageInfo(
            id=str(data["Id"]),
            tags=tuple(data.get("RepoTags") or ()),
            size_bytes=_image_bytes(data.get("Size"), (data.get("Config") or {}).get("Labels")),
            labels=dict((data.get("Config") or {}).get("Labels") or {}),
            created=datetime.fromisoformat(str(data["Created"])),
        )

    async def base_image_digest(self, ref: str) -> str:
        """The Id (sha256:…) of a base image, pulled once when it is missing.

        Remembered for ``BASE_DIGEST_TTL_S``: every job asks, and the answer changes
        only when an operator rebuilds a base image.
        """
        known = self._base_digests.get(ref)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        digest = await self._base_image_digest(ref)
        self._base_digests[ref] = (digest, time.monotonic() + BASE_DIGEST_TTL_S)
        return digest

    async def _base_image_digest(self, ref: str) -> str:
        info = await self.image_info(ref)
        if info is None:
            reason = await self._api.pull(ref, PULL_TIMEOUT_S)
            info = await self.image_info(ref)
            if info is None:
                raise EngineError(
                    "base image",
                    f"{ref} is not on this engine and pulling it failed ({reason}); "
                    "where no registry is reachable, make it with deploy/make-base-images.sh",
                )
        return info.id

    async def remove_image(self, ref: str, *, force: bool = False) -> bool:
        """True when removed, False when it was not there; EngineError when in use."""
        self._base_digests.pop(ref, None)
        try:
            await self._api.send(
                "image remove", f"images/{ref}", method="DELETE", params={"force": force}
            )
        except EngineNotFound:
            return False
        return True

    async def list_berth_images(self) -> list[ImageInfo]:
        items = await self._api.json(
            "image list",
            "images/json",
            params={"filters": {"label": [f"{constants.LABEL_MANAGED}=true"]}},
        )
        return [
            ImageInfo(
                id=str(item["Id"]),
                tags=tuple(t for t in item.get("RepoTags") or () if t != "<none>:<none>"),
                size_bytes=_image_bytes(item.get("Size"), item.get("Labels")),
                labels=dict(item.get("Labels") or {}),
                created=datetime.fromtimestamp(int(item.get("Created") or 0), UTC),
            )
            for item in items
        ]

    # -------------------------------------------------------------- containers

    async def image_keys_in_use(self) -> set[str]:
        """Image keys of every created or running container (eviction skips them)."""
        items = await self._api.list_containers(
            label=[constants.LABEL_IMAGE_KEY],
            status=["created", "running", "paused", "restarting"],
        )
        return {str(item["Labels"][constants.LABEL_IMAGE_KEY]) for item in items}

    async def list_berth_containers(self) -> list[ContainerInfo]:
        """Every container labelled berth.managed=true, in any state."""
        items = await self._api.list_containers(label=[f"{constants.LABEL_MANAGED}=true"])
        return [
            ContainerInfo(
                id=str(item["Id"]),
                name=str((item.get("Names") or ["?"])[0]).lstrip("/"),
                labels=dict(item.get("Labels") or {}),
                state=str(item.get("State") or ""),
                created=datetime.fromtimestamp(int(item.get("Created") or 0), UTC),
            )
            for item in items
        ]

    async def remove_container(self, ref: str) -> bool:
        """Force-remove a container and its anonymous volumes; False if it was not there."""
        return await self._api.remove_container(ref)

    async def sweep_containers(self, *, older_than_s: float) -> int:
        """Remove berth's build/job/tools containers older than that (dead workers')."""
        cutoff = time.time() - older_than_s
        items = await self._api.list_containers(label=[f"{constants.LABEL_MANAGED}=true"])
        removed = 0
        for item in items:
            role = (item.get("Labels") or {}).get(constants.LABEL_ROLE)
            if role in SWEPT_ROLES and int(item.get("Created") or 0) < cutoff:
                removed += await self._api.remove_container(str(item["Id"]))
        if removed:
            log.info("containers swept", removed=removed, older_than_s=older_than_s)
        return removed

    @asynccontextmanager
    async def sandbox(
        self,
        *,
        image: str,
        job_id: str,
        image_key: str,
        limits: SandboxLimits,
        env: Mapping[str, str],
    ) -> AsyncIterator[Sandbox]:
        """``async with engine.sandbox(...) as box:`` put files, run, collect.

        On a berth image (``berth/deps:<key>``) the box gets the image's environment
        at /opt/venv, read-only; ImageMissing when the store no longer has it.
        """
        mounts: list[JsonObject] = []
        env_key = constants.image_key_of(image)
        if env_key is not None:
            source = f"{await self.store_path()}/{ENVS_DIR}/{_checked_env_key(env_key)}"
            mounts.append({"Type": "bind", "Source": source, "Target": VENV, "ReadOnly": True})
        async with Sandbox(
            self._api,
            image=image,
            job_id=job_id,
            image_key=image_key,
            limits=limits,
            env=env,
            labels=self.settings.extra_labels,
            mounts=mounts,
        ) as box:
            yield box

    # ------------------------------------------------------------------- tools

    async def ensure_tools(self, *, image: str | None = None) -> str:
        """The volume ``berth-tools-<uv version>`` holding this host's uv, filled once.

        ``image`` is any image with /bin/sh and mv (default: a configured runtime).
        """
        if self._tools_volume is not None:
            return self._tools_volume
        async with self._tools_lock:
            if self._tools_volume is None:
                volume = f"berth-tools-{importlib.metadata.version('uv')}"
                await self._create_volume(volume, ROLE_TOOLS)
                await self._fill_tools(volume, image or await self._any_runtime_image())
                self._tools_volume = volume
        return self._tools_volume

    async def list_berth_volumes(self) -> list[str]:
        """Names of the volumes berth made (tools, store)."""
        data = await self._api.json(
            "volume list",
            "volumes",
            params={"filters": {"label": [f"{constants.LABEL_MANAGED}=true"]}},
        )
        return sorted(str(item["Name"]) for item in data.get("Volumes") or ())

    async def remove_volume(self, name: str) -> bool:
        """False when it was not there; EngineError while a container uses it."""
        try:
            await self._api.send("volume remove", f"volumes/{name}", method="DELETE")
        except EngineNotFound:
            return False
        if name == self._tools_volume:
            self._tools_volume = None
        elif name == self.settings.store_volume:
            self._store = None
        return True

    async def _create_volume(self, name: str, role: str) -> str:
        """Create it if missing; its directory on the engine's host."""
        labels = {constants.LABEL_MANAGED: "true", constants.LABEL_ROLE: role}
        data = await self._api.json(
            "volume create", "volumes/create", method="POST", body={"Name": name, "Labels": labels}
        )
        return str(data.get("Mountpoint") or "")

    # ------------------------------------------------------------------- store

    async def store_path(self) -> str:
        """Where the store volume lives on the engine's host (created on first use)."""
        if self._store is None:
            mountpoint = await self._create_volume(self.settings.store_volume, ROLE_STORE)
            if not mountpoint.startswith("/"):
                raise EngineError(
                    "store volume",
                    f"{self.settings.store_volume} has no host directory ({mountpoint!r}); "
                    "it must be a volume of the local driver",
                )
            self._store = mountpoint
        return self._store

    async def prune_envs(
        self, keep: Collection[str], *, stale_after_s: float, grace_s: float = ENV_GRACE_S
    ) -> list[str]:
        """Remove the store's environments of keys not in ``keep``; the names removed.

        One published less than ``grace_s`` ago stays (its image may be being
        committed), and a staging or moved-aside one stays ``stale_after_s`` (a build
        or a job may still use it). Runs in a container without network.
        """
        await self.store_path()
        image = await self._any_runtime_image()
        envs = f"{STORE_MOUNT}/{ENVS_DIR}"
        argv = [str(grace_s), str(stale_after_s), *sorted(keep)]
        config: JsonObject = {
            "Image": image,
            "Cmd": ["python3", "-I", "-c", PRUNE_SCRIPT, envs, *argv],
            "User": "0:0",
            "Labels": {
                **self.settings.extra_labels,
                constants.LABEL_MANAGED: "true",
                constants.LABEL_ROLE: ROLE_PRUNE,
            },
            "AttachStdout": True,
            "AttachStderr": True,
            "HostConfig": {
                "NetworkMode": "none",
                "CapDrop": ["ALL"],
                "CapAdd": ["DAC_OVERRIDE"],  # package directories may be read-only
                "SecurityOpt": ["no-new-privileges"],
                "Mounts": [
                    {"Type": "volume", "Source": self.settings.store_volume, "Target": STORE_MOUNT}
                ],
                "LogConfig": {"Type": "none", "Config": {}},
            },
        }
        name = f"berth-prune-{secrets.token_hex(8)}"
        container_id = await self._api.create_container(name, config)
        out = bytearray()
        try:
            done = await run_attached(
                self._api,
                container_id,
                timeout_s=PRUNE_TIMEOUT_S,
                on_output=lambda _stream, data: out.extend(data),
            )
        finally:
            await self._api.remove_container_shielded(container_id)
        text = out.decode("utf-8", "replace")
        if done.exit_code != 0 or done.timed_out:
            raise EngineError("environment prune", f"exit {done.exit_code}: {text[-2000:]}")
        removed = text.split()
        if removed:
            log.info("environments pruned", removed=len(removed), names=removed[:20])
        return removed

    async def _any_runtime_image(self) -> str:
        for ref in self.settings.runtime_images.values():
            if await self.image_info(ref) is not None:
                return ref
        raise EngineError("tools volume", "none of the runtime images is on this engine")

    async def _fill_tools(self, volume: str, image: str) -> None:
        staged = f"{TOOLS_MOUNT}/.uv-{secrets.token_hex(8)}"
        config: JsonObject = {
            "Image": image,
            "Cmd": ["/bin/sh", "-ec", TOOLS_SCRIPT, "sh", staged],
            "User": "0:0",
            "Labels": {constants.LABEL_MANAGED: "true", constants.LABEL_ROLE: ROLE_TOOLS},
            "HostConfig": {
                "NetworkMode": "none",
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "Mounts": [{"Type": "volume", "Source": volume, "Target": TOOLS_MOUNT}],
                "LogConfig": {"Type": "none", "Config": {}},
            },
        }
        name = f"berth-tools-{secrets.token_hex(8)}"
        container_id = await self._api.create_container(name, config)
        try:
            if await self._api.path_exists(container_id, f"{TOOLS_MOUNT}/uv"):
                return
            binary = Path(str(uv.find_uv_bin()))
            await self._api.put_archive(
                container_id, TOOLS_MOUNT, _file_tar_stream(binary, staged), TOOLS_TIMEOUT_S
            )
            tail = _Tail()
            done = await run_attached(
                self._api, container_id, timeout_s=TOOLS_TIMEOUT_S, on_output=tail.add
            )
            if done.exit_code != 0:
                raise EngineError("tools volume", f"moving uv into {volume} failed: {tail.text()}")
            log.info("tools volume filled", volume=volume, uv=str(binary))
        finally:
            await self._api.remove_container_shielded(container_id)

    # ------------------------------------------------------------------- build

    async def build_image(
        self,
        *,
        image_key: str,
        base_image: str,
        lock_text: str,
        labels: Mapping[str, str],
        parent: ImageInfo | None = None,
    ) -> BuiltImage:
        """Install ``lock_text`` into the environment of ``berth/deps:<key>`` on ``base_image``.

        With ``parent`` (a berth image on this engine built from the same base image and
        recipe), a near build: the parent's environment synced to exactly the lock. If it
        fails for any reason, and for a lock with option lines (whose index settings the
        sync would not see), the image is built from scratch.
        BuildFailed when the installer fails or times out (with uv's last lines).
        """
        started = time.monotonic()
        files = await self._build_files(lock_text, _checked_env_key(image_key))
        parent_key = None if parent is None else parent.labels.get(constants.LABEL_IMAGE_KEY)
        if parent_key and _ENV_KEY.fullmatch(parent_key) and not _has_option_lines(lock_text):
            parent_file = (f"{BUILD_DIR}/parent-key", parent_key.encode(), 0o600)
            try:
                return await self._build(
                    image_key,
                    base_image,
                    SYNC_SCRIPT,
                    files_tar([*files, parent_file], uid=0, gid=0),
                    {**labels, LABEL_PARENT_KEY: parent_key},
                    started,
                    parent_key=parent_key,
                )
            except (BuildFailed, ImageMissing) as e:
                log.warning(
                    "near build failed; building from scratch",
                    image_key=image_key,
                    parent_image_key=parent_key,
                    reason=str(e),
                )
        build_tar = files_tar(files, uid=0, gid=0)
        return await self._build(image_key, base_image, BUILD_SCRIPT, build_tar, labels, started)

    async def _build(
        self,
        image_key: str,
        from_image: str,
        script: str,
        build_tar: bytes,
        labels: Mapping[str, str],
        started: float,
        *,
        parent_key: str | None = None,
    ) -> BuiltImage:
        tail = _Tail()
        phases: dict[str, float] = {}
        image_id: str | None = None
        for _attempt in range(2):
            tools = await self.ensure_tools(image=from_image)
            await self.store_path()
            tail = _Tail()
            try:
                image_id = await self._build_in_container(
                    image_key, from_image, script, tools, build_tar, labels, tail, phases
                )
            except BuildFailed as e:
                log.warning(
                    "image build failed",
                    image_key=image_key,
                    from_image=from_image,
                    parent_image_key=parent_key,
                    reason=e.reason,
                    build_s=round(time.monotonic() - started, 3),
                )
                raise
            if image_id is not None:
                break
            log.warning("tools volume has no uv; filling it again", volume=tools)
            self._tools_volume = None
        if image_id is None:
            raise EngineError("image build", "the tools volume stays without uv")
        info = await self.image_info(image_id)
        built = BuiltImage(
            image_id=image_id,
            tag=constants.image_tag(image_key),
            size_bytes=info.size_bytes if info else 0,
            build_seconds=time.monotonic() - started,
            log_tail=tail.text(),
            parent_key=parent_key,
            phases={phase: round(seconds, 4) for phase, seconds in phases.items()},
        )
        log.info(
            "image built",
            image_key=image_key,
            from_image=from_image,
            parent_image_key=parent_key,
            image_id=image_id,
            size_bytes=built.size_bytes,
            build_s=round(built.build_seconds, 3),
            **built.phases,
        )
        return built

    async def _build_in_container(
        self,
        image_key: str,
        from_image: str,
        script: str,
        tools: str,
        build_tar: bytes,
        labels: Mapping[str, str],
        tail: _Tail,
        phases: dict[str, float],
    ) -> str | None:
        """Run the build script and commit; None when the tools volume had no uv.

        The commit holds no package: the environment went to the store. The container
        is removed in the background: nobody has to wait for that.
        """
        settings = self.settings
        config: JsonObject = {
            "Image": from_image,
            "Cmd": ["/bin/sh", "-ec", script],
            "User": "0:0",
            "WorkingDir": "/",
            "Env": list(IMAGE_ENV),
            "Labels": {
                **self.settings.extra_labels,
                constants.LABEL_MANAGED: "true",
                constants.LABEL_ROLE: ROLE_BUILD,
                constants.LABEL_IMAGE_KEY: image_key,
            },
            "AttachStdout": True,
            "AttachStderr": True,
            "HostConfig": {
                "NetworkMode": settings.build_network,
                "Init": True,
                # Root, but only allowed to chown /work: package builds run here.
                "CapDrop": ["ALL"],
                "CapAdd": ["CHOWN"],
                "SecurityOpt": ["no-new-privileges"],
                "Mounts": [
                    {"Type": "volume", "Source": tools, "Target": TOOLS_MOUNT, "ReadOnly": True},
                    {"Type": "volume", "Source": settings.store_volume, "Target": STORE_MOUNT},
                ],
                "LogConfig": {"Type": "none", "Config": {}},
            },
        }
        name = f"berth-build-{secrets.token_hex(8)}"
        clock = time.monotonic()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.monotonic()
            phases[phase] = phases.get(phase, 0.0) + now - clock
            clock = now

        container_id = await self._api.create_container(name, config)
        try:
            lap("create_s")
            await self._api.put_archive(container_id, "/", build_tar, CALL_TIMEOUT_S)
            lap("put_s")
            done = await run_attached(
                self._api, container_id, timeout_s=settings.build_timeout_s, on_output=tail.add
            )
            lap("install_s")
            if done.timed_out:
                reason = f"timed out after {settings.build_timeout_s:g} s"
                raise BuildFailed(image_key, reason, tail.text())
            if done.exit_code == TOOLS_MISSING_EXIT:
                return None
            if done.exit_code == PARENT_MISSING_EXIT:
                raise BuildFailed(image_key, "the parent's environment is not in the store")
            if done.exit_code != 0:
                reason = f"the installer exited with code {done.exit_code}"
                log_tail = tail.text()
                if "building from source is disabled" in log_tail:
                    reason += (
                        "; a package has no wheel for this runtime and source builds are off"
                        " (BERTH_ALLOW_SOURCE_BUILDS)"
                    )
                raise BuildFailed(image_key, reason, log_tail)
            found = _ENV_BYTES_LINE.findall(tail.text())
            env_bytes = {constants.LABEL_ENV_BYTES: found[-1]} if found else {}
            image_id = await self._commit(container_id, image_key, {**labels, **env_bytes})
            lap("commit_s")
            return image_id
        finally:
            self._api.remove_container_soon(container_id)

    async def _build_files(self, lock_text: str, env_key: str) -> list[tuple[str, bytes, int]]:
        settings = self.settings
        parse_user(settings.job_user)
        files = {
            f"{BUILD_DIR}/requirements.lock": lock_text.encode(),
            f"{BUILD_DIR}/job-user": settings.job_user.encode(),
            f"{BUILD_DIR}/env-key": env_key.encode(),
        }
        if settings.ca_bundle_path is not None:
            files[f"{BUILD_DIR}/ca.pem"] = await asyncio.to_thread(
                settings.ca_bundle_path.read_bytes
            )
        if settings.index_url:
            files[f"{BUILD_DIR}/index-url"] = settings.index_url.encode()
        if settings.extra_index_urls:
            files[f"{BUILD_DIR}/extra-index-urls"] = " ".join(settings.extra_index_urls).encode()
        if not settings.allow_source_builds:
            # An sdist's build code would run as root, with network, beside the uv
            # cache every later build on this host reads: wheels only, unless allowed.
            files[f"{BUILD_DIR}/wheels-only"] = b"1"
        return [(name, data, 0o600) for name, data in files.items()]

    async def _commit(self, container_id: str, image_key: str, labels: Mapping[str, str]) -> str:
        repository, _, tag = constants.image_tag(image_key).rpartition(":")
        config: JsonObject = {
            "User": self.settings.job_user,
            "WorkingDir": "/work",
            "Env": list(IMAGE_ENV),
            "Cmd": ["python3"],
            "Labels": {
                **self.settings.extra_labels,
                **labels,
                constants.LABEL_MANAGED: "true",
                constants.LABEL_ROLE: ROLE_IMAGE,
                constants.LABEL_IMAGE_KEY: image_key,
            },
        }
        data = await self._api.json(
            "image commit",
            "commit",
            method="POST",
            params={"container": container_id, "repo": repository, "tag": tag, "pause": False},
            body=config,
            timeout_s=COMMIT_TIMEOUT_S,
        )
        return str(data["Id"])


def _checked_env_key(key: str) -> str:
    """An image key fit to name a directory of the store (ValueError otherwise)."""
    if not _ENV_KEY.fullmatch(key):
        raise ValueError(f"image key {key!r} cannot name an environment: use [A-Za-z0-9._-]")
    return key


def _image_bytes(size: object, labels: Mapping[str, str] | None) -> int:
    """An image's cost on its host: its environment's size for a berth image."""
    env_bytes = (labels or {}).get(constants.LABEL_ENV_BYTES, "")
    return int(env_bytes) if env_bytes.isdigit() else int(str(size or 0))


def _has_option_lines(lock_text: str) -> bool:
    """Whether a lock carries option lines (``--index-url`` …) besides its pins."""
    return any(line.lstrip().startswith("-") for line in lock_text.splitlines())


async def _file_tar_stream(path: Path, name: str) -> AsyncIterator[bytes]:
    """A one-file tar (mode 0755, root), read from disk chunk by chunk."""
    info = tarfile.TarInfo(name.rpartition("/")[2])
    info.size = (await asyncio.to_thread(path.stat)).st_size
    info.mode, info.mtime = 0o755, int(time.time())
    yield info.tobuf(format=tarfile.PAX_FORMAT)
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, 1024 * 1024):
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)
    yield tarfile.NUL * (-info.size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)
