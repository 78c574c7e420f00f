"""Sync decisions on deletion, skipping unchanged studies, the high-water mark and checkpoints,
each pinned by a test that a surviving mutant of crawler/sync.py failed (docs/testing.md). All
against the simulators in fixtures/, in process, so that `tox -e mutants` can run them per mutant."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from crawler.cli import main
from crawler.mapping.ids import study_id
from crawler.state import State
from fixtures.fakepacs import Behaviour, FakePacs


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else {}), err


def query(state_path: Path, sql: str, *args: object) -> list[tuple]:
    """Rows of the state file as stored (these tests pin the columns a run writes), read-only."""
    db = sqlite3.connect(f"file:{state_path}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def change(state_path: Path, sql: str, *args: object) -> None:
    """Change the state file behind the crawler's back (a state it did not leave so)."""
    db = sqlite3.connect(state_path)
    try:
        db.execute(sql, args)
        db.commit()
    finally:
        db.close()


def study_rows(state_path: Path) -> dict[str, str]:
    state = State.open(state_path, read_only=True)
    try:
        return {row.study_uid: row.status for row in state.iter_study_rows()}
    finally:
        state.close()


def test_a_bounded_sync_looks_for_gone_studies_only_inside_its_window(tmp_path, capsys):
    """Studies outside --since/--until are not listed by that run; they are neither asked for nor
    counted as missed, and such a run does not move the mark. Mutants that dropped either bound of
    the window given to iter_unseen in _find_gone made this run exit 1 ("the listing missed N
    studies"); `moves_mark and listing_clean` -> `or` in run set a mark; in _checkpoint, mutants
    of the pruned study's mark_gone and drop_resource calls and of its resources_deleted count
    left a deleted study's resource in the state (where export would bring it back) or
    miscounted."""
    state = tmp_path / "state.db"
    with FakePacs(n_studies=40, seed=31, date_from="20200101", date_to="20200131") as pacs:
        common = (pacs.url, "--state", str(state), "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        assert run_cli(capsys, "sync", *common)[0] == 0
        dates = {i: pacs.study_date(i) for i in range(40)}
        inside = [i for i, d in dates.items() if "20200110" <= d <= "20200120"]
        assert inside and any(d < "20200110" for d in dates.values()) and any(d > "20200120" for d in dates.values())
        assert len(inside) >= 2
        gone = sorted(pacs.study_uid(i) for i in inside[:2])
        for i in inside[:2]:
            pacs.delete_study(i)
        code, summary, err = run_cli(capsys, "sync", *common, "--since", "20200110", "--until", "20200120", "--prune")
        assert code == 0, err
        assert summary["studies_gone"] == 2
        assert summary["windows_incomplete"] == 0
        assert [line for line in err.splitlines() if "no longer" in line] == [
            f"qido-crawler: WARNING: study {uid} is no longer in the PACS; deleting it" for uid in gone]
        assert [m for (m,) in query(state, "SELECT mark FROM runs ORDER BY id")][1:] == [None]
        rows = study_rows(state)
        assert [rows.pop(uid) for uid in gone] == ["gone", "gone"]
        assert set(rows.values()) == {"synced"} and len(rows) == 38
        assert summary["resources_deleted"] == 2
        assert query(state, "SELECT DISTINCT last_run FROM studies WHERE status = 'gone'") == [(2,)]
        kept = {i for (i,) in query(state, "SELECT id FROM resources WHERE type = 'ImagingStudy'")}
        assert len(kept) == 38 and not kept & {study_id(pacs.url, uid) for uid in gone}


def test_without_prune_a_gone_study_is_marked_gone_and_nothing_is_deleted(tmp_path, capsys):
    state, out = tmp_path / "state.db", tmp_path / "out"
    with FakePacs(n_studies=12, seed=32) as pacs:
        common = (pacs.url, "--state", str(state), "--out", str(out), "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        assert run_cli(capsys, "sync", *common)[0] == 0
        gone = pacs.study_uid(3)
        pacs.delete_study(3)
        code, summary, err = run_cli(capsys, "sync", *common, "--full")
        assert code == 0, err
        assert (summary["studies_gone"], summary["studies_unchanged"], summary["resources_deleted"]) == (1, 11, 0)
        assert [line for line in err.splitlines() if "no longer" in line] == [
            f"qido-crawler: WARNING: study {gone} is no longer in the PACS"]
        assert study_rows(state)[gone] == "gone"
        assert query(state, "SELECT last_run FROM studies WHERE study_uid = ?", gone) == query(state, "SELECT max(id) FROM runs")
        assert not list(out.glob("*/deleted.ndjson"))
        code, summary, err = run_cli(capsys, "sync", *common, "--full")
        assert (code, summary["studies_gone"], summary["studies_unchanged"]) == (0, 0, 11)


def test_the_mark_moves_only_when_the_listing_missed_nothing(tmp_path, capsys):
    """A clean run sets the high-water mark; a run whose listing missed studies the server still
    has (a silent cap set since the last run) is one incomplete window, logged as an error, and
    leaves the mark where it was. Failed before with `return not missed` -> `return missed` in
    _find_gone (no mark after the clean run), with `windows_incomplete += 2` and with the error
    logged at the default level."""
    state = tmp_path / "state.db"
    with FakePacs(n_studies=30, seed=33) as pacs:
        common = (pacs.url, "--state", str(state), "--page-size", "20", "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        code, summary, err = run_cli(capsys, "sync", *common)
        assert code == 0, err
        ((mark,),) = query(state, "SELECT mark FROM runs")
        assert mark is not None and len(mark) == 8
        pacs.behaviour = Behaviour(max_results=5, cap_mode="silent", newest_first=True)
        code, summary, err = run_cli(capsys, "sync", *common, "--full", "--prune")
        assert code == 1, err
        assert (summary["windows_incomplete"], summary["studies_gone"]) == (1, 0)
        assert [line for line in err.splitlines() if "not listed completely" in line] == [
            f"qido-crawler: ERROR: not listed completely: the listing missed {30 - summary['studies_listed']} studies the server still has; "
            "none of them is marked gone"]
        assert 0 < summary["studies_listed"] < 30
        assert query(state, "SELECT mark FROM runs ORDER BY id") == [(mark,), (None,)]
        assert set(study_rows(state).values()) == {"synced"}


NUL_UID = {3: "1.2\x003"}   # a listing entry whose StudyInstanceUID cannot be used: a listing error


def test_a_listing_error_keeps_the_mark_and_the_next_run_lists_everything_again(tmp_path, capsys):
    """An unusable listing entry makes the listing unclean: no mark, so the next run is a full one
    that finds the study; after that clean run the mark is set and the run after it is incremental.
    Failed before with `and not self.listing_errors` -> `or ...` in run (mark set after the
    unclean run) and with the source not passed to choose_windows (never incremental)."""
    state = tmp_path / "state.db"
    with FakePacs(n_studies=10, seed=34, listed_uids=NUL_UID) as pacs:
        common = (pacs.url, "--state", str(state), "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        code, summary, err = run_cli(capsys, "sync", *common)
        assert (code, summary["studies_failed"], summary["windows_incomplete"]) == (1, 1, 0), err
        assert query(state, "SELECT mark FROM runs") == [(None,)]
        pacs.behaviour = Behaviour()
        code, summary, err = run_cli(capsys, "sync", *common)
        assert (code, summary["scope"], summary["studies_new"], summary["studies_unchanged"]) == (0, "full (first run)", 1, 9), err
        ((mark,),) = query(state, "SELECT mark FROM runs WHERE mark IS NOT NULL")
        code, summary, err = run_cli(capsys, "sync", *common)
        assert code == 0, err
        assert summary["scope"].startswith("since ") and summary["scope"].endswith(f"(mark {mark} - 7 days)")


def test_the_change_feed_position_is_kept_only_after_a_clean_listing(tmp_path, capsys, monkeypatch):
    """The feed position is a high-water mark too: stored after a clean run, kept as it was after
    an unclean one (a listing error, or a listing that missed studies the server still has), and
    asked from by the next incremental run. The feed itself is stood in for
    (Orthanc's real one is tested in test_incremental_live.py). Failed before with
    `listing_clean and ...` -> `or` and with `is not None` -> `is None` in run."""
    import sys

    from crawler.changes import Changes

    asked: list[int | None] = []
    positions = [5, 9, 10, 12]

    def feed(client, rest, since, page=1000):
        asked.append(since)
        return Changes((), positions.pop(0))

    monkeypatch.setattr(sys.modules["crawler.changes"], "orthanc_changes", feed)
    state = tmp_path / "state.db"
    with FakePacs(n_studies=10, seed=35) as pacs:
        common = (pacs.url, "--state", str(state), "--changes", "orthanc", "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        assert run_cli(capsys, "sync", *common)[0] == 0
        pacs.behaviour = Behaviour(listed_uids=NUL_UID)
        assert run_cli(capsys, "sync", *common, "--full")[0] == 1
        pacs.behaviour = Behaviour(max_results=5, cap_mode="silent", newest_first=True)
        code, summary, err = run_cli(capsys, "sync", *common, "--full")
        assert (code, summary["windows_incomplete"]) == (1, 1), err
        pacs.behaviour = Behaviour()
        code, summary, err = run_cli(capsys, "sync", *common)
        assert code == 0, err
    assert asked == [None, None, None, 5]


def test_a_finished_run_is_recorded_with_its_end_outcome_folder_figures_and_mark(tmp_path, capsys):
    """Failed before with each argument of finish_run in run replaced by None (a run without an
    end is taken for an interrupted one by the next run)."""
    state, out = tmp_path / "state.db", tmp_path / "out"
    with FakePacs(n_studies=10, seed=36) as pacs:
        common = (pacs.url, "--state", str(state), "--out", str(out), "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        code, first, err = run_cli(capsys, "sync", *common)
        assert code == 0, err
        pacs.behaviour = Behaviour(listed_uids=NUL_UID)
        code, second, err = run_cli(capsys, "sync", *common, "--full")
        assert code == 1, err
        assert "interrupted" not in err
    rows = query(state, "SELECT id, ended, outcome, folder, figures, mark, windows FROM runs ORDER BY id")
    assert first["run_dir"]
    assert [(r[0], r[2], r[3]) for r in rows] == [(1, "ok", first["run_dir"]), (2, "partial", second["run_dir"])]
    assert all(r[1] for r in rows)
    # the summary names the server profile besides the figures (the state keeps it per source)
    assert [json.loads(r[4]) for r in rows] == [{k: v for k, v in s.items() if k != "server_profile"} for s in (first, second)]
    assert first["server_profile"] == {"name": "generic", "how": "default"}
    assert rows[0][5] is not None and rows[1][5] is None
    assert [json.loads(r[6]) for r in rows] == [["all studies"], ["all studies"]]


def test_unreadable_listing_entries_fail_their_studies_alone_and_keep_the_mark(tmp_path, capsys):
    """Listing entries that are not JSON: each fails its study (named by the UID the raw bytes
    show), the others are synced, and the listing does not count as clean (no mark). Failed before
    with the UNREADABLE check removed from _consider and with `studies_failed += 1` -> `= 1`,
    `-= 1`, `+= 2` there."""
    state = tmp_path / "state.db"
    with FakePacs(n_studies=20, seed=37, broken_entries={5, 9}) as pacs:
        common = (pacs.url, "--state", str(state), "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        code, summary, err = run_cli(capsys, "sync", *common)
        broken = {pacs.study_uid(5), pacs.study_uid(9)}
    assert code == 1, err
    assert (summary["studies_failed"], summary["studies_new"], summary["studies_listed"]) == (2, 18, 18)
    assert {uid for uid in broken if f"study {uid}: listing entry unreadable: " in err} == broken
    assert query(state, "SELECT mark FROM runs") == [(None,)]
    assert not broken & set(study_rows(state))


def test_unusable_listing_entries_of_both_kinds_are_counted_and_their_messages_bounded(tmp_path, capsys):
    """Entries that are not JSON and entries whose UID cannot be used are one kind of problem:
    each fails its study, the first 20 are logged, the rest counted on one line. Failed before
    with the kind of either message changed or dropped, and with the message or the count of
    failed studies mutated in the branch for unusable UIDs."""
    state = tmp_path / "state.db"
    nul = {i: f"1.2\x00{i}" for i in range(12, 24)}
    with FakePacs(n_studies=40, seed=38, broken_entries=frozenset(range(12)), listed_uids=nul) as pacs:
        common = (pacs.url, "--state", str(state), "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        code, summary, err = run_cli(capsys, "sync", *common)
    assert code == 1, err
    assert (summary["studies_failed"], summary["studies_new"], summary["warnings_not_shown"]) == (24, 16, 4)
    lines = err.splitlines()
    assert sum(": listing entry unreadable: " in line for line in lines) == 12
    assert sum(line.endswith("listing entry: StudyInstanceUID (0020,000D): contains a NUL character") for line in lines) == 8
    assert sum("4 more unusable listing entries (not shown; counted)" in line for line in lines) == 1
    assert query(state, "SELECT mark FROM runs") == [(None,)]


def test_a_study_the_fhir_server_refuses_is_recorded_failed_with_its_run_and_date(tmp_path, capsys):
    """A refusal at the checkpoint: one error line naming the study, the study recorded as failed
    by this run with its StudyDate (so that date windows and retries find it), and it is not taken
    for a study the listing missed; the synced ones are recorded with this run, their StudyDate and
    their resource's digest. Failed before with the message, the run id or the study date given to
    the state as None in _checkpoint (refused or synced) and with the resource digest dropped."""
    from crawler.mapping.ids import study_id
    from fixtures.fakefhir import FakeFhir

    state = tmp_path / "state.db"
    with FakePacs(n_studies=6, seed=39) as pacs:
        refused = pacs.study_uid(2)
        with FakeFhir(reject={("ImagingStudy", study_id(pacs.url, refused))}) as fhir:
            common = (pacs.url, "--state", str(state), "--fhir-url", fhir.url, "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
            code, summary, err = run_cli(capsys, "sync", *common)
        date = pacs.study_date(2)
    assert code == 1, err
    assert (summary["studies_failed"], summary["studies_new"], summary["windows_incomplete"]) == (1, 5, 0)
    assert sum(f"study {refused}: not accepted: " in line for line in err.splitlines()) == 1
    assert query(state, "SELECT status, last_run, last_seen_run, study_date FROM studies WHERE study_uid = ?", refused) == [
        ("failed", 1, 1, date)]
    synced = query(state, "SELECT last_run, last_seen_run, study_date, resource_hash FROM studies WHERE status = 'synced'")
    assert len(synced) == 5
    assert all(r[:2] == (1, 1) and r[2] is not None and len(r[2]) == 8 and r[3] for r in synced)
    assert len({r[3] for r in synced}) == 5


def test_studies_are_counted_changed_or_rechecked_one_by_one(tmp_path, capsys):
    """Without counts in the listing every study is crawled again: those that come back the same
    are re-checked (also when only the Endpoint has to be sent again), those that differ changed,
    each counted once. Failed before with `studies_changed += 1` -> `= 1`,
    `studies_rechecked += 1` -> `= 1`, `-= 1`, `+= 2`, and `!= "Endpoint"` with another string."""
    state = tmp_path / "state.db"
    with FakePacs(n_studies=10, seed=40, no_study_counts=True) as pacs:
        common = (pacs.url, "--state", str(state), "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC", "--full")
        assert run_cli(capsys, "sync", *common)[0] == 0
        code, summary, err = run_cli(capsys, "sync", *common)
        assert (code, summary["studies_rechecked"], summary["studies_changed"], summary["resources_written"]) == (0, 10, 0, 0), err
        change(state, "DELETE FROM resources WHERE type = 'Endpoint'")
        code, summary, err = run_cli(capsys, "sync", *common)
        assert (code, summary["studies_rechecked"], summary["studies_changed"], summary["resources_written"]) == (0, 10, 0, 1), err
        pacs.add_instances(3, 1)
        pacs.add_instances(6, 2)
        code, summary, err = run_cli(capsys, "sync", *common)
        assert (code, summary["studies_rechecked"], summary["studies_changed"], summary["resources_written"]) == (0, 8, 2, 2), err


def test_a_deletion_the_fhir_server_refuses_leaves_the_study_synced(tmp_path, capsys):
    """--prune with a FHIR server that refuses the transaction holding the DELETE: one error line
    naming the study, an OperationOutcome line in the run folder, the study counted as failed
    (exit 1), and not marked gone (the next run tries again). Failed before with the message, or the body written to the
    sinks, replaced by None in _checkpoint's loop over deletions."""
    from fixtures.fakefhir import FakeFhir

    state, out = tmp_path / "state.db", tmp_path / "out"
    with FakePacs(n_studies=6, seed=41) as pacs, FakeFhir() as fhir:
        common = (pacs.url, "--state", str(state), "--out", str(out), "--fhir-url", fhir.url, "--metadata", "never", "--retries", "0",
                  "--json", "--timezone", "UTC")
        assert run_cli(capsys, "sync", *common)[0] == 0
        gone = pacs.study_uid(2)
        pacs.delete_study(2)
        fhir.reset_counts()
        fhir.fail_requests = {n: 422 for n in range(2, 40)}
        code, summary, err = run_cli(capsys, "sync", *common, "--full", "--prune")
    assert (code, summary["studies_failed"], summary["resources_deleted"]) == (1, 1, 0), err
    assert f"qido-crawler: WARNING: study {gone}: deletion not accepted: HTTP 422" in err
    assert sum(f"study {gone}: deletion not accepted: " in line for line in err.splitlines()) == 1
    assert study_rows(state)[gone] == "synced"
    (folder,) = [p for p in out.iterdir() if (p / "OperationOutcome.ndjson").exists()]
    outcomes = [json.loads(line) for line in (folder / "OperationOutcome.ndjson").read_text().splitlines()]
    assert [o["issue"][0]["diagnostics"].startswith(f"study {gone}: deletion not accepted: ") for o in outcomes] == [True]


def test_a_run_with_checkpoints_along_the_way_records_every_study(tmp_path, capsys):
    """The Endpoint (the same for every study) is written once per run, not once per checkpoint.
    Failed before with `self.last_checkpoint = time.monotonic()` -> `= None` in _checkpoint (the
    next study taken after a checkpoint met None), and with the in-memory digest of the Endpoint
    not updated at a checkpoint (`in self.stored` -> `not in`, the digest -> None)."""
    state, out = tmp_path / "state.db", tmp_path / "out"
    with FakePacs(n_studies=10, seed=42) as pacs:
        common = (pacs.url, "--state", str(state), "--out", str(out), "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        code, summary, err = run_cli(capsys, "sync", *common, "--checkpoint-every", "3")
    assert (code, summary["studies_new"], summary["resources_written"]) == (0, 10, 11), err
    assert set(study_rows(state).values()) == {"synced"} and len(study_rows(state)) == 10
    (folder,) = list(out.iterdir())
    assert len((folder / "Endpoint.ndjson").read_text().splitlines()) == 1
    assert len((folder / "ImagingStudy.ndjson").read_text().splitlines()) == 10


def test_refused_resources_are_counted_over_every_checkpoint(tmp_path, capsys):
    """Failed before with `resources_refused += ...` -> `= ...` in _checkpoint (only the last
    checkpoint's refusals were counted)."""
    from fixtures.fakefhir import FakeFhir

    with FakePacs(n_studies=6, seed=45) as pacs:
        reject = {("ImagingStudy", study_id(pacs.url, pacs.study_uid(i))) for i in (0, 5)}
        with FakeFhir(reject=reject) as fhir:
            common = (pacs.url, "--state", str(tmp_path / "state.db"), "--fhir-url", fhir.url, "--metadata", "never", "--retries", "0",
                      "--json", "--timezone", "UTC", "--checkpoint-every", "2")
            code, summary, err = run_cli(capsys, "sync", *common)
    assert (code, summary["studies_failed"], summary["resources_refused"]) == (1, 2, 2), err


def test_a_run_that_cannot_reach_the_source_is_recorded_as_unreachable(tmp_path, capsys):
    """Failed before with each argument of the failed run's finish_run replaced by None, or its
    "error" key renamed."""
    with FakePacs(n_studies=1, seed=43) as pacs:
        url = pacs.url
    state = tmp_path / "state.db"
    code, _, err = run_cli(capsys, "sync", url, "--state", str(state), "--metadata", "never", "--retries", "0", "--timezone", "UTC")
    assert code == 3, err
    ((run_id, ended, outcome, folder, figures, mark),) = query(state, "SELECT id, ended, outcome, folder, figures, mark FROM runs")
    assert (run_id, outcome, folder, mark) == (1, "unreachable", None, None) and ended
    figures = json.loads(figures)
    assert figures["error"] and figures["studies_new"] == 0


def test_the_folder_of_a_run_that_failed_is_recorded_for_the_next_run_to_recover(tmp_path, capsys):
    """A FHIR server that goes away after the start-up check: the run fails (exit 3, outcome
    "failed") after its run folder was made; the state keeps the folder's path, so that the next
    run completes or removes it. Failed before with `kept` replaced by None in run's finish_run."""
    from fixtures.fakefhir import FakeFhir
    from test_promises import PacsThatStopsTheFhirServer

    state, out = tmp_path / "state.db", tmp_path / "out"
    with PacsThatStopsTheFhirServer(n_studies=4, seed=44) as pacs, FakeFhir() as fhir:
        pacs.fhir = fhir
        common = (pacs.url, "--state", str(state), "--out", str(out), "--fhir-url", fhir.url, "--metadata", "never", "--retries", "0",
                  "--timezone", "UTC")
        code, _, err = run_cli(capsys, "sync", *common)
        assert code == 3, err
        (folder,) = [p for p in out.iterdir()]
        assert query(state, "SELECT folder, outcome FROM runs") == [(str(folder.absolute()), "failed")]
        assert study_rows(state) == {}


def test_progress_is_reported_for_unchanged_studies_too(tmp_path):
    """Failed before with `self.progress(figures)` -> `self.progress(None)` in _consider's branch
    for an unchanged study."""
    import sys

    from crawler.config import SyncConfig
    from crawler.crawl import CrawlOptions, MetadataMode
    from crawler.http import RetryPolicy

    seen: list[tuple[int, int]] = []
    with FakePacs(n_studies=5, seed=46) as pacs:
        config = SyncConfig(url=pacs.url, state=tmp_path / "state.db", retry=RetryPolicy(base_delay=0.01, max_delay=0.05, max_seconds=10),
                            crawl=CrawlOptions(metadata=MetadataMode.NEVER), full=True)
        assert sys.modules["crawler.sync"].sync(config).exit_code == 0
        result = sys.modules["crawler.sync"].sync(config, progress=lambda p: seen.append((p.figures.studies_listed, p.figures.studies_unchanged)))
    assert result.figures.studies_unchanged == 5
    assert seen[-1] == (5, 5) and [u for _, u in seen] == sorted(u for _, u in seen)


def test_a_failed_study_outside_the_window_is_asked_for_by_uid_but_not_by_a_full_run(tmp_path, capsys):
    """The next run asks again, by UID, for a study the state holds as failed that its window does
    not show, and syncs it; a --full run lists every study anyway and asks for none by UID (not
    even for a failed study the server no longer has). Failed with 'if self.full_listing:' ->
    'if False:' in _retried_items, and with RETRY_PER_RUN = 0."""
    state = tmp_path / "state.db"
    with FakePacs(n_studies=8, seed=52) as pacs:
        common = (pacs.url, "--state", str(state), "--metadata", "never", "--json", "--timezone", "UTC")
        assert run_cli(capsys, "sync", *common)[0] == 0
        failed = pacs.study_uid(1)
        change(state, "UPDATE studies SET status = 'failed' WHERE study_uid = ?", failed)

        def by_uid() -> list[str]:
            """Study searches by UID asking for the listing's fields (not the check before a deletion)."""
            return [r.query for r in pacs.requests if r.kind == "studies" and "0020000D=" in r.query and "includefield" in r.query]

        pacs.reset_counts()
        code, summary, err = run_cli(capsys, "sync", *common, "--since", "21000101")
        assert code == 0, err
        assert len(by_uid()) == 1 and failed in by_uid()[0]
        assert study_rows(state)[failed] == "synced" and summary["studies_listed"] == 1

        deleted = pacs.study_uid(2)
        change(state, "UPDATE studies SET status = 'failed' WHERE study_uid IN (?, ?)", failed, deleted)
        pacs.delete_study(2)
        pacs.reset_counts()
        code, summary, err = run_cli(capsys, "sync", *common, "--full")
        assert code == 0, err
        assert by_uid() == [] and study_rows(state)[failed] == "synced" and summary["studies_gone"] == 1
