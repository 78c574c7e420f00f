"""The Endpoint resource that ImagingStudy and its series point at: the PACS's WADO-RS base."""

from __future__ import annotations

from typing import Any

from . import codes
from .ids import endpoint_id, normalise_base


def endpoint(wado_base: str) -> dict[str, Any]:
    """R5 Endpoint for a WADO-RS base URL; its id depends only on the (normalised) URL."""
    address = normalise_base(wado_base)
    return {
        "resourceType": "Endpoint",
        "id": endpoint_id(wado_base),
        "status": "active",
        "connectionType": [{"coding": [{"system": codes.ENDPOINT_CONNECTION_TYPE, "code": "dicom-wado-rs"}]}],
        "name": f"DICOMweb WADO-RS {address}",
        "payload": [
            {
                "type": [{"text": "DICOM"}],
                "mimeType": ["application/dicom", "application/dicom+json"],
            }
        ],
        "address": address,
    }
