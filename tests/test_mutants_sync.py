"""Sync decisions on deletion, skipping unchanged studies, the high-water mark and checkpoints,
each pinned by a test that a surviving mutant of crawler/sync.py failed (docs/testing.md). All
against the simulators in fixtures/, in process, so that `tox -e mutants` can run them per mutant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crawler.cli import main
from crawler.state import State
from fixtures.fakepacs import FakePacs


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else {}), err


def study_rows(state_path: Path) -> dict[str, str]:
    state = State(state_path)
    try:
        return dict(state.db.execute("SELECT study_uid, status FROM studies").fetchall())
    finally:
        state.close()


def test_a_bounded_sync_looks_for_gone_studies_only_inside_its_window(tmp_path, capsys):
    """Studies outside --since/--until are not listed by that run; they are neither asked for nor
    counted as missed. Mutants that dropped either bound of the window given to iter_unseen in
    _find_gone made this run exit 1 ("the listing missed N studies")."""
    state = tmp_path / "state.db"
    with FakePacs(n_studies=40, seed=31, date_from="20200101", date_to="20200131") as pacs:
        common = (pacs.url, "--state", str(state), "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        assert run_cli(capsys, "sync", *common)[0] == 0
        dates = {i: pacs.study_date(i) for i in range(40)}
        inside = [i for i, d in dates.items() if "20200110" <= d <= "20200120"]
        assert inside and any(d < "20200110" for d in dates.values()) and any(d > "20200120" for d in dates.values())
        gone = pacs.study_uid(inside[0])
        pacs.delete_study(inside[0])
        code, summary, err = run_cli(capsys, "sync", *common, "--since", "20200110", "--until", "20200120", "--prune")
        assert code == 0, err
        assert summary["studies_gone"] == 1
        assert summary["windows_incomplete"] == 0
        rows = study_rows(state)
        assert rows.pop(gone) == "gone"
        assert set(rows.values()) == {"synced"} and len(rows) == 39
