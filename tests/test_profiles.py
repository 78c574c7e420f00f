"""Server profiles (issue 18): each family's documented QIDO-RS limits, the defaults they give,
detection by URL, and a sync of the simulated PACS in each profile.

The servers are the simulator of fixtures/fakepacs.py (a fake PACS, named as such) with each
family's documented limits (``vendor_behaviour``): no real server on this machine is Google's,
Azure's or AWS's. Limits far beyond a small simulator (Google's offset of 1,000,000, AWS's 10,000
results) are scaled down alike in the simulator and in the profile; Azure's limit of 200 is
tested as documented. Every assertion over the request log first checks that it is not empty.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from crawler import profiles
from crawler.cli import main
from crawler.config import SyncConfig
from crawler.crawl import SERIES_LEVEL_INSTANCES, CrawlOptions, MetadataMode
from crawler.http import RetryPolicy
from crawler.sync import sync
from fixtures.fakepacs import FakePacs, Request, vendor_behaviour

FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05, max_seconds=10)

SCALED: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    # profile name: (the simulator's limits, the profile's scaled alike, studies in the simulator)
    "generic": ({}, {}, 300),
    "orthanc": ({"max_results": 60}, {}, 300),            # LimitFindResults 60: silent, found by the crawl
    "dcm4chee": ({"max_results": 80}, {}, 300),           # Query Max Number of Results 80: a 413 above it
    "google": ({"max_limit": 50, "max_limit_instances": 120, "max_offset": 100},
               {"max_limit_studies": 50, "max_limit_series": 50, "max_limit_instances": 120, "max_offset": 100}, 400),
    "azure": ({}, {}, 450),                               # limit 1-200, as documented
    "aws-healthimaging": ({"max_results": 50}, {"max_results": 50}, 300),
}


def params(request: Request) -> dict[str, str]:
    return dict(parse_qsl(request.query, keep_blank_values=True))


def searches(pacs: FakePacs, kind: str) -> list[dict[str, str]]:
    found = [params(r) for r in pacs.requests if r.kind == kind]
    assert found, f"no {kind} search in the simulator's request log"
    return found


def ground_truth(pacs: FakePacs) -> set[str]:
    return set(pacs.study_uids())


def written_uids(run_dir: str | None) -> set[str]:
    assert run_dir
    lines = (Path(run_dir) / "ImagingStudy.ndjson").read_text().splitlines()
    return {json.loads(line)["identifier"][0]["value"][len("urn:oid:"):] for line in lines}


def sync_in(profile: profiles.Profile, pacs: FakePacs, tmp_path: Path, **given: Any) -> Any:
    made = profiles.settings(profile, **given)
    config = SyncConfig(
        pacs.url, out=tmp_path / "out", state=tmp_path / "state.db", workers=3, retry=FAST_RETRY, timeout=(2.0, 10.0),
        page_size=made.page_size, max_offset=made.max_offset, max_results=made.max_results,
        crawl=CrawlOptions(made.instance_page_size, MetadataMode.NEVER, fallbacks=made.fallbacks),
        server_profile=profile.name, server_profile_how=made.how,
    )
    return sync(config)


@pytest.fixture(params=sorted(SCALED))
def family(request: pytest.FixtureRequest) -> Iterator[tuple[profiles.Profile, FakePacs]]:
    simulated, scaled, n = SCALED[request.param]
    profile = replace(profiles.PROFILES[request.param], **scaled)
    with FakePacs(n_studies=n, seed=18, behaviour=vendor_behaviour(request.param, **simulated)) as pacs:
        yield profile, pacs


def test_a_sync_in_each_profile_finds_every_study_within_the_documented_limits(family, tmp_path):
    profile, pacs = family
    result = sync_in(profile, pacs, tmp_path)
    assert result.exit_code == 0, result.errors
    truth = ground_truth(pacs)
    assert result.figures.studies_new == len(truth) and result.figures.windows_incomplete == 0
    assert written_uids(result.run_dir) == truth
    studies = searches(pacs, "studies")
    instances = searches(pacs, "instances")
    offsets = [int(p.get("offset", 0)) for p in studies]
    assert max(int(p["limit"]) for p in studies) <= (profile.max_limit_studies or profile.page_size)
    assert max(offsets) <= profile.max_offset
    if profile.max_results is not None:
        assert max(offsets) < profile.max_results, "a request past the cap"
    if profile.instance_max_limit is not None:
        assert max(int(p["limit"]) for p in instances) <= profile.instance_max_limit
    if profile.instance_level == "series":
        assert all("/series/" in r.path for r in pacs.requests if r.kind == "instances")
    refused = {status: n for status, n in pacs.statuses.items() if status >= 400}
    if profile.name == "dcm4chee":
        assert set(refused) == {413}, "the dcm4chee profile knows no cap: the 413s are how the crawl learns it"
    else:
        assert refused == {}, f"the {profile.name} profile asked what the server refuses: {refused}"


def test_azure_as_documented_a_page_size_above_200_is_lowered_to_it(tmp_path):
    with FakePacs(n_studies=450, seed=18, behaviour=vendor_behaviour("azure")) as pacs:
        result = sync_in(profiles.PROFILES["azure"], pacs, tmp_path, page_size=500, instance_page_size=1000)
        assert result.exit_code == 0, result.errors
        assert written_uids(result.run_dir) == ground_truth(pacs)
        assert {int(p["limit"]) for p in searches(pacs, "studies")} == {200}
        assert max(int(p["limit"]) for p in searches(pacs, "instances")) == 200
        assert 400 not in pacs.statuses


def test_on_a_simulated_aws_healthimaging_the_profile_spares_what_the_generic_crawl_learns_by_refusals(tmp_path):
    """Without the profile the crawl finds the cap (by listing halves) and the series-level
    instance search (by 404s) itself; the profile knows both before the first request."""
    simulated = vendor_behaviour("aws-healthimaging", max_results=50)
    with FakePacs(n_studies=300, seed=18, behaviour=simulated) as pacs:
        generic = sync_in(profiles.PROFILES["generic"], pacs, tmp_path / "generic", page_size=20)
        assert written_uids(generic.run_dir) == ground_truth(pacs)
        assert pacs.statuses[404] > 0
        generic_requests = len(pacs.requests)
        pacs.reset_counts()
        aws = sync_in(replace(profiles.PROFILES["aws-healthimaging"], max_results=50), pacs, tmp_path / "aws", page_size=20)
        assert aws.exit_code == 0, aws.errors
        assert written_uids(aws.run_dir) == ground_truth(pacs)
        assert pacs.statuses[404] == 0 and 0 < len(pacs.requests) < generic_requests


def test_explicit_options_beat_the_profile(tmp_path, capsys):
    simulated = vendor_behaviour("google", max_limit=50, max_limit_instances=120, max_offset=100)
    with FakePacs(n_studies=200, seed=18, behaviour=simulated) as pacs:
        code = main(["sync", pacs.url, "--server-profile", "google", "--page-size", "10", "--max-offset", "30",
                     "--instance-page-size", "7", "--metadata", "never", "--out", str(tmp_path / "out"),
                     "--state", str(tmp_path / "state.db"), "--json", "-q"])
        summary = json.loads(capsys.readouterr().out)
        assert code == 0
        assert summary["server_profile"] == {"name": "google", "how": "given"}
        assert summary["studies_new"] == len(ground_truth(pacs))
        studies = searches(pacs, "studies")
        assert {int(p["limit"]) for p in studies} == {10}
        assert max(int(p.get("offset", 0)) for p in studies) <= 30
        assert {int(p["limit"]) for p in searches(pacs, "instances")} == {7}


def test_the_profile_fills_what_is_not_given_and_never_asks_above_the_largest_limit():
    google = profiles.PROFILES["google"]
    made = profiles.settings(google, page_size=9000, instance_page_size=80_000, max_offset=500)
    assert (made.page_size, made.instance_page_size, made.max_offset) == (5000, 5000, 500)
    assert made.lowered == ("page size 9000 -> 5000", "instance page size 80000 -> 5000")
    aws = profiles.settings(profiles.PROFILES["aws-healthimaging"])
    assert (aws.page_size, aws.max_results, aws.fallbacks[0][0]) == (100, 10_000, SERIES_LEVEL_INSTANCES)
    assert profiles.settings(profiles.PROFILES["aws-healthimaging"], max_results=500).max_results == 500
    azure = profiles.settings(profiles.PROFILES["azure"])
    assert (azure.page_size, azure.instance_page_size, azure.fallbacks) == (100, 200, ())
    generic = profiles.settings(profiles.PROFILES["generic"])
    assert (generic.page_size, generic.instance_page_size, generic.max_offset, generic.max_results) == (100, 1000, 1_000_000, None)


@pytest.mark.parametrize(("url", "expected"), [
    ("https://healthcare.googleapis.com/v1/projects/p/locations/eu/datasets/d/dicomStores/s/dicomWeb", "google"),
    ("https://contoso-dicom.dicom.azurehealthcareapis.com/v2", "azure"),
    ("https://dicom-medical-imaging.us-east-1.amazonaws.com/datastore/0123456789abcdef0123456789abcdef", "aws-healthimaging"),
    ("https://pacs.example.org/dcm4chee-arc/aets/DCM4CHEE/rs", "dcm4chee"),
    ("http://localhost:8042/dicom-web", None),
    ("https://healthcare.googleapis.com.example.org/dicomWeb", None),
    ("https://dicom.azurehealthcareapis.com.evil.example/v2", None),
    ("https://example.org/dcm4chee-arc/aets/DCM4CHEE/rs/studies/1.2.3", None),
])
def test_the_profile_is_detected_from_the_url_alone(url, expected):
    assert profiles.detect(url) == expected
    profile, how = profiles.choose("auto", url)
    assert (profile.name, how) == ((expected, "detected") if expected else ("generic", "default"))


def test_auto_detection_picks_dcm4chee_from_its_path_and_says_so(tmp_path, capsys):
    with FakePacs(n_studies=40, seed=18, prefix="/dcm4chee-arc/aets/DCM4CHEE/rs",
                  behaviour=vendor_behaviour("dcm4chee", max_results=15)) as pacs:
        code = main(["sync", pacs.url, "--out", str(tmp_path / "out"), "--state", str(tmp_path / "state.db"), "--json", "-q"])
        summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["server_profile"] == {"name": "dcm4chee", "how": "detected"}
    assert summary["studies_new"] == 40


def test_a_given_profile_wins_over_the_detected_one():
    profile, how = profiles.choose("generic", "https://contoso-dicom.dicom.azurehealthcareapis.com/v2")
    assert (profile.name, how) == ("generic", "given")


def test_a_watch_follows_the_change_source_of_its_profile_and_asks_for_one_without():
    assert {name: p.changes for name, p in profiles.PROFILES.items()} == {
        "generic": None, "orthanc": "orthanc", "dcm4chee": "dcm4chee", "google": None, "azure": "azure", "aws-healthimaging": None,
    }


def test_a_watch_without_change_source_names_the_profile_option(tmp_path, capsys):
    code = main(["watch", "http://127.0.0.1:9/dicom-web", "--out", str(tmp_path / "out"), "--state", str(tmp_path / "state.db")])
    assert code == 2
    assert "--server-profile" in capsys.readouterr().err


def test_the_profile_instance_level_holds_beside_the_fallbacks_the_state_remembers(tmp_path):
    """A state that remembers another fallback for the source (WADO-RS metadata missing, learned
    before the server was known) must not take the place of the profile's series-level searches."""
    with FakePacs(n_studies=12, seed=18, metadata_status=404) as pacs:
        state_path = tmp_path / "state.db"
        made = profiles.settings(profiles.PROFILES["generic"])
        first = sync(SyncConfig(pacs.url, out=tmp_path / "out", state=state_path, workers=2, retry=FAST_RETRY,
                                crawl=CrawlOptions(made.instance_page_size, MetadataMode.AUTO)))
        assert first.exit_code == 0 and first.figures.metadata_unavailable is True
        pacs.behaviour = vendor_behaviour("aws-healthimaging", metadata_status=404)
        pacs.add_instances(3, 2)
        pacs.reset_counts()
        aws = profiles.settings(profiles.PROFILES["aws-healthimaging"])
        second = sync(SyncConfig(pacs.url, out=tmp_path / "out", state=state_path, workers=2, retry=FAST_RETRY, since="20000101",
                                 crawl=CrawlOptions(aws.instance_page_size, MetadataMode.AUTO, fallbacks=aws.fallbacks)))
        assert second.exit_code == 0, second.errors
        assert second.figures.studies_changed == 1
        instance_searches = [r for r in pacs.requests if r.kind == "instances"]
        assert instance_searches and all("/series/" in r.path for r in instance_searches)
        assert pacs.statuses[404] == 0


