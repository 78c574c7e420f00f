"""`qido-crawler status`: per source, what an operator needs to act on, read from a state that real
syncs made against the simulators in fixtures/ (fakepacs: studies that fail, an inconsistent count,
a study deleted between runs, a server that goes away, a run killed while it waits)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from crawler.cli import main
from crawler.state import State
from crawler.status import FailedStudy, RunFacts, SourceFacts, StudyCount, age_in_words, render, report
from fixtures.fakepacs import Behaviour, FakePacs

COMMON = ("--metadata", "never", "--retries", "0", "--timezone", "UTC", "-q")
A_FAULTS = {"inconsistent": {2: 1}, "malformed": frozenset({5}), "bad_values": frozenset({9})}


def status(capsys: pytest.CaptureFixture[str], state: Path | str, *extra: str) -> tuple[int, str, str]:
    code = main(["status", "--state", str(state), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def status_json(capsys: pytest.CaptureFixture[str], state: Path | str, *extra: str) -> dict[str, Any]:
    code, out, err = status(capsys, state, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def query(state: Path, sql: str, *args: object) -> list[tuple]:
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


class Made:
    """The state the fixture made, and what the tests compare the status with."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.a = self.b = ""
        self.a_uids: dict[int, str] = {}
        self.patient_data: list[str] = []
        self.while_running: dict[str, Any] = {}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    """Source A: run 1 (first, full) and run 2 (--full, after study 7 was deleted) with one study
    inconsistent (2) and two failing (5: a cut answer, 9: wrongly typed values); source B: run 3
    ok, run 4 unreachable (the server gone); then run 5 of A, killed while its first request hangs
    (status is also read while it hangs)."""
    work = tmp_path_factory.mktemp("status")
    made = Made(work / "state.db")
    state = str(made.state)
    with FakePacs(n_studies=12, seed=41, **A_FAULTS) as a, FakePacs(n_studies=5, seed=42) as b:
        made.a, made.b = a.url, b.url
        made.a_uids = {i: a.study_uid(i) for i in range(12)}
        made.patient_data = [a.patient_id(i) for i in range(12)] + [b.patient_id(i) for i in range(5)]
        assert main(["sync", a.url, "--state", state, *COMMON]) == 1
        a.delete_study(7)
        assert main(["sync", a.url, "--state", state, "--full", *COMMON]) == 1
        assert main(["sync", b.url, "--state", state, *COMMON]) == 0
        b.stop()
        assert main(["sync", b.url, "--state", state, *COMMON]) == 3

        a.reset_counts()
        a.behaviour = Behaviour(stall_seconds=600, stall_every=1, **A_FAULTS)
        command = [sys.executable, "-m", "crawler", "sync", a.url, "--state", state, *COMMON]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not a.requests and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert process.poll() is None, "the sync ended before its first request"
            shown = io.StringIO()
            with contextlib.redirect_stdout(shown):
                assert main(["status", "--state", state, "--json"]) == 0
            made.while_running = json.loads(shown.getvalue())
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
            a.behaviour = Behaviour(**A_FAULTS)
    return made


