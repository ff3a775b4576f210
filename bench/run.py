"""Run the benchmark: ``python -m bench.run`` (``bash bench/run.sh`` sets the machine up first).

Results go to ``bench/results/<date>-<run id>.json`` (every sample) and, as a table,
into the ``current`` section of docs/benchmarks.md (``--section before`` for a
baseline taken from another code tree: ``--root``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES = ("hit", "throughput", "lookup", "builds", "stampede")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    p.add_argument("--root", type=Path, default=HERE.parent, help="code tree to measure")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each heavy case")
    p.add_argument("--hit-runs", type=int, default=50, help="hit path samples")
    p.add_argument("--lookups", type=int, default=2000, help="samples per lookup kind")
    p.add_argument("--throughput-jobs", type=int, default=100)
    p.add_argument("--stampede-jobs", type=int, default=20)
    p.add_argument("--no-empty-cache", action="store_true", help="skip empty uv cache builds")
    p.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    p.add_argument("--section", default="current", help="docs/benchmarks.md section to write")
    p.add_argument("--no-docs", action="store_true", help="write the JSON only")
    return p.parse_args(argv)


def machine(root: Path) -> dict[str, Any]:
    def out(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "?"

    dirty = out("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no")
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    uv_bin = out(sys.executable, "-c", "import uv; print(uv.find_uv_bin())")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "memory_gib": round(pages / 2**30),
        "platform": platform.platform(),
        "docker": out("docker", "version", "--format", "{{.Server.Version}}"),
        "uv": out(uv_bin, "--version").removeprefix("uv "),
        "git": (out("git", "-C", str(root), "rev-parse", "--short", "HEAD") or "no git")
        + ("+changes" if dirty else ""),
        "load_avg_start": os.getloadavg(),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = args.root.resolve()
    # Import berth from the tree being measured, not from wherever the venv points.
    sys.path.insert(0, str(root))
    from bench import cases as bc
    from bench.harness import BenchEnv
    from shared.logs import configure_logging

    wanted = set(args.cases.split(","))
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    results_dir = HERE / "results" / stamp
    env = await BenchEnv.open(root, results_dir)
    print(f"[bench] run {env.run_id}: results in {results_dir}", file=sys.stderr)
    log_stream = (results_dir / "bench.log").open("a")
    configure_logging(env.settings(), stream=log_stream)
    results: dict[str, Any] = {
        "run_id": env.run_id,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(root),
        "cases": {},
    }
    out = results["cases"]
    bench = bc.Bench(env)

    def step(name: str) -> None:
        print(f"[bench] {name} ({time.monotonic() - started:.0f} s)", file=sys.stderr)

    try:
        await bench.open()
        worker = env.worker("main")
        await worker.start()
        await asyncio.sleep(1.0)
        memory = {"at_rest_bytes": worker.rss_bytes()}
        step("case 1: hit path")
        hit = await bc.hit_path(bench, args.hit_runs if "hit" in wanted else 3)
        memory["after_hit_path_bytes"] = worker.rss_bytes()
        if "hit" in wanted:
            out["hit_path"] = hit
        if "throughput" in wanted:
            step("case 6: throughput")
            out["throughput"] = await bc.throughput(
                bench, hit["image"], args.throughput_jobs, 4, env_dir=hit["env_dir"]
            )
            memory["after_throughput_bytes"] = worker.rss_bytes()
            step("case 7: memory")
            out["memory"] = memory
        if "lookup" in wanted:
            step("case 4: lookups")
            out["lookups"] = await bc.lookups(bench, hit["image_key"], args.lookups)
        if "builds" in wanted:
            step("cases 2 and 3: cold and near builds")
            out["builds"] = await bc.builds(
                bench, args.repeats, empty_cache=not args.no_empty_cache
            )
        await worker.stop()
        if "stampede" in wanted:
            step("case 5: stampede")
            p50 = hit["berth_s"]["p50"]
            rate = out.get("throughput", {}).get("docker_run_jobs_per_s")
            out["stampede"] = await bc.stampede(bench, args.stampede_jobs, p50, rate)
    finally:
        await bench.close()
        step("cleaning up")
        results["cleanup"] = await env.close()
        log_stream.close()
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["machine"]["load_avg_end"] = os.getloadavg()
    (HERE / "results" / f"{stamp}-{env.run_id}.json").write_text(json.dumps(results, indent=2))
    if not args.no_docs:
        from bench.report import render, write_section

        write_section(HERE.parent / "docs" / "benchmarks.md", args.section, render(results))
    return results


if __name__ == "__main__":
    options = parse_args()
    done = asyncio.run(main(options))
    from bench.report import render

    print(render(done))