def test_status_says_which_profile_the_last_run_used(tmp_path, capsys):
    with FakePacs(n_studies=10, seed=18, behaviour=vendor_behaviour("azure")) as pacs:
        state = str(tmp_path / "state.db")
        assert main(["sync", pacs.url, "--server-profile", "azure", "--out", str(tmp_path / "out"), "--state", state, "-q"]) == 0
    capsys.readouterr()
    assert main(["status", "--state", state, "--json"]) == 0
    (source,) = json.loads(capsys.readouterr().out)["sources"]
    assert source["server_profile"] == {"name": "azure", "how": "given"}
    assert main(["status", "--state", state]) == 0
    assert "  server profile: azure (given)" in capsys.readouterr().out.splitlines()


def test_an_audit_in_the_aws_healthimaging_profile_reads_instances_series_by_series(tmp_path, capsys):
    with FakePacs(n_studies=30, seed=18, behaviour=vendor_behaviour("aws-healthimaging", max_results=12)) as pacs:
        code = main(["audit", pacs.url, "--report", str(tmp_path / "report"), "--server-profile", "aws-healthimaging",
                     "--max-results", "12", "--json", "-q"])
        summary = json.loads(capsys.readouterr().out)
        instance_searches = [r for r in pacs.requests if r.kind == "instances"]
        assert instance_searches and all("/series/" in r.path for r in instance_searches)
        assert max(int(p.get("offset", 0)) for p in searches(pacs, "studies")) < 12
        assert pacs.statuses[404] == 0
    assert code == 0, summary
    assert summary["server_profile"] == {"name": "aws-healthimaging", "how": "given"}
    assert summary["totals"]["studies"] == 30
    assert summary["totals"]["instances"] == sum(pacs.n_instances(uid) for uid in ground_truth(pacs))


