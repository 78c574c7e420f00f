"""The audit's pure core: UID rules, per-study facts from DICOM JSON, every finding code (present
when planted, absent otherwise), totals, and the report files rendered from plain data."""

from __future__ import annotations

import csv
import io
import json
from datetime import date

import pytest

from crawler.audit.findings import (
    CHECKS,
    FHIR_CODES,
    STATE_CODES,
    Collector,
    CopyRow,
    Severity,
    by_modality,
    by_month,
    evaluate,
    instance_rows,
    mask,
    series_rows,
    totals,
    valid_uid,
)
from crawler.audit.report import render_csv, render_html, render_json

TODAY = date(2025, 6, 1)


def el(vr: str, *values):
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def study_item(uid: str, *, date_: str | None = "20240101", pid: str | None = "PID-1", name: str = "Doe^Jane",
               accession: str | None = "ACC12345", modalities=("CT",), n_series=1, n_instances=2, issuer: str | None = None):
    item = {
        "0020000D": el("UI", uid),
        "00080020": el("DA", date_) if date_ else el("DA"),
        "00080050": el("SH", accession) if accession else el("SH"),
        "00080061": el("CS", *modalities),
        "00100010": el("PN", {"Alphabetic": name}),
        "00100020": el("LO", pid) if pid else el("LO"),
        "00201206": el("IS", n_series),
        "00201208": el("IS", n_instances),
    }
    if issuer:
        item["00100021"] = el("LO", issuer)
    return item


def series_item(uid: str, modality: str = "CT", reported: int | None = 2):
    item = {"0020000E": el("UI", uid), "00080060": el("CS", modality)}
    if reported is not None:
        item["00201209"] = el("IS", reported)
    return item


def instance_item(series_uid: str, sop_uid: str):
    return {"0020000E": el("UI", series_uid), "00080018": el("UI", sop_uid)}


def add(collector: Collector, item: dict, series: list[dict], instances: list[dict]) -> None:
    facts = collector.listed(item, "hash-" + item["0020000D"]["Value"][0])
    if facts is not None:
        collector.crawled(facts.uid, series_rows(series), instance_rows(instances))


def clean(collector: Collector, n: str) -> str:
    """A study with nothing wrong: 1.2.<n> with one CT series of two instances."""
    uid = f"1.2.{n}"
    add(collector, study_item(uid), [series_item(f"{uid}.1")], [instance_item(f"{uid}.1", f"{uid}.1.1"), instance_item(f"{uid}.1", f"{uid}.1.2")])
    return uid


def codes(evaluation) -> dict[str, set[str]]:
    return {f.code: set(f.studies) for f in evaluation.findings}


# --- UIDs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "0", "2.25.329800735698586629295641978511506172918", "1.0.3", "9" * 64])
def test_valid_uids(uid):
    assert valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1.2.03.4", "1..2", ".1.2", "1.2.", "1.2.a", "1.2 ", "1" * 65, "1,2", "-1.2", "1.2.3\x00", "01"])
def test_invalid_uids(uid):
    assert not valid_uid(uid)


def test_mask_keeps_two_characters_at_each_end():
    assert mask("AC12345623") == "AC****23"
    assert mask("ACC-QX-20230314") == "AC****14"
    assert mask("ABC") == "****"
    assert mask("") == "" and mask(None) == ""


# --- every finding code ----------------------------------------------------------------------------


def test_clean_studies_have_no_findings():
    c = Collector()
    for n in "123":
        clean(c, n)
    result = evaluate(c.studies, today=TODAY)
    assert result.findings == []
    assert result.errors == 0
    assert set(result.checked) == set(CHECKS) - set(STATE_CODES) - set(FHIR_CODES)


