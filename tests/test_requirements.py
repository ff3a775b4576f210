"""Parsing and canonicalising requirements.txt (shared.requirements)."""

from __future__ import annotations

import pytest

from shared.errors import InvalidRequirement
from shared.requirements import parse_requirements


def test_canonical_form_normalises_names_extras_specifiers_and_markers() -> None:
    """Names, extras, specifiers and markers are normalised and lines sorted."""
    text = (
        "# a comment\n"
        "\n"
        "Requests[Socks,Security] >= 2.31.0 , <3   # trailing comment\n"
        "zope.interface~=6.0\n"
        "Foo_Bar==1.0-RC1 ; python_version<'3.12'\n"
    )
    req = parse_requirements(text)
    assert req.requirements == (
        'foo-bar==1.0rc1; python_version < "3.12"',
        "requests[security,socks]<3,>=2.31.0",
        "zope-interface~=6.0",
    )
    assert req.options == ()
    assert req.canonical == "".join(f"{line}\n" for line in req.requirements)
    assert not req.pinned


def test_trailing_zeros_are_kept() -> None:
    """``==1.0`` and ``==1.0.0`` stay distinct (a spare miss, never a wrong hit)."""
    assert parse_requirements("a==1.0").canonical != parse_requirements("a==1.0.0").canonical


def test_backslash_continuation_joins_lines() -> None:
    """A line ending in a backslash continues on the next one."""
    assert parse_requirements("numpy\\\n  >=1.26\n").requirements == ("numpy>=1.26",)


def test_url_fragment_is_not_a_comment() -> None:
    """Only a ``#`` at the start or after whitespace starts a comment."""
    with pytest.raises(InvalidRequirement, match="version-control"):
        parse_requirements("git+https://example.org/x.git#egg=x")


def test_identical_lines_collapse() -> None:
    """The same requirement written twice (even spelt differently) is kept once."""
    assert parse_requirements("Six==1.16.0\nsix == 1.16.0\n").requirements == ("six==1.16.0",)


def test_same_package_twice_with_different_specs_is_rejected() -> None:
    """Two different lines for one package are refused, as pip does, naming both lines."""
    with pytest.raises(InvalidRequirement) as info:
        parse_requirements("six==1.16.0\nidna\nsix>=1\n")
    assert info.value.line_no == 3
    assert "line 1" in info.value.reason
    assert "list each package once" in info.value.reason


def test_same_package_with_different_markers_is_kept() -> None:
    """Per-Python-version pins of one package are the usual pattern and stay."""
    req = parse_requirements(
        'numpy==1.24.4; python_version < "3.9"\nnumpy==1.26.4; python_version >= "3.9"\n'
    )
    assert len(req.requirements) == 2
    assert req.pinned


def test_empty_file_is_allowed() -> None:
    """Only comments and blank lines give the empty set, which is pinned."""
    req = parse_requirements("# nothing\n\n   \n")
    assert req.canonical == ""
    assert req.requirements == ()
    assert req.pinned


@pytest.mark.parametrize(
    ("text", "pinned"),
    [
        ("six==1.16.0\nidna==3.7\n", True),
        ('six==1.16.0; python_version >= "3"', True),
        ("requests[socks]==2.31.0", True),
        ("six", False),
        ("six>=1.16", False),
        ("six==1.*", False),
        ("six===1.16.0", False),
        ("six==1.16.0,!=1.15", False),
        ("six==1.16.0\nidna", False),
    ],
)
def test_pinned(text: str, pinned: bool) -> None:
    """``pinned`` means every line is exactly ``name==version`` (markers, extras allowed)."""
    assert parse_requirements(text).pinned is pinned


def test_index_options_kept_when_allowed() -> None:
    """Allowed index options are normalised, sorted, part of the canonical text, unpinned."""
    req = parse_requirements(
        "six==1.16.0\n--extra-index-url=https://b.example/simple\n-i   https://a.example/simple\n",
        allow_index_options=True,
    )
    assert req.options == (
        "--extra-index-url https://b.example/simple",
        "--index-url https://a.example/simple",
    )
    assert req.canonical.startswith("--extra-index-url https://b.example/simple\n")
    assert not req.pinned


def test_two_index_urls_are_rejected() -> None:
    """Only one --index-url may be given."""
    with pytest.raises(InvalidRequirement, match="--extra-index-url") as info:
        parse_requirements(
            "-i https://a.example/\n-i https://b.example/\n", allow_index_options=True
        )
    assert info.value.line_no == 2


def test_index_option_must_be_a_url() -> None:
    """An index or find-links location must be an http(s) URL, not a local directory."""
    with pytest.raises(InvalidRequirement, match="http:// or https://"):
        parse_requirements("--find-links ./wheels", allow_index_options=True)


def test_text_over_the_cap_is_rejected() -> None:
    """Text over ``max_bytes`` is refused, giving the size and the cap."""
    with pytest.raises(InvalidRequirement, match="40 bytes; at most 10 bytes") as info:
        parse_requirements("six\n" * 10, max_bytes=10)
    assert info.value.line_no == 0


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("-e .", "editable installs"),
        ("--editable git+https://example.org/x.git", "editable installs"),
        ("-r other.txt", "including other files"),
        ("--requirement=other.txt", "including other files"),
        ("-c constraints.txt", "constraint files"),
        ("./local/pkg", "local paths"),
        ("/abs/pkg", "local paths"),
        ("pkg-1.0-py3-none-any.whl", "local archives"),
        ("file:///tmp/pkg", "local files"),
        ("pkg @ file:///tmp/pkg", "local files"),
        ("git+https://github.com/psf/requests.git", "version-control"),
        ("requests @ git+https://github.com/psf/requests.git", "version-control"),
        ("pkg @ https://example.org/pkg-1.0.tar.gz", "URL requirements"),
        ("https://example.org/pkg-1.0.tar.gz", "URL requirements"),
        ("six==1.16.0 --hash=sha256:abcd", "per-requirement options"),
        ("--hash=sha256:abcd", "option --hash is not allowed"),
        ("--pre", "option --pre is not allowed"),
        ("-i https://example.org/simple", "index options (-i) are disabled"),
        ("--index-url https://example.org/simple", "index options"),
        ("--extra-index-url https://example.org/simple", "index options"),
        ("-f https://example.org/wheels", "index options"),
        ("--find-links https://example.org/wheels", "index options"),
        ("--trusted-host example.org", "index options"),
        ("--no-index", "index options"),
        ("six >= = 1", "Expected"),
        ("six; python_version <", "Expected"),
    ],
)
def test_rejected_lines_name_the_line_and_what_is_allowed(line: str, what: str) -> None:
    """Each refused kind of line is reported with its line number and what is allowed."""
    with pytest.raises(InvalidRequirement) as info:
        parse_requirements(f"# header\nidna\n{line}\n")
    error = info.value
    assert error.line_no == 3
    assert error.line == line
    assert what in error.reason
    assert "name[extras]<specifiers>" in error.reason
    assert str(error).startswith("requirements line 3 ")


def test_line_number_of_a_continued_line_is_its_first_line() -> None:
    """An error in a continued line reports the number of the line it starts on."""
    with pytest.raises(InvalidRequirement) as info:
        parse_requirements("idna\n-e \\\n  .\n")
    assert info.value.line_no == 2


def test_a_commented_line_never_continues() -> None:
    """A backslash inside a comment does not swallow the next line."""
    assert parse_requirements("six # note \\\nidna\n").requirements == ("idna", "six")
