"""Jobs that share an output folder, and files that hold patient data.

Two scheduled syncs (two PACS, two states) may write into the same ``--out``. Each run folder
is named for its state and source as well as its time and run number, is created by the run
that writes it (never taken over), and a run recovers or removes only the folders its own state
recorded. Whatever the tool creates that holds patient data is readable by its owner only.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

import importlib
from crawler.cli import main
from crawler.config import SyncConfig
from crawler.crawl import CrawlOptions, MetadataMode
from crawler.state import State
from fixtures.fakepacs import FakePacs

sync_module = importlib.import_module("crawler.sync")


@pytest.fixture(scope="module")
def two_pacs():
    with FakePacs(n_studies=25, seed=3) as first, FakePacs(n_studies=30, seed=4) as second:
        yield first, second


@pytest.fixture
def frozen_clock(monkeypatch):
    """Every run starts at 2026-12-05 12:00:00 UTC (the second that names its folder)."""
    fixed = datetime(2026, 12, 5, 12, 0, 0, tzinfo=timezone.utc)

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return fixed if tz else fixed.replace(tzinfo=None)

    monkeypatch.setattr(sync_module, "datetime", FrozenClock)


def _sync_command(url: str, state: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "crawler", "sync", url, "--state", str(state), "--out", str(out), "--metadata", "never",
            "--timezone", "UTC", "-q"]


def _foreign_folder(out: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder another tool (or another job's run being written) left, named like a run folder."""
    folder = out / "20200101T000000Z-run1"
    folder.mkdir(parents=True)
    files = {"ImagingStudy.ndjson.part": b'{"resourceType":"ImagingStudy","id":"x"}\n', "notes.txt": b"keep me\n"}
    for name, body in files.items():
        (folder / name).write_bytes(body)
    return folder, files


def _study_ids_written(out: Path) -> list[str]:
    ids = []
    for folder in sorted(p for p in out.iterdir() if (p / "manifest.json").exists()):
        for path in folder.glob("*.ndjson"):
            for line in path.read_text().splitlines():
                resource = json.loads(line)
                if resource["resourceType"] == "ImagingStudy":
                    ids.append(resource["id"])
    return ids


def _state_study_ids(path: Path) -> set[str]:
    state = State(path)
    try:
        return {json.loads(body)["id"] for kind, _, body in state.iter_resources() if kind == "ImagingStudy"}
    finally:
        state.close()


def test_two_syncs_started_together_into_one_out_both_land_and_a_foreign_folder_is_untouched(two_pacs, tmp_path):
    out = tmp_path / "out"
    foreign, files = _foreign_folder(out)
    commands = [_sync_command(pacs.url, tmp_path / f"state{i}.db", out) for i, pacs in enumerate(two_pacs)]
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in processes]
    for process in processes:
        process.stdout.close()
        process.stderr.close()
    assert [code for code, _ in results] == [0, 0], results

    written = _study_ids_written(out)
    assert len(written) == len(set(written)) == 25 + 30
    for i in range(2):
        assert _state_study_ids(tmp_path / f"state{i}.db") <= set(written)
    assert sorted(p.name for p in foreign.iterdir()) == sorted(files)
    assert all((foreign / name).read_bytes() == body for name, body in files.items())
    run_folders = [p for p in out.iterdir() if p != foreign]
    assert len(run_folders) == 2 and len({p.name for p in run_folders}) == 2


def test_runs_of_two_states_in_the_same_second_get_different_folders(two_pacs, tmp_path, frozen_clock):
    """The same UTC second and the same run number (1) for two states: two folders, both complete."""
    out = tmp_path / "out"
    for i, pacs in enumerate(two_pacs):
        config = SyncConfig(url=pacs.url, state=tmp_path / f"state{i}.db", out=out, crawl=CrawlOptions(metadata=MetadataMode.NEVER), zone=timezone.utc)
        result = sync_module.sync(config)
        assert result.exit_code == 0 and result.run_id == 1
    folders = sorted(p.name for p in out.iterdir())
    assert len(folders) == 2 and all(name.startswith("20261205T120000Z-run1-") for name in folders)
    assert len(_study_ids_written(out)) == 55