def test_a_watch_without_changes_follows_its_profiles_change_source(tmp_path, monkeypatch):
    watch_module = importlib.import_module("crawler.watch")
    seen = {}

    class Watched:
        exit_code = 0

    def fake_watch(config, options, stop):
        seen["changes"] = config.changes
        return Watched()

    monkeypatch.setattr(watch_module, "watch", fake_watch)
    common = ["--out", str(tmp_path / "out"), "--state", str(tmp_path / "state.db"), "-q"]
    assert main(["watch", "https://contoso-dicom.dicom.azurehealthcareapis.com/v2", *common]) == 0
    assert seen.pop("changes") == "azure"
    assert main(["watch", "http://127.0.0.1:9/dicom-web", "--server-profile", "orthanc", *common]) == 0
    assert seen.pop("changes") == "orthanc"
    assert main(["watch", "https://contoso-dicom.dicom.azurehealthcareapis.com/v2", "--changes", "dcm4chee", *common]) == 0
    assert seen.pop("changes") == "dcm4chee"


def test_orthanc_names_itself_in_no_header_so_auto_gives_it_the_generic_profile(pacs, tmp_path, capsys):
    """The live Orthanc: its DICOMweb answers carry no Server header (nothing to detect it by
    without another request), and the generic profile's values are Orthanc's own."""
    answer = pacs.session.get(f"{pacs.dicomweb}/studies", params={"limit": 1}, timeout=30)
    assert answer.status_code == 200 and answer.json()
    assert "Server" not in answer.headers
    code = main(["sync", pacs.dicomweb, "--out", str(tmp_path / "out"), "--state", str(tmp_path / "state.db"), "--json", "-q",
                 *(["--user", pacs.user, "--password", pacs.password] if pacs.user else [])])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["server_profile"] == {"name": "generic", "how": "default"}
    generic, orthanc = profiles.PROFILES["generic"], profiles.PROFILES["orthanc"]
    assert replace(orthanc, name="generic", changes=None, cap_signal=generic.cap_signal) == generic


def test_a_page_size_above_the_profiles_largest_limit_is_lowered_with_a_warning(tmp_path, capsys):
    code = main(["sync", "http://127.0.0.1:9/dicom-web", "--server-profile", "azure", "--page-size", "500", "--retries", "0",
                 "--out", str(tmp_path / "out"), "--state", str(tmp_path / "state.db")])
    err = capsys.readouterr().err
    assert code == 3
    assert "page size 500 -> 200: the azure server profile's largest limit" in err
