"""Where resources go: NDJSON run folders (Bulk Data layout); more sinks share the same protocol."""

from .base import Sink
from .ndjson import NdjsonFolder

__all__ = ["NdjsonFolder", "Sink"]
