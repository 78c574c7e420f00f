"""The README documents every command and every option of the CLI."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from crawler.cli import build_parser

README = (Path(__file__).parent.parent / "README.md").read_text()


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_command_is_documented(command):
    assert f"qido-crawler {command}" in README


@pytest.mark.parametrize(
    ("command", "option"),
    sorted((name, opt) for name, p in _commands().items() for a in p._actions for opt in a.option_strings if opt not in ("-h", "--help")),
)
def test_option_is_documented(command, option):
    assert f"`{option}" in README or f" {option}" in README, f"{command} {option} is not in README.md"


def _parser_groups(p: argparse.ArgumentParser) -> list[tuple[str, set[str]]]:
    """(title, option strings) of each group of ``p`` that holds options, in --help's order."""
    out = []
    for group in p._action_groups:
        options = {o for a in group._group_actions for o in a.option_strings if o not in ("-h", "--help")}
        if options:
            out.append(((group.title or "").casefold(), options))
    return out


def _readme_groups(command: str) -> list[tuple[str, set[str]]]:
    """(heading, options) of each `#### heading` in the command's README section whose table
    rows name options (in the row's first cell), in the README's order."""
    start = re.search(rf"^### `qido-crawler {command}\b.*$", README, re.M)
    assert start, f"no section for qido-crawler {command}"
    end = re.compile(r"^##?#? ", re.M).search(README, start.end())
    section = README[start.end(): end.start() if end else len(README)]
    groups: list[tuple[str, set[str]]] = []
    heading = None
    for line in section.splitlines():
        if line.startswith("#### "):
            heading = line[5:].strip().casefold()
        elif line.startswith("| `-"):
            first = re.split(r"(?<!\\)\|", line)[1]
            options = set(re.findall(r"`(--?[A-Za-z][\w-]*)", first))
            assert heading, f"{command}: {sorted(options)} under no group heading"
            if not groups or groups[-1][0] != heading:
                groups.append((heading, set()))
            groups[-1][1].update(options)
    return groups


@pytest.mark.parametrize("command", sorted(_commands()))
def test_option_tables_follow_the_groups_of_help(command):
    """Each command's option tables sit under the headings of its --help groups, in the same
    order, and each option under its own group's heading."""
    in_help = _parser_groups(_commands()[command])
    in_readme = _readme_groups(command)
    assert [t for t, _ in in_readme] == [t for t, _ in in_help], f"{command}: the README's groups differ from --help's"
    for (title, options), (_, documented) in zip(in_help, in_readme):
        assert options - documented == set(), f"{command}: not under '{title}' in README.md: {sorted(options - documented)}"
        assert documented - options == set(), f"{command}: under '{title}' in README.md, not in that group of --help: {sorted(documented - options)}"
