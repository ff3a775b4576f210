"""Parse a requirements.txt into the canonical text that ``deps_hash`` is taken of.

Only packages from the package index are accepted: ``name[extras]<specifiers>; marker``.
Requirement syntax is parsed by ``packaging``; this module only deals with the file
format around it (comments, continuations, option lines).

Canonical form, one line per entry, options first, then requirements, each sorted:

- names are PEP 503 normalised (``Foo_Bar`` -> ``foo-bar``), extras too, and sorted;
- specifiers are sorted by their text (``>=1.0,<2`` -> ``<2,>=1.0``); each version is
  put in PEP 440 normal form (``1.0-RC1`` -> ``1.0rc1``) but trailing zeros are kept, so
  ``==1.0`` and ``==1.0.0`` stay distinct: equal for ``==`` yet not for ``~=`` or
  wildcards, and a spare cache miss is cheaper than a wrong hit;
- markers are written as ``str(Marker)`` (quoting and spacing normalised);
- index option lines (only when allowed) are written ``--long-option value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement as PackagingInvalidRequirement
from packaging.requirements import Requirement
from packaging.specifiers import Specifier
from packaging.utils import canonicalize_name
from packaging.version import Version

from shared.errors import InvalidRequirement

ALLOWED = "list packages from the index as name[extras]<specifiers>, e.g. requests[socks]>=2.31,<3"
INDEX_OPTIONS = {
    "-i": "--index-url",
    "--index-url": "--index-url",
    "--extra-index-url": "--extra-index-url",
    "-f": "--find-links",
    "--find-links": "--find-links",
    "--trusted-host": "--trusted-host",
    "--no-index": "--no-index",
}
REFUSED_OPTIONS = {
    "-e": "editable installs (-e/--editable) are not allowed",
    "--editable": "editable installs (-e/--editable) are not allowed",
    "-r": "including other files (-r/--requirement) is not allowed; put every line in this file",
    "--requirement": "including other files (-r/--requirement) is not allowed; "
    "put every line in this file",
    "-c": "constraint files (-c/--constraint) are not allowed; "
    "put version limits on the requirement lines",
    "--constraint": "constraint files (-c/--constraint) are not allowed; "
    "put version limits on the requirement lines",
}
VCS_PREFIXES = ("git+", "hg+", "svn+", "bzr+")
ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz")


@dataclass(frozen=True)
class RequirementSet:
    """A parsed, canonical requirements file; ``canonical`` is what gets hashed."""

    requirements: tuple[str, ...]
    options: tuple[str, ...]
    canonical: str
    pinned: bool


def parse_requirements(
    text: str, *, allow_index_options: bool = False, max_bytes: int | None = None
) -> RequirementSet:
    """Parse ``text`` (a requirements.txt) or raise ``InvalidRequirement``.

    Identical lines collapse. Two different lines for the same package with the same
    marker are rejected, as pip rejects them ("Double requirement given"); say it once,
    combining specifiers or extras on one line. Lines for one package with different
    markers are kept: they are the usual way to pin per Python version.
    """
    size_bytes = len(text.encode("utf-8", "surrogatepass"))
    if max_bytes is not None and size_bytes > max_bytes:
        raise InvalidRequirement(
            0,
            "",
            f"the file is {size_bytes} bytes; at most {max_bytes} bytes are allowed "
            "(BERTH_MAX_REQUIREMENTS_BYTES)",
        )
    options: dict[str, int] = {}
    requirements: dict[str, Requirement] = {}
    by_package: dict[tuple[str, str], tuple[int, str]] = {}
    for line_no, line in _logical_lines(text):
        content = _strip_comment(line).strip()
        if not content:
            continue
        if content.startswith("-"):
            option = _parse_option(line_no, line, content, allow_index_options)
            if option.startswith("--index-url "):
                for seen, seen_line in options.items():
                    if seen.startswith("--index-url ") and seen != option:
                        raise InvalidRequirement(
                            line_no,
                            line,
                            f"--index-url is already set on line {seen_line}; only one "
                            "--index-url is allowed (add more with --extra-index-url)",
                        )
            options.setdefault(option, line_no)
            continue
        req = _parse_requirement(line_no, line, content)
        canonical = _canonical_requirement(req)
        package = (canonicalize_name(req.name), str(req.marker) if req.marker else "")
        seen_line, seen = by_package.setdefault(package, (line_no, canonical))
        if seen != canonical:
            raise InvalidRequirement(
                line_no,
                line,
                f"{package[0]} is already required on line {seen_line} as {seen!r}; list each "
                "package once, combining specifiers and extras, e.g. name[a,b]>=1,<2",
            )
        requirements.setdefault(canonical, req)
    option_lines = tuple(sorted(options))
    requirement_lines = tuple(sorted(requirements))
    lines = option_lines + requirement_lines
    return RequirementSet(
        requirements=requirement_lines,
        options=option_lines,
        canonical="".join(f"{entry}\n" for entry in lines),
        pinned=not option_lines and all(map(_is_pin, requirements.values())),
    )


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations; each line keeps the number of its first physical line."""
    result: list[tuple[int, str]] = []
    pending: list[str] = []
    first_no = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not pending:
            first_no = line_no
        # A line with a comment never continues: pip would join the next line into the
        # comment and silently drop it.
        if line.endswith("\\") and _strip_comment(line) == line:
            pending.append(line[:-1])
            continue
        pending.append(line)
        result.append((first_no, "".join(pending)))
        pending = []
    if pending:
        result.append((first_no, "".join(pending)))
    return result


