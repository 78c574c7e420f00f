"""``qido-crawler watch`` on a live Orthanc whose content changes while it watches (its /changes
log is the change source), and on the Azure change feed simulator: what arrives appears in a
finished run folder, SIGTERM ends it cleanly, kill -9 loses nothing."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from crawler.cli import main
from crawler.config import SyncConfig
from crawler.state import State
from crawler.watch import WatchOptions, WatchResult, watch
from fixtures import corpus, orthanc

FAST = WatchOptions(interval=1, stable_after=2, roll_every=2, reconcile_every=3600)
DEADLINE = 40.0


@pytest.fixture
def live(corpus_files, tmp_path):
    """A fresh Orthanc per test, holding every corpus study but study 07 (uploaded while watched);
    StableAge 2 to match --stable-after 2."""
    server = orthanc.start(tmp_path / "orthanc", config={"OverwriteInstances": True, "StableAge": 2})
    try:
        server.upload([p for p in corpus_files if _study_of(p) != corpus.uid("study", "07")])
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def _study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _copy_with(path: Path, dest: Path, **changes: str) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _until(what: Callable[[], object], timeout: float = DEADLINE, every: float = 0.2) -> object:
    """``what()`` once it is truthy; fails after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        assert time.monotonic() < end, "timed out"
        time.sleep(every)


def finished_studies(out: Path) -> dict[str, Path]:
    """Study Instance UID -> the finished run folder (one with its manifest) whose ImagingStudy
    lines hold it (the latest such folder)."""
    found: dict[str, Path] = {}
    if not out.is_dir():
        return found
    for folder in sorted(out.iterdir()):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        for entry in json.loads(manifest.read_text())["output"]:
            if entry["type"] == "ImagingStudy":
                for line in (folder / entry["url"]).read_text().splitlines():
                    found[json.loads(line)["identifier"][0]["value"].removeprefix("urn:oid:")] = folder
    return found


class Watching:
    """``watch`` in a thread of its own; ``stop()`` ends it and returns its result."""

    def __init__(self, config: SyncConfig, options: WatchOptions = FAST) -> None:
        self.event = threading.Event()
        self.result: WatchResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(config, options), daemon=True)
        self.thread.start()

    def _run(self, config: SyncConfig, options: WatchOptions) -> None:
        try:
            self.result = watch(config, options, self.event)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def stop(self, timeout: float = 10.0) -> WatchResult:
        self.event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "watch did not stop within 10 s"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@pytest.fixture
def watching() -> Iterator[Callable[..., Watching]]:
    started: list[Watching] = []

    def start(config: SyncConfig, options: WatchOptions = FAST) -> Watching:
        started.append(Watching(config, options))
        return started[-1]

    yield start
    for one in started:
        one.event.set()
        one.thread.join(15)


def _config(server: orthanc.Orthanc, tmp_path: Path, **more: object) -> SyncConfig:
    return SyncConfig(server.dicomweb, out=tmp_path / "out", state=tmp_path / "state.db", changes="orthanc", **more)  # type: ignore[arg-type]


def test_a_study_uploaded_while_watching_appears_in_a_finished_run_folder_and_so_does_one_dated_1999(
        live, corpus_files, corpus_study_uids, watching, tmp_path):
    config = _config(live, tmp_path)
    w = watching(config)
    present = corpus_study_uids - {corpus.uid("study", "07")}
    _until(lambda: present <= finished_studies(config.out).keys())       # the first, full listing

    uploaded = time.monotonic()
    live.upload([p for p in corpus_files if _study_of(p) == corpus.uid("study", "07")])
    folder = _until(lambda: finished_studies(config.out).get(corpus.uid("study", "07")))
    latency = time.monotonic() - uploaded
    assert folder not in {finished_studies(config.out)[uid] for uid in present}, "the new study came in a run of its own"

    source = next(p for p in corpus_files if _study_of(p) == corpus.uid("study", "03"))
    late_uid = corpus.uid("study", "watch-1999")
    live.upload([_copy_with(source, tmp_path / "late.dcm", StudyInstanceUID=late_uid, SeriesInstanceUID=corpus.uid("series", "watch-1999"),
                            SOPInstanceUID=corpus.uid("instance", "watch-1999"), StudyDate="19990101")])
    _until(lambda: late_uid in finished_studies(config.out))

    result = w.stop()
    assert result.polls > 0 and result.reconciliations == 0
    assert result.studies_synced == len(corpus_study_uids) + 1
    state = State.open(config.state, read_only=True)
    try:
        assert state.counts_by_status() == {"synced": len(corpus_study_uids) + 1}
    finally:
        state.close()
    print(f"upload -> finished run folder: {latency:.1f} s")


