"""The mapper's input and options, as plain frozen data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any

from ..dicomjson import Dataset


@dataclass(frozen=True)
class StudyInput:
    """What the crawl found for one study.

    ``study`` holds the study-level search result, ``instances`` the instance-level results
    (which carry the series attributes), ``series`` optional series-level results (for their
    counts and attributes the instance level lacks).
    """

    study: Dataset
    instances: Sequence[Dataset] = ()
    series: Sequence[Dataset] = ()


@dataclass(frozen=True)
class MappingOptions:
    """Settings of the mapping.

    ``source`` is the DICOMweb base the study came from (it makes the ids), ``wado_base`` the
    WADO-RS base the Endpoint points at, ``zone`` the PACS's time zone for times without
    Timezone Offset From UTC (``None``: this machine's), ``issuer_systems`` maps Issuer of
    Patient ID / accession issuers to identifier systems, and ``patients`` makes a Patient
    resource per (issuer, Patient ID) that the subject references.
    """

    source: str = ""
    wado_base: str | None = None
    zone: tzinfo | None = None
    issuer_systems: Mapping[str, str] = field(default_factory=dict)
    patients: bool = False


@dataclass(frozen=True)
class Mapped:
    """The resources of one study: its ImagingStudy, the Endpoints its series point at other than
    the default one, and (with ``patients``) its Patient."""

    study: dict[str, Any]
    endpoints: tuple[dict[str, Any], ...] = ()
    patient: dict[str, Any] | None = None

    def resources(self) -> list[dict[str, Any]]:
        return [*self.endpoints, *([self.patient] if self.patient else []), self.study]
