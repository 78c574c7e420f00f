"""``qido-crawler watch`` on a live Orthanc whose content changes while it watches (its /changes
log is the change source), and on the Azure change feed simulator: what arrives appears in a
finished run folder, SIGTERM ends it cleanly, kill -9 loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from crawler.cli import main
from crawler.config import SyncConfig
from crawler.state import State
from crawler.watch import WatchOptions, WatchResult, watch
from fixtures import corpus, orthanc

FAST = WatchOptions(interval=1, stable_after=2, roll_every=2, reconcile_every=3600)
DEADLINE = 40.0


@pytest.fixture
def live(corpus_files, tmp_path):
    """A fresh Orthanc per test, holding every corpus study but study 07 (uploaded while watched);
    StableAge 2 to match --stable-after 2."""
    server = orthanc.start(tmp_path / "orthanc", config={"OverwriteInstances": True, "StableAge": 2})
    try:
        server.upload([p for p in corpus_files if _study_of(p) != corpus.uid("study", "07")])
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def _study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _copy_with(path: Path, dest: Path, **changes: str) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _until(what: Callable[[], object], timeout: float = DEADLINE, every: float = 0.2) -> object:
    """``what()`` once it is truthy; fails after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        assert time.monotonic() < end, "timed out"
        time.sleep(every)


def finished_studies(out: Path) -> dict[str, Path]:
    """Study Instance UID -> the finished run folder (one with its manifest) whose ImagingStudy
    lines hold it (the latest such folder)."""
    found: dict[str, Path] = {}
    if not out.is_dir():
        return found
    for folder in sorted(out.iterdir()):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        for entry in json.loads(manifest.read_text())["output"]:
            if entry["type"] == "ImagingStudy":
                for line in (folder / entry["url"]).read_text().splitlines():
                    found[json.loads(line)["identifier"][0]["value"].removeprefix("urn:oid:")] = folder
    return found


class Watching:
    """``watch`` in a thread of its own; ``stop()`` ends it and returns its result."""

    def __init__(self, config: SyncConfig, options: WatchOptions = FAST) -> None:
        self.event = threading.Event()
        self.result: WatchResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(config, options), daemon=True)
        self.thread.start()

    def _run(self, config: SyncConfig, options: WatchOptions) -> None:
        try:
            self.result = watch(config, options, self.event)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def stop(self, timeout: float = 10.0) -> WatchResult:
        self.event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "watch did not stop within 10 s"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@pytest.fixture
def watching() -> Iterator[Callable[..., Watching]]:
    started: list[Watching] = []

    def start(config: SyncConfig, options: WatchOptions = FAST) -> Watching:
        started.append(Watching(config, options))
        return started[-1]

    yield start
    for one in started:
        one.event.set()
        one.thread.join(15)


def _config(server: orthanc.Orthanc, tmp_path: Path, **more: object) -> SyncConfig:
    return SyncConfig(server.dicomweb, out=tmp_path / "out", state=tmp_path / "state.db", changes="orthanc", **more)  # type: ignore[arg-type]


def test_a_study_uploaded_while_watching_appears_in_a_finished_run_folder_and_so_does_one_dated_1999(
        live, corpus_files, corpus_study_uids, watching, tmp_path):
    config = _config(live, tmp_path)
    w = watching(config)
    present = corpus_study_uids - {corpus.uid("study", "07")}
    _until(lambda: present <= finished_studies(config.out).keys())       # the first, full listing

    uploaded = time.monotonic()
    live.upload([p for p in corpus_files if _study_of(p) == corpus.uid("study", "07")])
    folder = _until(lambda: finished_studies(config.out).get(corpus.uid("study", "07")))
    latency = time.monotonic() - uploaded
    assert folder not in {finished_studies(config.out)[uid] for uid in present}, "the new study came in a run of its own"

    source = next(p for p in corpus_files if _study_of(p) == corpus.uid("study", "03"))
    late_uid = corpus.uid("study", "watch-1999")
    live.upload([_copy_with(source, tmp_path / "late.dcm", StudyInstanceUID=late_uid, SeriesInstanceUID=corpus.uid("series", "watch-1999"),
                            SOPInstanceUID=corpus.uid("instance", "watch-1999"), StudyDate="19990101")])
    _until(lambda: late_uid in finished_studies(config.out))

    result = w.stop()
    assert result.polls > 0 and result.reconciliations == 0
    assert result.studies_synced == len(corpus_study_uids) + 1
    state = State.open(config.state, read_only=True)
    try:
        assert state.counts_by_status() == {"synced": len(corpus_study_uids) + 1}
    finally:
        state.close()
    print(f"upload -> finished run folder: {latency:.1f} s")
