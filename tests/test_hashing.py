"""The invalidation matrix of the cache keys (shared.hashing, DESIGN "Keys")."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from shared.hashing import deps_hash, execution_key, image_key, script_hash
from shared.requirements import parse_requirements

DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64
LOCK = "idna==3.7\nsix==1.17.0\n"
SCRIPT = "import six\nprint(six.__version__)\n"
DEPS = "requests>=2.31,<3\nsix==1.16.0\n"


def deps(text: str) -> str:
    return deps_hash(parse_requirements(text))


def image(**changes: Any) -> str:
    fields: dict[str, Any] = {"base_digest": DIGEST, "lock_text": LOCK, "runtime": "python3.11"}
    return image_key(**(fields | changes))


def execution(**changes: Any) -> str:
    fields: dict[str, Any] = {
        "script_hash": script_hash(SCRIPT),
        "image_key": image(),
        "inputs": {"data.csv": b"a,b\n1,2\n", "cfg.json": b"{}"},
        "args": ["--verbose", "x"],
        "stdin": b"hello",
        "env": {"MODE": "fast"},
    }
    return execution_key(**(fields | changes))


def test_script_hash_is_sha256_of_the_bytes() -> None:
    """script_hash is the plain sha256 of the UTF-8 bytes; str and bytes agree."""
    assert script_hash(SCRIPT) == hashlib.sha256(SCRIPT.encode()).hexdigest()
    assert script_hash(SCRIPT.encode()) == script_hash(SCRIPT)


def test_script_one_character_change() -> None:
    """Changing one character changes script_hash."""
    assert script_hash(SCRIPT.replace("six", "sax", 1)) != script_hash(SCRIPT)


def test_script_whitespace_change() -> None:
    """A whitespace-only change changes script_hash (no normalisation)."""
    assert script_hash(SCRIPT.replace("\n", " \n", 1)) != script_hash(SCRIPT)


def test_script_comment_change() -> None:
    """Adding or editing a comment changes script_hash."""
    assert script_hash("# note\n" + SCRIPT) != script_hash(SCRIPT)


def test_deps_version_bump() -> None:
    """Bumping a version changes deps_hash."""
    assert deps(DEPS.replace("1.16.0", "1.17.0")) != deps(DEPS)


def test_deps_add_and_remove() -> None:
    """Adding or removing a requirement changes deps_hash."""
    assert deps(DEPS + "idna\n") != deps(DEPS)
    assert deps("six==1.16.0\n") != deps(DEPS)


def test_deps_reorder_does_not_change() -> None:
    """Reordering lines keeps deps_hash (documented decision)."""
    assert deps("six==1.16.0\nrequests>=2.31,<3\n") == deps(DEPS)


def test_deps_recasing_and_separators_do_not_change() -> None:
    """Re-casing a name or writing ``_`` for ``-`` keeps deps_hash (PEP 503 names)."""
    assert deps("Requests>=2.31,<3\nSIX==1.16.0\n") == deps(DEPS)
    assert deps("typing_extensions>=4") == deps("typing-extensions>=4")


def test_deps_comments_blank_lines_and_spacing_do_not_change() -> None:
    """Comments, blank lines and spacing inside a specifier keep deps_hash."""
    assert deps("# pinned\n\nrequests >= 2.31 , < 3  # http\nsix == 1.16.0\n") == deps(DEPS)


def test_deps_marker_change() -> None:
    """Adding or changing a marker changes deps_hash."""
    with_marker = deps('requests>=2.31,<3\nsix==1.16.0; python_version >= "3.8"\n')
    assert with_marker != deps(DEPS)
    assert with_marker != deps('requests>=2.31,<3\nsix==1.16.0; python_version >= "3.9"\n')


def test_deps_extra_change() -> None:
    """Adding an extra changes deps_hash."""
    assert deps(DEPS.replace("requests", "requests[socks]")) != deps(DEPS)


def test_deps_index_option_change() -> None:
    """An allowed index option line is part of deps_hash."""
    with_index = parse_requirements(
        DEPS + "--extra-index-url https://x.example/\n", allow_index_options=True
    )
    assert deps_hash(with_index) != deps(DEPS)


def test_deps_revert_gives_the_original_hash() -> None:
    """Reverting a change gives the original deps_hash again."""
    original = deps(DEPS)
    assert deps(DEPS.replace("1.16.0", "1.17.0")) != original
    assert deps(DEPS) == original


def test_image_runtime_change() -> None:
    """Another runtime gives another image_key."""
    assert image(runtime="python3.12") != image()


def test_image_base_digest_change() -> None:
    """A rebuilt base image (new digest) gives another image_key."""
    assert image(base_digest=OTHER_DIGEST) != image()


def test_image_lock_change() -> None:
    """Another lock gives another image_key."""
    assert image(lock_text=LOCK.replace("3.7", "3.8")) != image()


def test_image_recipe_version_change() -> None:
    """Another build recipe version gives another image_key."""
    assert image(recipe_version=999) != image()


def test_image_revert_gives_the_original_key() -> None:
    """Reverting a lock change gives the original image_key again."""
    assert image(lock_text=LOCK) == image()


def test_image_key_requires_a_digest() -> None:
    """A tag in place of a digest is refused; a repository digest is accepted."""
    with pytest.raises(ValueError, match="sha256"):
        image(base_digest="python:3.11-slim")
    assert image(base_digest="python@" + DIGEST) != image()


def test_execution_input_content_change() -> None:
    """Changing an input file's content changes execution_key."""
    assert execution(inputs={"data.csv": b"a,b\n1,3\n", "cfg.json": b"{}"}) != execution()


