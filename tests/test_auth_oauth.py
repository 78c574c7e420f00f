"""OAuth2 client credentials (--auth oauth) against the token endpoint simulator (fixtures/fakeoauth.py)
in front of the QIDO simulator, which takes exactly the tokens the endpoint issued, until they expire."""

from __future__ import annotations

import itertools
import json
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from crawler import auth
from crawler.auth import AuthSettings, Kind
from crawler.auth.oauth import ClientCredentials
from crawler.cli import main
from crawler.errors import ConfigError, SourceUnreachable
from crawler.qido import QidoClient
from fixtures.fakeoauth import FakeOAuth
from fixtures.fakepacs import FakePacs

SECRET = "cs-Secret-4711"


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def oauth_args(oauth: FakeOAuth, *more: str) -> list[str]:
    return ["--oauth-token-url", oauth.token_url, "--oauth-client-id", "crawler", "--oauth-client-secret-env", "CRAWLER_SECRET", *more]


def pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def test_a_run_longer_than_the_tokens_life_refreshes_it_without_a_failed_request(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRAWLER_SECRET", SECRET)
    # 4 s tokens are renewed 1 s before they expire: the simulator's 0.25 s latency, which comes
    # before its token check, leaves 0.75 s of slack on a loaded machine
    with FakeOAuth(secrets_by_client={"crawler": SECRET}, expires_in=4) as oauth, \
            FakePacs(n_studies=48, seed=5, token=oauth.valid, latency=0.25) as pacs:
        code, out, err = run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / "s.db"), "--metadata", "never",
                                 "--workers", "2", "--json", *oauth_args(oauth))
        assert code == 0, err
        summary = json.loads(out)
        assert summary["studies_new"] == 48 and summary["studies_failed"] == 0
        assert oauth.rejected == 0                  # not one request went out with an expired token
        assert len(oauth.issued) >= 2               # the run outlived its first token
        assert oauth.methods[0] == "basic"
        assert summary["seconds"] > 4.5


def test_a_revoked_token_is_fetched_again_once_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRAWLER_SECRET", SECRET)
    checked = itertools.count()
    with FakeOAuth(secrets_by_client={"crawler": SECRET}, expires_in=3600) as oauth:

        def valid(token: str) -> bool:
            if next(checked) == 6:
                oauth.revoke()
            return oauth.valid(token)

        with FakePacs(n_studies=12, seed=6, token=valid) as pacs:
            code, out, err = run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / "s.db"), "--metadata", "never",
                                     "--json", *oauth_args(oauth))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["studies_new"] == 12 and summary["studies_failed"] == 0
    assert len(oauth.issued) == 2                   # one refresh for every thread that saw the 401
    assert 1 <= oauth.rejected <= 5                 # the requests in flight with the revoked token


def test_a_wrong_secret_is_exit_2_naming_the_oauth_error_and_never_the_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRAWLER_SECRET", "wrong-Secret-99")
    with FakeOAuth(secrets_by_client={"crawler": SECRET}) as oauth, FakePacs(n_studies=2, seed=1, token=oauth.valid) as pacs:
        code, out, err = run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / "s.db"), "-vv", "--json", *oauth_args(oauth))
        assert pacs.requests == []                  # stopped before asking the PACS anything
    assert code == 2
    assert "invalid_client" in err and "--auth" in err
    assert "wrong-Secret-99" not in err + out and "is unknown" not in err    # the endpoint's free text is not shown
    assert oauth.refusals == ["invalid_client"]


def test_an_unreachable_token_endpoint_is_exit_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRAWLER_SECRET", SECRET)
    code, _, err = run_cli(capsys, "sync", "http://127.0.0.1:9/dicom-web", "--state", str(tmp_path / "s.db"),
                           "--oauth-token-url", "http://127.0.0.1:9/token", "--oauth-client-id", "crawler",
                           "--oauth-client-secret-env", "CRAWLER_SECRET")
    assert code == 3
    assert "cannot get an OAuth token" in err and "connection refused" in err