def _watch_process(server: orthanc.Orthanc, tmp_path: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "crawler", "watch", server.dicomweb, "--out", str(tmp_path / "out"), "--state", str(tmp_path / "state.db"),
               "--changes", "orthanc", "--interval", "1", "--stable-after", "2", "--timezone", "UTC", "--json", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)


def _open_folder_holding(out: Path, uid: str) -> Path | None:
    """A run folder not finished yet whose last checkpoint holds ``uid``'s ImagingStudy."""
    for folder in out.iterdir() if out.is_dir() else ():
        checkpoint = folder / "checkpoint.json"
        if (folder / "manifest.json").exists() or not checkpoint.exists():
            continue
        size = json.loads(checkpoint.read_text())["files"].get("ImagingStudy", [0])[0]
        part = folder / "ImagingStudy.ndjson.part"
        if part.exists() and uid in part.read_bytes()[:size].decode():
            return folder
    return None


def _upload_study(server: orthanc.Orthanc, corpus_files: list[Path], number: str) -> None:
    server.upload([p for p in corpus_files if _study_of(p) == corpus.uid("study", number)])


def test_sigterm_finishes_the_open_run_folder_with_its_manifest_and_exits_0(live, corpus_files, corpus_study_uids, tmp_path):
    process = _watch_process(live, tmp_path, "--roll-every", "600")
    try:
        out = tmp_path / "out"
        _until(lambda: corpus_study_uids - {corpus.uid("study", "07")} <= finished_studies(out).keys())
        _upload_study(live, corpus_files, "07")
        folder = _until(lambda: _open_folder_holding(out, corpus.uid("study", "07")))
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
        took = time.monotonic() - asked
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert finished_studies(out)[corpus.uid("study", "07")] == folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [(e["type"], e["count"]) for e in manifest["output"]] == [("ImagingStudy", 1)]
    assert not (folder / "checkpoint.json").exists() and not list(folder.glob("*.part"))
    summary = json.loads(stdout)
    assert summary["studies_synced"] == len(corpus_study_uids) and str(folder) in summary["run_dirs"]
    state = State.open(tmp_path / "state.db")           # the lock is released: a writer may open it
    state.close()
    print(f"SIGTERM -> exit 0 in {took:.1f} s")


def _export(state: Path, out: Path) -> dict[str, bytes]:
    assert main(["export", "--state", str(state), "--out", str(out), "-q"]) == 0
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.ndjson"))}


def test_kill_9_during_a_run_and_a_restart_give_the_export_of_a_clean_sync(live, corpus_files, corpus_study_uids, tmp_path):
    out = tmp_path / "out"
    process = _watch_process(live, tmp_path, "--roll-every", "600")
    try:
        _until(lambda: corpus_study_uids - {corpus.uid("study", "07")} <= finished_studies(out).keys())
        _upload_study(live, corpus_files, "07")
        folder = _until(lambda: _open_folder_holding(out, corpus.uid("study", "07")))
        source = next(p for p in corpus_files if _study_of(p) == corpus.uid("study", "03"))
        late_uid = corpus.uid("study", "watch-1999")
        live.upload([_copy_with(source, tmp_path / "late.dcm", StudyInstanceUID=late_uid, SeriesInstanceUID=corpus.uid("series", "watch-1999"),
                                SOPInstanceUID=corpus.uid("instance", "watch-1999"), StudyDate="19990101")])
        process.kill()                                   # SIGKILL: no checkpoint, no manifest, the lock left to the kernel
        process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert not (folder / "manifest.json").exists()

    again = _watch_process(live, tmp_path, "--roll-every", "1")
    try:
        _until(lambda: late_uid in finished_studies(out))
        again.send_signal(signal.SIGTERM)
        _, stderr = again.communicate(timeout=10)
    finally:
        if again.poll() is None:
            again.kill()
            again.communicate()
    assert again.returncode == 0, stderr
    assert corpus.uid("study", "07") in finished_studies(out)     # the interrupted folder completed at its checkpoint
    assert not [f for f in out.iterdir() if not (f / "manifest.json").exists()]

    clean = tmp_path / "clean"
    assert main(["sync", live.dicomweb, "--state", str(clean / "state.db"), "--timezone", "UTC", "-q"]) == 0
    watched = _export(tmp_path / "state.db", tmp_path / "export-watched")
    assert watched == _export(clean / "state.db", tmp_path / "export-clean")
    assert late_uid.encode() in watched["ImagingStudy.ndjson"]


