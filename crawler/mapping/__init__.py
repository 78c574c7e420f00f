"""Pure mapping of DICOM JSON search results to FHIR resources (plain data, no I/O)."""

from .endpoint import endpoint
from .model import MappingOptions, StudyInput
from .r5 import map_study

__all__ = ["MappingOptions", "StudyInput", "endpoint", "map_study"]