def test_the_secret_from_a_file_and_a_file_of_two_lines_refused(tmp_path, capsys):
    good, bad = tmp_path / "secret", tmp_path / "two-lines"
    good.write_text(SECRET + "\n")
    bad.write_text(SECRET + "\nmore\n")
    with FakeOAuth(secrets_by_client={"crawler": SECRET}) as oauth, FakePacs(n_studies=3, seed=2, token=oauth.valid) as pacs:
        base = ["sync", pacs.url, "--metadata", "never", "--oauth-token-url", oauth.token_url, "--oauth-client-id", "crawler",
                "--oauth-scope", "dicomweb.read"]
        code, out, err = run_cli(capsys, *base, "--state", str(tmp_path / "a.db"), "--oauth-client-secret-file", str(good), "--json")
        assert code == 0, err and json.loads(out)["studies_new"] == 3
        assert oauth.scopes_asked == ["dicomweb.read"]
        code, _, err = run_cli(capsys, *base, "--state", str(tmp_path / "b.db"), "--oauth-client-secret-file", str(bad))
    assert code == 2 and "--oauth-client-secret-file" in err and "one line" in err and SECRET not in err


@pytest.mark.parametrize("curve_or_bits", [2048, "P-384"])
def test_private_key_jwt_signs_a_fresh_assertion_for_each_token(tmp_path, capsys, curve_or_bits):
    key = rsa.generate_private_key(65537, curve_or_bits) if curve_or_bits == 2048 else ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "key.pem"
    path.write_bytes(pem(key))
    with FakeOAuth(keys_by_client={"crawler": key.public_key()}, expires_in=3600) as oauth, \
            FakePacs(n_studies=4, seed=3, token=oauth.valid) as pacs:
        settings = AuthSettings(pacs.url, kind="oauth", token_url=oauth.token_url, client_id="crawler", private_key=str(path), key_id="k1")
        credentials = auth.make(settings)
        first = credentials.headers("GET", pacs.url)
        assert credentials.refresh(first) is True
        assert credentials.headers("GET", pacs.url) != first
        code, out, err = run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / "s.db"), "--metadata", "never", "--json",
                                 "--auth", "oauth", "--oauth-token-url", oauth.token_url, "--oauth-client-id", "crawler",
                                 "--oauth-private-key", str(path), "--oauth-key-id", "k1")
    assert code == 0, err and json.loads(out)["studies_new"] == 4
    assert oauth.methods == ["jwt"] * 3
    claims = oauth.assertions
    assert len({c["jti"] for c in claims}) == 3
    assert all(c["aud"] == oauth.token_url and c["iss"] == c["sub"] == "crawler" and c["kid"] == "k1" for c in claims)
    assert all(0 < c["exp"] - c["iat"] <= 300 for c in claims)


def test_a_key_of_another_curve_or_no_key_is_a_usage_error(tmp_path, capsys):
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    for path, words in ((p256, "ES384 needs P-384"), (junk, "is no PEM private key")):
        code, _, err = run_cli(capsys, "sync", "http://127.0.0.1:9/dicom-web", "--state", str(tmp_path / "s.db"),
                               "--oauth-token-url", "http://127.0.0.1:9/token", "--oauth-client-id", "c", "--oauth-private-key", str(path))
        assert code == 2 and words in err and "--oauth-private-key" in err and "not a key" not in err


def test_options_of_two_kinds_or_none_of_a_secret_are_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRAWLER_SECRET", SECRET)
    url = "http://127.0.0.1:9/dicom-web"
    code, _, err = run_cli(capsys, "sync", url, "--auth", "oauth", "--token", "t0k", "--oauth-token-url", "http://127.0.0.1:9/t",
                           "--oauth-client-id", "c", "--oauth-client-secret-env", "CRAWLER_SECRET")
    assert code == 2 and "--auth oauth and the options of bearer auth do not go together" in err
    code, _, err = run_cli(capsys, "sync", url, "--oauth-token-url", "http://127.0.0.1:9/t", "--oauth-client-id", "c")
    assert code == 2 and "needs exactly one of --oauth-client-secret-env, --oauth-client-secret-file, --oauth-private-key" in err
    code, _, err = run_cli(capsys, "sync", url, "--oauth-token-url", "http://127.0.0.1:9/t", "--oauth-client-id", "c",
                           "--oauth-client-secret-env", "NOT_SET_ANYWHERE")
    assert code == 2 and "--oauth-client-secret-env: the environment variable NOT_SET_ANYWHERE is not set" in err
    with pytest.raises(SystemExit) as caught:
        main(["sync", url, "--auth", "kerberos"])
    assert caught.value.code == 2


