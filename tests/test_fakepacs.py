"""The QIDO-RS simulator (fixtures/fakepacs.py) does what the fault-injection tests rely on."""

from __future__ import annotations

import time
from datetime import date, timedelta

import pytest
import requests

from crawler.http import RetryPolicy
from crawler.qido import QidoClient
from fixtures.fakepacs import FakePacs, Request

UID, DATE, TIME = "0020000D", "00080020", "00080030"
N_INST, N_SERIES_INST = "00201208", "00201209"


def uids(items):
    return [item[UID]["Value"][0] for item in items]


def get(pacs, path, **params):
    return requests.get(f"{pacs.url}/{path}", params=params, timeout=5)


def walk(pacs, path="studies", page=25, **params):
    """Offset paging as a client does it: advance by what came back, stop on a short page."""
    out, offset = [], 0
    while True:
        r = get(pacs, path, limit=page, offset=offset, **params)
        items = r.json() if r.status_code == 200 else []
        out += items
        if len(items) < page:
            return out
        offset += len(items)


def test_paging_covers_every_study_once_and_orders_stably():
    with FakePacs(250, seed=1, no_date_fraction=0.1) as pacs:
        listed = uids(walk(pacs, page=40))
        assert listed == list(pacs.study_uids())
        assert len(set(listed)) == 250
        assert uids(get(pacs, "studies").json()) == listed
    with FakePacs(250, seed=1, no_date_fraction=0.1, newest_first=True) as pacs:
        assert uids(walk(pacs, page=40)) == listed[::-1]


def test_uids_are_deterministic_and_decode():
    a, b = FakePacs(10, seed=1), FakePacs(10, seed=2)
    assert a.study_uid(3) == FakePacs(10, seed=1).study_uid(3) != b.study_uid(3)
    assert a.study_index(a.study_uid(7)) == 7
    assert a.study_uid(3).startswith("2.25.") and len(a.study_uid(3)) <= 64
    with pytest.raises(KeyError):
        a.study_index(b.study_uid(7))


def test_date_filtering_is_exact():
    pacs = FakePacs(600, seed=2, date_from="20200101", date_to="20201231", no_date_fraction=0.05)
    days = [pacs.study_date(i) for i in range(600)]
    assert days == sorted(days, key=lambda d: d or "99999999") and days[-1] is None and days[0] == "20200101"
    with pacs:
        for value, lo, hi in [
            ("20200315", "20200315", "20200315"),
            ("20200301-20200331", "20200301", "20200331"),
            ("20201201-", "20201201", None),
            ("-20200110", None, "20200110"),
            ("19990101-20000101", "19990101", "20000101"),
        ]:
            expected = [pacs.study_uid(i) for i, d in enumerate(days) if d and (lo or "") <= d <= (hi or "9")]
            assert uids(walk(pacs, StudyDate=value)) == expected, value
            assert list(pacs.study_uids(lo, hi)) == expected
        assert len(expected) == 0 and pacs.n_matching("20200301", "20200331") > 40
        assert uids(get(pacs, "studies", **{DATE: "20200301-20200331"}).json()) == uids(get(pacs, "studies", StudyDate="20200301-20200331").json())
        assert get(pacs, "studies", StudyDate="2020-03-01").status_code == 400


def test_time_and_uid_matching():
    with FakePacs(2000, seed=3, date_from="20240101", date_to="20240110") as pacs:
        day = get(pacs, "studies", StudyDate="20240105").json()
        assert len(day) == 200
        morning = get(pacs, "studies", StudyDate="20240105", StudyTime="100000-115959").json()
        assert morning and all("100000" <= item[TIME]["Value"][0] <= "115959" for item in morning)
        assert uids(morning) == [u for u, item in zip(uids(day), day) if "100000" <= item[TIME]["Value"][0] <= "115959"]
        assert get(pacs, "studies", StudyDate="20240105", StudyTime="10-11").json() == morning
        target = pacs.study_uid(1234)
        assert uids(get(pacs, "studies", StudyInstanceUID=target).json()) == [target]
        assert uids(get(pacs, "studies", **{UID: f"{target},{pacs.study_uid(5)}"}).json()) == [pacs.study_uid(5), target]
        assert get(pacs, "studies", StudyInstanceUID="1.2.3").json() == []


