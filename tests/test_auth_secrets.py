"""No secret of any kind of credentials appears anywhere a run leaves text: with every kind, a sync
at -vv with --json and --out, then stderr, stdout, the state's files (bytes) and the run folder are
searched for the password, the tokens (given, printed by a command, issued by the token endpoint
simulator), the client secret, the private key's text and the JWT assertions sent. The servers are
the QIDO, FHIR and OAuth2 token endpoint simulators (fixtures/fakepacs.py, fakefhir.py, fakeoauth.py)."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from crawler.cli import main
from fixtures.fakefhir import FakeFhir
from fixtures.fakeoauth import FakeOAuth
from fixtures.fakepacs import FakePacs

PASSWORD = "pw-Secret-5501"
TOKEN = "tok-Secret-5502"
COMMAND_TOKEN = "cmd-Secret-5503"
CLIENT_SECRET = "cs-Secret-5504"
FHIR_SECRET = "fcs-Secret-5505"


def run(capsys, tmp_path: Path, *args: str, files: bool = True) -> tuple[int, str]:
    """The exit code and everything the run left as text: stderr, stdout, the state's files and
    the run folder's, as bytes decoded leniently (so a secret is found in a binary file too)."""
    code = main(["sync", *args, "--state", str(tmp_path / "state.db"), "--out", str(tmp_path / "out"), "--metadata", "never",
                 "-vv", "--json", "--timezone", "UTC"])
    out, err = capsys.readouterr()
    left = [err, out]
    for path in sorted([*tmp_path.glob("state.db*"), *(tmp_path / "out").rglob("*")]):
        if path.is_file():
            left.append(path.read_bytes().decode("latin-1"))
    assert len(left) >= 4 if files else len(left) >= 2, left[:2]   # stderr, stdout, the state and at least one output file
    return code, "\n".join(left)


def pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def key_secrets(text: str) -> list[str]:
    """The key's PEM and each line of its base64 body (a part of a key is a secret too)."""
    return [text, *(line for line in text.splitlines() if len(line) >= 40)]


def assert_nowhere(secrets: list[str], left: str) -> None:
    assert secrets and all(secrets)
    found = [secret[:12] + "..." for secret in secrets if secret in left]
    assert not found, f"secrets found: {found}"


def test_basic_bearer_and_token_command_leave_no_secret(tmp_path, capsys):
    with FakePacs(n_studies=3, seed=21, auth=("ann", PASSWORD)) as pacs:
        code, left = run(capsys, tmp_path / "basic", pacs.url, "--user", "ann", "--password", PASSWORD)
    assert code == 0, left[:2000]
    assert_nowhere([PASSWORD, base64.b64encode(f"ann:{PASSWORD}".encode()).decode()], left)
    with FakePacs(n_studies=3, seed=22, token=TOKEN) as pacs:
        code, left = run(capsys, tmp_path / "bearer", pacs.url, "--auth", "bearer", "--token", TOKEN)
    assert code == 0, left[:2000]
    assert_nowhere([TOKEN], left)
    script = tmp_path / "token.py"
    script.write_text(f"print({COMMAND_TOKEN!r})\n")
    with FakePacs(n_studies=3, seed=23, token=COMMAND_TOKEN) as pacs:
        code, left = run(capsys, tmp_path / "command", pacs.url, "--auth", "token-command", "--token-command", f"{sys.executable} {script}")
    assert code == 0, left[:2000]
    assert_nowhere([COMMAND_TOKEN], left)


def test_oauth_with_a_secret_from_the_environment_or_a_file_leaves_no_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PACS_CLIENT_SECRET", CLIENT_SECRET)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    with FakeOAuth(secrets_by_client={"crawler": CLIENT_SECRET}, expires_in=3600) as oauth, \
            FakePacs(n_studies=3, seed=24, token=oauth.valid) as pacs:
        base = ["--oauth-token-url", oauth.token_url, "--oauth-client-id", "crawler"]
        code, from_env = run(capsys, tmp_path / "env", pacs.url, *base, "--oauth-client-secret-env", "PACS_CLIENT_SECRET")
        assert code == 0, from_env[:2000]
        code, from_file = run(capsys, tmp_path / "file", pacs.url, "--auth", "oauth", *base, "--oauth-client-secret-file", str(secret_file))
        assert code == 0, from_file[:2000]
        code, in_form = run(capsys, tmp_path / "form", pacs.url, *base, "--oauth-client-secret-env", "PACS_CLIENT_SECRET",
                            "--oauth-client-auth", "post")
        assert code == 0, in_form[:2000]
    assert len(oauth.issued) == 3 and oauth.methods == ["basic", "basic", "post"]
    secrets = [CLIENT_SECRET, base64.b64encode(f"crawler:{CLIENT_SECRET}".encode()).decode(), *oauth.issued]
    assert_nowhere(secrets, from_env)
    assert_nowhere(secrets, from_file)
    assert_nowhere(secrets, in_form)


