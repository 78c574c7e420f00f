"""``--include-tag`` and ``--include-phi``: the tag parser (keyword or number, level, VR -> Arrow
type, PHI refusal) and its values (pure), then the live Orthanc: the corpus synced into
``--parquet`` and ``--delta`` with included tags has one typed column per tag, holding what the
server's own QIDO-RS answers say (asked directly here), on the QIDO-RS path and on the WADO-RS
metadata path; a PHI tag without ``--include-phi`` is exit 2 with nothing written; a tag added on
a later run gives the existing Delta tables its column (schema evolution) and its values."""

from __future__ import annotations

import json
import sqlite3
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pydicom
import pytest
import requests

from crawler.cli import main
from crawler.config import SyncConfig
from crawler.errors import ConfigError
from crawler.tables.tags import (
    FIXED_COLUMNS, IncludeTag, TagError, column_name, extract, parse, parse_all, signature, value,
)
from crawler.worker import study_hash
from fixtures import corpus
from fixtures.tables import delta_files

URL = "http://pacs.invalid/dicom-web"


# --- the parser --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["SliceThickness", "00180050", "(0018,0050)", "0018,0050", " SliceThickness "])
def test_a_tag_by_keyword_or_by_number_is_the_same_tag(text):
    tag = parse(text)
    assert (tag.tag, tag.keyword, tag.vr, tag.column, tag.level, tag.arrow_type, tag.phi) == (
        "00180050", "SliceThickness", "DS", "slice_thickness", "instance", "float64", False)


@pytest.mark.parametrize(("keyword", "level"), [
    ("StudyDescription", "study"), ("ModalitiesInStudy", "study"), ("NumberOfStudyRelatedInstances", "study"),
    ("PatientAge", "study"), ("PatientWeight", "study"), ("AdditionalPatientHistory", "study"),
    ("Manufacturer", "series"), ("ManufacturerModelName", "series"), ("SeriesNumber", "series"), ("FrameOfReferenceUID", "series"),
    ("ProtocolName", "series"), ("SoftwareVersions", "series"), ("BodyPartExamined", "series"),
    ("SliceThickness", "instance"), ("ImageType", "instance"), ("ContentDate", "instance"), ("KVP", "instance"),
    ("AcquisitionDateTime", "instance"), ("Rows", "instance"),
])
def test_the_level_is_inferred_from_the_module(keyword, level):
    assert parse(keyword).level == level


def test_a_level_suffix_overrides_the_inferred_one():
    assert parse("SliceThickness:series").level == "series"
    assert parse("00080070:INSTANCE").level == "instance"
    assert parse("StudyInstanceUID:series").table == "series"
    with pytest.raises(TagError, match="study, series or instance"):
        parse("SliceThickness:patient")


@pytest.mark.parametrize(("keyword", "arrow"), [
    ("ContentDate", "date32"), ("AcquisitionDateTime", "timestamp"), ("ContentTime", "string"),
    ("SeriesNumber", "int64"), ("Rows", "int64"), ("LargestImagePixelValue", "int64"),   # US or SS
    ("SliceThickness", "float64"), ("KVP", "float64"), ("PixelSpacing", "list<float64>"), ("ImageType", "list<string>"),
    ("Manufacturer", "string"), ("FrameOfReferenceUID", "string"), ("ModalitiesInStudy", "list<string>"),
    ("ImagePositionPatient", "list<float64>"), ("WindowCenter", "list<float64>"), ("NumberOfFrames", "int64"),
])
def test_the_arrow_type_follows_the_vr_and_the_vm(keyword, arrow):
    assert parse(keyword).arrow_type == arrow


def test_column_names_are_the_keyword_in_snake_case():
    assert [column_name(k) for k in ("SliceThickness", "SOPClassUID", "KVP", "ImagePositionPatient", "NumberOfFrames", "PatientID")] == [
        "slice_thickness", "sop_class_uid", "kvp", "image_position_patient", "number_of_frames", "patient_id"]


@pytest.mark.parametrize(("text", "message"), [
    ("NoSuchKeyword", "unknown tag 'NoSuchKeyword': not in the DICOM dictionary"),
    ("00191001", "private tags are not supported"),
    ("12345", "not in the DICOM dictionary"),
    ("ReferencedImageSequence", "sequences cannot be a column"),
    ("AnatomicRegionSequence", "sequences cannot be a column"),
    ("PixelData", "binary values"),
])
def test_what_cannot_be_a_column_is_refused_by_name(text, message):
    with pytest.raises(TagError, match=message):
        parse(text)


