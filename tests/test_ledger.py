"""The checkpoint ledger on its own: a SQLite state in a temporary folder and a sink that keeps a
list of what it was told, no server and no crawl."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import orjson
import pytest

from crawler.crawl import StudySummary
from crawler.figures import Figures
from crawler.kinds import StudyStatus
from crawler.ledger import Ledger
from crawler.state import State
from crawler.worker import Outcome, digest

SOURCE = "http://pacs.example/dicom-web"


class ListSink:
    """A sink that records every call, and refuses the keys it is told to refuse at flush."""

    def __init__(self, state_file=None) -> None:
        self.calls: list[tuple] = []
        self.refuse: dict[str, str] = {}
        self.state_file = state_file
        self.committed_at_flush: list[tuple[str, str | None]] = []

    def add(self, key: str, resources: Sequence[tuple[str, str, bytes]]) -> None:
        self.calls.append(("add", key, [(t, i) for t, i, _ in resources]))

    def delete(self, key: str, resource_type: str, resource_id: str) -> None:
        self.calls.append(("delete", key, resource_type, resource_id))

    def error(self, body: bytes) -> None:
        self.calls.append(("error", orjson.loads(body)["issue"][0]["diagnostics"]))

    def flush(self) -> dict[str, str]:
        self.calls.append(("flush",))
        if self.state_file is not None:
            # what another reader of the state sees while the sink flushes: the last commit
            with sqlite3.connect(f"file:{self.state_file}?mode=ro", uri=True) as db:
                self.committed_at_flush.extend(db.execute("SELECT study_uid, status FROM studies ORDER BY study_uid").fetchall())
        refused, self.refuse = self.refuse, {}
        return refused

    def finish(self) -> str | None:
        return None

    def abort(self) -> None:
        self.calls.append(("abort",))


def _summary(uid: str, n: int = 1) -> StudySummary:
    return StudySummary(uid, 1, n, {"0020000D": {"vr": "UI", "Value": [uid]}, "00080020": {"vr": "DA", "Value": ["20260102"]}})


def _outcome(uid: str, description: str = "CT") -> Outcome:
    study = orjson.dumps({"resourceType": "ImagingStudy", "id": f"is-{uid}", "description": description})
    endpoint = orjson.dumps({"resourceType": "Endpoint", "id": "ep"})
    return Outcome(_summary(uid), (("Endpoint", "ep", endpoint), ("ImagingStudy", f"is-{uid}", study)))


@pytest.fixture
def ledger_of(tmp_path):
    made: list[State] = []

    def make(sink: ListSink | None = None) -> tuple[Ledger, State, ListSink, list[str]]:
        state = State(tmp_path / "state.db")
        made.append(state)
        run_id = state.begin_run(SOURCE, "2026-12-06T00:00:00+00:00")
        state.commit()
        state.begin()
        sink = sink or ListSink()
        errors: list[str] = []
        return Ledger(state, SOURCE, run_id, [sink], Figures(), errors.append), state, sink, errors

    yield make
    for state in made:
        state.close()


def test_a_held_study_is_given_to_the_sink_at_once_and_recorded_only_after_the_flush(ledger_of, tmp_path):
    sink = ListSink(state_file=tmp_path / "state.db")
    ledger, state, sink, _ = ledger_of(sink)
    ledger.listed("1.2.3")
    ledger.hold(_outcome("1.2.3"), known=False)
    assert sink.calls == [("add", "1.2.3", [("Endpoint", "ep"), ("ImagingStudy", "is-1.2.3")])]
    assert state.study(SOURCE, "1.2.3") is None
    ledger.checkpoint()
    assert sink.calls[-1] == ("flush",)
    assert sink.committed_at_flush == []          # the flush came before the commit
    row = state.study(SOURCE, "1.2.3")
    assert row is not None and row.status == StudyStatus.SYNCED and row.resource_id == "is-1.2.3"
    assert (ledger.figures.studies_new, ledger.figures.resources_written) == (1, 2)
    assert ledger.held == [] and "1.2.3" not in ledger.unrecorded
    with sqlite3.connect(tmp_path / "state.db") as db:   # committed: another reader sees it
        assert db.execute("SELECT status FROM studies WHERE study_uid = '1.2.3'").fetchone() == ("synced",)


def test_unchanged_resources_are_not_sent_again_and_a_study_without_changes_counts_as_rechecked(ledger_of):
    ledger, state, sink, _ = ledger_of()
    ledger.hold(_outcome("1.2.3"), known=False)
    ledger.checkpoint()
    sink.calls.clear()
    ledger.hold(_outcome("1.2.3"), known=True)            # the same bytes: nothing to send
    ledger.hold(_outcome("1.2.4"), known=False)           # a new study: only its own resource (the Endpoint is stored)
    ledger.hold(_outcome("1.2.5", "MR"), known=True)      # known but changed
    ledger.checkpoint()
    assert sink.calls[:2] == [("add", "1.2.4", [("ImagingStudy", "is-1.2.4")]), ("add", "1.2.5", [("ImagingStudy", "is-1.2.5")])]
    f = ledger.figures
    assert (f.studies_new, f.studies_changed, f.studies_rechecked) == (2, 1, 1)
    assert state.resource_hash("ImagingStudy", "is-1.2.5") == digest(_outcome("1.2.5", "MR").study[2])


def test_a_study_the_sink_refuses_is_recorded_failed_with_its_resources_unrecorded(ledger_of):
    ledger, state, sink, errors = ledger_of()
    ledger.hold(_outcome("1.2.3"), known=False)
    ledger.hold(_outcome("1.2.4"), known=False)
    sink.refuse = {"1.2.3": "HTTP 422"}
    ledger.checkpoint()
    refused = state.study(SOURCE, "1.2.3")
    assert refused is not None and refused.status == StudyStatus.FAILED
    assert errors == ["study 1.2.3: not accepted: HTTP 422"]
    assert ("error", "study 1.2.3: not accepted: HTTP 422") in sink.calls
    assert state.resource_hash("ImagingStudy", "is-1.2.3") is None
    assert state.resource_hash("ImagingStudy", "is-1.2.4") is not None
    f = ledger.figures
    # the Endpoint was written with the accepted study: only the refused study's own resource is unrecorded
    assert (f.studies_failed, f.studies_new, f.resources_written, f.resources_refused) == (1, 1, 2, 1)


def test_a_failed_crawl_is_recorded_at_once_and_never_sent(ledger_of):
    ledger, state, sink, errors = ledger_of()
    ledger.listed("1.2.3")
    ledger.hold(Outcome(_summary("1.2.3"), status=StudyStatus.INCONSISTENT, error="study 1.2.3: counts differ"), known=False)
    assert sink.calls == [("error", "study 1.2.3: counts differ")]
    assert "1.2.3" not in ledger.unrecorded and ledger.held == []
    row = state.study(SOURCE, "1.2.3")
    assert row is not None and row.status == StudyStatus.INCONSISTENT and row.study_date == "20260102"
    assert (ledger.figures.studies_inconsistent, ledger.figures.studies_failed) == (1, 0)


def test_a_deletion_is_sent_at_once_and_marks_the_study_gone_only_at_the_checkpoint_unless_refused(ledger_of):
    ledger, state, sink, errors = ledger_of()
    for uid in ("1.2.3", "1.2.4"):
        ledger.hold(_outcome(uid), known=False)
    ledger.checkpoint()
    sink.calls.clear()
    ledger.delete("1.2.3", "is-1.2.3")
    ledger.delete("1.2.4", "is-1.2.4")
    assert sink.calls == [("delete", "1.2.3", "ImagingStudy", "is-1.2.3"), ("delete", "1.2.4", "ImagingStudy", "is-1.2.4")]
    assert state.study(SOURCE, "1.2.3").status == StudyStatus.SYNCED
    sink.refuse = {"1.2.4": "HTTP 409"}
    ledger.checkpoint()
    assert state.study(SOURCE, "1.2.3").status == StudyStatus.GONE
    assert state.resource_hash("ImagingStudy", "is-1.2.3") is None
    assert state.study(SOURCE, "1.2.4").status == StudyStatus.SYNCED
    assert state.resource_hash("ImagingStudy", "is-1.2.4") is not None
    assert errors == ["study 1.2.4: deletion not accepted: HTTP 409"]
    assert (ledger.figures.resources_deleted, ledger.figures.studies_failed) == (1, 1)
    assert ledger.deleting == []


def test_a_crash_between_the_flush_and_the_commit_leaves_the_state_at_the_last_checkpoint(ledger_of, tmp_path, monkeypatch):
    ledger, state, sink, _ = ledger_of()
    ledger.hold(_outcome("1.2.3"), known=False)
    ledger.checkpoint()
    ledger.hold(_outcome("1.2.4"), known=False)

    def crash() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(state, "checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        ledger.checkpoint()
    assert sink.calls[-1] == ("flush",)               # the sink had flushed
    state.rollback()
    state.close()
    again = State(tmp_path / "state.db")
    try:
        assert again.study(SOURCE, "1.2.3").status == StudyStatus.SYNCED
        assert again.study(SOURCE, "1.2.4") is None   # the next run sends it again
        assert again.resource_hash("ImagingStudy", "is-1.2.4") is None
    finally:
        again.close()


def test_a_checkpoint_is_due_after_enough_studies_or_enough_time(ledger_of, monkeypatch):
    ledger, *_ = ledger_of()
    assert not ledger.due(2, 60.0)
    ledger.hold(_outcome("1.2.3"), known=False)
    assert not ledger.due(2, 60.0)
    ledger.hold(_outcome("1.2.4"), known=False)
    assert ledger.due(2, 60.0)
    ledger.checkpoint()
    assert not ledger.due(2, 60.0)
    monkeypatch.setattr("crawler.ledger.time.monotonic", lambda: ledger.last_checkpoint + 61.0)
    assert ledger.due(2, 60.0)
