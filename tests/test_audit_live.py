"""``qido-crawler audit`` against a live Orthanc: the clean fixture corpus (the ``pacs`` fixture)
and the same corpus with the planted problems of ``fixtures.audit_corpus``. Each finding code
that Orthanc can hold is present for exactly the planted studies, and absent on the clean corpus
(except where the clean corpus really has the problem: studies without a Patient ID, an
accession number or a Study Date, which are read from the DICOM files themselves)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest

from crawler.audit.findings import CHECKS
from crawler.cli import main
from fixtures import audit_corpus, corpus, orthanc
from fixtures.orthanc import free_port


def run_audit(url: str, report: Path, *extra: str) -> tuple[int, dict, dict]:
    """(exit code, findings.json, the --json summary)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["audit", url, "--report", str(report), "--json", *extra])
    return code, json.loads((report / "findings.json").read_text()), json.loads(out.getvalue())


def found(document: dict) -> dict[str, set[str]]:
    return {f["code"]: set(f["studies"]) for f in document["findings"]}


@pytest.fixture(scope="module")
def clean_truth(corpus_files) -> dict[str, set[str]]:
    """What the clean corpus really lacks, read from its files."""
    truth: dict[str, set[str]] = {"NO_PATIENT_ID": set(), "NO_ACCESSION_NUMBER": set(), "NO_STUDY_DATE": set()}
    for path in corpus_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid = ds.StudyInstanceUID
        if not str(ds.get("PatientID", "") or "").strip():
            truth["NO_PATIENT_ID"].add(uid)
        if not str(ds.get("AccessionNumber", "") or "").strip():
            truth["NO_ACCESSION_NUMBER"].add(uid)
        if not str(ds.get("StudyDate", "") or "").strip():
            truth["NO_STUDY_DATE"].add(uid)
    return truth


@pytest.fixture(scope="module")
def clean_audit(pacs, tmp_path_factory):
    report = tmp_path_factory.mktemp("audit-clean")
    return (*run_audit(pacs.dicomweb, report), report)


@pytest.fixture(scope="module")
def planted_pacs(corpus_files, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = audit_corpus.generate(tmp_path_factory.mktemp("planted"))
    server = orthanc.start(tmp_path_factory.mktemp("orthanc-planted"))
    try:
        server.upload([*corpus_files, *files])
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="module")
def planted_audit(planted_pacs, tmp_path_factory):
    report = tmp_path_factory.mktemp("audit-planted")
    return (*run_audit(planted_pacs.dicomweb, report), report)


def test_clean_corpus_has_only_what_it_really_lacks(clean_audit, clean_truth, corpus_study_uids):
    code, document, summary = clean_audit[:3]
    assert found(document) == {k: v for k, v in clean_truth.items() if v}
    assert code == 0 and summary["exit_code"] == 0
    assert document["totals"]["studies"] == len(corpus_study_uids)
    assert document["windows"] == []


@pytest.mark.parametrize("code", sorted(audit_corpus.EXPECTED))
def test_planted_problem_is_found(planted_audit, clean_truth, code):
    document = planted_audit[1]
    flagged = found(document).get(code, set())
    assert flagged - clean_truth.get(code, set()) == audit_corpus.EXPECTED[code]


@pytest.mark.parametrize("code", sorted(set(CHECKS) - set(audit_corpus.EXPECTED)))
def test_codes_not_planted_are_absent(planted_audit, clean_truth, code):
    """Nothing else is reported for the planted studies (e.g. no count mismatch for the study
    held under two patients: its reported counts are those of both listing entries)."""
    flagged = found(planted_audit[1]).get(code, set())
    assert flagged == clean_truth.get(code, set())


def test_planted_report_exit_code_and_summary(planted_audit):
    code, document, summary = planted_audit[:3]
    assert code == 1 == summary["exit_code"]            # error findings exist
    assert summary["findings"] == {f["code"]: f["count"] for f in document["findings"]}
    assert summary["findings_by_severity"]["error"] >= 4
    assert set(summary) >= {"source", "generated", "report_dir", "files", "totals", "requests", "seconds", "windows_incomplete"}
    assert sorted(p.name for p in planted_audit[3].iterdir()) == ["findings.json", "report.html", "studies.csv"]


def test_studies_csv_names_every_study_once(planted_audit, corpus_study_uids):
    lines = (planted_audit[3] / "studies.csv").read_text().splitlines()
    uids = [line.split(",")[0] for line in lines[1:]]
    assert len(uids) == len(set(uids))
    assert set(uids) >= corpus_study_uids | {audit_corpus.study_uid(k) for k in ("future", "twopat", "sharedsop-b")}


