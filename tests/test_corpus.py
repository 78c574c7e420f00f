"""Tests of the fixture corpus generator (fixtures/corpus.py)."""

from __future__ import annotations

import pathlib
import re
from collections import defaultdict

import pydicom
import pytest
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from fixtures import corpus


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> list[pathlib.Path]:
    return corpus.generate(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def datasets(generated: list[pathlib.Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in generated]


def _has(ds: pydicom.Dataset, keyword: str) -> bool:
    """True if the attribute is present with a non-empty value."""
    return keyword in ds and ds[keyword].value not in (None, "", [], b"")


def test_generate_is_deterministic(tmp_path: pathlib.Path) -> None:
    first = corpus.generate(tmp_path / "a")
    second = corpus.generate(tmp_path / "b")
    rel_first = [p.relative_to(tmp_path / "a") for p in first]
    rel_second = [p.relative_to(tmp_path / "b") for p in second]
    assert rel_first == rel_second
    assert rel_first == sorted(rel_first)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a


def test_uid_is_deterministic_and_valid() -> None:
    value = corpus.uid("study", "01")
    assert value == corpus.uid("study", "01")
    assert value != corpus.uid("study", "02")
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", value)
    assert len(value) <= 64


def test_files_read_back_with_uids_and_file_meta(datasets: list[pydicom.Dataset]) -> None:
    sop_uids = set()
    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            assert _has(ds, keyword)
        sop_uids.add(ds.SOPInstanceUID)
        if "PixelData" in ds:
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
    assert len(sop_uids) == len(datasets)


def test_expected_studies_match_files(datasets: list[pydicom.Dataset]) -> None:
    series: dict[str, set[str]] = defaultdict(set)
    instances: dict[str, int] = defaultdict(int)
    modalities: dict[str, set[str]] = defaultdict(set)
    patients: dict[str, set[str]] = defaultdict(set)
    for ds in datasets:
        study = ds.StudyInstanceUID
        series[study].add(ds.SeriesInstanceUID)
        instances[study] += 1
        modalities[study].add(ds.Modality)
        patients[study].add(ds.PatientID)
    facts = corpus.expected_studies()
    assert len({f.study_uid for f in facts}) == len(facts) == len(series)
    assert 10 <= len(facts) <= 12
    for fact in facts:
        assert len(series[fact.study_uid]) == fact.n_series
        assert instances[fact.study_uid] == fact.n_instances
        assert tuple(sorted(modalities[fact.study_uid])) == fact.modalities
        assert patients[fact.study_uid] == {fact.patient_id}
    assert sum(f.n_instances for f in facts) == len(datasets)


def test_corpus_is_small(generated: list[pathlib.Path]) -> None:
    assert sum(p.stat().st_size for p in generated) < 1_000_000


def test_sample_files_are_local_and_valid(datasets: list[pydicom.Dataset]) -> None:
    samples = corpus.sample_files()
    assert 3 <= len(samples) <= 6
    data_dir = pathlib.Path(pydicom.__file__).parent / "data"
    generated_studies = {ds.StudyInstanceUID for ds in datasets}
    modalities = set()
    for path in samples:
        assert path.is_file()
        assert data_dir in path.parents
        ds = pydicom.dcmread(path)  # no force: must be Part-10 with file meta
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert _has(ds, keyword)
        assert ds.StudyInstanceUID not in generated_studies
        modalities.add(ds.Modality)
    assert len(modalities) >= 3


def test_all_files(tmp_path: pathlib.Path) -> None:
    files = corpus.all_files(tmp_path)
    assert files == corpus.generate(tmp_path) + corpus.sample_files()


def test_patients_appear_in_files(generated: list[pathlib.Path]) -> None:
    blobs = [p.read_bytes() for p in generated]
    assert any(any(ord(c) > 0xFF for c in patient.name) for patient in corpus.PATIENTS)
    for patient in corpus.PATIENTS:
        assert any(patient.name.encode("utf-8") in blob for blob in blobs), patient.name
        if patient.patient_id:
            assert any(patient.patient_id.encode("ascii") in blob for blob in blobs)
        if patient.issuer:
            assert any(patient.issuer.encode("ascii") in blob for blob in blobs)
    ids = {p.patient_id for p in corpus.PATIENTS}
    assert ids == {f.patient_id for f in corpus.expected_studies()}
    assert "" in ids  # one study without PatientID


# Mapping-table attributes: each must be present in some files and absent or
# empty in others (StudyInstanceUID, Modality and the SOP UIDs are always there).
_SOMETIMES = [
    "StudyID",
    "StudyTime",
    "TimezoneOffsetFromUTC",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ProcedureCodeSequence",
    "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence",
    "ReasonForRequestedProcedureCodeSequence",
    "ReasonForTheRequestedProcedure",
    "StudyDescription",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "AnatomicRegionSequence",
    "Laterality",
    "SpecimenDescriptionSequence",
    "SeriesDate",
    "SeriesTime",
    "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence",
    "OperatorsName",
    "OperatorIdentificationSequence",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "InstanceNumber",
    "ImageType",
    "DocumentTitle",
]


@pytest.mark.parametrize("keyword", _SOMETIMES)
def test_mapping_rows_present_and_absent(datasets: list[pydicom.Dataset], keyword: str) -> None:
    present = [_has(ds, keyword) for ds in datasets]
    assert any(present), f"{keyword} never present"
    assert not all(present), f"{keyword} always present"


def test_value_variants(datasets: list[pydicom.Dataset]) -> None:
    def values(keyword: str) -> set[str]:
        return {str(ds[keyword].value) for ds in datasets if _has(ds, keyword)}

    assert {"101530.123", "1015"} <= values("StudyTime")
    assert {"+0100", "-0500"} <= values("TimezoneOffsetFromUTC")
    assert {"R", "L", "B", "U"} <= values("Laterality")
    assert {"CHEST", "ABDOMEN", "KNEE", "HEAD", "LEFTTOE"} <= values("BodyPartExamined")
    assert {"CT", "MR", "US", "SR", "SM", "DOC", "PR", "XA"} <= values("Modality")
    assert any(ds.StudyTime == "" for ds in datasets)
    assert any(
        isinstance(ds.get("OperatorsName"), MultiValue) and len(ds.OperatorsName) == 2
        for ds in datasets
    )
    schemes = {
        item.CodingSchemeDesignator
        for ds in datasets
        if "ProcedureCodeSequence" in ds
        for item in ds.ProcedureCodeSequence
    }
    assert {"LN", "SCT", "99HOSP"} <= schemes
    issuers = [
        item
        for ds in datasets
        for spec in ds.get("SpecimenDescriptionSequence", [])
        for item in spec.IssuerOfTheSpecimenIdentifierSequence
    ]
    assert issuers and all(_has(i, "UniversalEntityID") for i in issuers)
    # AnatomicRegionSequence occurs in a study that has no BodyPartExamined at all
    by_study: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for ds in datasets:
        by_study[ds.StudyInstanceUID].append(ds)
    assert any(
        any("AnatomicRegionSequence" in ds for ds in group)
        and not any(_has(ds, "BodyPartExamined") for ds in group)
        for group in by_study.values()
    )
    # a PDF document is embedded whole
    docs = [ds for ds in datasets if ds.Modality == "DOC"]
    assert docs
    for ds in docs:
        document = ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength]
        assert document.startswith(b"%PDF-") and document.rstrip().endswith(b"%%EOF")