def _azure_config(pacs, tmp_path: Path, **more: object) -> SyncConfig:
    from crawler.crawl import CrawlOptions, MetadataMode

    settings: dict = {"out": tmp_path / "out", "state": tmp_path / "state.db", "changes": "azure", "retries": 0,
                      "crawl": CrawlOptions(1000, MetadataMode.NEVER, 1000), **more}
    return SyncConfig(pacs.url, **settings)


def _statuses(state_path: Path) -> dict[str, str]:
    state = State.open(state_path, read_only=True)
    try:
        return {row.study_uid: row.status for row in state.iter_study_rows()}
    finally:
        state.close()


def _deleted_in_finished_folders(out: Path) -> list[dict]:
    deleted = []
    for folder in sorted(out.iterdir()) if out.is_dir() else ():
        if (folder / "manifest.json").exists() and (folder / "deleted.ndjson").exists():
            deleted += [json.loads(line) for line in (folder / "deleted.ndjson").read_text().splitlines()]
    return deleted


def test_a_deletion_in_the_azure_feed_is_gone_at_once_and_deleted_with_prune(tmp_path, watching):
    from fixtures.fakeazure import AzureFeedPacs

    with AzureFeedPacs(n_studies=6, seed=71, hidden=(4,)) as pacs:
        config = _azure_config(pacs, tmp_path, prune=True)
        w = watching(config)
        _until(lambda: len(finished_studies(config.out)) == 5)
        pacs.arrive(4)
        pacs.delete_study(2)
        _until(lambda: _deleted_in_finished_folders(config.out))
        _until(lambda: pacs.study_uid(4) in finished_studies(config.out))
        result = w.stop()
    (deletion,) = _deleted_in_finished_folders(config.out)
    statuses = _statuses(config.state)
    assert statuses[pacs.study_uid(2)] == "gone" and statuses[pacs.study_uid(4)] == "synced"
    assert deletion["entry"][0]["request"]["method"] == "DELETE"
    assert (result.studies_gone, result.reconciliations) == (1, 0)


def test_a_source_that_fails_while_watched_is_tried_again_with_backoff_and_logged_once(tmp_path, watching, caplog):
    from fixtures.fakeazure import AzureFeedPacs
    from fixtures.fakepacs import Behaviour

    crawler_log = logging.getLogger("crawler")       # the CLI, run in-process by other tests, stops it propagating
    crawler_log.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="crawler")
    try:
        with AzureFeedPacs(n_studies=4, seed=72, hidden=(3,)) as pacs:
            config = _azure_config(pacs, tmp_path)
            w = watching(config, WatchOptions(interval=0.5, stable_after=0, roll_every=1, reconcile_every=3600, max_backoff=1))
            _until(lambda: len(finished_studies(config.out)) == 3)
            pacs.behaviour = Behaviour(fail_every=1, fail_status=503)
            pacs.reset_counts()
            _until(lambda: pacs.statuses[503] >= 3)                       # three polls refused
            pacs.behaviour = Behaviour()
            pacs.arrive(3)
            _until(lambda: pacs.study_uid(3) in finished_studies(config.out))
            result = w.stop()
    finally:
        crawler_log.removeHandler(caplog.handler)
    assert result.poll_errors >= 2
    logged = {id(r): r for r in caplog.records if r.getMessage().startswith("watch:")}   # a record may reach caplog twice
    assert len(logged) == 1, [r.getMessage() for r in logged.values()]
    assert _statuses(config.state)[pacs.study_uid(3)] == "synced"


def _cursor(state_path: Path, source: str, feed: str) -> str | None:
    state = State.open(state_path, read_only=True)
    try:
        return state.change_cursor(source, feed)
    finally:
        state.close()


