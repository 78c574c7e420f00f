"""--executor dask on a local cluster of worker processes, against the live Orthanc: the same
export as the thread-pool sync, also when a worker is killed in the middle of the run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("dask.distributed")

from crawler.cli import main  # noqa: E402
from crawler.config import SyncConfig  # noqa: E402
from crawler.sync import sync  # noqa: E402

ZONE = ["--timezone", "Europe/Berlin"]


def exported(capsys: pytest.CaptureFixture[str], state: Path, out: Path) -> dict[str, list[str]]:
    assert main(["export", "--state", str(state), "--out", str(out)]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    return {entry["type"]: sorted((out / entry["url"]).read_text().splitlines()) for entry in manifest["output"]}


def sync_cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = main(["sync", *args, "--json", "--quiet", *ZONE])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def threads_export(pacs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("threads")
    code = main(["sync", pacs.dicomweb, "--state", str(folder / "state.db"), "--quiet", *ZONE])
    assert code == 0
    return folder / "state.db"


def test_dask_sync_exports_what_the_thread_pool_exports(pacs, corpus_study_uids, threads_export, tmp_path, capsys):
    expected = exported(capsys, threads_export, tmp_path / "threads-export")
    summary = sync_cli(capsys, pacs.dicomweb, "--state", str(tmp_path / "state.db"), "--out", str(tmp_path / "out"),
                       "--executor", "dask", "--workers", "2", "--worker-threads", "2")
    assert summary["studies_listed"] == summary["studies_new"] == len(corpus_study_uids)
    assert summary["studies_failed"] == summary["studies_inconsistent"] == summary["windows_incomplete"] == 0
    assert "series" not in summary["requests"]
    assert exported(capsys, tmp_path / "state.db", tmp_path / "dask-export") == expected

    again = sync_cli(capsys, pacs.dicomweb, "--state", str(tmp_path / "state.db"), "--full", "--executor", "dask", "--workers", "2")
    assert again["studies_unchanged"] == len(corpus_study_uids)
    assert again["resources_written"] == 0
    assert set(again["requests"]) <= {"total", "studies", "retries"}


def test_a_worker_killed_mid_run_loses_nothing(pacs, corpus_study_uids, threads_export, tmp_path, capsys):
    """The run goes to a cluster the test owns; when the first studies are back, the worker busy
    with the most tasks is killed (SIGKILL): its tasks run again elsewhere and the export is the
    same as the thread pool's."""
    from dask.distributed import Client, LocalCluster

    from crawler.config import zone

    expected = exported(capsys, threads_export, tmp_path / "threads-export")
    killed: list[int] = []
    taken: list[object] = []
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)

        def kill_a_busy_worker(figures) -> None:
            taken.append(figures)
            if killed or len(taken) < 2:
                return
            busy = {address: len(keys) for address, keys in client.processing().items() if keys}
            if busy:
                address = max(busy, key=busy.get)
                os.kill(pids[address], signal.SIGKILL)
                killed.append(pids[address])

        config = SyncConfig(
            url=pacs.dicomweb, state=tmp_path / "state.db", out=tmp_path / "out", executor="dask",
            scheduler=cluster.scheduler_address, max_rps=8.0, zone=zone("Europe/Berlin"),
        )
        result = sync(config, progress=kill_a_busy_worker)
    assert killed, "no worker was busy when the first studies came back"
    assert result.exit_code == 0, result.errors
    assert result.figures.studies_new == len(corpus_study_uids)
    assert result.figures.studies_failed == 0
    assert exported(capsys, tmp_path / "state.db", tmp_path / "dask-export") == expected
