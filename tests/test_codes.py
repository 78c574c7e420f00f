"""The code tables against the DICOM dictionaries shipped with pydicom."""

from __future__ import annotations

import pytest
from pydicom.sr._concepts_dict import concepts

from crawler.mapping import codes

# Annex L gives these rows a Code Meaning that no pydicom context group uses for the code
# (pydicom only has the SNOMED CT fully specified name, or another group's wording such as
# "Truncus coeliacus" or "Hypogastric region"). The standard differs from itself, not the table.
ANNEX_L_ONLY_MEANINGS = {
    "AMNIOTICFLUID",
    "CALF",
    "CELIACA",
    "CHOROIDPLEXUS",
    "CULDESAC",
    "GESTSAC",
    "GLUTEAL",
    "LPORTALV",
    "MORISONSPOUCH",
    "PENILEA",
    "RPORTALV",
    "SUPRAPUBIC",
}


def _sct_meanings() -> dict[str, set[str]]:
    meanings: dict[str, set[str]] = {}
    for entries in concepts["SCT"].values():
        for code, (meaning, _cids) in entries.items():
            meanings.setdefault(code, set()).add(meaning.lower())
    return meanings


def test_chest_and_abdomen_use_the_current_codes():
    assert codes.body_part("CHEST") == ("816094009", "Chest")
    assert codes.body_part("THORAX") == ("816094009", "Chest")
    assert codes.body_part("ABDOMEN") == ("818981001", "Abdomen")
    assert codes.body_part("PELVIS") == ("816092008", "Pelvis")


def test_body_part_lookup_is_case_insensitive_and_strips():
    assert codes.body_part(" chest ") == codes.body_part("CHEST")
    assert codes.body_part("AbdomenPelvis") == ("818982008", "Abdomen and Pelvis")
    assert codes.body_part("NOT A BODY PART") is None
    assert codes.body_part("") is None
    assert codes.body_part("FETALHEART") is None


def test_body_part_table_is_well_formed():
    assert len(codes.BODY_PART) > 300
    assert list(codes.BODY_PART) == sorted(codes.BODY_PART)
    for term, (code, meaning) in codes.BODY_PART.items():
        assert term == term.upper().strip()
        assert code.isdigit(), term
        assert meaning.strip() == meaning and meaning, term


def test_body_part_meanings_match_pydicom():
    meanings = _sct_meanings()
    mismatched = {
        term
        for term, (code, meaning) in codes.BODY_PART.items()
        if code in meanings and meaning.lower() not in meanings[code]
    }
    assert mismatched == ANNEX_L_ONLY_MEANINGS, f"{len(mismatched)} meanings differ: {sorted(mismatched)}"


def test_common_anatomic_regions_agree_with_cid_4031():
    meanings = _sct_meanings()
    region_codes = {
        code
        for keyword in concepts["SCT"]
        for code, (_meaning, cids) in concepts["SCT"][keyword].items()
        if 4031 in cids
    }
    used = {code for code, _ in codes.BODY_PART.values()}
    assert {"816094009", "818981001", "818982008", "816092008", "1217257000"} <= region_codes & used
    for code, meaning in codes.BODY_PART.values():
        if code in region_codes and code in meanings:
            assert meaning.lower() in meanings[code]


def test_laterality():
    assert codes.LATERALITY == {
        "R": ("24028007", "Right"),
        "L": ("7771000", "Left"),
        "B": ("51440002", "Bilateral"),
        "U": ("66459002", "Unilateral"),
    }
    meanings = _sct_meanings()
    for code, display in codes.LATERALITY.values():
        assert display.lower() in meanings[code]


@pytest.mark.parametrize(
    ("designator", "system"),
    [
        ("SCT", "http://snomed.info/sct"),
        ("SRT", "http://snomed.info/sct"),
        ("LN", "http://loinc.org"),
        ("DCM", "http://dicom.nema.org/resources/ontology/DCM"),
        ("UCUM", "http://unitsofmeasure.org"),
        ("RADLEX", "http://radlex.org"),
        ("I10", "http://hl7.org/fhir/sid/icd-10"),
        ("I9C", "http://hl7.org/fhir/sid/icd-9-cm"),
        (" DCM ", "http://dicom.nema.org/resources/ontology/DCM"),
        ("ncit", "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl"),
        ("FMA", "urn:oid:2.16.840.1.113883.6.119"),
    ],
)
def test_scheme_system_known(designator, system):
    assert codes.scheme_system(designator) == system
    assert codes.scheme_system(designator, "2024") == system