def test_execution_input_name_change() -> None:
    """Renaming an input file changes execution_key."""
    assert execution(inputs={"data2.csv": b"a,b\n1,2\n", "cfg.json": b"{}"}) != execution()


def test_execution_input_order_does_not_change() -> None:
    """Inputs are taken by sorted name: the mapping's order does not matter."""
    assert execution(inputs={"cfg.json": b"{}", "data.csv": b"a,b\n1,2\n"}) == execution()


def test_execution_args_change() -> None:
    """Changing, reordering or re-splitting args changes execution_key."""
    assert execution(args=["--verbose", "y"]) != execution()
    assert execution(args=["x", "--verbose"]) != execution()
    assert execution(args=["--verbosex"]) != execution(args=["--verbose", "x"])


def test_execution_stdin_change() -> None:
    """Changing stdin changes execution_key; no stdin and empty stdin differ."""
    assert execution(stdin=b"hello!") != execution()
    assert execution(stdin=None) != execution(stdin=b"")


def test_execution_env_change() -> None:
    """Changing the environment changes execution_key."""
    assert execution(env={"MODE": "slow"}) != execution()


def test_execution_script_and_image_change() -> None:
    """Another script or image changes execution_key."""
    assert execution(script_hash=script_hash(SCRIPT + "\n")) != execution()
    assert execution(image_key=image(runtime="python3.12")) != execution()


def test_execution_revert_gives_the_original_key() -> None:
    """Reverting a change gives the original execution_key again."""
    original = execution()
    assert execution(stdin=b"other") != original
    assert execution(stdin=b"hello") == original


def test_fields_are_not_concatenated() -> None:
    """Moving characters between fields changes the key ("ab"+"c" is not "a"+"bc")."""
    assert execution(env={"ab": "c"}) != execution(env={"a": "bc"})
    assert execution(inputs={"ab": b"c"}) != execution(inputs={"a": b"bc"})


def test_key_kinds_never_collide() -> None:
    """Keys are 64 hex digits and an image key differs from the script hash of the same lock."""
    key = image()
    assert len(key) == 64
    assert int(key, 16) >= 0
    assert key != script_hash(LOCK)
