"""dcm4chee-arc's receive time as a change source (--changes dcm4chee), against the simulator of
its StudyReceiveDateTime search: the studies received since the cursor less the overlap, paging,
the archive's UTC offsets (negative ones included) or none, an answer that is no dcm4chee-arc
answer, and a sync that finds a late arrival with an old StudyDate."""

from __future__ import annotations

import json
from datetime import timedelta, timezone
from pathlib import Path

import pytest

from crawler.changes import dcm4chee_changes
from crawler.changes.dcm4chee import OVERLAP, parse_dt
from crawler.cli import main
from crawler.errors import FatalQidoError
from crawler.http import RetryPolicy
from crawler.qido import QidoClient
from crawler.state import State
from fixtures.fakedcm4chee import Dcm4cheePacs
from fixtures.fakepacs import FakePacs

ZONE = ["--timezone", "UTC"]


def _client(pacs: FakePacs) -> QidoClient:
    return QidoClient(pacs.url, retry=RetryPolicy(attempts=1))


def _asked(pacs: FakePacs) -> list[str]:
    return [r.query for r in pacs.requests if r.kind == "studies"]


def test_the_studies_received_since_the_cursor_less_the_overlap_are_named_and_no_others():
    with Dcm4cheePacs(n_studies=12, seed=71, hidden=(2, 3, 4, 5, 6)) as pacs:
        cursor = pacs.written(pacs.clock)                     # as the archive writes it: +0100
        pacs.arrive(2, received=pacs.clock - OVERLAP - timedelta(seconds=1))
        pacs.arrive(3, received=pacs.clock - timedelta(minutes=4, seconds=30))   # stamped before the cursor, visible after it
        pacs.arrive(4)                                                 # received exactly at the cursor
        pacs.tick(60)
        pacs.arrive(5)
        client = _client(pacs)
        try:
            read = dcm4chee_changes(client, pacs.url, cursor)
            assert sorted(c.study_uid for c in read.changes) == sorted(pacs.study_uid(i) for i in (3, 4, 5))
            assert not any(c.deleted for c in read.changes)
            assert parse_dt(read.cursor) == pacs.clock and read.cursor.endswith("+0000")
            lower = (pacs.clock - timedelta(seconds=60) - OVERLAP).astimezone(timezone.utc).strftime("%Y%m%d%H%M%S.%f")[:-3]
            assert _asked(pacs)[0].startswith(f"StudyReceiveDateTime={lower}%2B0000-&")
            again = dcm4chee_changes(client, pacs.url, read.cursor)     # 4 and 5 are within the overlap of the new cursor
            assert sorted(c.study_uid for c in again.changes) == sorted(pacs.study_uid(i) for i in (4, 5))
            assert again.cursor == read.cursor
        finally:
            client.close()


def test_more_studies_than_a_page_are_all_named_and_the_cursor_is_the_newest():
    hidden = tuple(range(5, 140))
    with Dcm4cheePacs(n_studies=140, seed=72, hidden=hidden) as pacs:
        cursor = pacs.written(pacs.clock)
        for index in hidden:
            pacs.tick(0.5)
            pacs.arrive(index)
        client = _client(pacs)
        try:
            read = dcm4chee_changes(client, pacs.url, cursor)
        finally:
            client.close()
        assert sorted(c.study_uid for c in read.changes) == sorted(pacs.study_uid(i) for i in hidden)
        assert parse_dt(read.cursor) == pacs.clock
        asked = _asked(pacs)
        assert len(asked) == 2 and "limit=100" in asked[0] and "offset=100" in asked[1]


@pytest.mark.parametrize("zone_minutes", [-300, 330])
def test_an_archive_in_any_time_zone_is_asked_in_utc(zone_minutes):
    """A negative offset holds a '-', where the archive cuts the range: sent back as written it
    would match every study."""
    with Dcm4cheePacs(n_studies=6, seed=73, hidden=(1,), zone_minutes=zone_minutes) as pacs:
        cursor = pacs.written(pacs.clock)
        assert cursor.endswith(f"{'-' if zone_minutes < 0 else '+'}{abs(zone_minutes) // 60:02d}{abs(zone_minutes) % 60:02d}")
        pacs.tick(30)
        pacs.arrive(1)
        client = _client(pacs)
        try:
            read = dcm4chee_changes(client, pacs.url, cursor)
        finally:
            client.close()
        assert [c.study_uid for c in read.changes] == [pacs.study_uid(1)]
        assert parse_dt(read.cursor) == pacs.clock