def test_study_count_mismatch():
    c = Collector()
    ok = clean(c, "1")
    add(c, study_item("1.2.9", n_instances=3), [series_item("1.2.9.1")], [instance_item("1.2.9.1", "1.2.9.1.1"), instance_item("1.2.9.1", "1.2.9.1.2")])
    add(c, study_item("1.2.8", n_series=2), [series_item("1.2.8.1")], [instance_item("1.2.8.1", "1.2.8.1.1"), instance_item("1.2.8.1", "1.2.8.1.2")])
    found = codes(evaluate(c.studies, today=TODAY))
    assert found == {"STUDY_COUNT_MISMATCH": {"1.2.9", "1.2.8"}}
    assert ok not in found["STUDY_COUNT_MISMATCH"]


def test_series_count_mismatch():
    c = Collector()
    clean(c, "1")
    add(c, study_item("1.2.9"), [series_item("1.2.9.1", reported=5)], [instance_item("1.2.9.1", "1.2.9.1.1"), instance_item("1.2.9.1", "1.2.9.1.2")])
    result = evaluate(c.studies, today=TODAY)
    assert codes(result) == {"SERIES_COUNT_MISMATCH": {"1.2.9"}}
    assert result.findings[0].severity is Severity.ERROR


def test_missing_attributes():
    c = Collector()
    clean(c, "1")
    add(c, study_item("1.2.7", date_=None), [series_item("1.2.7.1")], [instance_item("1.2.7.1", "1.2.7.1.1"), instance_item("1.2.7.1", "1.2.7.1.2")])
    add(c, study_item("1.2.8", pid=None), [series_item("1.2.8.1")], [instance_item("1.2.8.1", "1.2.8.1.1"), instance_item("1.2.8.1", "1.2.8.1.2")])
    add(c, study_item("1.2.9", accession=None), [series_item("1.2.9.1")], [instance_item("1.2.9.1", "1.2.9.1.1"), instance_item("1.2.9.1", "1.2.9.1.2")])
    assert codes(evaluate(c.studies, today=TODAY)) == {
        "NO_STUDY_DATE": {"1.2.7"}, "NO_PATIENT_ID": {"1.2.8"}, "NO_ACCESSION_NUMBER": {"1.2.9"},
    }


def test_one_study_uid_under_two_patients_counts_both_entries():
    c = Collector()
    clean(c, "1")
    first = study_item("1.2.9", pid="PID-A")
    second = study_item("1.2.9", pid="PID-B")
    assert c.listed(first, "h") is not None
    assert c.listed(first, "h") is None           # listed again by a split window: nothing changes
    assert c.listed(second, "h") is None
    c.crawled("1.2.9", series_rows([series_item("1.2.9.1"), series_item("1.2.9.2")]),
              instance_rows([instance_item("1.2.9.1", "1.2.9.1.1"), instance_item("1.2.9.1", "1.2.9.1.2"),
                             instance_item("1.2.9.2", "1.2.9.2.1"), instance_item("1.2.9.2", "1.2.9.2.2")]))
    assert c.studies["1.2.9"].reported_instances == 4
    assert codes(evaluate(c.studies, today=TODAY)) == {"STUDY_UID_MULTIPLE_PATIENTS": {"1.2.9"}}


def test_same_patient_id_with_other_issuers_is_two_patients():
    c = Collector()
    c.listed(study_item("1.2.9", pid="P", issuer="A", n_series=0, n_instances=0), "h")
    c.listed(study_item("1.2.9", pid="P", issuer="B", n_series=0, n_instances=0), "h")
    c.crawled("1.2.9", [], [])
    assert "STUDY_UID_MULTIPLE_PATIENTS" in codes(evaluate(c.studies, today=TODAY))


def test_invalid_uids_at_every_level():
    c = Collector()
    clean(c, "1")
    add(c, study_item("1.2.03"), [series_item("1.2.3.1")], [instance_item("1.2.3.1", "1.2.3.1.1"), instance_item("1.2.3.1", "1.2.3.1.2")])
    add(c, study_item("1.2.4"), [series_item("1.2.4..1")], [instance_item("1.2.4..1", "1.2.4.1.1"), instance_item("1.2.4..1", "1.2.4.1.2")])
    add(c, study_item("1.2.5"), [series_item("1.2.5.1")], [instance_item("1.2.5.1", "1.2.5.1.01"), instance_item("1.2.5.1", "1.2.5.1.2")])
    assert codes(evaluate(c.studies, today=TODAY)) == {"INVALID_UID": {"1.2.03", "1.2.4", "1.2.5"}}


