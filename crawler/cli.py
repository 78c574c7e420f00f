# PYTHON_ARGCOMPLETE_OK (shell completion: see complete() and README's Shell completion)
"""Command line: argument parsing, progress, summaries, and the one place errors become exit codes.

Exit codes: 0 success; 1 finished, but some studies failed or were inconsistent; 2 usage or
configuration error; 3 the source or a sink could not be reached at all.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TextIO, TypeVar

import orjson

from . import __version__, leanjson, profiles
from .auth import FHIR_KINDS, SOURCE_KINDS
from .auth.settings import OAUTH_KEYS
from .config import DEFAULT_STATE, AuditConfig, SyncConfig, zone
from .errors import ConfigError, CrawlerError, MappingError, SinkError, SourceUnreachable, StateError
from .mapping import MappingOptions, StudyInput, map_study
from .mapping.ids import normalise_base
from .memory import tuned_for_bulk
from .planner import parse_day
from .http import check_base_url, redact
from .crawl import METADATA, CrawlOptions, MetadataMode
from .state import state_location
from .figures import EXIT_OK, EXIT_PARTIAL, EXIT_UNREACHABLE, EXIT_USAGE, RunProgress
from .sync import export, sync
from .worker import convert

if TYPE_CHECKING:
    from .audit import AuditProgress
    from .state import State
    from .status import SourceFacts

PROG = "qido-crawler"
log = logging.getLogger("crawler")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
"""Units a duration may carry: seconds, minutes, hours, days."""


def _seconds(text: str) -> float:
    """A duration: seconds (``90``, ``2.5``), or a number with a unit (``30s``, ``5m``, ``24h``, ``1d``)."""
    number, unit = (text[:-1], UNITS[text[-1]]) if text[-1:] in UNITS else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration (seconds, or with a unit: 30s, 5m, 24h, 1d): {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a duration > 0, not {text!r}")
    return value


def _day(text: str) -> str:
    try:
        return parse_day(text, "date")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions and epilogs to the terminal's width, except a text with line breaks of
    its own (the worked examples), which is printed as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


_SYNC_EXAMPLES = """\
examples:
  first sync: list every study, write the resources into a run folder, keep the state
    qido-crawler sync https://pacs.example.org/dicom-web --out /srv/qido/out --state /srv/qido/state.db

  hourly incremental run, as a crontab line (the state is locked: no flock needed)
    15 * * * *  qido-crawler sync https://pacs.example.org/dicom-web --out /srv/qido/out --state /srv/qido/state.db -q

  weekly full listing that also sends deletions on (Sundays at 02:45)
    45 2 * * 0  qido-crawler sync https://pacs.example.org/dicom-web --out /srv/qido/out --state /srv/qido/state.db --full --prune -q

  to a FHIR server as well: the token comes from the environment (QIDO_CRAWLER_FHIR_TOKEN, e.g. set
  by systemd's EnvironmentFile=), never from the command line, where other users can read it
    qido-crawler sync https://pacs.example.org/dicom-web --state /srv/qido/state.db --fhir-url https://fhir.example.org/fhir

  dry run: how many studies are new, changed and gone, and what a run would cost; nothing written
    qido-crawler sync https://pacs.example.org/dicom-web --state /srv/qido/state.db --dry-run
"""

_AUDIT_EXAMPLES = """\
example:
  audit the whole PACS and compare it with the sync's state and the FHIR server (both read only)
    qido-crawler audit https://pacs.example.org/dicom-web --report /srv/qido/audit --state /srv/qido/state.db --fhir-url https://fhir.example.org/fhir
"""

_STATE_HELP = f"state: a SQLite file, or a postgresql://user@host:port/dbname URL (needs the postgres extra) (default: ./{DEFAULT_STATE})"


def build_parser() -> argparse.ArgumentParser:
    """The command line. Each command's options sit in groups (the README's option tables follow
    the same groups, in the same order: tests/test_docs.py); a default is shown in the help of
    every option that has one, except those read from the environment (they may be secrets)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Crawl a PACS over DICOMweb QIDO-RS and keep a FHIR ImagingStudy copy of it.",
        epilog="Exit codes: 0 success; 1 some studies failed or were inconsistent; 2 usage or "
        "configuration error; 3 the source or a sink could not be reached.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "sync",
        help="list the PACS, crawl what changed, write ImagingStudy resources",
        description="List the studies of a DICOMweb server, crawl the new and changed ones, map them to "
        "FHIR R5 ImagingStudy resources and write what changed since the last run.",
        usage="%(prog)s [options] (URL | --config FILE)",
        epilog=_SYNC_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("url", metavar="URL", nargs="?", help="DICOMweb base URL, e.g. http://localhost:8042/dicom-web")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, metavar="DIR", help="write each run's changes into a new folder under DIR (manifest.json + NDJSON)")
    g.add_argument("--parquet", type=Path, metavar="DIR",
                   help="also write the changes as a change log of three Parquet tables (studies, series, instances), one file per "
                        "table per run under DIR (needs the tables extra; docs/tables.md)")
    g.add_argument("--delta", metavar="URI",
                   help="also keep three Delta Lake tables at URI/studies, URI/series, URI/instances, merged at each checkpoint "
                        "(a folder, or s3:// az:// gs:// with delta-rs's environment; needs the tables extra)")
    _add_tags(g)
    g.add_argument("--state", type=state_location, default=Path(DEFAULT_STATE), metavar="PATH", help=_STATE_HELP)
    g.add_argument("--dry-run", action="store_true",
                   help="list and compare with the state only: report how many studies are new, changed, unchanged and gone, "
                        "and the requests a real run would add; write nothing, fetch no instances")
    g.add_argument("--checkpoint-every", type=_positive, default=1000, metavar="N", help="commit the state and flush the outputs every N crawled studies (and every minute) (default: %(default)s)")
    g = p.add_argument_group("what to list")
    g.add_argument("--since", type=_day, metavar="YYYYMMDD", help="only studies with StudyDate on or after this day")
    g.add_argument("--until", type=_day, metavar="YYYYMMDD", help="only studies with StudyDate on or before this day")
    g.add_argument("--full", action="store_true", help="list every study, not only those since the last run's mark (e.g. a weekly reconciliation)")
    g = p.add_argument_group("incremental runs and deletions")
    g.add_argument("--lookback", type=int, default=7, metavar="DAYS", help="an incremental run lists from the last complete run's date minus this many days (default: %(default)s)")
    g.add_argument("--changes", choices=["qido", "orthanc", "azure", "dcm4chee"],
                   help="also crawl the studies that the server's change source names since the last run, whatever their StudyDate "
                        "(qido, the default: none, only the StudyDate windows; orthanc: Orthanc's /changes log; azure: the Azure DICOM service's change feed; dcm4chee: the studies "
                        "dcm4chee-arc received since, by StudyReceiveDateTime); one it names that the "
                        "server no longer has is gone")
    g.add_argument("--orthanc-url", metavar="URL", help="Orthanc's REST base for --changes (default: URL without /dicom-web)")
    g.add_argument("--prune", action="store_true", help="send studies that are gone from the PACS to the outputs as deletions")
    _add_fhir_resources(p.add_argument_group("FHIR resources"))
    _add_fhir_server(p.add_argument_group("FHIR server", "send the changes to a FHIR server as well"))
    _add_connection(p.add_argument_group("connection and authentication", _CONNECTION))
    g = p.add_argument_group("performance")
    g.add_argument("--workers", type=_positive, default=4, metavar="N", help="studies crawled at once; with --executor dask and no --scheduler, the local cluster's worker processes (default: %(default)s)")
    g.add_argument("--executor", choices=["threads", "dask"], default="threads", help="crawl in this process's threads, or on a Dask cluster (needs the dask extra) (default: %(default)s)")
    g.add_argument("--scheduler", metavar="ADDRESS", help="with --executor dask: a running Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: start a local cluster)")
    g.add_argument("--worker-threads", type=_positive, default=4, metavar="N", help="with --executor dask and no --scheduler: threads per local worker process (default: %(default)s)")
    _add_max_rps(g)
    _add_paging(g)
    g = p.add_argument_group("many sources", _MANY)
    _add_config(g)
    g.add_argument("--parallel", type=_positive, default=1, metavar="N", help="with --config: sync N sources at a time, each in a "
                   "process of its own, its messages marked with its name (default: %(default)s, one after another)")
    g = p.add_argument_group("output format and messages")
    _add_output_format(g)
    g.add_argument("--metrics-file", type=Path, metavar="PATH",
                   help="after the run, write its figures in Prometheus text format to PATH (replaced whole; for node_exporter's "
                        "textfile collector), also when the run fails")

    p = commands.add_parser(
        "watch",
        help="follow the server's change source and write what changes within seconds, until stopped",
        description="Follow the DICOMweb server's change source: a full listing first (on a state without one), then "
        "every --interval the studies the change source names, once quiet for --stable-after, crawled and written as run "
        "folders rolled every --roll-every (or sent to a FHIR server); a complete listing every --reconcile-every finds what "
        "the change source does not tell. Runs until SIGTERM or SIGINT, then finishes the current run folder and exits 0.",
        usage="%(prog)s --changes SOURCE (--out DIR | --fhir-url URL) [options] (URL | --config FILE)",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("url", metavar="URL", nargs="?", help="DICOMweb base URL, e.g. http://localhost:8042/dicom-web")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, metavar="DIR", help="write each run's changes into a new folder under DIR (manifest.json + NDJSON)")
    g.add_argument("--parquet", type=Path, metavar="DIR",
                   help="also write the changes as a change log of three Parquet tables (studies, series, instances), one file per "
                        "table per run under DIR (needs the tables extra; docs/tables.md)")
    g.add_argument("--delta", metavar="URI",
                   help="also keep three Delta Lake tables at URI/studies, URI/series, URI/instances, merged at each checkpoint "
                        "(a folder, or s3:// az:// gs:// with delta-rs's environment; needs the tables extra)")
    _add_tags(g)
    g.add_argument("--state", type=state_location, default=Path(DEFAULT_STATE), metavar="PATH", help=_STATE_HELP)
    g.add_argument("--checkpoint-every", type=_positive, default=1000, metavar="N", help="commit the state and flush the outputs every N crawled studies (and every minute; and after every poll) (default: %(default)s)")
    g = p.add_argument_group("watching")
    g.add_argument("--changes", choices=["orthanc", "azure", "dcm4chee"],
                   help="the change source to follow (orthanc: Orthanc's /changes log; azure: the Azure DICOM service's change feed; "
                        "dcm4chee: the studies dcm4chee-arc received, by StudyReceiveDateTime)")
    g.add_argument("--interval", type=_seconds, default=10.0, metavar="DURATION", help="read the change source this often (default: %(default)g s)")
    g.add_argument("--stable-after", type=_seconds, default=60.0, metavar="DURATION", help="crawl a study once its changes are this old, so that a study being received is not synced half-way (default: %(default)g s)")
    g.add_argument("--roll-every", type=_seconds, default=300.0, metavar="DURATION", help="finish the current run folder (with its manifest) this often; none is made while nothing changes (default: %(default)g s)")
    g.add_argument("--roll-studies", type=_positive, metavar="N", help="also finish the current run folder once it holds N studies")
    g.add_argument("--reconcile-every", type=_seconds, default=86400.0, metavar="DURATION", help="list every study this often, to find what the change source does not tell (deletions on Orthanc, lost changes) (default: %(default)g s)")
    g.add_argument("--exit-after", type=_seconds, metavar="DURATION", help="finish the open run folder and exit 0 after running this long, "
                   "for a supervisor that starts the watch again (bounds the memory a long-lived process accumulates)")
    g.add_argument("--orthanc-url", metavar="URL", help="Orthanc's REST base for --changes orthanc (default: URL without /dicom-web)")
    g.add_argument("--prune", action="store_true", help="send studies that are gone from the PACS to the outputs as deletions")
    g.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on /metrics and liveness on /healthz at this port, every interface (needs the watch extra)")
    _add_fhir_resources(p.add_argument_group("FHIR resources"))
    _add_fhir_server(p.add_argument_group("FHIR server", "send the changes to a FHIR server as well (or instead of --out)"))
    _add_connection(p.add_argument_group("connection and authentication", _CONNECTION))
    g = p.add_argument_group("performance")
    g.add_argument("--workers", type=_positive, default=4, metavar="N", help="studies crawled at once (default: %(default)s)")
    _add_max_rps(g)
    _add_paging(g)
    p.set_defaults(since=None, until=None)
    _add_config(p.add_argument_group("many sources", _MANY + " A watch follows every source at once, each in a process of its own."))
    _add_output_format(p.add_argument_group("output format and messages"))

    p = commands.add_parser(
        "export",
        help="write the full current set from the state",
        description="Write every resource the state holds into DIR, in the same layout as a run folder.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("state and output")
    g.add_argument("--state", type=state_location, default=Path(DEFAULT_STATE), metavar="PATH", help=_STATE_HELP)
    g.add_argument("--out", type=Path, required=True, metavar="DIR", help="an empty or new folder")
    g.add_argument("--format", choices=["ndjson", "parquet"], default="ndjson",
                   help="ndjson: the run-folder layout; parquet: the current snapshot of the tables, DIR/studies.parquet, "
                        "DIR/series.parquet, DIR/instances.parquet (needs the tables extra) (default: %(default)s)")
    _add_verbosity(p.add_argument_group("messages"))

    p = commands.add_parser(
        "map",
        help="map one study's DICOM JSON to an ImagingStudy",
        description="Read a study's instance-level search results (one JSON array, as QIDO-RS returns them) "
        "and print the R5 ImagingStudy as JSON.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="DICOM JSON file, or - for standard input")
    g = p.add_argument_group("mapping")
    g.add_argument("--source", default="", metavar="URL", help="DICOMweb base URL the data came from (makes the resource id)")
    g.add_argument("--wado-url", metavar="URL", help="WADO-RS base for the endpoint reference (default: none)")
    g.add_argument("--fhir-version", choices=["R5", "R4"], default="R5", help="FHIR version of the output (default: %(default)s)")
    g.add_argument("--issuer-system", action="append", default=[], metavar="ISSUER=URI", help="identifier system for an issuer (repeatable)")
    g.add_argument("--timezone", metavar="ZONE", help="IANA time zone for times without an offset (default: this machine's)")
    _add_verbosity(p.add_argument_group("messages"))

    p = commands.add_parser(
        "audit",
        help="crawl the whole PACS and write a report of what is wrong with it",
        description="List every study (or a StudyDate window) with the same engine as sync, read each study's series "
        "and instances, and write report.html, findings.json and studies.csv into DIR. Exit code 1 when findings of "
        "severity error exist.",
        usage="%(prog)s --report DIR [options] URL",
        epilog=_AUDIT_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("url", metavar="URL", help="DICOMweb base URL, e.g. http://localhost:8042/dicom-web")
    g = p.add_argument_group("output")
    g.add_argument("--report", type=Path, required=True, metavar="DIR", help="folder for report.html, findings.json and studies.csv (created if needed)")
    g.add_argument("--include-phi", action="store_true", help="put patient names, Patient IDs and full accession numbers into the report")
    g.add_argument("--timezone", metavar="ZONE", help="IANA time zone of the PACS, for what 'today' is (future dates) (default: this machine's)")
    g = p.add_argument_group("what to list")
    g.add_argument("--since", type=_day, metavar="YYYYMMDD", help="only studies with StudyDate on or after this day")
    g.add_argument("--until", type=_day, metavar="YYYYMMDD", help="only studies with StudyDate on or before this day")
    g = p.add_argument_group("state and FHIR server to compare with")
    g.add_argument("--state", type=state_location, metavar="PATH", help="also compare with this state (a SQLite file, read only, or a postgresql:// URL)")
    g.add_argument("--fhir-url", metavar="URL", help="also compare with the ImagingStudy resources of this FHIR server (read only)")
    _add_fhir_credentials(g)
    _add_connection(p.add_argument_group("connection and authentication", _CONNECTION))
    g = p.add_argument_group("performance")
    g.add_argument("--workers", type=_positive, default=4, metavar="N", help="studies read at once (default: %(default)s)")
    _add_max_rps(g)
    _add_paging(g)
    _add_output_format(p.add_argument_group("output format and messages"))

    p = commands.add_parser("status", help="per source: the last run, the next window, studies by status, what to do", description="Per source: the last run, the window the next run lists, studies by status, the oldest failed study, what was learned about the server, and one line on what to do next for each problem. Reads the state only.", formatter_class=_HelpFormatter)
    g = p.add_argument_group("state")
    g.add_argument("--state", type=state_location, default=Path(DEFAULT_STATE), metavar="PATH", help=f"state: a SQLite file, or a postgresql://user@host:port/dbname URL (needs the postgres extra) (default: ./{DEFAULT_STATE})")
    g.add_argument("--lookback", type=int, default=7, metavar="DAYS", help="the --lookback the next sync will use, for the window shown (default: %(default)s)")
    g = p.add_argument_group("output format and messages")
    g.add_argument("--json", action="store_true", help="print JSON on stdout (schema in README)")
    _add_verbosity(g)
    return parser


_CONNECTION = "to the DICOMweb server; credentials are better given in the environment variables named than on the command line"

_Group = argparse._ArgumentGroup


def _add_fhir_resources(g: _Group) -> None:
    """What the resources hold (sync and watch)."""
    g.add_argument("--fhir-version", choices=["R5", "R4"], default="R5", help="FHIR version of the output (default: %(default)s)")
    g.add_argument("--patients", action="store_true", help="also write a Patient resource per (issuer, Patient ID) and reference it from the subject")
    g.add_argument("--issuer-system", action="append", default=[], metavar="ISSUER=URI", help="identifier system for an Issuer of Patient ID or accession issuer (repeatable)")
    g.add_argument("--wado-url", metavar="URL", help="WADO-RS base the Endpoint resource points at (default: URL)")
    g.add_argument("--timezone", metavar="ZONE", help="IANA time zone of the PACS, for times without Timezone Offset From UTC (default: this machine's)")
    g.add_argument("--metadata", choices=[m.value for m in MetadataMode], default="auto", help="read WADO-RS metadata: auto (when QIDO leaves out sequences the mapping needs), never, always (default: %(default)s)")
    g.add_argument("--metadata-max-instances", type=_positive, default=1000, metavar="N", help="studies with more instances read one instance's metadata per series instead of the whole study's (default: %(default)s)")
    g.add_argument("--validate", action="store_true", help="validate every resource with fhir.resources before writing it (needs the validate extra)")


def _add_fhir_server(g: _Group) -> None:
    """The FHIR server to send the changes to (sync and watch)."""
    g.add_argument("--fhir-url", metavar="URL", help="also send the changes to this FHIR server (transaction Bundles of PUT by id; DELETE with --prune)")
    g.add_argument("--fhir-batch-size", type=_positive, default=100, metavar="N", help="studies per transaction Bundle (default: %(default)s)")
    g.add_argument("--fhir-ids", choices=["ours", "server"], default="ours", help="ours: PUT by the crawler's ids (the server must allow update as create); server: conditional updates by identifier, the server's ids kept in the state (default: %(default)s)")
    _add_fhir_credentials(g)
    g.add_argument("--log-server-text", action="store_true", help="keep the FHIR server's error texts (OperationOutcome diagnostics) in logs and the state: they may contain patient data (default: status, issue codes and element paths only)")


def _add_fhir_credentials(g: _Group) -> None:
    g.add_argument("--fhir-user", default=os.environ.get("QIDO_CRAWLER_FHIR_USER"), help="basic auth user for the FHIR server (env QIDO_CRAWLER_FHIR_USER)")
    g.add_argument("--fhir-password", default=os.environ.get("QIDO_CRAWLER_FHIR_PASSWORD"), help="basic auth password for the FHIR server (env QIDO_CRAWLER_FHIR_PASSWORD)")
    g.add_argument("--fhir-token", default=os.environ.get("QIDO_CRAWLER_FHIR_TOKEN"), help="bearer token for the FHIR server (env QIDO_CRAWLER_FHIR_TOKEN)")
    g.add_argument("--fhir-auth", choices=FHIR_KINDS, help="the FHIR server's kind of credentials (README: Authentication) (default: inferred from the options given)")
    _add_oauth(g, "--fhir-oauth-", "the FHIR server's ", "; smart: from the server's .well-known/smart-configuration")


def _add_oauth(g: _Group, prefix: str, whose: str, token_url: str = "") -> None:
    """OAuth2 client credentials (and for the FHIR server SMART Backend Services): no secret on the command line."""
    g.add_argument(f"{prefix}token-url", metavar="URL", help=f"{whose}OAuth2 token endpoint{token_url}")
    g.add_argument(f"{prefix}client-id", metavar="ID", help=f"{whose}OAuth2 client id")
    g.add_argument(f"{prefix}client-secret-env", metavar="NAME", help="the environment variable that holds the client secret")
    g.add_argument(f"{prefix}client-secret-file", metavar="PATH", help="a file that holds the client secret (one line)")
    g.add_argument(f"{prefix}client-auth", choices=("basic", "post"), help="how the client secret is sent: basic (HTTP Basic, "
                   "client_secret_basic; default) or post (in the form, client_secret_post, for token endpoints that take only that)")
    g.add_argument(f"{prefix}private-key", metavar="PATH", help="a PEM private key (RSA: RS384, EC P-384: ES384) to sign a JWT client assertion instead of a secret")
    g.add_argument(f"{prefix}key-id", metavar="KID", help="the key id (kid) of the private key, as registered with the token endpoint")
    g.add_argument(f"{prefix}private-key-passphrase-env", metavar="NAME", help="the environment variable that holds the passphrase of an encrypted private key")
    g.add_argument(f"{prefix}scope", metavar="SCOPE", help="the scope to ask for (space-separated)"
                   + ("; smart default: system/<Type>.cruds for each type written (the audit: system/ImagingStudy.rs)" if "fhir" in prefix else ""))


def _add_connection(g: _Group) -> None:
    """Auth and transport options that sync and audit share."""
    g.add_argument("--user", default=os.environ.get("QIDO_CRAWLER_USER"), help="HTTP basic auth user (env QIDO_CRAWLER_USER)")
    g.add_argument("--password", default=os.environ.get("QIDO_CRAWLER_PASSWORD"), help="HTTP basic auth password (env QIDO_CRAWLER_PASSWORD)")
    g.add_argument("--token", default=os.environ.get("QIDO_CRAWLER_TOKEN"), help="bearer token (env QIDO_CRAWLER_TOKEN)")
    g.add_argument("--token-command", default=os.environ.get("QIDO_CRAWLER_TOKEN_COMMAND"), metavar="CMD", help="command that prints a bearer token; run again after a 401 (env QIDO_CRAWLER_TOKEN_COMMAND)")
    g.add_argument("--auth", choices=SOURCE_KINDS, help="the DICOMweb server's kind of credentials (README: Authentication) (default: inferred from the options given)")
    _add_oauth(g, "--oauth-", "")
    g.add_argument("--aws-region", metavar="REGION", help="with --auth aws: the region to sign for (default: from the URL's host name, "
                   "dicom-medical-imaging.REGION.amazonaws.com, else AWS_REGION)")
    g.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="extra HTTP header on every request (repeatable)")
    g.add_argument("--ca-bundle", default=os.environ.get("QIDO_CRAWLER_CA_BUNDLE"), metavar="PATH", help="CA certificates to verify TLS with (env QIDO_CRAWLER_CA_BUNDLE)")
    g.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (warns)")
    g.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="longest wait for an answer: each request, its whole body included, must arrive within 10 s (connecting) + SECONDS (default: %(default)g)")
    g.add_argument("--max-response-mb", type=_positive, default=240, metavar="N", help="refuse answers larger than N MB, on the wire or decoded (default: %(default)s)")
    g.add_argument("--retries", type=int, default=4, metavar="N", help="retries of a failed request (default: %(default)s)")


def _add_max_rps(g: _Group) -> None:
    g.add_argument("--max-rps", type=float, metavar="R", help="at most R requests per second to the server")


class _Default(int):
    """An option's default as argparse holds it: told apart from the same number given, so that a
    server profile's value takes its place (see _paging)."""


def _given(value: int | None) -> int | None:
    return None if isinstance(value, _Default) else value


def _add_paging(g: _Group) -> None:
    """The server profile and the paging options whose defaults it gives (sync, watch, audit)."""
    g.add_argument("--server-profile", choices=[*profiles.NAMES, profiles.AUTO], default=profiles.AUTO,
                   help="the server family whose documented limits give the defaults of the four options below (and the change source "
                        "watch follows): auto detects Google, Azure, AWS HealthImaging and dcm4chee-arc from the URL, else generic "
                        "(README: Server profiles) (default: %(default)s)")
    g.add_argument("--page-size", type=_positive, default=_Default(profiles.GENERIC_PAGE_SIZE), metavar="N",
                   help="studies asked for per listing request (default: %(default)s, or the server profile's; never above its largest limit)")
    g.add_argument("--max-offset", type=_positive, default=_Default(profiles.GENERIC_MAX_OFFSET), metavar="N",
                   help="largest offset the server accepts; a window with more results is split (default: %(default)s, or the server profile's)")
    g.add_argument("--max-results", type=_positive, metavar="N", help="the server's cap on results per query, if known (e.g. Orthanc's "
                   "LimitFindResults; the aws-healthimaging profile's 10000); found by itself otherwise")
    g.add_argument("--instance-page-size", type=_positive, default=_Default(profiles.GENERIC_INSTANCE_PAGE_SIZE), metavar="N",
                   help="instances asked for per request (default: %(default)s, or the server profile's; never above its largest limit)")


_MANY = ("Sources named in a TOML file (sources.toml, see README \"Many sources, one file\"), each with its URL and its options; "
         "the command line's options apply to every source and win over the file's.")


def _add_config(g: _Group) -> None:
    g.add_argument("--config", type=Path, metavar="FILE", help="the sources of a TOML file instead of one URL; one state holds them all, "
                   "each source with its own run lock")
    g.add_argument("--only", action="append", default=[], metavar="NAME", help="with --config: only this source (repeatable)")


def _add_tags(g: _Group) -> None:
    g.add_argument("--include-tag", action="append", default=[], metavar="TAG",
                   help="with --parquet/--delta: one more typed column for this DICOM attribute, by keyword or tag (SliceThickness, "
                        "00180050), its level inferred or given (Manufacturer:series) (repeatable; docs/tables.md)")
    g.add_argument("--include-phi", action="store_true",
                   help="allow --include-tag attributes that identify a patient, a person or an institution (PatientName, "
                        "AccessionNumber, InstitutionName, ...)")


def _add_output_format(g: _Group) -> None:
    g.add_argument("--json", action="store_true", help="print a JSON summary on stdout at the end")
    _add_verbosity(g)


def _add_verbosity(g: _Group | argparse.ArgumentParser) -> None:
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    g.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr; no progress")


def complete(parser: argparse.ArgumentParser, exit_with: Callable[[int], object] = os._exit, output: TextIO | None = None) -> None:
    """Shell completion (the completion extra): when the shell's hook asks (argcomplete sets
    _ARGCOMPLETE), print the candidates and exit through ``exit_with``; otherwise return at once,
    importing nothing."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete  # type: ignore[import-not-found, unused-ignore]  # the optional completion extra
    except ImportError:
        return
    argcomplete.autocomplete(parser, exit_method=exit_with, output_stream=output)


F = TypeVar("F")


class Progress(Generic[F]):
    """A live display of a few lines on a terminal, redrawn in place at most ten times a second;
    nothing at all when not enabled (stderr is not a TTY, or --quiet). ``line`` renders the
    figures as lines (one string, lines separated by newlines).

    Each line is cut to the terminal's width: a line that wrapped would move the cursor further
    than the redraw goes back. A log record of the ``crawler`` logger first clears the display,
    so that the message stands on its own lines; the next call draws the display again below it."""

    def __init__(self, stream: TextIO, enabled: bool, line: Callable[[F], str]) -> None:
        self.stream = stream
        self.enabled = enabled
        self.line = line
        self.last = 0.0
        self.height = 0
        self.shown = False
        self._lock = threading.RLock()
        self._handlers: list[logging.Handler] = list(logging.getLogger("crawler").handlers) if enabled else []
        for handler in self._handlers:
            handler.addFilter(self._clear_before_logging)

    def __call__(self, figures: F) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.1:
            return
        self.last = now
        width = _columns(self.stream) - 1
        lines = [line[:width] for line in self.line(figures).split("\n")]
        with self._lock:
            self.stream.write(self._home() + "\x1b[K\n".join(lines) + "\x1b[J")
            self.stream.flush()
            self.height = len(lines)
            self.shown = True

    def clear(self) -> None:
        with self._lock:
            if self.height:
                self.stream.write(self._home() + "\x1b[J")
                self.stream.flush()
                self.height = 0

    def close(self) -> None:
        self.clear()
        for handler in self._handlers:
            handler.removeFilter(self._clear_before_logging)
        self._handlers = []

    def _home(self) -> str:
        """Back to the start of the display's first line."""
        return "\r" + (f"\x1b[{self.height - 1}A" if self.height > 1 else "")

    def _clear_before_logging(self, record: logging.LogRecord) -> bool:
        self.clear()
        return True


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 80
    return columns if columns >= 20 else 80


def _tqdm() -> Any:
    """tqdm, imported only when a display is drawn: its import costs start-up time that ``--help``
    and runs without a display need not pay. Only its formatting is used (``format_meter``,
    ``format_interval``); the drawing in place is ``Progress``'s, as the display has three lines."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    return tqdm


def _elapsed(seconds: float) -> str:
    return str(_tqdm().format_interval(seconds))


def _rate(per_second: float) -> str:
    return f"{per_second:.1f} studies/s" if per_second >= 1 else f"{per_second:.2f} studies/s"


def _bar(done: int, total: int | None, eta: float | None, what: str) -> str:
    """The bar, percentage and ETA once ``total`` is known, else what stands in for them until the
    listing is complete."""
    if total is None:
        return "listing: a percentage and an ETA once the listing is complete"
    encoding = (getattr(sys.stderr, "encoding", None) or "ascii").lower().replace("-", "")
    meter = _tqdm().format_meter(min(done, total) if total else 1, total or 1, 0, ascii=not encoding.startswith("utf"),
                                 bar_format="{percentage:3.0f}% |{bar:30}|")
    left = _elapsed(0) if done >= total else _elapsed(eta) if eta is not None else "?"
    return f"{meter} {done}/{total} to {what}  ETA {left}"


def sync_line(progress: RunProgress) -> str:
    """Three lines: the studies (``crawled`` as they finish, ``saved`` only at checkpoints), the
    bar once the listing is complete, and the pace and the problems."""
    f = progress.figures
    return "\n".join((
        f"listed {f.studies_listed}  crawled {progress.crawled}  saved {progress.saved} (at checkpoints)  "
        f"skipped unchanged {f.studies_unchanged}",
        _bar(progress.crawled, progress.to_crawl, progress.eta, "crawl"),
        f"{_rate(progress.rate)}  elapsed {_elapsed(progress.elapsed)}  failed {f.studies_failed + f.studies_inconsistent}  "
        f"requests {progress.requests}  retries {progress.retries}",
    ))


def audit_line(figures: AuditProgress) -> str:
    return "\n".join((
        f"listed {figures.studies_listed}  read {figures.studies_read}",
        _bar(figures.studies_read, figures.to_read, figures.eta, "read"),
        f"{_rate(figures.rate)}  elapsed {_elapsed(figures.elapsed)}  unreadable {figures.studies_unreadable}  "
        f"requests {figures.requests}  retries {figures.retries}",
    ))


def _progress(args: argparse.Namespace, line: Callable[[F], str]) -> Progress[F]:
    return Progress(sys.stderr, sys.stderr.isatty() and not args.quiet, line)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    root = logging.getLogger("crawler")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for noisy in ("urllib3", "requests"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def issuer_systems(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        issuer, sep, system = pair.partition("=")
        if not sep or not issuer.strip() or ":" not in system:
            raise ConfigError(f"--issuer-system takes ISSUER=URI (e.g. HOSP-A=urn:oid:1.2.3), not {pair!r}")
        out[issuer.strip()] = system.strip()
    return out


def headers(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise ConfigError("--header takes NAME:VALUE with a header name before the colon (the value given is not shown)")
        out[name.strip()] = value.strip()
    return out


def verification(args: argparse.Namespace) -> bool | str:
    if args.insecure and args.ca_bundle:
        raise ConfigError("use either --insecure or --ca-bundle, not both")
    if args.insecure:
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        log.warning("TLS certificates are not verified (--insecure)")
        return False
    if args.ca_bundle:
        if not Path(args.ca_bundle).is_file():
            raise ConfigError(f"--ca-bundle: no file {args.ca_bundle}")
        return str(args.ca_bundle)
    return True


def _shared(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that sync and audit take from the same options: the connection
    (_add_connection's options), the listing, and the FHIR server's credentials."""
    if args.url is None:
        raise ConfigError("give the DICOMweb server's URL (or, for sync and watch, --config FILE)", setting="url")
    paging = _paging(args)
    return {
        "url": check_base_url(args.url),
        "since": args.since,
        "until": args.until,
        "workers": args.workers,
        "page_size": paging.page_size,
        "max_offset": paging.max_offset,
        "max_results": paging.max_results,
        "server_profile": paging.profile.name,
        "server_profile_how": paging.how,
        "zone": zone(args.timezone),
        "fhir_url": args.fhir_url,
        "fhir_user": args.fhir_user,
        "fhir_password": args.fhir_password,
        "fhir_token": args.fhir_token,
        "user": args.user,
        "password": args.password,
        "token": args.token,
        "token_command": args.token_command,
        "auth": args.auth,
        "auth_options": {**_oauth_options(args, "oauth_"), **_aws_options(args)},
        "fhir_auth": args.fhir_auth,
        "fhir_auth_options": _oauth_options(args, "fhir_oauth_"),
        "headers": headers(args.header),
        "max_rps": args.max_rps,
        "verify": verification(args),
        "timeout": (10.0, args.timeout),
        "retries": args.retries,
        "max_response_mb": args.max_response_mb,
    }


def _paging(args: argparse.Namespace) -> profiles.Settings:
    """The server profile (--server-profile, or detected from the URL) and the paging settings
    made from it and the options given; worked out once per command."""
    made = getattr(args, "_paging", None)
    if made is None:
        profile, how = profiles.choose(args.server_profile, args.url or "")
        made = profiles.settings(profile, how, page_size=_given(args.page_size), instance_page_size=_given(args.instance_page_size),
                                 max_offset=_given(args.max_offset), max_results=args.max_results)
        if how == "detected":
            log.info("server profile %s, detected from the URL (--server-profile to choose another)", profile.name)
        for lowered in made.lowered:
            log.warning("%s: the %s server profile's largest limit", lowered, profile.name)
        args._paging = made
    return made


def _oauth_options(args: argparse.Namespace, prefix: str) -> dict[str, str]:
    """The --oauth-* (or --fhir-oauth-*) options given, by key (``crawler.auth.settings.OAUTH_KEYS``)."""
    return {key: value for key in OAUTH_KEYS if (value := getattr(args, prefix + key, None)) is not None}


def _aws_options(args: argparse.Namespace) -> dict[str, str]:
    """--aws-region, as the aws kind reads it (``region``); only with --auth aws."""
    region = getattr(args, "aws_region", None)
    if region is None:
        return {}
    if args.auth != "aws":
        raise ConfigError("--aws-region goes with --auth aws", setting="aws_region")
    return {"region": region}


def _writing(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that sync and watch take from the same options: the connection, the outputs,
    the change source and how studies are crawled and mapped."""
    if args.wado_url:
        check_base_url(args.wado_url)
    return {
        **_shared(args),
        "out": args.out,
        "parquet": args.parquet,
        "delta": args.delta,
        "state": args.state,
        "prune": args.prune,
        "changes": None if args.changes == "qido" else args.changes,
        "fhir_batch_size": args.fhir_batch_size,
        "log_server_text": args.log_server_text,
        "fhir_ids": args.fhir_ids,
        "orthanc_url": check_base_url(args.orthanc_url) if args.orthanc_url else None,
        "checkpoint_every": args.checkpoint_every,
        "crawl": CrawlOptions(_paging(args).instance_page_size, MetadataMode(args.metadata), args.metadata_max_instances,
                              fallbacks=_paging(args).fallbacks),
        "fhir_version": args.fhir_version,
        "patients": args.patients,
        "validate": args.validate,
        "issuer_systems": issuer_systems(args.issuer_system),
        "wado_url": args.wado_url,
        "include_tags": tuple(args.include_tag),
        "include_phi": args.include_phi,
    }


def _cmd_sync(args: argparse.Namespace) -> int:
    config = SyncConfig(
        **_writing(args),
        full=args.full,
        lookback=args.lookback,
        executor=args.executor,
        scheduler=args.scheduler,
        worker_threads=args.worker_threads,
    )
    if args.dry_run:
        return _dry_run(args, config)
    progress = _progress(args, sync_line)
    started = time.time()
    try:
        with tuned_for_bulk():
            result = sync(config, progress)
    except CrawlerError as exc:
        if args.metrics_file:
            _write_metrics(args.metrics_file, config.url, started, exit_code(exc), {}, {})
        raise
    finally:
        progress.close()
    if args.metrics_file:
        _write_metrics(args.metrics_file, config.url, started, result.exit_code, vars(result.figures), result.requests)
    f = result.figures
    if not args.quiet:
        lines = [
            f"{PROG}: synced {redact(config.url)} in {result.seconds:.1f} s with {result.requests['total']} requests",
            f"  studies ({result.scope}): {f.studies_listed} listed, {f.studies_new} new, {f.studies_changed} changed, "
            f"{f.studies_unchanged} unchanged, {f.studies_failed} failed, {f.studies_inconsistent} inconsistent, {f.studies_gone} gone"
            + (f", {f.studies_rechecked} re-checked (unchanged, no counts to skip them by)" if f.studies_rechecked else ""),
            f"  resources written: {f.resources_written}" + (f", deleted: {f.resources_deleted}" if f.resources_deleted else "")
            + (f", refused (sent again next run): {f.resources_refused}" if f.resources_refused else "")
            + (f" -> {result.run_dir}" if result.run_dir else ""),
        ]
        if f.windows_incomplete:
            lines.append(f"  listing incomplete in {f.windows_incomplete} window(s): state kept as it was for those")
        print("\n".join(lines), file=sys.stderr)
    if args.json:
        print(json.dumps(_summary(args, result.summary()), sort_keys=True))
    return result.exit_code


def _cmd_watch(args: argparse.Namespace) -> int:
    """Watch until SIGTERM or SIGINT: the signal sets the stop event (the watch finishes its poll,
    its run folder and its state, then returns); the handlers are put back afterwards."""
    import signal

    from .watch import WatchOptions, watch

    if args.changes is None and args.url is not None:
        args.changes = _paging(args).profile.changes
    if args.changes is None:
        raise ConfigError("watch needs the change source to follow: --changes orthanc, azure or dcm4chee "
                          "(or a --server-profile that has one)", setting="changes")
    config = SyncConfig(**_writing(args))
    options = WatchOptions(interval=args.interval, stable_after=args.stable_after, roll_every=args.roll_every,
                           reconcile_every=args.reconcile_every, metrics_port=args.metrics_port, roll_studies=args.roll_studies,
                           exit_after=args.exit_after)
    stop = threading.Event()

    def stopping(signum: int, frame: object) -> None:
        if not stop.is_set():
            log.warning("%s: finishing the current poll and run folder, then stopping", signal.Signals(signum).name)
        stop.set()

    before = {sig: signal.signal(sig, stopping) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        result = watch(config, options, stop)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if not args.quiet:
        print(f"{PROG}: watched {redact(config.url)}: {result.polls} polls ({result.poll_errors} failed, tried again), "
              f"{result.runs} runs, {len(result.run_dirs)} run folders, {result.reconciliations} reconciliations; studies: "
              f"{result.studies_synced} synced, {result.studies_failed} failed, {result.studies_gone} gone", file=sys.stderr)
    if args.json:
        print(json.dumps(_summary(args, result.summary()), sort_keys=True))
    return result.exit_code


def _summary(args: argparse.Namespace, summary: dict[str, Any]) -> dict[str, Any]:
    """A --json line; with --config it names its source."""
    name = getattr(args, "source_name", None)
    paging = getattr(args, "_paging", None)
    if paging is not None:
        summary = {**summary, "server_profile": paging.summary()}
    return summary if name is None else {"source": name, **summary}


def _write_metrics(path: Path, url: str, started: float, code: int, figures: dict[str, Any], requests: dict[str, int]) -> None:
    """The run's figures for node_exporter's textfile collector (see metricsfile); the time of
    the last successful run is carried over from the file it replaces."""
    from . import metricsfile

    ended = time.time()
    last_success = ended if code == EXIT_OK else metricsfile.previous_success(path)
    text = metricsfile.render(redact(url), ended, code, ended - started, figures, requests, last_success)
    try:
        metricsfile.write(path, text)
    except OSError as exc:
        log.error("cannot write the metrics file %s: %s", path, exc.strerror or exc)


def _dry_run(args: argparse.Namespace, config: SyncConfig) -> int:
    from .dryrun import dry_run

    result = dry_run(config)
    if not args.quiet:
        for message in result.errors[:20]:
            print(f"{PROG}: warning: {message}", file=sys.stderr)
        lines = [
            f"{PROG}: dry run of {redact(config.url)} ({result.scope}): nothing written, {result.requests['total']} listing requests",
            f"  studies: {result.studies_listed} listed, {result.studies_new} new, {result.studies_changed} changed, "
            f"{result.studies_unchanged} unchanged, {result.studies_gone} gone"
            + (f", {result.studies_to_retry} failed earlier (asked for again)" if result.studies_to_retry else ""),
            f"  a real run would crawl {result.studies_new + result.studies_changed} studies with about {result.crawl_requests} more requests",
        ]
        if result.windows_incomplete or result.studies_not_listed:
            lines.append(f"  listing incomplete ({result.windows_incomplete} window(s), {result.studies_not_listed} studies not listed "
                         "but still on the server): a real run would mark nothing gone")
        print("\n".join(lines), file=sys.stderr)
    if args.json:
        print(json.dumps(_summary(args, result.summary()), sort_keys=True))
    return result.exit_code


def _cmd_export(args: argparse.Namespace) -> int:
    with tuned_for_bulk():
        if args.format == "parquet":
            from .tables.export import export_tables

            counts = export_tables(args.state, args.out)
        else:
            counts = export(args.state, args.out)
    if not args.quiet:
        detail = ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "nothing"
        print(f"{PROG}: exported {detail} -> {args.out}", file=sys.stderr)
    return EXIT_OK


def _cmd_map(args: argparse.Namespace) -> int:
    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.file}: {exc.strerror}") from None
    gc.disable()  # one study's objects, all alive until the end: collections would only scan them
    try:
        data = leanjson.datasets(raw, METADATA)
    except orjson.JSONDecodeError as exc:
        raise MappingError(None, "input", f"malformed JSON ({exc})") from None
    except leanjson.NotDatasets:
        data = []
    if not data:
        raise MappingError(None, "input", "expected a non-empty JSON array of instance-level results (objects)")
    if args.source:
        check_base_url(args.source)
    if args.wado_url:
        check_base_url(args.wado_url)
    options = MappingOptions(
        source=normalise_base(args.source) if args.source else "",
        wado_base=normalise_base(args.wado_url) if args.wado_url else None,
        zone=zone(args.timezone),
        issuer_systems=issuer_systems(args.issuer_system),
    )
    resource = convert(map_study(StudyInput(study={}, instances=data), options), args.fhir_version)
    sys.stdout.buffer.write(orjson.dumps(resource, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    sys.stdout.flush()
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from .run import RETRY_PER_RUN
    from .state import MIGRATIONS, State
    from .status import render, report

    if args.lookback < 0:
        raise ConfigError(f"--lookback must be a number of days >= 0, not {args.lookback}")
    state = State.open(args.state, read_only=True)
    try:
        shown = redact(args.state, keep_user=True) if isinstance(args.state, str) else str(args.state)
        newest = max(version for version, _, _ in MIGRATIONS)
        if state.schema_version > newest:   # its rows may mean what this version cannot tell
            raise StateError(f"state {shown} was written by a newer qido-crawler (schema {state.schema_version}); "
                             f"this one reads up to schema {newest}")
        legacy: dict[str, Any] = {
            "studies": state.counts_by_status(),
            "runs": [{**run, "figures": _masked_figures(run["figures"])} for run in state.last_runs()],
            "problems": [{"source": s, "study_uid": u, "status": st, "error": _masked(e)} for s, u, st, e in state.problems()],
        }
        schema = state.schema_version
        sources = [_source_facts(state, source, state.lock_holder(source) or state.lock_holder()) for source in state.source_names()]
    finally:
        state.close()
    status = report(shown, schema, sources, datetime.now(timezone.utc), lookback=args.lookback, retry_per_run=RETRY_PER_RUN, legacy=legacy)
    if args.json:
        print(json.dumps(status, sort_keys=True))
    else:
        print("\n".join(render(status)))
    return EXIT_OK


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _masked(text: str | None, limit: int = 500) -> str | None:
    """A stored error as ``status`` shows it: one line of printable characters, any URL in it
    without credentials (as the run's messages are), at most ``limit`` characters. The run's
    errors name studies by UID and causes only; this keeps a state edited by hand, or written by
    an older version, from printing more."""
    if text is None:
        return None
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    line = _URL_IN_TEXT.sub(lambda m: _short_url(redact(m.group(0))), line)
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def _short_url(url: str, keep: int = 60) -> str:
    """A URL with a long query (the includefield lists of a QIDO search) cut after ``keep`` characters of it;
    punctuation that ends a sentence stays outside."""
    stripped = url.rstrip(".,:;)")
    head, mark, query = stripped.partition("?")
    short = stripped if len(query) <= keep else f"{head}{mark}{query[:keep]}\u2026"
    return short + url[len(stripped):]


def _masked_figures(figures: dict[str, Any] | None) -> dict[str, Any] | None:
    if figures is None or not isinstance(figures.get("error"), str):
        return figures
    return {**figures, "error": _masked(figures["error"])}


def _running(pid: int | None, holder: tuple[int, str] | None, local: bool) -> bool | None:
    """Whether the run of process ``pid``, which never recorded its end, still runs: it holds the
    run lock (the lock's label names its pid) and that process is alive here. None when that
    cannot be told from this machine (the lock's holder is on another host, or not recorded in
    a PostgreSQL state)."""
    if holder is None:
        return False if local else None
    holder_pid, host = holder
    if host != socket.gethostname():
        return None
    return pid == holder_pid and _alive(holder_pid)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _source_facts(state: State, source: str, holder: tuple[int, str] | None) -> SourceFacts:
    """What the state holds about one source, read for ``status`` (errors masked); ``holder``:
    the run lock's last holder (see State.lock_holder)."""
    from .state import RunRow
    from .status import FailedStudy, RunFacts, SourceFacts, StudyCount

    local = state.dialect == "sqlite"

    def facts(run: RunRow) -> RunFacts:
        error = (run.figures or {}).get("error")
        return RunFacts(run.id, run.started, run.ended, run.outcome, _masked_figures(run.figures), run.folder,
                        alive=_running(run.pid, holder, local) if run.ended is None else None,
                        error=_masked(error) if isinstance(error, str) else None)

    last = state.last_run(source)
    oldest = state.oldest_failed(source)
    cap, verified = state.source_facts(source)
    version = state.schema_version
    return SourceFacts(
        source=source,
        last_run=facts(last) if last is not None else None,
        unended=tuple(facts(run) for run in state.unended_runs(source)),
        mark=state.last_mark(source) if version >= 3 else None,
        changes_cursor=state.change_feed(source),
        studies={status: StudyCount(c.count, c.first_run, c.last_run) for status, c in state.status_counts(source).items()},
        oldest_failed=None if oldest is None else FailedStudy(oldest.study_uid, oldest.status, oldest.last_run, _masked(oldest.last_error)),
        gone_still_held=state.gone_still_held(source),
        cap=cap,
        verified=verified,
        fallbacks=state.fallbacks(source) if version >= 8 else {},
        copied_as_of=state.last_whole_run(source),
        server_profile=state.server_profile(source) if version >= 6 else None,
    )


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit

    shared = _shared(args)
    if args.fhir_url:
        check_base_url(args.fhir_url)
    config = AuditConfig(
        **shared,
        report=args.report,
        state=args.state,
        include_phi=args.include_phi,
        instance_page_size=_paging(args).instance_page_size,
        instances_by_series=_paging(args).profile.instance_level == "series",
    )
    progress = _progress(args, audit_line)
    try:
        with tuned_for_bulk():
            result = audit(config, progress)
    finally:
        progress.close()
    if not args.quiet:
        t = result.totals
        lines = [
            f"{PROG}: audited {result.source} ({result.scope}) in {result.seconds:.1f} s with {result.requests['total']} requests",
            f"  {t['patients']} patients, {t['studies']} studies, {t['series']} series, {t['instances']} instances",
        ]
        for f in sorted(result.evaluation.findings, key=lambda f: (f.severity.value != "error", f.severity.value != "warning", f.code)):
            lines.append(f"  {f.severity.value:<7} {f.code}: {f.count}")
        if not result.evaluation.findings:
            lines.append("  no findings")
        lines.append(f"  report: {result.report_dir / 'report.html'}")
        print("\n".join(lines), file=sys.stderr)
    if args.json:
        print(json.dumps(_summary(args, result.summary()), sort_keys=True))
    return result.exit_code


OPTIONS = {
    "url": "URL",
    "user": "--user/--password",
    "password": "--user/--password",
    "token": "--token",
    "token_command": "--token-command",
    "headers": "--header",
    "max_rps": "--max-rps",
    "timeout": "--timeout",
    "max_response_mb": "--max-response-mb",
    "retries": "--retries",
    "verify": "--ca-bundle/--insecure",
    "out": "--out",
    "parquet": "--parquet",
    "delta": "--delta",
    "state": "--state",
    "since": "--since",
    "until": "--until",
    "full": "--full",
    "lookback": "--lookback",
    "prune": "--prune",
    "checkpoint_every": "--checkpoint-every",
    "changes": "--changes",
    "orthanc_url": "--orthanc-url",
    "fhir_url": "--fhir-url",
    "fhir_batch_size": "--fhir-batch-size",
    "fhir_user": "--fhir-user/--fhir-password",
    "fhir_password": "--fhir-user/--fhir-password",
    "fhir_token": "--fhir-token",
    "fhir_ids": "--fhir-ids",
    "auth": "--auth",
    "aws_region": "--aws-region",
    "fhir_auth": "--fhir-auth",
    **{f"{prefix}oauth_{key}": f"--{prefix.replace('_', '-')}oauth-{key.replace('_', '-')}" for prefix in ("", "fhir_") for key in OAUTH_KEYS},
    "auth_options": "/".join(f"--oauth-{key.replace('_', '-')}" for key in OAUTH_KEYS),
    "fhir_auth_options": "/".join(f"--fhir-oauth-{key.replace('_', '-')}" for key in OAUTH_KEYS),
    "log_server_text": "--log-server-text",
    "page_size": "--page-size",
    "max_offset": "--max-offset",
    "max_results": "--max-results",
    "workers": "--workers",
    "wado_url": "--wado-url",
    "zone": "--timezone",
    "crawl": "--instance-page-size/--metadata/--metadata-max-instances",
    "fhir_version": "--fhir-version",
    "patients": "--patients",
    "validate": "--validate",
    "issuer_systems": "--issuer-system",
    "executor": "--executor",
    "scheduler": "--scheduler",
    "worker_threads": "--worker-threads",
    "report": "--report",
    "include_phi": "--include-phi",
    "include_tags": "--include-tag",
    "instance_page_size": "--instance-page-size",
    "server_profile": "--server-profile",
    "server_profile_how": "--server-profile",
    "instances_by_series": "--server-profile",
}
"""The option (or options) that set each setting of SyncConfig and AuditConfig: the library's
ConfigError names a setting, the CLI's message names the option."""


def config_message(exc: ConfigError) -> str:
    """``exc``'s message, after the option that sets the setting at fault when it names one."""
    option = OPTIONS.get(exc.setting) if exc.setting else None
    return f"{option}: {exc}" if option else str(exc)


def exit_code(exc: CrawlerError) -> int:
    """The exit code ``main`` gives for ``exc``."""
    if isinstance(exc, (ConfigError, StateError)):
        return EXIT_USAGE
    if isinstance(exc, (SourceUnreachable, SinkError)):
        return EXIT_UNREACHABLE
    return EXIT_PARTIAL


COMMANDS = {"sync": _cmd_sync, "watch": _cmd_watch, "export": _cmd_export, "map": _cmd_map, "status": _cmd_status, "audit": _cmd_audit}


class _NamedSource(logging.Filter):
    """Puts a source's name before each message of its run (--config, one source after another)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.prefix = f"[{name}] "

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"{self.prefix}{record.msg}"
        return True


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[command]
            return found
    raise LookupError(command)


_MANY_ONLY = ("config", "only", "parallel")


def _many(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """sync or watch over the sources of a --config file: each source's options go through the
    command's own parser, then the command line's explicit options over them. In a child (see
    children) the one source it is given; sync without --parallel one after another in this
    process; otherwise one child process per source. Exit code: the worst of the sources'."""
    from . import sourcefile
    from .children import SOURCE_ENV, run_children

    if args.url is not None:
        raise ConfigError("with --config the sources file names the URLs: give none on the command line", setting="config")
    command = _command_parser(parser, args.command)
    options = {o for action in command._actions for o in action.option_strings if o.startswith("--")}
    options -= {f"--{name}" for name in _MANY_ONLY} | {"--help"}
    child = os.environ.get(SOURCE_ENV)
    sources = sourcefile.load(args.config, options, [child] if child else args.only)
    defaults = {action.dest: action.default for action in command._actions}
    given = {k: v for k, v in vars(args).items() if k in defaults and k not in ("url", "help", *_MANY_ONLY) and v != defaults[k]}
    runs = []
    for source in sources:
        def refuse(message: str, name: str = source.name) -> NoReturn:
            raise ConfigError(f"the sources file {args.config}, source {name}: {message}", setting="config")

        command.error = refuse  # type: ignore[method-assign]
        one = command.parse_args(source.argv)
        vars(one).update(given)
        vars(one).update(source.secrets)
        one.command, one.source_name = args.command, source.name
        runs.append(one)
    for setting, option in (("metrics_file", "--metrics-file"), ("metrics_port", "--metrics-port")):
        values = [getattr(one, setting, None) for one in runs if getattr(one, setting, None) is not None]
        if len(values) != len(set(values)):
            raise ConfigError(f"{option} must differ from source to source (set it per source in the file)", setting="config")
    parallel = len(runs) if args.command == "watch" else args.parallel
    if child or len(runs) == 1 or parallel == 1:
        worst = EXIT_OK
        handler = logging.getLogger("crawler").handlers[0]
        for one in runs:
            named = _NamedSource(one.source_name)
            if len(runs) > 1:
                handler.addFilter(named)
            try:
                code = COMMANDS[args.command](one)
            except CrawlerError as exc:
                print(f"{PROG}: [{one.source_name}] error: {config_message(exc) if isinstance(exc, ConfigError) else exc}", file=sys.stderr)
                code = exit_code(exc)
            finally:
                handler.removeFilter(named)
            worst = max(worst, code)
        return worst
    codes = run_children(argv, [one.source_name for one in runs], parallel, PROG)
    return max(codes.values(), default=EXIT_OK)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    complete(parser)
    args = parser.parse_args(argv)
    _setup_logging(args)
    # read by pyarrow (the tables extra, imported only when used) when it loads: its default pool
    # keeps what it frees, and a sync's peak memory grew with the run (docs/tables.md)
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    try:
        if getattr(args, "config", None) is not None:
            return _many(parser, args, list(sys.argv[1:] if argv is None else argv))
        return COMMANDS[args.command](args)
    except CrawlerError as exc:
        print(f"{PROG}: error: {config_message(exc) if isinstance(exc, ConfigError) else exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the state keeps the last completed run", file=sys.stderr)
        return 130
