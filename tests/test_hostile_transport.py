"""Hostile transports (issue 13, items 3, 4, 6, 10, 11): trickling answers, decompression bombs,
redirects to another origin, TLS options against the environment, secrets in usage errors.

The servers are simulators (fixtures/hostile.py); the CLI runs in a subprocess where time and
memory are measured, in-process where only the exit code and the message matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crawler import http, qido
from crawler.cli import main
from crawler.errors import FatalQidoError, RetriableQidoError
from fixtures.hostile import Hostile

_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.monotonic()
done = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True, timeout=120)
print(json.dumps({"code": done.returncode, "seconds": time.monotonic() - start, "stderr": done.stderr,
                  "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_measured(*args: str) -> dict:
    """The CLI in a child of a fresh wrapper process, so that its peak RSS is its own."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXIES}
    argv = [sys.executable, "-m", "crawler", *args]
    done = subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps(argv)], capture_output=True, text=True, env=env, timeout=150, check=True)
    return json.loads(done.stdout)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXIES:
        monkeypatch.delenv(name, raising=False)


# item 3: a total deadline per request


def test_a_trickling_answer_does_not_hold_the_run(tmp_path):
    with Hostile("trickle", interval=1.0) as server:
        result = run_measured("sync", server.url, "--state", str(tmp_path / "s.db"), "--timeout", "2", "--retries", "1", "--metadata", "never")
    assert result["seconds"] < 60, result
    assert result["code"] == 3, result
    lines = error_lines(result["stderr"])
    assert len(lines) == 1 and "timed out" in lines[0], result["stderr"]
    assert len(server.seen) == 2, "a timeout is retried as usual"


@pytest.mark.parametrize("mode", ["trickle", "trickle-headers"])
def test_the_deadline_bounds_the_whole_answer_not_each_read(mode):
    with Hostile(mode, interval=0.2) as server:
        client = qido.QidoClient(server.url, timeout=(1.0, 1.0), retry=http.RetryPolicy(attempts=1))
        client.answered = True
        started = time.monotonic()
        with pytest.raises(RetriableQidoError, match="timed out"):
            client.get("studies", "studies")
    assert time.monotonic() - started < 1.0 + 1.0 + 1.0


# item 4: bounded memory for every encoding


@pytest.mark.parametrize("encoding", ["deflate", "deflate-raw", "x-gzip", "gzip", "identity"])
def test_a_bomb_is_refused_in_bounded_time_and_memory(tmp_path, encoding):
    with Hostile("bomb", encoding=encoding) as server:
        result = run_measured("sync", server.url, "--state", str(tmp_path / "s.db"), "--metadata", "never", "--retries", "2")
    assert result["seconds"] < 60, result
    assert result["code"] != 0, result
    assert result["rss_mb"] < 300, result
    lines = error_lines(result["stderr"])
    assert any(f"refused: larger than {http.MAX_BODY >> 20} MB" in line for line in lines), result["stderr"]
    assert len(server.seen) == 1, "a refused answer is not asked for again"


def test_a_content_length_past_the_cap_is_refused_before_reading(tmp_path):
    with Hostile("bomb", encoding="identity", content_length=True) as server:
        result = run_measured("sync", server.url, "--state", str(tmp_path / "s.db"), "--metadata", "never", "--max-response-mb", "8")
    assert result["code"] != 0 and result["seconds"] < 60, result
    assert result["rss_mb"] < 100, result
    assert any("refused: larger than 8 MB" in line for line in error_lines(result["stderr"])), result["stderr"]