def test_a_folder_the_run_did_not_create_is_never_written_into(two_pacs, tmp_path, frozen_clock, capsys):
    """A copy of a state used by a second job would pick the same folder name: the second run
    refuses to write into a folder it did not create (exit 3, one line), and records nothing."""
    pacs = two_pacs[0]
    out = tmp_path / "out"
    args = ["sync", pacs.url, "--out", str(out), "--metadata", "never", "--timezone", "UTC"]
    prepared = State(tmp_path / "state.db")
    prepared.identity()
    prepared.close()
    original = (tmp_path / "state.db").read_bytes()
    assert main([*args, "--state", str(tmp_path / "state.db")]) == 0
    (tmp_path / "copy.db").write_bytes(original)
    capsys.readouterr()
    assert main([*args, "--state", str(tmp_path / "copy.db")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists already" in err[0]
    assert _state_study_ids(tmp_path / "copy.db") == set()
    assert len(_study_ids_written(out)) == 25


def test_an_interrupted_folder_of_another_state_is_left_alone(two_pacs, tmp_path):
    """Run folders without a manifest are recovered only by the state that recorded them."""
    out = tmp_path / "out"
    first, second = two_pacs
    assert main(["sync", first.url, "--state", str(tmp_path / "a.db"), "--out", str(out), "--metadata", "never", "-q"]) == 0
    (folder,) = list(out.iterdir())
    os.replace(folder / "manifest.json", folder / "manifest.json.away")
    assert main(["sync", second.url, "--state", str(tmp_path / "b.db"), "--out", str(out), "--metadata", "never", "-q"]) == 0
    assert (folder / "manifest.json.away").exists() and not (folder / "manifest.json").exists()
    assert (folder / "ImagingStudy.ndjson").exists()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_with_patient_data_are_private_whatever_the_umask(two_pacs, tmp_path):
    pacs = two_pacs[0]
    old = os.umask(0o022)
    try:
        nested = tmp_path / "var" / "lib" / "qido"
        out = tmp_path / "data" / "imaging"
        assert main(["sync", pacs.url, "--state", str(nested / "state.db"), "--out", str(out), "--metadata", "never", "-q"]) == 0
        assert main(["export", "--state", str(nested / "state.db"), "--out", str(tmp_path / "full"), "-q"]) == 0
    finally:
        os.umask(old)
    state_files = [p for p in nested.iterdir()]
    assert {p.name for p in state_files} >= {"state.db", "state.db.lock"}
    assert {p.name: _mode(p) for p in state_files} == {p.name: 0o600 for p in state_files}
    assert _mode(nested) == 0o700 and _mode(nested.parent) == 0o700
    (run,) = list(out.iterdir())
    assert _mode(out) == 0o700 and _mode(run) == 0o700
    run_files = list(run.iterdir())
    assert {p.name for p in run_files} >= {"manifest.json", "ImagingStudy.ndjson", "Endpoint.ndjson"}
    assert {p.name: _mode(p) for p in run_files} == {p.name: 0o600 for p in run_files}
    full = tmp_path / "full"
    assert _mode(full) == 0o700
    assert {p.name: _mode(p) for p in full.iterdir()} == {p.name: 0o600 for p in full.iterdir()}


def test_an_existing_state_is_made_private_when_opened(tmp_path):
    path = tmp_path / "state.db"
    State(path).close()
    os.chmod(path, 0o644)
    State(path, lock=True).close()
    assert _mode(path) == 0o600


def test_audit_reports_are_private_whatever_the_umask(two_pacs, tmp_path):
    old = os.umask(0o022)
    try:
        report = tmp_path / "audits" / "december"
        assert main(["audit", two_pacs[0].url, "--report", str(report), "-q"]) == 0
    finally:
        os.umask(old)
    assert _mode(report) == 0o700 and _mode(report.parent) == 0o700
    files = list(report.iterdir())
    assert {p.name for p in files} == {"findings.json", "report.html", "studies.csv"}
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}


def test_export_into_a_file_is_a_usage_error(two_pacs, tmp_path, capsys):
    assert main(["sync", two_pacs[0].url, "--state", str(tmp_path / "state.db"), "--metadata", "never", "-q"]) == 0
    target = tmp_path / "not-a-folder"
    target.write_text("x")
    capsys.readouterr()
    assert main(["export", "--state", str(tmp_path / "state.db"), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0] and "Traceback" not in err[0]
    assert target.read_text() == "x"


def test_sync_into_a_file_is_a_usage_error(two_pacs, tmp_path, capsys):
    target = tmp_path / "not-a-folder"
    target.write_text("x")
    assert main(["sync", two_pacs[0].url, "--state", str(tmp_path / "state.db"), "--out", str(target), "--metadata", "never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]
