"""The cloud kinds of credentials (crawler/auth/gcp.py, azure.py, aws.py), without a network.

GCP and Azure get their libraries' own credential objects (google-auth's OAuth2 credentials with a
``refresh_handler``; an object with azure-core's ``get_token -> AccessToken``), which count the
tokens they issue. AWS Signature V4 is checked by the QIDO simulator (fixtures/fakepacs.py,
``sigv4=``), which makes each signature again with botocore's own signer from what it received.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import google.auth
import google.auth.exceptions
import google.oauth2.credentials
import pytest
import requests
from azure import identity as azure_identity
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.identity import CredentialUnavailableError
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as AwsKeys

from crawler.auth import aws, azure, gcp
from crawler.errors import ConfigError, SinkError, SourceUnreachable
from fixtures.fakepacs import FakePacs

THREADS = 16
FHIR = SimpleNamespace(fhir=True, base_url="https://ws-fhir.fhir.azurehealthcareapis.com/R4", options={})


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _all_at_once(call, n: int = THREADS) -> list:
    """``call()`` from ``n`` threads released together; their results."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


# --- GCP --------------------------------------------------------------------------------------


class GoogleIssuer:
    """A refresh_handler for google-auth's OAuth2 credentials: issues gcp-token-1, -2, ... valid
    for ``lifetime``, slowly enough that threads asking together pile up behind one renewal."""

    def __init__(self, lifetime: float = 3600.0) -> None:
        self.issued = 0
        self.lifetime = lifetime
        self.scopes: list = []
        self._lock = threading.Lock()

    def __call__(self, request, scopes):
        time.sleep(0.05)
        with self._lock:
            self.issued += 1
            self.scopes.append(scopes)
            return f"gcp-token-{self.issued}", _utcnow() + datetime.timedelta(seconds=self.lifetime)


def _google(token: str | None, expires_in: float, issuer: GoogleIssuer) -> google.oauth2.credentials.Credentials:
    expiry = _utcnow() + datetime.timedelta(seconds=expires_in)
    return google.oauth2.credentials.Credentials(token=token, expiry=expiry, refresh_handler=issuer, scopes=[gcp.SCOPE])


def test_gcp_token_about_to_expire_is_renewed_before_use_once_for_all_threads():
    issuer = GoogleIssuer()
    credentials = gcp.GcpCredentials(credentials=_google("gcp-old", 30, issuer), request=object())
    headers = _all_at_once(lambda: credentials.headers("GET", "https://healthcare.googleapis.com/v1/x/dicomWeb/studies"))
    assert headers == [{"Authorization": "Bearer gcp-token-1"}] * THREADS
    assert issuer.issued == 1


def test_gcp_token_valid_for_long_is_used_as_it_is():
    issuer = GoogleIssuer()
    credentials = gcp.GcpCredentials(credentials=_google("gcp-fresh", 3600, issuer), request=object())
    assert credentials.headers("GET", "https://x/studies") == {"Authorization": "Bearer gcp-fresh"}
    assert credentials.headers("GET", "https://x/studies") == {"Authorization": "Bearer gcp-fresh"}
    assert issuer.issued == 0


def test_gcp_renews_within_a_minute_of_expiry_by_its_own_clock():
    """google-auth's own ``valid`` renews 3 min 45 s ahead; the kind's 60 s margin holds whatever
    the library does (here a clock that says 30 s are left, the library believing an hour)."""
    issuer = GoogleIssuer()
    google_creds = _google("gcp-fresh", 3600, issuer)
    credentials = gcp.GcpCredentials(credentials=google_creds, request=object(), now=lambda: google_creds.expiry - datetime.timedelta(seconds=30))
    assert credentials.headers("GET", "https://x/studies") == {"Authorization": "Bearer gcp-token-1"}


def test_gcp_token_of_a_few_minutes_is_not_renewed_for_every_request():
    """google-auth's ``valid`` turns False 3 min 45 s before expiry: a token issued for 2 minutes
    (a short-lived or impersonated one) would be fetched again for each request; the kind keeps it
    until 60 s before its expiry."""
    import google.auth.credentials

    class ShortLived(google.auth.credentials.Credentials):
        """google-auth's base credentials, refreshed by a token service that issues 2-minute tokens."""

        issued = 0

        def refresh(self, request):
            ShortLived.issued += 1
            self.token, self.expiry = f"gcp-token-{ShortLived.issued}", _utcnow() + datetime.timedelta(seconds=120)

    credentials = gcp.GcpCredentials(credentials=ShortLived(), request=object())
    for _ in range(5):
        assert credentials.headers("GET", "https://x/studies") == {"Authorization": "Bearer gcp-token-1"}
    assert ShortLived.issued == 1


