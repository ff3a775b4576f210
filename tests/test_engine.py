"""The Docker engine wrapper against a real engine: builds, sandboxes, housekeeping."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import shutil
import statistics
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from shared import constants
from shared.engine import BuiltImage, Engine
from shared.errors import BuildFailed, EngineError, ServiceUnavailable
from shared.settings import Settings
from tests import docker_fixtures
from tests.docker_fixtures import (
    BASE_IMAGE,
    SANDBOX_LIMITS,
    MiB,
    belongs_to_run,
    new_job_id,
    open_sandbox,
)
from tests.memory import peak_rss_growth_kib, reset_peak_rss

pytestmark = pytest.mark.docker

LIMITS = replace(SANDBOX_LIMITS, timeout_s=30)


# Scripts run with this module's limits unless a test gives its own.
run_script = functools.partial(docker_fixtures.run_script, limits=LIMITS)


async def our_containers(engine: Engine, prefix: str) -> list[str]:
    return [c.id for c in await engine.list_berth_containers() if belongs_to_run(c.labels, prefix)]


async def wait_until_running(engine: Engine, prefix: str) -> None:
    """Poll the engine until one of this run's containers is running."""
    async with asyncio.timeout(20):
        while True:
            containers = await engine.list_berth_containers()
            if any(c.state == "running" and belongs_to_run(c.labels, prefix) for c in containers):
                return
            await asyncio.sleep(0.05)


# --------------------------------------------------------------------- connect


@pytest.mark.parametrize(
    "url", ["unix:///nonexistent.sock", "tcp://127.0.0.1:1", "nonsense://nowhere"]
)
async def test_connect_unreachable_raises_service_unavailable(url: str) -> None:
    """An engine that cannot be reached raises ServiceUnavailable instead of hanging."""
    settings = Settings(docker_url=url, runtime_images={"python3.11": BASE_IMAGE})
    async with asyncio.timeout(20):  # a guard against hanging, not a timing assertion
        with pytest.raises(ServiceUnavailable) as caught:
            await Engine.connect(settings)
    assert caught.value.service == "docker"
    assert caught.value.target == url


async def test_engine_id_is_stable(engine: Engine) -> None:
    """engine_id() answers the engine's ID, the same on every call."""
    first = await engine.engine_id()
    assert first
    assert await engine.engine_id() == first


# ---------------------------------------------------------------------- images


async def test_base_image_digest_is_the_image_id(engine: Engine) -> None:
    """The base image's digest is its image Id."""
    info = await engine.image_info(BASE_IMAGE)
    assert info is not None
    assert await engine.base_image_digest(BASE_IMAGE) == info.id
    assert info.id.startswith("sha256:")


async def test_missing_base_image_names_the_make_script(engine: Engine, docker_prefix: str) -> None:
    """A base image that is absent and cannot be pulled names deploy/make-base-images.sh."""
    with pytest.raises(EngineError) as caught:
        await engine.base_image_digest(f"berth-base/{docker_prefix}-absent:1")
    assert "deploy/make-base-images.sh" in str(caught.value)
    assert f"{docker_prefix}-absent" in str(caught.value)


