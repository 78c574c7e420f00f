"""A real instance-level cap: Orthanc with ``LimitFindInstances`` answers at most N+1 instances to
any instance search (offset paging does not get past them), while WADO-RS metadata stays whole.

The promise: no study is ever written with fewer instances than it has. Read through metadata
(the default) every study is complete; read through QIDO alone, the studies past the cap are
named inconsistent, not written and not recorded as synced, and the run exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from crawler.cli import main
from crawler.state import State
from fixtures import corpus, orthanc

LIMIT = 2


@pytest.fixture(scope="module")
def instance_capped_pacs(corpus_files, tmp_path_factory):
    with orthanc.running(corpus_files, root=tmp_path_factory.mktemp("orthanc-instance-cap"), config={"LimitFindInstances": LIMIT}) as server:
        yield server


@pytest.fixture(scope="module")
def facts() -> dict[str, corpus.StudyFacts]:
    return {f.study_uid: f for f in corpus.expected_studies()}


def test_the_instance_cap_is_real(instance_capped_pacs, facts):
    big = [uid for uid, f in facts.items() if f.n_instances > LIMIT + 1]
    assert len(big) >= 3
    for uid in big:
        listed = requests.get(f"{instance_capped_pacs.dicomweb}/studies/{uid}/instances", timeout=30).json()
        assert len(listed) == LIMIT + 1 < facts[uid].n_instances
        assert len(requests.get(f"{instance_capped_pacs.dicomweb}/studies/{uid}/metadata", timeout=30).json()) == facts[uid].n_instances


def sync(capsys, server, tmp_path: Path, *extra: str) -> tuple[int, dict, str]:
    code = main(["sync", server.dicomweb, "--state", str(tmp_path / "s.db"), "--out", str(tmp_path / "out"), "--json", "--timezone", "UTC", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def written(summary: dict) -> dict[str, dict]:
    lines = (Path(summary["run_dir"]) / "ImagingStudy.ndjson").read_text().splitlines()
    return {s["identifier"][0]["value"][8:]: s for s in map(json.loads, lines)}


def test_through_metadata_every_study_is_complete(instance_capped_pacs, facts, corpus_study_uids, tmp_path, capsys):
    code, summary, err = sync(capsys, instance_capped_pacs, tmp_path)
    assert code == 0, err
    studies = written(summary)
    assert set(studies) == corpus_study_uids
    for uid, f in facts.items():
        assert studies[uid]["numberOfInstances"] == f.n_instances == sum(len(s["instance"]) for s in studies[uid]["series"])


def test_through_qido_alone_capped_studies_are_inconsistent_never_short(instance_capped_pacs, facts, corpus_study_uids, tmp_path, capsys):
    code, summary, err = sync(capsys, instance_capped_pacs, tmp_path, "--metadata", "never")
    capped = {uid for uid, f in facts.items() if f.n_instances > LIMIT + 1}
    assert code == 1, err
    assert summary["studies_inconsistent"] == len(capped) and summary["studies_failed"] == 0
    studies = written(summary)
    assert set(studies) == corpus_study_uids - capped
    for uid, study in studies.items():
        assert study["numberOfInstances"] == sum(len(s["instance"]) for s in study["series"])
        if uid in facts:
            assert study["numberOfInstances"] == facts[uid].n_instances
    for uid in capped:
        assert uid in err
    state = State.open(tmp_path / "s.db", read_only=True)
    try:
        statuses = {row.study_uid: row.status for row in state.iter_study_rows()}
    finally:
        state.close()
    assert {uid for uid, status in statuses.items() if status != "synced"} == capped
