"""The golden files in fixtures/expected against the recordings, without the mapper.

The goldens were written by the mapper under test, so on their own they only detect change. Here
the fields that are copied one to one from DICOM (UIDs, counts, descriptions, accession number,
Patient ID, dates and times, series modality, number and description, instance SOP class, number
and title) are read straight from the DICOM JSON recordings by the few lines below, which do not
import ``crawler``, and compared with every golden variant.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent.parent / "fixtures"
RECORDINGS = sorted((FIXTURES / "dicomjson").glob("*.json"))
# golden variant -> (FHIR version, which answer of the recording it was made from)
VARIANTS = {"r5": ("R5", "metadata"), "r4": ("R4", "metadata"), "qido.r5": ("R5", "instances")}

STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
STUDY_DATE, STUDY_TIME, SERIES_DATE, SERIES_TIME = "00080020", "00080030", "00080021", "00080031"
ACCESSION, MODALITY, STUDY_DESCRIPTION, SERIES_DESCRIPTION = "00080050", "00080060", "00081030", "0008103E"
PATIENT_ID, SERIES_NUMBER, INSTANCE_NUMBER = "00100020", "00200011", "00200013"
IMAGE_TYPE, DOCUMENT_TITLE = "00080008", "00420010"


def values(ds: dict[str, Any], tag: str) -> list[Any]:
    return [v for v in ds.get(tag, {}).get("Value", []) if v not in (None, "")]


def first(ds: dict[str, Any], tag: str) -> Any:
    found = values(ds, tag)
    value = found[0] if found else None
    return value.strip() or None if isinstance(value, str) else value


def number(ds: dict[str, Any], tag: str) -> int | None:
    value = first(ds, tag)
    return None if value is None else int(value)


def fhir_date(da: str | None) -> str | None:
    return None if not da else f"{da[:4]}-{da[4:6]}-{da[6:8]}"


def fhir_clock(tm: str | None) -> str | None:
    """HH:MM:SS of a DICOM TM (HHMMSS.F, HHMM or HH)."""
    if not tm:
        return None
    digits = tm.split(".")[0].ljust(6, "0")
    return f"{digits[:2]}:{digits[2:4]}:{digits[4:6]}"


def expected(recording: dict[str, Any], source: str) -> dict[str, Any]:
    """The one-to-one fields, by hand from DICOM JSON."""
    study = recording["study"]
    instances = recording[source]
    merged = {**instances[0], **study} if instances else study
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for instance in instances:
        series[first(instance, SERIES_UID)].append(instance)
    return {
        "uid": first(study, STUDY_UID),
        "numberOfSeries": len(series),
        "numberOfInstances": len(instances),
        "description": first(merged, STUDY_DESCRIPTION),
        "accession": first(merged, ACCESSION),
        "patient_id": first(merged, PATIENT_ID),
        "date": fhir_date(first(merged, STUDY_DATE)),
        "clock": fhir_clock(first(merged, STUDY_TIME)) if first(merged, STUDY_DATE) else None,
        "series": {
            uid: {
                "modality": first(items[0], MODALITY),
                "number": number(items[0], SERIES_NUMBER),
                "description": first(items[0], SERIES_DESCRIPTION),
                "numberOfInstances": len(items),
                "date": fhir_date(first(items[0], SERIES_DATE)),
                "clock": fhir_clock(first(items[0], SERIES_TIME)) if first(items[0], SERIES_DATE) else None,
                "instances": {
                    first(i, SOP_UID): {
                        "sopClass": f"urn:oid:{first(i, SOP_CLASS)}",
                        "number": number(i, INSTANCE_NUMBER),
                        "title": first(i, DOCUMENT_TITLE) or ("\\".join(values(i, IMAGE_TYPE)) or None),
                    }
                    for i in items
                },
            }
            for uid, items in series.items()
        },
    }


def accession_of(study: dict[str, Any]) -> str | None:
    for based_on in study.get("basedOn", []):
        identifier = based_on.get("identifier", {})
        if any(c.get("code") == "ACSN" for c in identifier.get("type", {}).get("coding", [])):
            return identifier["value"]
    return None


def code_of(concept: dict[str, Any], version: str) -> str:
    coding = concept if version == "R4" else concept["coding"][0]
    return coding["code"]


def found(resources: list[dict[str, Any]], version: str) -> dict[str, Any]:
    """The same fields, read from a golden file."""
    (study,) = [r for r in resources if r["resourceType"] == "ImagingStudy"]
    started = study.get("started")
    subject = study.get("subject", {})
    return {
        "uid": study["identifier"][0]["value"].removeprefix("urn:oid:"),
        "numberOfSeries": study.get("numberOfSeries"),
        "numberOfInstances": study.get("numberOfInstances"),
        "description": study.get("description"),
        "accession": accession_of(study),
        "patient_id": subject.get("identifier", {}).get("value"),
        "date": started[:10] if started else None,
        "clock": started[11:19] if started and len(started) > 10 else None,
        "series": {
            s["uid"]: {
                "modality": code_of(s["modality"], version) if "modality" in s else None,
                "number": s.get("number"),
                "description": s.get("description"),
                "numberOfInstances": s.get("numberOfInstances"),
                "date": s["started"][:10] if "started" in s else None,
                "clock": s["started"][11:19] if len(s.get("started", "")) > 10 else None,
                "instances": {
                    i["uid"]: {
                        "sopClass": i["sopClass"]["code"],
                        "number": i.get("number"),
                        "title": i.get("title"),
                    }
                    for i in s.get("instance", [])
                },
            }
            for s in study.get("series", [])
        },
    }


CASES = [(path, variant) for path in RECORDINGS for variant in VARIANTS]


@pytest.mark.parametrize(("path", "variant"), CASES, ids=[f"{p.stem}.{v}" for p, v in CASES])
def test_golden_fields_match_the_dicom_json(path: Path, variant: str) -> None:
    version, source = VARIANTS[variant]
    recording = json.loads(path.read_text())
    assert recording[source], f"{path.name} has no {source}"
    golden = json.loads((FIXTURES / "expected" / f"{path.stem}.{variant}.json").read_text())
    assert found(golden, version) == expected(recording, source)


def test_every_golden_file_is_checked() -> None:
    goldens = {p.name for p in (FIXTURES / "expected").glob("*.json")}
    assert len(RECORDINGS) >= 10
    assert goldens == {f"{p.stem}.{v}.json" for p, v in CASES}
