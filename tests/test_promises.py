"""Promises of the README that protect outputs and patient data, each with a test that can fail.

Faults no real server shows on demand (a listing that breaks part-way, a cap that cannot be split
around) come from the simulators in fixtures/ (fakepacs, fakefhir); the rest uses the real Orthanc.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crawler.cli import main
from crawler.state import State
from fixtures.fakefhir import FakeFhir
from fixtures.fakepacs import Behaviour, FakePacs


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def study_rows(state_path: Path) -> dict[str, str]:
    state = State.open(state_path, read_only=True)
    try:
        return {row.study_uid: row.status for row in state.iter_study_rows()}
    finally:
        state.close()


def fhir_deletes(fhir: FakeFhir) -> list[str]:
    """Every DELETE the FHIR simulator received, alone or inside a Bundle."""
    deletes = [r.path for r in fhir.requests if r.method == "DELETE"]
    for bundle in fhir.transactions:
        deletes += [e["request"]["url"] for e in bundle.get("entry", []) if e.get("request", {}).get("method") == "DELETE"]
    return deletes


# --- 1. nothing is marked gone after a partial listing --------------------------------------

PARTIAL_LISTINGS = {
    # the study search answers 500 from offset 40 on: the listing stops part-way
    "fails part-way": Behaviour(fail_listing_from_offset=40, fail_status=500),
    # capped at 5, and the server ignores StudyDate: the window cannot be split
    "capped, cannot be split": Behaviour(max_results=5, cap_mode="warning", ignore_filters=True),
    # a silent cap (Orthanc's LimitFindResults) set on the server after the first run, which
    # had verified 60 studies uncapped: the listing looks complete and holds 6
    "silent cap since the last run": Behaviour(max_results=5, cap_mode="silent", newest_first=True),
    # a cap refused with 413: the dated studies are listed in parts, the 10 undated ones cannot be
    "413 cap, undated studies": Behaviour(max_results=5, cap_mode="413", newest_first=True),
}


@pytest.mark.parametrize("behaviour", PARTIAL_LISTINGS.values(), ids=PARTIAL_LISTINGS.keys())
def test_a_partial_listing_marks_nothing_gone_and_deletes_nothing(behaviour, tmp_path, capsys):
    out, state = tmp_path / "out", tmp_path / "state.db"
    with FakePacs(n_studies=60, seed=21, no_date_fraction=1 / 6) as pacs, FakeFhir() as fhir:
        common = (pacs.url, "--out", str(out), "--state", str(state), "--fhir-url", fhir.url,
                  "--page-size", "20", "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        code, stdout, stderr = run_cli(capsys, "sync", *common)
        assert code == 0, stderr
        truth = set(pacs.study_uids())
        assert len(truth) == 60 and study_rows(state) == dict.fromkeys(truth, "synced")
        fhir.reset_counts()

        pacs.behaviour = behaviour
        code, stdout, stderr = run_cli(capsys, "sync", *common, "--full", "--prune")
        summary = json.loads(stdout)
        assert code == 1, stderr
        assert summary["windows_incomplete"] >= 1
        assert summary["studies_gone"] == 0
        assert 0 < summary["studies_listed"] < 60
        assert study_rows(state) == dict.fromkeys(truth, "synced")
        assert fhir_deletes(fhir) == []
        assert len(fhir.resources) == 61   # 60 ImagingStudy + the Endpoint, all still there
        for folder in out.iterdir():
            assert not (folder / "deleted.ndjson").exists()
            manifest = json.loads((folder / "manifest.json").read_text())
            assert manifest["deleted"] == []


def test_a_complete_listing_does_mark_the_missing_study_gone(tmp_path, capsys):
    """The counterpart: with the same set-up and a clean listing, --prune does delete."""
    out, state = tmp_path / "out", tmp_path / "state.db"
    with FakePacs(n_studies=60, seed=21, no_date_fraction=1 / 6) as pacs, FakeFhir() as fhir:
        common = (pacs.url, "--out", str(out), "--state", str(state), "--fhir-url", fhir.url,
                  "--page-size", "20", "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        assert run_cli(capsys, "sync", *common)[0] == 0
        gone = pacs.study_uid(7)
        pacs.delete_study(7)
        code, stdout, stderr = run_cli(capsys, "sync", *common, "--full", "--prune")
        assert code == 0, stderr
        assert json.loads(stdout)["studies_gone"] == 1
        assert study_rows(state)[gone] != "synced"
        assert len(fhir_deletes(fhir)) == 1
        (deleted,) = [folder / "deleted.ndjson" for folder in out.iterdir() if (folder / "deleted.ndjson").exists()]
        assert len(deleted.read_text().splitlines()) == 1


def test_undated_studies_hidden_behind_a_cap_are_not_deleted(tmp_path, capsys):
    """A capped unfiltered listing whose first page shows no study without StudyDate: the
    undated studies past the cap are never listed and the listing looks complete; the search by
    UID before a deletion finds them still there."""
    out, state = tmp_path / "out", tmp_path / "state.db"
    with FakePacs(n_studies=60, seed=21, no_date_fraction=1 / 6) as pacs:
        common = (pacs.url, "--out", str(out), "--state", str(state), "--page-size", "20",
                  "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        assert run_cli(capsys, "sync", *common)[0] == 0
        pacs.behaviour = Behaviour(max_results=5, cap_mode="warning")   # oldest first: the undated come last
        code, stdout, stderr = run_cli(capsys, "sync", *common, "--full", "--prune")
        assert json.loads(stdout)["studies_gone"] == 0, stderr
        assert code == 1
        assert "the listing missed 10 studies the server still has" in stderr
        assert set(study_rows(state).values()) == {"synced"}


# --- 3. exit codes: a state that cannot be used is exit 2, one line ------------------------


@pytest.fixture(scope="module")
def good_state(tmp_path_factory) -> Path:
    """A real state of 200 studies (enough pages to damage some), from a sync of the simulator."""
    work = tmp_path_factory.mktemp("good-state")
    with FakePacs(n_studies=200, seed=22) as pacs:
        code = main(["sync", pacs.url, "--state", str(work / "state.db"), "--out", str(work / "out"), "--metadata", "never", "-q", "--timezone", "UTC"])
    assert code == 0
    return work / "state.db"


def _damaged(good: Path, target: Path, kind: str) -> Path:
    data = good.read_bytes()
    if kind == "not a database":
        target.write_bytes(b"this is not a SQLite database " * 200)
    elif kind == "cut in half":
        target.write_bytes(data[: len(data) // 2])
    elif kind.startswith("damaged "):
        import sqlite3

        table = kind.split()[1]   # every page of that table and of its indexes, overwritten
        db = sqlite3.connect(f"file:{good}?mode=ro", uri=True)
        size = db.execute("PRAGMA page_size").fetchone()[0]
        names = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE tbl_name = ? AND type IN ('table', 'index')", (table,))]
        pages = [n for name in names for (n,) in db.execute("SELECT pageno FROM dbstat WHERE name = ?", (name,))]
        db.close()
        assert pages
        damaged = bytearray(data)
        for n in pages:
            damaged[(n - 1) * size:n * size] = b"\xff" * size
        target.write_bytes(bytes(damaged))
    elif kind == "newer schema":
        import sqlite3

        target.write_bytes(data)
        db = sqlite3.connect(target)
        db.execute("INSERT INTO migrations (version, name) VALUES (999, 'from the future')")
        db.commit()
        db.close()
    elif kind == "a folder":
        target.mkdir()
    elif kind == "another program's database":
        import sqlite3

        db = sqlite3.connect(target)
        db.execute("CREATE TABLE invoices (number INTEGER PRIMARY KEY, amount TEXT)")
        db.execute("INSERT INTO invoices VALUES (1, '12.50')")
        db.commit()
        db.close()
    return target


STATE_KINDS = ["not a database", "cut in half", "newer schema", "a folder", "another program's database"]
COMMANDS = ["sync", "export", "status", "audit"]
# Damage found only when a page is read: each command meets the table it reads (sync both;
# export the resources; status and audit the studies). audit reads a state read-only and only
# the rows it compares, so a state that a newer version wrote can still be compared.
STATE_CASES = [
    *[(kind, command) for kind in STATE_KINDS for command in COMMANDS if (kind, command) != ("newer schema", "audit")],
    *[("damaged resources", command) for command in ("sync", "export")],
    *[("damaged studies", command) for command in ("sync", "status", "audit")],
]


@pytest.mark.parametrize(("kind", "command"), STATE_CASES, ids=[f"{k}-{c}" for k, c in STATE_CASES])
def test_a_state_that_cannot_be_used_is_exit_2_with_one_line(kind, command, good_state, tmp_path, capsys):
    state = _damaged(good_state, tmp_path / "state.db", kind)
    before = state.read_bytes() if state.is_file() else None
    with FakePacs(n_studies=5, seed=23) as pacs:
        args = {
            "sync": ["sync", pacs.url, "--out", str(tmp_path / "out"), "--metadata", "never"],
            "export": ["export", "--out", str(tmp_path / "export")],
            "status": ["status"],
            "audit": ["audit", pacs.url, "--report", str(tmp_path / "report")],
        }[command]
        code = main([*args, "--state", str(state)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qido-crawler: error:") and str(state) in lines[0], err
    if command == "export":
        assert not (tmp_path / "export" / "manifest.json").exists()
    if kind == "another program's database":
        assert state.read_bytes() == before, "the other program's database was changed"


# --- 3. exit 3 when the output folder cannot be written -------------------------------------
# Tests run as root, where file modes do not stop writes: the folders below cannot be made by
# anyone (a path through a regular file; /proc takes no new entries).

UNWRITABLE = {
    "under a file": ("a-file/out", "Not a directory"),
    "in /proc": ("/proc/qido-crawler-test-out", "No such file or directory"),
}


@pytest.mark.parametrize(("out", "reason"), UNWRITABLE.values(), ids=UNWRITABLE.keys())
def test_an_output_folder_that_cannot_be_written_is_exit_3_and_nothing_is_recorded(out, reason, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    with FakePacs(n_studies=10, seed=24) as pacs:
        code = main(["sync", pacs.url, "--state", "state.db", "--out", out, "--metadata", "never", "--timezone", "UTC"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert code == 3, err
    assert len(lines) == 1 and f"cannot write to {out}/" in lines[0] and reason in lines[0], err
    assert "exists already" not in err
    assert not any(status == "synced" for status in study_rows(tmp_path / "state.db").values())


# --- 3. audit: MISSING_FROM_STATE for a study the state records as gone ----------------------


def test_a_study_back_in_the_pacs_that_the_state_records_as_gone_is_missing_from_the_state(tmp_path, capsys):
    state = tmp_path / "state.db"
    with FakePacs(n_studies=20, seed=25) as pacs:
        port, back = pacs.port, pacs.study_uid(6)
        common = ("--state", str(state), "--metadata", "never", "--retries", "0", "--timezone", "UTC")
        assert main(["sync", pacs.url, *common]) == 0
        pacs.delete_study(6)
        assert main(["sync", pacs.url, "--full", *common]) == 0
    assert study_rows(state)[back] == "gone"
    # the same server (same URL) with the study back, as after a restore
    with FakePacs(n_studies=20, seed=25, port=port) as pacs:
        assert pacs.study_uid(6) == back
        report = tmp_path / "report"
        code = main(["audit", pacs.url, "--report", str(report), "--state", str(state), "--retries", "0", "--timezone", "UTC"])
    capsys.readouterr()
    findings = {f["code"]: set(f["studies"]) for f in json.loads((report / "findings.json").read_text())["findings"]}
    assert findings == {"MISSING_FROM_STATE": {back}}
    assert code == 0


# --- 3. exit 3 when the FHIR server goes away after the start-up check ------------------------


class PacsThatStopsTheFhirServer(FakePacs):
    """The simulator, stopping a FHIR server when the first PACS request arrives: after the
    sync's start-up check of the FHIR server (which comes first) and before anything is sent."""

    fhir: FakeFhir | None = None

    def _record(self, *args, **kwargs):
        fhir, self.fhir = self.fhir, None
        if fhir is not None:
            fhir.stop()
        return super()._record(*args, **kwargs)


