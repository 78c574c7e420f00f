"""Crawl benchmark on a local Orthanc: qido-crawler side by side with a naive dicomweb-client crawl.

    python benchmarks/bench_crawl.py [--studies 300] [--series 3] [--instances 30] [--workers 4]
                                     [--repeat 1] [--json]

What it does:

1. **Corpus and server.** ``studies x series x instances`` tiny CT files (``benchmarks/corpus.py``,
   deterministic) are loaded once into an Orthanc (1.10 + DICOMweb plugin, the Debian packages)
   whose storage and index are cached in
   ``${XDG_CACHE_HOME:-~/.cache}/qido-crawler/bench-orthanc-<studies>x<series>x<instances>-v1/``.
   Later runs start Orthanc on that folder (new port, fresh config, see ``fixtures/orthanc.py``)
   and only check ``/statistics`` CountInstances; an incomplete cache is loaded again (Orthanc
   keeps what it has), one with other contents is wiped and loaded again. The first run takes a
   minute or two for that (progress on stderr); remove the folder to start over.
2. **Warm-up**: one quick study listing, and one study's instances and metadata.
3. **Variants**, one after the other, against the same Orthanc, each ``--repeat`` times (the run
   with the best wall time is reported; every run's wall time and CPU share is printed below the
   table). The four first crawls run in the order below in odd-numbered repeats and in the
   reverse order in even-numbered ones, so that neither a warming cache nor a change in the
   host's load favours one of them; the steady-state runs follow, on that repeat's state:

   ``naive``          dicomweb-client, one thread: ``search_for_studies()`` (one call: Orthanc
                      answers all), then ``search_for_series(study)`` per study and
                      ``search_for_instances(study, series)`` per series.
   ``first-auto-w1``  ``crawler.sync`` on a fresh state (``--metadata auto``, ``--workers 1``,
                      NDJSON out to a temporary folder): one thread, as the naive crawl, so
                      that naive / first-auto-w1 is the gain from the request strategy alone.
   ``first-auto``     the same with ``--workers N``: first-auto-w1 / first-auto is the gain
                      from concurrency.
   ``first-never``    the same with ``--metadata never`` (QIDO only).
   ``steady``         a second sync on ``first-auto``'s state, nothing changed: the default
                      incremental run (lists only since the last run's mark minus the lookback).
   ``steady-full``    the same with ``--full``: every study listed again, all unchanged.

   For each: wall seconds, HTTP requests (total, by kind, and how many were scoped to one
   series), this process's CPU seconds (``time.process_time``: the client, all its threads),
   Orthanc's CPU seconds (utime + stime from ``/proc/<pid>/stat``), the CPU the host's other
   processes used meanwhile (``/proc/stat``; contention), naive wall / our wall, naive server
   CPU / our server CPU (the work ratio, which contention hardly changes), and client CPU /
   server CPU; below the table, the two gains apart (strategy: naive / first-auto-w1, both one
   thread; concurrency: first-auto-w1 / first-auto) and first-auto's CPU per instance, client
   and server. Our requests are seen by timing ``QidoClient.fetch``, which every GET of the
   crawler goes through (observation only); the naive crawl's through a response hook on its
   session.
4. **Checks**: every variant must find the corpus's studies, and naive and ours the same studies
   with the same instances per study (from ``ImagingStudy.ndjson``); the steady-state runs must
   find every listed study unchanged (``steady-full``: all of them) and write nothing. A failed
   check exits with status 1; a missed target does not.
5. **Targets** (from the issue), printed next to the figures: first sync at least 2.5x faster
   than naive in wall time (5x is within reach on Orthanc); no per-series query in our first
   sync; our CPU at most 10% of the server's.

``--json`` prints one JSON object (corpus, cache, variants with their figures and requests by
URL shape, targets) on stdout instead of the table. Requests by URL shape (``study/metadata``,
``series/instances``, ...) with their summed response times are in the JSON and help to see
which requests dominate.

Run from the repository root with the package installed (``pip install -e '.[test]'``). A warm
run with the default sizes and ``--repeat 2`` took 430 s on a 2-core host under load 7 to 10
(loading the corpus the first time: 100 s more); naive and ``--metadata never`` take most of it (Orthanc 1.10's instance-level QIDO is its most expensive answer). On a shared host, the
others' CPU column says how much the wall figures suffered; ``nice -n -10 python
benchmarks/bench_crawl.py`` (as root; Orthanc inherits the priority) keeps most of it away.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import corpus  # noqa: E402  (benchmarks/corpus.py)
from fixtures import orthanc  # noqa: E402

import importlib  # noqa: E402
from crawler import http, qido  # noqa: E402
from crawler.config import SyncConfig  # noqa: E402
from crawler.crawl import CrawlOptions, MetadataMode  # noqa: E402
from crawler.memory import tuned_for_bulk  # noqa: E402

crawler_sync = importlib.import_module("crawler.sync")  # the module (crawler.sync is also the function)

HAS_FULL = "full" in SyncConfig.__dataclass_fields__  # --full: list everything, not only since the last mark
CACHE_VERSION = "v1"
UPLOAD_THREADS = 4
TARGET_SPEEDUP, STRETCH_SPEEDUP, TARGET_CPU_SHARE = 2.5, 5.0, 0.10
STUDY_UID, SERIES_UID = "0020000D", "0020000E"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- corpus + server


def cache_folder(studies: int, series: int, instances: int) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qido-crawler" / f"bench-orthanc-{studies}x{series}x{instances}-{CACHE_VERSION}"


def count_instances(server: orthanc.Orthanc) -> int:
    return int(server.rest("GET", "/statistics").json()["CountInstances"])


def upload(server: orthanc.Orthanc, studies: int, series: int, instances: int) -> None:
    """POST every corpus file with a few threads; Orthanc keeps instances it already has."""
    total = studies * series * instances
    local = threading.local()
    slots = threading.BoundedSemaphore(UPLOAD_THREADS * 8)
    done = Counter()
    lock = threading.Lock()
    errors: list[str] = []

    def post(name: str, body: bytes) -> None:
        try:
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
            response = session.post(f"{server.url}/instances", data=body, timeout=120)
            if response.status_code != 200:
                errors.append(f"{name}: HTTP {response.status_code} {response.text[:200]}")
            with lock:
                done["n"] += 1
        finally:
            slots.release()

    started = time.monotonic()
    last = started
    with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="upload") as pool:
        for name, body in corpus.iter_files(studies, series, instances):
            if errors:
                break
            slots.acquire()
            pool.submit(post, name, body)
            now = time.monotonic()
            if now - last >= 5:
                last = now
                rate = done["n"] / (now - started)
                log(f"  uploaded {done['n']}/{total} instances ({rate:.0f}/s, about {(total - done['n']) / max(rate, 1):.0f} s left)")
    if errors:
        raise SystemExit(f"upload to Orthanc failed: {errors[0]} ({len(errors)} errors)")
    log(f"  uploaded {done['n']} instances in {time.monotonic() - started:.0f} s")


def prepare(studies: int, series: int, instances: int) -> tuple[orthanc.Orthanc, Path, float]:
    """Orthanc on the cached folder, loaded with the corpus; returns (server, folder, load seconds)."""
    folder = cache_folder(studies, series, instances)
    expected = studies * series * instances
    started = time.monotonic()
    server = orthanc.start(folder)
    try:
        count = count_instances(server)
        if count == expected:
            log(f"Orthanc on cached corpus {folder} ({count} instances)")
            return server, folder, 0.0
        if count > expected:
            log(f"cache {folder} holds {count} instances, not {expected}: wiping it")
            server.stop()
            for sub in ("storage", "index"):
                shutil.rmtree(folder / sub, ignore_errors=True)
            server = orthanc.start(folder)
        log(f"loading {expected} instances ({studies} studies x {series} series x {instances}) into {folder}"
            + (f" ({count} already there)" if count else ""))
        upload(server, studies, series, instances)
        count = count_instances(server)
        if count != expected:
            raise SystemExit(f"Orthanc holds {count} instances after the upload, expected {expected}")
        return server, folder, time.monotonic() - started
    except BaseException:
        server.stop()
        raise


def server_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_cpu() -> float:
    """CPU seconds all processes of the host have used (busy time of every core, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def warm_up(server: orthanc.Orthanc) -> None:
    """One quick listing, and one study's instances and metadata (Orthanc and its plugin's code
    paths, the client's imports and connections). The corpus (about 200 MB on disk) stays in the
    page cache between runs on any machine with memory to spare; ``--repeat`` takes care of the
    rest."""
    listing = server.session.get(f"{server.dicomweb}/studies", params={"limit": 10}, timeout=60)
    listing.raise_for_status()
    study = listing.json()[0][STUDY_UID]["Value"][0]
    for path in ("instances", "metadata"):
        server.session.get(f"{server.dicomweb}/studies/{study}/{path}", timeout=60).raise_for_status()


# --------------------------------------------------------------------------- request accounting


def shape(url: str) -> str:
    """The kind of a DICOMweb URL by its path: ``studies``, ``study/series``, ``series/instances``,
    ``study/metadata``, ``instance/metadata``, ..."""
    parts = [p for p in urlsplit(url).path.split("/") if p]
    if "studies" not in parts:
        return "other"
    parts = parts[parts.index("studies"):]
    level = {1: "studies", 3: "study", 5: "series", 7: "instance"}.get(len(parts))
    if level is None:
        return "other"
    return level if len(parts) == 1 else f"{level}/{parts[-1]}"


KIND = {
    "studies": "studies", "study/series": "series", "study/instances": "instances",
    "series/instances": "instances", "study/metadata": "metadata", "series/metadata": "metadata",
    "instance/metadata": "metadata",
}
PER_SERIES = ("series/", "instance/")


@dataclass
class Recorder:
    """Counts responses by URL shape with their summed response times (``response.elapsed``)."""

    counts: Counter = field(default_factory=Counter)
    seconds: defaultdict = field(default_factory=lambda: defaultdict(float))
    lock: threading.Lock = field(default_factory=threading.Lock)
    fallback: dict[str, int] | None = None  # the crawler's own counts, if the hook saw nothing

    def hook(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.add(response.url, response.elapsed.total_seconds())

    def add(self, url: str, seconds: float) -> None:
        kind = shape(url)
        with self.lock:
            self.counts[kind] += 1
            self.seconds[kind] += seconds

    def attach(self, session: requests.Session) -> requests.Session:
        session.hooks["response"].append(self.hook)
        return session

    def by_kind(self) -> dict[str, int]:
        if not self.counts and self.fallback:
            return {k: self.fallback.get(k, 0) for k in ("total", "studies", "series", "instances", "metadata")}
        kinds = Counter()
        for name, n in self.counts.items():
            kinds[KIND.get(name, "other")] += n
        return {"total": sum(self.counts.values()), **{k: kinds.get(k, 0) for k in ("studies", "series", "instances", "metadata")}}

    def shapes(self) -> dict[str, dict[str, float]]:
        return {k: {"requests": n, "seconds": round(self.seconds[k], 3)} for k, n in sorted(self.counts.items())}

    def per_series(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith(PER_SERIES))


@contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Time every GET of the crawler's QidoClient (``QidoClient.fetch``, whichever way it sends),
    for the requests by URL shape (observation only: the same requests, the same answers)."""
    original = qido.QidoClient.fetch

    def fetch(self: qido.QidoClient, url: str) -> http.Answer:
        started = time.perf_counter()
        try:
            return original(self, url)
        finally:
            recorder.add(url, time.perf_counter() - started)

    qido.QidoClient.fetch = fetch  # type: ignore[method-assign]
    try:
        yield
    finally:
        qido.QidoClient.fetch = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------- the variants


@dataclass
class Measured:
    name: str
    wall: float
    cpu: float
    server_cpu: float
    other_cpu: float  # CPU used meanwhile by the host's other processes (contention)
    requests: dict[str, int]
    shapes: dict[str, dict[str, float]]
    per_series: int
    studies: dict[str, int]  # study UID -> instances found
    extra: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        return {
            "wall_seconds": round(self.wall, 3),
            "client_cpu_seconds": round(self.cpu, 3),
            "server_cpu_seconds": round(self.server_cpu, 3),
            "other_processes_cpu_seconds": round(self.other_cpu, 3),
            "requests": self.requests,
            "per_series_requests": self.per_series,
            "requests_by_shape": self.shapes,
            "studies_found": len(self.studies),
            "instances_found": sum(self.studies.values()),
            **self.extra,
        }


def measure(name: str, pid: int, body: Callable[[Recorder], tuple[dict[str, int], dict[str, Any]]]) -> Measured:
    recorder = Recorder()
    cpu0, server0, busy0, wall0 = time.process_time(), server_cpu(pid), busy_cpu(), time.perf_counter()
    studies, extra = body(recorder)
    wall = time.perf_counter() - wall0
    cpu, server, busy = time.process_time() - cpu0, server_cpu(pid) - server0, busy_cpu() - busy0
    other = max(0.0, busy - cpu - server)
    return Measured(name, wall, cpu, server, other, recorder.by_kind(), recorder.shapes(), recorder.per_series(), studies, extra)


def naive(url: str) -> Callable[[Recorder], tuple[dict[str, int], dict[str, Any]]]:
    from dicomweb_client import DICOMwebClient

    def run(recorder: Recorder) -> tuple[dict[str, int], dict[str, Any]]:
        session = recorder.attach(requests.Session())
        client = DICOMwebClient(url, session=session)
        found: dict[str, int] = {}
        for study in client.search_for_studies():
            study_uid = study[STUDY_UID]["Value"][0]
            found[study_uid] = 0
            for series in client.search_for_series(study_uid):
                series_uid = series[SERIES_UID]["Value"][0]
                found[study_uid] += len(client.search_for_instances(study_uid, series_uid))
        session.close()
        return found, {}

    return run


def ours(
    url: str, workdir: Path, mode: MetadataMode, workers: int, state: Path | None = None, full: bool = False
) -> Callable[[Recorder], tuple[dict[str, int], dict[str, Any]]]:
    def run(recorder: Recorder) -> tuple[dict[str, int], dict[str, Any]]:
        out = Path(tempfile.mkdtemp(prefix="out-", dir=workdir))
        config = SyncConfig(
            url=url,
            out=out,
            state=state or out / "state.db",
            workers=workers,
            crawl=CrawlOptions(metadata=mode),
            **({"full": True} if full else {}),
        )
        with recording(recorder), tuned_for_bulk():  # as the CLI runs it
            result = crawler_sync.sync(config)
        if not recorder.counts:
            log("  (requests not seen: crawler.sync no longer sends through QidoClient.fetch; using its own counts)")
            recorder.fallback = result.requests
        found: dict[str, int] = {}
        if result.run_dir:
            with open(Path(result.run_dir) / "ImagingStudy.ndjson", "rb") as handle:
                for line in handle:
                    resource = json.loads(line)
                    uid = next(i["value"] for i in resource["identifier"] if i.get("system") == "urn:dicom:uid")
                    found[uid.removeprefix("urn:oid:")] = sum(len(s.get("instance", ())) for s in resource.get("series", ()))
        summary = result.summary()
        extra = {
            "crawler_requests": result.requests,
            "crawler_seconds": round(result.seconds, 3),
            "exit_code": result.exit_code,
            "scope": summary.get("scope"),
            "state": str(config.state),
            **{k: summary[k] for k in ("studies_listed", "studies_new", "studies_changed", "studies_unchanged",
                                       "studies_failed", "studies_inconsistent", "resources_written")},
        }
        if result.errors:
            extra["errors"] = result.errors[:5]
        return found, extra

    return run


def best(runs: list[Measured]) -> Measured:
    return min(runs, key=lambda m: m.wall)


# --------------------------------------------------------------------------- checks and report


def check(results: dict[str, Measured], expected_studies: int, expected_instances: int) -> list[str]:
    problems = []
    reference = results["naive"].studies
    if len(reference) != expected_studies or sum(reference.values()) != expected_instances:
        problems.append(f"naive found {len(reference)} studies / {sum(reference.values())} instances, "
                        f"the corpus has {expected_studies} / {expected_instances}")
    for name in ("first-auto-w1", "first-auto", "first-never"):
        m = results[name]
        if m.extra.get("exit_code"):
            problems.append(f"{name}: exit code {m.extra['exit_code']}: {m.extra.get('errors')}")
        if set(m.studies) != set(reference):
            problems.append(f"{name}: {len(set(reference) - set(m.studies))} studies missing, "
                            f"{len(set(m.studies) - set(reference))} unexpected, compared with naive")
        differing = [uid for uid in reference if m.studies.get(uid) != reference[uid]]
        if differing:
            problems.append(f"{name}: {len(differing)} studies with another number of instances than naive "
                            f"(e.g. {differing[0]}: {m.studies.get(differing[0])} vs {reference[differing[0]]})")
    for name, steady in results.items():
        if not name.startswith("steady"):
            continue
        listed = steady.extra.get("studies_listed")
        unchanged = steady.extra.get("studies_unchanged")
        if (steady.extra.get("exit_code") or steady.extra.get("resources_written") or unchanged != listed
                or (name == "steady-full" and listed != expected_studies)):
            problems.append(f"{name}: expected every listed study unchanged ({expected_studies} with --full) and nothing "
                            f"written, got {listed} listed, {unchanged} unchanged, {steady.extra.get('resources_written')} "
                            f"written, exit code {steady.extra.get('exit_code')}")
    return problems


def targets(results: dict[str, Measured]) -> dict[str, dict[str, Any]]:
    naive_wall, first = results["naive"].wall, results["first-auto"]
    speedup = naive_wall / first.wall
    share = first.cpu / first.server_cpu if first.server_cpu else float("inf")
    return {
        "speedup": {
            "what": "naive wall / first sync wall",
            "value": round(speedup, 2),
            "target": f">= {TARGET_SPEEDUP}x (stretch {STRETCH_SPEEDUP}x)",
            "met": speedup >= TARGET_SPEEDUP,
            "stretch_met": speedup >= STRETCH_SPEEDUP,
        },
        "per_series_queries": {
            "what": "requests scoped to one series (+ /series listings) in the first sync",
            "value": first.per_series + first.requests.get("series", 0),
            "target": "0",
            "met": first.per_series + first.requests.get("series", 0) == 0,
        },
        "cpu_share": {
            "what": "first sync client CPU / server CPU",
            "value": round(share, 3),
            "target": f"<= {TARGET_CPU_SHARE:.0%}",
            "met": share <= TARGET_CPU_SHARE,
        },
    }


def table(results: dict[str, Measured], goals: dict[str, dict[str, Any]], header: str) -> str:
    naive_wall, naive_server = results["naive"].wall, results["naive"].server_cpu
    columns = ("variant", "wall s", "requests", "studies", "series", "instances", "metadata", "per-series",
               "client CPU s", "server CPU s", "others' CPU s", "naive/ours wall", "naive/ours server CPU", "client/server CPU")
    rows = []
    for m in results.values():
        r = m.requests
        rows.append((
            m.name, f"{m.wall:.2f}", str(r["total"]), str(r["studies"]), str(r["series"]), str(r["instances"]),
            str(r["metadata"]), str(m.per_series), f"{m.cpu:.2f}", f"{m.server_cpu:.2f}", f"{m.other_cpu:.2f}",
            "-" if m.name == "naive" else f"{naive_wall / m.wall:.2f}x",
            "-" if m.name == "naive" else (f"{naive_server / m.server_cpu:.2f}x" if m.server_cpu else "n/a"),
            f"{m.cpu / m.server_cpu:.1%}" if m.server_cpu else "n/a",
        ))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [header, "", line(columns), line(["-" * w for w in widths]), *map(line, rows), ""]
    others = sum(m.other_cpu for m in results.values())
    capacity = sum(m.wall for m in results.values()) * (os.cpu_count() or 1)
    if capacity and others / capacity > 0.05:
        out += [f"note: other processes on this host used {others:.0f} CPU s ({others / capacity:.0%} of its capacity) during the "
                "measured runs: wall times and wall ratios are inflated by contention; CPU seconds much less so.", ""]
    out.append("targets (first sync, --metadata auto):")
    for goal in goals.values():
        value = goal["value"]
        shown = f"{value:.2f}x" if goal is goals["speedup"] else (f"{value:.1%}" if goal is goals["cpu_share"] else str(value))
        verdict = "met" if goal["met"] else "MISSED"
        if goal.get("stretch_met"):
            verdict += " (stretch too)"
        out.append(f"  {goal['what']:<70} {shown:>8}   target {goal['target']:<22} {verdict}")
    return "\n".join(out)


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def run_figures(m: Measured) -> dict[str, float]:
    return {"wall_seconds": round(m.wall, 3), "client_cpu_seconds": round(m.cpu, 3), "server_cpu_seconds": round(m.server_cpu, 3),
            "client_server_cpu": round(m.cpu / m.server_cpu, 4) if m.server_cpu else None}


def gains(results: dict[str, Measured]) -> dict[str, float]:
    """The gain from the request strategy (both one thread) and from concurrency, apart."""
    naive_wall, one, many = results["naive"].wall, results["first-auto-w1"].wall, results["first-auto"].wall
    return {"strategy": round(naive_wall / one, 2), "concurrency": round(one / many, 2), "both": round(naive_wall / many, 2)}


def details(results: dict[str, Measured], runs: dict[str, list[Measured]], order: list[list[str]], load_before: list[float]) -> str:
    """The gains apart, first-auto's CPU per instance, and every run of every variant."""
    g = gains(results)
    first = results["first-auto"]
    instances = sum(first.studies.values()) or 1
    out = [f"gain from the request strategy (naive / first-auto-w1, both one thread): {g['strategy']:.2f}x",
           f"gain from concurrency (first-auto-w1 / first-auto):                     {g['concurrency']:.2f}x",
           f"both (naive / first-auto):                                              {g['both']:.2f}x",
           f"first-auto CPU per instance: client {first.cpu / instances * 1e6:.0f} us, Orthanc {first.server_cpu / instances * 1e6:.0f} us",
           "", "every run (wall s, client/server CPU):"]
    for name, measured in runs.items():
        cells = [f"{m.wall:.2f} s, {m.cpu / m.server_cpu:.1%}" if m.server_cpu else f"{m.wall:.2f} s, n/a" for m in measured]
        out.append(f"  {name:<14} " + "; ".join(cells))
    if len(order) > 1:
        out.append("order of the first crawls: " + " | ".join(" > ".join(o) for o in order))
    out.append(f"load average {' '.join(f'{x:.2f}' for x in load_before)} before, {' '.join(f'{x:.2f}' for x in _loadavg())} after")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--series", type=int, default=3, help="series per study")
    parser.add_argument("--instances", type=int, default=30, help="instances per series")
    parser.add_argument("--workers", type=int, default=4, help="qido-crawler --workers")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant; the best wall time is reported")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    if min(args.studies, args.series, args.instances, args.workers, args.repeat) < 1:
        parser.error("sizes, --workers and --repeat must be at least 1")

    started = time.monotonic()
    load_before = _loadavg()
    server, folder, load_seconds = prepare(args.studies, args.series, args.instances)
    workdir = Path(tempfile.mkdtemp(prefix="qido-crawler-bench-"))
    try:
        pid = server.process.pid
        url = server.dicomweb
        warm_up(server)
        runs: dict[str, list[Measured]] = defaultdict(list)
        firsts: list[tuple[str, str, Callable[[], Callable[[Recorder], tuple[dict[str, int], dict[str, Any]]]]]] = [
            ("naive", "naive crawl", lambda: naive(url)),
            ("first-auto-w1", "qido-crawler first sync, --metadata auto --workers 1",
             lambda: ours(url, workdir, MetadataMode.AUTO, 1)),
            ("first-auto", f"qido-crawler first sync, --metadata auto --workers {args.workers}",
             lambda: ours(url, workdir, MetadataMode.AUTO, args.workers)),
            ("first-never", f"qido-crawler first sync, --metadata never --workers {args.workers}",
             lambda: ours(url, workdir, MetadataMode.NEVER, args.workers)),
        ]
        order: list[list[str]] = []
        for attempt in range(args.repeat):
            tag = f" ({attempt + 1}/{args.repeat})" if args.repeat > 1 else ""
            sequence = firsts if attempt % 2 == 0 else firsts[::-1]
            order.append([name for name, _, _ in sequence])
            for name, what, body in sequence:
                log(f"{what}{tag} ...")
                runs[name].append(measure(name, pid, body()))
            state = Path(runs["first-auto"][-1].extra["state"])
            log(f"qido-crawler steady-state sync (incremental: since the last run's mark){tag} ...")
            runs["steady"].append(measure("steady", pid, ours(url, workdir, MetadataMode.AUTO, args.workers, state)))
            if HAS_FULL:
                log(f"qido-crawler steady-state sync --full{tag} ...")
                runs["steady-full"].append(measure("steady-full", pid, ours(url, workdir, MetadataMode.AUTO, args.workers, state, True)))
        names = ["naive", "first-auto-w1", "first-auto", "first-never", "steady", "steady-full"]
        results = {name: best(runs[name]) for name in names if name in runs}
        version = server.rest("GET", "/system").json()
        plugins = {"dicom-web": server.rest("GET", "/plugins/dicom-web").json().get("Version")}
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    expected_instances = args.studies * args.series * args.instances
    problems = check(results, args.studies, expected_instances)
    goals = targets(results)
    total_seconds = time.monotonic() - started
    if args.json:
        print(json.dumps({
            "corpus": {"studies": args.studies, "series_per_study": args.series, "instances_per_series": args.instances,
                       "instances": expected_instances},
            "cache": str(folder),
            "load_seconds": round(load_seconds, 1),
            "benchmark_seconds": round(total_seconds, 1),
            "server": {"orthanc": version.get("Version"), "plugins": plugins, "cpus": os.cpu_count()},
            "python": platform.python_version(),
            "workers": args.workers,
            "repeat": args.repeat,
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
            "order": order,
            "variants": {name: m.figures() for name, m in results.items()},
            "runs": {name: [run_figures(m) for m in measured] for name, measured in runs.items()},
            "gains": gains(results),
            "targets": goals,
            "checks": problems or "ok",
        }, indent=2))
    else:
        header = (f"qido-crawler crawl benchmark: {args.studies} studies x {args.series} series x {args.instances} instances "
                  f"= {expected_instances} instances; Orthanc {version.get('Version')}, DICOMweb {plugins.get('dicom-web')}; "
                  f"{os.cpu_count()} CPUs; --workers {args.workers}; best of {args.repeat}; "
                  f"load average {' '.join(f'{x:.2f}' for x in load_before)} before")
        print(table(results, goals, header))
        print()
        print(details(results, runs, order, load_before))
        print(f"\ncache: {folder}" + (f" (loaded in {load_seconds:.0f} s)" if load_seconds else ""))
        print(f"checks: {'ok (same studies and instances per study in naive and ours; steady-state wrote nothing)' if not problems else 'FAILED'}")
        print(f"benchmark took {total_seconds:.0f} s")
    for problem in problems:
        log(f"CHECK FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
