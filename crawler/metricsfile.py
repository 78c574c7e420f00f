"""``sync --metrics-file``: a scheduled sync's figures for node_exporter's textfile collector.

Prometheus text format (version 0.0.4), written whole to a temporary file beside the target and
renamed over it, so that the collector never reads half a file. One file per source and job: the
metrics carry the source (its URL without credentials) as a label. The time of the last
successful run survives failed runs: it is read back from the file being replaced. The file holds
figures only, no patient data, and is made readable by others (the collector usually runs as
another user).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

PREFIX = "qido_crawler_sync"
LAST_SUCCESS = f"{PREFIX}_last_success_timestamp_seconds"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(source: str, ended: float, exit_code: int, seconds: float, figures: Mapping[str, int | bool],
           requests: Mapping[str, int], last_success: float | None) -> str:
    """The metrics of one run of ``source`` that ended at ``ended`` (Unix time)."""
    lines: list[str] = []
    src = f'source="{_label(source)}"'

    def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {PREFIX}_{name} {text}")
        lines.append(f"# TYPE {PREFIX}_{name} {kind}")
        for labels, value in samples:
            lines.append(f"{PREFIX}_{name}{{{src}{labels}}} {_number(value)}")

    metric("last_run_timestamp_seconds", "gauge", "When the last run ended (Unix time).", [("", ended)])
    metric("last_run_exit_code", "gauge", "The last run's exit code: 0 ok, 1 partial, 2 usage or state, 3 unreachable.",
           [("", exit_code)])
    metric("last_run_duration_seconds", "gauge", "How long the last run took.", [("", seconds)])
    if last_success is not None:
        metric("last_success_timestamp_seconds", "gauge", "When the last run that ended with exit code 0 ended (Unix time).",
               [("", last_success)])
    studies = [(f',outcome="{key.removeprefix("studies_")}"', float(value)) for key, value in sorted(figures.items())
               if key.startswith("studies_") and not isinstance(value, bool)]
    if studies:
        metric("last_run_studies", "gauge", "Studies of the last run, by outcome.", studies)
    resources = [(f',change="{key.removeprefix("resources_")}"', float(value)) for key, value in sorted(figures.items())
                 if key.startswith("resources_") and not isinstance(value, bool)]
    if resources:
        metric("last_run_resources", "gauge", "Resources of the last run, by change.", resources)
    if "windows_incomplete" in figures:
        metric("last_run_windows_incomplete", "gauge", "Windows the last run could not list completely.",
               [("", float(figures["windows_incomplete"]))])
    kinds = [(f',kind="{_label(kind)}"', float(n)) for kind, n in sorted(requests.items()) if kind not in ("total", "retries")]
    if kinds:
        metric("last_run_requests", "gauge", "HTTP requests of the last run, by kind.", kinds)
    metric("last_run_retries", "gauge", "Requests of the last run asked again.", [("", float(requests.get("retries", 0)))])
    return "\n".join(lines) + "\n"


def previous_success(path: Path) -> float | None:
    """The last-success time the file at ``path`` holds, if any (a missing or foreign file: None)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(rf"^{LAST_SUCCESS}\{{[^}}]*\}} ([0-9.eE+]+)$", text, flags=re.M)
    return float(match.group(1)) if match else None


def write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (mode 0644)."""
    folder = path.parent if str(path.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
