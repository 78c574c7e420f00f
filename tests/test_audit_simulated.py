"""``qido-crawler audit`` against the simulators, for what no real server produces on demand:
counts that disagree with what is listed, ModalitiesInStudy that disagrees with the series,
result caps (split, or refused where they cannot be split), unreadable studies; and the
comparisons with a state and a FHIR server after a sync, before and after the PACS changed."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from pathlib import Path

import requests

from crawler.cli import main
from crawler.config import SyncConfig
from crawler.mapping.ids import normalise_base, study_id
from crawler.sync import sync
from fixtures.audit_corpus import AuditFakePacs, SearchableFakeFhir
from fixtures.fakefhir import FakeFhir
from fixtures.fakepacs import FakePacs


def run_audit(url: str, report: Path, *extra: str) -> tuple[int, dict, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["audit", url, "--report", str(report), "--json", "--retries", "0", *extra])
    return code, json.loads((report / "findings.json").read_text()), json.loads(out.getvalue())


def found(document: dict) -> dict[str, set[str]]:
    return {f["code"]: set(f["studies"]) for f in document["findings"]}


def test_clean_simulated_pacs_has_no_findings(tmp_path):
    with FakePacs(n_studies=40, seed=3) as pacs:
        code, document, summary = run_audit(pacs.url, tmp_path)
    assert document["findings"] == []
    assert code == 0 == summary["exit_code"]
    assert document["totals"]["studies"] == 40
    assert document["totals"]["instances"] == document["totals"]["instances_reported"] > 40


def test_counts_and_modalities_that_disagree(tmp_path):
    with AuditFakePacs(n_studies=30, seed=5, inconsistent={3: 2}, series_extra={5: 1}, modalities={7: ["ZZ"]}) as pacs:
        code, document, _ = run_audit(pacs.url, tmp_path)
        uid = pacs.study_uid
        assert found(document) == {
            "STUDY_COUNT_MISMATCH": {uid(3)},
            "SERIES_COUNT_MISMATCH": {uid(5)},
            "MODALITIES_MISMATCH": {uid(7)},
        }
    assert code == 1
    severities = {f["code"]: f["severity"] for f in document["findings"]}
    assert severities == {"STUDY_COUNT_MISMATCH": "error", "SERIES_COUNT_MISMATCH": "error", "MODALITIES_MISMATCH": "warning"}


def test_capped_listing_is_split_like_sync(tmp_path):
    with FakePacs(n_studies=300, seed=2, max_results=40, cap_mode="warning") as pacs:
        code, document, summary = run_audit(pacs.url, tmp_path, "--workers", "8")
    assert document["totals"]["studies"] == 300
    assert document["listing"]["split"] > 0 and summary["windows_split"] > 0
    assert document["findings"] == [] and document["windows"] == []
    assert code == 0


def test_window_the_server_refuses_is_reported(tmp_path):
    """Every query matching anything is refused (413) and a one-day window cannot be split
    below one second: the listing is incomplete, exit code 1."""
    with FakePacs(n_studies=3, seed=1, date_from="20240101", date_to="20240101", max_results=0, cap_mode="413") as pacs:
        code, document, summary = run_audit(pacs.url, tmp_path, "--since", "20240101", "--until", "20240101")
    codes = found(document)
    assert set(codes) == {"WINDOW_INCOMPLETE"}
    assert document["windows"] and all("413" in w for w in document["windows"])
    finding = document["findings"][0]
    assert finding["severity"] == "error" and finding["count"] == len(document["windows"])
    assert code == 1 and summary["windows_incomplete"] == len(document["windows"])


def test_unreadable_study(tmp_path):
    with FakePacs(n_studies=10, seed=4, malformed={2}) as pacs:
        code, document, _ = run_audit(pacs.url, tmp_path)
        assert found(document) == {"STUDY_UNREADABLE": {pacs.study_uid(2)}}
    assert code == 1


# --- comparisons with the copies ------------------------------------------------------------------


def test_state_comparison_after_a_sync(tmp_path):
    state = tmp_path / "state.db"
    with FakePacs(n_studies=20, seed=8) as pacs:
        assert sync(SyncConfig(url=pacs.url, state=state, full=True)).exit_code == 0
        code, document, _ = run_audit(pacs.url, tmp_path / "r1", "--state", str(state))
        assert document["findings"] == [] and code == 0
        assert {"MISSING_FROM_STATE", "EXTRA_IN_STATE", "STALE_IN_STATE"} <= set(document["checked"])
        pacs.add_instances(2, 1)             # changed since the sync
        pacs.delete_study(4)                 # gone from the PACS, still in the state
        with sqlite3.connect(state) as db:   # never recorded
            db.execute("DELETE FROM studies WHERE study_uid = ?", (pacs.study_uid(6),))
        code, document, _ = run_audit(pacs.url, tmp_path / "r2", "--state", str(state))
        assert found(document) == {
            "STALE_IN_STATE": {pacs.study_uid(2)},
            "EXTRA_IN_STATE": {pacs.study_uid(4)},
            "MISSING_FROM_STATE": {pacs.study_uid(6)},
        }
        assert document["compared"]["state"] == str(state)
    assert code == 0   # warnings only


def test_fhir_comparison_after_a_sync(tmp_path):
    with FakePacs(n_studies=20, seed=9) as pacs, SearchableFakeFhir() as fhir:
        assert sync(SyncConfig(url=pacs.url, state=tmp_path / "s.db", full=True, fhir_url=fhir.url)).exit_code == 0
        code, document, _ = run_audit(pacs.url, tmp_path / "r1", "--fhir-url", fhir.url)
        assert document["findings"] == [] and code == 0
        assert {"MISSING_FROM_FHIR", "EXTRA_IN_FHIR", "STALE_IN_FHIR"} <= set(document["checked"])
        source = normalise_base(pacs.url)
        pacs.add_instances(1, 2)
        pacs.delete_study(3)
        requests.delete(f"{fhir.url}/ImagingStudy/{study_id(source, pacs.study_uid(5))}", timeout=10).raise_for_status()
        # a resource of another source is not this audit's business
        other = {"resourceType": "ImagingStudy", "id": study_id("http://other/dicom-web", "1.2.3"), "status": "available",
                 "subject": {"display": "x"}, "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}]}
        requests.put(f"{fhir.url}/ImagingStudy/{other['id']}", json=other, headers={"Content-Type": "application/fhir+json"}, timeout=10).raise_for_status()
        code, document, summary = run_audit(pacs.url, tmp_path / "r2", "--fhir-url", fhir.url)
        assert found(document) == {
            "STALE_IN_FHIR": {pacs.study_uid(1)},
            "EXTRA_IN_FHIR": {pacs.study_uid(3)},
            "MISSING_FROM_FHIR": {pacs.study_uid(5)},
        }
        assert summary["requests"]["fhir"] >= 1
        assert any(r.path.startswith("/ImagingStudy?") for r in fhir.requests)


def test_fhir_server_without_search_is_read_by_id(tmp_path):
    with FakePacs(n_studies=8, seed=10) as pacs, FakeFhir() as fhir:
        assert sync(SyncConfig(url=pacs.url, state=tmp_path / "s.db", full=True, fhir_url=fhir.url)).exit_code == 0
        pacs.add_instances(1, 1)
        requests.delete(f"{fhir.url}/ImagingStudy/{study_id(normalise_base(pacs.url), pacs.study_uid(2))}", timeout=10).raise_for_status()
        code, document, _ = run_audit(pacs.url, tmp_path / "r", "--fhir-url", fhir.url)
        assert found(document) == {"STALE_IN_FHIR": {pacs.study_uid(1)}, "MISSING_FROM_FHIR": {pacs.study_uid(2)}}
        assert "EXTRA_IN_FHIR" not in document["checked"]


def test_fhir_server_refusing_credentials_exits_3(tmp_path):
    with FakePacs(n_studies=2, seed=11) as pacs, SearchableFakeFhir(auth=("u", "p")) as fhir:
        assert main(["audit", pacs.url, "--report", str(tmp_path), "--fhir-url", fhir.url, "--fhir-user", "u", "--fhir-password", "wrong", "-q"]) == 3


def test_audit_stderr_holds_no_patient_data_with_hostile_answers(tmp_path, capsys):
    """Studies with wrongly typed values, cut JSON, object UIDs and wrong counts are reported on
    stderr by Study Instance UID and cause, never with the patient's name or ID."""
    with FakePacs(n_studies=30, seed=12, bad_values={2}, malformed={3}, object_uids={4}, inconsistent={5: 1}) as pacs:
        code, document, _ = run_audit(pacs.url, tmp_path, "-vv", "--include-phi")
    err = capsys.readouterr().err
    assert code == 1 and document["findings"]
    assert pacs.study_uid(3) in err   # the unreadable study is named
    assert "SIMULATED" not in err and "PATIENT0" not in err and "SIM0" not in err
