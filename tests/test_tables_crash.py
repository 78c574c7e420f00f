"""Crash safety of the table sinks: a sync with --parquet and --delta killed with SIGKILL at
points through the run and started again leaves the Delta tables and the Parquet change log equal
to those of an uninterrupted run (and to the state's export); the checkpoint parts of a killed
run are merged by the next, its unfinished files removed, another job's left alone.

The server is the simulated PACS (fixtures/fakepacs.py), as in tests/test_crash_safety.py: it
holds the N-th request unanswered, so the sync is killed while it waits, at a point fixed by the
request count whatever the machine's speed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import orjson
import pyarrow.parquet as pq
import pytest

from crawler.cli import main
from crawler.errors import SinkError
from crawler.sinks.delta import DeltaTables
from crawler.sinks.parquet import ParquetLog, recover
from fixtures.fakepacs import FakePacs
from fixtures.tables import delta_rows, log_rows, snapshot_rows
from test_crash_safety import kill_at_request

N_STUDIES = 40
LATENCY = 0.01
TABLES = ("studies", "series", "instances")
KILL_FRACTIONS = [0.1, 0.35, 0.6, 0.9]


def sync_command(url: str, work: Path) -> list[str]:
    return [
        sys.executable, "-m", "crawler", "sync", url, "--state", str(work / "state.db"), "--parquet", str(work / "parquet"),
        "--delta", str(work / "delta"), "--metadata", "never", "--page-size", "10", "--workers", "2", "--checkpoint-every", "5",
        "--timezone", "UTC", "-q",
    ]


def tables(work: Path) -> dict[str, dict[str, list]]:
    con = duckdb.connect()
    snapshot = work / "snapshot"
    assert main(["export", "--state", str(work / "state.db"), "--out", str(snapshot), "--format", "parquet", "-q"]) == 0
    return {
        "delta": {name: delta_rows(con, work / "delta", name) for name in TABLES},
        "log": {name: log_rows(con, work / "parquet", name) for name in TABLES},
        "export": {name: snapshot_rows(con, snapshot, name) for name in TABLES},
    }


@pytest.fixture(scope="module")
def pacs():
    with FakePacs(n_studies=N_STUDIES, seed=33, latency=LATENCY) as server:
        yield server


@pytest.fixture(scope="module")
def reference(pacs, tmp_path_factory):
    work = tmp_path_factory.mktemp("clean")
    pacs.reset_counts()
    subprocess.run(sync_command(pacs.url, work), check=True, timeout=300)
    found = tables(work)
    assert found["delta"] == found["log"] == found["export"]
    assert len(found["delta"]["studies"]) == N_STUDIES
    return found, len(pacs.requests)


@pytest.mark.parametrize("fraction", KILL_FRACTIONS)
def test_sigkill_then_rerun_gives_the_clean_tables(pacs, reference, tmp_path, fraction):
    clean, total = reference
    kill_after = min(total - 1, 1 + int(fraction * total))
    pacs.reset_counts()
    assert kill_at_request(pacs, sync_command(pacs.url, tmp_path), kill_after, LATENCY)
    hidden = [p.name for p in (tmp_path / "parquet").rglob(".*")] if (tmp_path / "parquet").exists() else []
    rerun = subprocess.run(sync_command(pacs.url, tmp_path) + ["--full"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert tables(tmp_path) == {"delta": clean["delta"], "log": clean["log"], "export": clean["export"]}
    assert not list((tmp_path / "parquet").rglob(".*")), "parts or unfinished files left"
    if fraction >= 0.35:
        assert hidden, "the kill came before any checkpoint part: move the kill point"


STUDY = orjson.dumps({
    "resourceType": "ImagingStudy", "id": "s1", "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}],
    "numberOfSeries": 1, "numberOfInstances": 1,
    "series": [{"uid": "1.2.3.1", "modality": {"coding": [{"code": "CT"}]}, "numberOfInstances": 1,
                "instance": [{"uid": "1.2.3.1.1", "sopClass": {"code": "urn:oid:1.2.840.10008.5.1.4.1.1.2", "display": "CT Image Storage"}}]}],
})


def study(uid: str) -> bytes:
    return STUDY.replace(b"1.2.3", uid.encode())


def test_a_killed_runs_checkpoint_parts_are_merged_and_its_unfinished_rows_dropped(tmp_path):
    run = "20260101T000000Z-run3-0badcafe"
    sink = ParquetLog(tmp_path, run, "http://pacs/dicom-web", 3)
    sink.add("1.2.3", [("ImagingStudy", "a", study("1.2.3"))])
    sink.flush()
    sink.add("1.2.4", [("ImagingStudy", "b", study("1.2.4"))])
    sink.flush()
    sink.add("1.2.5", [("ImagingStudy", "c", study("1.2.5"))])   # never flushed: the state does not know it
    for writer in sink._writers.values():
        writer._write()   # its rows reached the unfinished file
    other = tmp_path / "studies" / ".20260101T000000Z-run9-11111111.00000.part"
    other.write_bytes(b"another job's part")
    # killed here; the next run of the same state and source:
    assert recover(tmp_path, "0badcafe", "20260101T000001Z-run4-0badcafe") == [run]
    for name in TABLES:
        (final,) = (tmp_path / name).glob("*.parquet")
        assert final.name == f"{run}.parquet"
        assert pq.ParquetFile(final).num_row_groups == 2
        assert sorted(pq.read_table(final).column("study_uid").to_pylist()) == ["1.2.3", "1.2.4"]
    assert other.exists() and sorted(p.name for p in tmp_path.rglob(".*")) == [other.name]


def test_parts_left_beside_a_merged_file_are_not_merged_again(tmp_path):
    run = "20260101T000000Z-run3-0badcafe"
    sink = ParquetLog(tmp_path, run, "http://pacs/dicom-web", 3)
    for uid in ("1.2.3", "1.2.4"):
        sink.add(uid, [("ImagingStudy", uid, study(uid))])
        sink.flush()
    parts = sorted((tmp_path / "studies").glob(".*.part"))
    kept = parts[1].read_bytes()
    sink.finish()
    # a kill while the merged file's parts were being removed: the second part is still there
    parts[1].write_bytes(kept)
    recover(tmp_path, "0badcafe", "20260101T000001Z-run4-0badcafe")
    (final,) = (tmp_path / "studies").glob("*.parquet")
    assert sorted(pq.read_table(final).column("study_uid").to_pylist()) == ["1.2.3", "1.2.4"]
    assert not list(tmp_path.rglob(".*"))


def test_a_study_written_twice_in_one_run_keeps_its_last_rows(tmp_path):
    con = duckdb.connect()
    delta = DeltaTables(str(tmp_path / "delta"), "http://pacs/dicom-web", 1)
    log = ParquetLog(tmp_path / "parquet", "20260101T000000Z-run1-0badcafe", "http://pacs/dicom-web", 1)
    two_series = orjson.loads(study("1.2.3"))
    two_series["series"].append({**two_series["series"][0], "uid": "1.2.3.2"})
    for sink in (delta, log):
        sink.add("1.2.3", [("ImagingStudy", "a", orjson.dumps(two_series))])
        sink.add("1.2.3", [("ImagingStudy", "a", study("1.2.3"))])
        sink.flush()
        sink.finish()
    assert [r["series_uid"] for r in delta_rows(con, tmp_path / "delta", "series")] == ["1.2.3.1"]
    assert [r["series_uid"] for r in log_rows(con, tmp_path / "parquet", "series")] == ["1.2.3.1"]
    # and a deletion after it in the same checkpoint wins
    delta = DeltaTables(str(tmp_path / "delta"), "http://pacs/dicom-web", 2)
    delta.add("1.2.4", [("ImagingStudy", "b", study("1.2.4"))])
    delta.delete("1.2.3", "ImagingStudy", "a")
    delta.flush()
    assert [r["study_uid"] for r in delta_rows(con, tmp_path / "delta", "studies")] == ["1.2.4"]
    assert [r["study_uid"] for r in delta_rows(con, tmp_path / "delta", "instances")] == ["1.2.4"]


def test_a_delta_uri_that_cannot_be_written_is_a_sink_error(tmp_path):
    (tmp_path / "file").write_text("")
    sink = DeltaTables(str(tmp_path / "file" / "delta"), "http://pacs/dicom-web", 1)
    sink.add("1.2.3", [("ImagingStudy", "a", study("1.2.3"))])
    with pytest.raises(SinkError, match="cannot write the Delta tables"):
        sink.flush()


def test_two_sources_share_the_delta_tables_without_touching_each_others_rows(tmp_path):
    con = duckdb.connect()
    uri = str(tmp_path / "delta")
    for source in ("http://a/dicom-web", "http://b/dicom-web"):
        sink = DeltaTables(uri, source, 1)
        sink.add("1.2.3", [("ImagingStudy", source, study("1.2.3"))])
        sink.flush()
        sink.flush()   # nothing new: no commit
    versions = len(list((tmp_path / "delta" / "studies" / "_delta_log").glob("*.json")))
    assert versions == 2   # made by the first source's rows, merged with the second's
    sink = DeltaTables(uri, "http://a/dicom-web", 2)
    sink.delete("1.2.3", "ImagingStudy", "a")
    sink.flush()
    sink.flush()   # nothing new: no commit
    assert len(list((tmp_path / "delta" / "studies" / "_delta_log").glob("*.json"))) == versions + 1
    for name in TABLES:
        assert [r["source"] for r in delta_rows(con, tmp_path / "delta", name)] == ["http://b/dicom-web"], name


def test_a_merge_that_loses_to_another_writers_commit_is_done_again(tmp_path, monkeypatch):
    """Two writers of one table (e.g. two sources of a --config file run in parallel): the one
    whose commit comes second reads the new version and merges again."""
    from deltalake import DeltaTable

    con = duckdb.connect()
    uri = str(tmp_path / "delta")
    first = DeltaTables(uri, "http://a/dicom-web", 1)
    first.add("1.2.3", [("ImagingStudy", "a", study("1.2.3"))])
    first.flush()
    real_merge = DeltaTable.merge
    lost = []

    def merge_after_another_writer(self, *args, **kwargs):
        merger = real_merge(self, *args, **kwargs)
        if not lost:
            lost.append(self.version())
            other = DeltaTables(uri, "http://b/dicom-web", 1)   # commits between our read and our commit
            other.add("1.2.4", [("ImagingStudy", "b", study("1.2.4"))])
            monkeypatch.setattr(DeltaTable, "merge", real_merge)
            other.flush()
            monkeypatch.setattr(DeltaTable, "merge", merge_after_another_writer)
        return merger

    monkeypatch.setattr(DeltaTable, "merge", merge_after_another_writer)
    second = DeltaTables(uri, "http://a/dicom-web", 2)
    second.add("1.2.3", [("ImagingStudy", "a", study("1.2.3"))])   # held already: merged
    second.flush()
    assert lost
    assert [(r["source"], r["study_uid"], r["run_id"]) for r in delta_rows(con, tmp_path / "delta", "studies", drop=())] == [
        ("http://a/dicom-web", "1.2.3", 2), ("http://b/dicom-web", "1.2.4", 1)]


def test_new_studies_are_appended_without_a_merge_and_one_the_table_holds_is_merged_not_doubled(tmp_path, monkeypatch):
    """A first sync reads nothing back (no merge); a study that a killed run appended but the
    state never recorded comes again in the next run: the table holds it, so it is merged."""
    from deltalake import DeltaTable

    con = duckdb.connect()
    uri = str(tmp_path / "delta")
    merges = []
    real_merge = DeltaTable.merge

    def counted(self, *args, **kwargs):
        merges.append(self.table_uri)
        return real_merge(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "merge", counted)
    first = DeltaTables(uri, "http://a/dicom-web", 1)
    for uid in ("1.2.3", "1.2.4"):
        first.add(uid, [("ImagingStudy", uid, study(uid))])
    first.flush()
    assert merges == []
    first.add("1.2.5", [("ImagingStudy", "1.2.5", study("1.2.5"))])
    first.add("1.2.3", [("ImagingStudy", "1.2.3", study("1.2.3"))])   # written again in the run (a watch does)
    first.flush()
    assert len(merges) == 3   # one per table, for 1.2.3 only
    again = DeltaTables(uri, "http://a/dicom-web", 2)
    again.add("1.2.4", [("ImagingStudy", "1.2.4", study("1.2.4"))])
    again.add("1.2.6", [("ImagingStudy", "1.2.6", study("1.2.6"))])
    again.flush()
    assert len(merges) == 6   # one per table, for 1.2.4 only
    rows = delta_rows(con, tmp_path / "delta", "studies", drop=())
    assert [(r["study_uid"], r["run_id"]) for r in rows] == [("1.2.3", 1), ("1.2.4", 2), ("1.2.5", 1), ("1.2.6", 2)]
    series = delta_rows(con, tmp_path / "delta", "series")
    assert len(series) == len({(r["study_uid"], r["series_uid"]) for r in series}) > 0


def test_a_run_stopped_between_the_tables_commits_is_repaired_by_the_next(tmp_path, monkeypatch):
    """studies committed, series and instances not (the process died, or the store failed): the
    state did not record the checkpoint, the next run sends the studies again and the merges give
    the tables of a run that was never stopped."""
    con = duckdb.connect()
    changed = orjson.loads(study("1.2.3"))
    changed["series"][0]["instance"].append({**changed["series"][0]["instance"][0], "uid": "1.2.3.1.2"})
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    for uri in (clean, stopped):
        sink = DeltaTables(str(uri), "http://a/dicom-web", 1)
        sink.add("1.2.3", [("ImagingStudy", "a", study("1.2.3"))])
        sink.flush()
    sink = DeltaTables(str(clean), "http://a/dicom-web", 2)
    sink.add("1.2.3", [("ImagingStudy", "a", orjson.dumps(changed))])
    sink.flush()

    commit = DeltaTables._commit

    def dies_after_studies(self, name, rows, touched):
        if name != "studies":
            raise SinkError("the store went away")
        commit(self, name, rows, touched)

    monkeypatch.setattr(DeltaTables, "_commit", dies_after_studies)
    sink = DeltaTables(str(stopped), "http://a/dicom-web", 2)
    sink.add("1.2.3", [("ImagingStudy", "a", orjson.dumps(changed))])
    with pytest.raises(SinkError):
        sink.flush()
    sink.abort()
    assert len(delta_rows(con, stopped, "instances")) == 1 and delta_rows(con, stopped, "studies") == delta_rows(con, clean, "studies")
    monkeypatch.setattr(DeltaTables, "_commit", commit)
    rerun = DeltaTables(str(stopped), "http://a/dicom-web", 3)
    rerun.add("1.2.3", [("ImagingStudy", "a", orjson.dumps(changed))])
    rerun.flush()
    for name in TABLES:
        assert delta_rows(con, stopped, name) == delta_rows(con, clean, name), name
    assert len(delta_rows(con, stopped, "instances")) == 2
