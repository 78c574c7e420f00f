"""The arro3 tables the Delta sink writes (crawler/tables/batches.py) are the same Arrow data as
pyarrow makes from the same rows: same schema, same values, nulls included; and a Delta run
never imports pyarrow."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")

from crawler.tables import batches  # noqa: E402
from crawler.tables.arrow import table as pyarrow_table  # noqa: E402
from crawler.tables.rows import TABLES, study_rows  # noqa: E402
from crawler.tables.tags import parse  # noqa: E402

EXPECTED = Path(__file__).resolve().parent.parent / "fixtures" / "expected"
GOLDEN = sorted(EXPECTED.glob("*.json"))
SOURCE = "http://pacs.example.org/dicom-web"
TAGS = tuple(parse(t) for t in ("SliceThickness", "ImageType", "AcquisitionDateTime", "InstitutionName:study",
                                "SeriesDate", "PixelSpacing", "InstanceNumber:series", "ReferencedFrameNumber"))
ZONE = timezone(timedelta(hours=-5))


def imaging_study(path: Path) -> dict:
    (study,) = [r for r in json.loads(path.read_text()) if r["resourceType"] == "ImagingStudy"]
    return study


def same(name, rows, tags=()):
    ours = pa.table(batches.table(name, rows, tags))
    theirs = pyarrow_table(name, rows, change_log=False, tags=tags)
    assert ours.schema.equals(theirs.schema), f"{ours.schema}\n!=\n{theirs.schema}"
    assert ours.to_pylist() == theirs.to_pylist()
    assert ours.equals(theirs)
    return ours


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_every_golden_study_gives_the_same_arrow_data_as_pyarrow(path):
    rows = study_rows(imaging_study(path), SOURCE)
    meta = {"run_id": 7, "synced_at": datetime(2026, 12, 6, 8, 30, 1, 123456, tzinfo=timezone.utc)}
    for name in TABLES:
        table_rows = [{**row, **meta} for row in rows.table(name)]
        assert table_rows
        same(name, table_rows)


def test_tag_columns_of_every_type_with_nulls_lists_and_empty_lists():
    rows = study_rows(imaging_study(EXPECTED / "study-01.r5.json"), SOURCE)
    values = [
        {"slice_thickness": 1.25, "image_type": ["ORIGINAL", "PRIMARY"], "acquisition_date_time": datetime(2023, 3, 14, 9, 1, 2, 5, tzinfo=ZONE),
         "pixel_spacing": [0.5, 0.25], "referenced_frame_number": [1, 2, 3]},
        {"slice_thickness": None, "image_type": [], "acquisition_date_time": None, "pixel_spacing": None, "referenced_frame_number": []},
        {"image_type": ["DERIVED", None], "acquisition_date_time": datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)},
    ]
    instances = [{**row, **values[i % len(values)]} for i, row in enumerate(rows.instances * 3)]
    table = same("instances", instances, TAGS)
    assert table.column("acquisition_date_time").type == pa.timestamp("us", tz="UTC")
    assert table.column("referenced_frame_number").to_pylist()[:2] == [[1, 2, 3], []]
    series = [{**row, "series_date": d, "instance_number": n} for row, d, n in
              zip(rows.series * 2, [date(2023, 3, 14), None, date(1900, 1, 1), date(2099, 12, 31)], [1, None, -5, 2**40])]
    same("series", series, TAGS)
    same("studies", [{**rows.study, "institution_name": "Example Hospital"}, {**rows.study, "institution_name": None}], TAGS)


def test_nulls_in_every_column_and_an_empty_table():
    rows = study_rows(imaging_study(EXPECTED / "study-01.r5.json"), SOURCE)
    for name in TABLES:
        keys_only = [{key: row[key] for key in ("source", "study_uid", "series_uid", "sop_uid") if key in row} for row in rows.table(name)]
        same(name, keys_only)
        same(name, [])
    study = {**rows.study, "procedure_codes": [{"system": None, "code": "X"}, {}], "reason_codes": None, "modalities": [None, "CT"]}
    same("studies", [study])
    series = {**rows.series[0], "body_site": None, "laterality": {"code": "L"}, "performers": [{"display": "A"}, {"function": None}]}
    same("series", [series, {**rows.series[0], "performers": None}])


def test_a_time_without_a_zone_is_taken_as_utc_as_pyarrow_takes_it():
    rows = study_rows(imaging_study(EXPECTED / "study-01.r5.json"), SOURCE)
    same("studies", [{**rows.study, "synced_at": datetime(2026, 1, 2, 3, 4, 5)}])


def test_a_delta_run_never_imports_pyarrow(tmp_path):
    study = EXPECTED / "study-01.r5.json"
    code = (
        "import json, sys\n"
        "from crawler.sinks.delta import DeltaTables\n"
        f"resources = [(r['resourceType'], r['id'], json.dumps(r).encode()) for r in json.loads(open({str(study)!r}).read())]\n"
        "for run in (1, 2):\n"
        f"    sink = DeltaTables({str(tmp_path / 'delta')!r}, {SOURCE!r}, run)\n"
        "    sink.add('k', resources)\n"
        "    sink.finish()\n"
        "    assert sink.commits, run\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyarrow'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
