"""Property tests of the R5 mapper on random well-formed and malformed DICOM JSON.

Whatever a QIDO-RS server sends, ``map_study`` must either return an ImagingStudy that
``fhir.resources`` (R5) accepts, or raise ``MappingError`` naming the study (when the input has
a usable Study Instance UID) and the attribute. Any other exception, or a resource that does not
validate, is a bug in the mapper. Well-formed input (its own strategy) must map: there a
``MappingError`` is a bug too.

``REGRESSIONS`` holds the failures these strategies found in the mapper as it stood when they were
written, one minimal input each; ``test_regressions`` runs them all and ``test_regression_examples``
gives one per kind of failure as an explicit Hypothesis ``@example``.
"""

from __future__ import annotations

import re
import string
from collections import ChainMap
from collections.abc import Mapping
from datetime import date, timezone
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from crawler import dicomjson as dj
from crawler.dicomjson import Tag
from crawler.errors import MappingError
from crawler.mapping import MappingOptions, StudyInput, map_study

pydantic = pytest.importorskip("pydantic")
ImagingStudy = pytest.importorskip("fhir.resources.imagingstudy").ImagingStudy

Element = dict[str, Any]

# --------------------------------------------------------------------------------------------
# Which kind of value each tag holds
# --------------------------------------------------------------------------------------------

UI = "UI"
DA = "DA"
TM = "TM"
OFFSET = "OFFSET"
CS = "CS"
CS_MULTI = "CS_MULTI"
TEXT = "TEXT"
PN = "PN"
IS = "IS"
SQ_CODE = "SQ_CODE"
SQ_PERSON = "SQ_PERSON"
SQ_ISSUER = "SQ_ISSUER"
SQ_SPECIMEN = "SQ_SPECIMEN"

KIND: dict[str, str] = {
    Tag.SpecificCharacterSet: CS_MULTI,
    Tag.ImageType: CS_MULTI,
    Tag.SOPClassUID: UI,
    Tag.SOPInstanceUID: UI,
    Tag.StudyDate: DA,
    Tag.SeriesDate: DA,
    Tag.StudyTime: TM,
    Tag.SeriesTime: TM,
    Tag.AccessionNumber: TEXT,
    Tag.IssuerOfAccessionNumberSequence: SQ_ISSUER,
    Tag.QueryRetrieveLevel: CS,
    Tag.RetrieveAETitle: TEXT,
    Tag.InstanceAvailability: CS,
    Tag.Modality: CS,
    Tag.ModalitiesInStudy: CS_MULTI,
    Tag.Manufacturer: TEXT,
    Tag.InstitutionName: TEXT,
    Tag.ReferringPhysicianName: PN,
    Tag.ReferringPhysicianIdentificationSequence: SQ_PERSON,
    Tag.TimezoneOffsetFromUTC: OFFSET,
    Tag.StudyDescription: TEXT,
    Tag.ProcedureCodeSequence: SQ_CODE,
    Tag.SeriesDescription: TEXT,
    Tag.InstitutionalDepartmentName: TEXT,
    Tag.InstitutionalDepartmentTypeCodeSequence: SQ_CODE,
    Tag.PerformingPhysicianName: PN,
    Tag.PerformingPhysicianIdentificationSequence: SQ_PERSON,
    Tag.OperatorsName: PN,
    Tag.OperatorIdentificationSequence: SQ_PERSON,
    Tag.ManufacturerModelName: TEXT,
    Tag.RetrieveURL: TEXT,
    Tag.AnatomicRegionSequence: SQ_CODE,
    Tag.PatientName: PN,
    Tag.PatientID: TEXT,
    Tag.IssuerOfPatientID: TEXT,
    Tag.IssuerOfPatientIDQualifiersSequence: SQ_ISSUER,
    Tag.PatientBirthDate: DA,
    Tag.PatientSex: CS,
    Tag.BodyPartExamined: CS,
    Tag.StudyInstanceUID: UI,
    Tag.SeriesInstanceUID: UI,
    Tag.StudyID: TEXT,
    Tag.SeriesNumber: IS,
    Tag.InstanceNumber: IS,
    Tag.Laterality: CS,
    Tag.NumberOfStudyRelatedSeries: IS,
    Tag.NumberOfStudyRelatedInstances: IS,
    Tag.NumberOfSeriesRelatedInstances: IS,
    Tag.ReasonForTheRequestedProcedure: TEXT,
    Tag.ReasonForRequestedProcedureCodeSequence: SQ_CODE,
    Tag.SpecimenIdentifier: TEXT,
    Tag.SpecimenUID: UI,
    Tag.SpecimenDescriptionSequence: SQ_SPECIMEN,
    Tag.IssuerOfTheSpecimenIdentifierSequence: SQ_ISSUER,
    Tag.DocumentTitle: TEXT,
    Tag.CodeValue: TEXT,
    Tag.CodingSchemeDesignator: TEXT,
    Tag.CodingSchemeVersion: TEXT,
    Tag.CodeMeaning: TEXT,
    Tag.LongCodeValue: TEXT,
    Tag.URNCodeValue: TEXT,
    Tag.LocalNamespaceEntityID: TEXT,
    Tag.UniversalEntityID: TEXT,
    Tag.UniversalEntityIDType: CS,
    Tag.PersonIdentificationCodeSequence: SQ_CODE,
}
# Tags added to Tag later still get exercised, as free text.
for _tag in dj.KEYWORDS:
    KIND.setdefault(_tag, TEXT)