def test_a_study_not_quiet_yet_waits_and_the_cursor_does_not_pass_its_changes(live, corpus_files, corpus_study_uids, watching, tmp_path):
    config = _config(live, tmp_path)
    patient = watching(config, WatchOptions(interval=0.5, stable_after=3600, roll_every=1, reconcile_every=3600))
    _until(lambda: corpus_study_uids - {corpus.uid("study", "07")} <= finished_studies(config.out).keys())
    before = _until(lambda: _cursor(config.state, live.dicomweb, "orthanc"))
    _upload_study(live, corpus_files, "07")
    last = live.rest("GET", "/changes?last").json()["Last"]
    time.sleep(3)                                                       # several polls: the study is not an hour old
    result = patient.stop()
    assert result.polls >= 3
    assert corpus.uid("study", "07") not in _statuses(config.state)
    assert _cursor(config.state, live.dicomweb, "orthanc") == before and int(str(before)) < last

    eager = watching(config, WatchOptions(interval=0.5, stable_after=0, roll_every=1, reconcile_every=3600))
    _until(lambda: corpus.uid("study", "07") in finished_studies(config.out))
    eager.stop()
    assert int(str(_cursor(config.state, live.dicomweb, "orthanc"))) >= last


def test_a_study_that_changes_again_within_a_run_is_crawled_again_in_it(live, corpus_files, corpus_study_uids, watching, tmp_path):
    config = _config(live, tmp_path)
    w = watching(config, WatchOptions(interval=0.5, stable_after=2, roll_every=600, reconcile_every=3600))
    _until(lambda: corpus_study_uids - {corpus.uid("study", "07")} <= finished_studies(config.out).keys())
    _upload_study(live, corpus_files, "07")
    folder = _until(lambda: _open_folder_holding(config.out, corpus.uid("study", "07")))
    source = next(p for p in corpus_files if _study_of(p) == corpus.uid("study", "07"))
    live.upload([_copy_with(source, tmp_path / "more.dcm", SeriesInstanceUID=corpus.uid("series", "watch-more"),
                            SOPInstanceUID=corpus.uid("instance", "watch-more"), SeriesNumber="77")])

    def twice() -> bool:
        part = Path(folder) / "ImagingStudy.ndjson.part"
        checkpoint = json.loads((Path(folder) / "checkpoint.json").read_text())
        return part.read_bytes()[: checkpoint["files"]["ImagingStudy"][0]].count(corpus.uid("study", "07").encode()) == 2

    _until(twice)
    w.stop()
    lines = [json.loads(line) for line in (Path(folder) / "ImagingStudy.ndjson").read_text().splitlines()]
    assert [len(study["series"]) for study in lines] == [len(lines[0]["series"]), len(lines[0]["series"]) + 1]


def test_a_deletion_orthanc_does_not_log_is_found_by_the_reconciliation(live, corpus_study_uids, watching, tmp_path):
    config = _config(live, tmp_path, prune=True)
    w = watching(config, WatchOptions(interval=0.5, stable_after=0, roll_every=1, reconcile_every=5))
    _until(lambda: corpus_study_uids - {corpus.uid("study", "07")} <= finished_studies(config.out).keys())
    doomed = corpus.uid("study", "03")
    (found,) = live.rest("POST", "/tools/lookup", data=doomed).json()
    live.rest("DELETE", found["Path"])
    _until(lambda: _statuses(config.state).get(doomed) == "gone")
    _until(lambda: _deleted_in_finished_folders(config.out))
    result = w.stop()
    assert result.reconciliations >= 1 and result.reconciled >= 1 and result.studies_gone == 1
    assert [d["entry"][0]["request"]["method"] for d in _deleted_in_finished_folders(config.out)] == ["DELETE"]


