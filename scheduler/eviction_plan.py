"""The eviction policy, apart from any engine: which images a sweep removes, in order.

Images unused since ``unused_before`` go first; then, while the total is over the
budget, the least recently used, down to 90 % of it (the headroom keeps the next
sweep from evicting again at once). Images without a ready record count as older
than any tracked one. Protected keys (in use, being built) never go.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

TARGET_RATIO = 0.9  # an over-budget engine is brought down to 90 % of its budget

Reason = Literal["unused", "over budget"]


@dataclass(frozen=True)
class Candidate:
    """One berth image on the engine, with what eviction decides on."""

    image_id: str
    image_key: str
    tags: tuple[str, ...]
    size_bytes: int
    last_used_at: datetime
    tracked: bool  # a ready record points at it: otherwise it goes first


@dataclass(frozen=True)
class Removal:
    image_key: str
    image_id: str
    size_bytes: int
    reason: Reason


def plan_eviction(
    candidates: list[Candidate],
    *,
    budget_bytes: int,
    unused_before: datetime,
    protected: set[str],
) -> list[Removal]:
    """Which images to remove, oldest first: unused ones, then LRU down to 90 % of budget."""
    order = sorted(candidates, key=lambda c: (c.tracked, c.last_used_at))
    removable = [c for c in order if c.image_key not in protected]
    total = sum(c.size_bytes for c in candidates)
    plan: list[Removal] = []
    for c in removable:
        if c.last_used_at < unused_before:
            plan.append(Removal(c.image_key, c.image_id, c.size_bytes, "unused"))
            total -= c.size_bytes
    if total > budget_bytes:
        target = int(budget_bytes * TARGET_RATIO)
        chosen = {r.image_id for r in plan}
        for c in removable:
            if total <= target:
                break
            if c.image_id not in chosen:
                plan.append(Removal(c.image_key, c.image_id, c.size_bytes, "over budget"))
                total -= c.size_bytes
    return plan
