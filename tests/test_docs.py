"""The README documents every command and every option of the CLI."""

from __future__ import annotations

import argparse
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