def test_gcp_token_shorter_lived_than_the_margin_is_kept_for_three_quarters_of_its_life():
    import google.auth.credentials

    now = [datetime.datetime(2026, 1, 1, 12, 0, 0)]

    class Brief(google.auth.credentials.Credentials):
        issued = 0

        def refresh(self, request):
            Brief.issued += 1
            self.token, self.expiry = f"gcp-token-{Brief.issued}", now[0] + datetime.timedelta(seconds=20)

        @property
        def valid(self):
            return self.token is not None and now[0] < self.expiry

    credentials = gcp.GcpCredentials(credentials=Brief(), request=object(), now=lambda: now[0])
    assert credentials.headers("GET", "https://x") == {"Authorization": "Bearer gcp-token-1"}
    now[0] += datetime.timedelta(seconds=14)
    assert credentials.headers("GET", "https://x") == {"Authorization": "Bearer gcp-token-1"}
    now[0] += datetime.timedelta(seconds=2)
    assert credentials.headers("GET", "https://x") == {"Authorization": "Bearer gcp-token-2"}
    assert Brief.issued == 2


def test_gcp_application_default_credentials_are_asked_for_the_cloud_healthcare_scope(monkeypatch):
    issuer = GoogleIssuer()
    asked = []

    def default(scopes=None, **kwargs):
        asked.append(scopes)
        return _google(None, 0, issuer), "project-x"

    monkeypatch.setattr(google.auth, "default", default)
    credentials = gcp.GcpCredentials(request=object())
    assert credentials.headers("GET", "https://x/studies") == {"Authorization": "Bearer gcp-token-1"}
    assert asked == [["https://www.googleapis.com/auth/cloud-healthcare"]]


def test_gcp_refresh_after_401_renews_once_for_the_threads_that_sent_the_same_token():
    issuer = GoogleIssuer()
    credentials = gcp.GcpCredentials(credentials=_google("gcp-fresh", 3600, issuer), request=object())
    used = credentials.headers("GET", "https://x/studies")
    assert _all_at_once(lambda: credentials.refresh(used)) == [True] * THREADS
    assert issuer.issued == 1
    assert credentials.headers("GET", "https://x/studies") == {"Authorization": "Bearer gcp-token-1"}


def test_gcp_without_application_default_credentials_is_a_config_error(monkeypatch):
    def default(scopes=None, **kwargs):
        raise google.auth.exceptions.DefaultCredentialsError("File /home/u/secret-key.json was not found.")

    monkeypatch.setattr(google.auth, "default", default)
    with pytest.raises(ConfigError, match="no Google Application Default Credentials") as caught:
        gcp.GcpCredentials(request=object())
    assert "secret-key" not in str(caught.value)