def test_duplicated_series_and_instance_uids():
    c = Collector()
    clean(c, "1")
    # series 1.2.7.1 in two studies
    add(c, study_item("1.2.7"), [series_item("1.2.7.1")], [instance_item("1.2.7.1", "1.2.7.1.1"), instance_item("1.2.7.1", "1.2.7.1.2")])
    add(c, study_item("1.2.8"), [series_item("1.2.7.1")], [instance_item("1.2.7.1", "1.2.8.1.1"), instance_item("1.2.7.1", "1.2.8.1.2")])
    # instance 1.2.5.1.1 in two studies, and one instance listed twice within one study
    add(c, study_item("1.2.5"), [series_item("1.2.5.1")], [instance_item("1.2.5.1", "1.2.5.1.1"), instance_item("1.2.5.1", "1.2.5.1.2")])
    add(c, study_item("1.2.6"), [series_item("1.2.6.1")], [instance_item("1.2.6.1", "1.2.5.1.1"), instance_item("1.2.6.1", "1.2.6.1.2")])
    add(c, study_item("1.2.4", n_instances=1), [series_item("1.2.4.1", reported=1)],
        [instance_item("1.2.4.1", "1.2.4.1.1"), instance_item("1.2.4.1", "1.2.4.1.1")])
    assert codes(evaluate(c.studies, today=TODAY)) == {
        "DUPLICATE_SERIES_UID": {"1.2.7", "1.2.8"},
        "DUPLICATE_INSTANCE_UID": {"1.2.5", "1.2.6", "1.2.4"},
    }


def test_modalities_in_study_disagreeing_with_the_series():
    c = Collector()
    clean(c, "1")
    add(c, study_item("1.2.9", modalities=("CT", "MR"), n_series=2, n_instances=2),
        [series_item("1.2.9.1", "CT", 1), series_item("1.2.9.2", "PR", 1)],
        [instance_item("1.2.9.1", "1.2.9.1.1"), instance_item("1.2.9.2", "1.2.9.2.1")])
    # the same modalities in another order and repeated: no finding
    add(c, study_item("1.2.8", modalities=("MR", "CT", "CT"), n_series=2, n_instances=2),
        [series_item("1.2.8.1", "CT", 1), series_item("1.2.8.2", "MR", 1)],
        [instance_item("1.2.8.1", "1.2.8.1.1"), instance_item("1.2.8.2", "1.2.8.2.1")])
    assert codes(evaluate(c.studies, today=TODAY)) == {"MODALITIES_MISMATCH": {"1.2.9"}}


def test_future_and_unparseable_dates():
    c = Collector()
    clean(c, "1")
    for uid, day in (("1.2.5", "20250601"), ("1.2.6", "20250602"), ("1.2.7", "20231345"), ("1.2.8", "2023-01-01"), ("1.2.9", "2023")):
        add(c, study_item(uid, date_=day), [series_item(f"{uid}.1")], [instance_item(f"{uid}.1", f"{uid}.1.1"), instance_item(f"{uid}.1", f"{uid}.1.2")])
    assert codes(evaluate(c.studies, today=TODAY)) == {"FUTURE_DATE": {"1.2.6"}, "UNPARSEABLE_DATE": {"1.2.7", "1.2.8", "1.2.9"}}


def test_unreadable_study_and_incomplete_windows():
    c = Collector()
    clean(c, "1")
    c.listed(study_item("1.2.9"), "h")
    c.failed("1.2.9", "study 1.2.9: HTTP 500")
    result = evaluate(c.studies, today=TODAY, incomplete=["StudyDate 20240101: HTTP 413; cannot be split further"])
    found = {f.code: f for f in result.findings}
    assert set(found) == {"STUDY_UNREADABLE", "WINDOW_INCOMPLETE"}
    assert found["WINDOW_INCOMPLETE"].windows == ("StudyDate 20240101: HTTP 413; cannot be split further",)
    assert found["WINDOW_INCOMPLETE"].count == 1
    assert result.errors == 2