VR_OF_KIND = {
    UI: "UI", DA: "DA", TM: "TM", OFFSET: "SH", CS: "CS", CS_MULTI: "CS", TEXT: "LO", PN: "PN",
    IS: "IS", SQ_CODE: "SQ", SQ_PERSON: "SQ", SQ_ISSUER: "SQ", SQ_SPECIMEN: "SQ",
}  # fmt: skip

STUDY_TAGS = [
    Tag.SpecificCharacterSet, Tag.StudyDate, Tag.StudyTime, Tag.AccessionNumber,
    Tag.IssuerOfAccessionNumberSequence, Tag.QueryRetrieveLevel, Tag.RetrieveAETitle,
    Tag.InstanceAvailability, Tag.ModalitiesInStudy, Tag.ReferringPhysicianName,
    Tag.ReferringPhysicianIdentificationSequence, Tag.TimezoneOffsetFromUTC, Tag.StudyDescription,
    Tag.ProcedureCodeSequence, Tag.InstitutionalDepartmentName,
    Tag.InstitutionalDepartmentTypeCodeSequence, Tag.RetrieveURL, Tag.PatientName, Tag.PatientID,
    Tag.IssuerOfPatientID, Tag.IssuerOfPatientIDQualifiersSequence, Tag.PatientBirthDate,
    Tag.PatientSex, Tag.StudyID, Tag.NumberOfStudyRelatedSeries, Tag.NumberOfStudyRelatedInstances,
    Tag.ReasonForTheRequestedProcedure, Tag.ReasonForRequestedProcedureCodeSequence,
]  # fmt: skip
SERIES_TAGS = [
    Tag.SeriesDate, Tag.SeriesTime, Tag.SeriesDescription, Tag.SeriesNumber, Tag.BodyPartExamined,
    Tag.AnatomicRegionSequence, Tag.Laterality, Tag.PerformingPhysicianName,
    Tag.PerformingPhysicianIdentificationSequence, Tag.OperatorsName,
    Tag.OperatorIdentificationSequence, Tag.Manufacturer, Tag.ManufacturerModelName,
    Tag.InstitutionName, Tag.NumberOfSeriesRelatedInstances, Tag.TimezoneOffsetFromUTC,
]  # fmt: skip
INSTANCE_TAGS = [
    Tag.ImageType, Tag.InstanceNumber, Tag.DocumentTitle, Tag.SpecimenDescriptionSequence,
    Tag.RetrieveURL, Tag.InstanceAvailability,
]  # fmt: skip
# The instance-level query also returns study attributes; some servers send them.
INSTANCE_EXTRA_TAGS = [Tag.StudyDate, Tag.StudyTime, Tag.PatientID, Tag.PatientName, Tag.StudyInstanceUID]

# --------------------------------------------------------------------------------------------
# Values: valid ones (what DICOM allows and the mapper must handle) and invalid ones
# --------------------------------------------------------------------------------------------

UNICODE_DIGITS = "٠١٢٣٤٥٦٧٨٩"  # Arabic-Indic: \d and int() accept them
SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
]
MODALITIES = ["CT", "MR", "US", "CR", "DX", "SR", "PR", "KO", "SEG", "OT", "PT", "NM", "MG", "XA", "SM", "DOC"]
BODY_PARTS = ["CHEST", "HEAD", "ABDOMEN", "chest", " KNEE ", "FETAL", "NOT A PART", "THORAX"]
SCHEMES = ["DCM", "SCT", "SRT", "LN", "RADLEX", "99LOCAL", "dcm", "L", "I10", "99 LOCAL"]
ISSUER_TYPES = ["ISO", "URI", "URL", "UUID", "DNS", "X400", "iso", ""]