def test_a_kind_whose_extra_is_missing_is_a_usage_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(auth.KINDS, "gcp", Kind("crawler.auth.not_installed_here", "Credentials", "gcp"))
    with pytest.raises(ConfigError, match=r"gcp auth needs the gcp extra: pip install 'qido-crawler\[gcp\]'") as caught:
        auth.make(AuthSettings("https://h/dicom-web", kind="gcp"))
    assert caught.value.setting == "auth"


def test_one_fetch_for_many_threads_and_again_only_near_expiry(monkeypatch):
    monkeypatch.setenv("CRAWLER_SECRET", SECRET)
    now = [1000.0]
    with FakeOAuth(secrets_by_client={"crawler": SECRET}, expires_in=600, clock=lambda: now[0]) as oauth:
        settings = AuthSettings("http://h/dicom-web", token_url=oauth.token_url, client_id="crawler", client_secret_env="CRAWLER_SECRET")
        credentials = ClientCredentials(settings, clock=lambda: now[0])
        start = threading.Barrier(8)
        seen: list[str] = []

        def ask() -> None:
            start.wait()
            seen.append(credentials.headers("GET", "http://h/dicom-web/studies")["Authorization"])

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(oauth.issued) == 1 and seen == [f"Bearer {oauth.issued[0]}"] * 8
        now[0] += 539                               # 61 s left: kept
        credentials.headers("GET", "http://h/dicom-web/studies")
        assert len(oauth.issued) == 1
        now[0] += 2                                 # 59 s left: fetched again
        assert credentials.headers("GET", "http://h/")["Authorization"] == f"Bearer {oauth.issued[1]}"
        used = {"Authorization": f"Bearer {oauth.issued[0]}"}
        assert credentials.refresh(used) is True    # a 401 to the token already replaced: no fetch
        assert len(oauth.issued) == 2


def test_an_endpoint_unreachable_while_the_token_is_still_valid_keeps_the_token(monkeypatch):
    monkeypatch.setenv("CRAWLER_SECRET", SECRET)
    now = [0.0]
    with FakeOAuth(secrets_by_client={"crawler": SECRET}, expires_in=600) as oauth:
        settings = AuthSettings("http://h/dicom-web", token_url=oauth.token_url, client_id="crawler", client_secret_env="CRAWLER_SECRET")
        credentials = ClientCredentials(settings, clock=lambda: now[0], sleep=lambda s: None)
        first = credentials.headers("GET", "http://h/")
    now[0] = 570.0                                  # 30 s left, and the endpoint is gone
    assert credentials.headers("GET", "http://h/") == first
    now[0] = 601.0
    with pytest.raises(SourceUnreachable, match="cannot get an OAuth token"):
        credentials.headers("GET", "http://h/")


def test_both_send_paths_carry_the_token_and_a_401_on_either_renews_it(monkeypatch):
    monkeypatch.setenv("CRAWLER_SECRET", SECRET)
    with FakeOAuth(secrets_by_client={"crawler": SECRET}) as oauth, FakePacs(n_studies=3, seed=7, token=oauth.valid) as pacs:
        credentials = auth.make(AuthSettings(pacs.url, token_url=oauth.token_url, client_id="crawler", client_secret_env="CRAWLER_SECRET"))
        for direct in (True, False, True):
            client = QidoClient(pacs.url, credentials=credentials)
            client._resolved = not direct           # no origin resolved: the request goes through the session
            assert len(client.get("studies", "studies").items) == 3
            oauth.revoke()
    assert len(oauth.issued) == 3 and oauth.rejected == 2


def test_a_change_feed_read_with_a_revoked_token_renews_it(monkeypatch):
    from crawler.changes import azure_changes
    from fixtures.fakeazure import AzureFeedPacs

    monkeypatch.setenv("CRAWLER_SECRET", SECRET)
    with FakeOAuth(secrets_by_client={"crawler": SECRET}) as oauth, AzureFeedPacs(n_studies=5, seed=8, token=oauth.valid) as pacs:
        credentials = auth.make(AuthSettings(pacs.url, token_url=oauth.token_url, client_id="crawler", client_secret_env="CRAWLER_SECRET"))
        client = QidoClient(pacs.url, credentials=credentials)
        first = azure_changes(client, pacs.url, None)
        oauth.revoke()
        pacs.arrive(2)
        read = azure_changes(client, pacs.url, first.cursor)
    assert [c.study_uid for c in read.changes] == [pacs.study_uid(2)]
    assert len(oauth.issued) == 2 and oauth.rejected == 1