def _strip_comment(line: str) -> str:
    """Drop a ``#`` comment: at the start of the line or after whitespace (not ``url#frag``)."""
    for index, char in enumerate(line):
        if char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def _parse_option(line_no: int, line: str, content: str, allow_index: bool) -> str:
    """Return the normalised option line, or raise for any option berth does not take."""
    if content.startswith("--"):
        end = next((i for i, c in enumerate(content) if c == "=" or c.isspace()), len(content))
        name, value = content[:end], content[end + 1 :]
    else:
        name, value = content[:2], content[2:].lstrip("=")
    name, value = name.strip(), value.strip()
    if name in REFUSED_OPTIONS:
        raise InvalidRequirement(line_no, line, f"{REFUSED_OPTIONS[name]}; {ALLOWED}")
    if name not in INDEX_OPTIONS:
        allowed = f"{ALLOWED} (and index options)" if allow_index else ALLOWED
        raise InvalidRequirement(line_no, line, f"option {name} is not allowed; {allowed}")
    if not allow_index:
        raise InvalidRequirement(
            line_no,
            line,
            f"index options ({name}) are disabled on this server (BERTH_ALLOW_INDEX_OPTIONS); "
            f"{ALLOWED}",
        )
    name = INDEX_OPTIONS[name]
    if name == "--no-index":
        if value:
            raise InvalidRequirement(line_no, line, "--no-index takes no value")
        return name
    if not value or any(char.isspace() for char in value):
        raise InvalidRequirement(line_no, line, f"{name} takes exactly one value")
    if name != "--trusted-host":
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise InvalidRequirement(
                line_no, line, f"{name} must be an http:// or https:// URL, not {value!r}"
            )
    return f"{name} {value}"


def _parse_requirement(line_no: int, line: str, content: str) -> Requirement:
    """Parse one requirement with ``packaging``; refuse paths, URLs and per-line options."""
    refused = _refused_location(content.split(";", 1)[0].strip())
    if refused:
        raise InvalidRequirement(line_no, line, f"{refused} are not allowed; {ALLOWED}")
    if any(token.startswith("--") for token in content.split()):
        raise InvalidRequirement(
            line_no,
            line,
            f"per-requirement options (--hash, --config-settings, ...) are not allowed; {ALLOWED}",
        )
    try:
        req = Requirement(content)
    except PackagingInvalidRequirement as e:
        detail = str(e).splitlines()[0] if str(e) else "unparsable requirement"
        raise InvalidRequirement(line_no, line, f"{detail}; {ALLOWED}") from e
    if req.url:
        raise InvalidRequirement(line_no, line, f"URL requirements are not allowed; {ALLOWED}")
    return req


def _refused_location(head: str) -> str | None:
    """Name the kind of location (VCS, URL, file, path) ``head`` points at, if any."""
    targets = [t.lower() for t in (head, head.partition("@")[2].strip()) if t]
    if any(t.startswith("file:") for t in targets):
        return "local files (file: URLs)"
    if any(t.startswith(VCS_PREFIXES) for t in targets):
        return "version-control requirements (git+, hg+, svn+, bzr+)"
    if "://" in head:
        return "URL requirements (name @ url)"
    first = (head.split() or [""])[0].lower()
    if head == "~" or head.startswith(".") or "/" in head or "\\" in head:
        return "local paths"
    if first.endswith(ARCHIVE_SUFFIXES):
        return "local archives (.whl, .tar.gz, .zip)"
    return None


def _canonical_requirement(req: Requirement) -> str:
    """``name[extras]specifiers; marker`` with every part normalised."""
    text: str = canonicalize_name(req.name)
    if req.extras:
        text += "[" + ",".join(sorted({canonicalize_name(e) for e in req.extras})) + "]"
    text += ",".join(sorted({_canonical_specifier(s) for s in req.specifier}))
    if req.marker:
        text += f"; {req.marker}"
    return text


def _canonical_specifier(spec: Specifier) -> str:
    """PEP 440 normal form of the version, trailing zeros kept; ``===`` is left verbatim."""
    if spec.operator == "===":
        return str(spec)
    version, wildcard = spec.version, ""
    if version.endswith(".*"):
        version, wildcard = version[:-2], ".*"
    return f"{spec.operator}{Version(version)}{wildcard}"


def _is_pin(req: Requirement) -> bool:
    """``name==version`` exactly: one ``==`` specifier, no wildcard (extras, markers allowed)."""
    specs = list(req.specifier)
    return len(specs) == 1 and specs[0].operator == "==" and not specs[0].version.endswith(".*")
