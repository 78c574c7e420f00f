"""--executor dask against the fake PACS of fixtures/fakepacs.py (a fake, named as such): caps of
every kind, paging quirks and transient faults, a listing that stops, an inconsistent study. The
rule is the thread pool's: every study found exactly once, or the run names the windows it could
not finish and exits 1.

One local cluster of two worker processes serves the whole module (workers reach the fake PACS
over loopback like any server).
"""

from __future__ import annotations

import pytest

pytest.importorskip("dask.distributed")

from distributed import WorkerPlugin  # noqa: E402

from crawler.errors import SourceUnreachable  # noqa: E402
from fixtures.fakepacs import FakePacs  # noqa: E402

from test_crawl_faults import assert_complete, run as run_threads, written_study_uids  # noqa: E402


@pytest.fixture(scope="module")
def scheduler():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0") as cluster:
        yield cluster.scheduler_address


def run(pacs: FakePacs, tmp_path, scheduler: str, **overrides):
    return run_threads(pacs, tmp_path, executor="dask", scheduler=scheduler, **overrides)


@pytest.mark.parametrize("cap_mode", ["warning", "warning2013", "silent", "413"])
def test_capped_windows_are_split_and_fed_back(cap_mode, tmp_path, scheduler):
    with FakePacs(n_studies=150, seed=1, max_results=25, cap_mode=cap_mode) as pacs:
        result, rows = run(pacs, tmp_path, scheduler, page_size=50)
        assert_complete(pacs, result, rows)
        assert result.figures.windows_split > 0


def test_windows_over_a_tasks_share_are_split_into_tasks(tmp_path, scheduler):
    with FakePacs(n_studies=1500, seed=11, date_from="20200101", date_to="20231231") as pacs:
        result, rows = run(pacs, tmp_path, scheduler, page_size=100)
        assert_complete(pacs, result, rows)
        # a task lists at most 1,000 studies of a multi-day window: 1,500 need at least 2 windows
        assert result.figures.windows_split >= 1
        assert result.requests["instances"] == pacs.counts()["instances"] == 1500
        assert result.requests["studies"] == pacs.counts()["studies"]
        assert "series" not in result.requests


@pytest.mark.parametrize(
    "behaviour",
    [
        {"ignore_offset": True},
        {"duplicate_across_pages": True},
        {"fail_every": 4, "fail_status": 429, "retry_after": "0"},
        {"reset_every": 6},
    ],
    ids=lambda b: ",".join(f"{k}={v}" for k, v in b.items()),
)
def test_paging_quirks_and_transient_faults_lose_nothing(behaviour, tmp_path, scheduler):
    with FakePacs(n_studies=90, seed=3, **behaviour) as pacs:
        result, rows = run(pacs, tmp_path, scheduler, timeout=(2.0, 1.0), retries=10)
        assert_complete(pacs, result, rows)


def test_a_listing_that_stops_midway_exits_1_and_names_the_window(tmp_path, scheduler):
    with FakePacs(n_studies=60, seed=6, fail_listing_from_offset=40, fail_status=500) as pacs:
        result, rows = run(pacs, tmp_path, scheduler, retries=1)
        assert result.exit_code == 1
        assert result.figures.windows_incomplete >= 1
        not_listed = [e for e in result.errors if "not listed" in e]
        assert len(not_listed) == result.figures.windows_incomplete
        assert all("HTTP 500" in e and "offset=40" in e for e in not_listed)
        assert set(rows.values()) == {"synced"}
        assert 40 <= len(rows) < 60 and set(rows) <= set(pacs.study_uids())
        assert set(written_study_uids(result)) == set(rows)


def test_inconsistent_study_is_not_recorded_as_synced(tmp_path, scheduler):
    with FakePacs(n_studies=40, seed=5, inconsistent={3: 2}, malformed={7}) as pacs:
        result, rows = run(pacs, tmp_path, scheduler)
        assert result.exit_code == 1
        assert result.figures.studies_inconsistent == 1 and result.figures.studies_failed == 1
        assert rows[pacs.study_uid(3)] == "inconsistent" and rows[pacs.study_uid(7)] == "failed"
        assert set(written_study_uids(result)) == set(pacs.study_uids()) - {pacs.study_uid(3), pacs.study_uid(7)}


def test_a_server_that_always_fails_is_unreachable(tmp_path, scheduler):
    with FakePacs(n_studies=10, seed=7, fail_every=1, fail_status=503) as pacs:
        with pytest.raises(SourceUnreachable):
            run(pacs, tmp_path, scheduler, retries=1)