def _copies():
    c = Collector()
    uids = [clean(c, n) for n in "12345"]
    synced = {uid: CopyRow(1, 2, "hash-" + uid, "synced", "20240101") for uid in uids}
    return c, uids, synced


def test_state_comparison():
    c, uids, state = _copies()
    assert codes(evaluate(c.studies, today=TODAY, state=state)) == {}
    del state[uids[0]]                                                 # missing
    state[uids[1]] = state[uids[1]]._replace(n_instances=9)            # stale counts
    state[uids[2]] = state[uids[2]]._replace(study_hash="other")       # stale attributes
    state[uids[3]] = state[uids[3]]._replace(status="failed")          # stale: last sync failed
    state["1.2.99"] = CopyRow(1, 1, "x", "synced", "20240101")         # extra
    state["1.2.98"] = CopyRow(1, 1, "x", "gone", "20240101")           # gone: not extra
    result = evaluate(c.studies, today=TODAY, state=state)
    assert codes(result) == {
        "MISSING_FROM_STATE": {uids[0]}, "STALE_IN_STATE": {uids[1], uids[2], uids[3]}, "EXTRA_IN_STATE": {"1.2.99"},
    }
    assert set(STATE_CODES) <= set(result.checked)
    # outside the audited window, or after an incomplete listing, nothing is extra
    assert "EXTRA_IN_STATE" not in codes(evaluate(c.studies, today=TODAY, state=state, since="20240102"))
    incomplete = evaluate(c.studies, today=TODAY, state=state, incomplete=["w"])
    assert "EXTRA_IN_STATE" not in codes(incomplete) and "EXTRA_IN_STATE" not in incomplete.checked


def test_fhir_comparison():
    c, uids, _ = _copies()
    fhir = {uid: CopyRow(1, 2, study_date="20240101") for uid in uids}
    assert codes(evaluate(c.studies, today=TODAY, fhir=fhir)) == {}
    del fhir[uids[0]]
    fhir[uids[1]] = CopyRow(2, 2)
    fhir["1.2.99"] = CopyRow(1, 1, study_date="20240101")
    assert codes(evaluate(c.studies, today=TODAY, fhir=fhir)) == {
        "MISSING_FROM_FHIR": {uids[0]}, "STALE_IN_FHIR": {uids[1]}, "EXTRA_IN_FHIR": {"1.2.99"},
    }
    no_search = evaluate(c.studies, today=TODAY, fhir=fhir, fhir_extras=False)
    assert "EXTRA_IN_FHIR" not in codes(no_search) and "EXTRA_IN_FHIR" not in no_search.checked


def test_every_code_has_a_severity_and_description():
    assert len(CHECKS) == 21
    for check in CHECKS.values():
        assert check.code.isupper() and check.severity in Severity and check.description


def test_totals_and_chart_data():
    c = Collector()
    clean(c, "1")
    add(c, study_item("1.2.2", pid="PID-2", date_="20240301", modalities=("MR",)), [series_item("1.2.2.1", "MR", 1)], [instance_item("1.2.2.1", "1.2.2.1.1")])
    add(c, study_item("1.2.3", date_=None, n_instances=1), [series_item("1.2.3.1", "MR", 1)], [instance_item("1.2.3.1", "1.2.3.1.1")])
    t = totals(c.studies)
    assert (t["patients"], t["studies"], t["series"], t["instances"]) == (2, 3, 3, 4)
    assert by_modality(c.studies) == [("MR", 2), ("CT", 1)]
    assert by_month(c.studies) == [("2024-01", 1), ("2024-02", 0), ("2024-03", 1), ("no date", 1)]


def test_by_month_with_an_outlier_lists_only_months_with_studies():
    c = Collector()
    add(c, study_item("1.2.1", date_="19010101"), [], [])
    add(c, study_item("1.2.2", date_="20240101"), [], [])
    assert by_month(c.studies) == [("1901-01", 1), ("2024-01", 1)]