def test_a_reset_orthanc_log_is_survived_by_one_complete_listing(live, corpus_files, corpus_study_uids, watching, tmp_path):
    """DELETE /changes on this Orthanc keeps its sequence numbers (nothing to do); a log whose
    Last is below the cursor (a database recreated) makes the watch list everything once."""
    config = _config(live, tmp_path)
    w = watching(config, WatchOptions(interval=0.5, stable_after=0, roll_every=1, reconcile_every=3600))
    _until(lambda: corpus_study_uids - {corpus.uid("study", "07")} <= finished_studies(config.out).keys())
    live.rest("DELETE", "/changes")
    time.sleep(1.5)                                                     # polls see the emptied log
    assert w.stop().reconciliations == 0
    state = State(config.state)
    state.set_change_cursor(live.dicomweb, "orthanc", "999999")         # ahead of the log: as after a reset
    state.commit()
    state.close()

    w = watching(config, WatchOptions(interval=0.5, stable_after=0, roll_every=1, reconcile_every=3600))
    _upload_study(live, corpus_files, "07")
    _until(lambda: corpus.uid("study", "07") in finished_studies(config.out))
    result = w.stop()
    assert result.reconciliations == 1
    assert int(str(_cursor(config.state, live.dicomweb, "orthanc"))) < 999999
    assert _statuses(config.state) == dict.fromkeys(corpus_study_uids, "synced")


def _metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``, from Prometheus text."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            sample, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                return float(value)
    return None


def test_metrics_show_lag_cursor_studies_requests_and_errors_and_an_idle_watch_asks_once_per_interval(tmp_path, watching):
    import requests

    from fixtures.fakeazure import AzureFeedPacs
    from fixtures.fakepacs import Behaviour

    port = orthanc.free_port()
    with AzureFeedPacs(n_studies=5, seed=73, hidden=(4,)) as pacs:
        config = _azure_config(pacs, tmp_path)
        w = watching(config, WatchOptions(interval=0.5, stable_after=0, roll_every=1, reconcile_every=3600, max_backoff=1, metrics_port=port))
        _until(lambda: len(finished_studies(config.out)) == 4)
        pacs.arrive(4)
        _until(lambda: pacs.study_uid(4) in finished_studies(config.out))

        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert _metric(text, "qido_crawler_watch_studies_total", outcome="synced", feed="azure") == 5
        assert _metric(text, "qido_crawler_watch_studies_total", outcome="failed") == 0
        assert _metric(text, "qido_crawler_watch_cursor") == float(_cursor(config.state, pacs.url, "azure").rpartition("|")[2])
        assert _metric(text, "qido_crawler_watch_lag_seconds") > 0          # the simulator's clock is days behind
        assert _metric(text, "qido_crawler_watch_requests_total", kind="changes") >= 2
        assert _metric(text, "qido_crawler_watch_last_poll_timestamp_seconds") > time.time() - 30
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200

        pacs.reset_counts()
        time.sleep(3)                                                    # idle: nothing changes
        assert sum(pacs.counts().values()) <= 3 / 0.5 + 1

        pacs.behaviour = Behaviour(fail_every=1, fail_status=503)
        _until(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 503)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert _metric(text, "qido_crawler_watch_poll_errors_total") >= 1
        pacs.behaviour = Behaviour()
        _until(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200)
        w.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_without_an_output_folder_the_changes_go_to_the_fhir_server_poll_by_poll(tmp_path, watching):
    from fixtures.fakeazure import AzureFeedPacs
    from fixtures.fakefhir import FakeFhir

    def studies(fhir: FakeFhir) -> set[str]:
        return {resource["identifier"][0]["value"].removeprefix("urn:oid:")
                for (kind, _), (_, resource) in list(fhir.resources.items()) if kind == "ImagingStudy"}

    with FakeFhir(version="5.0.0") as fhir, AzureFeedPacs(n_studies=5, seed=74, hidden=(4,)) as pacs:
        config = _azure_config(pacs, tmp_path, prune=True, out=None, fhir_url=fhir.url)
        w = watching(config)
        _until(lambda: len(studies(fhir)) == 4)
        pacs.arrive(4)
        pacs.delete_study(1)
        _until(lambda: studies(fhir) == {pacs.study_uid(i) for i in (0, 2, 3, 4)})
        result = w.stop()
    assert not (tmp_path / "out").exists() and result.run_dirs == []
    assert (result.studies_synced, result.studies_gone) == (5, 1)