def by_source(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {source["source"]: source for source in info["sources"]}


def test_json_gives_per_source_the_last_run_window_studies_oldest_failure_and_advice(made, capsys):
    info = status_json(capsys, made.state)
    assert info["schema_version"] == 1 and info["state"] == str(made.state)
    assert [s["source"] for s in info["sources"]] == sorted([made.a, made.b])
    a, b = by_source(info)[made.a], by_source(info)[made.b]
    ((mark,),) = query(made.state, "SELECT mark FROM runs WHERE id = 2")
    since = (datetime.strptime(mark, "%Y%m%d") - timedelta(days=7)).strftime("%Y%m%d")

    assert a["last_run"]["id"] == 5 and a["last_run"]["outcome"] == "interrupted" and a["last_run"]["ended"] is None
    assert a["last_run"]["figures"] == {} and a["last_run"]["error"] is None
    assert a["next_window"] == {"full": False, "since": since, "mark": mark, "lookback_days": 7,
                                "text": f"lists from {since} (mark {mark} - 7 days)"}
    assert a["changes_cursor"] is None
    assert a["studies"] == {"synced": 8, "failed": 2, "inconsistent": 1, "gone": 1}
    failed = sorted((made.a_uids[5], made.a_uids[9], made.a_uids[2]))
    assert a["oldest_failed"]["study_uid"] == failed[0] and a["oldest_failed"]["last_run"] == 2
    assert a["oldest_failed"]["error"].startswith(f"study {failed[0]}: ")
    assert (a["cap"], a["verified"], a["fallbacks"]) == (None, 12, {})
    assert [item["code"] for item in a["advice"]] == ["interrupted", "failed", "inconsistent", "gone_kept"]
    messages = [item["message"] for item in a["advice"]]
    assert re.fullmatch(r"an interrupted run \(run 5, started (just now|\d+ s ago)\): the next run recovers it "
                        r"\(the state stands at its last checkpoint; its folder is completed or removed\)", messages[0]), messages[0]
    assert messages[1:] == [
        "2 studies failed (last tried in run 2): they are asked for again by UID each run (at most 1,000 a run); the errors name the cause",
        ("1 study inconsistent (last tried in run 2): the server's count of instances disagrees with the instances it lists; "
         "it is asked for again each run until the two agree"),
        ("1 study gone from the PACS (found in run 2), 1 still in the state and in `export`: found without --prune, "
         "and a later --prune run deletes only what it finds gone itself"),
    ]

    assert b["last_run"]["id"] == 4 and b["last_run"]["outcome"] == "unreachable"
    assert b["last_run"]["age"] in ("just now",) or b["last_run"]["age"].endswith(" s ago")
    assert made.b.split("//")[1].split("/")[0] in b["last_run"]["error"]
    assert b["studies"] == {"synced": 5, "failed": 0, "inconsistent": 0, "gone": 0} and b["oldest_failed"] is None
    assert [item["code"] for item in b["advice"]] == ["unreachable"]
    assert b["advice"][0]["message"] == (f"last run ended unreachable {b['last_run']['age']}: the source could not be "
                                         "reached; check the URL and network")
    assert b["last_run"]["figures"]["studies_listed"] == 0 and "requests" not in b["last_run"]["figures"]
    assert b["next_window"]["full"] is False and b["next_window"]["mark"] is not None


def test_the_keys_of_earlier_versions_stay(made, capsys):
    """``studies`` over every source, the last ``runs`` and the ``problems``, as scripts read them."""
    info = status_json(capsys, made.state)
    assert info["studies"] == {"failed": 2, "gone": 1, "inconsistent": 1, "synced": 13}
    assert [(r["id"], r["outcome"]) for r in info["runs"]] == [(5, "interrupted"), (4, "unreachable"), (3, "ok"), (2, "partial"), (1, "partial")]
    assert info["runs"][3]["figures"]["studies_gone"] == 1
    assert sorted((p["status"], p["study_uid"]) for p in info["problems"]) == sorted(
        [("failed", made.a_uids[5]), ("failed", made.a_uids[9]), ("inconsistent", made.a_uids[2]), ("gone", made.a_uids[7])])


def test_text_says_the_same_as_json(made, capsys):
    info = status_json(capsys, made.state)
    code, out, err = status(capsys, made.state)
    assert code == 0 and err == ""
    assert out.splitlines() == render(info)
    a = by_source(info)[made.a]
    lines = out.splitlines()
    start = lines.index(f"source {made.a}")
    block = lines[start:start + 16]
    assert block[1].startswith("  last run: run 5, ") and block[1].endswith(": interrupted")
    assert block[2] == f"  next run: {a['next_window']['text']}"
    # run 2 (partial) is the newest of A's runs that ended whole: 5 was killed, 3 and 4 are B's
    assert a["lag"]["run"] == 2 and a["lag"]["seconds"] >= 0
    assert block[3] == f"  lag: at most {a['lag']['text']} (the copy holds what the PACS held when run 2 started, {a['lag']['since']})"
    assert block[4].startswith("  change feed: none (--changes qido: StudyDate windows only;")
    assert block[5] == "  studies: 8 synced, 2 failed, 1 inconsistent, 1 gone"
    assert block[6].startswith(f"  oldest failed: {a['oldest_failed']['study_uid']} ({a['oldest_failed']['status']}, run 2): study ")
    assert block[7] == "  server: no result cap found (listings of up to 12 studies checked)"
    assert block[8] == "  to do:"
    assert block[9:13] == [f"    - {item['message']}" for item in a["advice"]]
    assert lines[0] == f"state {made.state} (schema {info['schema']})"


def test_no_patient_name_or_id_in_either_form(made, capsys):
    shown = status(capsys, made.state)[1] + status(capsys, made.state, "--json")[1]
    assert made.a_uids[5] in shown   # the output does name studies, by UID
    assert "PATIENT" not in shown and "SIMULATED^" not in shown
    assert [pid for pid in made.patient_data if pid in shown] == []


def test_a_run_in_progress_is_shown_running(made):
    """While run 5 hung on its first request, status (read-only, beside the run holding the lock)
    said it is running; once it was killed, interrupted (see above)."""
    a = by_source(made.while_running)[made.a]
    assert a["last_run"]["id"] == 5 and a["last_run"]["outcome"] == "running"
    assert [item["code"] for item in a["advice"]][:1] == ["running"]
    assert a["advice"][0]["message"].startswith("run 5 is running now (started ")


def test_status_writes_nothing(made, capsys):
    """The database and its log keep their bytes and times (readers of a WAL database mark the
    -shm index, which is SQLite's own), and no file is made."""

    def files() -> dict[str, Any]:
        return {p.name: None if p.name.endswith("-shm") else (p.read_bytes(), p.stat().st_mtime_ns) for p in made.state.parent.iterdir()}

    before = files()
    assert "state.db" in before
    status(capsys, made.state)
    status(capsys, made.state, "--json")
    assert files() == before


def test_lookback_moves_the_window_shown(made, capsys):
    a = by_source(status_json(capsys, made.state, "--lookback", "30"))[made.a]
    mark = a["next_window"]["mark"]
    since = (datetime.strptime(mark, "%Y%m%d") - timedelta(days=30)).strftime("%Y%m%d")
    assert a["next_window"]["text"] == f"lists from {since} (mark {mark} - 30 days)"
    code, _, err = status(capsys, made.state, "--lookback", "-1")
    assert code == 2 and "--lookback" in err


def test_an_empty_state_says_there_are_no_runs(tmp_path, capsys):
    path = tmp_path / "state.db"
    State(path).close()
    info = status_json(capsys, path)
    assert (info["sources"], info["studies"], info["runs"]) == ([], {}, [])
    code, out, _ = status(capsys, path)
    assert code == 0
    assert out.splitlines()[1:] == ["  no runs yet: the first sync of a source lists everything"]


@pytest.mark.parametrize("kind", ["not a database", "cut in half", "missing"])
def test_a_state_that_cannot_be_read_is_exit_2_with_one_line(kind, made, tmp_path, capsys):
    path = tmp_path / "state.db"
    if kind == "not a database":
        path.write_bytes(b"this is not a SQLite database " * 200)
    elif kind == "cut in half":
        data = made.state.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    before = path.read_bytes() if path.exists() else None
    for extra in ((), ("--json",)):
        code, out, err = status(capsys, path, *extra)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith("qido-crawler: error:") and str(path) in err
    assert (path.read_bytes() if path.exists() else None) == before


def test_stored_errors_are_shown_on_one_line_without_credentials(tmp_path, capsys):
    """A state edited by hand, or written by an older version, whose error holds a password in a
    URL and line breaks: status shows one line, the password hidden."""
    path = tmp_path / "state.db"
    state = State(path)
    try:
        run = state.begin_run("http://pacs/dicom-web", "2026-12-06T00:00:00+00:00")
        state.record_study("http://pacs/dicom-web", "1.2.3", run_id=run, status="failed",
                           error="study 1.2.3: refused by http://bob:hunter2@fhir.example/fhir/x?password=hunter2\nsecond line")
        state.finish_run(run, "2026-12-06T00:00:01+00:00", "partial", None, {"studies_failed": 1})
    finally:
        state.close()
    shown = status(capsys, path)[1] + status(capsys, path, "--json")[1]
    assert "hunter2" not in shown
    info = status_json(capsys, path)
    assert info["sources"][0]["oldest_failed"]["error"] == (
        "study 1.2.3: refused by http://fhir.example/fhir/x?password=*** second line")


def test_the_oldest_failed_study_is_the_one_tried_longest_ago(tmp_path, capsys):
    path = tmp_path / "state.db"
    source = "http://pacs/dicom-web"
    state = State(path)
    try:
        runs = [state.begin_run(source, f"2026-12-0{n}T00:00:00+00:00") for n in (1, 2, 3)]
        state.record_study(source, "1.9", run_id=runs[2], status="failed", error="study 1.9: newest")
        state.record_study(source, "1.5", run_id=runs[1], status="inconsistent", error="study 1.5: middle")
        state.record_study(source, "1.1", run_id=runs[2], status="synced")
        state.record_study(source, "1.7", run_id=runs[1], status="failed", error="study 1.7: oldest")
        for run in runs:
            state.finish_run(run, "2026-12-06T00:00:00+00:00", "partial", None, {}, mark="20261205")
        state.set_changes_position(source, 4711)
    finally:
        state.close()
    (source_info,) = status_json(capsys, path)["sources"]
    assert source_info["changes_cursor"] == {"feed": "orthanc", "cursor": "4711"}
    assert source_info["oldest_failed"] == {"study_uid": "1.5", "status": "inconsistent", "last_run": 2, "error": "study 1.5: middle"}
    assert source_info["advice"][0]["message"].startswith("2 studies failed (last tried in runs 2 to 3): ")


# --- the pure part: what is said, from given facts and a given time -----------------------

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)


