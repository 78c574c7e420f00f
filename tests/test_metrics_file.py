"""sync --metrics-file: a scheduled sync's figures for node_exporter's textfile collector, parsed
by prometheus-client's own parser; the last success survives a failed run."""

from __future__ import annotations

import os
import stat

from prometheus_client.parser import text_string_to_metric_families

from crawler.cli import main
from fixtures.fakepacs import FakePacs


def _samples(path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_a_sync_writes_its_figures_and_a_failed_one_keeps_the_last_success(tmp_path, capsys):
    state, metrics = tmp_path / "state.db", tmp_path / "qido.prom"
    with FakePacs(n_studies=7, seed=81) as pacs:
        args = ["sync", pacs.url, "--state", str(state), "--metadata", "never", "--timezone", "UTC", "-q", "--metrics-file", str(metrics)]
        assert main(args) == 0
        first = _samples(metrics)
        source = (("source", pacs.url),)
        assert first["qido_crawler_sync_last_run_exit_code", source] == 0
        assert first["qido_crawler_sync_last_run_studies", (("outcome", "new"), *source)] == 7
        assert first["qido_crawler_sync_last_run_studies", (("outcome", "listed"), *source)] == 7
        assert first["qido_crawler_sync_last_run_requests", (("kind", "studies"), *source)] >= 1
        success = first["qido_crawler_sync_last_success_timestamp_seconds", source]
        assert success == first["qido_crawler_sync_last_run_timestamp_seconds", source]
        url = pacs.url
    assert stat.S_IMODE(os.stat(metrics).st_mode) == 0o644
    assert main(["sync", url, "--state", str(state), "--retries", "0", "--timeout", "2", "-q", "--metrics-file", str(metrics)]) == 3
    failed = _samples(metrics)
    assert failed["qido_crawler_sync_last_run_exit_code", source] == 3
    assert failed["qido_crawler_sync_last_success_timestamp_seconds", source] == success
    assert failed["qido_crawler_sync_last_run_timestamp_seconds", source] > success
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qido.prom.")]   # no temporary file left
    capsys.readouterr()
