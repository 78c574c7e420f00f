"""The analytics tables on the live Orthanc: the fixture corpus synced with --out, --parquet and
--delta in one run holds every study, series and instance with the values of the same run's
ImagingStudy resources; after changes (a study added, a series added, an instance removed, a
study deleted with --prune) the Delta tables and the Parquet change log equal a fresh
``export --format parquet``. DuckDB reads the tables (fixtures/tables.py)."""

from __future__ import annotations

import json
import re
import stat
from collections import Counter
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import pydicom

from crawler.cli import main
from fixtures import corpus
from fixtures.tables import delta_files, delta_rows, log_rows, snapshot_rows

TABLES = ("studies", "series", "instances")
README = Path(__file__).resolve().parent.parent / "README.md"


class Runner:
    def __init__(self, server, work: Path, capsys) -> None:
        self.server = server
        self.work = work
        self.capsys = capsys
        self.out, self.parquet, self.delta, self.state = work / "out", work / "parquet", work / "delta", work / "state.db"

    def sync(self, *extra: str) -> dict:
        code = main(["sync", self.server.dicomweb, "--out", str(self.out), "--parquet", str(self.parquet), "--delta", str(self.delta),
                     "--state", str(self.state), "--timezone", "Europe/Berlin", "--json", *extra])
        out, err = self.capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    def export(self, name: str = "snapshot") -> Path:
        target = self.work / name
        assert main(["export", "--state", str(self.state), "--out", str(target), "--format", "parquet", "-q"]) == 0
        return target


def ndjson(run_dir: str, resource_type: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / f"{resource_type}.ndjson").read_text().splitlines()]


def utc_or_none(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text).astimezone(timezone.utc) if text and "T" in text else None


