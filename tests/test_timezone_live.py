"""``--timezone`` end to end: sync (live Orthanc), map and audit read it, and it changes the output.

CI runs in UTC, so ``--timezone UTC`` proves nothing; these use zones far from UTC and from each
other, and dates on both sides of a daylight-saving change.
"""

from __future__ import annotations

import contextlib
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from crawler.cli import main
from fixtures import corpus
from fixtures.fakepacs import FakePacs

RECORDINGS = Path(__file__).parent.parent / "fixtures" / "dicomjson"

# corpus studies without Timezone Offset From UTC, with a StudyTime (fixtures/corpus.py)
# 02: 2023-06-02 10:15 (summer time in New York); 05: 2024-01-20 08:00 (winter time);
# 04: 2023-11-02 14:30, after Europe left summer time (Oct 29) and before New York did (Nov 5)
EXPECTED_STARTED = {
    "America/New_York": {
        "02": "2023-06-02T10:15:00-04:00",
        "04": "2023-11-02T14:30:00-04:00",
        "05": "2024-01-20T08:00:00-05:00",
    },
    "Asia/Tokyo": {
        "02": "2023-06-02T10:15:00+09:00",
        "04": "2023-11-02T14:30:00+09:00",
        "05": "2024-01-20T08:00:00+09:00",
    },
    "Europe/Berlin": {
        "02": "2023-06-02T10:15:00+02:00",
        "04": "2023-11-02T14:30:00+01:00",
        "05": "2024-01-20T08:00:00+01:00",
    },
}
# study 01 carries Timezone Offset From UTC +0100: no zone may change it
WITH_OFFSET = ("01", "2023-03-14T10:15:30.123+01:00")


def started_by_key(studies: list[dict]) -> dict[str, str]:
    keys = {corpus.uid("study", key): key for key in (*EXPECTED_STARTED["Asia/Tokyo"], WITH_OFFSET[0])}
    found = {}
    for study in studies:
        uid = study["identifier"][0]["value"][len("urn:oid:"):]
        if uid in keys:
            found[keys[uid]] = study["started"]
    return found


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Tokyo"])
def test_sync_takes_the_offset_of_times_without_one_from_timezone(zone, pacs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sync", pacs.dicomweb, "--out", str(out), "--state", str(tmp_path / "state.db"), "--json", "--timezone", zone])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    folder = Path(json.loads(stdout)["run_dir"])
    studies = [json.loads(line) for line in (folder / "ImagingStudy.ndjson").read_text().splitlines()]
    assert started_by_key(studies) == {**EXPECTED_STARTED[zone], WITH_OFFSET[0]: WITH_OFFSET[1]}


@pytest.mark.parametrize("zone", sorted(EXPECTED_STARTED))
def test_map_takes_the_offset_from_timezone(zone, tmp_path, capsys):
    for key, started in EXPECTED_STARTED[zone].items():
        recording = json.loads((RECORDINGS / f"study-{key}.json").read_text())
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(recording["metadata"]))
        assert main(["map", str(path), "--timezone", zone]) == 0
        stdout, stderr = capsys.readouterr()
        assert json.loads(stdout)["started"] == started, (key, stderr)


def test_audit_future_date_is_judged_in_the_pacs_zone(tmp_path):
    """UTC+14 and UTC-10 (neither has summer time) are exactly one day apart: the day that is
    today on Kiritimati is always tomorrow in Honolulu."""
    ahead, behind = "Pacific/Kiritimati", "Pacific/Honolulu"

    def today_ahead() -> str:
        return datetime.now(timezone.utc).astimezone(ZoneInfo(ahead)).strftime("%Y%m%d")

    for attempt in range(2):   # once more if midnight on Kiritimati passed meanwhile
        day = today_ahead()
        findings = {}
        with FakePacs(n_studies=3, seed=31, date_from=day, date_to=day) as pacs:
            for zone in (ahead, behind):
                report = tmp_path / f"{attempt}-{zone.replace('/', '-')}"
                with contextlib.redirect_stdout(io.StringIO()):
                    code = main(["audit", pacs.url, "--report", str(report), "--json", "--retries", "0", "--timezone", zone])
                document = json.loads((report / "findings.json").read_text())
                findings[zone] = ({f["code"]: set(f["studies"]) for f in document["findings"]}, code)
            uids = set(pacs.study_uids())
        if today_ahead() == day:
            break
    assert len(uids) == 3
    assert findings[ahead] == ({}, 0)
    assert findings[behind] == ({"FUTURE_DATE": uids}, 0)
