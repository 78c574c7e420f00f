"""``--config sources.toml``: many sources in one file for ``sync`` (one after another, or
``--parallel``) and ``watch`` (all at once), one state, secrets only from the environment.
Two live Orthancs and a simulator (fixtures/fakepacs.py, with basic auth), and for ``watch``
the Azure change-feed simulator (fixtures/fakeazure.py)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crawler.cli import main
from crawler.state import State
from fixtures import orthanc
from fixtures.fakeazure import AzureFeedPacs
from fixtures.fakepacs import FakePacs

SECRET = "s3cret-Pa55"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _json_lines(text: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return {line["source"]: line for line in lines}


@pytest.fixture
def second_orthanc(corpus_files, tmp_path):
    """Another Orthanc, holding part of the corpus."""
    server = orthanc.start(tmp_path / "orthanc2")
    try:
        server.upload(corpus_files[: len(corpus_files) // 2])
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def _studies(state_path: Path, source: str) -> int:
    state = State.open(state_path, read_only=True)
    try:
        return sum(1 for row in state.iter_study_rows(source) if row.status == "synced")
    finally:
        state.close()


def test_three_sources_of_one_file_sync_into_one_state_and_status_shows_each(
        pacs, second_orthanc, corpus_study_uids, tmp_path, capfd, monkeypatch):
    state, out = tmp_path / "state.db", tmp_path / "out"
    monkeypatch.setenv("SIM_PASSWORD", SECRET)
    with FakePacs(n_studies=7, seed=5, auth=("crawler", SECRET)) as sim:
        config = _write(tmp_path / "sources.toml", f"""
[defaults]
state = "{state}"
out = "{out}"
timezone = "UTC"

[sources.main]
url = "{pacs.dicomweb}"
changes = "orthanc"

[sources.second]
url = "{second_orthanc.dicomweb}"
checkpoint-every = 3

[sources.sim]
url = "{sim.url}"
user = "crawler"
password-env = "SIM_PASSWORD"
metadata = "never"
retries = 0
""")
        assert main(["sync", "--config", str(config), "--json"]) == 0
        captured = capfd.readouterr()
        results = _json_lines(captured.out)
        assert set(results) == {"main", "second", "sim"} and all(r["exit_code"] == 0 for r in results.values())
        assert _studies(state, pacs.dicomweb) == len(corpus_study_uids) == results["main"]["studies_new"]
        assert 0 < _studies(state, second_orthanc.dicomweb) < len(corpus_study_uids)
        assert _studies(state, sim.url) == 7
        assert "[sim] " not in captured.err   # one after another, in this process: nothing to tell apart

        # again, each source in a process of its own: nothing new, each line marked with its source
        assert main(["sync", "--config", str(config), "--parallel", "3", "--json"]) == 0
        captured = capfd.readouterr()
        results = _json_lines(captured.out)
        assert set(results) == {"main", "second", "sim"}
        assert [r["studies_new"] for r in results.values()] == [0, 0, 0]
        assert {line.split(" ", 1)[0] for line in captured.err.splitlines() if line} == {"[main]", "[second]", "[sim]"}
        assert SECRET not in captured.err + captured.out

    assert main(["status", "--state", str(state), "--json"]) == 0
    status = {s["source"]: s for s in json.loads(capfd.readouterr().out)["sources"]}
    assert set(status) == {pacs.dicomweb, second_orthanc.dicomweb, sim.url}
    for source in status.values():
        assert source["last_run"]["outcome"] == "ok" and source["lag"]["seconds"] >= 0 and source["lag"]["run"] == source["last_run"]["id"]
    assert status[pacs.dicomweb]["changes_cursor"]["feed"] == "orthanc" and status[sim.url]["changes_cursor"] is None
    assert main(["status", "--state", str(state)]) == 0
    text = capfd.readouterr().out
    assert text.count("  change feed: none (--changes qido") == 2 and text.count("  lag: at most ") == 3
    assert SECRET.encode() not in state.read_bytes()


@pytest.mark.parametrize("line, says", [
    (f'password = "{SECRET}"', "password is a secret and has no place in the file; name the environment variable that holds it with password-env"),
    (f'header = ["Authorization: Bearer {SECRET}"]', "a header that carries credentials has no place in the file"),
    ('password-env = "NOT_SET_ANYWHERE"', "the environment variable NOT_SET_ANYWHERE (password-env) is not set"),
    ('wrokers = 3', "wrokers is not an option of this command"),
    ('workers = "many"', "argument --workers: not an integer: 'many'"),
])
def test_what_a_file_may_not_say_is_exit_2_naming_the_source(line, says, tmp_path, capsys):
    config = _write(tmp_path / "sources.toml", f'[sources.pacs-a]\nurl = "http://127.0.0.1:9/dicom-web"\n{line}\n')
    assert main(["sync", "--config", str(config), "--state", str(tmp_path / "state.db")]) == 2
    err = capsys.readouterr().err
    assert f"the sources file {config}, source pacs-a: {says}" in err
    assert SECRET not in err and not (tmp_path / "state.db").exists()


@pytest.mark.parametrize("argv, says", [
    (["http://127.0.0.1:9/dicom-web"], "with --config the sources file names the URLs"),
    (["--only", "nope"], "has no source nope"),
    (["--metrics-file", "m.prom"], "--metrics-file must differ from source to source"),
])
def test_what_the_command_line_may_not_add_is_exit_2(argv, says, tmp_path, capsys):
    config = _write(tmp_path / "sources.toml", '[sources.a]\nurl = "http://127.0.0.1:9/dicom-web"\n'
                                               '[sources.b]\nurl = "http://127.0.0.1:10/dicom-web"\n')
    assert main(["sync", "--config", str(config), "--state", str(tmp_path / "state.db"), *argv]) == 2
    assert says in capsys.readouterr().err


def test_only_picks_sources_and_the_exit_code_is_the_worst_of_theirs(tmp_path, capsys):
    with FakePacs(n_studies=3, seed=6) as up:
        config = _write(tmp_path / "sources.toml", f"""