@pytest.mark.parametrize("options", [["--fhir-auth", "smart"], ["--fhir-oauth-client-id", "crawler"]])
def test_fhir_credentials_without_a_fhir_server_are_refused_not_ignored(options, tmp_path, capsys):
    from crawler.cli import main

    assert main(["sync", "http://127.0.0.1:9/dicom-web", "--state", str(tmp_path / "s.db"), *options]) == 2
    assert "need a FHIR server (--fhir-url)" in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()


def test_a_token_endpoint_that_takes_the_secret_only_in_the_form_gets_it_there_with_client_auth_post(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRAWLER_SECRET", SECRET)
    with FakeOAuth(secrets_by_client={"crawler": SECRET}, secret_method="post") as oauth, \
            FakePacs(n_studies=4, seed=8, token=oauth.valid) as pacs:
        code, _, err = run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / "a.db"), "--metadata", "never", *oauth_args(oauth))
        assert code == 2 and "invalid_client" in err   # Basic, the default, is refused by this endpoint
        code, out, err = run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / "b.db"), "--metadata", "never", "--json",
                                 *oauth_args(oauth, "--oauth-client-auth", "post"))
        assert code == 0, err
        assert json.loads(out)["studies_new"] == 4
    assert oauth.methods == ["post"] and oauth.refusals == ["invalid_client"]


def test_client_auth_goes_with_a_secret_not_with_a_private_key(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sync", "http://127.0.0.1:9/dicom-web", "--state", str(tmp_path / "s.db"),
                           "--oauth-token-url", "http://127.0.0.1:9/token", "--oauth-client-id", "crawler",
                           "--oauth-private-key", str(tmp_path / "key.pem"), "--oauth-client-auth", "post")
    assert code == 2
    assert "--oauth-client-auth says how a client secret is sent; --oauth-private-key signs an assertion instead" in err
    assert not (tmp_path / "s.db").exists()


def test_an_encrypted_private_key_is_read_with_its_passphrase_from_the_environment(tmp_path, capsys, monkeypatch):
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"Pass-phrase-1")))
    plain = tmp_path / "plain.pem"
    plain.write_bytes(pem(key))
    with FakeOAuth(keys_by_client={"crawler": key.public_key()}) as oauth, FakePacs(n_studies=3, seed=9, token=oauth.valid) as pacs:
        def sync(name, *more):
            return run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / f"{name}.db"), "--metadata", "never", "--json",
                           "--oauth-token-url", oauth.token_url, "--oauth-client-id", "crawler", *more)

        code, _, err = sync("none", "--oauth-private-key", str(path))
        assert code == 2 and f"the private key {path} is encrypted: name the environment variable that holds its passphrase " \
                              "with --oauth-private-key-passphrase-env" in err
        monkeypatch.setenv("KEY_PASSPHRASE", "wrong")
        code, _, err = sync("wrong", "--oauth-private-key", str(path), "--oauth-private-key-passphrase-env", "KEY_PASSPHRASE")
        assert code == 2 and f"the passphrase in KEY_PASSPHRASE does not decrypt the private key {path}" in err
        assert "wrong" not in err
        code, _, err = sync("plain", "--oauth-private-key", str(plain), "--oauth-private-key-passphrase-env", "KEY_PASSPHRASE")
        assert code == 2 and "is not encrypted: leave out --oauth-private-key-passphrase-env" in err
        monkeypatch.setenv("KEY_PASSPHRASE", "Pass-phrase-1")
        code, out, err = sync("right", "--oauth-private-key", str(path), "--oauth-private-key-passphrase-env", "KEY_PASSPHRASE", "-vv")
        assert code == 0, err
        assert json.loads(out)["studies_new"] == 3 and oauth.methods == ["jwt"]
        assert "Pass-phrase-1" not in out + err
        monkeypatch.delenv("KEY_PASSPHRASE")
        code, _, err = sync("unset", "--oauth-private-key", str(path), "--oauth-private-key-passphrase-env", "KEY_PASSPHRASE")
        assert code == 2 and "the environment variable KEY_PASSPHRASE is not set or empty" in err
        code, _, err = sync("alone", "--oauth-client-secret-env", "X", "--oauth-private-key-passphrase-env", "KEY_PASSPHRASE")
        assert code == 2 and "--oauth-private-key-passphrase-env goes with --oauth-private-key" in err