def test_an_archive_that_writes_no_offset_is_asked_in_its_own_local_time():
    with Dcm4cheePacs(n_studies=6, seed=74, hidden=(1, 2), zone_minutes=120, offsets=False) as pacs:
        cursor = pacs.written(pacs.clock)
        assert "+" not in cursor and "-" not in cursor
        pacs.tick(30)
        pacs.arrive(1)
        client = _client(pacs)
        try:
            read = dcm4chee_changes(client, pacs.url, cursor)
            assert [c.study_uid for c in read.changes] == [pacs.study_uid(1)]
            assert read.cursor == pacs.written(pacs.clock)            # local time, no offset
            pacs.tick(OVERLAP.total_seconds() + 1)
            pacs.arrive(2)
            again = dcm4chee_changes(client, pacs.url, read.cursor)
            assert sorted(c.study_uid for c in again.changes) == sorted(pacs.study_uid(i) for i in (1, 2))   # 1: at the old cursor
            assert again.cursor == pacs.written(pacs.clock)
        finally:
            client.close()


def test_a_server_that_ignores_the_receive_time_is_refused_not_read_as_every_study():
    with FakePacs(n_studies=4, seed=75) as pacs:
        client = _client(pacs)
        try:
            with pytest.raises(FatalQidoError, match="StudyReceiveDateTime"):
                dcm4chee_changes(client, pacs.url, "20261201080000.000+0000")
        finally:
            client.close()


def test_a_first_read_asks_nothing_and_a_cursor_that_is_no_time_lists_everything_once():
    with Dcm4cheePacs(n_studies=3, seed=76) as pacs:
        client = _client(pacs)
        try:
            first = dcm4chee_changes(client, pacs.url, None)
            assert first.changes == () and not first.reset and parse_dt(first.cursor) is not None
            assert _asked(pacs) == []
            broken = dcm4chee_changes(client, pacs.url, "42")
            assert broken.reset and parse_dt(broken.cursor) is not None
        finally:
            client.close()