def weighted(*choices: tuple[st.SearchStrategy[Any], int]) -> st.SearchStrategy[Any]:
    """One of the strategies, in proportion to the weights (``st.one_of`` ignores repeats)."""
    return st.sampled_from([strategy for strategy, weight in choices for _ in range(weight)]).flatmap(lambda s: s)


# Drawn from a fixed pair: generating long text character by character would make the run slow.
huge_text = st.sampled_from(["A" * 100_000, "漢字^かな " * 20_000])
free_text = weighted(
    (st.text(max_size=20), 3),
    (st.text(alphabet=string.ascii_letters + string.digits + " ^=.-_", max_size=30), 3),
    (st.sampled_from(["", " ", "\t", "\n", "a  b", "a\tb", "a\n\nb", "Ünïcødé", "山田^太郎", "\u00a0x\u00a0", "\x00"]), 2),
    (huge_text, 1),
)

uid_good = st.one_of(
    st.sampled_from(SOP_CLASSES),
    st.builds(lambda root, arcs: ".".join([root, *map(str, arcs)]), st.sampled_from("12"), st.lists(st.integers(0, 10**7), min_size=1, max_size=10)),
).filter(lambda uid: len(uid) <= 64)  # PS3.5 9.1: at most 64 characters


@st.composite
def da_valid(draw: st.DrawFn) -> str:
    d = draw(st.dates(min_value=date(1, 1, 1)))
    y, m, dd = f"{d.year:04d}", f"{d.month:02d}", f"{d.day:02d}"
    form = draw(st.sampled_from(["full", "full", "full", "dots", "year", "month"]))
    return {"full": y + m + dd, "dots": f"{y}.{m}.{dd}", "year": y, "month": y + m}[form]  # dots: 1997.04.24


da_invalid = st.one_of(
    st.sampled_from(
        ["19970230", "19971301", "19970000", "0000", "000001", "00000101", "00010101", "99991231",
         "1997-04-24", "970424", "1997042", "1997.0424", "٢٠٢٠٠١٠١", "20210229", "1997.04.24.", "19970424T"]
    ),
    st.text(alphabet="0123456789.-" + UNICODE_DIGITS, max_size=10),
)  # fmt: skip


@st.composite
def tm_valid(draw: st.DrawFn) -> str:
    h, m, s = draw(st.integers(0, 23)), draw(st.integers(0, 59)), draw(st.integers(0, 60))
    fraction = draw(st.text(alphabet="0123456789", min_size=1, max_size=6))
    return draw(
        st.sampled_from(
            [f"{h:02d}{m:02d}{s:02d}", f"{h:02d}", f"{h:02d}{m:02d}", f"{h:02d}:{m:02d}:{s:02d}",
             f"{h:02d}{m:02d}{s:02d}.{fraction}", f"{h:02d}:{m:02d}:{s:02d}.{fraction}"]
        )
    )  # fmt: skip


