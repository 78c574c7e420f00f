"""One state, many sources: each source has its own run lock, so runs of two sources go on at the
same time (two cron jobs sharing a state and an output folder), while a second run of the same
source is turned away, and a run of one source never touches the runs or run folders of another.
Both state backends; the PACS are simulators (fixtures/fakepacs.py), one slowed down so that the
other's run happens in the middle of it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crawler.cli import main
from crawler.state import State, StateLocked
from fixtures.fakepacs import FakePacs

COMMON = ("--metadata", "never", "--retries", "0", "--timezone", "UTC", "-q")


@pytest.fixture(params=["sqlite", "postgresql"])
def state_location(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return request.getfixturevalue("postgres_server").create_database()


def _wait_for(check, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _manifest_count(folder: Path) -> int:
    manifest = json.loads((folder / "manifest.json").read_text())
    return next(o["count"] for o in manifest["output"] if o["type"] == "ImagingStudy")


def test_two_sources_sync_at_the_same_time_into_one_state_and_one_folder(state_location, tmp_path):
    out = tmp_path / "out"
    with FakePacs(n_studies=80, seed=1, latency=0.05) as slow, FakePacs(n_studies=6, seed=2) as quick:
        command = [sys.executable, "-m", "crawler", "sync", slow.url, "--state", state_location, "--out", str(out),
                   "--checkpoint-every", "1000", "--workers", "2", *COMMON]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            # the slow run is half-way: it has written studies into its run folder, and its state
            # transaction (one checkpoint for the whole run) holds their records
            _wait_for(lambda: any(out.glob("*/*.ndjson.part")) or process.poll() is not None, "the slow run's first study")
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            (slow_folder,) = {p.parent for p in out.glob("*/*.ndjson.part")}

            assert main(["sync", quick.url, "--state", state_location, "--out", str(out), *COMMON]) == 0
            assert process.poll() is None, "the slow run ended before the other source's run: the test shows nothing"
            assert main(["sync", slow.url, "--state", state_location, "--out", str(out), *COMMON]) == 2
            # the other source's run neither completed nor removed the folder being written
            assert not (slow_folder / "manifest.json").exists() and any(slow_folder.glob("*.ndjson.part"))
            assert process.wait(timeout=120) == 0, process.stderr.read() if process.stderr else ""
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    counts = sorted(_manifest_count(folder) for folder in out.iterdir())
    assert counts == [6, 80]
    state = State.open(state_location, read_only=True)
    try:
        runs = {run["source"]: run for run in reversed(state.last_runs())}
        assert {runs[slow.url]["outcome"], runs[quick.url]["outcome"]} == {"ok"}
        assert len(list(state.iter_study_rows(slow.url))) == 80 and len(list(state.iter_study_rows(quick.url))) == 6
    finally:
        state.close()


def test_a_source_lock_and_the_whole_state_lock_exclude_each_other(state_location):
    first = State(state_location, lock="http://pacs-a/dicom-web")
    try:
        State(state_location, lock="http://pacs-b/dicom-web").close()   # another source: at the same time
        with pytest.raises(StateLocked, match="for this source"):
            State(state_location, lock="http://pacs-a/dicom-web")
        with pytest.raises(StateLocked, match="is using the state"):
            State(state_location, lock=True)
    finally:
        first.close()
    whole = State(state_location, lock=True)
    try:
        with pytest.raises(StateLocked):
            State(state_location, lock="http://pacs-b/dicom-web")
    finally:
        whole.close()
    State(state_location, lock="http://pacs-a/dicom-web").close()   # released with the object


def test_an_interrupted_run_of_one_source_is_closed_only_by_that_source(tmp_path):
    location = tmp_path / "state.db"
    state = State(location)
    try:
        a_run = state.begin_run("http://pacs-a/dicom-web", "2026-12-06T00:00:00+00:00")
        state.set_run_folder(a_run, str(tmp_path / "out" / "a"))
        b_run = state.begin_run("http://pacs-b/dicom-web", "2026-12-06T00:00:01+00:00")
        assert state.unfinished_folders(b_run, "http://pacs-b/dicom-web") == []
        assert state.close_interrupted_runs(b_run, "http://pacs-b/dicom-web") == 0
        assert state.unfinished_folders(0, "http://pacs-a/dicom-web") == [str(tmp_path / "out" / "a")]
        assert state.close_interrupted_runs(0, "http://pacs-a/dicom-web") == 1
    finally:
        state.close()
