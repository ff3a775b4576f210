"""Results as a markdown table, written into a marked section of docs/benchmarks.md."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGETS = {
    "hit_p50": 1.15,
    "cold": 0.35,
    "near": 0.20,
    "hot_lookup_us": 1000.0,
    "postgres_lookup_us": 5000.0,
    "throughput": 0.8,
}


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f} s"


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


def _at_most(value: float | None, target: float) -> bool | None:
    return None if value is None else value <= target


def render(results: dict[str, Any]) -> str:
    """The section's markdown: a header line, the table, the hit path's phases."""
    meta = results["machine"]
    cases = results["cases"]
    lines = [
        f"Run `{results['run_id']}` on {meta['date']} — {meta['cores']} cores, "
        f"{meta['memory_gib']} GiB, Docker {meta['docker']}, uv {meta['uv']}, "
        f"code `{meta['git']}`; heavy cases × {results['options']['repeats']}, "
        f"hit path × {results['options']['hit_runs']}; wall time {results['wall_s']:.0f} s.",
        "",
        "| # | case | berth | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    row = lines.append

    def table(*cells: object) -> None:
        row("| " + " | ".join(str(c) for c in cells) + " |")

    if hit := cases.get("hit_path"):
        b, r = hit["berth_s"], hit["docker_run_s"]
        mount = " --mount type=bind,src=ENV,dst=/opt/venv,readonly" if hit.get("env_dir") else ""
        base = f"`docker run --rm --network none{mount} IMAGE python -c 'print(1)'`"
        table(
            1,
            "hit path p50, submit → result of print(1)",
            _s(b["p50"]),
            f"{_s(r['p50'])} ({base})",
            hit["ratio_p50"],
            "≤ 1.15",
            _mark(_at_most(hit["ratio_p50"], TARGETS["hit_p50"])),
        )
        table(1, "hit path p95", _s(b["p95"]), _s(r["p95"]), hit["ratio_p95"], "–", "–")
    if build := cases.get("builds"):
        naive_cold = build["naive_cold_s"]["p50"]
        naive_near = build["naive_near_s"]["p50"]
        table(
            2,
            "cold build, warm per-host uv cache: first job of numpy+pandas+requests",
            f"{_s(build['berth_cold_warm_cache_s']['p50'])} (build "
            f"{_s(build['berth_cold_warm_cache_build_s']['p50'])})",
            f"{_s(naive_cold)} (naive pip build)",
            build["ratio_cold_warm_cache"],
            "≤ 0.35",
            _mark(_at_most(build["ratio_cold_warm_cache"], TARGETS["cold"])),
        )
        if "berth_cold_empty_cache_s" in build:
            table(
                2,
                "cold build, empty uv cache volume",
                f"{_s(build['berth_cold_empty_cache_s']['p50'])} (build "
                f"{_s(build['berth_cold_empty_cache_build_s']['p50'])})",
                _s(naive_cold),
                build["ratio_cold_empty_cache"],
                "(reported)",
                "–",
            )
        table(
            3,
            f"near build: the same set + {build['near_extra']}, right after case 2",
            f"{_s(build['berth_near_s']['p50'])} (build {_s(build['berth_near_build_s']['p50'])})",
            f"{_s(naive_near)} (naive pip build)",
            build["ratio_near"],
            "≤ 0.20",
            _mark(_at_most(build["ratio_near"], TARGETS["near"])),
        )
    if look := cases.get("lookups"):
        hot, pg = look["get_image_redis_us"], look["get_image_postgres_us"]
        rh, rp = look["resolver_redis_us"], look["resolver_postgres_us"]
        table(
            4,
            "hot-cache lookup (`Cache.get_image`, Redis) p50 / p99",
            f"{hot['p50']:.0f} / {hot['p99']:.0f} µs",
            "–",
            "–",
            "p50 ≤ 1000 µs",
            _mark(_at_most(hot["p50"], TARGETS["hot_lookup_us"])),
        )
        table(
            4,
            "Postgres fallback (`Cache.get_image`, Redis miss) p50 / p99",
            f"{pg['p50']:.0f} / {pg['p99']:.0f} µs",
            "–",
            "–",
            "p50 ≤ 5000 µs",
            _mark(_at_most(pg["p50"], TARGETS["postgres_lookup_us"])),
        )
        table(
            4,
            "whole resolver lookup (keys + image), Redis / Postgres p50",
            f"{rh['p50']:.0f} / {rp['p50']:.0f} µs",
            "–",
            "–",
            "(reported)",
            "–",
        )
    if st := cases.get("stampede"):
        table(
            5,
            f"stampede: {st['jobs']} jobs of one new set at once "
            f"({st['workers']} workers × {st['concurrency_per_worker']}): builds",
            st["builds"],
            "–",
            "–",
            "exactly 1",
            _mark(st["builds"] == 1),
        )
        table(
            5,
            "stampede: last job's latency vs one build + one run",
            _s(st["last_job_s"]),
            f"{_s(st['one_build_plus_one_run_s'])} (build {_s(st['build_s'])} + hit p50)",
            st["ratio_last_vs_build_plus_run"],
            "(reported)",
            "–",
        )
        if st.get("one_build_plus_docker_runs_s"):
            table(
                5,
                f"stampede: last job vs one build + {st['jobs']} docker runs, 4 at a time",
                _s(st["last_job_s"]),
                _s(st["one_build_plus_docker_runs_s"]),
                st["ratio_last_vs_build_plus_docker_runs"],
                "(reported)",
                "–",
            )
    if tp := cases.get("throughput"):
        table(
            6,
            f"throughput: {tp['jobs']} print(1) jobs, 1 worker at concurrency {tp['parallel']}",
            f"{tp['berth_jobs_per_s']:.2f} jobs/s",
            f"{tp['docker_run_jobs_per_s']:.2f} jobs/s (docker run, {tp['parallel']} at a time)",
            tp["ratio"],
            "≥ 0.8",
            _mark(None if tp["ratio"] is None else tp["ratio"] >= 0.8),
        )
    if mem := cases.get("memory"):
        mib: Callable[[int], str] = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
        table(
            7,
            "worker RSS: at rest / after case 1 / after case 6",
            f"{mib(mem['at_rest_bytes'])} / {mib(mem['after_hit_path_bytes'])} / "
            f"{mib(mem['after_throughput_bytes'])}",
            "–",
            "–",
            "(reported)",
            "–",
        )
    if (build := cases.get("builds")) and build.get("build_phases_cold_warm_cache_s"):
        lines.append("")
        for label, key in (
            ("cold, warm uv cache", "build_phases_cold_warm_cache_s"),
            ("cold, empty uv cache", "build_phases_cold_empty_cache_s"),
            ("near", "build_phases_near_s"),
        ):
            if build.get(key):
                steps = ", ".join(f"{k} {v:.2f} s" for k, v in build[key].items())
                lines.append(f"Build steps ({label}), medians: {steps}.  ")
    if hit := cases.get("hit_path"):
        phases = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in hit["worker_phases_s"].items())
        lines += [
            "",
            f"Hit path, worker-side phases (medians): {phases}; outside the worker "
            f"(queue pick-up, result polling) p50 {hit['outside_worker_s']['p50'] * 1000:.0f} ms.",
        ]
    return "\n".join(lines) + "\n"


def write_section(doc: Path, section: str, body: str) -> None:
    """Replace the text between ``<!-- bench:SECTION:begin/end -->`` (appended if absent)."""
    begin, end = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + f"\n\n## Results: {section}\n\n{block}\n"
    doc.write_text(text)
