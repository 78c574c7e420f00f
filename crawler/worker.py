"""What a worker does with one study: fetch, check, map and serialise it. No state, no sinks:
this runs in the thread pool's threads and in Dask's worker processes alike, and what it returns
(an ``Outcome``) is all the run learns of the study."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from .crawl import VOLATILE, CrawlOptions, Learned, StudySummary, fetch_study
from .errors import MappingError, QidoError
from .kinds import FhirVersion, StudyStatus
from .mapping import MappingOptions, endpoint, map_resources
from .mapping.validate import validate
from .qido import QidoClient
from .sinks.base import Resource
from .uids import shown

if TYPE_CHECKING:
    from .tables.tags import TagValues


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def study_hash(attributes: dict[str, Any], tags: tuple[str, ...] = ()) -> str:
    """Hash of the study-level attributes that matter (not the server's URLs or availability),
    and of the ``--include-tag`` tags (``tables.tags.signature``; none: the hash is as before),
    so that a study synced without a tag is crawled again for its column."""
    kept: dict[str, Any] = {k: v for k, v in attributes.items() if k not in VOLATILE}
    if tags:
        kept["include-tags"] = tags
    return digest(orjson.dumps(kept, option=orjson.OPT_SORT_KEYS))


class Candidate(NamedTuple):
    """A listed study that must be crawled, and whether the state knew it before."""

    summary: StudySummary
    known: bool


@dataclass(frozen=True)
class CrawlJob:
    """What a worker needs besides the client: how to fetch, how to map, what to write."""

    crawl: CrawlOptions
    mapping: MappingOptions
    fhir_version: FhirVersion = FhirVersion.R5
    validate: bool = False


@dataclass(frozen=True)
class Outcome:
    summary: StudySummary
    resources: tuple[Resource, ...] = ()
    status: StudyStatus = StudyStatus.SYNCED
    error: str | None = None
    path: str | None = None
    fallbacks: tuple[tuple[str, str], ...] = ()
    series_without_modality: int = 0
    tags: TagValues | None = None
    """The values of the ``--include-tag`` tags (None without any)."""

    @property
    def study(self) -> Resource:
        return self.resources[-1]


def convert(resource: dict[str, Any], version: str) -> dict[str, Any]:
    if version == FhirVersion.R5:
        return resource
    from .mapping import r4

    return {"ImagingStudy": r4.to_r4, "Endpoint": r4.endpoint_r4, "Patient": r4.patient_r4}[resource["resourceType"]](resource)


def crawl_one(client: QidoClient, summary: StudySummary, job: CrawlJob, learned: Learned) -> Outcome:
    """Fetch, check and map one study.

    Whatever goes wrong with one study is that study's failure: an exception nobody expected is
    named by its type only (its text may hold what a server sent, patient data included)."""
    try:
        fetched = fetch_study(client, summary, job.crawl, learned)
        if not fetched.consistent:
            return Outcome(
                summary,
                status=StudyStatus.INCONSISTENT,
                error=f"study {summary.uid}: server reports {summary.n_instances} instances, {fetched.enumerated} listed (asked twice)",
                path=fetched.path,
                fallbacks=fetched.fallbacks,
            )
        options = job.mapping
        mapped = map_resources(fetched.data, options)
        without_modality = sum(1 for s in mapped.study.get("series", ()) if "coding" not in s.get("modality", {}))
        resources = [convert(r, job.fhir_version) for r in mapped.resources()]
        if job.validate:
            for resource in (convert(endpoint(options.wado_base or options.source), job.fhir_version), *resources):
                validate(resource, job.fhir_version, summary.uid)
        serialised = tuple((r["resourceType"], r["id"], orjson.dumps(r)) for r in resources)
        tags = None
        if job.crawl.tags:
            from .tables.tags import extract

            tags = extract(job.crawl.tags, summary.attributes, (*fetched.data.instances, *fetched.data.series), options.zone)
        return Outcome(summary, (endpoint_resource(options.wado_base or options.source, job.fhir_version), *serialised), path=fetched.path,
                       fallbacks=fetched.fallbacks, series_without_modality=without_modality, tags=tags)
    except MappingError as exc:
        return Outcome(summary, status=StudyStatus.FAILED, error=str(exc))
    except QidoError as exc:
        return Outcome(summary, status=StudyStatus.FAILED, error=f"study {shown(summary.uid)}: {exc}")
    except Exception as exc:  # noqa: BLE001 - one study's surprise must not end the run
        return Outcome(summary, status=StudyStatus.FAILED, error=f"study {shown(summary.uid)}: unexpected error while crawling it ({type(exc).__name__})")


@functools.lru_cache(maxsize=8)
def endpoint_resource(base: str, version: str) -> Resource:
    """The Endpoint every study of a run references, built and serialised once."""
    resource = convert(endpoint(base), version)
    return resource["resourceType"], resource["id"], orjson.dumps(resource)
