"""Auth and transport options: token command, headers, TLS settings, rate limit, retry waits."""

from __future__ import annotations

import json
import sys

import pytest

from crawler.cli import main
from crawler.errors import ConfigError
from crawler.http import RateLimit, RetryPolicy, token_from_command
from crawler.qido import QidoClient
from fixtures.fakepacs import FakePacs


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_token_command_is_run_again_after_a_401(tmp_path, capsys):
    calls = tmp_path / "calls"
    script = tmp_path / "token.py"
    # the first token is stale; the command hands out the good one from its second run on
    script.write_text(
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(calls)!r})\n"
        "n = int(p.read_text()) if p.exists() else 0\n"
        "p.write_text(str(n + 1))\n"
        "print('stale-token' if n == 0 else 'tok-Secret-77')\n"
    )
    with FakePacs(n_studies=6, seed=1, token="tok-Secret-77") as pacs:
        code, out, err = run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / "s.db"), "--token-command", f"{sys.executable} {script}", "--metadata", "never", "-vv", "--json")
        assert code == 0, err
        assert json.loads(out)["studies_new"] == 6
        assert calls.read_text() == "2"
        assert "tok-Secret-77" not in err + out and "stale-token" not in err + out


def test_a_failing_token_command_is_a_configuration_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sync", "http://127.0.0.1:9/dicom-web", "--state", str(tmp_path / "s.db"), "--token-command", "false")
    assert code == 2
    assert "--token-command: the token command 'false' failed" in err


def test_extra_headers_are_sent_and_never_shown(tmp_path, capsys):
    with FakePacs(n_studies=3, seed=2, token="hdr-Secret-12") as pacs:
        code, out, err = run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / "s.db"), "--header", "Authorization: Bearer hdr-Secret-12", "--metadata", "never", "-vv", "--json")
        assert code == 0, err
        assert "hdr-Secret-12" not in err + out


def test_bad_header_and_tls_options_are_usage_errors(tmp_path, capsys):
    assert run_cli(capsys, "sync", "http://h/dicom-web", "--header", "no-colon")[0] == 2
    assert run_cli(capsys, "sync", "http://h/dicom-web", "--insecure", "--ca-bundle", "/etc/hosts")[0] == 2
    assert run_cli(capsys, "sync", "http://h/dicom-web", "--ca-bundle", str(tmp_path / "missing.pem"))[0] == 2


def test_tls_is_verified_by_default():
    assert QidoClient("https://pacs.example.org/dicom-web").session.verify is True
    assert QidoClient("https://pacs.example.org/dicom-web", verify="/etc/ssl/ca.pem").session.verify == "/etc/ssl/ca.pem"


def test_rate_limit_spaces_requests_evenly():
    now = [0.0]
    slept = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limit = RateLimit(5, clock=lambda: now[0], sleep=sleep)
    for _ in range(11):
        limit.wait()
    assert now[0] == pytest.approx(2.0)


def test_max_rps_bounds_the_request_rate_against_a_server(tmp_path, capsys):
    with FakePacs(n_studies=4, seed=3) as pacs:
        import time

        start = time.monotonic()
        code, out, _ = run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / "s.db"), "--max-rps", "20", "--metadata", "never", "--json")
        elapsed = time.monotonic() - start
        requests_made = json.loads(out)["requests"]["total"]
        assert code == 0
        assert elapsed >= (requests_made - 1) / 20


def test_retry_waits_follow_retry_after_and_backoff_without_sleeping():
    waits = []
    with FakePacs(n_studies=2, seed=4, fail_requests={1: 429, 2: 503, 3: 503}, retry_after="7") as pacs:
        client = QidoClient(pacs.url, retry=RetryPolicy(attempts=5, max_seconds=60), sleep=waits.append)
        page = client.get("studies", "studies", [("limit", 10)])
    assert len(page.items) == 2
    assert waits == [7.0, 7.0, 7.0]
    assert client.counts.as_dict()["retries"] == 3


def test_retries_stop_after_the_attempts_and_are_not_made_for_client_errors():
    waits = []
    with FakePacs(n_studies=2, seed=5, fail_every=1, fail_status=503) as pacs:
        client = QidoClient(pacs.url, retry=RetryPolicy(attempts=3, base_delay=1, max_delay=4), sleep=waits.append)
        client.answered = True
        with pytest.raises(Exception, match="HTTP 503"):
            client.get("studies", "studies")
        assert len(waits) == 2 and 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2
    with FakePacs(n_studies=2, seed=5, fail_requests={1: 404}) as pacs:
        client = QidoClient(pacs.url, sleep=waits.append)
        with pytest.raises(Exception, match="HTTP 404"):
            client.get("studies", "studies")
        assert pacs.counts()["studies"] == 1


def test_token_from_command_rejects_empty_commands():
    with pytest.raises(ConfigError):
        token_from_command("   ")
