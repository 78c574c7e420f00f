"""AWS Signature Version 4 (``--auth aws``, the ``[aws]`` extra), for AWS HealthImaging's DICOMweb.

AWS HealthImaging answers DICOMweb requests at
``https://dicom-medical-imaging.{region}.amazonaws.com/datastore/{datastore id}/...`` only when
they are signed for the service ``medical-imaging`` in that region. Every request is signed on its
own (``SigV4Auth.add_auth``, botocore's signer), with credentials from botocore's default chain:
the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), the
shared credentials and config files (``AWS_PROFILE``), SSO, web identity, the container's or the
instance's role; botocore renews the temporary ones itself before they expire.

The signature covers the request's method, path, query, the ``Host`` header (as the HTTP client
sends it: the URL's host, with the port when it is not the scheme's default) and ``X-Amz-Date``
(and ``X-Amz-Security-Token``): the query is signed in SigV4's canonical encoding
(``canonical_url``), as AWS decodes and encodes it again before it checks, whatever characters the
client left unencoded. ``refusal_cause`` reads AWS's error code from a 401/403 so that the error
names the cause (a wrong key or region, a clock that is off) without the server's free text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import orjson

from .cloud import Errors, Target

SERVICE = "medical-imaging"
"""The signing name of AWS HealthImaging (its DICOMweb endpoints included)."""

_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")

SIGNED = ("Authorization", "X-Amz-Date", "X-Amz-Security-Token")
"""The headers ``AwsSigV4.headers`` gives: the signature and what it covers besides ``Host``."""


def _no_signing_details(record: logging.LogRecord) -> bool:
    """botocore's signer logs the canonical request (with the session token's value), the string to
    sign and the signature at DEBUG: a program that logs everything would keep them."""
    return not (record.levelno <= logging.DEBUG and isinstance(record.msg, str) and record.msg.startswith(("CanonicalRequest", "StringToSign", "Signature")))


def region_from_url(url: str) -> str | None:
    """The region in an AWS endpoint's host name (``dicom-medical-imaging.eu-west-1.amazonaws.com``
    -> ``eu-west-1``), None for a host that is not one."""
    host = (urlsplit(url).hostname or "").lower()
    if not (host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")):
        return None
    return next((label for label in host.split(".") if _REGION.fullmatch(label)), None)


def _encoded(text: str) -> str:
    return quote(text, safe="-_.~")


def canonical_url(url: str) -> str:
    """``url`` with its query in SigV4's canonical encoding: each name and value decoded, then
    encoded with only RFC 3986's unreserved characters left as they are (``,`` ``*`` ``:`` become
    ``%2C`` ``%2A`` ``%3A``). botocore signs the query as it is given; AWS encodes it so first."""
    parts = urlsplit(url)
    if not parts.query:
        return urlunsplit(parts._replace(fragment=""))
    pairs = []
    for pair in parts.query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            pairs.append(f"{_encoded(unquote(name))}={_encoded(unquote(value))}")
    return urlunsplit(parts._replace(query="&".join(pairs), fragment=""))


class AwsSigV4:
    """Signs each request with AWS Signature V4 for ``service`` in ``region``: given (``--aws-region``:
    ``settings.options["region"]``), else the region in the server URL's host name, else
    botocore's configured region (``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's).
    ``credentials`` replaces botocore's default chain (any botocore credentials object:
    ``get_frozen_credentials()``); ``url`` stands for ``settings.base_url`` without settings."""

    def __init__(
        self,
        settings: Target | None = None,
        *,
        url: str = "",
        region: str | None = None,
        credentials: Any = None,
        service: str = SERVICE,
    ) -> None:
        self._errors = errors = Errors.of(settings)
        try:
            import botocore.auth
            import botocore.awsrequest
            import botocore.exceptions
            import botocore.session
        except ImportError:
            raise errors.missing_extra("aws") from None
        self._botocore = botocore
        signing_log = logging.getLogger("botocore.auth")
        if _no_signing_details not in signing_log.filters:
            signing_log.addFilter(_no_signing_details)
        if settings is not None:
            url = url or settings.base_url
            given = settings.options.get("region")
            region = region or (given if isinstance(given, str) else None)
        region = region or region_from_url(url)
        if not region or credentials is None:
            try:
                session = botocore.session.Session()
                region = region or session.get_config_variable("region")
                if credentials is None:
                    credentials = session.get_credentials()
            except botocore.exceptions.BotoCoreError as exc:
                raise errors.refused(f"the AWS configuration cannot be read ({type(exc).__name__})") from None
        if not region:
            raise errors.refused("the AWS region is not in the URL's host name: give --aws-region (or set AWS_REGION)", "aws_region")
        if not _REGION.fullmatch(region):
            raise errors.refused(f"not an AWS region: {region[:40]!r}", "aws_region")
        if credentials is None:
            raise errors.refused("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, set AWS_PROFILE, or run with an IAM role")
        self.region = region
        self.service = service
        self._credentials = credentials

    def headers(self, method: str, url: str, body: bytes = b"") -> Mapping[str, str]:
        botocore, errors = self._botocore, self._errors
        try:
            frozen = self._credentials.get_frozen_credentials()
        except botocore.exceptions.HTTPClientError as exc:
            raise errors.unreachable(f"the AWS credentials could not be renewed: their service was not reached ({type(exc).__name__})") from None
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise errors.refused(f"the AWS credentials could not be renewed ({type(exc).__name__})") from None
        request = botocore.awsrequest.AWSRequest(method=method.upper(), url=canonical_url(url), data=body or None, headers={})
        botocore.auth.SigV4Auth(frozen, self.service, self.region).add_auth(request)
        return {name: request.headers[name] for name in SIGNED if name in request.headers}

    def refresh(self, used: Mapping[str, str]) -> bool:
        """Nothing to renew: every request is signed afresh, and botocore renews temporary
        credentials before they expire."""
        return False

    def __repr__(self) -> str:
        return f"AwsSigV4(service={self.service!r}, region={self.region!r}, <credentials hidden>)"


_CAUSES = {
    "SignatureDoesNotMatch": "the signature does not match: check the secret access key and the region signed for (--aws-region)",
    "InvalidSignatureException": "the signature does not match: check the secret access key and the region signed for (--aws-region)",
    "RequestTimeTooSkewed": "this machine's clock is more than 15 minutes off AWS's: set it right (NTP)",
    "RequestExpired": "this machine's clock is more than 15 minutes off AWS's: set it right (NTP)",
    "InvalidClientTokenId": "AWS does not know the access key ID",
    "UnrecognizedClientException": "AWS does not know the access key ID or the session token",
    "ExpiredToken": "the AWS session token has expired: renew the temporary credentials",
    "ExpiredTokenException": "the AWS session token has expired: renew the temporary credentials",
    "AccessDeniedException": "the AWS identity may not do this (IAM policy)",
    "AccessDenied": "the AWS identity may not do this (IAM policy)",
    "MissingAuthenticationToken": "the request is not signed as AWS expects",
    "IncompleteSignature": "the request is not signed as AWS expects",
}
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,63}")


def refusal_cause(headers: Mapping[str, str], body: bytes) -> str | None:
    """``CODE: what it means`` for AWS's answer to a refused request, from its
    ``x-amzn-ErrorType`` header (``Code:http://...``) or its JSON body's ``__type``/``code``
    (``...#Code``); None when the answer carries no AWS error code. Of the server's text only a
    code that looks like one is shown; "Signature expired" in an InvalidSignatureException's
    message picks the clock's explanation, and nothing of the message is shown."""
    code = (headers.get("x-amzn-ErrorType") or "").partition(":")[0].strip()
    message = ""
    if body[:1] == b"{" and len(body) < 65536:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None
        if isinstance(document, dict):
            found = document.get("__type") or document.get("code") or document.get("Code")
            if not code and isinstance(found, str):
                code = found.rpartition("#")[2]
            text = document.get("message") or document.get("Message")
            message = text if isinstance(text, str) else ""
    if not code or not _CODE.fullmatch(code):
        return None
    if code == "InvalidSignatureException" and message.startswith("Signature expired"):
        return f"{code}: {_CAUSES['RequestTimeTooSkewed']}"
    return f"{code}: {_CAUSES[code]}" if code in _CAUSES else code
