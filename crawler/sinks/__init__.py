"""Where resources go: NDJSON run folders (Bulk Data layout) and FHIR servers, behind one protocol."""

from .base import Sink
from .ndjson import NdjsonFolder

__all__ = ["NdjsonFolder", "Sink"]