[defaults]
retries = 0
metadata = "never"

[sources.up]
url = "{up.url}"

[sources.down]
url = "http://127.0.0.1:9/dicom-web"

[sources.unused]
url = "http://127.0.0.1:10/dicom-web"
""")
        state = tmp_path / "state.db"
        assert main(["sync", "--config", str(config), "--state", str(state), "--only", "up"]) == 0
        assert main(["sync", "--config", str(config), "--state", str(state), "--only", "up", "--only", "down"]) == 3
        err = capsys.readouterr().err
        assert "[down] error: cannot connect to http://127.0.0.1:9/" in err and "127.0.0.1:10" not in err
    assert _studies(state, up.url) == 3


def test_watch_follows_every_source_of_the_file_at_once_and_sigterm_ends_all_with_exit_0(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state.db"
    with AzureFeedPacs(n_studies=3, seed=81) as a, AzureFeedPacs(n_studies=4, seed=82) as b:
        config = _write(tmp_path / "sources.toml", f"""
[defaults]
state = "{state}"
out = "{out}"
changes = "azure"
interval = "1s"
stable-after = "1s"
roll-every = "1s"
metadata = "never"

[sources.a]
url = "{a.url}"

[sources.b]
url = "{b.url}"
""")
        process = subprocess.Popen([sys.executable, "-m", "crawler", "watch", "--config", str(config), "--json"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not (_finished(out) >= 7) and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.1)
            assert process.poll() is None and _finished(out) == 7, process.stderr.read() if process.poll() is not None else ""
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0, stderr
    assert set(_json_lines(stdout)) == {"a", "b"}
    assert _studies(state, a.url) == 3 and _studies(state, b.url) == 4


def _finished(out: Path) -> int:
    """ImagingStudy lines in the finished run folders under ``out``."""
    count = 0
    for manifest in out.glob("*/manifest.json") if out.is_dir() else []:
        for entry in json.loads(manifest.read_text())["output"]:
            if entry["type"] == "ImagingStudy":
                count += entry["count"]
    return count
