"""The mapper's direct readers (its fast paths) give what the careful ones give."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from crawler.dicomjson import Tag
from crawler.errors import MappingError
from crawler.mapping import MappingOptions, StudyInput, map_resources, map_study
from fixtures.golden import OPTIONS, load, recordings

STUDY_UID = "1.2.3"
CT = "1.2.840.10008.5.1.4.1.1.2"


def el(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


def instance(sop_uid: str, number: int | None = None, **elements: dict[str, Any]) -> dict[str, Any]:
    out = {
        Tag.SeriesInstanceUID: el("UI", "1.2.3.4"),
        Tag.Modality: el("CS", "CT"),
        Tag.SOPInstanceUID: el("UI", sop_uid),
        Tag.SOPClassUID: el("UI", CT),
    }
    if number is not None:
        out[Tag.InstanceNumber] = el("IS", number)
    return {**out, **{getattr(Tag, name): value for name, value in elements.items()}}


def study(**elements: dict[str, Any]) -> dict[str, Any]:
    return {Tag.StudyInstanceUID: el("UI", STUDY_UID), **{getattr(Tag, name): value for name, value in elements.items()}}


@pytest.mark.parametrize("path", recordings(), ids=lambda p: p.stem)
def test_study_attributes_come_from_the_first_instance_when_the_study_result_lacks_them(path):
    recording = load(path)
    full = map_resources(StudyInput(recording["study"], recording["metadata"]), OPTIONS)
    first = {**recording["metadata"][0], **recording["study"]}
    bare = {Tag.StudyInstanceUID: recording["study"][Tag.StudyInstanceUID]}
    from_instance = map_resources(StudyInput(bare, [first, *recording["metadata"][1:]]), OPTIONS)
    assert from_instance == full


def test_study_result_wins_over_the_instances():
    data = StudyInput(study(StudyDescription=el("LO", "Study")), [instance("1.2.3.4.1", StudyDescription=el("LO", "Instance"))])
    assert map_study(data, MappingOptions())["description"] == "Study"


def test_first_result_of_a_sop_instance_uid_wins_even_after_a_careful_one():
    results = [
        instance("1.2.3.4.1", 1),
        instance("1.2.3.4.2", 2, SOPClassUID=el("UI", f" {CT} ")),  # padded: read carefully
        instance("1.2.3.4.1", 7),
        instance("1.2.3.4.2", 8),
        instance("1.2.3.4.3", 3),
    ]
    mapped = map_study(StudyInput(study(), results), MappingOptions())
    assert [(i["uid"], i["number"]) for i in mapped["series"][0]["instance"]] == [("1.2.3.4.1", 1), ("1.2.3.4.2", 2), ("1.2.3.4.3", 3)]
    assert mapped["series"][0]["numberOfInstances"] == 5


def test_instances_without_numbers_sort_last_then_by_uid():
    results = [instance("1.2.3.4.9"), instance("1.2.3.4.5", 2), instance("1.2.3.4.1"), instance("1.2.3.4.7", 1)]
    mapped = map_study(StudyInput(study(), results), MappingOptions())
    assert [i["uid"] for i in mapped["series"][0]["instance"]] == ["1.2.3.4.7", "1.2.3.4.5", "1.2.3.4.1", "1.2.3.4.9"]


def test_a_uid_is_its_first_value():
    results = [instance("1.2.3.4.1", SOPInstanceUID=el("UI", "1.2.3.4.1", "9.9"), SeriesInstanceUID=el("UI", "1.2.3.4", "9.8"))]
    mapped = map_study(StudyInput(study(), results), MappingOptions())
    assert mapped["series"][0]["uid"] == "1.2.3.4"
    assert mapped["series"][0]["instance"][0]["uid"] == "1.2.3.4.1"


@pytest.mark.parametrize("image_type", [[[]], [{}], ["ORIGINAL", ["PRIMARY"]]])
def test_image_type_that_is_not_text_is_a_mapping_error(image_type):
    results = [instance("1.2.3.4.1", ImageType={"vr": "CS", "Value": image_type})]
    with pytest.raises(MappingError, match="ImageType"):
        map_study(StudyInput(study(), results), MappingOptions())


def test_image_type_is_joined_per_instance():
    results = [
        instance("1.2.3.4.1", 1, ImageType=el("CS", "ORIGINAL", "PRIMARY")),
        instance("1.2.3.4.2", 2, ImageType=el("CS", "DERIVED", "SECONDARY")),
        instance("1.2.3.4.3", 3, ImageType=el("CS", "ORIGINAL", "PRIMARY")),
        instance("1.2.3.4.4", 4, ImageType=el("CS", " ORIGINAL", "", "PRIMARY")),
    ]
    mapped = map_study(StudyInput(study(), results), MappingOptions())
    titles = [i["title"] for i in mapped["series"][0]["instance"]]
    assert titles == ["ORIGINAL\\PRIMARY", "DERIVED\\SECONDARY", "ORIGINAL\\PRIMARY", "ORIGINAL\\PRIMARY"]


def test_the_input_is_not_changed():
    recording = load(recordings()[0])
    before = copy.deepcopy(recording)
    map_resources(StudyInput(recording["study"], recording["metadata"]), OPTIONS)
    assert recording == before