tm_invalid = st.one_of(
    st.sampled_from(
        ["24", "2400", "2360", "1010.5", "101010.", "101010.1234567", "101010.١", "١٠١٠١٠", "10-10-10", "T101010"]
    ),
    st.text(alphabet="0123456789.:" + UNICODE_DIGITS, max_size=12),
)  # fmt: skip
offset_valid = st.builds(
    lambda sign, minutes: f"{sign}{minutes // 60:02d}{minutes % 60:02d}", st.sampled_from("+-"), st.integers(0, 14 * 60)
)
offset_invalid = st.sampled_from(["+1401", "-1500", "+0160", "0100", "+01:00", "Z", "+1", "+٠١٠٠", "UTC"])
cs_valid = st.one_of(
    st.sampled_from(MODALITIES + BODY_PARTS + ["R", "L", "B", "U", "X", "ORIGINAL", "PRIMARY", "AXIAL"]),
    st.text(alphabet=string.ascii_uppercase + string.digits + " _", min_size=1, max_size=16),
)
# Every IS attribute the mapper reads is a count or a number, an unsignedInt in FHIR: IS allows
# negative values (a signed 32-bit range), but for these attributes they are malformed.
is_valid = st.one_of(
    st.integers(0, 5000),
    st.integers(0, 5000).map(str),
    st.integers(0, 2**31 - 1),
    st.integers(0, 2**31 - 1).map(lambda n: f" {n} "),
    st.sampled_from(["+3", "007"]),
)
is_invalid = st.one_of(
    st.sampled_from(["3.0", "1e3", "3.5", "1e20", "2147483648", "-2147483649", "nan", "inf", "three", "١٢", "1_000", "0x10"]),
    st.integers(-(2**31), -1),
    st.integers(-(2**31), -1).map(lambda n: f" {n} "),
    st.integers(),
    st.floats(),
)
pn_string = st.one_of(
    st.sampled_from(["Doe^Jane", "Doe^Jane^Q^Dr^Jr", "Smith", "^^^^", "=山田^太郎=やまだ^たろう", "^John", "Doe^Jane=^="]),
    free_text,
)
pn_valid = st.one_of(
    st.fixed_dictionaries({}, optional={"Alphabetic": pn_string, "Ideographic": pn_string, "Phonetic": pn_string}),
    pn_string,  # the bare string some servers send
)

VALID = {
    UI: uid_good, DA: da_valid(), TM: tm_valid(), OFFSET: offset_valid, CS: cs_valid, CS_MULTI: cs_valid,
    TEXT: free_text, PN: pn_valid, IS: is_valid,
}  # fmt: skip
INVALID = {
    UI: st.one_of(st.integers(), st.floats(), free_text), DA: da_invalid, TM: tm_invalid, OFFSET: offset_invalid,
    CS: free_text, CS_MULTI: free_text, TEXT: st.integers(), IS: is_invalid,
    PN: st.sampled_from([{"Alphabetic": 5}, {"Alphabetic": ["Doe"]}, {"Ideographic": {}}, {"Alphabetic": None}, 7]),
}  # fmt: skip

# Values of the wrong type for any attribute.
wrong_value = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.text(max_size=5),
)
not_an_object = st.one_of(st.none(), st.integers(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2))

# --------------------------------------------------------------------------------------------
# Elements and datasets
# --------------------------------------------------------------------------------------------

CODE_ITEM_TAGS = [Tag.CodeValue, Tag.CodingSchemeDesignator, Tag.CodingSchemeVersion, Tag.CodeMeaning, Tag.LongCodeValue, Tag.URNCodeValue]
ISSUER_ITEM_TAGS = [Tag.LocalNamespaceEntityID, Tag.UniversalEntityID, Tag.UniversalEntityIDType]
ITEM_TAGS = {
    SQ_CODE: CODE_ITEM_TAGS,
    SQ_PERSON: [Tag.PersonIdentificationCodeSequence],
    SQ_ISSUER: ISSUER_ITEM_TAGS,
    SQ_SPECIMEN: [Tag.SpecimenIdentifier, Tag.SpecimenUID, Tag.IssuerOfTheSpecimenIdentifierSequence],
}
# More realistic values for some attributes inside items.
SPECIAL_VALUES: dict[str, st.SearchStrategy[Any]] = {
    Tag.CodeValue: st.one_of(st.sampled_from(["121322", "T-D3000", "RPID16", "C  T", " 12 ", "A\tB"]), free_text),
    Tag.CodingSchemeDesignator: st.one_of(st.sampled_from(SCHEMES), free_text),
    Tag.URNCodeValue: st.one_of(st.sampled_from(["urn:oid:1.2.3", "http://example.org/x", "a b"]), free_text),
    Tag.LocalNamespaceEntityID: st.one_of(uid_good, st.sampled_from(["HOSP", "1.2.3"]), free_text),
    Tag.UniversalEntityID: st.one_of(uid_good, st.uuids().map(str), st.sampled_from(["http://example.org/ns", "a b", "urn:x"]), free_text),
    Tag.UniversalEntityIDType: st.sampled_from(ISSUER_TYPES),
    # the study's numberOfInstances is the sum of these: each in range is not enough (the sum
    # past 2**31-1 is malformed, see REGRESSIONS)
    Tag.NumberOfSeriesRelatedInstances: st.one_of(st.integers(0, 10**6), st.integers(0, 10**6).map(str)),
}


