"""A real server with a silent cap: Orthanc with LimitFindResults returns N+1 results for any
query that matches more, and offset paging cannot get past them."""

from __future__ import annotations

import json

import pytest

from crawler.cli import main
from fixtures import orthanc


@pytest.fixture(scope="module")
def capped_pacs(corpus_files, tmp_path_factory):
    with orthanc.running(corpus_files, root=tmp_path_factory.mktemp("orthanc-capped"), config={"LimitFindResults": 3}) as server:
        yield server


def test_the_cap_is_real(capped_pacs, corpus_study_uids):
    import requests

    assert len(corpus_study_uids) >= 4 * 4
    assert len(requests.get(f"{capped_pacs.dicomweb}/studies", timeout=30).json()) == 4
    assert requests.get(f"{capped_pacs.dicomweb}/studies?limit=4&offset=4", timeout=30).status_code in (200, 204)


def test_a_silently_capped_orthanc_is_crawled_completely(capped_pacs, corpus_study_uids, tmp_path, capsys):
    state = str(tmp_path / "s.db")
    code = main(["sync", capped_pacs.dicomweb, "--state", state, "--out", str(tmp_path / "out"), "--page-size", "2", "--json", "--timezone", "UTC"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["studies_listed"] == summary["studies_new"] == len(corpus_study_uids)
    assert summary["windows_split"] > 0 and summary["windows_incomplete"] == 0
    lines = (tmp_path / "out").glob("*/ImagingStudy.ndjson").__next__().read_text().splitlines()
    assert {json.loads(line)["identifier"][0]["value"][8:] for line in lines} == corpus_study_uids

    code = main(["sync", capped_pacs.dicomweb, "--state", state, "--full", "--json", "--timezone", "UTC"])
    second = json.loads(capsys.readouterr().out)
    assert code == 0
    assert second["studies_unchanged"] == len(corpus_study_uids) and second["resources_written"] == 0
    assert second["requests"]["total"] == second["requests"]["studies"]
