"""`--help` that is easy to scan: every option in a named group, the groups in a set order, each
default shown (and no secret from the environment shown as one), worked examples that parse;
and shell completion through argcomplete (the completion extra), in process and through
`python -m crawler`."""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from crawler.cli import build_parser, complete

ROOT = Path(__file__).parent.parent

SYNC_GROUPS = [
    "output",
    "what to list",
    "incremental runs and deletions",
    "FHIR resources",
    "FHIR server",
    "connection and authentication",
    "performance",
    "many sources",
    "output format and messages",
]
AUDIT_GROUPS = [
    "output",
    "what to list",
    "state and FHIR server to compare with",
    "connection and authentication",
    "performance",
    "output format and messages",
]
SECRET_ENV = [
    "QIDO_CRAWLER_USER",
    "QIDO_CRAWLER_PASSWORD",
    "QIDO_CRAWLER_TOKEN",
    "QIDO_CRAWLER_TOKEN_COMMAND",
    "QIDO_CRAWLER_FHIR_USER",
    "QIDO_CRAWLER_FHIR_PASSWORD",
    "QIDO_CRAWLER_FHIR_TOKEN",
    "QIDO_CRAWLER_CA_BUNDLE",
]


def commands(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    parser = parser or build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def option_groups(p: argparse.ArgumentParser) -> list[tuple[str, list[str]]]:
    """(title, options) of each group that holds options, in --help's order; -h left out."""
    out = []
    for group in p._action_groups:
        options = [a.option_strings[-1] for a in group._group_actions if a.option_strings and a.option_strings != ["-h", "--help"]]
        if options:
            out.append((group.title or "", options))
    return out


def test_sync_and_audit_have_their_groups_in_order():
    parsed = commands()
    assert [t for t, _ in option_groups(parsed["sync"])] == SYNC_GROUPS
    assert [t for t, _ in option_groups(parsed["audit"])] == AUDIT_GROUPS


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_option_sits_in_a_named_group(command):
    p = commands()[command]
    groups = option_groups(p)
    assert len(groups) >= 2
    loose = [o for t, options in groups if t in ("options", "optional arguments") for o in options]
    assert loose == [], f"{command}: options outside any named group: {loose}"
    text = p.format_help()
    positions = [text.index(f"\n{title}:") for title, _ in groups]
    assert positions == sorted(positions)


def test_sync_groups_hold_the_options_one_expects_there():
    groups = dict(option_groups(commands()["sync"]))
    assert {"--out", "--state", "--dry-run"} <= set(groups["output"])
    assert {"--since", "--until"} <= set(groups["what to list"])
    assert {"--lookback", "--prune"} <= set(groups["incremental runs and deletions"])
    assert {"--fhir-url", "--fhir-token", "--fhir-ids"} <= set(groups["FHIR server"])
    assert {"--user", "--token", "--ca-bundle", "--timeout"} <= set(groups["connection and authentication"])
    assert {"--workers", "--executor", "--max-rps"} <= set(groups["performance"])
    assert {"--json", "--verbose", "--quiet"} <= set(groups["output format and messages"])


def _shown_default(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _with_default(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options whose default means something (not None, False, empty or -v's count),
    and that do not take their default from the environment."""
    return [
        a for a in p._actions
        if a.option_strings and a.default not in (None, False, "", [], argparse.SUPPRESS)
        and not isinstance(a, argparse._CountAction) and "env QIDO_CRAWLER_" not in (a.help or "")
    ]


@pytest.mark.parametrize("command", sorted(commands()))
def test_each_default_is_shown_as_the_parser_has_it(command):
    p = commands()[command]
    actions = _with_default(p)
    if command in ("sync", "audit"):
        assert len(actions) >= 6
    formatter = p._get_formatter()
    for action in actions:
        shown = formatter._expand_help(action)
        assert f"default: {_shown_default(action.default)}" in shown.replace("./", ""), (action.option_strings, shown)
    assert "default: None" not in p.format_help()
    assert "default: []" not in p.format_help()


@pytest.mark.parametrize("command", sorted(commands()))
def test_help_shows_no_secret_from_the_environment(command, monkeypatch):
    for name in SECRET_ENV:
        monkeypatch.setenv(name, f"s3cret-{name.lower()}")
    text = commands()[command].format_help() + build_parser().format_help()
    assert "s3cret" not in text


def _examples(p: argparse.ArgumentParser) -> list[list[str]]:
    """The command lines of an epilog's examples (after a crontab line's five time fields)."""
    lines = [line.strip() for line in (p.epilog or "").splitlines()]
    return [shlex.split(line[line.index("qido-crawler "):]) for line in lines if "qido-crawler " in line]


@pytest.mark.parametrize("command", ["sync", "audit"])
def test_the_examples_parse(command):
    examples = _examples(commands()[command])
    assert examples
    for argv in examples:
        assert argv[0] == "qido-crawler" and argv[1] == command
        args = build_parser().parse_args(argv[1:])
        assert args.command == command


def test_sync_examples_cover_first_hourly_weekly_fhir_and_dry_run():
    p = commands()["sync"]
    examples = [build_parser().parse_args(argv[1:]) for argv in _examples(p)]
    assert len(examples) >= 5
    assert any(a.out and not a.full and not a.dry_run and not a.fhir_url for a in examples)
    assert any(a.full and a.prune for a in examples)
    assert any(a.dry_run for a in examples)
    assert any(a.fhir_url for a in examples)
    assert all(not re.search(r"--(fhir-)?(token|password)\b", " ".join(argv)) for argv in _examples(p))
    assert "QIDO_CRAWLER_FHIR_TOKEN" in p.epilog
    crontab = [line for line in p.epilog.splitlines() if re.match(r"\s*(\S+\s+){5}qido-crawler sync", line)]
    assert len(crontab) >= 2, "an hourly and a weekly crontab line"
    assert "%" not in "".join(crontab), "cron reads % as a newline"
    text = p.format_help()
    assert text.index("examples:") > text.index("output format and messages:")
    assert "\n  # hourly" in text or "\n  hourly" in text, "the examples are printed as written, not re-wrapped"


# Shell completion


def test_entry_modules_carry_the_argcomplete_marker():
    for module in ("crawler/cli.py", "crawler/__main__.py"):
        assert b"PYTHON_ARGCOMPLETE_OK" in (ROOT / module).read_bytes()[:1024], module


def _completion_env(monkeypatch: pytest.MonkeyPatch, line: str) -> None:
    argcomplete = pytest.importorskip("argcomplete")
    # argcomplete opens fd 9 for its debug output; in pytest that fd is pytest's own (faulthandler's
    # copy of stderr), which the second opening would close. Its docs name this method the one to
    # override "to avoid clashes with file descriptors being used elsewhere (such as in pytest)".
    monkeypatch.setattr(argcomplete.CompletionFinder, "_init_debug_stream", lambda self: None)
    monkeypatch.setenv("_ARGCOMPLETE", "1")
    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setenv("COMP_POINT", str(len(line)))
    monkeypatch.setenv("_ARGCOMPLETE_IFS", "\n")
    monkeypatch.delenv("_ARGCOMPLETE_SHELL", raising=False)
    monkeypatch.delenv("_ARGCOMPLETE_STDOUT_FILENAME", raising=False)


class Exited(Exception):
    pass


def _exit(code: int) -> None:
    raise Exited(code)


def test_completion_offers_full_for_sync_fu(monkeypatch):
    _completion_env(monkeypatch, "qido-crawler sync --fu")
    out = io.StringIO()
    with pytest.raises(Exited) as exited:
        complete(build_parser(), exit_with=_exit, output=out)
    assert exited.value.args == (0,)
    assert out.getvalue().split() == ["--full"]


def test_completion_offers_commands_and_choices(monkeypatch):
    _completion_env(monkeypatch, "qido-crawler s")
    out = io.StringIO()
    with pytest.raises(Exited):
        complete(build_parser(), exit_with=_exit, output=out)
    assert sorted(out.getvalue().split()) == ["status", "sync"]
    _completion_env(monkeypatch, "qido-crawler sync --executor ")
    out = io.StringIO()
    with pytest.raises(Exited):
        complete(build_parser(), exit_with=_exit, output=out)
    assert sorted(out.getvalue().split()) == ["dask", "threads"]


def test_without_the_completion_variable_the_hook_returns_at_once(monkeypatch):
    monkeypatch.delenv("_ARGCOMPLETE", raising=False)
    out = io.StringIO()
    complete(build_parser(), exit_with=_exit, output=out)
    assert out.getvalue() == ""


def test_the_command_answers_the_shell_on_fd_8():
    """What the bash/zsh hook of `register-python-argcomplete qido-crawler` does: run the command
    with the completion variables set and read the answer from file descriptor 8."""
    pytest.importorskip("argcomplete")
    read, write = os.pipe()
    line = "qido-crawler sync --fu"
    env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)), "_ARGCOMPLETE_IFS": "\n"}
    env.pop("_ARGCOMPLETE_STDOUT_FILENAME", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", f"import os; os.dup2({write}, 8); import runpy; runpy.run_module('crawler', run_name='__main__')"],
            cwd=ROOT, env=env, pass_fds=(write,), capture_output=True, timeout=60,
        )
        os.close(write)
        write = -1
        answer = os.read(read, 65536).decode()
    finally:
        if write >= 0:
            os.close(write)
        os.close(read)
    assert proc.returncode == 0, proc.stderr.decode()
    assert answer.split() == ["--full"]
    assert proc.stdout == b""


def test_help_does_not_load_argcomplete():
    code = "import sys; from crawler.cli import main\ntry:\n    main(['sync', '--help'])\nexcept SystemExit:\n    pass\nprint('argcomplete' in sys.modules, file=sys.stderr)"
    env = {k: v for k, v in os.environ.items() if k != "_ARGCOMPLETE"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().splitlines()[-1] == "False"
    assert "output format and messages:" in proc.stdout
