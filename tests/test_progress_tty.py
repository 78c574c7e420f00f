"""The progress display as an operator at a terminal sees it: the real CLI in a subprocess whose
stderr is a pseudo-terminal, against the simulator of fixtures/fakepacs.py (a fake PACS, named as
such) slowed by a latency on every request, so that the run lasts long enough to be drawn.

Assertions are on what was drawn and in which order, never on how fast: the machine may be
loaded. Each frame of the display starts with a carriage return (and a cursor-up when it redraws
several lines); the frames are cut apart there (after the terminal's own \r\n for each newline are made \n
again) and their escape sequences dropped.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from fixtures.fakepacs import FakePacs

ROOT = Path(__file__).resolve().parents[1]
ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
COLUMNS = 160


def run_in_pty(argv: list[str], deadline: float = 60.0) -> tuple[int, str, str]:
    """(exit code, what reached the terminal, stdout) of the CLI run with its stderr on a
    pseudo-terminal of COLUMNS columns and its stdout on a pipe."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, COLUMNS, 0, 0))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "crawler", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    received = bytearray()
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:
                if exc.errno != errno.EIO:  # Linux: EIO once the last writer has closed the terminal
                    raise
                break
            if not chunk:
                break
            received += chunk
        else:
            process.kill()
            pytest.fail(f"the CLI was still running after {deadline} s")
        stdout = process.communicate(timeout=30)[0].decode()
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    return process.returncode, received.decode("utf-8", errors="replace"), stdout


def frames(terminal: str) -> list[str]:
    """The display's frames, in the order drawn, as plain text (lines joined by newlines); the
    text after the last frame (the summary) is not one."""
    drawn = terminal.rpartition("\x1b[J")[0].replace("\r\n", "\n")  # the terminal turns each \n into \r\n
    return [text for text in (ESCAPE.sub("", part).strip() for part in drawn.split("\r")) if text.startswith("listed ")]


def numbers(pattern: str, shown: list[str]) -> list[int]:
    return [int(m.group(1)) for frame in shown if (m := re.search(pattern, frame))]


def sync_argv(pacs: FakePacs, work: Path, *extra: str) -> list[str]:
    return ["sync", pacs.url, "--state", str(work / "state.db"), "--out", str(work / "out"), "--metadata", "never",
            "--page-size", "10", "--workers", "1", *extra]


def test_a_sync_at_a_terminal_shows_crawled_rising_a_rate_and_then_a_percentage(tmp_path):
    with FakePacs(n_studies=40, seed=19, latency=0.08) as pacs:
        code, terminal, _ = run_in_pty(sync_argv(pacs, tmp_path))
    assert code == 0, terminal[-2000:]
    shown = frames(terminal)
    crawled = numbers(r"crawled (\d+)", shown)
    assert crawled == sorted(crawled), crawled
    assert len({n for n in crawled if 0 < n < 40}) >= 2, crawled  # drawn rising while the run went on
    assert numbers(r"saved (\d+) \(at checkpoints\)", shown)[0] == 0  # no checkpoint yet: saved named as such
    rates = [float(r) for frame in shown for r in re.findall(r"(\d+\.\d+) studies/s", frame)]
    assert any(rate > 0 for rate in rates), shown[-3:]
    complete = [i for i, frame in enumerate(shown) if re.search(r"\d+% \|.*\| \d+/40 to crawl  ETA ", frame)]
    assert complete, shown[-3:]
    assert all("listing: " not in frame for frame in shown[complete[0]:])  # once complete, the bar stays
    assert all("listing: " in frame for frame in shown[:complete[0]])
    assert numbers(r"(\d+)% \|", shown) == sorted(numbers(r"(\d+)% \|", shown))
    summary = terminal.rpartition("\x1b[J")[2]
    assert summary.lstrip().startswith("qido-crawler: synced"), summary[:200]  # the display cleared first
    assert "crawled" not in summary and "\x1b[" not in summary


def test_an_audit_at_a_terminal_shows_read_rising_and_then_a_percentage(tmp_path):
    with FakePacs(n_studies=40, seed=20, latency=0.05) as pacs:
        code, terminal, _ = run_in_pty(["audit", pacs.url, "--report", str(tmp_path / "report"), "--workers", "1",
                                        "--page-size", "10"])
    assert code in (0, 1), terminal[-2000:]
    shown = frames(terminal)
    read = numbers(r"read (\d+)", shown)
    assert read == sorted(read) and len({n for n in read if 0 < n < 40}) >= 2, read
    assert any(float(r) > 0 for frame in shown for r in re.findall(r"(\d+\.\d+) studies/s", frame)), shown[-3:]
    assert any(re.search(r"\d+% \|.*\| \d+/40 to read  ETA ", frame) for frame in shown), shown[-3:]
    assert numbers(r"requests (\d+)", shown)[-1] > 0
    assert terminal.rpartition("\x1b[J")[2].lstrip().startswith("qido-crawler: audited")


def test_quiet_at_a_terminal_draws_nothing(tmp_path):
    with FakePacs(n_studies=40, seed=21, latency=0.005) as pacs:
        code, terminal, _ = run_in_pty(sync_argv(pacs, tmp_path, "-q"))
    assert code == 0
    assert terminal == ""


def test_nothing_is_drawn_when_stderr_is_a_pipe(tmp_path):
    with FakePacs(n_studies=60, seed=22, latency=0.005) as pacs:
        done = subprocess.run([sys.executable, "-m", "crawler", *sync_argv(pacs, tmp_path)], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.startswith("qido-crawler: synced"), done.stderr[:300]
    for drawn in ("\r", "\x1b[", "crawled", "studies/s", "at checkpoints"):
        assert drawn not in done.stderr