def test_time_ranges_over_many_days_with_deletions_newest_first():
    with FakePacs(300, seed=4, date_from="20240101", date_to="20240110", newest_first=True) as pacs:
        for i in (0, 17, 18, 150, 299):
            pacs.delete_study(i)
        everything = get(pacs, "studies").json()
        assert len(everything) == 295 and uids(everything) == list(pacs.study_uids())[::-1]
        expected = [u for u, item in zip(uids(everything), everything) if "060000" <= item[TIME]["Value"][0] <= "135959"]
        assert 50 < len(expected) < 250
        assert uids(walk(pacs, page=7, StudyTime="06-1359")) == expected
        in_days = [u for u, item in zip(uids(everything), everything) if "20240103" <= item[DATE]["Value"][0] <= "20240105"]
        assert uids(walk(pacs, page=7, StudyDate="20240103-20240105", StudyTime="0600-135959")) == [u for u in expected if u in in_days]


def test_includefield_adds_to_the_default_set():
    with FakePacs(5) as pacs:
        plain = get(pacs, "studies").json()[0]
        assert "00081030" not in plain and {UID, DATE, N_INST, "00201206", "00080061"} <= set(plain)
        assert "00081030" in get(pacs, "studies", includefield=["00081030", "bogus"]).json()[0]
        assert "00081030" in get(pacs, "studies", includefield="StudyDescription").json()[0]
        assert "00081030" in get(pacs, "studies", includefield="all").json()[0]


def test_cap_warning_modes():
    with FakePacs(30, max_results=10) as pacs:
        r = get(pacs, "studies")
        assert len(r.json()) == 10
        assert r.headers["Warning"] == f'299 127.0.0.1:{pacs.port}: "There are 20 additional results that can be requested"'
        r = get(pacs, "studies", limit=10, offset=10)
        assert len(r.json()) == 10 and "Warning" not in r.headers
        assert "additional" in get(pacs, "studies", limit=50, offset=5).headers["Warning"]
        assert "Warning" not in get(pacs, "studies", limit=50, offset=25).headers
        assert uids(walk(pacs, page=10)) == list(pacs.study_uids())
    with FakePacs(30, max_results=10, cap_mode="warning2013") as pacs:
        r = get(pacs, "studies")
        assert len(r.json()) == 10 and r.headers["Warning"].endswith('"The number of results exceeded the maximum supported by the server"')


def test_cap_silent_is_orthanc_like():
    with FakePacs(30, max_results=10, cap_mode="silent") as pacs:
        r = get(pacs, "studies")
        assert len(r.json()) == 11 and "Warning" not in r.headers
        assert len(walk(pacs, page=5)) == 11
        assert get(pacs, "studies", limit=5, offset=11).json() == []


def test_cap_413_and_limit_and_offset_errors():
    with FakePacs(30, max_results=10, cap_mode="413", max_limit=200, limit_error=True, max_offset=1000) as pacs:
        assert get(pacs, "studies").status_code == 413
        assert get(pacs, "studies", limit=5).status_code == 413
        assert len(get(pacs, "studies", StudyDate="20000101-20020101").json()) < 10
        assert get(pacs, "studies", StudyDate="20000101-20020101", limit=201).status_code == 400
        assert get(pacs, "studies", StudyDate="20000101-20020101", offset=1001).status_code == 400
        assert get(pacs, "studies", StudyDate="20000101-20020101", limit="x").status_code == 400
    with FakePacs(30, max_limit=7) as pacs:
        assert len(get(pacs, "studies", limit=100).json()) == 7
        assert len(get(pacs, "studies").json()) == 7


