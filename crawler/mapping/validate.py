"""Optional run-time validation of produced resources with the fhir.resources models."""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

from ..errors import ConfigError, MappingError

_MODULES = {"R5": "fhir.resources", "R4": "fhir.resources.R4B"}


@lru_cache(maxsize=None)
def _model(version: str, resource_type: str) -> Any:
    try:
        module = importlib.import_module(f"{_MODULES[version]}.{resource_type.lower()}")
    except ImportError:
        raise ConfigError("validation needs fhir.resources: pip install 'qido-crawler[validate]'", setting="validate") from None
    return getattr(module, resource_type)


def check_available(version: str) -> None:
    _model(version, "ImagingStudy")


def validate(resource: dict[str, Any], version: str, study_uid: str | None) -> None:
    """Raise MappingError naming the study, the resource type and the first problem found."""
    from pydantic import ValidationError

    resource_type = resource.get("resourceType", "?")
    try:
        _model(version, resource_type).model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise MappingError(study_uid, f"{resource_type}.{where}", f"not valid FHIR {version}: {first.get('msg')}") from None