def test_a_stop_during_the_first_listing_ends_it_at_its_last_checkpoint_within_seconds(tmp_path, watching):
    from fixtures.fakeazure import AzureFeedPacs

    with AzureFeedPacs(n_studies=120, seed=75, latency=0.02) as pacs:        # about 10 s of crawling at 4 workers
        config = _azure_config(pacs, tmp_path, checkpoint_every=10)
        w = watching(config)
        out = tmp_path / "out"
        _until(lambda: any((f / "checkpoint.json").exists() for f in out.iterdir()) if out.is_dir() else False)
        asked = time.monotonic()
        result = w.stop()
        took = time.monotonic() - asked
    assert took < 10
    (folder,) = out.iterdir()
    assert (folder / "manifest.json").exists() and not list(folder.glob("*.part"))
    written = len(finished_studies(out))
    assert 10 <= written < 120 and set(_statuses(config.state).values()) == {"synced"} and len(_statuses(config.state)) == written
    assert result.runs == 1 and _cursor(config.state, pacs.url, "azure") is None       # not a complete listing: no cursor
    print(f"stop during the first listing: returned in {took:.1f} s with {written} studies at the last checkpoint")


def test_a_patient_name_corrected_on_an_old_study_reaches_a_finished_run_folder(live, corpus_files, corpus_study_uids, watching, tmp_path):
    """The listing entry of the study may look the same; the change source said it changed, so
    it is crawled, and its ImagingStudy (subject.display) written again."""
    config = _config(live, tmp_path)
    w = watching(config)
    _until(lambda: corpus_study_uids - {corpus.uid("study", "07")} <= finished_studies(config.out).keys())
    first = set(config.out.iterdir())
    files = [p for p in corpus_files if _study_of(p) == corpus.uid("study", "05")]
    live.upload([_copy_with(p, tmp_path / f"renamed-{i}.dcm", PatientName="WATCH^RENAMED") for i, p in enumerate(files)])

    def renamed() -> bool:
        for folder in set(config.out.iterdir()) - first:
            if (folder / "manifest.json").exists() and (folder / "ImagingStudy.ndjson").exists():
                for line in (folder / "ImagingStudy.ndjson").read_text().splitlines():
                    study = json.loads(line)
                    if study["identifier"][0]["value"].endswith(corpus.uid("study", "05")):
                        return "RENAMED" in study["subject"].get("display", "")
        return False

    _until(renamed)
    w.stop()


def test_a_stop_during_a_long_poll_keeps_what_was_crawled_and_not_the_cursor(tmp_path, watching):
    from fixtures.fakeazure import AzureFeedPacs

    late = tuple(range(10, 120))
    with AzureFeedPacs(n_studies=120, seed=76, hidden=late, latency=0.05) as pacs:
        config = _azure_config(pacs, tmp_path, checkpoint_every=10)
        w = watching(config, WatchOptions(interval=0.5, stable_after=0, roll_every=600, reconcile_every=3600))
        _until(lambda: len(finished_studies(config.out)) == 10)
        before = _cursor(config.state, pacs.url, "azure")
        for index in late:
            pacs.arrive(index)
        _until(lambda: any(_open_folder_holding(config.out, pacs.study_uid(i)) for i in late))
        asked = time.monotonic()
        w.stop()
        took = time.monotonic() - asked
        written = finished_studies(config.out)
        assert took < 5 and 10 < len(written) < 120
        assert _cursor(config.state, pacs.url, "azure") == before            # the poll did not end: its changes are read again
        assert sorted(_statuses(config.state)) == sorted(written)

        w = watching(config, WatchOptions(interval=0.5, stable_after=0, roll_every=1, reconcile_every=3600))
        _until(lambda: len(finished_studies(config.out)) == 120)
        w.stop()
    assert _cursor(config.state, pacs.url, "azure") != before
    print(f"stop during a poll of 110 studies: returned in {took:.1f} s with {len(written)} studies recorded")


def test_roll_studies_finishes_a_run_folder_once_it_holds_that_many_studies(tmp_path, watching):
    from fixtures.fakeazure import AzureFeedPacs

    with AzureFeedPacs(n_studies=5, seed=77, hidden=(3, 4)) as pacs:
        config = _azure_config(pacs, tmp_path)
        w = watching(config, WatchOptions(interval=0.5, stable_after=0, roll_every=600, roll_studies=1, reconcile_every=3600))
        _until(lambda: len(finished_studies(config.out)) == 3)
        pacs.arrive(3)
        first = _until(lambda: finished_studies(config.out).get(pacs.study_uid(3)))
        pacs.arrive(4)
        second = _until(lambda: finished_studies(config.out).get(pacs.study_uid(4)))
        w.stop()
    assert first != second


