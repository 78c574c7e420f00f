"""Server profiles: what each DICOMweb server family documents about its QIDO-RS limits, as the
defaults a crawl of that family starts from (``--server-profile``).

A profile holds only documented facts that change how the crawl asks (page sizes, the largest
``limit`` per level, the largest ``offset``, a cap on the results of one query, whether instance
searches need a series, the change source a watch follows); each fact's source is in README
"Server profiles". The profile's values are defaults: an option given explicitly wins, except that
a page size is never asked above the level's documented largest ``limit`` (the server would refuse
it). What a profile does not know (a cap an administrator configured) the crawl still finds by
itself (see listing).

The profile is detected from the URL alone, without a request: the cloud services have fixed host
names, dcm4chee-arc a fixed path. Orthanc's answers carry no ``Server`` header (checked on Orthanc
1.10 with its DICOMweb plugin), so an Orthanc is not detected: it gets ``generic``, whose values
are Orthanc's own, and ``--server-profile orthanc`` names its change source for ``watch``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from .errors import ConfigError

NAMES = ("orthanc", "dcm4chee", "google", "azure", "aws-healthimaging", "generic")
AUTO = "auto"
GENERIC_PAGE_SIZE = 100
GENERIC_INSTANCE_PAGE_SIZE = 1000
GENERIC_MAX_OFFSET = 1_000_000


@dataclass(frozen=True)
class Profile:
    """The documented QIDO-RS facts of one server family that drive a crawl. A largest ``limit``
    of None: none documented."""

    name: str
    page_size: int = GENERIC_PAGE_SIZE
    """Studies asked for per listing request."""
    instance_page_size: int = GENERIC_INSTANCE_PAGE_SIZE
    """Instances (and series) asked for per request."""
    max_limit_studies: int | None = None
    max_limit_series: int | None = None
    max_limit_instances: int | None = None
    max_offset: int = GENERIC_MAX_OFFSET
    """The largest offset asked for; a window with more results is split."""
    max_results: int | None = None
    """The server's cap on the results of one query, when the family has a fixed one."""
    cap_signal: str = "found by itself"
    """How the server shows a cap (documentation only)."""
    instance_level: Literal["study", "series"] = "study"
    """``series``: instance searches need a series (``/studies/{uid}/series/{uid}/instances``)."""
    changes: str | None = None
    """The change source ``watch`` follows when ``--changes`` is not given."""
    order: str = "not documented"

    @property
    def instance_max_limit(self) -> int | None:
        """The largest ``limit`` of a study's series and instance searches (one page size asks both)."""
        limits = [n for n in (self.max_limit_series, self.max_limit_instances) if n is not None]
        return min(limits) if limits else None


PROFILES: dict[str, Profile] = {
    "generic": Profile("generic"),
    "orthanc": Profile("orthanc", cap_signal="LimitFindResults (default 0, none): N+1 results, silently", changes="orthanc",
                       order="not documented"),
    "dcm4chee": Profile("dcm4chee", cap_signal='"Query Max Number of Results" (configured): a 413, or a Warning header on older versions',
                        changes="dcm4chee"),
    "google": Profile("google", max_limit_studies=5_000, max_limit_series=5_000, max_limit_instances=50_000,
                      max_offset=1_000_000),
    "azure": Profile("azure", instance_page_size=200, max_limit_studies=200, max_limit_series=200, max_limit_instances=200,
                     cap_signal="none: a limit outside 1-200 is a 400; an offset past the end a 204", changes="azure",
                     order="newest first"),
    "aws-healthimaging": Profile("aws-healthimaging", max_results=10_000, cap_signal="at most 10,000 results; the rest not retrievable by QIDO-RS",
                                 instance_level="series", order="last update, descending"),
}

_GOOGLE = re.compile(r"(^|\.)healthcare\.googleapis\.com$")
_AZURE = re.compile(r"\.dicom\.azurehealthcareapis\.com$")
_AWS = re.compile(r"^dicom-medical-imaging\.[a-z0-9-]+\.amazonaws\.com$")
_DCM4CHEE = re.compile(r"/dcm4chee-arc/aets/[^/]+/rs/?$")


def detect(url: str) -> str | None:
    """The profile a DICOMweb base URL names by its shape alone, or None: Google's
    ``healthcare.googleapis.com/.../dicomWeb``, Azure's ``*.dicom.azurehealthcareapis.com``,
    AWS HealthImaging's ``dicom-medical-imaging.<region>.amazonaws.com``, dcm4chee-arc's
    ``/dcm4chee-arc/aets/<AE>/rs``."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:   # not a URL (an unclosed IPv6 bracket): check_base_url says what is wrong
        return None
    path = parts.path
    if _GOOGLE.search(host) and "/dicomWeb" in path:
        return "google"
    if _AZURE.search(host):
        return "azure"
    if _AWS.match(host):
        return "aws-healthimaging"
    if _DCM4CHEE.search(path):
        return "dcm4chee"
    return None


@dataclass(frozen=True)
class Settings:
    """A run's listing and crawl settings once the profile and the explicit options are combined."""

    profile: Profile
    how: Literal["given", "detected", "default"]
    page_size: int
    instance_page_size: int
    max_offset: int
    max_results: int | None
    lowered: tuple[str, ...] = ()
    """What was asked above the profile's largest ``limit`` and lowered to it (for a warning)."""

    @property
    def fallbacks(self) -> tuple[tuple[str, str], ...]:
        """The crawl fallbacks the profile starts with (see crawl.FALLBACKS)."""
        from .crawl import SERIES_LEVEL_INSTANCES   # here: the command line's start does not load the crawl

        if self.profile.instance_level == "series":
            return ((SERIES_LEVEL_INSTANCES, f"the {self.profile.name} server profile: instance searches need a series"),)
        return ()

    def summary(self) -> dict[str, str]:
        """What ``--json`` says of the profile."""
        return {"name": self.profile.name, "how": self.how}


def choose(name: str | None, url: str) -> tuple[Profile, Literal["given", "detected", "default"]]:
    """The profile named (``auto`` or None: detected from ``url``, else ``generic``) and how it
    was chosen."""
    if name in (None, AUTO):
        found = detect(url)
        return (PROFILES[found], "detected") if found else (PROFILES["generic"], "default")
    if name not in PROFILES:
        raise ConfigError(f"unknown server profile {name!r} (one of {', '.join(NAMES)}, or auto)", setting="server_profile")
    return PROFILES[name], "given"


def settings(
    profile: Profile,
    how: Literal["given", "detected", "default"] = "given",
    *,
    page_size: int | None = None,
    instance_page_size: int | None = None,
    max_offset: int | None = None,
    max_results: int | None = None,
) -> Settings:
    """The profile's values where the options are None; the options' where given. A page size
    above the level's documented largest ``limit`` is lowered to it (noted in ``lowered``)."""
    lowered = []
    studies = profile.page_size if page_size is None else page_size
    if profile.max_limit_studies is not None and studies > profile.max_limit_studies:
        lowered.append(f"page size {studies} -> {profile.max_limit_studies}")
        studies = profile.max_limit_studies
    instances = profile.instance_page_size if instance_page_size is None else instance_page_size
    top = profile.instance_max_limit
    if top is not None and instances > top:
        lowered.append(f"instance page size {instances} -> {top}")
        instances = top
    return Settings(
        profile=profile,
        how=how,
        page_size=studies,
        instance_page_size=instances,
        max_offset=profile.max_offset if max_offset is None else max_offset,
        max_results=profile.max_results if max_results is None else max_results,
        lowered=tuple(lowered),
    )
