"""Scale, in small: against a simulated PACS the crawler finds every study exactly once with all
its series and instances, and its peak memory does not grow with the number of studies.

The simulator (``benchmarks/simulator.py``: ``FakePacs`` in its own process) and the crawler
(``python -m crawler sync`` in a child process that reports its own peak RSS, see
``benchmarks/bench_scale.py``) run as they do in the scale benchmark, at 300 and 3,000 studies.
Both syncs checkpoint every 100 studies, so both reach the crawler's steady working set (what a
checkpoint holds back) and the difference between them is what grows with the study count. At
these sizes the check catches anything that keeps a few kilobytes per study (a list of the
studies, of their listing entries or of their resources); ``bench_scale.py`` measures the same at
10,000 to 1,000,000 studies.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from benchmarks.bench_scale import run_sync
from benchmarks.simulator import simulator
from fixtures.fakepacs import FakePacs

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")

SEED = 11
SMALL, LARGE = 300, 3_000
RSS_RATIO, RSS_SLACK_MB = 1.15, 4.0


def _crawl(n: int, workdir: Path) -> dict:
    with simulator(n, SEED) as sim:
        result = run_sync(sim.url, workdir, "--checkpoint-every", "100", workers=4, sample=False)
        result["simulator_requests"] = sim.counts()["requests"]
    assert result["exit"] == 0, result["stderr"]
    return result


def _check_every_study(n: int, workdir: Path, result: dict) -> None:
    pacs = FakePacs(n, SEED)   # not started: ground truth only
    truth = list(pacs.study_uids())
    assert len(truth) == len(set(truth)) == n

    summary = result["summary"]
    assert (summary["studies_listed"], summary["studies_new"], summary["studies_failed"], summary["studies_inconsistent"]) == (n, n, 0, 0)
    assert summary["requests"]["instances"] == n                 # one instance query per study
    assert result["simulator_requests"].get("instances") == n   # and the server saw the same

    db = sqlite3.connect(workdir / "state.db")
    try:
        rows = db.execute("SELECT study_uid, status FROM studies").fetchall()
    finally:
        db.close()
    assert len(rows) == n
    assert {uid for uid, _ in rows} == set(truth)
    assert {status for _, status in rows} == {"synced"}

    seen: dict[str, int] = {}
    with open(Path(summary["run_dir"]) / "ImagingStudy.ndjson", "rb") as f:
        for line in f:
            study = json.loads(line)
            uid = next(i["value"] for i in study["identifier"] if i.get("system") == "urn:dicom:uid").removeprefix("urn:oid:")
            seen[uid] = seen.get(uid, 0) + 1
            assert study["numberOfSeries"] == len(study["series"]) == pacs.n_series(uid), uid
            assert study["numberOfInstances"] == sum(len(s["instance"]) for s in study["series"]) == pacs.n_instances(uid), uid
            assert {i["uid"] for s in study["series"] for i in s["instance"]} == set(pacs.instance_uids(uid)), uid
    assert set(seen) == set(truth)
    assert set(seen.values()) == {1}, "a study was written twice"


def test_every_study_once_and_memory_flat(tmp_path: Path) -> None:
    small = _crawl(SMALL, tmp_path / "small")
    large = _crawl(LARGE, tmp_path / "large")
    _check_every_study(SMALL, tmp_path / "small", small)
    _check_every_study(LARGE, tmp_path / "large", large)

    limit = small["peak_rss_mb"] * RSS_RATIO + RSS_SLACK_MB
    assert large["peak_rss_mb"] <= limit, (
        f"peak RSS grows with the study count: {LARGE} studies {large['peak_rss_mb']} MB, "
        f"{SMALL} studies {small['peak_rss_mb']} MB (limit {limit:.1f} MB)"
    )
