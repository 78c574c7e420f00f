"""One exception hierarchy. The library raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class CrawlerError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(CrawlerError):
    """Bad settings or arguments: exit code 2. ``setting`` names the setting at fault (a field of
    the configuration, e.g. ``fhir_version``) so that a front end can name its own option for it."""

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class QidoError(CrawlerError):
    """A DICOMweb request failed."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class RetriableQidoError(QidoError):
    """A failure that may go away when asked again (connection, timeout, 429, 5xx)."""

    retry_after: float | None = None
    """The seconds the server asked to wait (Retry-After), when it said."""


class FatalQidoError(QidoError):
    """A failure that asking again will not fix (400, 401, 403, 404, malformed answer)."""


class SourceUnreachable(QidoError):
    """The DICOMweb server could not be reached at all: exit code 3."""


class MappingError(CrawlerError):
    """DICOM JSON that cannot be mapped; names the study and the attribute, never patient data."""

    def __init__(self, study_uid: str | None, attribute: str, reason: str) -> None:
        self.study_uid = study_uid
        self.attribute = attribute
        self.reason = reason
        super().__init__(f"study {study_uid or '(no Study Instance UID)'}: {attribute}: {reason}")


class StateError(CrawlerError):
    """The state database cannot be opened, migrated or written."""


class SinkError(CrawlerError):
    """An output (NDJSON folder, FHIR server) did not accept what was sent."""
