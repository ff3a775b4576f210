"""The cache keys of DESIGN "Keys": what makes a cached image or result reusable.

Content hashes (``script_hash``, ``deps_hash``, ``lock_hash``) are the plain sha256 of
the content, as DESIGN states, so they can be checked with ``sha256sum``. Derived keys
(``image_key``, ``execution_key``) hash a JSON document that starts with a domain tag
(``berth/image/v1``): fields are unambiguous (no ``"ab" + "c" == "a" + "bc"``) and a key
of one kind can never equal a key of another. Bump the tag's version when a key's
fields change, so old entries are simply never hit again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from shared.constants import BUILD_RECIPE_VERSION
from shared.requirements import RequirementSet

IMAGE_KEY_TAG = "berth/image/v1"
EXECUTION_KEY_TAG = "berth/execution/v1"
HEX_DIGITS = frozenset("0123456789abcdef")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def script_hash(script: bytes | str) -> str:
    """sha256 of the script's bytes (UTF-8 for text); whitespace and comments count."""
    return sha256_hex(script.encode("utf-8") if isinstance(script, str) else script)


def deps_hash(req: RequirementSet) -> str:
    """sha256 of the canonical requirements text (see ``shared.requirements``)."""
    return sha256_hex(req.canonical.encode("utf-8"))


def lock_hash(lock_text: str) -> str:
    """sha256 of a lock's text, as returned by ``shared.locks.resolve_lock``."""
    return sha256_hex(lock_text.encode("utf-8"))


def image_key(
    *, base_digest: str, lock_text: str, runtime: str, recipe_version: int = BUILD_RECIPE_VERSION
) -> str:
    """Key of the image holding ``lock_text`` installed on the base image ``base_digest``.

    ``base_digest`` must be a digest (``sha256:<64 hex>``, or ``repo@sha256:…``), never a
    tag: a rebuilt ``python:3.11`` must give a new key.
    """
    if not _is_digest(base_digest):
        raise ValueError(f"base_digest must look like sha256:<64 hex digits>, not {base_digest!r}")
    return _tagged_hash(
        IMAGE_KEY_TAG,
        {
            "base_digest": base_digest,
            "lock_sha256": lock_hash(lock_text),
            "recipe_version": recipe_version,
            "runtime": runtime,
        },
    )


def execution_key(
    *,
    script_hash: str,
    image_key: str,
    inputs: Mapping[str, bytes],
    args: Sequence[str],
    stdin: bytes | None,
    env: Mapping[str, str],
) -> str:
    """Key of a run's result: same script, image, inputs, args, stdin and env, same key.

    Input files are hashed one by one and listed by name; ``stdin=None`` and
    ``stdin=b""`` are different keys.
    """
    return _tagged_hash(
        EXECUTION_KEY_TAG,
        {
            "args": list(args),
            "env": dict(sorted(env.items())),
            "image_key": image_key,
            "inputs": [[name, sha256_hex(data)] for name, data in sorted(inputs.items())],
            "script_hash": script_hash,
            "stdin_sha256": None if stdin is None else sha256_hex(stdin),
        },
    )


def _is_digest(value: str) -> bool:
    """``sha256:<64 lowercase hex>``, optionally after ``repository@``."""
    prefix, sep, digest = value.rpartition("sha256:")
    return (
        bool(sep)
        and (not prefix or prefix.endswith("@"))
        and len(digest) == 64
        and set(digest) <= HEX_DIGITS
    )


def _tagged_hash(tag: str, fields: Mapping[str, object]) -> str:
    """sha256 of ``[tag, fields]`` as canonical JSON (sorted keys, ASCII, no spaces)."""
    document = json.dumps([tag, fields], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return sha256_hex(document.encode("ascii"))
