"""The audit report (``qido-crawler audit``): a complete crawl of a PACS that finds what is wrong
with it, and with the copies kept of it (the state, a FHIR server).

    from crawler.audit import AuditConfig, audit
    result = audit(AuditConfig(url="http://localhost:8042/dicom-web", report=Path("audit")))
    result.exit_code, [f.code for f in result.evaluation.findings]

``findings`` is the pure core (collected facts -> findings with stable codes), ``run`` the crawl,
``copies`` reads the state and a FHIR server, ``report`` writes report.html, findings.json and
studies.csv.
"""

from __future__ import annotations

from ..config import AuditConfig
from ..uids import valid_uid
from .findings import CHECKS, Check, Collector, CopyRow, Finding, Severity, StudyFacts, evaluate
from .run import AuditProgress, AuditResult, audit

__all__ = [
    "CHECKS",
    "AuditConfig",
    "AuditProgress",
    "AuditResult",
    "Check",
    "Collector",
    "CopyRow",
    "Finding",
    "Severity",
    "StudyFacts",
    "audit",
    "evaluate",
    "valid_uid",
]
