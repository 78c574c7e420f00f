"""The committed DICOM JSON recordings are what the live Orthanc answers for the fixture corpus."""

from __future__ import annotations

from fixtures import record


def test_recordings_match_the_live_orthanc(pacs, tmp_path):
    written = record.record(pacs.dicomweb, tmp_path)
    committed = sorted(record.RECORDINGS.glob("*.json"))
    assert [p.name for p in written] == [p.name for p in committed]
    for fresh, old in zip(written, committed):
        assert fresh.read_text() == old.read_text(), f"{old.name} differs: re-record with python -m fixtures.record"