# --- the files -------------------------------------------------------------------------------------


def _planted_collection():
    c = Collector()
    clean(c, "1")
    add(c, study_item("1.2.9", name="Secretname^Verysecret", pid="SECRET-PID-77", accession="ACC987654", n_instances=3),
        [series_item("1.2.9.1")], [instance_item("1.2.9.1", "1.2.9.1.1"), instance_item("1.2.9.1", "1.2.9.1.2")])
    add(c, study_item("1.2.8", name="<script>alert(1)</script>^X", pid="<b>", accession=None, modalities=("<i>",)),
        [series_item("1.2.8.1", "<i>")], [instance_item("1.2.8.1", "1.2.8.1.1"), instance_item("1.2.8.1", "1.2.8.1.2")])
    return c


def _render(c: Collector, include_phi: bool):
    evaluation = evaluate(c.studies, today=TODAY, incomplete=["StudyDate 20240101 <cap>"])
    t = totals(c.studies)
    windows = {"listed": 3, "complete": 2, "split": 1, "cap": None, "incomplete": ["StudyDate 20240101 <cap>"]}
    compared = {"state": None, "fhir": None}
    common = dict(source="http://pacs/dicom-web", generated="2025-06-01T00:00:00Z", scope="all studies")
    return (
        render_html(**common, today=TODAY, studies=c.studies, evaluation=evaluation, totals=t, windows=windows, include_phi=include_phi, compared=compared),
        render_json(**common, evaluation=evaluation, totals=t, windows=windows, compared=compared),
        render_csv(c.studies, evaluation, include_phi),
    )


def test_findings_json_shape_is_stable_and_sorted():
    page, text, _ = _render(_planted_collection(), include_phi=False)
    document = json.loads(text)
    assert set(document) == {"version", "source", "generated", "scope", "compared", "checked", "totals", "findings", "windows", "listing"}
    assert document["version"] == 1
    assert document["windows"] == ["StudyDate 20240101 <cap>"]
    for finding in document["findings"]:
        assert set(finding) == {"code", "severity", "count", "title", "description", "studies", "windows"}
        assert finding["studies"] == sorted(finding["studies"])
    severities = [f["severity"] for f in document["findings"]]
    assert severities == sorted(severities, key=["error", "warning", "info"].index)
    again = _render(_planted_collection(), include_phi=False)[1]
    assert again == text


def test_csv_has_one_row_per_study():
    _, _, text = _render(_planted_collection(), include_phi=False)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["study_uid"] for r in rows] == ["1.2.1", "1.2.8", "1.2.9"]
    row = rows[2]
    assert (row["instances_reported"], row["instances_enumerated"], row["finding_codes"]) == ("3", "2", "STUDY_COUNT_MISMATCH")
    assert row["accession_number"] == "AC****54"
    assert "patient_ids" not in row


def test_without_phi_no_names_ids_or_accession_numbers():
    for text in _render(_planted_collection(), include_phi=False):
        for secret in ("Secretname", "Verysecret", "SECRET-PID-77", "ACC987654", "PID-1", "Jane"):
            assert secret not in text


def test_with_phi_names_ids_and_accession_numbers_appear():
    page, _, table = _render(_planted_collection(), include_phi=True)
    for text in (page, table):
        assert "SECRET-PID-77" in text and "Verysecret Secretname" in text and "ACC987654" in text


def test_html_escapes_everything_and_loads_nothing():
    page, _, _ = _render(_planted_collection(), include_phi=True)
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "<b>" not in page and "&lt;b&gt;" in page
    assert "<i>" not in page
    assert "&lt;cap&gt;" in page
    for remote in ("http://", "https://"):
        # the only URLs are the audited source (as text) and the SVG namespace
        assert all(chunk.startswith(("pacs/dicom-web", "www.w3.org/2000/svg")) for chunk in page.split(remote)[1:])
    assert "src=" not in page and "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page
    assert page.count('<svg id="chart-') == 2
