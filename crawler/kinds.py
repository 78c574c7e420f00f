"""The closed sets of words the library uses: a study's status, a run's outcome, the executor,
the FHIR version, the change source.

Each is a ``str`` enum, so a member equals its value (``StudyStatus.SYNCED == "synced"``), is
stored and printed as that value, and every setting that takes one also takes the plain string.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from .errors import ConfigError

E = TypeVar("E", bound="Kind")


class Kind(str, Enum):
    """Base of the enums below: ``str(member)`` is its value, not ``Class.NAME``."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def of(cls: type[E], value: str | E, setting: str) -> E:
        """``value`` as a member; ConfigError naming ``setting`` and the choices when it is none."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise ConfigError(f"{setting} must be one of {choices}, not {value!r}", setting=setting) from None


class StudyStatus(Kind):
    SYNCED = "synced"
    FAILED = "failed"
    INCONSISTENT = "inconsistent"
    GONE = "gone"


class RunOutcome(Kind):
    OK = "ok"
    PARTIAL = "partial"
    FAILED = "failed"
    UNREACHABLE = "unreachable"


class Executor(Kind):
    THREADS = "threads"
    DASK = "dask"


class FhirVersion(Kind):
    R5 = "R5"
    R4 = "R4"


class ChangeSource(Kind):
    ORTHANC = "orthanc"
    AZURE = "azure"
    DCM4CHEE = "dcm4chee"