def test_oauth_with_a_private_key_leaves_no_secret(tmp_path, capsys):
    key = rsa.generate_private_key(65537, 2048)
    text = pem(key)
    path = tmp_path / "client.pem"
    path.write_text(text)
    with FakeOAuth(keys_by_client={"crawler": key.public_key()}, expires_in=3600) as oauth, \
            FakePacs(n_studies=3, seed=25, token=oauth.valid) as pacs:
        code, left = run(capsys, tmp_path / "run", pacs.url, "--oauth-token-url", oauth.token_url, "--oauth-client-id", "crawler",
                         "--oauth-private-key", str(path), "--oauth-key-id", "k-1")
    assert code == 0, left[:2000]
    assert oauth.issued and oauth.assertion_texts
    assert_nowhere([*key_secrets(text), *oauth.issued, *oauth.assertion_texts], left)


def test_smart_and_fhir_oauth_leave_no_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FHIR_CLIENT_SECRET", FHIR_SECRET)
    key = ec.generate_private_key(ec.SECP384R1())
    text = pem(key)
    path = tmp_path / "client.pem"
    path.write_text(text)
    with FakeOAuth(keys_by_client={"sync": key.public_key()}, secrets_by_client={"writer": FHIR_SECRET}, expires_in=3600) as oauth:
        configuration = {"token_endpoint": oauth.token_url, "token_endpoint_auth_methods_supported": ["private_key_jwt"]}
        with FakeFhir(token=oauth.valid, smart_configuration=configuration) as fhir, FakePacs(n_studies=3, seed=26) as pacs:
            code, smart = run(capsys, tmp_path / "smart", pacs.url, "--fhir-url", fhir.url, "--fhir-auth", "smart",
                              "--fhir-oauth-client-id", "sync", "--fhir-oauth-private-key", str(path))
            assert code == 0, smart[:2000]
            code, secret = run(capsys, tmp_path / "secret", pacs.url, "--fhir-url", fhir.url, "--fhir-oauth-token-url", oauth.token_url,
                               "--fhir-oauth-client-id", "writer", "--fhir-oauth-client-secret-env", "FHIR_CLIENT_SECRET")
            assert code == 0, secret[:2000]
            assert len([k for k in fhir.resources if k[0] == "ImagingStudy"]) == 3
    assert len(oauth.issued) == 2 and oauth.methods == ["jwt", "basic"]
    secrets = [*key_secrets(text), *oauth.issued, *oauth.assertion_texts, FHIR_SECRET]
    assert_nowhere(secrets, smart)
    assert_nowhere(secrets, secret)


def test_a_refused_client_and_an_unreachable_endpoint_leave_no_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PACS_CLIENT_SECRET", CLIENT_SECRET)
    with FakeOAuth(secrets_by_client={"crawler": "another-secret"}) as oauth, FakePacs(n_studies=2, seed=27) as pacs:
        code, refused = run(capsys, tmp_path / "refused", pacs.url, "--oauth-token-url", oauth.token_url, "--oauth-client-id", "crawler",
                            "--oauth-client-secret-env", "PACS_CLIENT_SECRET", files=False)
    assert code == 2 and "invalid_client" in refused
    assert_nowhere([CLIENT_SECRET, "another-secret"], refused)
    code, unreachable = run(capsys, tmp_path / "unreachable", "http://127.0.0.1:9/dicom-web", "--oauth-token-url", "http://127.0.0.1:9/token",
                            "--oauth-client-id", "crawler", "--oauth-client-secret-env", "PACS_CLIENT_SECRET", files=False)
    assert code == 3 and "cannot get an OAuth token" in unreachable
    assert_nowhere([CLIENT_SECRET], unreachable)


def test_a_sources_file_names_the_client_secret_by_its_variable_and_refuses_the_secret_itself(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PACS_A_SECRET", CLIENT_SECRET)
    with FakeOAuth(secrets_by_client={"crawler-a": CLIENT_SECRET}) as oauth, FakePacs(n_studies=3, seed=28, token=oauth.valid) as pacs:
        config = tmp_path / "sources.toml"
        config.write_text(f'[defaults]\nmetadata = "never"\n\n[sources.a]\nurl = "{pacs.url}"\noauth-token-url = "{oauth.token_url}"\n'
                          f'oauth-client-id = "crawler-a"\noauth-client-secret-env = "PACS_A_SECRET"\n')
        code = main(["sync", "--config", str(config), "--state", str(tmp_path / "state.db"), "--json", "-vv"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert len(oauth.issued) == 1
    assert_nowhere([CLIENT_SECRET, *oauth.issued], "\n".join([out, err, (tmp_path / "state.db").read_bytes().decode("latin-1")]))
    config.write_text(f'[sources.a]\nurl = "http://127.0.0.1:9/dicom-web"\noauth-client-secret = "{CLIENT_SECRET}"\n')
    assert main(["sync", "--config", str(config), "--state", str(tmp_path / "other.db")]) == 2
    err = capsys.readouterr().err
    assert "oauth-client-secret is a secret and has no place in the file; name the environment variable that holds it with " \
           "oauth-client-secret-env" in err
    assert CLIENT_SECRET not in err