def _secrets(patients) -> set[str]:
    """Patient names (as stored and as components) and IDs, as a privacy test greps for them."""
    out: set[str] = set()
    for patient in patients:
        if patient.patient_id:
            out.add(patient.patient_id)
        out.add(patient.name)
        for group in patient.name.split("="):
            for part in group.split("^"):
                if len(part) >= 3 or (part and not part.isascii()):
                    out.add(part)
    return out


def _texts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_bytes().decode("utf-8") for p in folder.iterdir() if p.is_file()}


def test_report_without_phi_has_no_patient_names_or_ids(clean_audit):
    texts = _texts(clean_audit[3])
    assert set(texts) == {"findings.json", "report.html", "studies.csv"}
    for secret in _secrets(corpus.PATIENTS):
        escaped = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
        for name, text in texts.items():
            for form in escaped:
                assert form not in text, f"{name} contains patient data"


def test_planted_report_without_phi_has_no_patient_names_or_ids(planted_audit):
    texts = _texts(planted_audit[3])
    for secret in _secrets(corpus.PATIENTS + audit_corpus.PATIENTS):
        for name, text in texts.items():
            assert secret not in text, f"{name} contains patient data"


def test_report_with_phi_has_them(planted_pacs, tmp_path):
    code, _, _ = run_audit(planted_pacs.dicomweb, tmp_path, "--include-phi")
    html_text = (tmp_path / "report.html").read_text()
    csv_text = (tmp_path / "studies.csv").read_text()
    assert "AUD-50016-TA" in csv_text and "AUD-50017-TB" in csv_text     # the study under two patients
    assert "AUD-50016-TA" in html_text and "Aurelian Twopatcombe" in html_text
    assert "AUDACC1000" in csv_text                                      # accession numbers unmasked


def test_window_limits_the_audit(planted_pacs, tmp_path):
    code, document, _ = run_audit(planted_pacs.dicomweb, tmp_path, "--since", "20240101", "--until", "20240131")
    flagged = found(document)
    assert document["scope"] == "StudyDate 20240101-20240131"
    assert "FUTURE_DATE" not in flagged and "NO_STUDY_DATE" not in flagged and "UNPARSEABLE_DATE" not in flagged
    assert flagged["STUDY_UID_MULTIPLE_PATIENTS"] == {audit_corpus.study_uid("twopat")}
    rows = list(csv.DictReader(io.StringIO((tmp_path / "studies.csv").read_text())))
    assert len(rows) == document["totals"]["studies"] >= 4
    assert all("20240101" <= row["study_date"] <= "20240131" for row in rows)
    assert {audit_corpus.study_uid(k) for k in ("nopid", "noacc", "twopat")} <= {row["study_uid"] for row in rows}


def test_unreachable_source_exits_3(tmp_path):
    assert main(["audit", f"http://127.0.0.1:{free_port()}/dicom-web", "--report", str(tmp_path / "r"), "--retries", "0"]) == 3


def test_usage_errors_exit_2(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["audit", "http://127.0.0.1:1/dicom-web", "--report", str(a_file)]) == 2
    assert main(["audit", "http://127.0.0.1:1/dicom-web", "--report", str(tmp_path / "r"), "--since", "20240201", "--until", "20240101"]) == 2
    assert main(["audit", "http://127.0.0.1:1/dicom-web", "--report", str(tmp_path / "r"), "--state", str(tmp_path / "none.db")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["audit", "http://127.0.0.1:1/dicom-web"])
    assert exc.value.code == 2


def test_state_of_a_sync_of_the_same_pacs_agrees(pacs, tmp_path):
    """After a full sync of the live Orthanc, the state holds exactly what the audit lists."""
    from crawler.config import SyncConfig
    from crawler.sync import sync

    state = tmp_path / "state.db"
    assert sync(SyncConfig(url=pacs.dicomweb, state=state, full=True)).exit_code == 0
    code, document, _ = run_audit(pacs.dicomweb, tmp_path / "report", "--state", str(state))
    assert not set(found(document)) & {"MISSING_FROM_STATE", "EXTRA_IN_STATE", "STALE_IN_STATE"}
    assert {"MISSING_FROM_STATE", "EXTRA_IN_STATE", "STALE_IN_STATE"} <= set(document["checked"])
    assert code == 0


@pytest.mark.parametrize("phi", [(), ("--include-phi",)], ids=["default", "include-phi"])
def test_audit_stderr_holds_no_patient_data(planted_pacs, tmp_path, capsys, phi):
    """Whatever the report may hold (--include-phi), the log lines on stderr never carry names or
    Patient IDs, even at debug level and with findings and unreadable studies to report."""
    code, document, _ = run_audit(planted_pacs.dicomweb, tmp_path, "-vv", *phi)
    err = capsys.readouterr().err
    assert code == 1 and document["findings"] and len(err.splitlines()) > 5
    for secret in _secrets(corpus.PATIENTS + audit_corpus.PATIENTS):
        assert secret not in err, "stderr contains patient data"
