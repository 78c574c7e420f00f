"""The audit's files: ``findings.json``, ``studies.csv`` and a self-contained ``report.html``.

Rendering is pure (data in, text out); :func:`write_report` writes each file to a temporary
name and renames it, so a file is there complete or not at all.

Privacy: without ``include_phi`` no patient name or Patient ID is written anywhere, studies are
named by their Study Instance UID and accession numbers are masked (``AC****23``). With it,
``studies.csv`` and the HTML tables get the Patient IDs, names and full accession numbers.

The HTML has inline CSS and inline SVG charts, no script, and a Content-Security-Policy that
forbids loading anything: it opens the same with no network.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from ..errors import SinkError
from ..files import make_folder, open_private
from .findings import CHECKS, SEVERITY_ORDER, Evaluation, Finding, StudyFacts, by_modality, by_month, mask

REPORT_VERSION = 1
HTML_ROWS = 1000
"""Rows per finding table in report.html at most; studies.csv and findings.json have them all."""
CSV_COLUMNS = (
    "study_uid", "study_date", "modalities", "accession_number",
    "series_reported", "series_enumerated", "instances_reported", "instances_enumerated", "finding_codes",
)
PHI_COLUMNS = ("patient_ids", "patient_names")


def _cell(value: Any) -> str:
    """CSV cell text; values a spreadsheet would run as a formula get a leading quote."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _accession(facts: StudyFacts, include_phi: bool) -> str:
    return (facts.accession or "") if include_phi else mask(facts.accession)


