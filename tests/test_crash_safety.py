"""Crash safety: a sync killed with SIGKILL at any point and started again ends with the same
result as an uninterrupted one; one run at a time on a state.

The server is the simulated PACS (fixtures/fakepacs.py) with a small per-request latency. Kill
points are fractions of the requests an uninterrupted run makes (measured by the reference run);
the simulator holds the N-th request unanswered, so the crawler cannot finish or move past that
point however the machine schedules the test, which kills it while it waits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crawler.cli import main
from crawler.state import State
from fixtures.fakepacs import Behaviour, FakePacs

N_STUDIES = 60
LATENCY = 0.01
KILL_FRACTIONS = [0.0, 0.03, 0.05, 0.1, 0.17, 0.28, 0.4, 0.56, 0.73, 0.93]


def sync_command(url: str, work: Path) -> list[str]:
    return [
        sys.executable, "-m", "crawler", "sync", url, "--state", str(work / "state.db"), "--out", str(work / "out"),
        "--metadata", "never", "--page-size", "10", "--workers", "2", "--checkpoint-every", "7", "--timezone", "UTC", "-q",
    ]


def export(work: Path) -> dict[str, list[str]]:
    target = work / "export"
    assert main(["export", "--state", str(work / "state.db"), "--out", str(target), "-q"]) == 0
    return {p.name: sorted(p.read_text().splitlines()) for p in sorted(target.glob("*.ndjson"))}


def run_folders_have_no_duplicates(work: Path) -> list[str]:
    """Every run folder is complete (has a manifest) and holds each study at most once; returns all study ids written."""
    written = []
    for folder in sorted((work / "out").iterdir()):
        assert (folder / "manifest.json").exists(), f"{folder} left without a manifest"
        assert not list(folder.glob("*.part")) and not (folder / "checkpoint.json").exists()
        path = folder / "ImagingStudy.ndjson"
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []
        assert len(ids) == len(set(ids)), f"{folder.name} has a study twice"
        written += ids
    return written


@pytest.fixture(scope="module")
def pacs():
    with FakePacs(n_studies=N_STUDIES, seed=21, latency=LATENCY) as server:
        yield server


@pytest.fixture(scope="module")
def reference(pacs, tmp_path_factory) -> tuple[dict[str, list[str]], int]:
    """The export of an uninterrupted run, and how many requests that run made."""
    work = tmp_path_factory.mktemp("clean")
    pacs.reset_counts()
    subprocess.run(sync_command(pacs.url, work), check=True, timeout=300)
    return export(work), len(pacs.requests)


def kill_at_request(pacs: FakePacs, command: list[str], kill_after: int, latency: float) -> bool:
    """Run ``command`` and SIGKILL it once request number ``kill_after`` has reached the simulator,
    which holds that request unanswered (and lets it go when it stops); False when the command
    finished before."""
    pacs.behaviour = Behaviour(latency=latency, stall_seconds=600, stall_every=kill_after)
    try:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while len(pacs.requests) < kill_after and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        killed = process.poll() is None
        if killed:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        pacs.behaviour = Behaviour(latency=latency)
    return killed


@pytest.mark.parametrize("fraction", KILL_FRACTIONS)
def test_sigkill_at_any_point_then_rerun_gives_the_clean_export(pacs, reference, tmp_path, fraction):
    reference, total = reference
    assert total > 40
    kill_after = min(total - 1, 1 + int(fraction * total))
    pacs.reset_counts()
    killed = kill_at_request(pacs, sync_command(pacs.url, tmp_path), kill_after, LATENCY)
    assert killed, f"the sync finished before {kill_after} of {total} requests"
    assert len(pacs.requests) >= kill_after

    rerun = subprocess.run(sync_command(pacs.url, tmp_path) + ["--full"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert export(tmp_path) == reference
    written = run_folders_have_no_duplicates(tmp_path)
    assert set(written) >= {json.loads(line)["id"] for line in reference["ImagingStudy.ndjson"]}

    state = State(tmp_path / "state.db")
    outcomes = [r["outcome"] for r in state.last_runs()]
    state.close()
    assert outcomes[0] == "ok" and outcomes[-1] == "interrupted"


def test_a_second_run_on_the_same_state_exits_2_at_once(tmp_path, capsys):
    holder = State(tmp_path / "state.db", lock=True)
    try:
        # nothing listens on port 9: a run that went to the server before the lock would end
        # with exit 3 (after its retries), not 2
        code = main(["sync", "http://127.0.0.1:9/dicom-web", "--state", str(tmp_path / "state.db")])
        err = capsys.readouterr().err
        assert code == 2
        assert f"another run (pid {os.getpid()}) is using the state" in err and len(err.strip().splitlines()) == 1
    finally:
        holder.close()


def test_the_lock_of_a_killed_run_is_taken_over(pacs, tmp_path):
    script = f"from crawler.state import State; import time; s = State({str(tmp_path / 'state.db')!r}, lock=True); print('locked', flush=True); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    done = subprocess.run(sync_command(pacs.url, tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