def good_values(kind: str, tag: str | None = None) -> st.SearchStrategy[Any]:
    if kind in ITEM_TAGS:
        return st.deferred(lambda: dataset(tuple(ITEM_TAGS[kind])))
    if tag in SPECIAL_VALUES:
        return SPECIAL_VALUES[tag]
    return VALID[kind]


def with_value(vr: str, value: st.SearchStrategy[Any]) -> st.SearchStrategy[Element]:
    return st.fixed_dictionaries({"vr": st.just(vr), "Value": value})


@lru_cache(maxsize=None)
def good_element(kind: str, tag: str | None = None) -> st.SearchStrategy[Element]:
    """A well-formed element, including the forms real servers send and PS3.18 allows or tolerates:
    ``null`` and empty strings inside ``Value``, no ``Value`` at all."""
    vr = VR_OF_KIND[kind]
    values = good_values(kind, tag)
    size = 4 if kind in (CS_MULTI, PN) or kind in ITEM_TAGS else 1
    blank = st.nothing() if kind in ITEM_TAGS else st.just("")
    return weighted(
        (with_value(vr, st.lists(values, min_size=1, max_size=size)), 4),
        (with_value(vr, st.lists(st.one_of(values, st.none(), blank), max_size=size + 1)), 1),
        (st.just({"vr": vr}), 1),
    )


@lru_cache(maxsize=None)
def bad_element(kind: str) -> st.SearchStrategy[Any]:
    """A malformed element: invalid value, wrong type, ``Value`` not a list, not an object."""
    vr = VR_OF_KIND[kind]
    if kind in ITEM_TAGS:
        good = st.deferred(lambda: dataset(tuple(ITEM_TAGS[kind])))
        invalid = st.deferred(lambda: dataset(tuple(ITEM_TAGS[kind]), dirty=True))
    else:
        good, invalid = VALID[kind], INVALID[kind]
    return st.one_of(
        with_value(vr, st.lists(invalid, min_size=1, max_size=1)),
        with_value(vr, st.lists(st.one_of(good, invalid, wrong_value, st.none()), min_size=1, max_size=3)),
        with_value(vr, st.lists(wrong_value, min_size=1, max_size=1)),
        with_value(vr, st.one_of(good, invalid, wrong_value)),  # Value not a list
        st.sampled_from([{"vr": vr, "Value": None}, {"vr": vr, "Value": []}, {"vr": vr, "Value": [None, ""]}, {"Value": [None]}, {}]),
        not_an_object,  # element not an object
    )


def uid_element(uids: list[str]) -> st.SearchStrategy[Element]:
    given_uid = st.sampled_from(uids).map(lambda uid: {"vr": "UI", "Value": [uid]})
    return weighted((given_uid, 4), (uid_good.map(lambda uid: {"vr": "UI", "Value": [uid]}), 1))


SERIES_UIDS = ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]
# Attributes every result of a level has; a malformed result may lack them.
REQUIRED_ELEMENT = {
    Tag.StudyInstanceUID: uid_element(["1.2.840.113619.2.55.3.604688119", "2.25.1234567890"]),
    Tag.SeriesInstanceUID: uid_element(SERIES_UIDS),
    Tag.SOPInstanceUID: uid_element(["1.2.3.4.1.1", "1.2.3.4.1.2", "1.2.3.4.2.1"]),
    Tag.SOPClassUID: uid_element(SOP_CLASSES),
    Tag.Modality: weighted((st.sampled_from(MODALITIES).map(lambda m: {"vr": "CS", "Value": [m]}), 4), (good_element(CS), 1)),
}
STUDY_REQUIRED = (Tag.StudyInstanceUID,)
INSTANCE_REQUIRED = (Tag.SeriesInstanceUID, Tag.SOPInstanceUID, Tag.SOPClassUID, Tag.Modality)
SERIES_REQUIRED = (Tag.SeriesInstanceUID, Tag.Modality)
SERIES_LEVEL_TAGS = tuple(SERIES_TAGS)
INSTANCE_LEVEL_TAGS = tuple(INSTANCE_TAGS + INSTANCE_EXTRA_TAGS)


@lru_cache(maxsize=None)
def _clean_dataset(tags: tuple[str, ...], required: tuple[str, ...]) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {tag: REQUIRED_ELEMENT[tag] for tag in required},
        optional={tag: good_element(KIND[tag], tag) for tag in tags if tag not in required},
    )


spoiler = st.sampled_from(["bad", "bad", "bad", "missing", "empty"])


