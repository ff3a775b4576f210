"""Near builds: which image on this engine a new dependency set should start from.

A build from scratch installs every package of the lock. A near build starts from
an image this engine already has and installs only the difference; the engine syncs
the parent's venv to exactly the lock (``uv pip compile`` + ``uv pip sync``), so the
result is the same as from scratch whichever parent is picked. The pick only decides
how much work is left:

- same runtime, base image digest and build recipe, and the same deployment labels
  (``settings.extra_labels``), read from the labels berth puts on what it builds;
- every pinned package of the parent is in the new lock (nothing to uninstall, no
  dead layers: the parent's files all stay in use);
- the most pins shared, then the newest. No shared pin, no parent.

Locks with option lines (``--index-url`` …) never take part: the sync would not see them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from shared.constants import LABEL_IMAGE_KEY
from shared.engine import ImageInfo

LABEL_BASE_DIGEST = "berth.base_digest"
LABEL_RECIPE = "berth.recipe_version"
LABEL_RUNTIME = "berth.runtime"
LABEL_PINS = "berth.pins"  # the lock's "name==version" pins, space-separated, sorted


def lock_pins(lock_text: str) -> frozenset[str] | None:
    """The lock's pins as ``name==version`` (extras and markers dropped).

    None when the lock cannot take part: an option line, or a line that is not a pin.
    """
    pins: set[str] = set()
    for raw in lock_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            return None
        try:
            req = Requirement(line)
        except InvalidRequirement:
            return None
        specs = list(req.specifier)
        if req.url or len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            return None
        pins.add(f"{canonicalize_name(req.name)}=={specs[0].version}")
    return frozenset(pins)


def image_labels(
    *, runtime: str, base_digest: str, recipe_version: int, lock_text: str
) -> dict[str, str]:
    """The labels a built image carries so that later builds can start from it."""
    labels = {
        LABEL_RUNTIME: runtime,
        LABEL_BASE_DIGEST: base_digest,
        LABEL_RECIPE: str(recipe_version),
    }
    pins = lock_pins(lock_text)
    if pins is not None:
        labels[LABEL_PINS] = " ".join(sorted(pins))
    return labels


def closest_parent(
    images: Iterable[ImageInfo],
    *,
    runtime: str,
    base_digest: str,
    recipe_version: int,
    lock_text: str,
    required_labels: Mapping[str, str],
    exclude_key: str,
) -> tuple[ImageInfo, int] | None:
    """The image to start a build of ``lock_text`` from, with the number of shared pins."""
    wanted = lock_pins(lock_text)
    if not wanted:
        return None
    best: tuple[int, float, ImageInfo] | None = None
    for image in images:
        labels = image.labels
        if (
            labels.get(LABEL_RUNTIME) != runtime
            or labels.get(LABEL_BASE_DIGEST) != base_digest
            or labels.get(LABEL_RECIPE) != str(recipe_version)
            or labels.get(LABEL_IMAGE_KEY) in (None, exclude_key)
            or LABEL_PINS not in labels
            or any(labels.get(k) != v for k, v in required_labels.items())
        ):
            continue
        pins = frozenset(labels[LABEL_PINS].split())
        if not pins or not pins <= wanted:
            continue
        rank = (len(pins), image.created.timestamp(), image)
        if best is None or rank[:2] > best[:2]:
            best = rank
    return None if best is None else (best[2], best[0])
