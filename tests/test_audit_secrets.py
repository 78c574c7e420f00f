"""The audit's report and its --json name the state it compared with, never the password in a
PostgreSQL state's URL."""

from __future__ import annotations

import json

from crawler.cli import main
from fixtures.fakepacs import FakePacs


def test_a_postgresql_state_is_named_without_its_password(postgres_server, tmp_path, capsys):
    url = postgres_server.create_database().replace("postgresql://postgres@", "postgresql://postgres:pw-s3cret-42@")
    with FakePacs(n_studies=4, seed=71) as pacs:
        assert main(["sync", pacs.url, "--state", url, "--metadata", "never", "--timezone", "UTC", "-q"]) == 0
        code = main(["audit", pacs.url, "--state", url, "--report", str(tmp_path / "report"), "--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["exit_code"] == 0
    written = [p for p in (tmp_path / "report").iterdir() if p.is_file()]
    assert len(written) >= 3
    for path in written:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert "pw-s3cret-42" not in text, path.name
    assert "pw-s3cret-42" not in out + err
    findings = json.loads((tmp_path / "report" / "findings.json").read_text())
    assert "postgres:***@" in json.dumps(findings)
