"""The baselines berth is measured against: plain ``docker run`` and a naive pip build.

The naive build is what most script runners do: a Dockerfile on the same base
image that makes a venv and runs ``pip install --no-cache-dir -r requirements.txt``
(the proxy's CA handed to pip), built with ``--no-cache`` so Docker's layer cache
does not fake it. Built with the docker CLI's default builder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.harness import BASE_IMAGE, BENCH_LABEL, CA_BUNDLE, CommandResult, run_command

NAIVE_DOCKERFILE = f"""\
FROM {BASE_IMAGE}
COPY ca.pem /etc/berth-bench-ca.pem
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \\
 && /opt/venv/bin/pip install --no-cache-dir --cert /etc/berth-bench-ca.pem \\
      -r /tmp/requirements.txt
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
"""

# Only the venv (pip's own install into it): what the naive recipe pays before pip runs.
VENV_ONLY_DOCKERFILE = f"""\
FROM {BASE_IMAGE}
RUN python3 -m venv /opt/venv
"""


async def docker_run(
    image: str, command: Sequence[str], *, env_dir: str | None = None
) -> CommandResult:
    """``docker run --rm --network none IMAGE COMMAND``; raises if it fails.

    ``env_dir``: the image's environment in berth's store, mounted as berth mounts it
    (read-only at /opt/venv): the same container a berth job gets.
    """
    mount = ["--mount", f"type=bind,src={env_dir},dst=/opt/venv,readonly"] if env_dir else []
    done = await run_command(
        ["docker", "run", "--rm", "--network", "none", *mount, image, *command]
    )
    if done.returncode != 0:
        raise RuntimeError(f"docker run failed: {done.stderr.decode(errors='replace')[-500:]}")
    return done


async def naive_build(requirements: Sequence[str], *, run_id: str, tag: str) -> float:
    """Seconds for ``docker build --no-cache`` of the naive recipe; the image is removed."""
    return await _build(NAIVE_DOCKERFILE, "".join(f"{r}\n" for r in requirements), run_id, tag)


async def venv_only_build(*, run_id: str, tag: str) -> float:
    return await _build(VENV_ONLY_DOCKERFILE, "", run_id, tag)


async def _build(dockerfile: str, requirements: str, run_id: str, tag: str) -> float:
    context = Path(tempfile.mkdtemp(prefix="berth-bench-naive-"))
    try:
        (context / "Dockerfile").write_text(dockerfile)
        (context / "requirements.txt").write_text(requirements)
        if CA_BUNDLE.exists():
            shutil.copyfile(CA_BUNDLE, context / "ca.pem")
        else:
            (context / "ca.pem").write_text("")
        label = f"{BENCH_LABEL}={run_id}"
        done = await run_command(
            [
                "docker",
                "build",
                "--no-cache",
                "--rm",
                "--label",
                label,
                "-t",
                tag,
                "-q",
                str(context),
            ]
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"naive build failed: {done.stderr.decode(errors='replace')[-1500:]}"
            )
        await run_command(["docker", "rmi", "-f", tag])
        return done.seconds
    finally:
        shutil.rmtree(context, ignore_errors=True)