def _at(hours_ago: float) -> str:
    return (NOW - timedelta(hours=hours_ago)).isoformat()


@pytest.mark.parametrize(("seconds", "words"), [(0, "just now"), (4.9, "just now"), (5, "5 s ago"), (59, "59 s ago"), (60, "1 min ago"),
                                                 (3599, "59 min ago"), (3600, "1 h ago"), (47 * 3600, "47 h ago"), (48 * 3600, "2 days ago")])
def test_age_in_words(seconds, words):
    assert age_in_words(seconds) == words


def test_advice_for_an_unreachable_source_without_a_complete_listing_and_many_failures():
    facts = SourceFacts(
        source="https://pacs.example/dicom-web",
        last_run=RunFacts(14, _at(2.5), _at(2), "unreachable", {"error": "x"}, error="cannot reach pacs.example:443: connection refused"),
        studies={"failed": StudyCount(2500, 3, 12), "synced": StudyCount(10, 1, 12)},
        oldest_failed=FailedStudy("1.2.3", "failed", 3, "study 1.2.3: 404"),
        changes_cursor=("orthanc", "4711"),
        cap=1000, verified=0, fallbacks={"metadata_unavailable": "404 on WADO-RS metadata"},
    )
    info = report("s.db", 10, [facts], NOW, lookback=7, retry_per_run=1000)
    (source,) = info["sources"]
    assert source["last_run"]["age"] == "2 h ago" and source["last_run"]["age_seconds"] == 7200
    assert source["studies"] == {"synced": 10, "failed": 2500, "inconsistent": 0, "gone": 0}
    assert [item["message"] for item in source["advice"]] == [
        "last run ended unreachable 2 h ago: the source could not be reached; check the URL and network",
        "no complete listing yet: the next run lists everything",
        ("2,500 studies failed (last tried in runs 3 to 12): they are asked for again by UID each run "
         "(at most 1,000 a run, so about 3 runs); the errors name the cause"),
    ]
    assert source["next_window"]["text"] == "lists everything (no complete listing yet)"
    lines = render(info)
    assert source["changes_cursor"] == {"feed": "orthanc", "cursor": "4711"}
    assert "  change feed: orthanc, read up to 4711 (the next run with --changes orthanc reads on from there)" in lines
    assert "  server: a cap of 1,000 results per query (learned; windows are split under it)" in lines
    assert "  fallback: metadata_unavailable (404 on WADO-RS metadata)" in lines
    assert "  last run: run 14, 2 h ago (" + _at(2.5) + "): unreachable" in lines
    assert "    error: cannot reach pacs.example:443: connection refused" in lines