def test_start_up_errors_exit_as_sync_does(tmp_path, capsys):
    nowhere = f"http://127.0.0.1:{orthanc.free_port()}/dicom-web"
    state = str(tmp_path / "state.db")
    base = ["watch", "--state", state, "--changes", "orthanc", "--retries", "0", "--interval", "1"]
    assert main([*base, nowhere]) == 2                                          # no output
    assert "watch needs an output: an output folder, a FHIR server or tables" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "out"), nowhere]) == 3        # the source cannot be reached
    assert capsys.readouterr().err.count("\n") == 1
    held = State(state, lock=True)
    try:
        assert main([*base, "--out", str(tmp_path / "out"), nowhere]) == 2    # another run holds the state
    finally:
        held.close()
    assert "another run" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                  # the handlers are put back


def test_a_study_named_that_cannot_be_asked_for_keeps_the_cursor_until_it_can(tmp_path, watching):
    from fixtures.fakeazure import AzureFeedPacs
    from fixtures.fakepacs import Behaviour

    with AzureFeedPacs(n_studies=4, seed=78, hidden=(3,)) as pacs:
        config = _azure_config(pacs, tmp_path)
        w = watching(config, WatchOptions(interval=0.5, stable_after=0, roll_every=1, reconcile_every=3600, max_backoff=1))
        _until(lambda: len(finished_studies(config.out)) == 3)
        before = _cursor(config.state, pacs.url, "azure")
        pacs.behaviour = Behaviour(fail_listing_from_offset=0, fail_status=503)     # every study search refused
        pacs.reset_counts()
        pacs.arrive(3)
        _until(lambda: pacs.statuses[503] >= 3)
        assert _cursor(config.state, pacs.url, "azure") == before
        assert pacs.study_uid(3) not in _statuses(config.state)
        pacs.behaviour = Behaviour()
        _until(lambda: pacs.study_uid(3) in finished_studies(config.out))
        result = w.stop()
    assert _cursor(config.state, pacs.url, "azure") != before and result.poll_errors >= 3


def test_the_backoff_starts_at_one_interval_doubles_and_is_capped():
    from crawler.watch import backoff

    assert [backoff(n, 10, 300) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]
    assert backoff(10_000, 0.5, 60) == 60


def _finished_since(out: Path, before: set[Path]) -> dict[str, list[dict]]:
    """The resources of the run folders finished that are not in ``before``, by type, in the
    order of the folders (oldest first)."""
    found: dict[str, list[dict]] = {}
    for folder in sorted(set(out.iterdir()) - before):
        if not (folder / "manifest.json").exists():
            continue
        for entry in json.loads((folder / "manifest.json").read_text())["output"]:
            found.setdefault(entry["type"], []).extend(json.loads(line) for line in (folder / entry["url"]).read_text().splitlines())
    return found


