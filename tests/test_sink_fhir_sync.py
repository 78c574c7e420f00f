"""The sync with a FHIR server that refuses studies or Bundles (issue 20 item 2, issue 13 items 7, 11).

The PACS is the QIDO-RS simulator (fixtures/fakepacs.py) and the FHIR server the FHIR simulator
(fixtures/fakefhir.py) in the modes that reproduce Medplum: transactions run as batches with
minimal answers, and at most 50 updates per transaction.
"""

from __future__ import annotations

import json


from crawler.cli import main
from crawler.mapping.ids import study_id
from crawler.state import State
from fixtures.fakefhir import FakeFhir
from fixtures.fakepacs import FakePacs

NAME_PREFIX = "SIMULATED"


def sync(capsys, *args: str) -> tuple[int, dict, str]:
    code = main(["sync", *args, "--metadata", "never", "--json", "--retries", "0", "--timezone", "UTC"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}, captured.err


def posts(server: FakeFhir) -> list[int]:
    return [r.n_entries for r in server.requests if r.method == "POST"]


def test_the_learned_bundle_size_is_kept_per_fhir_server_and_used_by_the_next_run_from_its_start(tmp_path, capsys):
    state = tmp_path / "state.db"
    with FakePacs(n_studies=60, seed=5) as pacs, FakePacs(n_studies=60, seed=6) as other, FakeFhir(max_updates=50) as fhir:
        code, summary, err = sync(capsys, pacs.url, "--state", str(state), "--fhir-url", fhir.url, "--patients")
        assert code == 0, err
        sent = posts(fhir)
        assert sent[0] > 50 and fhir.statuses[400] == 1 and 1 <= len(sent) - 1 <= 4
        assert summary["studies_new"] == 60 and summary["studies_failed"] == 0
        held = State(state)
        try:
            assert held.fhir_max_entries(fhir.url) == 50
        finally:
            held.close()
        fhir.reset_counts()
        code, summary, err = sync(capsys, other.url, "--state", str(state), "--fhir-url", fhir.url, "--patients")
        assert code == 0, err
        assert summary["studies_new"] == 60 and fhir.statuses[400] == 0
        assert posts(fhir) and all(n <= 50 for n in posts(fhir))


def test_refused_studies_are_failed_with_an_operation_outcome_line_and_honest_figures(tmp_path, capsys):
    state, out = tmp_path / "state.db", tmp_path / "out"
    with FakePacs(n_studies=8, seed=7) as pacs:
        refused_uids = {pacs.study_uid(2), pacs.study_uid(5)}
        reject = {("ImagingStudy", study_id(pacs.url, uid)) for uid in refused_uids}
        with FakeFhir(as_batch=True, honour_minimal=True, reject=reject, reject_text=True) as fhir:
            code, summary, err = sync(capsys, pacs.url, "--state", str(state), "--out", str(out), "--fhir-url", fhir.url, "--patients")
            assert code == 1
            assert summary["studies_new"] == 6 and summary["studies_failed"] == 2
            held = {i for t, i in fhir.resources if t == "ImagingStudy"}
            assert held == {study_id(pacs.url, pacs.study_uid(i)) for i in range(8) if i not in (2, 5)}
            (folder,) = [p for p in out.iterdir() if p.is_dir()]
            outcomes = [json.loads(line) for line in (folder / "OperationOutcome.ndjson").read_text().splitlines()]
            assert len(outcomes) == 2
            texts = [o["issue"][0]["diagnostics"] for o in outcomes]
            assert {uid for uid in refused_uids if any(uid in t for t in texts)} == refused_uids
            assert all("HTTP 422" in t and "business-rule at ImagingStudy.subject" in t for t in texts)
            written = sum(len((folder / f"{t}.ndjson").read_text().splitlines()) for t in ("ImagingStudy", "Patient", "Endpoint")
                          if (folder / f"{t}.ndjson").exists())
            assert summary["resources_written"] + summary["resources_refused"] == written
            assert summary["resources_refused"] >= 2
            s = State(state)
            rows = [s.study(pacs.url, uid) for uid in refused_uids]
            s.close()
            assert all(r.status == "failed" and "business-rule" in r.last_error for r in rows)
            for text in (err, *texts, *(r.last_error for r in rows)):
                assert NAME_PREFIX not in text
            fhir.reject = set()
            code, summary, err = sync(capsys, pacs.url, "--state", str(state), "--fhir-url", fhir.url, "--patients", "--full")
            assert code == 0, err
            assert len({i for t, i in fhir.resources if t == "ImagingStudy"}) == 8


def test_the_server_text_is_logged_only_when_asked_for(tmp_path, capsys):
    with FakePacs(n_studies=3, seed=7) as pacs:
        reject = {("ImagingStudy", study_id(pacs.url, pacs.study_uid(1)))}
        with FakeFhir(reject=reject, reject_text=True) as fhir:
            code, _, err = sync(capsys, pacs.url, "--state", str(tmp_path / "s.db"), "--fhir-url", fhir.url, "--patients",
                                "--log-server-text")
    assert code == 1 and "violates a (simulated) business rule" in err


def test_a_server_without_update_as_create_is_a_usage_error_before_any_crawl(tmp_path, capsys):
    with FakePacs(n_studies=3, seed=7) as pacs, FakeFhir(update_create=False) as fhir:
        code, _, err = sync(capsys, pacs.url, "--state", str(tmp_path / "s.db"), "--fhir-url", fhir.url)
        assert code == 2 and "update as create" in err and len(err.strip().splitlines()) == 1
        assert pacs.requests == [] and posts(fhir) == []
