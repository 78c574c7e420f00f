"""How requests to the DICOMweb server and the FHIR server authenticate (``--auth``).

Every kind of credentials answers one question, ``Credentials.headers``: the headers one request
must carry (``base``). A kind with a token keeps it and fetches a new one ahead of its expiry and
after a 401 (``refresh``); a kind that signs (AWS Signature V4) signs each request. Secrets come
from the environment or files only and are never logged, shown in errors, stored in the state
or printed with ``--json``.
"""

from .base import Credentials, Static

__all__ = ["Credentials", "Static"]