@st.composite
def dataset(draw: st.DrawFn, tags: tuple[str, ...], required: tuple[str, ...] = (), dirty: bool = False) -> dict:
    """Some of ``tags`` (all of ``required``) as well-formed elements; if ``dirty``, one to three
    of them then malformed, removed (a required one) or emptied."""
    ds = draw(_clean_dataset(tags, required))
    if dirty:
        for tag in draw(st.lists(st.sampled_from(required + tags), min_size=1, max_size=3, unique=True)):
            how = draw(spoiler)
            if how == "missing":
                ds.pop(tag, None)
            elif how == "empty":
                ds[tag] = draw(st.sampled_from([{"vr": VR_OF_KIND[KIND[tag]]}, {"vr": VR_OF_KIND[KIND[tag]], "Value": [None]}]))
            else:
                ds[tag] = draw(bad_element(KIND[tag]))
    return ds


@st.composite
def study_inputs(draw: st.DrawFn, malformed: bool = True) -> StudyInput:
    """A study-level result, instance results and (sometimes) series-level results.

    The instances of one series share its series attributes, as a server's answers do. With
    ``malformed``, most inputs have one result spoilt (or several, or a result that is not an
    object): one malformed element usually ends the mapping with a MappingError, so clean inputs
    get their share too, to reach the rest of the mapper.
    """
    modes = ["clean", "clean", "study", "series attributes", "instance", "series result", "everywhere", "not objects"]
    mode = draw(st.sampled_from(modes)) if malformed else "clean"
    n_instances = draw(st.integers(0, 5))
    n_series = draw(st.sampled_from([0, 0, 0, 1, 2]))
    spoilt = draw(st.integers(0, max(n_instances, n_series, len(SERIES_UIDS)) - 1))

    def dirty(level: str, index: int = 0) -> bool:
        if mode == "everywhere":
            return draw(st.booleans())
        return mode == level and index == spoilt

    study = draw(dataset(tuple(STUDY_TAGS), STUDY_REQUIRED, dirty=dirty("study")))
    series_attributes: dict[str, dict] = {}
    instances: list[Any] = []
    for i in range(n_instances):
        instance = draw(dataset(INSTANCE_LEVEL_TAGS, INSTANCE_REQUIRED, dirty=dirty("instance", i)))
        try:
            series_uid = dj.string(instance, Tag.SeriesInstanceUID)
        except ValueError:
            series_uid = None
        if series_uid in SERIES_UIDS:
            if series_uid not in series_attributes:
                index = SERIES_UIDS.index(series_uid)
                series_attributes[series_uid] = draw(dataset(SERIES_LEVEL_TAGS, dirty=dirty("series attributes", index)))
            instance = {**series_attributes[series_uid], **instance}
        instances.append(instance)
    series: list[Any] = [draw(dataset(SERIES_LEVEL_TAGS, SERIES_REQUIRED, dirty=dirty("series result", i))) for i in range(n_series)]
    if mode == "not objects":
        where = draw(st.sampled_from(["study", "instances", "series"]))
        if where == "study":
            study = draw(not_an_object)
        else:
            target = instances if where == "instances" else series
            target.insert(draw(st.integers(0, len(target))), draw(not_an_object))
    return StudyInput(study=study, instances=instances, series=series)


mapping_options = st.sampled_from(
    [
        MappingOptions(),
        MappingOptions(source="https://pacs.example.org/dicom-web", zone=timezone.utc),
        MappingOptions(
            source="https://pacs.example.org/dicom-web/",
            wado_base="https://pacs.example.org/dicom-web",
            zone=ZoneInfo("Europe/Amsterdam"),
            issuer_systems={"HOSP": "http://hospital.example.org/patients", "1.2.3": "urn:oid:1.2.3"},
        ),
        MappingOptions(zone=ZoneInfo("Pacific/Kiritimati")),
        MappingOptions(zone=ZoneInfo("America/St_Johns")),
        # with a Patient resource for the subject, where the mapper offers it
        *([MappingOptions(zone=timezone.utc, patients=True)] if "patients" in MappingOptions.__dataclass_fields__ else []),  # type: ignore[call-arg]
    ]
)

# --------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------

TAG_IN_ATTRIBUTE = re.compile(r"\([0-9A-F]{4},[0-9A-F]{4}\)")


# The UID reader: dj.uid (which also checks the UID's form) where dicomjson has it.
_read_uid = getattr(dj, "uid", dj.string)


