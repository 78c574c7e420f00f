"""qido-crawler: crawl a PACS over DICOMweb QIDO-RS and keep a FHIR ImagingStudy copy of it."""

from .config import SyncConfig
from .mapping import MappingOptions, StudyInput, map_study
from .sync import SyncResult, export, sync

__version__ = "0.1.0"

__all__ = ["MappingOptions", "StudyInput", "SyncConfig", "SyncResult", "__version__", "export", "map_study", "sync"]
