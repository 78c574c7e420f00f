"""The state on PostgreSQL (``--state postgresql://...``): the same schema and migrations as
SQLite, and the sync, incremental and kill scenarios give the same results on it.

The server is a throw-away PostgreSQL (fixtures/postgres.py, session fixture
``postgres_server``); every test gets a database of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from crawler.cli import main
from crawler.config import SyncConfig
from crawler.errors import ConfigError, StateError
from crawler.http import redact as redact_url
from crawler.state import MIGRATIONS, State, StateLocked, open_existing, postgres_url
from fixtures import corpus
from fixtures.fakepacs import FakePacs

from test_crash_safety import kill_at_request
from test_incremental_live import Runner, _copy_with, study_uids


def exported_lines(state: str | Path, target: Path) -> dict[str, list[str]]:
    """``export`` of a state: NDJSON lines per file, sorted."""
    assert main(["export", "--state", str(state), "--out", str(target), "-q"]) == 0
    return {p.name: sorted(p.read_text().splitlines()) for p in sorted(target.glob("*.ndjson"))}


# --- one schema, two dialects ----------------------------------------------------------------


def _sqlite_columns(path: Path) -> dict[str, list[str]]:
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(r[1] for r in db.execute(f"PRAGMA table_info({t})")) for t in tables}
    finally:
        db.close()


def _postgres_columns(server, database: str) -> dict[str, list[str]]:
    columns: dict[str, list[str]] = {}
    for table, column in server.sql(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2", database
    ):
        columns.setdefault(table, []).append(column)
    return columns


def test_both_dialects_migrate_to_the_same_schema(postgres_server, tmp_path):
    url = postgres_server.create_database()
    database = url.rsplit("/", 1)[1]
    lite, pg = State(tmp_path / "state.db"), State(url)
    try:
        assert lite.dialect == "sqlite" and pg.dialect == "postgresql"
        assert lite.schema_version == pg.schema_version == max(v for v, _, _ in MIGRATIONS)
    finally:
        lite.close()
        pg.close()
    assert _sqlite_columns(tmp_path / "state.db") == _postgres_columns(postgres_server, database)
    # ids are 64-bit as in SQLite, bodies are bytes, text compares by bytes (as SQLite) whatever the locale
    types = dict(((t, c), (d, coll)) for t, c, d, coll in postgres_server.sql(
        "SELECT table_name, column_name, data_type, collation_name FROM information_schema.columns WHERE table_schema = 'public'", database))
    assert types[("runs", "id")][0] == types[("studies", "n_instances")][0] == "bigint"
    assert types[("resources", "body")][0] == "bytea"
    assert types[("studies", "study_uid")] == ("text", "C")
    # opening again applies nothing and keeps the version
    again = open_existing(url)
    assert again.schema_version == max(v for v, _, _ in MIGRATIONS)
    again.close()
    assert len(postgres_server.sql("SELECT version FROM migrations", database)) == len(MIGRATIONS)


def test_both_dialects_answer_alike(postgres_server, tmp_path):
    """Every State method, the same calls on both dialects, the same answers (including order)."""
    answers = []
    for where in (tmp_path / "state.db", postgres_server.create_database()):
        state = State(where)
        try:
            run = state.begin_run("src", "2024-01-01T00:00:00+00:00")
            state.begin()
            # UIDs and ids that a locale's collation orders otherwise than bytes (punctuation, case)
            for uid, date in (("1.23", "20240102"), ("1.2.4", "20240101"), ("1.2.9", "20240101"), ("1.2.A", None),
                              ("1.2.a", "20231231"), ("1.2.B", "20240102")):
                state.record_study("src", uid, run_id=run, status="synced", resource_id=f"r{uid}", n_series=1, n_instances=2,
                                   study_hash="h", resource_hash="rh", study_date=date)
                state.put_resource("ImagingStudy", f"r{uid}", "d", json.dumps({"uid": uid}).encode())
            state.record_study("src", "1.3", run_id=run, status="failed", error="boom")
            state.checkpoint()
            state.set_source_facts("src", 100, 50)
            state.set_changes_position("src", 2**40)
            state.mark_gone("src", "1.2.A", run)
            state.drop_resource("ImagingStudy", "r1.2.A")
            state.commit()
            second = state.begin_run("src", "2024-01-02T00:00:00+00:00")
            state.mark_seen("src", "1.2.9", second)
            state.finish_run(run, "2024-01-01T01:00:00+00:00", "ok", None, {"n": 1}, "20240101", ["all"])
            answers.append((
                run, second, state.close_interrupted_runs(second, "src"), state.study("src", "1.2.9"), state.study("src", "nope"),
                list(state.iter_unseen("src", second, None, None)), list(state.iter_unseen("src", second, "20240101", "20240102")),
                list(state.iter_resources()), state.counts_by_status(), state.last_runs(), state.problems(),
                state.source_facts("src"), state.source_facts("other"), state.changes_position("src"), state.last_mark("src"),
                state.resource_hash("ImagingStudy", "r1.2.9"), state.schema_version,
            ))
        finally:
            state.close()
    assert answers[0] == answers[1]


def test_the_url_survives_path_and_config_and_passwords_are_not_shown(postgres_server):
    url = "postgresql://crawler:s3cret@db.example:5432/qido?sslmode=require"
    assert postgres_url(Path(url)) == url  # what argparse's type=Path makes of it
    assert postgres_url(url) == url and postgres_url("postgres://h/db") == "postgres://h/db"
    assert postgres_url("state.db") is None and postgres_url(Path("/var/lib/qido/state.db")) is None
    assert SyncConfig(url="http://x/dicom-web", state=Path(url)).state == url
    assert SyncConfig(url="http://x/dicom-web", state="s.db").state == Path("s.db")
    assert "s3cret" not in redact_url(url) and "s3cret" not in redact_url("postgresql://h/db?password=s3cret&sslmode=require")
    with pytest.raises(StateError) as caught:
        State("postgresql://crawler:s3cret@127.0.0.1:9/qido")
    assert "s3cret" not in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(StateError, match="does not exist"):
        open_existing(postgres_server.database_url("no_such_database"))


def test_without_psycopg_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError, match=r"pip install 'qido-crawler\[postgres\]'"):
        State("postgresql://127.0.0.1:9/qido")


def test_a_lost_connection_is_a_state_error(postgres_server):
    url = postgres_server.create_database()
    state = State(url, lock=True)
    try:
        # the lock's session dies: nothing more is committed
        state.begin()
        state.set_source_facts("src", 1, 1)
        postgres_server.sql(f"SELECT pg_terminate_backend({state._lock.info.backend_pid})")
        with pytest.raises(StateError, match="lost the run lock"):
            state.commit()
        state.rollback()
        other = State(url, lock=True)  # the server released the lock with the session
        other.close()
        # the state's own session dies: a StateError, not a driver traceback
        postgres_server.sql(f"SELECT pg_terminate_backend({state.db.info.backend_pid})")
        with pytest.raises(StateError, match="lost the state"):
            state.study("src", "1.2.3")
    finally:
        state.close()


# --- sync on a live Orthanc: same export as SQLite -------------------------------------------

ZONE = ["--timezone", "Europe/Berlin"]


def _sync(capsys, url: str, state: str | Path, out: Path, *extra: str) -> dict:
    code = main(["sync", url, "--out", str(out), "--state", str(state), "--json", *ZONE, *extra])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    return json.loads(stdout)


def test_sync_then_full_sync_writes_nothing_and_exports_what_sqlite_exports(pacs, corpus_study_uids, postgres_server, tmp_path, capsys):
    url = postgres_server.create_database()
    first = _sync(capsys, pacs.dicomweb, url, tmp_path / "out")
    assert first["studies_new"] == len(corpus_study_uids) and first["resources_written"] == len(corpus_study_uids) + 1
    second = _sync(capsys, pacs.dicomweb, url, tmp_path / "out", "--full")
    assert second["resources_written"] == 0 and second["run_dir"] is None
    assert second["studies_unchanged"] == len(corpus_study_uids) and second["studies_new"] == second["studies_changed"] == 0

    lite = tmp_path / "state.db"
    _sync(capsys, pacs.dicomweb, lite, tmp_path / "out-sqlite")
    from_postgres = exported_lines(url, tmp_path / "export-pg")
    assert from_postgres == exported_lines(lite, tmp_path / "export-sqlite")
    assert len(from_postgres["ImagingStudy.ndjson"]) == len(corpus_study_uids)

    assert main(["status", "--state", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["studies"] == {"synced": len(corpus_study_uids)} and [r["outcome"] for r in status["runs"]] == ["ok", "ok"]
    assert status["state"] == url
    # with a password in the URL (the test server trusts every local connection, so any works)
    secret = "s3cret-Pw"
    with_password = url.replace("postgres@", f"postgres:{secret}@", 1)
    assert with_password != url
    assert main(["status", "--state", with_password, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["state"] == url.replace("postgres@", "postgres:***@", 1)
    assert secret not in captured.out + captured.err

    assert main(["audit", pacs.dicomweb, "--report", str(tmp_path / "audit"), "--state", url, "--json"]) in (0, 1)
    audit = json.loads(capsys.readouterr().out)
    codes = {f["code"] for f in json.loads((tmp_path / "audit" / "findings.json").read_text())["findings"]}
    assert not codes & {"MISSING_FROM_STATE", "EXTRA_IN_STATE", "STALE_IN_STATE"}, audit


# --- incremental runs on a changing Orthanc --------------------------------------------------


def test_incremental_add_then_added_instances_and_prune(live, corpus_files, postgres_server, tmp_path, capsys):
    runner = Runner(live, tmp_path, capsys)
    runner.state = postgres_server.create_database()
    first = runner.sync()
    assert first["studies_new"] == 16

    # a study of today is found by the default (incremental) run
    source = next(p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == corpus.uid("study", "07"))
    new_uid = corpus.uid("study", "new")
    today = time.strftime("%Y%m%d", time.gmtime())
    live.upload([_copy_with(source, tmp_path / "new.dcm", StudyInstanceUID=new_uid, SeriesInstanceUID=corpus.uid("series", "new"),
                            SOPInstanceUID=corpus.uid("instance", "new"), StudyDate=today)])
    summary = runner.sync()
    assert summary["scope"].startswith("since ")
    assert (summary["studies_new"], summary["studies_changed"], summary["studies_gone"]) == (1, 0, 0)
    assert study_uids(runner.folder(summary)["ImagingStudy"]) == {new_uid}

    # an instance added to one study, another study deleted: one update, one deletion
    changed = corpus.uid("study", "09")
    source = next(p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == changed)
    live.upload([_copy_with(source, tmp_path / "extra.dcm", SOPInstanceUID=corpus.uid("instance", "extra"), InstanceNumber=99)])
    gone = corpus.uid("study", "03")
    live.rest("DELETE", f"/studies/{live.rest('POST', '/tools/lookup', data=gone).json()[0]['ID']}")
    summary = runner.sync("--full", "--prune")
    assert (summary["studies_new"], summary["studies_changed"], summary["studies_unchanged"]) == (0, 1, 15)
    assert (summary["studies_gone"], summary["resources_deleted"]) == (1, 1)
    content = runner.folder(summary)
    assert study_uids(content["ImagingStudy"]) == {changed}
    state = State(runner.state)
    assert state.study(live.dicomweb, gone).status == "gone"
    resource_id = state.study(live.dicomweb, gone).resource_id
    state.close()
    assert content["Bundle"][0]["entry"] == [{"request": {"method": "DELETE", "url": f"ImagingStudy/{resource_id}"}}]

    lines = exported_lines(runner.state, tmp_path / "export")["ImagingStudy.ndjson"]
    assert len(lines) == 16 and gone not in study_uids([json.loads(line) for line in lines])
    again = runner.sync("--full", "--prune")
    assert again["studies_gone"] == 0 and again["run_dir"] is None and again["resources_written"] == 0


# --- killed runs, and one run at a time -------------------------------------------------------

KILL_FRACTIONS = [0.02, 0.17, 0.56, 0.93]


def sync_command(url: str, state: str, work: Path) -> list[str]:
    return [
        sys.executable, "-m", "crawler", "sync", url, "--state", state, "--out", str(work / "out"),
        "--metadata", "never", "--page-size", "10", "--workers", "2", "--checkpoint-every", "7", "--timezone", "UTC", "-q",
    ]


@pytest.fixture(scope="module")
def fake_pacs():
    with FakePacs(n_studies=60, seed=21, latency=0.01) as server:
        yield server


@pytest.fixture(scope="module")
def reference(fake_pacs, tmp_path_factory) -> tuple[dict, int]:
    """The export of an uninterrupted run with a SQLite state, and how many requests it made."""
    work = tmp_path_factory.mktemp("clean")
    fake_pacs.reset_counts()
    subprocess.run(sync_command(fake_pacs.url, str(work / "state.db"), work), check=True, timeout=300)
    return exported_lines(work / "state.db", work / "export"), len(fake_pacs.requests)


@pytest.mark.parametrize("fraction", KILL_FRACTIONS)
def test_sigkill_at_any_point_then_rerun_gives_the_clean_export(fake_pacs, reference, postgres_server, tmp_path, fraction):
    """As in test_crash_safety: the kill point is a fraction of the reference run's requests, and
    that request is held unanswered until the crawler is killed."""
    reference, total = reference
    assert total > 40
    kill_after = min(total - 1, 1 + int(fraction * total))
    url = postgres_server.create_database()
    fake_pacs.reset_counts()
    killed = kill_at_request(fake_pacs, sync_command(fake_pacs.url, url, tmp_path), kill_after, 0.01)
    assert killed, f"the sync finished before {kill_after} of {total} requests"

    rerun = subprocess.run(sync_command(fake_pacs.url, url, tmp_path) + ["--full"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert exported_lines(url, tmp_path / "export") == reference
    written = []
    for folder in sorted((tmp_path / "out").iterdir()):
        assert (folder / "manifest.json").exists() and not (folder / "checkpoint.json").exists()
        path = folder / "ImagingStudy.ndjson"
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []
        assert len(ids) == len(set(ids)), f"{folder.name} has a study twice"
        written += ids
    assert set(written) >= {json.loads(line)["id"] for line in reference["ImagingStudy.ndjson"]}
    state = State(url)
    outcomes = [r["outcome"] for r in state.last_runs()]
    state.close()
    assert outcomes[0] == "ok" and outcomes[-1] == "interrupted"


def test_a_second_run_on_the_same_state_exits_2_at_once(postgres_server, tmp_path, capsys):
    url = postgres_server.create_database()
    holder = State(url, lock=True)
    try:
        # nothing listens on port 9: a run that went to the server before the lock would end
        # with exit 3, not 2
        code = main(["sync", "http://127.0.0.1:9/dicom-web", "--state", url])
        err = capsys.readouterr().err
        assert code == 2
        assert f"another run (pid {os.getpid()} on {socket.gethostname()}) is using the state {url}" in err
        assert len(err.strip().splitlines()) == 1
        with pytest.raises(StateLocked):
            State(url, lock=True)
        State(postgres_server.create_database(), lock=True).close()  # another database: another lock
        reader = open_existing(url)  # status and export need no lock
        reader.close()
    finally:
        holder.close()
    State(url, lock=True).close()


def test_the_lock_of_a_killed_run_is_taken_over(fake_pacs, postgres_server, tmp_path):
    url = postgres_server.create_database()
    script = f"from crawler.state import State; import time; s = State({url!r}, lock=True); print('locked', flush=True); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    with pytest.raises(StateLocked, match=f"pid {process.pid} "):
        State(url, lock=True)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    process.stdout.close()
    done = subprocess.run(sync_command(fake_pacs.url, url, tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