def _sync(pacs_url: str, state: Path, out: Path, capsys, *extra: str) -> tuple[int, dict]:
    code = main(["sync", pacs_url, "--state", str(state), "--out", str(out), "--json", "--metadata", "never", "--retries", "0", *ZONE, *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {"stderr": captured.err}


def _cursor(path: Path, source: str) -> str | None:
    state = State.open(path, read_only=True)
    try:
        return state.change_cursor(source, "dcm4chee")
    finally:
        state.close()


def test_a_sync_following_the_receive_time_finds_a_late_arrival_with_an_old_study_date(tmp_path, capsys):
    state, out = tmp_path / "state.db", tmp_path / "out"
    with Dcm4cheePacs(n_studies=20, seed=77, date_from="20000101", date_to="20261201", hidden=(3,)) as pacs:
        old = pacs.study_date(3)
        assert old is not None and old < "20260101"                       # outside an incremental window
        code, first = _sync(pacs.url, state, out, capsys, "--changes", "dcm4chee")
        assert (code, first["studies_new"]) == (0, 19), first
        assert _cursor(state, pacs.url) is not None
        pacs.tick(10)
        pacs.arrive(3)
        code, second = _sync(pacs.url, state, out, capsys, "--changes", "dcm4chee")
        assert code == 0, second
        assert second["scope"].startswith("since")
        assert (second["studies_new"], second["studies_changed"]) == (1, 0)
        assert parse_dt(_cursor(state, pacs.url) or "") == pacs.clock
        code, third = _sync(pacs.url, state, out, capsys, "--changes", "dcm4chee")
        assert (code, third["studies_new"], third["studies_changed"], third["studies_gone"]) == (0, 0, 0, 0)
        assert parse_dt(_cursor(state, pacs.url) or "") == pacs.clock
        asked = [q for q in _asked(pacs) if q.startswith("StudyReceiveDateTime=")]
        assert len(asked) == 2                                             # none in the first run


def test_an_archive_that_refuses_a_search_matching_too_many_studies_is_asked_for_shorter_spans_of_time():
    """dcm4chee-arc answers 413 when a search matches more studies than its Query Max Number of
    Results, whatever the limit asked (QidoRS): a change read after a busy spell must not fail
    every run from then on."""
    hidden = tuple(range(5, 140))
    with Dcm4cheePacs(n_studies=140, seed=78, hidden=hidden, max_results=40, cap_mode="413") as pacs:
        cursor = pacs.written(pacs.clock)
        for index in hidden:
            pacs.tick(0.5)
            pacs.arrive(index)
        client = _client(pacs)
        try:
            read = dcm4chee_changes(client, pacs.url, cursor)
        finally:
            client.close()
        assert sorted(c.study_uid for c in read.changes) == sorted(pacs.study_uid(i) for i in hidden)
        assert parse_dt(read.cursor) == pacs.clock
        assert pacs.statuses[413] >= 1 and pacs.statuses[200] >= 4


def test_a_sync_against_a_server_that_is_no_dcm4chee_arc_says_so_and_keeps_its_cursor(tmp_path, capsys):
    state, out = tmp_path / "state.db", tmp_path / "out"
    with FakePacs(n_studies=5, seed=79) as pacs:
        assert _sync(pacs.url, state, out, capsys, "--changes", "dcm4chee")[0] == 0
        before = _cursor(state, pacs.url)
        assert before is not None
        code = main(["sync", pacs.url, "--state", str(state), "--out", str(out), "--json", "--metadata", "never", "--retries", "0", *ZONE, "--changes", "dcm4chee"])
        captured = capsys.readouterr()
        assert code == 1 and json.loads(captured.out)["windows_incomplete"] == 1
        said = [line for line in captured.err.splitlines() if "StudyReceiveDateTime" in line]
        assert len(said) == 1 and "is it dcm4chee-arc?" in said[0] and "not listed completely" in said[0]
        assert _cursor(state, pacs.url) == before


def test_a_receive_time_that_is_no_time_names_its_study_but_never_moves_the_cursor():
    with Dcm4cheePacs(n_studies=6, seed=80, hidden=(1, 2)) as pacs:
        cursor = pacs.written(pacs.clock)
        pacs.tick(30)
        pacs.arrive(1)
        pacs.tick(30)
        pacs.arrive(2)
        pacs.garbled.add(2)
        client = _client(pacs)
        try:
            read = dcm4chee_changes(client, pacs.url, cursor)
        finally:
            client.close()
        assert sorted(c.study_uid for c in read.changes) == sorted(pacs.study_uid(i) for i in (1, 2))
        assert parse_dt(read.cursor) == pacs.clock - timedelta(seconds=30)


def test_a_receive_time_in_the_future_does_not_carry_the_cursor_past_later_arrivals():
    with Dcm4cheePacs(n_studies=6, seed=81, hidden=(1, 2, 3)) as pacs:
        cursor = pacs.written(pacs.clock)
        pacs.tick(30)
        pacs.arrive(1, received=pacs.clock + timedelta(days=3650))       # a clock that once jumped ahead
        pacs.arrive(2)
        client = _client(pacs)
        try:
            read = dcm4chee_changes(client, pacs.url, cursor)
            assert sorted(c.study_uid for c in read.changes) == sorted(pacs.study_uid(i) for i in (1, 2))
            moved = parse_dt(read.cursor)
            assert moved is not None and pacs.clock <= moved <= pacs.clock + 2 * OVERLAP
            pacs.tick(60)
            pacs.arrive(3)
            assert pacs.study_uid(3) in {c.study_uid for c in dcm4chee_changes(client, pacs.url, read.cursor).changes}
        finally:
            client.close()