def usable_study_uid(data: StudyInput) -> str | None:
    """The Study Instance UID the input offers: the study result's, else that of the first
    instance result that is an object, else that of the first such series result; ``None``
    when there is none or it is malformed."""
    if not isinstance(data.study, Mapping):
        return None
    firsts = [next((i for i in items if isinstance(i, Mapping)), {}) for items in (data.instances, data.series)]
    try:
        return _read_uid(ChainMap(dict(data.study), *(dict(item) for item in firsts)), Tag.StudyInstanceUID)
    except ValueError:
        return None


def check_mapping(data: StudyInput, options: MappingOptions, *, must_map: bool = False) -> None:
    """The property; with ``must_map`` (well-formed input) a MappingError is a failure too."""
    uid = usable_study_uid(data)
    try:
        resource = map_study(data, options)
    except MappingError as exc:
        message = str(exc)
        if must_map:
            pytest.fail(f"well-formed input refused: {message}")
        assert exc.attribute, f"MappingError without an attribute: {message}"
        assert exc.attribute in message, message
        assert TAG_IN_ATTRIBUTE.search(exc.attribute) or exc.attribute in ("study", "instances", "series"), message
        if uid:
            assert exc.study_uid == uid and uid in message, f"MappingError does not name study {uid!r}: {message}"
        return
    try:
        ImagingStudy.model_validate(resource)
    except pydantic.ValidationError as exc:
        pytest.fail(f"map_study returned a resource that does not validate as R5 ImagingStudy:\n{exc}")


# --------------------------------------------------------------------------------------------
# Regressions: inputs these strategies found that the mapper once got wrong
# --------------------------------------------------------------------------------------------


def _el(vr: str, *values: Any) -> Element:
    return {"vr": vr, "Value": list(values)}


STUDY_UID = "1.2.3"


def _study(**elements: Element) -> dict:
    return {Tag.StudyInstanceUID: _el("UI", STUDY_UID), **{getattr(Tag, name): value for name, value in elements.items()}}


def _instance(**elements: Element) -> dict:
    base = {
        Tag.SeriesInstanceUID: _el("UI", "1.2.3.4"),
        Tag.SOPInstanceUID: _el("UI", "1.2.3.4.5"),
        Tag.SOPClassUID: _el("UI", SOP_CLASSES[0]),
        Tag.Modality: _el("CS", "CT"),
    }
    return {**base, **{getattr(Tag, name): value for name, value in elements.items()}}


