"""Pure mapping of DICOM JSON search results to FHIR resources (plain data, no I/O)."""

from .endpoint import endpoint
from .model import Mapped, MappingOptions, StudyInput
from .r5 import map_resources, map_study

__all__ = ["Mapped", "MappingOptions", "StudyInput", "endpoint", "map_resources", "map_study"]