async def test_build_six_imports_as_non_root(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """A built image has the locked package and runs jobs as the non-root job user."""
    assert six_image.tag == constants.image_tag(f"{docker_prefix}-six")
    assert "six==1.16.0" in six_image.log_tail
    result = await run_script(
        engine,
        six_image,
        docker_prefix,
        "import os, six\nprint(six.__version__, os.getuid(), os.getgid(), os.getcwd())\n",
    )
    assert result.exit_code == 0, result.stderr
    version, uid, gid, cwd = result.stdout.decode().split()
    assert version == "1.16.0"
    assert int(uid) != 0
    assert (uid, gid, cwd) == ("65534", "65534", "/work")


async def test_built_image_labels_and_listing(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """A built image carries berth's labels and the caller's, and is listed as berth's."""
    info = await engine.image_info(six_image.tag)
    assert info is not None
    assert info.id == six_image.image_id
    assert info.size_bytes == six_image.size_bytes > 0
    assert info.labels[constants.LABEL_MANAGED] == "true"
    assert info.labels[constants.LABEL_IMAGE_KEY] == f"{docker_prefix}-six"
    assert info.labels["berth.test"] == docker_prefix
    assert six_image.image_id in {image.id for image in await engine.list_berth_images()}


async def test_built_image_keeps_no_build_settings(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """Build-only settings (CA, index, uv) and /berth-build do not reach the image; .pyc are."""
    script = (
        "import json, os, pathlib, six\n"
        "print(json.dumps({\n"
        "  'env': sorted(k for k in os.environ if k.startswith(('UV_', 'SSL_', 'BERTH'))),\n"
        "  'build_dir': os.path.exists('/berth-build'),\n"
        "  'pyc': any(pathlib.Path(six.__file__).parent.glob('__pycache__/six*.pyc')),\n"
        "  'venv': os.environ.get('VIRTUAL_ENV'),\n"
        "}))\n"
    )
    result = await run_script(engine, six_image, docker_prefix, script)
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts == {"env": [], "build_dir": False, "pyc": True, "venv": "/opt/venv"}


async def test_build_of_unknown_package_fails_with_uv_error(
    engine: Engine, docker_prefix: str
) -> None:
    """A lock naming a package that does not exist raises BuildFailed with uv's own error."""
    image_key = f"{docker_prefix}-missing-pkg"
    with pytest.raises(BuildFailed) as caught:
        await engine.build_image(
            image_key=image_key,
            base_image=BASE_IMAGE,
            lock_text="berth-surely-not-a-package-x7q==1.0.0\n",
            labels={},
        )
    text = str(caught.value)
    assert "No solution found" in text or "not found in the package registry" in text
    assert "berth-surely-not-a-package-x7q" in caught.value.log_tail
    assert await engine.image_info(constants.image_tag(image_key)) is None


async def test_source_only_package_needs_allow_source_builds(
    engine: Engine, docker_settings: Settings, docker_prefix: str
) -> None:
    """An sdist-only package is refused by default (wheels only) and builds when allowed."""
    lock = "docopt==0.6.2\n"  # docopt publishes no wheel
    with pytest.raises(BuildFailed) as caught:
        await engine.build_image(
            image_key=f"{docker_prefix}-sdist-refused",
            base_image=BASE_IMAGE,
            lock_text=lock,
            labels={},
        )
    assert "docopt" in caught.value.log_tail
    assert "building from source is disabled" in caught.value.log_tail
    assert "BERTH_ALLOW_SOURCE_BUILDS" in str(caught.value)

    allowing = await Engine.connect(
        docker_settings.model_copy(update={"allow_source_builds": True})
    )
    try:
        built = await allowing.build_image(
            image_key=f"{docker_prefix}-sdist-allowed",
            base_image=BASE_IMAGE,
            lock_text=lock,
            labels={},
        )
    finally:
        await allowing.close()
    assert built.tag == constants.image_tag(f"{docker_prefix}-sdist-allowed")


async def test_build_past_its_timeout_fails(
    engine: Engine, docker_settings: Settings, docker_prefix: str
) -> None:
    """A build that runs past build_timeout_s is killed: BuildFailed 'timed out', no image."""
    image_key = f"{docker_prefix}-slow"
    await engine.ensure_tools()
    hasty = await Engine.connect(docker_settings.model_copy(update={"build_timeout_s": 0.05}))
    try:
        with pytest.raises(BuildFailed, match=r"timed out after 0\.05 s"):
            await hasty.build_image(
                image_key=image_key, base_image=BASE_IMAGE, lock_text="", labels={}
            )
    finally:
        await hasty.close()
    assert await engine.image_info(constants.image_tag(image_key)) is None


async def test_remove_image(engine: Engine, docker_prefix: str) -> None:
    """remove_image() is True for an image it removed and False for one that is absent."""
    built = await engine.build_image(
        image_key=f"{docker_prefix}-empty", base_image=BASE_IMAGE, lock_text="", labels={}
    )
    assert await engine.remove_image(built.tag) is True
    assert await engine.image_info(built.tag) is None
    assert await engine.remove_image(built.tag) is False


async def test_ensure_tools_concurrently_from_two_engines(
    engine: Engine, docker_settings: Settings
) -> None:
    """Concurrent ensure_tools() calls (one engine or two) agree on one filled volume."""
    volume = await engine.ensure_tools()
    assert volume.startswith("berth-tools-")
    other = await Engine.connect(docker_settings)
    try:
        names = await asyncio.gather(
            engine.ensure_tools(), other.ensure_tools(), other.ensure_tools()
        )
    finally:
        await other.close()
    assert set(names) == {volume}
    assert volume in await engine.list_berth_volumes()


# ------------------------------------------------------------------- sandboxes


async def test_stdout_and_stderr_are_separate_and_exact(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """stdout and stderr come back apart, byte for byte (binary and non-UTF-8 too)."""
    script = (
        "import os\n"
        "os.write(1, b'out-\\xff\\xfe\\x00-1\\n')\n"
        "os.write(2, b'err-\\x80-1\\n')\n"
        "os.write(1, bytes(range(256)))\n"
        "os.write(2, '\\xe9'.encode('latin-1'))\n"
    )
    result = await run_script(engine, six_image, docker_prefix, script)
    assert result.exit_code == 0
    assert result.stdout == b"out-\xff\xfe\x00-1\n" + bytes(range(256))
    assert result.stderr == b"err-\x80-1\n\xe9"
    assert not result.stdout_truncated
    assert not result.stderr_truncated


async def test_exit_code_and_env(engine: Engine, six_image: BuiltImage, docker_prefix: str) -> None:
    """The job's exit code and environment variables arrive as given."""
    result = await run_script(
        engine,
        six_image,
        docker_prefix,
        "import os, sys\nprint(os.environ['BERTH_TEST_VAR'])\nsys.exit(3)\n",
        env={"BERTH_TEST_VAR": "a b $c `d`"},
    )
    assert result.exit_code == 3
    assert result.stdout == b"a b $c `d`\n"
    assert not result.oom_killed


async def test_stdin_is_delivered(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """stdin bytes reach the job exactly; without stdin the job reads EOF at once."""
    script = "import sys\nsys.stdout.buffer.write(sys.stdin.buffer.read())\n"
    data = b"line 1\n\x00\xff binary\nlast"
    given = await run_script(engine, six_image, docker_prefix, script, stdin=data)
    assert given.stdout == data
    empty = await run_script(engine, six_image, docker_prefix, script)
    assert (empty.exit_code, empty.stdout) == (0, b"")


async def test_args_with_shell_metacharacters_arrive_verbatim(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """Arguments reach argv unchanged; nothing in them is run by a shell."""
    args = [
        "$(touch /work/pwned)",
        "`touch /work/pwned`",
        "; touch /work/pwned",
        "a b",
        "'\"",
        "*",
        "$HOME",
        "\n",
        "",
        "--",
        "\\",
        "é😀",
        "< /etc/passwd",
    ]
    script = "import json, os, sys\nprint(json.dumps([sys.argv[1:], os.path.exists('pwned')]))\n"
    for stdin in (None, b"x"):
        result = await run_script(engine, six_image, docker_prefix, script, args=args, stdin=stdin)
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout) == [args, False]


async def test_timeout_kills_and_removes_container(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """A job past its wall time is killed (timed_out) and its container is gone after."""
    result = await run_script(
        engine,
        six_image,
        docker_prefix,
        "import time\nprint('started', flush=True)\ntime.sleep(60)\n",
        limits=replace(LIMITS, timeout_s=1.0),
    )
    assert result.timed_out
    assert result.exit_code != 0
    assert result.stdout == b"started\n"
    assert await our_containers(engine, docker_prefix) == []


async def test_cancelled_run_removes_container(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """Cancelling the task running a sandbox still removes its container."""
    task = asyncio.create_task(
        run_script(engine, six_image, docker_prefix, "import time\ntime.sleep(60)\n")
    )
    await wait_until_running(engine, docker_prefix)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await our_containers(engine, docker_prefix) == []


async def test_memory_hog_is_oom_killed(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """A job that outgrows its memory limit (64 MiB, no swap) is reported oom_killed."""
    script = "hog = []\nwhile True:\n    hog.append(bytearray(8 * 1024 * 1024))\n"
    result = await run_script(
        engine, six_image, docker_prefix, script, limits=replace(LIMITS, memory_bytes=64 * MiB)
    )
    assert result.oom_killed
    assert result.exit_code == 137
    assert not result.timed_out


async def test_fork_bomb_is_contained(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """A fork bomb under a pids limit of 64 ends with the run, and the next job runs fine."""
    script = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    bomb = await run_script(
        engine, six_image, docker_prefix, script, limits=replace(LIMITS, pids=64, timeout_s=3.0)
    )
    assert bomb.timed_out
    after = await run_script(engine, six_image, docker_prefix, "print('fine')\n")
    assert (after.exit_code, after.stdout) == (0, b"fine\n")


async def test_output_flood_is_capped(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """200 MB of output keeps exactly the cap, flags truncation, counts all, stays flat."""
    script = (
        "import sys\n"
        "block = b'y\\n' * 65536\n"
        "for _ in range(1526):\n"
        "    sys.stdout.buffer.write(block)\n"
        "sys.stderr.buffer.write(b'e' * 10000)\n"
    )
    limits = replace(LIMITS, max_stdout_bytes=64 * 1024, max_stderr_bytes=1000)
    baseline_kib = reset_peak_rss()
    result = await run_script(engine, six_image, docker_prefix, script, limits=limits)
    growth_kib = peak_rss_growth_kib(baseline_kib)
    assert result.exit_code == 0
    assert result.stdout == b"y\n" * 32768
    assert result.stdout_truncated
    assert result.stderr_truncated
    assert result.stdout_total_bytes == 1526 * 131072
    assert (result.stderr, result.stderr_total_bytes) == (b"e" * 1000, 10000)
    assert growth_kib < 64 * 1024  # 200 MB went through; the worker grew by less than 64 MiB


async def test_network_is_off(engine: Engine, six_image: BuiltImage, docker_prefix: str) -> None:
    """A job without network can neither connect out nor resolve names."""
    script = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=3)\n"
        "    print('connected')\n"
        "except OSError:\n"
        "    print('blocked')\n"
        "try:\n"
        "    socket.getaddrinfo('pypi.org', 443)\n"
        "    print('resolved')\n"
        "except OSError:\n"
        "    print('no dns')\n"
    )
    result = await run_script(engine, six_image, docker_prefix, script)
    assert result.stdout.split(b"\n")[:2] == [b"blocked", b"no dns"]


async def test_root_filesystem_is_read_only(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """The root filesystem is mounted read-only; only /work and /tmp take writes."""
    script = (
        "import json\n"
        "def writable(path):\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('x')\n"
        "        return True\n"
        "    except OSError:\n"
        "        return False\n"
        "root = [l.split() for l in open('/proc/self/mounts') if l.split()[1] == '/'][0]\n"
        "print(json.dumps({\n"
        "  'root_ro': 'ro' in root[3].split(','),\n"
        "  'venv': writable('/opt/venv/x'), 'etc': writable('/etc/x'),\n"
        "  'work': writable('/work/x'), 'tmp': writable('/tmp/x'),\n"
        "}))\n"
    )
    result = await run_script(engine, six_image, docker_prefix, script)
    assert json.loads(result.stdout) == {
        "root_ro": True,
        "venv": False,
        "etc": False,
        "work": True,
        "tmp": True,
    }


async def test_capabilities_are_empty(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """The job has no capabilities (effective, permitted, bounding) and no new privileges."""
    script = (
        "import json\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "print(json.dumps({k: status[k].strip() for k in\n"
        "  ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs')}))\n"
    )
    result = await run_script(engine, six_image, docker_prefix, script)
    facts = json.loads(result.stdout)
    assert facts.pop("NoNewPrivs") == "1"
    assert set(facts.values()) == {"0000000000000000"}


async def test_collect_outputs_regular_files_with_caps(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """Outputs: regular files under out/ only, capped and flagged; symlinks not followed."""
    script = (
        "import os\n"
        "os.makedirs('out/sub')\n"
        "open('out/a.txt', 'wb').write(b'a')\n"
        "open('out/b.bin', 'wb').write(bytes(range(256)) * 4)\n"
        "open('out/sub/c.txt', 'wb').write(b'c' * 10)\n"
        "open('out/sub/' + 'n' * 200, 'wb').write(b'long name')\n"
        "os.symlink('/etc/passwd', 'out/link')\n"
        "os.mkfifo('out/fifo')\n"
        "os.symlink('/etc', 'etc_link')\n"
    )
    async with open_sandbox(engine, six_image, docker_prefix, limits=LIMITS) as box:
        await box.put_files({"main.py": script.encode()})
        result = await box.run(["python3", "main.py"])
        assert result.exit_code == 0, result.stderr
        files, truncated = await box.collect_outputs("out", max_files=10, max_bytes=10_000)
        assert files == {
            "a.txt": b"a",
            "b.bin": bytes(range(256)) * 4,
            "sub/c.txt": b"c" * 10,
            "sub/" + "n" * 200: b"long name",
        }
        assert not truncated
        few, truncated = await box.collect_outputs("out", max_files=1, max_bytes=10_000)
        assert (few, truncated) == ({"a.txt": b"a"}, True)
        small, truncated = await box.collect_outputs("out", max_files=10, max_bytes=100)
        assert (small, truncated) == ({"a.txt": b"a"}, True)
        assert await box.collect_outputs("nothing", max_files=10, max_bytes=100) == ({}, False)
        assert await box.collect_outputs("etc_link", max_files=10, max_bytes=10**6) == ({}, False)


async def test_files_in_subdirectories_belong_to_the_job_user(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """put_files creates parent directories, all owned by the job user, contents exact."""
    async with open_sandbox(engine, six_image, docker_prefix, limits=LIMITS) as box:
        await box.put_files({"data/in/x.bin": b"\x00\xff", "main.py": b"import os\n"})
        await box.put_files(
            {
                "main.py": b"import os\n"
                b"st = [os.stat(p) for p in ('data', 'data/in', 'data/in/x.bin')]\n"
                b"print([(s.st_uid, s.st_gid) for s in st], open('data/in/x.bin', 'rb').read())\n"
                b"open('data/in/new', 'w').write('ok')\n"
            }
        )
        result = await box.run(["python3", "main.py"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"[(65534, 65534), (65534, 65534), (65534, 65534)] b'\\x00\\xff'\n"
    with pytest.raises(ValueError, match="relative"):
        await box.put_files({"../escape": b""})
    with pytest.raises(ValueError, match="relative"):
        await box.put_files({"/etc/passwd": b""})


async def _tar_stream(name: str, size: int, uid: int) -> AsyncIterator[bytes]:
    """A one-file tar made on the fly: never held whole in memory."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid = size, 0o644, uid, uid
    yield info.tobuf(format=tarfile.PAX_FORMAT)
    block = hashlib.sha256(b"berth").digest() * 2048  # 64 KiB
    for _ in range(size // len(block)):
        yield block
    yield tarfile.NUL * (-size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)


async def test_archive_streams_in_and_out(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """A streamed tar lands in /work, and get_archive_stream() streams a path back out."""
    size = 16 * MiB
    expected = hashlib.sha256(hashlib.sha256(b"berth").digest() * 2048 * (size // 65536))
    async with open_sandbox(engine, six_image, docker_prefix, limits=LIMITS) as box:
        await box.put_archive_stream(_tar_stream("cache/big.bin", size, 65534))
        digest = (
            "import hashlib; print(hashlib.sha256(open('cache/big.bin','rb').read()).hexdigest())"
        )
        result = await box.run(["python3", "-c", digest])
        assert result.stdout.decode().strip() == expected.hexdigest()
        received = bytearray()
        async for chunk in box.get_archive_stream("cache"):
            received += chunk
        with pytest.raises(FileNotFoundError):
            async for _ in box.get_archive_stream("no/such/path"):
                pass
    with tarfile.open(fileobj=io.BytesIO(received), mode="r|") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}  # type: ignore[union-attr]
    assert list(members) == ["cache/big.bin"]
    assert hashlib.sha256(members["cache/big.bin"]).hexdigest() == expected.hexdigest()


# ---------------------------------------------------------------- housekeeping


async def test_image_keys_in_use_while_a_sandbox_exists(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """A created sandbox's image key is in use until the sandbox is gone."""
    image_key = f"{docker_prefix}-six"
    async with engine.sandbox(
        image=six_image.tag,
        job_id=new_job_id(docker_prefix),
        image_key=image_key,
        limits=LIMITS,
        env={},
    ):
        assert image_key in await engine.image_keys_in_use()
    assert image_key not in await engine.image_keys_in_use()


async def test_sweep_leaves_young_containers_alone(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """sweep_containers() keeps a berth container younger than the given age."""
    # Not swept with a small age here: that removes other runs' containers on a shared engine.
    async with open_sandbox(engine, six_image, docker_prefix, limits=LIMITS):
        await engine.sweep_containers(older_than_s=3600)
        assert len(await our_containers(engine, docker_prefix)) == 1


# ------------------------------------------------------------------ measuring


async def test_trivial_job_phases(
    engine: Engine, six_image: BuiltImage, docker_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A print(1) job works; its phases are printed next to `docker run` (not asserted)."""
    totals: list[float] = []
    phases: dict[str, list[float]] = {}
    for _ in range(5):
        started = time.monotonic()
        async with open_sandbox(engine, six_image, docker_prefix, limits=LIMITS) as box:
            await box.put_files({"main.py": b"print(1)\n"})
            result = await box.run(["python3", "main.py"])
            await box.collect_outputs("out", max_files=10, max_bytes=1000)
        totals.append(time.monotonic() - started)
        assert result.stdout == b"1\n"
        for phase, seconds in box.timings.items():
            phases.setdefault(phase, []).append(seconds)
    cli: list[float] = []
    if docker := shutil.which("docker"):
        for _ in range(5):
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                docker, "run", "--rm", "--network", "none", BASE_IMAGE,
                "python3", "-c", "print(1)",
                stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await process.wait()
            cli.append(time.monotonic() - started)
    with capsys.disabled():
        medians = {phase: round(statistics.median(s), 4) for phase, s in phases.items()}
        print(f"\nsandbox print(1): median {statistics.median(totals):.3f} s, phases {medians}")
        if cli:
            print(f"docker run --rm --network none: median {statistics.median(cli):.3f} s")