def test_advice_for_runs_that_have_not_ended_a_failed_run_and_an_incomplete_listing():
    running = RunFacts(21, _at(0.05), None, None, None, alive=True)
    killed = RunFacts(20, _at(30), None, None, None, alive=False)
    unknown = RunFacts(19, _at(50), None, None, None, alive=None)
    facts = SourceFacts(
        source="https://pacs.example/dicom-web",
        last_run=RunFacts(18, _at(51), _at(50), "failed", {"windows_incomplete": 2, "studies_listed": 40}, error="the FHIR server refused"),
        unended=(unknown, killed, running), mark="20261201",
    )
    (source,) = report("s.db", 10, [facts], NOW, lookback=3, retry_per_run=1000)["sources"]
    assert [item["code"] for item in source["advice"]] == ["not_ended", "interrupted", "running", "run_failed", "listing_incomplete"]
    assert source["advice"][1]["message"].startswith("an interrupted run (run 20, started 30 h ago): the next run recovers it")
    assert source["advice"][2]["message"].startswith("run 21 is running now (started 3 min ago): wait for it")
    assert source["advice"][3]["message"] == (
        "last run failed 2 days ago (see its error): the state keeps what its checkpoints committed, and the next run "
        "goes on from there once the cause is fixed")
    assert source["advice"][4]["message"].startswith("the last run could not list 2 windows completely: the mark did not move")
    assert source["next_window"]["text"] == "lists from 20261128 (mark 20261201 - 3 days)"
    assert source["last_run"]["figures"] == {"windows_incomplete": 2, "studies_listed": 40}