def test_empty_page_204():
    with FakePacs(10, empty_status=204) as pacs:
        r = get(pacs, "studies", limit=5, offset=10)
        assert r.status_code == 204 and r.content == b""
        assert get(pacs, "studies", limit=5, offset=5).status_code == 200
    with FakePacs(10) as pacs:
        r = get(pacs, "studies", limit=5, offset=10)
        assert r.status_code == 200 and r.json() == []


def test_ignore_offset_and_duplicates_across_pages():
    with FakePacs(20, ignore_offset=True) as pacs:
        assert get(pacs, "studies", limit=5, offset=5).json() == get(pacs, "studies", limit=5).json()
        client = QidoClient(pacs.url)
        with pytest.raises(Exception, match="ignores offset"):
            list(client.iter_pages("studies", "studies", [], 5))
    with FakePacs(23, duplicate_across_pages=True) as pacs:
        listed = uids(walk(pacs, page=5))
        assert set(listed) == set(pacs.study_uids())
        assert len(listed) - len(set(listed)) == 5
        pages = [uids(get(pacs, "studies", limit=5, offset=o).json()) for o in (0, 5, 10)]
        assert pages[1][0] == pages[0][-1] and pages[2][0] == pages[1][-1]


def test_failures_with_retry_after():
    with FakePacs(5, fail_every=3, fail_status=429, retry_after="2", fail_requests={1: 503}) as pacs:
        statuses = [get(pacs, "studies") for _ in range(6)]
        assert [r.status_code for r in statuses] == [503, 200, 429, 200, 200, 429]
        assert statuses[2].headers["Retry-After"] == "2" and "Retry-After" in statuses[0].headers
        assert pacs.statuses == {200: 3, 429: 2, 503: 1}
        slept = []
        client = QidoClient(pacs.url, sleep=slept.append, retry=RetryPolicy(attempts=3))
        pacs.reset_counts()
        assert len(client.get("studies", "studies").items) == 5  # request 1 is a 503, 2 answers
        assert slept == [2.0] and client.counts.retries == 1


def test_connection_faults_raise_in_requests():
    with FakePacs(5, reset_every=2) as pacs:
        with requests.Session() as s:
            assert s.get(f"{pacs.url}/studies", timeout=5).status_code == 200
            with pytest.raises(requests.exceptions.ConnectionError):
                s.get(f"{pacs.url}/studies", timeout=5)
            assert s.get(f"{pacs.url}/studies", timeout=5).status_code == 200
        assert pacs.statuses[0] == 1
    with FakePacs(5, truncate_every=1) as pacs:
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(f"{pacs.url}/studies", timeout=5)
    with FakePacs(5, stall_seconds=2, stall_every=2) as pacs:
        assert get(pacs, "studies").status_code == 200
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(f"{pacs.url}/studies", timeout=(1, 0.2))
        assert time.monotonic() - started < 1.9  # before the 2 s stall ends


def test_auth():
    with FakePacs(3, auth=("u", "p")) as pacs:
        assert get(pacs, "studies").status_code == 401
        assert requests.get(f"{pacs.url}/studies", auth=("u", "x"), timeout=5).status_code == 401
        assert requests.get(f"{pacs.url}/studies", auth=("u", "p"), timeout=5).status_code == 200
    with FakePacs(3, token="t0k") as pacs:
        assert get(pacs, "studies").status_code == 401
        assert requests.get(f"{pacs.url}/studies", headers={"Authorization": "Bearer t0k"}, timeout=5).status_code == 200


