"""`qido-crawler map`: the lean decode and orjson's indentation give the bytes a full parse and
``json.dumps`` gave, for every recorded study, whole (QIDO results with study attributes) or as
WADO-RS metadata, R5 and R4; bad input fails with one line."""

from __future__ import annotations

import json
from zoneinfo import ZoneInfo

import orjson
import pytest

from crawler.cli import main
from crawler.mapping import MappingOptions, StudyInput, map_study
from crawler.worker import convert
from fixtures.golden import load, recordings

SOURCE = "http://pacs.example.org/dicom-web"
ZONE = "Europe/Berlin"


def _inputs() -> list[tuple[str, list[dict]]]:
    cases = []
    for path in recordings():
        recording = load(path)
        cases.append((f"{path.stem}-qido", [{**recording["study"], **item} for item in recording["instances"]]))
        cases.append((f"{path.stem}-metadata", recording["metadata"]))
    return cases


def _reference(raw: bytes, version: str) -> str:
    """What `map` printed before: a full parse, the mapping, ``json.dumps(indent=2)``."""
    options = MappingOptions(source=SOURCE, wado_base=SOURCE, zone=ZoneInfo(ZONE))
    resource = convert(map_study(StudyInput(study={}, instances=orjson.loads(raw)), options), version)
    return json.dumps(resource, indent=2, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("version", ["R5", "R4"])
@pytest.mark.parametrize(("name", "items"), _inputs(), ids=[name for name, _ in _inputs()])
def test_map_prints_what_a_full_parse_and_json_dumps_print(name, items, version, tmp_path, capsys):
    raw = json.dumps(items, indent=1).encode()
    path = tmp_path / f"{name}.json"
    path.write_bytes(raw)
    code = main(["map", str(path), "--source", SOURCE, "--wado-url", SOURCE, "--timezone", ZONE, "--fhir-version", version])
    out = capsys.readouterr().out
    assert code == 0
    assert out == _reference(raw, version)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}', "malformed JSON"),
        (b'{"0020000D": {}}', "expected a non-empty JSON array"),
        (b"[]", "expected a non-empty JSON array"),
        (b"[1, 2]", "expected a non-empty JSON array"),
        (b"\xff\xfe[]", "malformed JSON"),
    ],
)
def test_map_refuses_bad_input_with_one_line(body, message, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_bytes(body)
    assert main(["map", str(path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