def test_a_source_without_problems_has_nothing_to_do():
    facts = SourceFacts(source="http://pacs/dicom-web", last_run=RunFacts(3, _at(1), _at(1), "ok", {
        "studies_listed": 4, "studies_new": 1, "studies_changed": 0, "studies_unchanged": 3, "resources_written": 2, "seconds": 1.25,
        "requests": {"total": 7, "studies": 2, "retries": 1}}), mark="20261206", studies={"synced": StudyCount(4, 1, 3)})
    info = report("s.db", 10, [facts], NOW, lookback=7, retry_per_run=1000)
    assert info["sources"][0]["advice"] == []
    lines = render(info)
    assert lines[2] == (f"  last run: run 3, 1 h ago ({_at(1)}): ok; listed 4, new 1, unchanged 3; 2 resources written; "
                        "7 requests (1 retried); 1.2 s")
    assert lines[-1] == "  to do: nothing"


def test_a_postgresql_state_says_the_same_and_cannot_tell_a_killed_run_from_a_running_one(postgres_server, tmp_path, capsys):
    """The same reads on PostgreSQL (its SQL dialect, a read-only session); a run that never
    recorded its end, while the run lock names another machine, may be running there: it is
    "not ended", not "interrupted"."""
    url = postgres_server.create_database()
    with FakePacs(n_studies=12, seed=41, **A_FAULTS) as a:
        assert main(["sync", a.url, "--state", url, *COMMON]) == 1
        a.delete_study(7)
        assert main(["sync", a.url, "--state", url, "--full", *COMMON]) == 1
    state = State(url)
    try:
        state.begin_run(a.url, "2026-12-06T00:00:00+00:00")   # a run that never ends
    finally:
        state.close()
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("UPDATE run_lock SET host = 'another-machine'")   # every label: the whole state's and each source's
    (source,) = status_json(capsys, url)["sources"]
    assert source["source"] == a.url and source["studies"] == {"synced": 8, "failed": 2, "inconsistent": 1, "gone": 1}
    assert source["last_run"]["id"] == 3 and source["last_run"]["outcome"] == "not ended"
    assert [item["code"] for item in source["advice"]] == ["not_ended", "failed", "inconsistent", "gone_kept"]
    assert source["oldest_failed"]["last_run"] == 2 and source["verified"] == 12