def test_an_encoding_that_is_not_asked_for_is_refused_clearly():
    with Hostile("bomb", encoding="br") as server:
        client = qido.QidoClient(server.url, retry=http.RetryPolicy(attempts=3), sleep=lambda s: None)
        with pytest.raises(FatalQidoError, match="refused: Content-Encoding 'br' is not supported"):
            client.get("studies", "studies")
    assert len(server.seen) == 1
    assert server.seen[0]["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "deflate-raw"])
def test_answers_under_the_cap_decode_in_every_encoding(encoding):
    import zlib

    body = b"[" + b",".join([b'{"0020000D": {"vr": "UI", "Value": ["1.2.%d"]}}' % i for i in range(3000)]) + b"]"
    wbits = {"gzip": 31, "x-gzip": 31, "deflate": 15, "deflate-raw": -15}[encoding]
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    data = packer.compress(body) + packer.flush()
    assert http.decode_body(data, "deflate" if encoding == "deflate-raw" else encoding, len(body)) == body
    with pytest.raises(http.BodyTooLarge):
        http.decode_body(data, "deflate" if encoding == "deflate-raw" else encoding, len(body) - 1)


def test_large_answers_decode_past_the_fast_path_and_bombs_stop_at_the_cap(monkeypatch):
    import gzip

    monkeypatch.setattr(http, "INFLATE_STEP", 1000)
    body = bytes(range(256)) * 40
    assert http.decode_body(gzip.compress(body), "gzip", len(body)) == body
    assert http.decode_body(gzip.compress(body[:5000]) + gzip.compress(body[5000:]), "gzip", len(body)) == body
    with pytest.raises(http.BodyTooLarge):
        http.decode_body(gzip.compress(body[:5000]) + gzip.compress(body[5000:]), "gzip", len(body) - 1)


# item 6: redirects


def test_a_redirect_to_another_origin_is_refused_and_the_headers_stay_home(tmp_path, capsys):
    with Hostile("json", body=b'[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]') as other:
        with Hostile("redirect", location=other.url) as source:
            code, text = run_cli(capsys, "sync", source.url, "--state", str(tmp_path / "s.db"), "--header", "X-Api-Key: k-SECRET-9",
                                 "--metadata", "never", "--retries", "0")  # fmt: skip
    assert code != 0
    assert other.seen == [], "nothing may reach the other origin"
    assert len(source.seen) >= 1 and source.seen[0]["x-api-key"] == "k-SECRET-9"
    assert "k-SECRET-9" not in text
    lines = error_lines(text)
    assert any(f"redirect from {source.origin} to {other.origin} refused" in line for line in lines), text


def test_a_redirect_may_not_change_scheme_or_port():
    assert http.same_origin("http://h:80/a", "http://H/b?x=1")
    assert http.same_origin("https://u:p@h/a", "https://h:443/c")
    assert not http.same_origin("http://h/a", "https://h/a")
    assert not http.same_origin("http://h:8042/a", "http://h:8043/a")
    assert not http.same_origin("http://h/a", "http://h.evil.example/a")
    assert http.origin_of("http://ann:s3cret@h:8042/dicom-web?token=x") == "http://h:8042"


def test_same_origin_redirects_are_followed_a_bounded_number_of_times():
    with Hostile("redirect") as server:
        server.location = server.url
        client = qido.QidoClient(server.url, retry=http.RetryPolicy(attempts=1))
        with pytest.raises(FatalQidoError, match="more than 5 redirects"):
            client.get("studies", "studies")
    assert len(server.seen) == 6


# item 10: TLS options win over the environment


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_ca_bundle_and_insecure_win_over_the_environment(tmp_path, capsys, monkeypatch, variable):
    import certifi

    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with Hostile("tls") as server:
        monkeypatch.setenv(variable, certifi.where())
        code, text = run_cli(capsys, "sync", server.url, "--state", str(tmp_path / "a.db"), "--ca-bundle", str(server.cert_path), "--retries", "0")
        assert code == 0, text
        client = qido.QidoClient(server.url, verify=str(server.cert_path))
        assert client._direct_origin().verify == str(server.cert_path)
        code, text = run_cli(capsys, "sync", server.url, "--state", str(tmp_path / "b.db"), "--insecure", "--retries", "0")
        assert code == 0, text
        assert qido.QidoClient(server.url, verify=False)._direct_origin().verify is False
        code, text = run_cli(capsys, "sync", server.url, "--state", str(tmp_path / "c.db"), "--retries", "0")
        assert code != 0 and "TLS error" in text, "without the options the environment's bundle applies"
        monkeypatch.setenv(variable, str(server.cert_path))
        code, text = run_cli(capsys, "sync", server.url, "--state", str(tmp_path / "d.db"), "--retries", "0")
        assert code == 0, text


def test_tls_options_reach_the_session_path_too(monkeypatch):
    import certifi

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    with Hostile("tls") as server:
        client = qido.QidoClient(server.url, verify=str(server.cert_path))
        client._resolved = True
        assert client.get("studies", "studies").items == []


# item 11: usage errors without secrets or tracebacks


def test_a_header_without_a_colon_does_not_echo_its_value(capsys):
    code, text = run_cli(capsys, "sync", "http://127.0.0.1:9/dicom-web", "--header", "X-Api-Key k-SECRET-1")
    assert code == 2
    assert "k-SECRET-1" not in text
    assert len(error_lines(text)) == 1 and "--header" in text


@pytest.mark.parametrize(
    "args",
    [
        ("sync", "http://ann:pw-SECRET@localhost:99999/dicom-web"),
        ("sync", "http://ann:pw-SECRET@localhost:abc/dicom-web"),
        ("audit", "http://ann:pw-SECRET@localhost:99999/dicom-web", "--report", "{tmp}/r"),
        ("sync", "http://127.0.0.1:9/dicom-web", "--fhir-url", "http://ann:pw-SECRET@localhost:99999/fhir"),
        ("sync", "http://[::1/dicom-web"),
        ("audit", "http://[::1/dicom-web", "--report", "{tmp}/r"),
        ("map", "{tmp}/one.json", "--source", "http://[::1/dicom-web"),
    ],
)
def test_a_bad_url_is_a_usage_error_in_one_line(tmp_path, capsys, args):
    (tmp_path / "one.json").write_text("[{}]")
    code, text = run_cli(capsys, *[a.format(tmp=tmp_path) for a in args], *(["--state", str(tmp_path / "s.db")] if args[0] == "sync" else []))
    assert code == 2, text
    assert "pw-SECRET" not in text
    assert len(error_lines(text)) == 1, text


def _token_script(tmp_path: Path) -> str:
    script = tmp_path / "token.py"
    script.write_text("print('tok-first')\nprint('tok-SECRET-2')\n")
    return f"{sys.executable} {script}"


@pytest.mark.parametrize("how", ["option", "environment", "command", "header"])
def test_a_token_with_a_line_break_is_a_usage_error(tmp_path, capsys, monkeypatch, how):
    with Hostile("json") as server:
        args = ["sync", server.url, "--state", str(tmp_path / "s.db"), "--retries", "0"]
        if how == "option":
            args += ["--token", "tok-first\ntok-SECRET-2"]
        elif how == "environment":
            monkeypatch.setenv("QIDO_CRAWLER_TOKEN", "tok-first\r\ntok-SECRET-2")
        elif how == "command":
            args += ["--token-command", _token_script(tmp_path)]
        else:
            args += ["--header", "X-Api-Key: tok-first\ntok-SECRET-2"]
        code, text = run_cli(capsys, *args)
    assert code == 2, text
    assert "tok-SECRET-2" not in text and "tok-first" not in text
    assert len(error_lines(text)) == 1, text
    assert server.seen == []


def test_the_change_feed_is_held_to_the_same_redirect_rule(tmp_path, capsys):
    with Hostile("json", body=b'{"Changes": [], "Done": true, "Last": 0}') as other:
        with Hostile("redirect", location=other.origin) as feed, Hostile("json") as source:
            feed.location = other.origin
            code, text = run_cli(capsys, "sync", source.url, "--state", str(tmp_path / "s.db"), "--changes", "orthanc", "--orthanc-url", feed.origin,
                                 "--header", "X-Api-Key: k-SECRET-8", "--retries", "0")  # fmt: skip
    assert len(feed.seen) >= 1 and feed.seen[0]["x-api-key"] == "k-SECRET-8"
    assert other.seen == [], "nothing may reach the other origin"
    assert code != 0 and "k-SECRET-8" not in text
    assert f"redirect from {feed.origin} to {other.origin} refused" in text, text


@pytest.mark.parametrize("command", ["sync", "audit"])
def test_a_fhir_token_with_a_line_break_is_a_usage_error(tmp_path, capsys, command):
    with Hostile("json") as server:
        where = ["--state", str(tmp_path / "s.db")] if command == "sync" else ["--report", str(tmp_path / "r")]
        code, text = run_cli(capsys, command, server.url, *where, "--fhir-url", server.origin + "/fhir", "--fhir-token", "tok-first\ntok-SECRET-3", "--retries", "0")
    assert code == 2, text
    assert "tok-SECRET-3" not in text and len(error_lines(text)) == 1, text
    assert server.seen == []