def test_a_fhir_server_gone_after_the_check_is_exit_3_and_nothing_is_recorded(tmp_path, capsys):
    state = tmp_path / "state.db"
    with PacsThatStopsTheFhirServer(n_studies=10, seed=26) as pacs, FakeFhir() as fhir:
        pacs.fhir = fhir
        code = main(["sync", pacs.url, "--state", str(state), "--fhir-url", fhir.url, "--metadata", "never", "--retries", "0", "--timezone", "UTC"])
        assert [r.method for r in fhir.requests] == ["GET"]   # the check, nothing after it
    err = capsys.readouterr().err
    assert code == 3, err
    assert "cannot reach FHIR server" in err and len(err.strip().splitlines()) == 1, err
    assert study_rows(state) == {}


class PacsFailingUidSearches(FakePacs):
    """The simulator, answering 503 to every study search by Study Instance UID (the listing
    itself works): a deletion that cannot be confirmed."""

    def _answer(self, b, route, params):
        if route[0] == "studies" and any(key.lower() in ("studyinstanceuid", "0020000d") for key, _ in params):
            return 503, [("Content-Type", "text/plain")], b"unavailable"
        return super()._answer(b, route, params)


@pytest.mark.parametrize("answer", ["fails", "ignores the UID"])
def test_a_deletion_the_server_cannot_confirm_is_not_made(answer, tmp_path, capsys):
    """A study missing from a complete-looking listing is deleted only when the search for its
    UID answers no match: not when that search fails, nor when it answers other studies."""
    state = tmp_path / "state.db"
    cls = PacsFailingUidSearches if answer == "fails" else FakePacs
    behaviour = {"ignore_uid_filter": True} if answer == "ignores the UID" else {}
    with cls(n_studies=20, seed=27) as pacs, FakeFhir() as fhir:
        common = (pacs.url, "--state", str(state), "--fhir-url", fhir.url, "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        assert run_cli(capsys, "sync", *common)[0] == 0
        missing = pacs.study_uid(4)
        pacs.delete_study(4)
        if behaviour:
            pacs.behaviour = Behaviour(**behaviour)
        code, stdout, stderr = run_cli(capsys, "sync", *common, "--full", "--prune")
        assert code == 1, stderr
        assert json.loads(stdout)["studies_gone"] == 0
        assert f"study {missing}: not listed" in stderr
        assert study_rows(state)[missing] == "synced"
        assert fhir_deletes(fhir) == []
