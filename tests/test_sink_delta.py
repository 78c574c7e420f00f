"""Units of the Delta sink (crawler/sinks/delta.py) that need no server: the compact set of the
studies a table holds, and the once-a-run clean-up of expired log files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("deltalake")

from crawler.sinks import delta  # noqa: E402
from crawler.sinks.delta import DeltaTables, Digests  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "expected" / "study-01.r5.json"
SOURCE = "http://pacs.example.org/dicom-web"


def test_digests_hold_exactly_what_was_added_across_merges(monkeypatch):
    monkeypatch.setattr(delta, "RECENT_DIGESTS", 64)
    rng = random.Random(5)
    digests, truth = Digests(), set()
    for _ in range(60):
        batch = [rng.getrandbits(64) for _ in range(rng.randint(0, 150))]
        batch += rng.sample(sorted(truth), min(len(truth), 10))   # some already held
        batch += batch[:3]                                        # some twice in one batch
        digests.update(batch)
        truth.update(batch)
        assert len(digests) == len(truth)
        assert all(d in digests for d in rng.sample(sorted(truth), min(len(truth), 40)))
        assert not any(rng.getrandbits(64) in digests for _ in range(40))
    assert len(digests._sorted) > 1000 and list(digests._sorted) == sorted(digests._sorted)
    assert 0 not in digests and 2**64 - 1 not in digests


def _resources(i: int) -> list[tuple[str, str, bytes]]:
    out = []
    for r in json.loads(GOLDEN.read_text()):
        body = json.dumps(r).replace("2.25.", f"2.25.{i}.").encode()
        out.append((r["resourceType"], r["id"] + (f"-{i}" if r["resourceType"] == "ImagingStudy" else ""), body))
    return out


def _logs(table: Path) -> list[str]:
    return sorted(p.name for p in (table / "_delta_log").glob("*.json"))


@pytest.mark.parametrize("cleanup", [True, False])
def test_expired_log_files_are_removed_once_at_the_end_of_a_run_unless_the_table_says_not(tmp_path, cleanup):
    from deltalake import DeltaTable

    uri = str(tmp_path / "delta")
    first = DeltaTables(uri, SOURCE, 1)
    first.add("0", _resources(0))
    assert first.finish() == uri
    settings = {"delta.checkpointInterval": "2", "delta.logRetentionDuration": "interval 0 seconds"}
    if not cleanup:
        settings["delta.enableExpiredLogCleanup"] = "false"
    for name in ("studies", "series", "instances"):
        DeltaTable(f"{uri}/{name}").alter.set_table_properties(settings)
    before = _logs(tmp_path / "delta" / "studies")
    sink = DeltaTables(uri, SOURCE, 2)
    for i in range(1, 7):
        sink.add(str(i), _resources(i))
        sink.flush()
    during = _logs(tmp_path / "delta" / "studies")
    assert set(before) < set(during) and len(during) == len(before) + 6   # no clean-up at a checkpoint's commits
    assert len(list((tmp_path / "delta" / "studies" / "_delta_log").glob("*.checkpoint.parquet"))) >= 3
    sink.finish()
    after = _logs(tmp_path / "delta" / "studies")
    if cleanup:
        assert len(after) < len(during) and after[-1] == during[-1]
    else:
        assert after == during
    uids = DeltaTable(f"{uri}/studies").to_pyarrow_table(columns=["study_uid"]).column(0).to_pylist()
    assert len(uids) == len(set(uids)) == 7   # the tables are whole after the clean-up


def test_an_object_store_error_names_its_kind_but_not_what_the_store_answered(monkeypatch):
    from deltalake.exceptions import DeltaError

    from crawler.errors import SinkError

    def refused(self, name, rows):
        raise DeltaError("Generic S3 error: <Error><Code>AccessDenied</Code><Message>user alice-1234 is not allowed</Message></Error>")

    monkeypatch.setattr(DeltaTables, "_holds", lambda self: Digests())
    monkeypatch.setattr(DeltaTables, "_append", refused)
    sink = DeltaTables("s3://bucket/imaging", SOURCE, 1)
    sink.add("0", _resources(0))
    with pytest.raises(SinkError) as raised:
        sink.flush()
    assert str(raised.value) == "cannot write the Delta tables at s3://bucket/imaging: DeltaError"
