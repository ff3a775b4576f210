"""The README stays true: every setting documented, every command it shows exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from shared.cli import build_parser
from shared.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    """Each Settings field has a row `BERTH_<NAME>` in the README's settings table."""
    documented = set(re.findall(r"^\| `BERTH_([A-Z0-9_]+)` \|", README, flags=re.MULTILINE))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from README"
    assert documented - fields == set(), "README documents settings that do not exist"


def _commands() -> list[list[str]]:
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("berth "):
                lines.append(line)
    return [shlex.split(line) for line in lines]


@pytest.mark.parametrize("argv", _commands(), ids=" ".join)
def test_readme_commands_parse(argv: list[str]) -> None:
    """Each `berth …` line of the README parses; a line of alternatives, up to the first `|`."""
    words = argv[1:]
    if "|" in words:
        words = words[: words.index("|")]
    words = [w for w in words if not w.startswith("[") and not w.endswith("]")]
    args = build_parser().parse_args(words)
    assert args.command == argv[1]