def offset_or_none(text: str | None) -> int | None:
    return int(datetime.fromisoformat(text).utcoffset().total_seconds() // 60) if text and "T" in text else None


def date_or_none(text: str | None) -> date | None:
    return date.fromisoformat(text[:10]) if text and len(text) >= 10 else None


def concept(value: dict | None) -> dict | None:
    """The first coding of an R5 CodeableConcept or CodeableReference, as the CODE struct."""
    if value is None:
        return None
    value = value.get("concept", value)
    coding = (value.get("coding") or [{}])[0]
    if not coding and "text" not in value:
        return None
    return {"system": coding.get("system"), "code": coding.get("code"), "display": coding.get("display"), "text": value.get("text")}


def expected_tables(studies: list[dict], source: str, address: str) -> dict[str, list[dict]]:
    """The three tables as the R5 ImagingStudy resources (NDJSON) say they must be."""
    tables: dict[str, list[dict]] = {name: [] for name in TABLES}
    for study in studies:
        uid = study["identifier"][0]["value"].removeprefix("urn:oid:")
        subject = study.get("subject", {}).get("identifier", {})
        accession = next((b["identifier"] for b in study.get("basedOn", ())), {})
        tables["studies"].append({
            "source": source, "study_uid": uid, "fhir_id": study["id"],
            "patient_id": subject.get("value"),
            "patient_id_issuer": subject.get("system") or subject.get("assigner", {}).get("display"),
            "accession": accession.get("value"),
            "accession_issuer": accession.get("system") or accession.get("assigner", {}).get("display"),
            "study_date": date_or_none(study.get("started")),
            "study_datetime": utc_or_none(study.get("started")),
            "study_tz_offset": offset_or_none(study.get("started")),
            "modalities": [m["coding"][0]["code"] for m in study.get("modality", ())],
            "description": study.get("description"),
            "n_series": study["numberOfSeries"], "n_instances": study["numberOfInstances"],
            "referrer": study.get("referrer", {}).get("display"),
            "procedure_codes": [concept(p) for p in study.get("procedure", ())],
            "reason_codes": [concept(r) for r in study.get("reason", ())],
            "endpoint": address,
        })
        for series in study["series"]:
            tables["series"].append({
                "source": source, "study_uid": uid, "series_uid": series["uid"], "number": series.get("number"),
                "modality": (series["modality"].get("coding") or [{}])[0].get("code"),
                "description": series.get("description"),
                "body_site": concept(series.get("bodySite")), "laterality": concept(series.get("laterality")),
                "n_instances": series["numberOfInstances"],
                "series_date": date_or_none(series.get("started")),
                "started": utc_or_none(series.get("started")), "started_tz_offset": offset_or_none(series.get("started")),
                "performers": [{"function": p["function"]["coding"][0]["code"], "type": p["actor"].get("type"),
                                "display": p["actor"].get("display"), "identifier": p["actor"].get("identifier", {}).get("value")}
                               for p in series.get("performer", ())],
            })
            for instance in series["instance"]:
                tables["instances"].append({
                    "source": source, "study_uid": uid, "series_uid": series["uid"], "sop_uid": instance["uid"],
                    "sop_class_uid": instance["sopClass"]["code"].removeprefix("urn:oid:"),
                    "sop_class_name": instance["sopClass"]["display"], "number": instance.get("number"), "title": instance.get("title"),
                })
    keys = {"studies": 2, "series": 3, "instances": 4}
    return {name: sorted(rows, key=lambda r: tuple(r.values())[:keys[name]]) for name, rows in tables.items()}


def comparable(rows: list[dict]) -> list[dict]:
    """DuckDB's values made plain: timestamps with tz in UTC (DuckDB gives its own zone object)."""
    def plain(value):
        if isinstance(value, datetime):
            return value.astimezone(timezone.utc)
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return [plain(row) for row in rows]


def test_one_run_writes_ndjson_parquet_and_delta_with_the_same_values(pacs, corpus_study_uids, tmp_path, capsys):
    runner = Runner(pacs, tmp_path, capsys)
    summary = runner.sync()
    run_dir = summary["run_dir"]
    studies = ndjson(run_dir, "ImagingStudy")
    (endpoint,) = ndjson(run_dir, "Endpoint")
    assert len(studies) == len(corpus_study_uids) > 10
    expected = expected_tables(studies, pacs.dicomweb, endpoint["address"])
    assert sum(len(s["series"]) for s in studies) == len(expected["series"]) > len(studies)
    assert len(expected["instances"]) == sum(s["numberOfInstances"] for s in studies)

    con = duckdb.connect()
    run_name = Path(run_dir).name
    snapshot = runner.export()
    for name in TABLES:
        (log_file,) = sorted((runner.parquet / name).iterdir())
        assert log_file.name == f"{run_name}.parquet"
        log = con.execute("SELECT * FROM read_parquet(?)", [str(log_file)]).fetchall()
        changes = con.execute("SELECT DISTINCT change, run_id FROM read_parquet(?)", [str(log_file)]).fetchall()
        assert changes == [("upsert", summary["run_id"])] and len(log) == len(expected[name])
        assert comparable(delta_rows(con, runner.delta, name)) == expected[name], name
        assert comparable(log_rows(con, runner.parquet, name)) == expected[name], name
        assert comparable(snapshot_rows(con, snapshot, name)) == expected[name], name
    typed = dict(con.execute(
        "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet(?))", [delta_files(runner.delta / "studies")]).fetchall())
    assert (typed["study_date"], typed["study_datetime"], typed["n_series"], typed["modalities"]) == (
        "DATE", "TIMESTAMP WITH TIME ZONE", "INTEGER", "VARCHAR[]")

    # privacy: the files hold patient IDs, as the NDJSON does
    for path in [*runner.parquet.rglob("*"), *runner.delta.rglob("*"), *snapshot.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert any(row["patient_id"] for row in expected["studies"])


def readme_queries() -> list[str]:
    section = README.read_text().split("### Tables for analytics", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.S).group(1)
    return [q.strip() for q in block.split(";") if q.strip()]


def test_the_readme_duckdb_queries_run_on_the_corpus_tables(pacs, tmp_path, capsys):
    runner = Runner(pacs, tmp_path, capsys)
    summary = runner.sync()
    snapshot = runner.export()
    per_month, latest = readme_queries()
    assert "unnest(modalities)" in per_month and "QUALIFY" in latest
    con = duckdb.connect()
    got = con.sql(per_month.replace("DIR/", f"{snapshot}/")).fetchall()
    expected = Counter()
    for study in ndjson(summary["run_dir"], "ImagingStudy"):
        month = study["started"][:7] if len(study.get("started", "")) >= 10 else None
        for modality in study.get("modality", ()):
            expected[(month, modality["coding"][0]["code"])] += 1
    # DuckDB sorts NULL last
    assert got == sorted(((month, modality, n) for (month, modality), n in expected.items()), key=lambda r: (r[0] is None, r[0] or "", r[1]))
    assert len(got) > 5
    rows = con.sql(latest.replace("DIR/", f"{runner.parquet}/")).fetchall()
    assert len(rows) == summary["studies_new"]
    # the same query on the Delta table (DuckDB's delta_scan needs its extension: the files of the log here)
    files = ", ".join(f"'{f}'" for f in delta_files(runner.delta / "studies"))
    on_delta = per_month.replace("read_parquet('DIR/studies.parquet')", f"read_parquet([{files}])")
    assert con.sql(on_delta).fetchall() == got


def _copy_with(path: Path, dest: Path, **changes) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _file_of(corpus_files: list[Path], study: str) -> Path:
    uid = corpus.uid("study", study)
    return next(p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == uid)


def test_changes_leave_the_delta_tables_and_the_change_log_equal_to_a_fresh_export(live, corpus_files, tmp_path, capsys):
    runner = Runner(live, tmp_path / "work", capsys)
    runner.sync()
    con = duckdb.connect()
    before = {name: delta_rows(con, runner.delta, name) for name in TABLES}

    added_study = corpus.uid("study", "tables-new")
    live.upload([_copy_with(_file_of(corpus_files, "07"), tmp_path / "new.dcm", StudyInstanceUID=added_study,
                            SeriesInstanceUID=corpus.uid("series", "tables-new"), SOPInstanceUID=corpus.uid("instance", "tables-new"))])
    grown, added_series = corpus.uid("study", "09"), corpus.uid("series", "tables-extra")
    live.upload([_copy_with(_file_of(corpus_files, "09"), tmp_path / "series.dcm", SeriesInstanceUID=added_series,
                            SOPInstanceUID=corpus.uid("instance", "tables-extra"), SeriesNumber=77)])
    shrunk = next(r for r in before["studies"] if r["n_instances"] >= 3 and r["study_uid"] not in (grown,))
    removed = next(r["sop_uid"] for r in before["instances"] if r["study_uid"] == shrunk["study_uid"])
    live.rest("DELETE", f"/instances/{live.rest('POST', '/tools/lookup', data=removed).json()[0]['ID']}")
    gone = next(r["study_uid"] for r in before["studies"] if r["study_uid"] not in (grown, shrunk["study_uid"]))
    live.rest("DELETE", f"/studies/{live.rest('POST', '/tools/lookup', data=gone).json()[0]['ID']}")

    summary = runner.sync("--full", "--prune")
    assert (summary["studies_new"], summary["studies_changed"], summary["studies_gone"]) == (1, 2, 1), summary
    snapshot = runner.export()
    for name in TABLES:
        fresh = snapshot_rows(con, snapshot, name)
        assert delta_rows(con, runner.delta, name) == fresh, name
        assert log_rows(con, runner.parquet, name) == fresh, name
    after = {name: delta_rows(con, runner.delta, name) for name in TABLES}
    studies = {r["study_uid"]: r for r in after["studies"]}
    assert added_study in studies and gone not in studies and len(studies) == len(before["studies"])
    assert studies[shrunk["study_uid"]]["n_instances"] == shrunk["n_instances"] - 1
    assert added_series in {r["series_uid"] for r in after["series"] if r["study_uid"] == grown}
    assert removed not in {r["sop_uid"] for r in after["instances"]}
    assert not [r for r in after["series"] + after["instances"] if r["study_uid"] == gone]
    assert len(after["instances"]) == len(before["instances"]) + 2 - 1 - sum(r["study_uid"] == gone for r in before["instances"])

    # the change log: one more file per table, the deletion as one studies row
    run2 = Path(summary["run_dir"]).name
    deleted = con.execute("SELECT study_uid, run_id FROM read_parquet(?) WHERE change = 'delete'",
                          [str(runner.parquet / "studies" / f"{run2}.parquet")]).fetchall()
    assert deleted == [(gone, summary["run_id"])]
    assert all(len(list((runner.parquet / name).glob("*.parquet"))) == 2 for name in TABLES)
    assert not [p for p in runner.parquet.rglob(".*")]


def test_watch_keeps_the_tables_without_an_output_folder(live, corpus_files, corpus_study_uids, tmp_path):
    """watch --delta --parquet (no --out): a study uploaded while watching reaches the Delta
    tables at a checkpoint and the change log when its period is finished."""
    import threading
    import time

    from crawler.config import SyncConfig
    from crawler.watch import WatchOptions, watch

    config = SyncConfig(live.dicomweb, parquet=tmp_path / "parquet", delta=str(tmp_path / "delta"), state=tmp_path / "state.db",
                        changes="orthanc")  # type: ignore[arg-type]
    stop = threading.Event()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(watch(config, WatchOptions(interval=1, stable_after=1, roll_every=2,
                                                                                      reconcile_every=3600), stop)), daemon=True)
    thread.start()
    con = duckdb.connect()

    def studies_in_delta() -> set[str]:
        if not (tmp_path / "delta" / "studies" / "_delta_log").is_dir():
            return set()
        return {r["study_uid"] for r in delta_rows(con, tmp_path / "delta", "studies")}

    def wait_for(what, timeout: float = 60.0):
        end = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < end and thread.is_alive(), "timed out"
            time.sleep(0.2)

    try:
        wait_for(lambda: corpus_study_uids <= studies_in_delta())
        added = corpus.uid("study", "tables-watch")
        live.upload([_copy_with(_file_of(corpus_files, "03"), tmp_path / "w.dcm", StudyInstanceUID=added,
                                SeriesInstanceUID=corpus.uid("series", "tables-watch"), SOPInstanceUID=corpus.uid("instance", "tables-watch"))])
        wait_for(lambda: added in studies_in_delta())
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and result and result[0].exit_code == 0
    logged = {r["study_uid"] for r in log_rows(con, tmp_path / "parquet", "studies")}
    assert logged == studies_in_delta() == corpus_study_uids | {added}
    assert len(list((tmp_path / "parquet" / "studies").glob("*.parquet"))) >= 2
    assert not list((tmp_path / "parquet").rglob(".*"))