PHI = ["PatientName", "PatientID", "PatientBirthDate", "PatientAge", "PatientSex", "OtherPatientIDs", "PatientAddress",
       "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "00100020:series",
       "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
       "PhysiciansOfRecord", "RequestingPhysician", "StationName", "DeviceSerialNumber", "ContentCreatorName",
       "ReviewerName", "HumanPerformerName",   # person names outside the list: refused by their VR (PN)
       "00100010", "(0008,0050)"]


@pytest.mark.parametrize("text", PHI)
def test_patient_identifying_tags_are_refused_without_include_phi(text):
    with pytest.raises(TagError) as raised:
        parse_all([text], include_phi=False, fixed=FIXED_COLUMNS)
    message = str(raised.value)
    assert parse(text).keyword in message and "--include-phi" in message
    (tag,) = parse_all([text], include_phi=True, fixed={})
    assert tag.phi


@pytest.mark.parametrize("text", ["SliceThickness", "Manufacturer", "ModalitiesInStudy", "StudyDescription", "SeriesNumber",
                                  "FrameOfReferenceUID", "ImageType", "SoftwareVersions", "KVP", "ContentDate"])
def test_other_tags_are_not_patient_data(text):
    assert not parse(text).phi
    assert parse_all([text], include_phi=False, fixed=FIXED_COLUMNS)


def test_a_column_that_is_a_fixed_column_is_refused():
    for text, table in (("Modality", "series"), ("SOPClassUID", "instances"), ("SliceThickness:study", None)):
        if table is None:
            assert parse_all([text], False, FIXED_COLUMNS)
            continue
        with pytest.raises(TagError, match=f"fixed column of the {table} table"):
            parse_all([text], False, FIXED_COLUMNS)
    # the same name at a level whose table has no such column is fine
    assert parse_all(["SOPClassUID:series"], False, FIXED_COLUMNS)[0].column == "sop_class_uid"


def test_a_tag_named_twice_is_one_column_and_two_levels_are_refused():
    tags = parse_all(["SliceThickness", "00180050", "(0018,0050)", "Manufacturer"], False, FIXED_COLUMNS)
    assert [t.column for t in tags] == ["slice_thickness", "manufacturer"]
    with pytest.raises(TagError, match="two levels"):
        parse_all(["SliceThickness", "SliceThickness:series"], False, FIXED_COLUMNS)


# --- the settings ------------------------------------------------------------------------------

def test_the_library_refuses_what_the_cli_refuses(tmp_path):
    with pytest.raises(ConfigError) as raised:
        SyncConfig(url=URL, out=tmp_path, include_tags=("SliceThickness",))
    assert raised.value.setting == "include_tags" and "Parquet folder or Delta tables" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        SyncConfig(url=URL, parquet=tmp_path / "t", include_tags=("PatientName",))
    assert raised.value.setting == "include_tags" and "--include-phi" in str(raised.value)
    config = SyncConfig(url=URL, parquet=tmp_path / "t", include_tags=("PatientName", "SliceThickness"), include_phi=True)
    assert [t.keyword for t in config.crawl.tags] == ["PatientName", "SliceThickness"]
    assert SyncConfig(url=URL, out=tmp_path).crawl.tags == ()
    one = SyncConfig(url=URL, delta=str(tmp_path / "d"), include_tags="SliceThickness")   # type: ignore[arg-type]
    assert one.include_tags == ("SliceThickness",) and [t.column for t in one.crawl.tags] == ["slice_thickness"]


def test_the_study_hash_takes_the_tags_and_is_unchanged_without_them():
    attributes = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00081190": {"vr": "UR", "Value": ["http://x"]}}
    plain = study_hash(attributes)
    assert study_hash(attributes, ()) == plain
    import hashlib

    import orjson
    assert plain == hashlib.sha256(orjson.dumps({"0020000D": attributes["0020000D"]}, option=orjson.OPT_SORT_KEYS)).hexdigest()
    one = signature(parse_all(["SliceThickness"], False, FIXED_COLUMNS))
    two = signature(parse_all(["SliceThickness", "Manufacturer"], False, FIXED_COLUMNS))
    assert len({plain, study_hash(attributes, one), study_hash(attributes, two)}) == 3
    assert signature(parse_all(["Manufacturer", "SliceThickness"], False, FIXED_COLUMNS)) == two


