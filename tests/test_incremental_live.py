"""Incremental sync on a live Orthanc whose content changes between runs: each run emits exactly
the expected creates, updates and (with --prune) deletes, and nothing else."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import pydicom
import pytest

from crawler.cli import main
from crawler.state import State
from fixtures import corpus

ZONE = ["--timezone", "UTC"]


class Runner:
    def __init__(self, server, tmp_path: Path, capsys) -> None:
        self.server = server
        self.out = tmp_path / "out"
        self.state = tmp_path / "state.db"
        self.capsys = capsys

    def sync(self, *extra: str, expect: int = 0) -> dict:
        """One sync; its exit code must be ``expect``."""
        code = main(["sync", self.server.dicomweb, "--out", str(self.out), "--state", str(self.state), "--json", *ZONE, *extra])
        out, err = self.capsys.readouterr()
        self.last_err = err
        assert code == expect, err
        summary = json.loads(out)
        summary["_code"] = code
        return summary

    def folder(self, summary: dict) -> dict[str, list]:
        if summary["run_dir"] is None:
            return {}
        folder = Path(summary["run_dir"])
        manifest = json.loads((folder / "manifest.json").read_text())
        content = {}
        for entry in manifest["output"] + manifest["deleted"]:
            content[entry["type"]] = [json.loads(line) for line in (folder / entry["url"]).read_text().splitlines()]
            assert len(content[entry["type"]]) == entry["count"]
        return content


def study_uids(resources: list[dict]) -> set[str]:
    return {r["identifier"][0]["value"][8:] for r in resources}


def _copy_with(path: Path, dest: Path, **changes) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(dest, enforce_file_format=True)
    return dest


@pytest.fixture
def runner(live, tmp_path, capsys):
    return Runner(live, tmp_path, capsys)


def test_added_study_is_the_only_create(runner, live, corpus_files, tmp_path):
    runner.sync()
    source = next(p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == corpus.uid("study", "07"))
    new_uid = corpus.uid("study", "new")
    today = date.today().strftime("%Y%m%d")
    added = _copy_with(source, tmp_path / "new.dcm", StudyInstanceUID=new_uid, SeriesInstanceUID=corpus.uid("series", "new"),
                       SOPInstanceUID=corpus.uid("instance", "new"), StudyDate=today)
    live.upload([added])

    # the default run is incremental (from the last mark minus the lookback): it finds today's study
    summary = runner.sync()
    assert summary["scope"].startswith("since ")
    assert (summary["studies_new"], summary["studies_changed"], summary["studies_gone"]) == (1, 0, 0)
    content = runner.folder(summary)
    assert study_uids(content["ImagingStudy"]) == {new_uid}
    assert set(content) == {"ImagingStudy"}


def test_added_instances_update_the_study(runner, live, corpus_files, tmp_path):
    runner.sync()
    uid = corpus.uid("study", "09")
    source = next(p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == uid)
    live.upload([_copy_with(source, tmp_path / "extra.dcm", SOPInstanceUID=corpus.uid("instance", "extra"), InstanceNumber=99)])

    summary = runner.sync("--full", "--prune")
    assert (summary["studies_new"], summary["studies_changed"], summary["studies_unchanged"], summary["studies_gone"]) == (0, 1, 15, 0)
    (study,) = runner.folder(summary)["ImagingStudy"]
    assert study_uids([study]) == {uid}
    facts = {f.study_uid: f for f in corpus.expected_studies()}
    assert study["numberOfInstances"] == facts[uid].n_instances + 1


def test_changed_study_attribute_updates_the_study(runner, live, corpus_files, tmp_path):
    runner.sync()
    uid = corpus.uid("study", "02")
    files = [p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == uid]
    live.upload([_copy_with(p, tmp_path / f"m{i}.dcm", StudyDescription="MR KNEE RE-READ") for i, p in enumerate(files)])

    summary = runner.sync("--full", "--prune")
    assert (summary["studies_new"], summary["studies_changed"], summary["studies_unchanged"], summary["studies_gone"]) == (0, 1, 15, 0)
    assert set(runner.folder(summary)) == {"ImagingStudy"}
    (study,) = runner.folder(summary)["ImagingStudy"]
    assert study["description"] == "MR KNEE RE-READ"


def test_deleted_study_is_reported_gone_and_not_deleted_without_prune(runner, live):
    first = runner.sync()
    uid = corpus.uid("study", "03")
    orthanc_id = live.rest("POST", "/tools/lookup", data=uid).json()[0]["ID"]
    live.rest("DELETE", f"/studies/{orthanc_id}")

    summary = runner.sync("--full")
    assert summary["studies_gone"] == 1 and summary["resources_deleted"] == 0 and summary["run_dir"] is None
    state = State(runner.state)
    assert state.study(live.dicomweb, uid).status == "gone"
    state.close()

    assert first["studies_new"] == 16


def test_prune_sends_exactly_the_deleted_study(runner, live):
    runner.sync()
    uid = corpus.uid("study", "03")
    orthanc_id = live.rest("POST", "/tools/lookup", data=uid).json()[0]["ID"]
    live.rest("DELETE", f"/studies/{orthanc_id}")

    summary = runner.sync("--full", "--prune")
    assert (summary["studies_gone"], summary["resources_deleted"], summary["resources_written"]) == (1, 1, 0)
    content = runner.folder(summary)
    (bundle,) = content["Bundle"]
    state = State(runner.state)
    resource_id = state.study(live.dicomweb, uid).resource_id
    state.close()
    assert bundle["entry"] == [{"request": {"method": "DELETE", "url": f"ImagingStudy/{resource_id}"}}]

    exported = runner.out.parent / "export"
    assert main(["export", "--state", str(runner.state), "--out", str(exported)]) == 0
    lines = (exported / "ImagingStudy.ndjson").read_text().splitlines()
    assert uid not in study_uids([json.loads(line) for line in lines]) and len(lines) == 15

    again = runner.sync("--full", "--prune")
    assert again["studies_gone"] == 0 and again["run_dir"] is None


def test_a_partial_listing_never_deletes(runner, live):
    runner.sync()
    live.stop()
    summary_code = main(["sync", live.dicomweb, "--state", str(runner.state), "--full", "--prune", "--retries", "0"])
    runner.capsys.readouterr()
    assert summary_code == 3
    state = State(runner.state)
    assert state.counts_by_status() == {"synced": 16}
    state.close()


def test_late_arrival_with_an_old_study_date_is_found_by_the_orthanc_change_feed(runner, live, corpus_files, tmp_path):
    first = runner.sync("--changes", "orthanc")
    assert first["requests"]["changes"] == 1
    source = next(p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == corpus.uid("study", "07"))
    late_uid = corpus.uid("study", "late")
    late = _copy_with(source, tmp_path / "late.dcm", StudyInstanceUID=late_uid, SeriesInstanceUID=corpus.uid("series", "late"),
                      SOPInstanceUID=corpus.uid("instance", "late"), StudyDate="19990101")
    live.upload([late])

    without = Runner(live, tmp_path / "copy", runner.capsys)
    shutil.copytree(runner.state.parent, without.state.parent, dirs_exist_ok=True, ignore=shutil.ignore_patterns("out", "orthanc"))
    assert without.sync()["studies_new"] == 0

    summary = runner.sync("--changes", "orthanc")
    assert (summary["studies_new"], summary["studies_changed"]) == (1, 0)
    assert study_uids(runner.folder(summary)["ImagingStudy"]) == {late_uid}
    again = runner.sync("--changes", "orthanc")
    assert again["studies_listed"] == 0 and again["run_dir"] is None


def _server_holds(fhir) -> dict[tuple[str, str], dict]:
    return {key: resource for key, (_, resource) in fhir.resources.items()}


def test_fhir_server_holds_exactly_what_export_gives_after_creates_updates_and_deletes(runner, live, corpus_files, tmp_path):
    from fixtures.fakefhir import FakeFhir

    with FakeFhir(version="5.0.0") as fhir:
        runner.sync("--fhir-url", fhir.url, "--patients", "--fhir-batch-size", "5")
        uid = corpus.uid("study", "09")
        source = next(p for p in corpus_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == uid)
        live.upload([_copy_with(source, tmp_path / "extra.dcm", SOPInstanceUID=corpus.uid("instance", "extra2"), InstanceNumber=98)])
        gone = corpus.uid("study", "03")
        live.rest("DELETE", f"/studies/{live.rest('POST', '/tools/lookup', data=gone).json()[0]['ID']}")
        summary = runner.sync("--fhir-url", fhir.url, "--patients", "--full", "--prune")
        assert (summary["studies_changed"], summary["studies_gone"], summary["resources_deleted"]) == (1, 1, 1), runner.last_err

        exported = tmp_path / "export"
        assert main(["export", "--state", str(runner.state), "--out", str(exported)]) == 0
        export = {}
        for path in exported.glob("*.ndjson"):
            for line in path.read_text().splitlines():
                resource = json.loads(line)
                export[(resource["resourceType"], resource["id"])] = resource
        held = _server_holds(fhir)
        assert set(held) == set(export)
        for key, resource in export.items():
            stored = {k: v for k, v in held[key].items() if k != "meta"}
            assert stored == resource


def test_fhir_version_mismatch_and_unreachable_fhir_server(runner, live):
    from fixtures.fakefhir import FakeFhir

    with FakeFhir(version="4.0.1") as fhir:
        code = main(["sync", live.dicomweb, "--state", str(runner.state), "--fhir-url", fhir.url])
        err = runner.capsys.readouterr().err
        assert code == 2 and "4.0.1" in err and len(err.strip().splitlines()) == 1
    code = main(["sync", live.dicomweb, "--state", str(runner.state), "--fhir-url", "http://127.0.0.1:9/fhir", "--retries", "0"])
    err = runner.capsys.readouterr().err
    assert code == 3 and "cannot reach FHIR server" in err


def test_a_study_the_fhir_server_refuses_is_failed_and_sent_again_next_run(runner, live):
    from crawler.mapping.ids import study_id
    from fixtures.fakefhir import FakeFhir

    refused_uid = corpus.uid("study", "04")
    with FakeFhir(version="5.0.0", reject={("ImagingStudy", study_id(live.dicomweb, refused_uid))}) as fhir:
        summary = runner.sync("--fhir-url", fhir.url, expect=1)
        assert summary["_code"] == 1 and summary["studies_failed"] == 1 and summary["studies_new"] == 15
        state = State(runner.state)
        row = state.study(live.dicomweb, refused_uid)
        state.close()
        assert row.status == "failed" and "422" in row.last_error
        fhir.reject = set()
        again = runner.sync("--fhir-url", fhir.url, "--full")
        assert again["_code"] == 0 and again["studies_changed"] == 1
        assert ("ImagingStudy", study_id(live.dicomweb, refused_uid)) in fhir.resources
