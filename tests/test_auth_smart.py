"""SMART Backend Services (--fhir-auth smart) and OAuth2 for the FHIR server: the FHIR simulator
(fixtures/fakefhir.py) behind a SMART configuration and the token endpoint simulator
(fixtures/fakeoauth.py), which verifies each JWT client assertion with the client's public key."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from crawler.cli import main
from fixtures.fakefhir import FakeFhir
from fixtures.fakeoauth import FakeOAuth
from fixtures.fakepacs import FakePacs


def sync(capsys, *args: str) -> tuple[int, dict, str]:
    code = main(["sync", *args, "--metadata", "never", "--json", "--retries", "0", "--timezone", "UTC"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}, captured.err


def key_file(tmp_path: Path, key) -> str:
    path = tmp_path / "client.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(path)


def smart_configuration(oauth: FakeOAuth, methods=("private_key_jwt",)) -> dict:
    return {"token_endpoint": oauth.token_url, "token_endpoint_auth_methods_supported": list(methods),
            "grant_types_supported": ["client_credentials"], "capabilities": ["client-confidential-asymmetric"]}


def smart_args(fhir: FakeFhir, key: str) -> list[str]:
    return ["--fhir-url", fhir.url, "--fhir-auth", "smart", "--fhir-oauth-client-id", "imaging-sync",
            "--fhir-oauth-private-key", key, "--fhir-oauth-key-id", "sync-key-1"]


def test_sync_to_a_smart_fhir_server_finds_the_token_endpoint_and_writes_the_studies(tmp_path, capsys):
    key = ec.generate_private_key(ec.SECP384R1())
    with FakeOAuth(keys_by_client={"imaging-sync": key.public_key()}) as oauth, \
            FakeFhir(token=oauth.valid, smart_configuration=smart_configuration(oauth)) as fhir, \
            FakePacs(n_studies=5, seed=11) as pacs:
        code, summary, err = sync(capsys, pacs.url, "--state", str(tmp_path / "s.db"), *smart_args(fhir, key_file(tmp_path, key)))
        assert code == 0, err
        assert summary["studies_new"] == 5 and summary["studies_failed"] == 0
        studies = [k for k in fhir.resources if k[0] == "ImagingStudy"]
        assert len(studies) == 5
        assert fhir.statuses[401] == 0 and oauth.rejected == 0
        assert fhir.requests[0].path == "/.well-known/smart-configuration"
    assert len(oauth.issued) == 1 and oauth.methods == ["jwt"]
    (claims,) = oauth.assertions
    assert claims["iss"] == claims["sub"] == "imaging-sync" and claims["aud"] == oauth.token_url and claims["kid"] == "sync-key-1"
    assert claims["exp"] - claims["iat"] <= 300
    assert oauth.scopes_asked == ["system/Endpoint.cruds system/ImagingStudy.cruds"]


def test_a_revoked_fhir_token_is_fetched_again_and_the_bundles_go_on(tmp_path, capsys):
    key = rsa.generate_private_key(65537, 2048)
    checked = itertools.count()
    with FakeOAuth(keys_by_client={"imaging-sync": key.public_key()}) as oauth:

        def valid(token: str) -> bool:
            if next(checked) == 2:
                oauth.revoke()
            return oauth.valid(token)

        with FakeFhir(token=valid, smart_configuration=smart_configuration(oauth)) as fhir, FakePacs(n_studies=6, seed=12) as pacs:
            code, summary, err = sync(capsys, pacs.url, "--state", str(tmp_path / "s.db"), "--fhir-batch-size", "2", "--patients",
                                      *smart_args(fhir, key_file(tmp_path, key)))
            assert code == 0, err
            assert summary["studies_new"] == 6 and summary["studies_failed"] == 0
            assert len([k for k in fhir.resources if k[0] == "ImagingStudy"]) == 6
            assert fhir.statuses[401] == 1
    assert len(oauth.issued) == 2 and len({c["jti"] for c in oauth.assertions}) == 2
    assert oauth.scopes_asked[0] == "system/Endpoint.cruds system/ImagingStudy.cruds system/Patient.cruds"


def test_fhir_oauth_with_a_secret_and_its_own_token_url(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FHIR_CLIENT_SECRET", "fhir-Secret-31")
    with FakeOAuth(secrets_by_client={"fhir-writer": "fhir-Secret-31"}) as oauth, FakeFhir(token=oauth.valid) as fhir, \
            FakePacs(n_studies=3, seed=13) as pacs:
        code, summary, err = sync(capsys, pacs.url, "--state", str(tmp_path / "s.db"), "--fhir-url", fhir.url,
                                  "--fhir-oauth-token-url", oauth.token_url, "--fhir-oauth-client-id", "fhir-writer",
                                  "--fhir-oauth-client-secret-env", "FHIR_CLIENT_SECRET", "--fhir-oauth-scope", "system/*.cruds")
        assert code == 0, err and summary["studies_new"] == 3
        assert len([k for k in fhir.resources if k[0] == "ImagingStudy"]) == 3
    assert oauth.methods == ["basic"] and oauth.scopes_asked == ["system/*.cruds"]


@pytest.mark.parametrize(("configuration", "words"), [
    ({"token_endpoint_auth_methods_supported": ["private_key_jwt"]}, "names no token_endpoint"),
    (None, "does not take private_key_jwt"),
])
def test_a_smart_configuration_without_what_backend_services_need_is_exit_2(tmp_path, capsys, configuration, words):
    key = ec.generate_private_key(ec.SECP384R1())
    with FakeOAuth(keys_by_client={"imaging-sync": key.public_key()}) as oauth:
        served = configuration or smart_configuration(oauth, methods=("client_secret_basic",))
        with FakeFhir(token=oauth.valid, smart_configuration=served) as fhir, FakePacs(n_studies=2, seed=14) as pacs:
            code, _, err = sync(capsys, pacs.url, "--state", str(tmp_path / "s.db"), *smart_args(fhir, key_file(tmp_path, key)))
            assert pacs.requests == []
    assert code == 2 and words in err and "--fhir-oauth-token-url" in err
    assert oauth.issued == []


def test_smart_with_a_secret_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FHIR_CLIENT_SECRET", "x")
    code, _, err = sync(capsys, "http://127.0.0.1:9/dicom-web", "--state", str(tmp_path / "s.db"), "--fhir-url", "http://127.0.0.1:9/fhir",
                        "--fhir-auth", "smart", "--fhir-oauth-client-id", "c", "--fhir-oauth-client-secret-env", "FHIR_CLIENT_SECRET")
    assert code == 2 and "--fhir-oauth-private-key" in err and "not a secret" in err


def test_audit_reads_a_smart_fhir_server_with_the_read_scope_and_renews_a_revoked_token(tmp_path, capsys):
    key = ec.generate_private_key(ec.SECP384R1())
    revoke = []
    with FakeOAuth(keys_by_client={"imaging-sync": key.public_key()}) as oauth:

        def valid(token: str) -> bool:
            if revoke:
                revoke.clear()
                oauth.revoke()
            return oauth.valid(token)

        with FakeFhir(token=valid, smart_configuration=smart_configuration(oauth)) as fhir, FakePacs(n_studies=3, seed=15) as pacs:
            path = key_file(tmp_path, key)
            code, _, err = sync(capsys, pacs.url, "--state", str(tmp_path / "s.db"), *smart_args(fhir, path))
            assert code == 0, err
            revoke.append(True)                     # the audit's first request finds its token revoked
            code = main(["audit", pacs.url, "--report", str(tmp_path / "report"), *smart_args(fhir, path), "--timezone", "UTC"])
            err = capsys.readouterr().err
            assert code == 0, err
            assert fhir.statuses[401] == 1
    assert len(oauth.issued) == 3
    assert oauth.scopes_asked[1:] == ["system/ImagingStudy.rs"] * 2


def test_an_unreachable_fhir_token_endpoint_is_exit_3_before_any_study(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FHIR_CLIENT_SECRET", "fhir-Secret-32")
    with FakeFhir() as fhir, FakePacs(n_studies=2, seed=16) as pacs:
        code, _, err = sync(capsys, pacs.url, "--state", str(tmp_path / "s.db"), "--fhir-url", fhir.url,
                            "--fhir-oauth-token-url", "http://127.0.0.1:9/token", "--fhir-oauth-client-id", "w",
                            "--fhir-oauth-client-secret-env", "FHIR_CLIENT_SECRET")
        assert fhir.requests == [] and pacs.requests == []
    assert code == 3 and "cannot get an OAuth token for the FHIR server from http://127.0.0.1:9" in err
    assert "fhir-Secret-32" not in err