# Each comment says what the mapper did with the input when it was found.
REGRESSIONS: dict[str, StudyInput] = {
    # count/number out of unsignedInt range (negative, or above 2**31 - 1) copied as is
    "negative NumberOfStudyRelatedInstances": StudyInput(_study(NumberOfStudyRelatedInstances=_el("IS", -1))),
    "NumberOfStudyRelatedSeries above 2**31-1": StudyInput(_study(NumberOfStudyRelatedSeries=_el("IS", 2**31))),
    "negative SeriesNumber": StudyInput(_study(), [_instance(SeriesNumber=_el("IS", -1))]),
    "negative InstanceNumber": StudyInput(_study(), [_instance(InstanceNumber=_el("IS", "-1"))]),
    "NumberOfSeriesRelatedInstances above 2**31-1": StudyInput(_study(), [_instance(NumberOfSeriesRelatedInstances=_el("IS", 2**31))]),
    # year 0000 in a reduced-precision date: "0000" copied, not a FHIR year
    "StudyDate 0000": StudyInput(_study(StudyDate=_el("DA", "0000"))),
    # non-ASCII digits: \d in the TM pattern let them into the fraction, copied verbatim
    "StudyTime fraction in Arabic-Indic digits": StudyInput(
        _study(StudyDate=_el("DA", "19970424"), StudyTime=_el("TM", "101010.١"), TimezoneOffsetFromUTC=_el("SH", "+0000"))
    ),
    # codes with inner runs of whitespace copied: not FHIR codes
    "ModalitiesInStudy with two inner spaces": StudyInput(_study(ModalitiesInStudy=_el("CS", "C  T"))),
    "Modality with two inner spaces": StudyInput(_study(), [_instance(Modality=_el("CS", "C  T"))]),
    "SOPClassUID with two inner spaces": StudyInput(_study(), [_instance(SOPClassUID=_el("UI", "1.2  3"))]),
    "CodeValue with two inner spaces": StudyInput(_study(ProcedureCodeSequence=_el("SQ", {Tag.CodeValue: _el("SH", "A  B")}))),
    # numberOfInstances summed past 2**31 - 1 from series counts that are each in range
    "NumberOfSeriesRelatedInstances summing above 2**31-1": StudyInput(
        _study(),
        series=[
            {Tag.SeriesInstanceUID: _el("UI", "1.2.3.1"), Tag.Modality: _el("CS", "CT"), Tag.NumberOfSeriesRelatedInstances: _el("IS", 2**31 - 1)},
            {Tag.SeriesInstanceUID: _el("UI", "1.2.3.2"), Tag.Modality: _el("CS", "CT"), Tag.NumberOfSeriesRelatedInstances: _el("IS", 1)},
        ],
    ),
    "SeriesDate 0000": StudyInput(_study(), [_instance(SeriesDate=_el("DA", "0000"))]),
    "AnatomicRegionSequence CodeValue with a blank line": StudyInput(
        _study(), [_instance(AnatomicRegionSequence=_el("SQ", {Tag.CodeValue: _el("SH", "a\n\nb")}))]
    ),
    # copied into series.uid / instance.uid, FHIR ids: [A-Za-z0-9-.] only
    "SOPInstanceUID null-padded": StudyInput(_study(), [_instance(SOPInstanceUID=_el("UI", "1.2.3.4.5\x00"))]),
    "SeriesInstanceUID with a space": StudyInput(_study(), [_instance(SeriesInstanceUID=_el("UI", "1.2.3 4"))]),
    # a result that is not an object: MappingError without the (usable) study UID
    "instance result not an object": StudyInput(_study(), [5]),
    "series result not an object": StudyInput(_study(), series=[[]]),
    # a list or an object inside a UI Value: TypeError (unhashable) in r5._fast_uid's ``uid in known``
    "SeriesInstanceUID value a list": StudyInput(_study(), [_instance(SeriesInstanceUID={"vr": "UI", "Value": [[]]})]),
    "SOPClassUID value an object": StudyInput(_study(), [_instance(SOPClassUID={"vr": "UI", "Value": [{}]})]),
}


UTC = MappingOptions(zone=timezone.utc)


@pytest.mark.parametrize("data", list(REGRESSIONS.values()), ids=list(REGRESSIONS))
def test_regressions(data: StudyInput) -> None:
    check_mapping(data, UTC)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


# One failure per run (report_multiple_bugs=False): shrinking each distinct failure costs
# tens of seconds, and REGRESSIONS already lists the known ones.
RANDOM = settings(
    deadline=None, report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@settings(RANDOM, max_examples=300)
@given(data=study_inputs(), options=mapping_options)
def test_map_study_validates_or_raises_mapping_error(data: StudyInput, options: MappingOptions) -> None:
    check_mapping(data, options)


@settings(RANDOM, max_examples=150)
@given(data=study_inputs(malformed=False), options=mapping_options)
def test_well_formed_studies_map_and_validate(data: StudyInput, options: MappingOptions) -> None:
    """Well-formed JSON only (valid values of each VR, counts and numbers non-negative; optional
    attributes may be absent or empty): the mapper must return a resource that validates, never
    refuse the study."""
    check_mapping(data, options, must_map=True)


@settings(phases=[Phase.explicit], deadline=None)
@example(data=REGRESSIONS["negative InstanceNumber"], options=UTC)
@example(data=REGRESSIONS["NumberOfSeriesRelatedInstances summing above 2**31-1"], options=UTC)
@example(data=REGRESSIONS["StudyDate 0000"], options=UTC)
@example(data=REGRESSIONS["StudyTime fraction in Arabic-Indic digits"], options=UTC)
@example(data=REGRESSIONS["CodeValue with two inner spaces"], options=UTC)
@example(data=REGRESSIONS["Modality with two inner spaces"], options=UTC)
@example(data=REGRESSIONS["SOPInstanceUID null-padded"], options=UTC)
@example(data=REGRESSIONS["instance result not an object"], options=UTC)
@example(data=REGRESSIONS["SeriesInstanceUID value a list"], options=UTC)
@given(data=study_inputs(), options=mapping_options)
def test_regression_examples(data: StudyInput, options: MappingOptions) -> None:
    """One explicit example per kind of failure found (Hypothesis reports the first failing one
    and counts the others; ``test_regressions`` runs every case in ``REGRESSIONS`` on its own)."""
    check_mapping(data, options)