# --- values ------------------------------------------------------------------------------------

def _tag(text: str) -> IncludeTag:
    return parse(text)


def test_values_are_typed_by_the_vr():
    ds = {
        "00180050": {"vr": "DS", "Value": ["2.50 "]},
        "00280030": {"vr": "DS", "Value": [0.5, "0.75"]},
        "00200011": {"vr": "IS", "Value": [" 7"]},
        "00280010": {"vr": "US", "Value": [512]},
        "00080023": {"vr": "DA", "Value": ["20230314"]},
        "00080033": {"vr": "TM", "Value": ["101530.123"]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00080070": {"vr": "LO"},
    }
    assert value(_tag("SliceThickness"), ds) == 2.5
    assert value(_tag("PixelSpacing"), ds) == [0.5, 0.75]
    assert value(_tag("SeriesNumber"), ds) == 7
    assert value(_tag("Rows"), ds) == 512
    assert value(_tag("ContentDate"), ds) == date(2023, 3, 14)
    assert value(_tag("ContentTime"), ds) == "101530.123"
    assert value(_tag("ImageType"), ds) == ["ORIGINAL", "PRIMARY"]
    assert value(_tag("PatientName"), ds) == "Doe^Jane"
    assert value(_tag("Manufacturer"), ds) is None   # empty
    assert value(_tag("KVP"), ds) is None            # absent


def test_a_bad_value_is_null_not_a_failure():
    ds = {"00180050": {"vr": "DS", "Value": ["thick"]}, "00200011": {"vr": "IS", "Value": [True]},
          "00080023": {"vr": "DA", "Value": ["2023"]}, "00080070": {"vr": "LO", "Value": [{"x": 1}]},
          "00280010": "not an element", "00280030": {"vr": "DS", "Value": ["x", "0.5"]}}
    assert [value(_tag(k), ds) for k in ("SliceThickness", "SeriesNumber", "ContentDate", "Manufacturer", "Rows")] == [None] * 5
    assert value(_tag("PixelSpacing"), ds) == [0.5]


def test_a_datetime_takes_its_own_offset_else_the_studys_else_the_zone():
    tag = _tag("AcquisitionDateTime")
    own = {"0008002A": {"vr": "DT", "Value": ["20230314101530.5+0100"]}}
    bare = {"0008002A": {"vr": "DT", "Value": ["20230314101530"]}}
    assert value(tag, own) == datetime(2023, 3, 14, 9, 15, 30, 500000, tzinfo=timezone.utc)
    assert value(tag, own, offset=-300) == datetime(2023, 3, 14, 9, 15, 30, 500000, tzinfo=timezone.utc)
    assert value(tag, bare, offset=-300) == datetime(2023, 3, 14, 15, 15, 30, tzinfo=timezone.utc)
    assert value(tag, bare, zone=timezone(timedelta(hours=2))) == datetime(2023, 3, 14, 8, 15, 30, tzinfo=timezone.utc)


def test_extract_reads_the_study_the_series_and_the_instances():
    tags = parse_all(["ModalitiesInStudy", "Manufacturer", "SliceThickness"], False, FIXED_COLUMNS)
    study = {"00080061": {"vr": "CS", "Value": ["CT", "SR"]}, "00080201": {"vr": "SH", "Value": ["+0100"]}}

    def item(series: str, sop: str, **tags: object) -> dict:
        ds = {"0020000E": {"vr": "UI", "Value": [series]}, "00080018": {"vr": "UI", "Value": [sop]}}
        for tag, v in tags.items():
            ds[tag] = {"vr": "XX", "Value": [v]}
        return ds

    items = [item("1.1", "1.1.1"), item("1.1", "1.1.2", **{"00080070": "Acme", "00180050": 5}), item("1.2", "1.2.1", **{"00180050": "1.25"})]
    values = extract(tags, study, items)
    assert values.study == {"modalities_in_study": ["CT", "SR"]}
    assert values.series == {"1.1": {"manufacturer": "Acme"}, "1.2": {"manufacturer": None}}
    assert values.instances == {"1.1.1": {"slice_thickness": None}, "1.1.2": {"slice_thickness": 5.0}, "1.2.1": {"slice_thickness": 1.25}}
    assert values.signature == signature(tags)


# --- the live Orthanc --------------------------------------------------------------------------

TAGS = {
    # keyword: (table, DuckDB type)
    "ModalitiesInStudy": ("studies", "VARCHAR[]"),
    "NumberOfStudyRelatedInstances": ("studies", "BIGINT"),
    "Manufacturer": ("series", "VARCHAR"),
    "SeriesNumber": ("series", "BIGINT"),
    "SliceThickness": ("instances", "DOUBLE"),
    "PixelSpacing": ("instances", "DOUBLE[]"),
    "ContentDate": ("instances", "DATE"),
    "ImageType": ("instances", "VARCHAR[]"),
    "Rows": ("instances", "BIGINT"),
}
KEYS = {"studies": ("study_uid",), "series": ("study_uid", "series_uid"), "instances": ("study_uid", "series_uid", "sop_uid")}


def qido(server, path: str, **params) -> list[dict]:
    answer = requests.get(f"{server.dicomweb}/{path}", params=params, timeout=30)
    answer.raise_for_status()
    return answer.json()


def plain(vr: str, values: list) -> object:
    """What the server's values of one attribute are as a column value (written here, not taken
    from the crawler)."""
    out = []
    for v in values:
        if vr == "DS":
            out.append(float(v))
        elif vr in ("IS", "US"):
            out.append(int(v))
        elif vr == "DA":
            out.append(date(int(v[:4]), int(v[4:6]), int(v[6:8])))
        elif vr == "PN":
            out.append(v["Alphabetic"])
        else:
            out.append(v)
    return out


def server_values(server, uids: set[str], keywords: list[str]) -> dict[str, dict[tuple, object]]:
    """{table: {key: {column: value}}} from the server's own QIDO-RS answers at each level."""
    tags = {k: parse(k) for k in keywords}
    found: dict[str, dict[tuple, dict]] = {name: {} for name in KEYS}
    for uid in uids:
        fields = {level: [t.tag for t in tags.values() if t.level == level] for level in ("study", "series", "instance")}
        answers = {
            "studies": qido(server, "studies", StudyInstanceUID=uid, includefield=fields["study"]),
            "series": qido(server, f"studies/{uid}/series", includefield=fields["series"]),
            "instances": qido(server, f"studies/{uid}/instances", includefield=fields["instance"]),
        }
        for name, items in answers.items():
            for item in items:
                key = tuple(item[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018")[:len(KEYS[name])])
                row = {}
                for tag in tags.values():
                    if tag.table != name:
                        continue
                    element = item.get(tag.tag, {})
                    got = plain(element.get("vr", tag.vr), element.get("Value", []))
                    row[tag.column] = (got or None) if tag.multiple else (got[0] if got else None)
                found[name][key] = row
    return found


def table_values(con, relation: str, name: str, columns: list[str]) -> dict[tuple, dict]:
    cursor = con.execute(f"SELECT {', '.join(KEYS[name] + tuple(columns))} FROM {relation}")
    return {row[:len(KEYS[name])]: dict(zip(columns, row[len(KEYS[name]):])) for row in cursor.fetchall()}


class Runner:
    def __init__(self, server, work: Path, capsys) -> None:
        self.server, self.capsys = server, capsys
        self.parquet, self.delta, self.state = work / "parquet", work / "delta", work / "state.db"

    def sync(self, *extra: str, code: int = 0) -> tuple[dict | None, str]:
        got = main(["sync", self.server.dicomweb, "--parquet", str(self.parquet), "--delta", str(self.delta),
                    "--state", str(self.state), "--timezone", "Europe/Berlin", "--json", *extra])
        out, err = self.capsys.readouterr()
        assert got == code, err
        return (json.loads(out) if code == 0 else None), err


def tag_options(keywords) -> list[str]:
    return [option for keyword in keywords for option in ("--include-tag", keyword)]


@pytest.mark.parametrize("metadata", ["never", "auto"])
def test_included_tags_are_typed_columns_with_the_servers_values(pacs, corpus_study_uids, tmp_path, capsys, metadata):
    runner = Runner(pacs, tmp_path, capsys)
    summary, _ = runner.sync("--metadata", metadata, *tag_options(TAGS))
    assert summary["studies_new"] == len(corpus_study_uids)
    assert (summary["requests"].get("metadata", 0) > 0) == (metadata == "auto")
    expected = server_values(pacs, corpus_study_uids, list(TAGS))
    con = duckdb.connect()
    for name in KEYS:
        columns = [parse(k).column for k, (table, _) in TAGS.items() if table == name]
        parquet = f"read_parquet('{runner.parquet}/{name}/*.parquet')"
        delta = f"read_parquet({delta_files(runner.delta / name)!r})"
        for relation in (parquet, delta):
            types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {relation})").fetchall())
            assert {c: types[c] for c in columns} == {parse(k).column: t for k, (table, t) in TAGS.items() if table == name}
            got = table_values(con, relation, name, columns)
            assert got == expected[name], (name, relation)
        # the corpus has values for every column (a test that compares nulls only proves nothing)
        for column in columns:
            assert any(row[column] is not None for row in expected[name].values()), column
    assert any(len(row["pixel_spacing"] or []) == 2 for row in expected["instances"].values())


def test_a_phi_tag_without_include_phi_is_refused_and_nothing_is_written(pacs, corpus_study_uids, tmp_path, capsys):
    runner = Runner(pacs, tmp_path, capsys)
    for keyword in ("PatientName", "AccessionNumber", "00100020"):
        _, err = runner.sync("--include-tag", "SliceThickness", "--include-tag", keyword, code=2)
        assert "--include-tag" in err and "--include-phi" in err and parse(keyword).keyword in err
        assert err.count("\n") == 1, err
    assert not runner.parquet.exists() and not runner.delta.exists() and not runner.state.exists()

    # PatientWeight: Orthanc's study search answers it only when asked (includefield of the listing)
    _, err = runner.sync(*tag_options(["PatientName", "AccessionNumber", "PatientWeight"]), "--include-phi")
    expected = server_values(pacs, corpus_study_uids, ["PatientName", "AccessionNumber", "PatientWeight"])["studies"]
    con = duckdb.connect()
    columns = ["patient_name", "accession_number", "patient_weight"]
    got = table_values(con, f"read_parquet({delta_files(runner.delta / 'studies')!r})", "studies", columns)
    assert got == expected
    assert all(any(row[column] for row in got.values()) for column in columns)
    names = {row["patient_name"] for row in got.values() if row["patient_name"]}
    assert not any(name in err for name in names)


@pytest.mark.parametrize(("options", "message"), [
    (["--include-tag", "SliceThicknes"], "unknown tag 'SliceThicknes'"),
    (["--include-tag", "ReferencedImageSequence"], "sequences cannot be a column"),
    (["--include-tag", "Modality"], "fixed column of the series table"),
])
def test_a_tag_that_cannot_be_a_column_is_exit_2(pacs, tmp_path, capsys, options, message):
    runner = Runner(pacs, tmp_path, capsys)
    _, err = runner.sync(*options, code=2)
    assert message in err and not runner.state.exists()


def test_the_tags_need_a_table(pacs, tmp_path, capsys):
    code = main(["sync", pacs.dicomweb, "--out", str(tmp_path / "out"), "--state", str(tmp_path / "s.db"), "--include-tag", "KVP"])
    assert code == 2
    assert "--include-tag" in capsys.readouterr().err


def test_a_tag_added_later_evolves_the_tables_and_fills_its_column(pacs, corpus_study_uids, tmp_path, capsys):
    runner = Runner(pacs, tmp_path, capsys)
    first, _ = runner.sync()
    assert first["studies_new"] == len(corpus_study_uids)
    added = ["SliceThickness", "Manufacturer"]
    dry, _ = runner.sync("--full", "--dry-run", *tag_options(added))
    assert (dry["studies_changed"], dry["studies_unchanged"]) == (len(corpus_study_uids), 0)
    second, _ = runner.sync("--full", *tag_options(added))
    # the tags are part of each study's hash: every listed study is crawled again for its columns
    assert second["studies_unchanged"] == 0 and second["studies_failed"] == 0
    expected = server_values(pacs, corpus_study_uids, added)
    con = duckdb.connect()
    from deltalake import DeltaTable

    for name, column in (("instances", "slice_thickness"), ("series", "manufacturer")):
        table = DeltaTable(str(runner.delta / name))
        assert column in table.schema().to_arrow().names
        assert table.version() >= 1
        got = table_values(con, f"read_parquet({delta_files(runner.delta / name)!r})", name, [column])
        assert got == expected[name] and any(row[column] is not None for row in got.values())
        # the Parquet log: the first run's file has no such column, DuckDB reads both by name
        log = f"read_parquet('{runner.parquet}/{name}/*.parquet', union_by_name=true)"
        latest = con.execute(f"SELECT count(*), count({column}) FROM {log} WHERE run_id = ?", [second["run_id"]]).fetchone()
        assert latest[0] == len(expected[name]) and latest[1] == sum(row[column] is not None for row in expected[name].values())
    third, _ = runner.sync("--full", *tag_options(reversed(added)))
    assert third["studies_unchanged"] == len(corpus_study_uids)


def test_a_changed_study_level_value_rewrites_the_rows_though_the_imagingstudy_is_the_same(live, corpus_files, corpus_study_uids, tmp_path, capsys):
    runner = Runner(live, tmp_path, capsys)
    options = [*tag_options(["PatientWeight", "SliceThickness"]), "--include-phi"]
    runner.sync(*options)
    uid = corpus.uid("study", "01")
    files = [p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == uid]
    weight = float(pydicom.dcmread(files[0], stop_before_pixels=True).get("PatientWeight", 70)) + 1.5
    changed = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.PatientWeight = weight
        changed.append(tmp_path / f"w{i}.dcm")
        ds.save_as(changed[-1], enforce_file_format=True)
    live.upload(changed)

    summary, _ = runner.sync("--full", *options)
    # the listing entry changed (PatientWeight is asked for there), the ImagingStudy did not
    assert summary["studies_unchanged"] == len(corpus_study_uids) - 1 and summary["resources_written"] == 0
    con = duckdb.connect()
    got = table_values(con, f"read_parquet({delta_files(runner.delta / 'studies')!r})", "studies", ["patient_weight"])
    assert got[(uid,)] == {"patient_weight": weight}
    assert got == server_values(live, corpus_study_uids, ["PatientWeight"])["studies"]
    log = con.execute(f"SELECT study_uid, patient_weight FROM read_parquet('{runner.parquet}/studies/*.parquet') WHERE run_id = ?",
                      [summary["run_id"]]).fetchall()
    assert log == [(uid, weight)]


def test_a_study_the_change_feed_names_is_asked_for_with_its_tags(live, corpus_files, tmp_path, capsys):
    """A study outside the run's windows that Orthanc's change log names is listed by its UID:
    that query asks for the study-level tags too."""
    runner = Runner(live, tmp_path, capsys)
    options = [*tag_options(["PatientWeight", "SliceThickness"]), "--include-phi", "--changes", "orthanc"]
    runner.sync(*options)
    source = next(p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).get("SliceThickness") is not None)
    late_uid, sop_uid = corpus.uid("study", "late"), corpus.uid("instance", "late")
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = late_uid, corpus.uid("series", "late"), sop_uid
    ds.StudyDate, ds.PatientWeight = "19990101", 77.5
    ds.save_as(tmp_path / "late.dcm", enforce_file_format=True)
    live.upload([tmp_path / "late.dcm"])

    summary, _ = runner.sync(*options)
    assert summary["studies_new"] == 1
    con = duckdb.connect()
    studies = table_values(con, f"read_parquet({delta_files(runner.delta / 'studies')!r})", "studies", ["patient_weight"])
    assert studies[(late_uid,)] == {"patient_weight": 77.5}
    instances = table_values(con, f"read_parquet({delta_files(runner.delta / 'instances')!r})", "instances", ["slice_thickness"])
    assert instances[(late_uid, corpus.uid("series", "late"), sop_uid)] == {"slice_thickness": float(ds.SliceThickness)}


def test_the_dask_executor_asks_for_the_tags_too(pacs, corpus_study_uids, tmp_path, capsys):
    """With --executor dask the listing and the crawl run in worker processes: the tags travel
    in the settings and the values come back in the outcomes."""
    runner = Runner(pacs, tmp_path, capsys)
    keywords = ["PatientWeight", "Manufacturer", "SliceThickness"]
    summary, _ = runner.sync(*tag_options(keywords), "--include-phi", "--executor", "dask", "--workers", "1", "--worker-threads", "2")
    assert summary["studies_new"] == len(corpus_study_uids)
    expected = server_values(pacs, corpus_study_uids, keywords)
    con = duckdb.connect()
    for name, column in (("studies", "patient_weight"), ("series", "manufacturer"), ("instances", "slice_thickness")):
        got = table_values(con, f"read_parquet('{runner.parquet}/{name}/*.parquet')", name, [column])
        assert got == expected[name] and any(row[column] is not None for row in got.values()), name


def test_watch_takes_the_same_options_and_refuses_the_same(pacs, tmp_path, capsys):
    base = ["watch", pacs.dicomweb, "--changes", "orthanc", "--state", str(tmp_path / "s.db")]
    assert main([*base, "--parquet", str(tmp_path / "t"), "--include-tag", "PatientName"]) == 2
    assert "--include-phi" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o"), "--include-tag", "SliceThickness"]) == 2
    assert "--include-tag" in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not (tmp_path / "o").exists() and not (tmp_path / "s.db").exists()


def test_watch_writes_the_tag_columns_of_a_study_uploaded_while_watching(live, corpus_files, corpus_study_uids, tmp_path):
    import threading
    import time

    from crawler.watch import WatchOptions, watch

    config = SyncConfig(live.dicomweb, parquet=tmp_path / "parquet", delta=str(tmp_path / "delta"), state=tmp_path / "state.db",
                        changes="orthanc", include_tags=("PatientWeight", "SliceThickness"), include_phi=True)  # type: ignore[arg-type]
    stop = threading.Event()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(watch(config, WatchOptions(interval=1, stable_after=1, roll_every=2,
                                                                                      reconcile_every=3600), stop)), daemon=True)
    thread.start()
    con = duckdb.connect()

    def in_delta() -> dict[tuple, dict]:
        if not (tmp_path / "delta" / "studies" / "_delta_log").is_dir():
            return {}
        return table_values(con, f"read_parquet({delta_files(tmp_path / 'delta' / 'studies')!r})", "studies", ["patient_weight"])

    def wait_for(what, timeout: float = 60.0):
        end = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < end and thread.is_alive(), "timed out"
            time.sleep(0.2)

    source = next(p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).get("SliceThickness") is not None)
    added, series, sop = corpus.uid("study", "tags-watch"), corpus.uid("series", "tags-watch"), corpus.uid("instance", "tags-watch")
    try:
        wait_for(lambda: {(uid,) for uid in corpus_study_uids} <= set(in_delta()))
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.PatientWeight = added, series, sop, 66.5
        ds.save_as(tmp_path / "w.dcm", enforce_file_format=True)
        live.upload([tmp_path / "w.dcm"])
        wait_for(lambda: (added,) in in_delta())
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and result and result[0].exit_code == 0
    assert in_delta()[(added,)] == {"patient_weight": 66.5}
    instances = table_values(con, f"read_parquet({delta_files(tmp_path / 'delta' / 'instances')!r})", "instances", ["slice_thickness"])
    assert instances[(added, series, sop)] == {"slice_thickness": float(ds.SliceThickness)}
    logged = con.execute(f"SELECT patient_weight FROM read_parquet('{tmp_path}/parquet/studies/*.parquet') WHERE study_uid = ?",
                         [added]).fetchall()
    assert logged and all(row == (66.5,) for row in logged)