def test_scheme_system_unknown_is_kept():
    assert codes.scheme_system("99MYPACS") == "urn:dicom:scheme:99MYPACS"
    assert codes.scheme_system("  L ") == "urn:dicom:scheme:L"


@pytest.mark.parametrize("designator", ["", "   "])
def test_scheme_system_empty_raises(designator):
    with pytest.raises(ValueError):
        codes.scheme_system(designator)


def test_every_pydicom_scheme_with_a_uid_is_known():
    without_uid = {"BARI"}
    for designator in concepts:
        if designator not in without_uid:
            assert not codes.scheme_system(designator).startswith("urn:dicom:scheme:"), designator


def test_sop_class_name():
    assert codes.sop_class_name("1.2.840.10008.5.1.4.1.1.2") == "CT Image Storage"
    assert codes.sop_class_name("1.2.840.10008.5.1.4.1.1.66.4") == "Segmentation Storage"
    assert codes.sop_class_name("1.2.840.10008.1.2") is None
    assert codes.sop_class_name("1.2.3.4") is None


def test_modalities():
    for code in ("CT", "MR", "NM", "OT", "DOC", "SM", "SR", "KO", "PR", "SEG", "RTSTRUCT", "DX", "XAPROTOCOL"):
        assert code in codes.MODALITIES
    assert codes.RETIRED_MODALITIES < codes.MODALITIES
    assert {"DS", "EC", "ST", "CD"} <= codes.RETIRED_MODALITIES


def test_modality_display():
    assert codes.modality_display("CT") == "Computed Tomography"
    assert codes.modality_display(" mr ") == "Magnetic Resonance"
    assert codes.modality_display("SEG") == "Segmentation"
    assert codes.modality_display("CAD") is None
    assert codes.modality_display("NOPE") is None


def test_the_shipped_tables_are_what_pydicom_gives():
    """dictionary.py is generated from pydicom; with the version it was made from the tables must
    be exactly what the generator gives, and with another nearly so (the standard adds and
    retires SOP Classes between releases; rerun tools/make_dictionary.py then)."""
    import pydicom

    from crawler.mapping import dictionary
    from tools.make_dictionary import modality_displays, sop_class_names

    names, displays = sop_class_names(), modality_displays(codes.MODALITIES)
    if dictionary.GENERATED_FROM == f"pydicom {pydicom.__version__}":
        assert dictionary.SOP_CLASS_NAMES == names
        assert dictionary.MODALITY_DISPLAYS == displays
    else:
        same = sum(dictionary.SOP_CLASS_NAMES.get(uid) == name for uid, name in names.items())
        assert same >= 0.95 * len(names), f"{len(names) - same} SOP Class names differ from pydicom {pydicom.__version__}"
        assert sum(dictionary.MODALITY_DISPLAYS.get(k) == v for k, v in displays.items()) >= 0.95 * len(displays)
    assert len(dictionary.SOP_CLASS_NAMES) > 250 and len(dictionary.MODALITY_DISPLAYS) > 80


def test_the_table_generator_reads_the_modalities_without_importing_them():
    from tools.make_dictionary import modalities

    assert modalities() == codes.MODALITIES


def test_the_mapping_does_not_import_pydicom():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from crawler import cli, sync\n"
        "from crawler.mapping import MappingOptions, StudyInput, map_study\n"
        "study = {'0020000D': {'vr': 'UI', 'Value': ['1.2.3']}, '00080061': {'vr': 'CS', 'Value': ['CT']}}\n"
        "instance = {'0020000E': {'vr': 'UI', 'Value': ['1.2.3.1']}, '00080060': {'vr': 'CS', 'Value': ['CT']},\n"
        "            '00080016': {'vr': 'UI', 'Value': ['1.2.840.10008.5.1.4.1.1.2']}, '00080018': {'vr': 'UI', 'Value': ['1.2.3.1.1']}}\n"
        "resource = map_study(StudyInput(study, [instance]), MappingOptions(source='http://pacs', wado_base='http://pacs'))\n"
        "assert resource['series'][0]['instance'][0]['sopClass']['display'] == 'CT Image Storage', resource\n"
        "assert resource['modality'][0]['coding'][0]['display'] == 'Computed Tomography', resource\n"
        "print('pydicom' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