@pytest.mark.parametrize(("lock_names", "outcome"), [("the run", "running"), ("another process", "interrupted"), ("nobody", "interrupted")])
def test_a_run_is_running_only_while_it_is_alive_and_the_run_lock_names_it(lock_names, outcome, tmp_path, capsys):
    """A killed run's pid may be taken by another process: a live pid alone does not make a run
    running, the run lock's label (``<state>.lock``) must name it too."""
    path = tmp_path / "state.db"
    state = State(path)
    try:
        state.begin_run("http://pacs/dicom-web", "2026-12-06T00:00:00+00:00")   # this process's pid, alive
    finally:
        state.close()
    lock = tmp_path / "state.db.lock"
    if lock_names == "the run":
        lock.write_text(str(os.getpid()))
    elif lock_names == "another process":
        lock.write_text("2147483646")
    (source,) = status_json(capsys, path)["sources"]
    assert source["last_run"]["outcome"] == outcome
    assert source["advice"][0]["code"] == outcome


@pytest.mark.parametrize("version", [1, 4, 9])
def test_a_state_an_older_version_wrote_is_read_as_it_is(version, tmp_path, capsys):
    """Status reads a state of an older schema read-only, with the columns it has: no mark before
    schema 3, Orthanc's change position in its own column from schema 4 to 9 (a later schema keeps
    a cursor per change source)."""
    from crawler.state import MIGRATIONS

    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)")
    for number, name, sql in MIGRATIONS[:version]:
        db.executescript(sql)
        db.execute("INSERT INTO migrations (version, name) VALUES (?, ?)", (number, name))
    source = "http://pacs/dicom-web"
    db.execute("INSERT INTO runs (id, source, started, ended, outcome, figures) VALUES (1, ?, '2026-12-06T00:00:00+00:00', "
               "'2026-12-06T00:00:05+00:00', 'partial', '{\"studies_listed\": 2}')", (source,))
    db.execute("INSERT INTO studies (source, study_uid, status, last_error, last_run) VALUES (?, '1.5', 'failed', 'study 1.5: 404', 1)", (source,))
    if version >= 3:
        db.execute("UPDATE runs SET mark = '20261206'")
    if version >= 4:
        db.execute("INSERT INTO sources (source, cap, verified_uncapped, changes_seq) VALUES (?, NULL, 2, 77)", (source,))
    db.commit()
    db.close()
    before = path.read_bytes()
    (info,) = status_json(capsys, path)["sources"]
    assert path.read_bytes() == before
    assert info["studies"] == {"synced": 0, "failed": 1, "inconsistent": 0, "gone": 0}
    assert info["oldest_failed"] == {"study_uid": "1.5", "status": "failed", "last_run": 1, "error": "study 1.5: 404"}
    assert info["next_window"]["mark"] == (None if version < 3 else "20261206")
    assert info["changes_cursor"] == (None if version < 4 else {"feed": "orthanc", "cursor": "77"})