def test_gcp_refused_renewal_names_the_oauth_error_code_and_nothing_else():
    def refuse(request, scopes):
        raise google.auth.exceptions.RefreshError("invalid_grant: token for sensitive@x revoked", {"error": "invalid_grant", "error_description": "sensitive@x"})

    credentials = gcp.GcpCredentials(credentials=_google(None, 0, refuse), request=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as caught:
        credentials.headers("GET", "https://x/studies")
    assert "(invalid_grant)" in str(caught.value)
    assert "sensitive" not in str(caught.value)


def test_gcp_token_service_unreachable_is_exit_3_for_the_source_and_the_fhir_server():
    def unreachable(request, scopes):
        raise google.auth.exceptions.TransportError("connection refused to oauth2.googleapis.com")

    with pytest.raises(SourceUnreachable, match="Google token service could not be reached"):
        gcp.GcpCredentials(credentials=_google(None, 0, unreachable), request=object()).headers("GET", "https://x")  # type: ignore[arg-type]
    with pytest.raises(SinkError, match="Google token service could not be reached"):
        gcp.GcpCredentials(FHIR, credentials=_google(None, 0, unreachable), request=object()).headers("POST", "https://x")  # type: ignore[arg-type]


# --- Azure ------------------------------------------------------------------------------------


class AzureIssuer:
    """An azure-core TokenCredential: ``get_token`` issues az-token-1, -2, ... expiring at the
    times in ``expiries`` (Unix, by the test's clock), slowly enough for threads to pile up."""

    def __init__(self, *expiries: float) -> None:
        self.expiries = list(expiries)
        self.scopes: list = []
        self._lock = threading.Lock()

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        time.sleep(0.05)
        with self._lock:
            self.scopes.append(scopes)
            return AccessToken(f"az-token-{len(self.scopes)}", int(self.expiries[len(self.scopes) - 1]))

    @property
    def issued(self) -> int:
        return len(self.scopes)


def test_azure_token_is_kept_until_a_minute_before_it_expires_then_renewed_once_for_all_threads():
    now = [1_000_000.0]
    issuer = AzureIssuer(now[0] + 3600, now[0] + 7200)
    credentials = azure.AzureCredentials(credential=issuer, clock=lambda: now[0])
    url = "https://ws-dicom.dicom.azurehealthcareapis.com/v2/studies"
    assert credentials.headers("GET", url) == {"Authorization": "Bearer az-token-1"}
    now[0] += 3600 - 61
    assert credentials.headers("GET", url) == {"Authorization": "Bearer az-token-1"}
    now[0] += 2
    assert _all_at_once(lambda: credentials.headers("GET", url)) == [{"Authorization": "Bearer az-token-2"}] * THREADS
    assert issuer.issued == 2
    assert issuer.scopes == [("https://dicom.healthcareapis.azure.com/.default",)] * 2


def test_azure_token_shorter_lived_than_the_margin_is_kept_for_three_quarters_of_its_life():
    """A token issued for 20 s would always be within 60 s of expiry: it is renewed when a quarter
    of its life is left instead, as the oauth kind does."""
    now = [1_000_000.0]
    issuer = AzureIssuer(now[0] + 20, now[0] + 40)
    credentials = azure.AzureCredentials(credential=issuer, clock=lambda: now[0])
    assert credentials.headers("GET", "https://x") == {"Authorization": "Bearer az-token-1"}
    now[0] += 14
    assert credentials.headers("GET", "https://x") == {"Authorization": "Bearer az-token-1"}
    now[0] += 2
    assert credentials.headers("GET", "https://x") == {"Authorization": "Bearer az-token-2"}
    assert issuer.issued == 2


def test_azure_scope_of_a_fhir_server_is_its_origin():
    issuer = AzureIssuer(time.time() + 3600)
    credentials = azure.AzureCredentials(FHIR, credential=issuer)
    credentials.headers("POST", FHIR.base_url)
    assert issuer.scopes == [("https://ws-fhir.fhir.azurehealthcareapis.com/.default",)]


def test_azure_refresh_after_401_asks_once_and_says_whether_the_token_changed():
    issuer = AzureIssuer(*[time.time() + 3600] * 3)
    credentials = azure.AzureCredentials(credential=issuer)
    used = credentials.headers("GET", "https://x/studies")
    assert _all_at_once(lambda: credentials.refresh(used)) == [True] * THREADS
    assert issuer.issued == 2

    class Same(AzureIssuer):
        def get_token(self, *scopes, **kwargs):
            super().get_token(*scopes)
            return AccessToken("az-same", int(time.time() + 3600))

    same = azure.AzureCredentials(credential=Same(*[0] * 2))
    assert same.refresh(same.headers("GET", "https://x")) is False


@pytest.mark.parametrize(
    ("error", "expected", "fhir"),
    [
        (CredentialUnavailableError("EnvironmentCredential: secret-env-detail"), ConfigError, False),
        (ClientAuthenticationError("AADSTS7000215: Invalid client secret s3cr3t provided"), ConfigError, False),
        (ServiceRequestError("connection refused to login.microsoftonline.com"), SourceUnreachable, False),
        (ServiceRequestError("connection refused to login.microsoftonline.com"), SinkError, True),
    ],
)
def test_azure_failures_map_to_exit_codes_without_the_libraries_text(error, expected, fhir):
    class Failing:
        def get_token(self, *scopes, **kwargs):
            raise error

    credentials = azure.AzureCredentials(FHIR if fhir else None, credential=Failing())
    with pytest.raises(expected) as caught:
        credentials.headers("GET", "https://x")
    assert not any(word in str(caught.value) for word in ("secret-env-detail", "s3cr3t", "AADSTS", "microsoftonline"))


# --- AWS Signature V4 -------------------------------------------------------------------------

KEY_ID, SECRET, REGION = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "eu-west-1"


def test_region_is_read_from_healthimaging_host_names():
    assert aws.region_from_url("https://dicom-medical-imaging.eu-west-1.amazonaws.com/datastore/abc") == "eu-west-1"
    assert aws.region_from_url("https://dicom-medical-imaging.us-gov-west-1.amazonaws.com/datastore/abc") == "us-gov-west-1"
    assert aws.region_from_url("https://dicom-medical-imaging.ap-southeast-2.amazonaws.com:443/x") == "ap-southeast-2"
    assert aws.region_from_url("http://127.0.0.1:8042/dicom-web") is None
    assert aws.region_from_url("https://eu-west-1.example.org/x") is None


def test_region_given_wins_and_a_region_is_needed(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    keys = AwsKeys(KEY_ID, SECRET)
    url = "https://dicom-medical-imaging.eu-west-1.amazonaws.com/datastore/abc"
    assert aws.AwsSigV4(url=url, credentials=keys).region == "eu-west-1"
    assert aws.AwsSigV4(SimpleNamespace(fhir=False, base_url=url, options={"region": "us-east-1"}), credentials=keys).region == "us-east-1"
    with pytest.raises(ConfigError, match="--aws-region") as caught:
        aws.AwsSigV4(url="http://127.0.0.1:1/dicom-web", credentials=keys)
    assert caught.value.setting == "aws_region"


def test_no_aws_credentials_is_a_config_error(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="no AWS credentials found"):
        aws.AwsSigV4(url="https://dicom-medical-imaging.eu-west-1.amazonaws.com/datastore/abc")


def test_credentials_from_the_environment_sign_with_their_session_token(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-1")
    signer = aws.AwsSigV4(url="https://dicom-medical-imaging.eu-west-1.amazonaws.com/datastore/abc")
    headers = signer.headers("GET", "https://dicom-medical-imaging.eu-west-1.amazonaws.com/datastore/abc/studies?limit=10")
    assert headers["X-Amz-Security-Token"] == "session-token-1"
    assert headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={KEY_ID}/")
    assert "/eu-west-1/medical-imaging/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=" in headers["Authorization"]
    assert SECRET not in repr(signer) and SECRET not in str(headers)


def test_the_query_is_signed_in_canonical_encoding():
    assert aws.canonical_url("https://h/dicom-web/studies?includefield=00080020,00080030&StudyDate=20240101-&x=%2A") == (
        "https://h/dicom-web/studies?includefield=00080020%2C00080030&StudyDate=20240101-&x=%2A"
    )
    assert aws.canonical_url("https://h/p") == "https://h/p"


def _get(pacs: FakePacs, path: str, headers) -> requests.Response:
    return requests.get(f"{pacs.url}/{path}", headers=dict(headers), timeout=10)


QUERY = "studies?includefield=00080020,00080030&limit=5&StudyDate=20000101-20241231"


def test_simulator_accepts_requests_signed_by_the_kind_with_the_right_credentials():
    with FakePacs(n_studies=7, sigv4=(KEY_ID, SECRET, REGION)) as pacs:
        signer = aws.AwsSigV4(url=pacs.url, region=REGION, credentials=AwsKeys(KEY_ID, SECRET))
        answer = _get(pacs, QUERY, signer.headers("GET", f"{pacs.url}/{QUERY}"))
        assert answer.status_code == 200, answer.text
        assert len(answer.json()) == 5
    with FakePacs(n_studies=7, sigv4=(KEY_ID, SECRET, REGION, "session-token-1")) as pacs:
        signer = aws.AwsSigV4(url=pacs.url, region=REGION, credentials=AwsKeys(KEY_ID, SECRET, "session-token-1"))
        assert _get(pacs, QUERY, signer.headers("GET", f"{pacs.url}/{QUERY}")).status_code == 200


def _refusal(answer: requests.Response) -> str:
    assert answer.status_code == 403, answer.text
    return answer.headers["x-amzn-ErrorType"].partition(":")[0]


def test_simulator_refuses_what_aws_refuses():
    """Each refusal is AWS's, and the kind's refusal_cause names it without the server's text."""
    url = None
    with FakePacs(n_studies=3, sigv4=(KEY_ID, SECRET, REGION, "session-token-1")) as pacs:
        url = f"{pacs.url}/{QUERY}"

        def signed(**kwargs) -> requests.Response:
            keys = {"credentials": AwsKeys(kwargs.pop("key", KEY_ID), kwargs.pop("secret", SECRET), kwargs.pop("token", "session-token-1"))}
            return _get(pacs, QUERY, aws.AwsSigV4(url=pacs.url, region=kwargs.pop("region", REGION), **keys).headers("GET", url))

        assert signed().status_code == 200
        assert _refusal(signed(region="us-east-1")) == "SignatureDoesNotMatch"
        assert _refusal(signed(secret="another-secret")) == "SignatureDoesNotMatch"
        assert _refusal(signed(token="session-token-2")) == "SignatureDoesNotMatch"
        assert _refusal(signed(key="AKIDOTHER")) == "UnrecognizedClientException"
        assert _refusal(_get(pacs, QUERY, {})) == "IncompleteSignature"
        # the signature of another request (another query) does not pass for this one
        other = aws.AwsSigV4(url=pacs.url, region=REGION, credentials=AwsKeys(KEY_ID, SECRET, "session-token-1")).headers("GET", f"{pacs.url}/studies")
        assert _refusal(_get(pacs, QUERY, other)) == "SignatureDoesNotMatch"
        # a Host other than the one signed (the URL's, with its port) is a mismatch too
        headers = dict(aws.AwsSigV4(url=pacs.url, region=REGION, credentials=AwsKeys(KEY_ID, SECRET, "session-token-1")).headers("GET", url))
        refused = requests.get(url, headers={**headers, "Host": "127.0.0.1"}, timeout=10)
        assert _refusal(refused) == "SignatureDoesNotMatch"
        cause = aws.refusal_cause(refused.headers, refused.content)
        assert cause is not None and cause.startswith("SignatureDoesNotMatch: ") and "region" in cause
        assert "calculated" not in cause


def test_simulator_checks_the_query_as_aws_encodes_it():
    """botocore signs a query as given: signed raw (``,`` unencoded), the signature is not the one
    AWS computes over its canonical encoding. The kind signs the canonical form, and passes."""
    with FakePacs(n_studies=3, sigv4=(KEY_ID, SECRET, REGION)) as pacs:
        url = f"{pacs.url}/{QUERY}"
        raw = AWSRequest(method="GET", url=url, headers={})
        SigV4Auth(AwsKeys(KEY_ID, SECRET), "medical-imaging", REGION).add_auth(raw)
        assert _refusal(_get(pacs, QUERY, {k: v for k, v in raw.headers.items()})) == "SignatureDoesNotMatch"
        signer = aws.AwsSigV4(url=pacs.url, region=REGION, credentials=AwsKeys(KEY_ID, SECRET))
        assert _get(pacs, QUERY, signer.headers("GET", url)).status_code == 200


@pytest.mark.parametrize("offset", [20 * 60, -20 * 60])
def test_simulator_refuses_a_clock_20_minutes_off(offset):
    with FakePacs(n_studies=3, sigv4=(KEY_ID, SECRET, REGION), sigv4_clock_offset=offset) as pacs:
        signer = aws.AwsSigV4(url=pacs.url, region=REGION, credentials=AwsKeys(KEY_ID, SECRET))
        refused = _get(pacs, QUERY, signer.headers("GET", f"{pacs.url}/{QUERY}"))
        assert _refusal(refused) == "RequestTimeTooSkewed"
        cause = aws.refusal_cause(refused.headers, refused.content)
        assert cause is not None and "clock" in cause
    with FakePacs(n_studies=3, sigv4=(KEY_ID, SECRET, REGION), sigv4_clock_offset=offset / 5) as pacs:
        signer = aws.AwsSigV4(url=pacs.url, region=REGION, credentials=AwsKeys(KEY_ID, SECRET))
        assert _get(pacs, QUERY, signer.headers("GET", f"{pacs.url}/{QUERY}")).status_code == 200


def test_refusal_cause_reads_aws_codes_only():
    assert aws.refusal_cause({"x-amzn-ErrorType": "RequestTimeTooSkewed:http://internal.amazon.com/coral/"}, b"").startswith("RequestTimeTooSkewed: ")
    expired = b'{"message": "Signature expired: 20260101T000000Z is now earlier than 20260101T001500Z"}'
    assert "clock" in aws.refusal_cause({"x-amzn-ErrorType": "InvalidSignatureException:http://x/"}, expired)
    assert aws.refusal_cause({}, b'{"__type": "com.amazonaws.x#AccessDeniedException", "message": "user arn:aws:iam::1:user/p"}') == (
        "AccessDeniedException: the AWS identity may not do this (IAM policy)"
    )
    assert aws.refusal_cause({}, b"<html>patient Doe</html>") is None
    assert aws.refusal_cause({"x-amzn-ErrorType": "not a code; patient Doe"}, b"") is None


def test_a_refusal_from_aws_names_its_cause_in_the_error():
    from urllib3 import HTTPHeaderDict

    from crawler.errors import FatalQidoError
    from crawler.http import Answer
    from crawler.qido import page_of

    url = "https://dicom-medical-imaging.eu-west-1.amazonaws.com/datastore/abc/studies?limit=100"
    body = b'{"__type": "SignatureDoesNotMatch", "message": "The canonical string for this request should have been GET /secret"}'
    refused = Answer(403, HTTPHeaderDict({"X-Amzn-ErrorType": "SignatureDoesNotMatch:http://internal.amazon.com/coral/"}), body, None)
    with pytest.raises(FatalQidoError) as caught:
        page_of(refused, url)
    assert str(caught.value).startswith("HTTP 403 (AWS SignatureDoesNotMatch: the signature does not match: check the secret access key and the region")
    assert "secret" not in str(caught.value).replace("secret access key", "")
    assert caught.value.status == 403
    with pytest.raises(FatalQidoError, match=r"^HTTP 403 \(forbidden\) from"):
        page_of(Answer(403, HTTPHeaderDict(), b"<html>patient Doe</html>", None), url)


# --- through the command line (--auth gcp|azure|aws) ------------------------------------------


def run_cli(capsys, *args):
    from crawler.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _aws_environment(monkeypatch, tmp_path, token: str | None = None) -> None:
    """Keys in the environment, and nothing else of botocore's chain (no files, no instance role)."""
    for name in ("AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    if token:
        monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _files_hold(folder, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_sync_signed_with_aws_signature_v4_finds_every_study(tmp_path, capsys, monkeypatch):
    _aws_environment(monkeypatch, tmp_path, token="session-token-1")
    with FakePacs(n_studies=24, seed=3, sigv4=(KEY_ID, SECRET, REGION, "session-token-1")) as pacs:
        code, out, err = run_cli(capsys, "sync", pacs.url, "--auth", "aws", "--aws-region", REGION, "--state", str(tmp_path / "s.db"),
                                 "--out", str(tmp_path / "out"), "--json", "-vv")
        statuses = pacs.statuses
        kinds = pacs.counts()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["studies_new"] == 24 and summary["studies_failed"] == 0
    assert statuses[403] == 0 and statuses[200] >= 24 + 1
    assert kinds["instances"] + kinds["metadata"] >= 24     # each study's own requests were signed too
    for secret in (SECRET, "session-token-1"):
        assert secret not in out and secret not in err
        assert _files_hold(tmp_path, secret) == []


@pytest.mark.parametrize(
    ("region", "offset", "code_name", "cause"),
    [("us-east-1", 0.0, "SignatureDoesNotMatch", "the region signed for"), (REGION, 20 * 60.0, "RequestTimeTooSkewed", "clock")],
    ids=["wrong-region", "clock-20-minutes-off"],
)
def test_aws_refusal_is_exit_3_naming_the_cause_and_never_the_secret(tmp_path, capsys, monkeypatch, region, offset, code_name, cause):
    _aws_environment(monkeypatch, tmp_path)
    with FakePacs(n_studies=5, seed=3, sigv4=(KEY_ID, SECRET, REGION), sigv4_clock_offset=offset) as pacs:
        code, out, err = run_cli(capsys, "sync", pacs.url, "--auth", "aws", "--aws-region", region, "--state", str(tmp_path / "s.db"),
                                 "--out", str(tmp_path / "out"), "--json", "-vv", "--retries", "0")
        assert pacs.statuses[403] >= 1 and pacs.statuses[200] == 0
    assert code == 3, err
    assert f"AWS {code_name}: " in err and cause in err
    assert SECRET not in out + err and "calculated" not in err
    assert _files_hold(tmp_path, SECRET) == []


def test_aws_region_goes_with_auth_aws_only(tmp_path, capsys):
    code, _out, err = run_cli(capsys, "sync", "http://127.0.0.1:9/dicom-web", "--aws-region", REGION, "--state", str(tmp_path / "s.db"),
                              "--out", str(tmp_path / "out"))
    assert code == 2 and "--aws-region goes with --auth aws" in err


def test_aws_without_a_region_is_exit_2_naming_the_option(tmp_path, capsys, monkeypatch):
    _aws_environment(monkeypatch, tmp_path)
    code, _out, err = run_cli(capsys, "sync", "http://127.0.0.1:9/dicom-web", "--auth", "aws", "--state", str(tmp_path / "s.db"),
                              "--out", str(tmp_path / "out"))
    assert code == 2 and "--aws-region" in err


def test_sync_with_google_application_default_credentials(tmp_path, capsys, monkeypatch):
    issuer = GoogleIssuer()
    asked = []

    def default(scopes=None, **kwargs):
        asked.append(scopes)
        return _google(None, 0, issuer), "project-x"

    monkeypatch.setattr(google.auth, "default", default)
    with FakePacs(n_studies=12, seed=4, token="gcp-token-1") as pacs:
        code, out, err = run_cli(capsys, "sync", pacs.url, "--auth", "gcp", "--state", str(tmp_path / "s.db"), "--out", str(tmp_path / "out"),
                                 "--json", "-vv")
        assert pacs.statuses[401] == 0
    assert code == 0, err
    assert json.loads(out)["studies_new"] == 12
    assert issuer.issued == 1 and asked == [[gcp.SCOPE]]
    assert "gcp-token-1" not in out + err and _files_hold(tmp_path, "gcp-token-1") == []


def test_sync_with_the_default_azure_credential(tmp_path, capsys, monkeypatch):
    issuer = AzureIssuer(time.time() + 3600)
    monkeypatch.setattr(azure_identity, "DefaultAzureCredential", lambda: issuer)
    with FakePacs(n_studies=12, seed=4, token="az-token-1") as pacs:
        code, out, err = run_cli(capsys, "sync", pacs.url, "--auth", "azure", "--state", str(tmp_path / "s.db"), "--out", str(tmp_path / "out"),
                                 "--json", "-vv")
        assert pacs.statuses[401] == 0
    assert code == 0, err
    assert json.loads(out)["studies_new"] == 12
    assert issuer.scopes == [(azure.DICOM_SCOPE,)]
    assert "az-token-1" not in out + err and _files_hold(tmp_path, "az-token-1") == []


def test_no_azure_identity_is_exit_2_before_the_pacs_is_asked(tmp_path, capsys, monkeypatch):
    class Nobody:
        def get_token(self, *scopes, **kwargs):
            raise CredentialUnavailableError("EnvironmentCredential: environment variables are not fully configured")

    monkeypatch.setattr(azure_identity, "DefaultAzureCredential", Nobody)
    with FakePacs(n_studies=2, seed=4, token="az-token-1") as pacs:
        code, _out, err = run_cli(capsys, "sync", pacs.url, "--auth", "azure", "--state", str(tmp_path / "s.db"), "--out", str(tmp_path / "out"))
        assert pacs.requests == []
    assert code == 2 and "no Azure identity available" in err


def test_both_ways_the_client_sends_carry_a_signature_aws_accepts():
    """The lean urllib3 path and requests' own (taken when the server has set a cookie) send the
    Host and the query that were signed; a UID list and a wildcard need SigV4's encoding."""
    from crawler.http import RetryPolicy
    from crawler.qido import QidoClient

    with FakePacs(n_studies=7, sigv4=(KEY_ID, SECRET, REGION)) as pacs:
        signer = aws.AwsSigV4(url=pacs.url, region=REGION, credentials=AwsKeys(KEY_ID, SECRET))
        client = QidoClient(pacs.url, credentials=signer, retry=RetryPolicy(attempts=1))
        uids = [("StudyInstanceUID", f"{pacs.study_uid(0)},{pacs.study_uid(1)}")]
        wildcard = [("PatientID", pacs.patient_id(0)[:-1] + "*"), ("limit", 3)]
        assert len(client.get("studies", "studies", uids).items) == 2
        assert len(client.get("studies", "studies", wildcard).items) >= 1
        client.session.cookies.set("route", "a")
        assert len(client.get("studies", "studies", uids).items) == 2
        assert len(client.get("studies", "studies", wildcard).items) >= 1
        assert pacs.statuses[403] == 0 and pacs.statuses[200] == 4
        client.close()


def test_signing_logs_no_session_token_even_with_every_logger_at_debug(caplog):
    """botocore's signer logs the canonical request at DEBUG, the session token's value in it; a
    program that logs everything (logging.basicConfig(level=DEBUG)) must not get it."""
    import logging

    caplog.set_level(logging.DEBUG)
    signer = aws.AwsSigV4(url="https://dicom-medical-imaging.eu-west-1.amazonaws.com/x", credentials=AwsKeys(KEY_ID, SECRET, "session-token-1"))
    headers = signer.headers("GET", "https://dicom-medical-imaging.eu-west-1.amazonaws.com/x/studies?limit=1")
    assert headers["X-Amz-Security-Token"] == "session-token-1"
    assert "session-token-1" not in caplog.text and SECRET not in caplog.text
    assert headers["Authorization"].rpartition("=")[2] not in caplog.text


@pytest.mark.parametrize(
    ("make", "modules", "extra"),
    [
        (lambda: gcp.GcpCredentials(FHIR), ("google.auth", "google"), "gcp"),
        (lambda: azure.AzureCredentials(), ("azure.identity",), "azure"),
        (lambda: aws.AwsSigV4(url="https://dicom-medical-imaging.eu-west-1.amazonaws.com/x"), ("botocore", "botocore.auth"), "aws"),
    ],
    ids=["gcp", "azure", "aws"],
)
def test_a_kind_without_its_extra_is_a_usage_error_naming_the_extra(monkeypatch, make, modules, extra):
    import sys

    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=rf"needs the {extra} extra: pip install 'qido-crawler\[{extra}\]'") as caught:
        make()
    assert caught.value.setting == ("fhir_auth" if extra == "gcp" else "auth")


@pytest.mark.parametrize("kind", ["gcp", "azure"])
def test_the_fhir_server_takes_its_own_cloud_credentials(tmp_path, capsys, monkeypatch, kind):
    """--fhir-auth gcp|azure beside a source with no credentials: the FHIR server's token is the
    kind's (Azure: scope from the FHIR server's origin), the PACS is asked with none."""
    from fixtures.fakefhir import FakeFhir

    google_issuer, azure_issuer = GoogleIssuer(), AzureIssuer(time.time() + 3600)
    monkeypatch.setattr(google.auth, "default", lambda scopes=None, **kwargs: (_google(None, 0, google_issuer), "project-x"))
    monkeypatch.setattr(azure_identity, "DefaultAzureCredential", lambda: azure_issuer)
    token = {"gcp": "gcp-token-1", "azure": "az-token-1"}[kind]
    with FakeFhir(token=token) as fhir, FakePacs(n_studies=5, seed=8) as pacs:
        code, out, err = run_cli(capsys, "sync", pacs.url, "--state", str(tmp_path / "s.db"), "--fhir-url", fhir.url, "--fhir-auth", kind,
                                 "--json", "-vv")
        assert code == 0, err
        assert len([k for k in fhir.resources if k[0] == "ImagingStudy"]) == 5
    assert json.loads(out)["studies_new"] == 5
    if kind == "azure":
        host = urlsplit(fhir.url).netloc
        assert azure_issuer.scopes == [(f"http://{host}/.default",)]
    else:
        assert google_issuer.issued == 1
    assert token not in out + err and _files_hold(tmp_path, token) == []


def test_a_run_longer_than_the_azure_tokens_life_renews_it_without_a_refused_request(tmp_path, capsys, monkeypatch):
    """Tokens that live 6 s (kept for three quarters of that), a simulator whose clock runs half a
    second ahead (it refuses a token from 0.5 s before its expiry, after its 0.25 s latency), a
    run of about 8 s: the kind renews the token while the run goes and the simulator refuses
    nothing, as each request asks the kind for its headers when it is sent."""
    issued: dict[str, float] = {}
    lock = threading.Lock()

    class ShortLived:
        def get_token(self, *scopes, **kwargs):
            with lock:
                token = f"az-token-{len(issued) + 1}"
                issued[token] = time.time() + 6
                return AccessToken(token, int(issued[token]))

    def valid(token: str) -> bool:
        with lock:
            return token in issued and time.time() < int(issued[token]) - 0.5

    monkeypatch.setattr(azure_identity, "DefaultAzureCredential", ShortLived)
    with FakePacs(n_studies=60, seed=9, token=valid, latency=0.25) as pacs:
        code, out, err = run_cli(capsys, "sync", pacs.url, "--auth", "azure", "--state", str(tmp_path / "s.db"), "--metadata", "never",
                                 "--workers", "2", "--json")
        assert pacs.statuses[401] == 0
    assert code == 0, err
    summary = json.loads(out)
    assert summary["studies_new"] == 60 and summary["studies_failed"] == 0 and summary["seconds"] > 6
    assert len(issued) >= 2                     # the run outlived its first token