def render_json(
    *, source: str, generated: str, scope: str, evaluation: Evaluation, totals: Mapping[str, int],
    windows: Mapping[str, Any], compared: Mapping[str, str | None],
) -> str:
    """findings.json: stable keys, sorted keys and lists (deterministic apart from ``generated``)."""
    findings = sorted(evaluation.findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.code))
    document = {
        "version": REPORT_VERSION,
        "source": source,
        "generated": generated,
        "scope": scope,
        "compared": dict(compared),
        "checked": sorted(evaluation.checked),
        "totals": dict(totals),
        "findings": [f.as_dict() for f in findings],
        "windows": sorted(windows.get("incomplete", [])),
        "listing": {k: v for k, v in windows.items() if k != "incomplete"},
    }
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_csv(studies: Mapping[str, StudyFacts], evaluation: Evaluation, include_phi: bool) -> str:
    """studies.csv: one row per study, sorted by Study UID."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + (PHI_COLUMNS if include_phi else ()))
    for uid in sorted(studies):
        s = studies[uid]
        row = [
            uid, s.study_date or "", " ".join(s.modalities), _accession(s, include_phi),
            s.reported_series, s.n_series, s.reported_instances, s.n_instances,
            " ".join(evaluation.codes.get(uid, ())),
        ]
        if include_phi:
            row += [" ".join(s.patient_ids), " | ".join(s.patient_names)]
        writer.writerow([_cell(v) for v in row])
    return out.getvalue()


# --- HTML ---------------------------------------------------------------------------------------

_e = html.escape

CSS = """
:root { --fg:#1d2430; --muted:#5b6678; --line:#d8dee8; --bg:#f6f8fb; --card:#fff;
        --error:#b42318; --warning:#b54708; --info:#175cd3; --bar:#3e6bb5; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color:var(--fg); background:var(--bg); }
header, main, footer { max-width: 1180px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; }
h3 { font-size: 15px; margin: 24px 0 6px; }
.meta { color: var(--muted); margin: 0; }
.meta code { color: var(--fg); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; margin-top: 18px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .n { font-size: 26px; font-weight: 600; }
.card .l { color: var(--muted); }
.card .sub { color: var(--muted); font-size: 12px; }
.charts { display: grid; grid-template-columns: 1fr; gap: 16px; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px; overflow-x: auto; }
figcaption { font-weight: 600; margin-bottom: 6px; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; fill: var(--fg); }
svg .bar { fill: var(--bar); }
svg .axis { stroke: var(--line); }
table { border-collapse: collapse; width: 100%; background: var(--card); border: 1px solid var(--line); }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #eef2f7; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td code, li code { font-size: 12px; word-break: break-all; }
.sev { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; color: #fff; }
.sev.error { background: var(--error); } .sev.warning { background: var(--warning); } .sev.info { background: var(--info); }
.ok { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
.note { color: var(--muted); }
.bad { color: var(--error); font-weight: 600; }
footer { color: var(--muted); padding: 24px 20px 40px; }
"""


def _bar_chart_h(data: Sequence[tuple[str, int]], label: str, chart_id: str) -> str:
    """Horizontal bars (one row per category)."""
    if not data:
        return f'<p class="note" id="{chart_id}">No studies.</p>'
    peak = max(v for _, v in data) or 1
    left, right, row = 110, 60, 22
    width = 760
    plot = width - left - right
    height = row * len(data) + 10
    parts = [
        f'<svg id="{chart_id}" class="chart" role="img" aria-label="{_e(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{_e(label)}</title>'
    ]
    for n, (name, value) in enumerate(data):
        y = 5 + n * row
        w = max(1, round(plot * value / peak)) if value else 0
        parts.append(
            f'<g><title>{_e(name)}: {value}</title><text x="{left - 8}" y="{y + 15}" text-anchor="end">{_e(name)}</text>'
            f'<rect class="bar" x="{left}" y="{y + 3}" width="{w}" height="{row - 6}" rx="2"></rect>'
            f'<text x="{left + w + 6}" y="{y + 15}">{value}</text></g>'
        )
    parts.append(f'<line class="axis" x1="{left}" y1="0" x2="{left}" y2="{height}"></line></svg>')
    return "".join(parts)


def _bar_chart_v(data: Sequence[tuple[str, int]], label: str, chart_id: str) -> str:
    """Vertical bars (one column per month), labels thinned out to fit."""
    if not data:
        return f'<p class="note" id="{chart_id}">No studies.</p>'
    peak = max(v for _, v in data) or 1
    slot = max(3, min(40, 1100 // max(1, len(data))))
    left, top, bottom = 40, 14, 64
    plot_h = 180
    width = left + slot * len(data) + 10
    height = top + plot_h + bottom
    # a (rotated) label needs about 14 px: label every month, quarter, half year, year, ...
    every = next((k for k in (1, 2, 3, 6, 12, 24, 60, 120) if k * slot >= 14), 240)
    parts = [
        f'<svg id="{chart_id}" class="chart" role="img" aria-label="{_e(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{_e(label)}</title>',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 5}" y2="{top + plot_h}"></line>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for n, (name, value) in enumerate(data):
        x = left + n * slot
        h = round(plot_h * value / peak) if value else 0
        parts.append(
            f'<g><title>{_e(name)}: {value}</title>'
            f'<rect class="bar" x="{x + 1}" y="{top + plot_h - h}" width="{max(1, slot - 2)}" height="{h}"></rect>'
        )
        if n % every == 0:
            cx, cy = x + slot / 2, top + plot_h + 8
            parts.append(f'<text x="{cx}" y="{cy}" text-anchor="end" transform="rotate(-60 {cx} {cy})">{_e(name)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _contiguous(months: Sequence[str]) -> bool:
    for a, b in zip(months, months[1:]):
        year, month = int(a[:4]), int(a[5:])
        if b != (f"{year + 1:04d}-01" if month == 12 else f"{year:04d}-{month + 1:02d}"):
            return False
    return True


def _count(value: int | None) -> str:
    return "" if value is None else str(value)


def _study_table(finding: Finding, studies: Mapping[str, StudyFacts], include_phi: bool) -> str:
    if finding.code == "WINDOW_INCOMPLETE":
        items = "".join(f"<li><code>{_e(w)}</code></li>" for w in finding.windows)
        return f'<ul class="windows">{items}</ul>'
    head = ["Study Instance UID", "Study date", "Modalities", "Accession"]
    if include_phi:
        head += ["Patient ID", "Patient name"]
    head_num = ["Series reported", "Series listed", "Instances reported", "Instances listed"]
    rows = []
    for uid in finding.studies[:HTML_ROWS]:
        s = studies.get(uid)
        if s is None:   # in a copy, not in the PACS
            cells = [f"<td><code>{_e(uid)}</code></td>", '<td colspan="3" class="note">not listed by the PACS</td>']
            if include_phi:
                cells.append('<td colspan="2"></td>')
            cells += ['<td class="num"></td>'] * 4
        else:
            date_text = _e(s.study_date or "")
            cells = [
                f"<td><code>{_e(uid)}</code></td>",
                f"<td>{date_text}</td>",
                f"<td>{_e(' '.join(s.modalities))}</td>",
                f"<td>{_e(_accession(s, include_phi))}</td>",
            ]
            if include_phi:
                cells += [f"<td>{_e(', '.join(s.patient_ids))}</td>", f"<td>{_e('; '.join(s.patient_names))}</td>"]
            pairs = ((s.reported_series, s.n_series), (s.reported_instances, s.n_instances))
            for reported, listed in pairs:
                differ = s.crawled and reported is not None and listed is not None and reported != listed
                cells.append(f'<td class="num">{_count(reported)}</td>')
                cells.append(f'<td class="num{" bad" if differ else ""}">{_count(listed)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = len(finding.studies) - HTML_ROWS
    note = f'<p class="note">{more} more: see studies.csv and findings.json.</p>' if more > 0 else ""
    header = "".join(f"<th>{_e(h)}</th>" for h in head) + "".join(f'<th class="num">{_e(h)}</th>' for h in head_num)
    return (
        f'<table class="studies" id="table-{_e(finding.code)}"><thead><tr>{header}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table>{note}'
    )


def render_html(
    *, source: str, generated: str, scope: str, today: date, studies: Mapping[str, StudyFacts], evaluation: Evaluation,
    totals: Mapping[str, int], windows: Mapping[str, Any], include_phi: bool, compared: Mapping[str, str | None],
) -> str:
    findings = sorted(evaluation.findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.code))
    cards = [
        ("patients", "Patients", "distinct Patient IDs"),
        ("studies", "Studies", f"{totals.get('studies_unreadable', 0)} unreadable"),
        ("series", "Series", f"{totals.get('series_reported', 0)} reported"),
        ("instances", "Instances", f"{totals.get('instances_reported', 0)} reported"),
    ]
    card_html = "".join(
        f'<div class="card" id="total-{key}"><div class="n">{totals.get(key, 0)}</div><div class="l">{label}</div>'
        f'<div class="sub">{_e(sub)}</div></div>'
        for key, label, sub in cards
    )
    severity_counts = {s: sum(1 for f in findings if f.severity.value == s) for s in ("error", "warning", "info")}
    if findings:
        summary_rows = "".join(
            f'<tr><td><a href="#finding-{_e(f.code)}"><code>{_e(f.code)}</code></a></td>'
            f'<td><span class="sev {f.severity.value}">{f.severity.value}</span></td>'
            f'<td class="num">{f.count}</td><td>{_e(f.title)}</td></tr>'
            for f in findings
        )
        summary = (
            '<table id="findings-summary"><thead><tr><th>Code</th><th>Severity</th><th class="num">Count</th>'
            f'<th>Finding</th></tr></thead><tbody>{summary_rows}</tbody></table>'
        )
    else:
        summary = '<p class="ok" id="findings-summary">No findings.</p>'
    details = []
    for f in findings:
        if f.code == "WINDOW_INCOMPLETE":
            unit = "window" if f.count == 1 else "windows"
        else:
            unit = "study" if f.count == 1 else "studies"
        details.append(
            f'<section class="finding" id="finding-{_e(f.code)}"><h3><span class="sev {f.severity.value}">{f.severity.value}</span> '
            f'<code>{_e(f.code)}</code> {_e(f.title)}: {f.count} {unit}</h3><p>{_e(f.description)}</p>'
            f"{_study_table(f, studies, include_phi)}</section>"
        )
    not_checked = [c for c in CHECKS if c not in evaluation.checked]
    checked_note = (
        f'<p class="note">Not checked in this run: {", ".join(f"<code>{_e(c)}</code>" for c in not_checked)} '
        "(the state and FHIR checks need <code>--state</code> / <code>--fhir-url</code>; extras need a complete listing).</p>"
        if not_checked else ""
    )
    compared_bits = [f"state <code>{_e(v)}</code>" if k == "state" else f"FHIR server <code>{_e(v)}</code>" for k, v in compared.items() if v]
    listing = (
        f"{windows.get('listed', 0)} window(s) listed, {windows.get('split', 0)} split under the server's caps, "
        f"{len(windows.get('incomplete', []))} incomplete"
    )
    privacy = (
        "Patient names and IDs are included (<code>--include-phi</code>): handle this report as patient data."
        if include_phi else "No patient names or IDs: studies are named by their Study Instance UID; accession numbers are masked."
    )
    months = by_month(studies)
    month_label = "Studies by month of Study Date"
    dated = [m for m, _ in months if m[:1].isdigit()]
    if not _contiguous(dated):
        month_label += " (months with studies only)"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<meta name="referrer" content="no-referrer">
<title>PACS audit: {_e(source)}</title>
<link rel="icon" href="data:,">
<style>{CSS}</style>
</head>
<body>
<header>
<h1>PACS audit</h1>
<p class="meta">Source <code>{_e(source)}</code> &middot; {_e(scope)} &middot; generated {_e(generated)} (today in the PACS's zone: {today.isoformat()})</p>
<p class="meta">Listing: {_e(listing)}.{(" Compared with " + ", ".join(compared_bits) + ".") if compared_bits else ""}</p>
<p class="meta">{privacy}</p>
</header>
<main>
<section id="totals" class="cards">{card_html}</section>
<h2>Findings</h2>
<p class="meta">{severity_counts['error']} error, {severity_counts['warning']} warning and {severity_counts['info']} info finding(s).</p>
{summary}
{checked_note}
<h2>Studies</h2>
<div class="charts">
<figure><figcaption>Studies by modality</figcaption>{_bar_chart_h(by_modality(studies), "Studies by modality", "chart-modality")}</figure>
<figure><figcaption>{month_label}</figcaption>{_bar_chart_v(months, month_label, "chart-month")}</figure>
</div>
<h2>Affected studies</h2>
{"".join(details) if details else '<p class="ok">None.</p>'}
</main>
<footer>qido-crawler audit &middot; report version {REPORT_VERSION} &middot; findings.json and studies.csv beside this file hold every affected study.</footer>
</body>
</html>
"""


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open_private(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_report(
    folder: Path, *, source: str, generated: str, scope: str, today: date, studies: Mapping[str, StudyFacts],
    evaluation: Evaluation, totals: Mapping[str, int], windows: Mapping[str, Any], include_phi: bool,
    compared: Mapping[str, str | None],
) -> list[str]:
    """Write report.html, findings.json and studies.csv into ``folder`` (created if needed)."""
    try:
        make_folder(folder)
        _write(folder / "findings.json", render_json(
            source=source, generated=generated, scope=scope, evaluation=evaluation, totals=totals, windows=windows, compared=compared,
        ))
        _write(folder / "studies.csv", render_csv(studies, evaluation, include_phi))
        _write(folder / "report.html", render_html(
            source=source, generated=generated, scope=scope, today=today, studies=studies, evaluation=evaluation,
            totals=totals, windows=windows, include_phi=include_phi, compared=compared,
        ))
    except OSError as exc:
        raise SinkError(f"cannot write the report into {folder}: {exc.strerror or exc}") from None
    return ["findings.json", "report.html", "studies.csv"]
