"""``sync --dry-run`` on a live Orthanc whose content changes: it reports exactly the change a real
run then makes, asks only study-level searches, and writes nothing."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pydicom

from crawler.cli import main
from crawler.config import SyncConfig
from crawler.crawl import CrawlOptions, MetadataMode
from crawler.dryrun import dry_run
from fixtures import corpus

ZONE = ["--timezone", "UTC"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def _sync(live, state: Path, out: Path, capsys, *extra: str) -> tuple[int, dict]:
    code = main(["sync", live.dicomweb, "--state", str(state), "--out", str(out), "--json", *ZONE, *extra])
    return code, json.loads(capsys.readouterr().out)


def _figures(summary: dict) -> tuple[int, int, int, int]:
    return summary["studies_new"], summary["studies_changed"], summary["studies_unchanged"], summary["studies_gone"]


def test_a_dry_run_reports_exactly_the_change_a_real_run_makes_and_writes_nothing(live, corpus_files, tmp_path, capsys):
    state, out = tmp_path / "state.db", tmp_path / "out"

    code, first = _sync(live, state, out, capsys, "--dry-run")
    assert code == 0, first
    assert _figures(first) == (16, 0, 0, 0)
    assert not state.exists() and not out.exists()          # no state made, no folder
    assert set(first["requests"]) == {"total", "studies", "retries"}
    assert first["crawl_requests"] >= 16

    code, synced = _sync(live, state, out, capsys)
    assert code == 0 and synced["studies_new"] == 16

    uid = corpus.uid("study", "02")
    files = [p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == uid]
    changed = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyDescription = "MR KNEE RE-READ"
        ds.save_as(tmp_path / f"m{i}.dcm", enforce_file_format=True)
        changed.append(tmp_path / f"m{i}.dcm")
    live.upload(changed)
    gone = corpus.uid("study", "03")
    live.rest("DELETE", f"/studies/{live.rest('POST', '/tools/lookup', data=gone).json()[0]['ID']}")

    state_before, out_before = _digest(state), _tree(out)
    code, dry = _sync(live, state, out, capsys, "--full", "--dry-run")
    assert code == 0, dry
    assert _figures(dry) == (0, 1, 14, 1)
    assert dry["studies_listed"] == 15 and dry["scope"] == "full"
    assert set(dry["requests"]) == {"total", "studies", "retries"}   # listing and the UID search: no instance, no metadata
    assert dry["requests"]["studies"] >= 2
    assert dry["crawl_requests"] >= 1
    assert _digest(state) == state_before and _tree(out) == out_before

    code, real = _sync(live, state, out, capsys, "--full")
    assert code == 0
    assert _figures(real) == _figures(dry)


def test_the_library_dry_run_estimates_instance_searches_from_the_reported_counts(live, corpus_files, tmp_path):
    config = SyncConfig(url=live.dicomweb, state=tmp_path / "state.db", crawl=CrawlOptions(metadata=MetadataMode.NEVER, instance_page_size=2))
    result = dry_run(config)
    per_study = Counter(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in corpus_files)
    assert result.studies_new == len(per_study) == 16
    assert result.crawl_requests == sum(-(-n // 2) for n in per_study.values())
    assert result.crawl_requests > 16
    assert result.exit_code == 0 and result.errors == []
    assert not (tmp_path / "state.db").exists()