def test_an_audit_of_a_state_synced_with_tags_asks_for_them_and_finds_nothing_stale(pacs, corpus_study_uids, tmp_path, capsys):
    """The study hashes of a sync with --include-tag take the tags (and the study-level values);
    the state keeps which, so an audit asks for the same and hashes alike. Failed before: every
    study of the source STALE_IN_STATE."""
    runner = Runner(pacs, tmp_path, capsys)
    runner.sync(*tag_options(TAGS))
    assert main(["audit", pacs.dicomweb, "--report", str(tmp_path / "report"), "--state", str(runner.state), "--json",
                 "--timezone", "Europe/Berlin"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "STALE_IN_STATE" not in summary["findings"] and "MISSING_FROM_STATE" not in summary["findings"]
    # and a study-level value that changed since is stale: the audit did hash the values
    state = sqlite3.connect(runner.state)
    state.execute("UPDATE studies SET study_hash = 'x' WHERE study_uid = ?", (sorted(corpus_study_uids)[0],))
    state.commit()
    state.close()
    main(["audit", pacs.dicomweb, "--report", str(tmp_path / "report2"), "--state", str(runner.state), "--json", "--timezone", "Europe/Berlin"])
    assert json.loads(capsys.readouterr().out)["findings"].get("STALE_IN_STATE") == 1
