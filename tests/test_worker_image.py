"""The worker image: built from deploy/Dockerfile on the local base image, running berth.

The image is tagged with a hash of its inputs (the build context and the base image
id), so a run whose inputs did not change reuses it; older test tags are removed
after a new build. The build context is assembled here from the same paths the
.dockerignore allow-list lets in, plus the host's CA bundle as deploy/build-ca.pem:
pip in the build stage needs it behind this machine's intercepting proxy.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.settings import Settings
from tests.conftest import RUNTIME_IMAGES

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = RUNTIME_IMAGES["python3.11"]
TEST_REPOSITORY = "berth-test/worker"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DOCKER_SOCKET = Path("/var/run/docker.sock")
CONTEXT_PATHS = ("pyproject.toml", "README.md", "migrations", "shared", "scheduler", "worker")
BUILD_TIMEOUT_S = 900


def docker(
    *args: str, input_bytes: bytes | None = None, timeout_s: float = 300
) -> subprocess.CompletedProcess[bytes]:
    """The docker CLI, never raising on a non-zero exit (callers assert on it)."""
    return subprocess.run(
        ["docker", *args], input=input_bytes, capture_output=True, timeout=timeout_s, check=False
    )


def engine_available() -> bool:
    try:
        return docker("info", timeout_s=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def context_files() -> dict[str, bytes]:
    """What the image is built from: the package, migrations, the Dockerfile, the CA."""
    files: dict[str, bytes] = {}
    for top in CONTEXT_PATHS:
        path = ROOT / top
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in candidates:
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                files[file.relative_to(ROOT).as_posix()] = file.read_bytes()
    files["deploy/Dockerfile"] = (ROOT / "deploy" / "Dockerfile").read_bytes()
    if CA_BUNDLE.exists():
        files["deploy/build-ca.pem"] = CA_BUNDLE.read_bytes()
    return files


def context_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def build_worker_image() -> str:
    """The test image for the current inputs: reused if present, else built now."""
    base = docker("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE)
    assert base.returncode == 0, f"{BASE_IMAGE} is missing: run deploy/make-base-images.sh"
    files = context_files()
    digest = hashlib.sha256(base.stdout.strip())
    for name, content in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    tag = f"{TEST_REPOSITORY}:{digest.hexdigest()[:16]}"
    if docker("image", "inspect", tag).returncode == 0:
        return tag
    built = docker(
        "build", "--quiet", "--force-rm", "--file", "deploy/Dockerfile",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--tag", tag, "-",
        input_bytes=context_tar(files), timeout_s=BUILD_TIMEOUT_S,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr.decode(errors="replace")[-4000:]
    listed = docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}", TEST_REPOSITORY)
    stale = [t for t in listed.stdout.decode().split() if t != tag]
    # The legacy builder leaves each build stage behind untagged: keep the newest
    # (the layer cache of the next build), remove older ones.
    stages = docker(
        "image", "ls", "--quiet", "--filter", "dangling=true", "--filter", "label=berth.stage=build"
    )  # newest first
    stale += stages.stdout.decode().split()[1:]
    if stale:
        docker("image", "rm", *stale)
    return tag


pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(BUILD_TIMEOUT_S + 120),
    pytest.mark.skipif(not engine_available(), reason="no Docker engine answers `docker info`"),
]


@pytest.fixture(scope="module")
def image() -> str:
    """The worker image built from deploy/Dockerfile on the local base image."""
    return build_worker_image()


@pytest.fixture
def run_in_image(image: str) -> Iterator[list[str]]:
    """Names of the containers a test starts; each is removed after the test."""
    names: list[str] = []
    yield names
    for name in names:
        docker("rm", "--force", "--volumes", name)


def run(
    names: list[str], image: str, *args: str, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    name = f"berth-test-{secrets.token_hex(4)}"
    names.append(name)
    return docker("run", "--rm", "--name", name, *options, image, *args, timeout_s=120)


def host_services(settings: Settings, *, socket_group: bool = True) -> tuple[str, ...]:
    """Options reaching this machine's Redis, Postgres and engine, as the fleet test does."""
    options = [
        "--network", "host",
        "--volume", f"{DOCKER_SOCKET}:{DOCKER_SOCKET}",
        "--env", f"BERTH_REDIS_URL={settings.redis_url}",
        "--env", f"BERTH_POSTGRES_DSN={settings.postgres_dsn.get_secret_value()}",
        "--env", f"BERTH_QUEUE_NAME={settings.queue_name}",
        "--env", "BERTH_LOG_FORMAT=console",
    ]  # fmt: skip
    if socket_group:
        options += ["--group-add", str(DOCKER_SOCKET.stat().st_gid)]
    return tuple(options)


def test_image_runs_berth_as_a_fixed_non_root_user(image: str) -> None:
    """The entrypoint is `berth`, the user 10001:10001, and the build CA stays behind."""
    inspected = docker(
        "image", "inspect", "--format", "{{.Config.User}} {{.Config.Entrypoint}}", image
    )
    assert inspected.stdout.decode().split() == ["10001:10001", "[berth]"]
    probe = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
        "id -u; test ! -e /build/build-ca.pem && echo no-ca; test -w /var/lib/berth/path-caches"
        " && echo path-caches-writable",
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr.decode()
    assert probe.stdout.decode().split() == ["10001", "no-ca", "path-caches-writable"]


def test_berth_help_runs_in_the_image(image: str, run_in_image: list[str]) -> None:
    """`berth --help` exits 0 in the image and lists the service commands."""
    result = run(run_in_image, image, "--help", options=("--network", "none"))
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    for command in ("migrate", "warm", "worker", "scheduler", "health"):
        assert command in text


def test_berth_health_passes_in_the_image_against_the_host_services(
    image: str, run_in_image: list[str], settings: Settings
) -> None:
    """`berth health` in the image reaches the host's Redis, Postgres and engine: all ok."""
    result = run(run_in_image, image, "health", options=host_services(settings))
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0, [*lines, result.stderr.decode()]
    assert [line.split()[:2] for line in lines] == [
        ["ok", "redis"],
        ["ok", "postgres"],
        ["ok", "migrations"],
        ["ok", "docker"],
    ]


def test_berth_health_fails_without_the_sockets_group(
    image: str, run_in_image: list[str], settings: Settings
) -> None:
    """Non-root without the socket's group cannot use the engine: docker fails, exit 1."""
    if DOCKER_SOCKET.stat().st_mode & 0o006:
        pytest.skip("this socket is open to everyone")
    result = run(
        run_in_image, image, "health", "--only", "docker",
        options=host_services(settings, socket_group=False),
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout.decode().startswith("FAIL docker")


def test_berth_migrate_runs_on_a_read_only_root_filesystem(
    image: str, run_in_image: list[str], settings: Settings
) -> None:
    """`berth migrate` works with the root filesystem read-only, as the Kubernetes Job runs it."""
    result = run(run_in_image, image, "migrate", options=("--read-only", *host_services(settings)))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().startswith("applied 0 migration(s)")
