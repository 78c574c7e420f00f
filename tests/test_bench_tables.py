"""A smoke run of ``benchmarks/bench_tables.py`` (its ``--quick`` mode, smaller still), so that the
benchmark keeps working as the table sinks change; no target is asserted here (the machine is
shared), only that its checks pass (every variant sends the same requests, the tables hold exactly
the simulator's studies, series and instances) and that every figure it reports was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_tables import VARIANTS, main

pytest.importorskip("deltalake")
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")


def test_the_tables_benchmark_measures_every_variant(capsys, tmp_path: Path) -> None:
    code = main(["--quick", "--sizes", "300", "--checkpoint-every", "100", "--tmp", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    (case,) = report["sizes"]
    assert code == 0 and case["checks"] == []
    assert case["truth"]["studies"] == 300 and case["truth"]["instances"] > case["truth"]["series"] >= 300
    truth_rows = sum(case["truth"].values())
    summary = case["summary"]
    assert set(summary) == set(VARIANTS)
    assert len({s["requests"] for s in summary.values()}) == 1 and summary["ndjson"]["requests"] > 300
    for variant, s in summary.items():
        assert s["wall_best"] > 0 and s["cpu_best"] > 0 and s["peak_rss_mb"] > s["base_rss_mb"] > 0, variant
        writes_out, sink = VARIANTS[variant]
        assert (s["ndjson_bytes"] or 0) > 0 if writes_out else s["ndjson_bytes"] is None, variant
        if sink:
            assert s["table_rows"] == truth_rows and s["rows_per_s_wall"] > 0, variant
            assert 0 < s["table_live_bytes"] <= s["table_bytes"] and 0 < s["live_bytes_vs_ndjson"] < 1, variant
        else:
            assert s["table_rows"] is None
    assert summary["delta"]["delta_commits"] >= 3 * 3      # 300 studies, a commit per table every 100
    assert [t["met"] for t in report["targets"] if "adds under" in t["target"]] and report["environment"]["loadavg_before"]
    assert list(tmp_path.iterdir()) == []                  # nothing left behind without --keep
