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
    state = State(state_path)
    try:
        return dict(state.db.execute("SELECT study_uid, status FROM studies").fetchall())
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
    # 10 studies without StudyDate (listed first) behind a cap of 5: that part of the listing
    # cannot be split by date and stays capped
    "capped, cannot be split": Behaviour(max_results=5, cap_mode="warning", newest_first=True),
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


@pytest.mark.xfail(strict=True, reason=(
    "product bug in crawler/listing.py (owned elsewhere): when a capped unfiltered listing shows no "
    "study without StudyDate on its first page, the undated studies past the cap are never listed, "
    "the listing counts as complete, and --prune deletes them"))
def test_undated_studies_hidden_behind_a_cap_are_not_deleted(tmp_path, capsys):
    out, state = tmp_path / "out", tmp_path / "state.db"
    with FakePacs(n_studies=60, seed=21, no_date_fraction=1 / 6) as pacs:
        common = (pacs.url, "--out", str(out), "--state", str(state), "--page-size", "20",
                  "--metadata", "never", "--retries", "0", "--json", "--timezone", "UTC")
        assert run_cli(capsys, "sync", *common)[0] == 0
        pacs.behaviour = Behaviour(max_results=5, cap_mode="warning")   # oldest first: the undated come last
        code, stdout, stderr = run_cli(capsys, "sync", *common, "--full", "--prune")
        assert json.loads(stdout)["studies_gone"] == 0, stderr
        assert code == 1
