"""A smoke run of ``benchmarks/bench_watch.py`` (its ``--quick`` mode, shortened), so that the
benchmark keeps working as the watch changes; no target is asserted here (the machine is shared),
only that the run's checks pass and that every figure it reports was measured."""

from __future__ import annotations

import json

from benchmarks.bench_watch import main


def test_the_watch_benchmark_measures_every_study_and_an_idle_watch(capsys):
    code = main(["--quick", "--studies", "3", "--spread", "3", "--idle", "4", "--preload", "1",
                 "--interval", "1", "--stable-after", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["checks"] == "ok"
    latency = report["latency"]
    for sink in ("finished_run_folder", "fhir_simulator"):
        assert latency[sink]["studies"] == 3
        assert 0 < latency[sink]["min"] <= latency[sink]["p50"] <= latency[sink]["p95"] <= latency[sink]["max"]
    assert latency["floor_seconds"] == 3
    idle = report["idle"]
    # an idle poll is one request: at most one per interval (1 s here), and one in flight at each end
    # of the window (the metrics' poll counter moves when a read has returned, its requests when sent)
    assert idle["polls"] >= 1 and 1 <= idle["requests"] <= idle["seconds"] / 1 + 2
    assert idle["fhir_requests"] == 0 and idle["cpu_percent_of_a_core"] is not None
    (run,) = report["runs"]
    assert set(run["idle_requests_by_kind"]) >= {"changes"} and run["exit_code"] == 0