def test_ten_studies_uploaded_at_random_moments_each_reach_a_finished_run_folder(live, corpus_files, corpus_study_uids, watching, tmp_path):
    """The acceptance case of the watch on the live Orthanc: among ten uploads at random moments
    (seeded, some back to back), a study dated 1999 (a late arrival no StudyDate window catches),
    a new series in an old study, and a corrected patient name on an old study (Orthanc names no
    new study for either: its NewSeries change and its StableStudy change do)."""
    import random

    config = _config(live, tmp_path, patients=True)
    w = watching(config)
    _until(lambda: corpus_study_uids - {corpus.uid("study", "07")} <= finished_studies(config.out).keys())
    before = set(config.out.iterdir())
    old = {uid: study for study in _finished_since(config.out, set())["ImagingStudy"]
           for uid in [study["identifier"][0]["value"].removeprefix("urn:oid:")]}

    def files_of(number: str) -> list[Path]:
        return [p for p in corpus_files if _study_of(p) == corpus.uid("study", number)]

    renamed, grown = corpus.uid("study", "01"), corpus.uid("study", "09")   # Quarkwood's other study, 07, is not on the server
    new_series = corpus.uid("series", "watch-accept-more")
    late = corpus.uid("study", "watch-accept-1999")
    fresh = [corpus.uid("study", f"watch-accept-{i}") for i in range(7)]
    uploads: list[list[Path]] = [
        [_copy_with(files_of("03")[0], tmp_path / "late.dcm", StudyInstanceUID=late, SeriesInstanceUID=corpus.uid("series", "watch-accept-1999"),
                    SOPInstanceUID=corpus.uid("instance", "watch-accept-1999"), StudyDate="19990101")],
        [_copy_with(files_of("09")[0], tmp_path / "more.dcm", SeriesInstanceUID=new_series,
                    SOPInstanceUID=corpus.uid("instance", "watch-accept-more"), SeriesNumber="88")],
        [_copy_with(p, tmp_path / f"renamed-{i}.dcm", PatientName="WATCH^ACCEPTED") for i, p in enumerate(files_of("01"))],
        *([_copy_with(files_of(source)[0], tmp_path / f"fresh-{i}.dcm", StudyInstanceUID=uid, SeriesInstanceUID=corpus.uid("series", f"watch-accept-{i}"),
                      SOPInstanceUID=corpus.uid("instance", f"watch-accept-{i}"), PatientID=f"WATCH-{i}", PatientName=f"WATCH^FRESH{i}")]
          for i, (uid, source) in enumerate(zip(fresh, ["02", "03", "04", "06", "08", "10", "11"]))),
    ]
    rng = random.Random(16)
    rng.shuffle(uploads)
    moments = sorted(rng.uniform(0, 8) for _ in uploads)
    moments = [moments[i - 1] if i and rng.random() < 1 / 3 else m for i, m in enumerate(moments)]   # some back to back
    start = time.monotonic()
    for moment, files in zip(moments, uploads):
        time.sleep(max(0.0, start + moment - time.monotonic()))
        live.upload(files)

    def latest() -> dict[str, dict]:
        return {study["identifier"][0]["value"].removeprefix("urn:oid:"): study
                for study in _finished_since(config.out, before).get("ImagingStudy", [])}

    def arrived() -> bool:
        studies = latest()
        return (set(fresh) | {late} <= studies.keys()
                and new_series in {s["uid"] for s in studies.get(grown, {}).get("series", [])}
                and "ACCEPTED" in studies.get(renamed, {}).get("subject", {}).get("display", ""))

    _until(arrived)
    result = w.stop()
    studies = latest()
    assert studies[late]["started"].startswith("1999")
    assert len(studies[grown]["series"]) == len(old[grown]["series"]) + 1
    subject = studies[renamed]["subject"]
    (patient,) = [p for p in _finished_since(config.out, before).get("Patient", []) if f"Patient/{p['id']}" == subject["reference"]]
    assert "ACCEPTED" in json.dumps(patient["name"]) and "ACCEPTED" not in json.dumps(old[renamed]["subject"])
    assert result.studies_failed == 0 and result.reconciliations == 0
    assert _statuses(config.state) == dict.fromkeys(corpus_study_uids - {corpus.uid("study", "07")} | set(fresh) | {late}, "synced")


def test_exit_after_finishes_the_open_run_folder_and_stops_by_itself(tmp_path, watching):
    """For a supervisor that starts the watch again: after --exit-after, the watch ends as a SIGTERM
    ends it (the open run folder finished with its manifest, exit 0)."""
    from fixtures.fakeazure import AzureFeedPacs

    with AzureFeedPacs(n_studies=3, seed=72) as pacs:
        config = _azure_config(pacs, tmp_path)
        started = time.monotonic()
        w = watching(config, WatchOptions(interval=0.2, stable_after=0.0, roll_every=3600.0, exit_after=2.0))
        w.thread.join(15)
        took = time.monotonic() - started
        assert not w.thread.is_alive(), "the watch did not stop by itself"
    assert w.error is None and w.result is not None
    assert 2.0 <= took < 8.0, took
    assert w.result.polls >= 3 and w.result.poll_errors == 0
    assert len(finished_studies(config.out)) == 3   # the open run folder was finished, manifest and all
    assert all((folder / "manifest.json").exists() for folder in config.out.iterdir())


def test_exit_after_must_be_a_positive_duration(capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        main(["watch", "http://127.0.0.1:9/dicom-web", "--changes", "azure", "--out", str(tmp_path / "out"), "--exit-after", "0"])
    assert exited.value.code == 2
    assert "argument --exit-after: must be a duration > 0" in capsys.readouterr().err
    with pytest.raises(Exception, match="exit after must be a number of seconds > 0"):
        WatchOptions(exit_after=-1.0)
