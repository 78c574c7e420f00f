"""The NDJSON folder's checkpoints and the recovery of interrupted folders, byte by byte, in
process (the crash tests kill a subprocess, which the mutation run cannot follow; docs/testing.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from crawler.errors import SinkError
from crawler.sinks.ndjson import CHECKPOINT, NdjsonFolder, complete, recover

A = b'{"resourceType":"ImagingStudy","id":"a"}'
B = b'{"resourceType":"ImagingStudy","id":"b"}'
E = b'{"resourceType":"Endpoint","id":"e"}'


def folder_with_checkpoint(root: Path) -> tuple[NdjsonFolder, Path]:
    target = root / "run"
    sink = NdjsonFolder(target, transaction_time="2026-01-01T00:00:00Z", request="http://pacs/studies", fresh=True)
    sink.add("1.1", [("ImagingStudy", "a", A), ("Endpoint", "e", E)])
    sink.delete("1.9", "ImagingStudy", "z")
    assert sink.flush() == {}
    sink.add("1.2", [("ImagingStudy", "b", B), ("Endpoint", "e", E)])
    return sink, target


def test_flush_records_the_synced_size_and_count_of_every_part_file(tmp_path: Path):
    sink, target = folder_with_checkpoint(tmp_path)
    saved = json.loads((target / CHECKPOINT).read_text())
    assert saved == {
        "transactionTime": "2026-01-01T00:00:00Z",
        "request": "http://pacs/studies",
        "files": {"ImagingStudy": [len(A) + 1, 1], "Endpoint": [len(E) + 1, 1], "deleted": [saved["files"]["deleted"][0], 1]},
    }
    assert saved["files"]["deleted"][0] == (target / "deleted.ndjson.part").stat().st_size > 0
    assert not (target / f"{CHECKPOINT}.part").exists()
    assert sorted(p.name for p in target.iterdir()) == ["Endpoint.ndjson.part", "ImagingStudy.ndjson.part", CHECKPOINT, "deleted.ndjson.part"]


def test_flush_before_anything_is_written_makes_nothing(tmp_path: Path):
    sink = NdjsonFolder(tmp_path / "run", transaction_time="t", request="r", fresh=True)
    assert sink.flush() == {}
    assert not (tmp_path / "run").exists()


def test_after_a_flush_a_shared_resource_is_written_again(tmp_path: Path):
    sink, target = folder_with_checkpoint(tmp_path)
    assert sink.finish() == str(target)
    assert (target / "Endpoint.ndjson").read_bytes() == E + b"\n" + E + b"\n"


def test_finish_renames_every_part_writes_the_manifest_and_drops_the_checkpoint(tmp_path: Path):
    sink, target = folder_with_checkpoint(tmp_path)
    assert sink.finish() == str(target)
    assert sorted(p.name for p in target.iterdir()) == ["Endpoint.ndjson", "ImagingStudy.ndjson", "deleted.ndjson", "manifest.json"]
    assert (target / "ImagingStudy.ndjson").read_bytes() == A + b"\n" + B + b"\n"
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["output"] == [{"type": "Endpoint", "url": "Endpoint.ndjson", "count": 2},
                                  {"type": "ImagingStudy", "url": "ImagingStudy.ndjson", "count": 2}]
    assert manifest["deleted"] == [{"type": "Bundle", "url": "deleted.ndjson", "count": 1}]
    assert (manifest["transactionTime"], manifest["request"]) == ("2026-01-01T00:00:00Z", "http://pacs/studies")
    assert sink.finish() is None


def test_finish_without_anything_written(tmp_path: Path):
    assert NdjsonFolder(tmp_path / "quiet", transaction_time="t", request="r", fresh=True).finish() is None
    assert not (tmp_path / "quiet").exists()
    empty = NdjsonFolder(tmp_path / "export", transaction_time="t", request="r", always=True)
    assert empty.finish() == str(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["manifest.json"]


def test_finish_that_cannot_write_is_a_sink_error(tmp_path: Path):
    sink, target = folder_with_checkpoint(tmp_path)
    (target / "ImagingStudy.ndjson.part").unlink()
    with pytest.raises(SinkError, match="cannot finish"):
        sink.finish()


def test_complete_cuts_every_file_back_to_the_checkpoint(tmp_path: Path):
    sink, target = folder_with_checkpoint(tmp_path)
    for handle in sink._files.values():
        handle.flush()
    (target / "stray.txt").write_text("not ours")
    (target / "notes.part").write_text("not ours either")
    (target / f"{CHECKPOINT}.part").write_text("half")
    (target / "Patient.ndjson.part").write_bytes(b"{}\n")
    assert complete(target) is True
    assert sorted(p.name for p in target.iterdir()) == ["Endpoint.ndjson", "ImagingStudy.ndjson", "deleted.ndjson", "manifest.json", "notes.part", "stray.txt"]
    assert (target / "ImagingStudy.ndjson").read_bytes() == A + b"\n"
    assert (target / "Endpoint.ndjson").read_bytes() == E + b"\n"
    manifest = json.loads((target / "manifest.json").read_text())
    assert [(o["type"], o["count"]) for o in manifest["output"]] == [("Endpoint", 1), ("ImagingStudy", 1)]
    assert manifest["deleted"][0]["count"] == 1
    assert (manifest["transactionTime"], manifest["request"]) == ("2026-01-01T00:00:00Z", "http://pacs/studies")


def test_complete_without_a_checkpoint_removes_only_what_a_run_writes(tmp_path: Path):
    target = tmp_path / "run"
    sink = NdjsonFolder(target, transaction_time="t", request="r", fresh=True)
    sink.add("1.1", [("ImagingStudy", "a", A)])
    sink._files["ImagingStudy"].flush()
    (target / f"{CHECKPOINT}.part").write_text("{}")
    (target / "manifest.json.part").write_text("{}")
    assert complete(target) is False
    assert not target.exists()

    sink = NdjsonFolder(tmp_path / "shared", transaction_time="t", request="r")
    sink.add("1.1", [("ImagingStudy", "a", A)])
    (tmp_path / "shared" / "notes.part").write_text("someone else's")
    assert complete(tmp_path / "shared") is False
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["notes.part"]


def test_recover_completes_or_removes_only_unfinished_folders_it_is_given(tmp_path: Path):
    _, kept = folder_with_checkpoint(tmp_path / "a")
    done, finished = folder_with_checkpoint(tmp_path / "b")
    done.finish()
    bare = tmp_path / "c" / "run"
    NdjsonFolder(bare, transaction_time="t", request="r", fresh=True).add("1", [("ImagingStudy", "a", A)])
    _, untouched = folder_with_checkpoint(tmp_path / "d")
    completed, removed = recover([str(kept), finished, bare, tmp_path / "missing"])
    assert (completed, removed) == ([kept], [bare])
    assert (kept / "manifest.json").exists() and not bare.exists()
    assert (finished / "manifest.json").exists()
    assert (untouched / CHECKPOINT).exists() and not (untouched / "manifest.json").exists()
    assert recover([]) == ([], [])


def test_abort_keeps_the_last_checkpoint(tmp_path: Path):
    sink, target = folder_with_checkpoint(tmp_path)
    sink.abort()
    assert (target / "ImagingStudy.ndjson").read_bytes() == A + b"\n"
    assert os.path.exists(target / "manifest.json")


def test_a_checkpoint_that_cannot_be_written_is_a_sink_error_naming_the_folder(tmp_path: Path):
    target = tmp_path / "run"
    sink = NdjsonFolder(target, transaction_time="t", request="r", fresh=True)
    sink.add("1.1", [("ImagingStudy", "a", A)])
    (target / f"{CHECKPOINT}.part").mkdir()
    with pytest.raises(SinkError, match=f"^cannot write to {target}: "):
        sink.flush()
    assert not (target / CHECKPOINT).exists()