def test_series_instances_metadata_and_counts():
    with FakePacs(40, seed=5, inconsistent={3: 2}) as pacs:
        for item in get(pacs, "studies").json():
            uid = item[UID]["Value"][0]
            i = pacs.study_index(uid)
            instances = walk(pacs, f"studies/{uid}/instances", page=3)
            sop = {x["00080018"]["Value"][0] for x in instances}
            assert len(sop) == len(instances) == pacs.n_instances(uid)
            assert item[N_INST]["Value"][0] == len(instances) + (2 if i == 3 else 0)
            series = get(pacs, f"studies/{uid}/series").json()
            assert item["00201206"]["Value"][0] == len(series) == pacs.n_series(uid)
            assert sum(s[N_SERIES_INST]["Value"][0] for s in series) == len(instances)
            assert all({"00080060", "0020000E", "00200011", "0008103E"} <= set(x) for x in instances)
            suid = series[0]["0020000E"]["Value"][0]
            in_series = get(pacs, f"studies/{uid}/series/{suid}/instances").json()
            assert len(in_series) == series[0][N_SERIES_INST]["Value"][0]
        uid = pacs.study_uid(0)
        metadata = get(pacs, f"studies/{uid}/metadata").json()
        assert len(metadata) == pacs.n_instances(uid)
        assert all({"00100010", "00080020", "00080060", "00080018", "00080016"} <= set(ds) and N_INST not in ds for ds in metadata)
        iuid = metadata[0]["00080018"]["Value"][0]
        suid = metadata[0]["0020000E"]["Value"][0]
        assert get(pacs, f"studies/{uid}/series/{suid}/instances/{iuid}/metadata").json() == metadata[:1]
        assert get(pacs, "studies/2.25.1/metadata").status_code == 404
        assert get(pacs, "studies/2.25.1/instances").json() == []
        assert get(pacs, "nothing").status_code == 404
        kinds = pacs.counts()
        assert kinds["studies"] == 1 and kinds["series"] == 40 and kinds["metadata"] == 3
        assert pacs.requests[0][:2] == Request("studies", "")[:2]
        pacs.reset_counts()
        assert pacs.requests == []


def test_malformed_bad_values_and_missing_series_fields():
    with FakePacs(5, malformed={1}, bad_values={2}, drop_series_fields_at_instance_level=True) as pacs:
        r = get(pacs, f"studies/{pacs.study_uid(1)}/instances")
        assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(r.content)
        with pytest.raises(ValueError):
            r.json()
        bad = get(pacs, f"studies/{pacs.study_uid(2)}/instances").json()
        assert "0020000E" not in bad[0] and "00080060" not in bad[0]
        assert get(pacs, f"studies/{pacs.study_uid(2)}/series").json()[0]["00200011"]["Value"] == ["abc"]
        study = get(pacs, "studies", StudyInstanceUID=pacs.study_uid(2)).json()[0]
        assert study["00100010"]["Value"] == [12345]


def test_mutations_for_sync_tests():
    with FakePacs(10) as pacs:
        uid = pacs.study_uid(4)
        before = pacs.n_instances(uid)
        pacs.add_instances(4, 3)
        assert pacs.n_instances(uid) == before + 3
        item = get(pacs, "studies", StudyInstanceUID=uid).json()[0]
        assert item[N_INST]["Value"][0] == before + 3 == len(get(pacs, f"studies/{uid}/instances").json())
        pacs.delete_study(4)
        assert uid not in uids(walk(pacs, page=3)) and uid not in pacs.study_uids()
        assert len(uids(walk(pacs, page=3))) == 9
        assert get(pacs, f"studies/{uid}/instances").json() == []


def test_a_million_studies_answer_a_day_quickly():
    with FakePacs(1_000_000, seed=9) as pacs:
        with requests.Session() as s:
            s.get(f"{pacs.url}/studies", params={"limit": 1}, timeout=5)
            started = time.perf_counter()
            r = s.get(f"{pacs.url}/studies", params={"StudyDate": "20240229"}, timeout=5)
            elapsed = time.perf_counter() - started
        day = r.json()
        assert 90 < len(day) < 130 and {d[DATE]["Value"][0] for d in day} == {"20240229"}
        assert elapsed < 5.0, elapsed  # ~ 10 ms here: generous, for a loaded machine (speed goals are not timed tests)
        assert len(uids(day)) == pacs.n_matching("20240229", "20240229")
        last = date(2024, 12, 31) - timedelta(days=1)
        assert pacs.study_date(999_999) == "20241231" and pacs.study_date(999_999 - 110) >= last.strftime("%Y%m%d")