def test_a_local_cluster_forks_its_workers_with_the_crawler_imported():
    import multiprocessing
    import sys

    import dask

    from crawler.executors import dask as distributed
    from crawler.config import SyncConfig
    from crawler.config import SyncConfig

    key = "distributed.worker.multiprocessing-method"
    if "forkserver" not in multiprocessing.get_all_start_methods() or dask.config.get(key) != "spawn":
        pytest.fail("this test expects a platform with forkserver and Dask's default start method")
    config = SyncConfig(url="http://127.0.0.1:9/dicom-web", executor="dask", workers=2, worker_threads=1)
    with distributed.forked_workers():
        client, cluster = distributed.connect(config)
        try:
            assert distributed.capacity(config, client) == (2, 2)
            client.wait_for_workers(2, timeout=60)
            preloaded = client.run(lambda: all(name in sys.modules for name in distributed.PRELOAD))
            assert list(preloaded.values()) == [True, True]
        finally:
            client.close()
            cluster.close()
    assert dask.config.get(key) == "spawn", "Dask's setting is changed only while the cluster lives"


def test_the_first_windows_are_spread_over_the_cluster():
    from datetime import date, timedelta

    from crawler.executors.dask import spread
    from crawler.planner import Window

    def days(windows: list[Window]) -> list[str]:
        out = []
        for w in windows:
            day, last = date.fromisoformat(f"{w.since[:4]}-{w.since[4:6]}-{w.since[6:]}"), date.fromisoformat(f"{w.until[:4]}-{w.until[4:6]}-{w.until[6:]}")
            while day <= last:
                out.append(day.strftime("%Y%m%d"))
                day += timedelta(days=1)
        return out

    year = [Window("20240101", "20241231")]
    for parts in (1, 2, 3, 4, 7, 16):
        windows = spread(year, parts)
        assert len(windows) == parts
        assert days(windows) == days(year), "every day once, in order"
    assert spread([Window("20240101", "20240101")], 8) == [Window("20240101", "20240101")]
    assert len(spread([Window("20240101", "20240103")], 8)) == 3
    full = spread(Window().split(), 16)
    assert len(full) == 16 and full[0].since is None and full[-1].until is None


class PoisonStudy(WorkerPlugin):
    """A Dask worker plugin (fault injection): the worker process dies at once when asked to
    crawl the study ``uid``; workers the nanny restarts get the plugin again, so the task keeps
    killing workers until the scheduler gives it up."""

    name = "poison-study"

    def __init__(self, uid: str) -> None:
        self.uid = uid

    def setup(self, worker) -> None:
        import importlib
        import os

        worker = importlib.import_module("crawler.worker")
        crawl_one, uid = worker.crawl_one, self.uid

        def dying(client, summary, *args, **kwargs):
            if summary.uid == uid:
                os._exit(1)
            return crawl_one(client, summary, *args, **kwargs)

        worker.crawl_one = dying


def test_a_task_that_keeps_killing_workers_fails_its_studies_and_the_run_goes_on(tmp_path):
    import dask
    from dask.distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster, \
                Client(cluster, set_as_default=False) as client, FakePacs(n_studies=30, seed=13) as pacs:
            poison = pacs.study_uid(5)
            client.register_plugin(PoisonStudy(poison))
            result, rows = run(pacs, tmp_path, cluster.scheduler_address)
    failed = {uid for uid, status in rows.items() if status == "failed"}
    assert result.exit_code == 1
    # the poisoned batch fails; tasks queued on the dying workers may fail with it (the scheduler
    # counts them as suspects too), but never everything
    assert poison in failed and len(failed) < 30 and result.figures.studies_failed == len(failed)
    assert any(poison in e and "the crawl task failed" in e for e in result.errors)
    assert set(written_study_uids(result)) == set(rows) - failed
    assert {uid for uid, status in rows.items() if status == "synced"} == set(rows) - failed
    assert len(rows) == 30


class TimedPacs(FakePacs):
    """The simulator, also noting when each request arrived."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[float] = []

    def _record(self, *args, **kwargs):
        import time

        self.arrivals.append(time.monotonic())
        return super()._record(*args, **kwargs)


def test_max_rps_is_shared_out_among_the_worker_processes(tmp_path, scheduler):
    """Two worker processes with --max-rps R send at most about R requests a second together,
    so N requests take at least about N/R seconds (a busy machine only makes that longer); a
    limit each process applied whole would take about half that."""
    rate = 10.0
    with TimedPacs(n_studies=40, seed=14) as pacs:
        result, rows = run(pacs, tmp_path, scheduler, max_rps=rate)
        assert_complete(pacs, result, rows)
        n, span = len(pacs.arrivals), pacs.arrivals[-1] - pacs.arrivals[0]
    assert n >= 40
    assert span >= 0.85 * (n - 6) / rate, f"{n} requests in {span:.2f} s"


def test_a_worker_process_keeps_a_pooled_connection_for_each_of_its_threads():
    """``--workers`` counts processes under Dask: the client of a worker process is sized by its
    threads (here outside a worker: ``--worker-threads``), not by the number of processes."""
    from crawler.executors import dask as distributed
    from crawler.config import SyncConfig

    config = SyncConfig(url="http://127.0.0.1:9/dicom-web", executor="dask", workers=2, worker_threads=6)
    client, _ = distributed._worker_client("pool-size-test", config)
    try:
        adapter = client.session.get_adapter(client.base_url)
        assert adapter._pool_maxsize == 7
    finally:
        distributed._forget("pool-size-test")
