"""The hit path's shortcuts keep their promises: launch data on stdin, finish notices."""

from __future__ import annotations

import hashlib

import pytest

from shared.engine import BuiltImage, Engine, RunResult
from shared.sandbox import STDIN_FILES_MAX_BYTES
from tests.docker_fixtures import open_sandbox

pytestmark = pytest.mark.docker


DIGESTS = """\
import hashlib, os, sys
for name in sorted(sys.argv[1:]):
    data = open(name, 'rb').read()
    print(name, oct(os.stat(name).st_mode & 0o777), hashlib.sha256(data).hexdigest())
print('stdin', hashlib.sha256(sys.stdin.buffer.read()).hexdigest())
"""


async def run_with(
    engine: Engine,
    image: BuiltImage,
    prefix: str,
    files: dict[str, tuple[bytes, int]],
    stdin: bytes | None,
) -> RunResult:
    async with open_sandbox(engine, image, prefix) as box:
        await box.put_files({"main.py": DIGESTS.encode()})
        for name, (data, mode) in files.items():
            await box.put_files({name: data}, mode=mode)
        return await box.run(["python3", "main.py", *files], stdin=stdin)


def expected(files: dict[str, tuple[bytes, int]], stdin: bytes | None) -> bytes:
    lines = [
        f"{name} {oct(mode)} {hashlib.sha256(data).hexdigest()}"
        for name, (data, mode) in sorted(files.items())
    ]
    lines.append(f"stdin {hashlib.sha256(stdin or b'').hexdigest()}")
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("stdin", [None, b"", b"some\x00input\n"])
async def test_small_files_modes_and_stdin_arrive_exactly(
    engine: Engine, six_image: BuiltImage, docker_prefix: str, stdin: bytes | None
) -> None:
    """Files sent with the launch data keep their bytes, modes and directories; stdin too."""
    files = {
        "data/a.bin": (bytes(range(256)) * 10, 0o644),
        "bin/tool.sh": (b"#!/bin/sh\necho hi\n", 0o755),
        "empty": (b"", 0o600),
        "ünïcode name.txt": ("é".encode(), 0o640),
    }
    result = await run_with(engine, six_image, docker_prefix, files, stdin)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected(files, stdin)


async def test_files_past_the_launch_limit_go_as_an_archive(
    engine: Engine, six_image: BuiltImage, docker_prefix: str
) -> None:
    """Inputs bigger than STDIN_FILES_MAX_BYTES, with stdin, arrive whole all the same."""
    big = hashlib.sha256(b"berth").digest() * (STDIN_FILES_MAX_BYTES // 32 + 1000)
    files = {"big/blob.bin": (big, 0o644), "small.txt": (b"s", 0o644)}
    stdin = b"x" * 4096
    result = await run_with(engine, six_image, docker_prefix, files, stdin)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected(files, stdin)
