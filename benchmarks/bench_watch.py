"""Watch benchmark on a live Orthanc: how soon an uploaded study is out, and what an idle watch costs.

    python benchmarks/bench_watch.py [--studies 20] [--spread 60] [--idle 60] [--interval 2]
                                     [--stable-after 5] [--roll-every 1] [--roll-studies 1]
                                     [--seed 16] [--repeat 1] [--quick] [--json]

What it does, per repeat:

1. **Server and sink.** A fresh Orthanc (own storage in a temporary folder; ``StableAge`` set to
   ``--stable-after``, rounded up to whole seconds, as the README asks) holding ``--preload``
   studies, and the FHIR simulator (``fixtures/fakefhir.py``) in this process, which stamps the
   moment it applies each transaction holding an ImagingStudy (``time.monotonic()`` of this
   process: the same clock as the uploads').
2. **The watch** as users run it, the CLI in a child process::

       python -m crawler watch ORTHANC/dicom-web --changes orthanc --interval 2 --stable-after 5
           --roll-every 1 --roll-studies 1 --out TMP/out --fhir-url SIMULATOR --state TMP/state.db
           --metrics-port PORT --timezone UTC --json

   It lists the preloaded studies first (waited for, not measured). ``--roll-studies 1``: a run
   folder is finished (manifest written) right after each poll that wrote something, so a
   finished folder is what is measured and the figure is what a user who wants seconds gets;
   ``--roll-every 1`` finishes, at the next poll, a run that holds only studies crawled again
   unchanged (Orthanc's ``StableStudy`` change names a study a second time).
3. **Uploads.** ``--studies`` studies (``benchmarks/corpus.py``: 2 series x 3 tiny CT instances
   each) POSTed to Orthanc at moments drawn from ``--seed`` over ``--spread`` seconds, about
   one in three together with the one before (back to back). A study is *stored* when the POST
   of its last instance has returned.
4. **Latency** of each study from stored to (a) first sight of its ImagingStudy in a finished
   run folder (``manifest.json`` present; the output folder is scanned every 50 ms in a thread)
   and (b) its arrival at the FHIR simulator. p50/p95 (``statistics.quantiles``, inclusive
   method) and max, against the target p95 < 10 s, next to the floor ``--stable-after`` +
   ``--interval``: a study is crawled at the first poll that finds its changes ``stable-after``
   old, so it waits between stable-after and stable-after + interval (less up to a second:
   Orthanc dates its changes to the second), then the crawl and the checkpoint.
5. **Idle cost.** Once the watch has processed Orthanc's whole change log (its cursor, from
   ``/metrics``, at Orthanc's ``/changes?last``) and nothing has changed for ``--stable-after`` +
   2 intervals, ``--idle`` seconds with nothing changing: the watch process's CPU (utime + stime
   from ``/proc/<pid>/stat``) in % of one core, and its requests to Orthanc (the
   ``qido_crawler_watch_requests_total`` counter of its metrics, read before and after) per
   interval. Targets: under 1% of a core, at most one request per interval (one source).
6. **Stop**: SIGTERM, which must end the watch with exit 0 within 10 s.

**Checks** (a failed one makes the exit status 1; a missed target does not): every uploaded study
reaches a finished run folder and the simulator, the watch exits 0 on SIGTERM, and the idle
window crawls nothing.

``--quick``: 5 studies over 10 s, 10 s idle, 2 preloaded (the smoke test in
``tests/test_bench_watch.py`` runs it with shorter intervals, so that this script cannot rot).
``--repeat N`` runs the whole measurement N times (a fresh Orthanc and watch each, seeds
``--seed`` + i) and reports each run and the latencies of all runs together. ``--json`` prints
one JSON object instead of the tables (with each study's latencies).

Run from the repository root with the package installed with the watch extra (``pip install -e
'.[test,watch]'``); it needs Orthanc with its DICOMweb plugin (``fixtures/orthanc.py``). The
default run takes about two and a half minutes. The machine's load is printed with the figures:
latencies and CPU shares taken under load are on the pessimistic side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.corpus import iter_files
from fixtures import orthanc
from fixtures.fakefhir import FakeFhir

TARGET_P95, TARGET_CPU, TARGET_REQUESTS = 10.0, 1.0, 1.0
SCAN_EVERY = 0.05
SERIES, INSTANCES = 2, 3
TOGETHER = 1 / 3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def process_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def study_uid_of(resource: dict[str, Any]) -> str | None:
    for identifier in resource.get("identifier") or ():
        value = identifier.get("value") if isinstance(identifier, dict) else None
        if isinstance(value, str) and value.startswith("urn:oid:"):
            return value.removeprefix("urn:oid:")
    return None


class TimedFhir(FakeFhir):
    """The FHIR simulator, stamping when it first applied an ImagingStudy of each study."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.received: dict[str, float] = {}

    def _route(self, method: str, parts: list[str], body: Any) -> Any:
        answer = super()._route(method, parts, body)
        now = time.monotonic()
        if answer[0] < 300 and isinstance(body, dict):
            resources = [e.get("resource") for e in body.get("entry") or () if isinstance(e, dict)] if not parts else [body]
            for resource in resources:
                if isinstance(resource, dict) and resource.get("resourceType") == "ImagingStudy":
                    uid = study_uid_of(resource)
                    if uid is not None:
                        self.received.setdefault(uid, now)
        return answer


class FolderWatch:
    """Scans the output folder every ``SCAN_EVERY`` seconds in a thread: the moment each study's
    ImagingStudy was first seen in a finished run folder (one with its manifest)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: dict[str, float] = {}
        self.folders: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="scan", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(SCAN_EVERY):
            self.scan()

    def scan(self) -> None:
        if not self.out.is_dir():
            return
        for folder in self.out.iterdir():
            if folder.name in self.folders or not (folder / "manifest.json").is_file():
                continue
            now = time.monotonic()
            self.folders.add(folder.name)
            studies = folder / "ImagingStudy.ndjson"
            if studies.is_file():
                for line in studies.read_bytes().splitlines():
                    uid = study_uid_of(json.loads(line))
                    if uid is not None:
                        self.seen.setdefault(uid, now)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``, from Prometheus text."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            sample, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                return float(value)
    return None


def requests_by_kind(text: str) -> dict[str, float]:
    """The watch's ``requests_total`` samples by kind (the metrics have no total of their own)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("qido_crawler_watch_requests_total{") and 'kind="' in line:
            found[line.split('kind="', 1)[1].split('"', 1)[0]] = float(line.rpartition(" ")[2])
    return found


def until(what: Any, timeout: float, why: str, every: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {why}")
        time.sleep(every)


def corpus_studies(count: int, first: int = 0) -> list[tuple[str, list[bytes]]]:
    """``count`` studies of the benchmark corpus from number ``first`` on: (Study Instance UID, files)."""
    from benchmarks.corpus import uid

    files: dict[int, list[bytes]] = defaultdict(list)
    for name, body in iter_files(first + count, SERIES, INSTANCES):
        number = int(name.split("/", 1)[0])
        if number >= first:
            files[number].append(body)
    return [(uid("study", n), files[n]) for n in sorted(files)]


def schedule(count: int, spread: float, rng: random.Random) -> list[float]:
    """Upload moments (seconds from the start), sorted; about ``TOGETHER`` of them the same as
    the one before (studies uploaded back to back)."""
    moments = sorted(rng.uniform(0, spread) for _ in range(count))
    for i in range(1, count):
        if rng.random() < TOGETHER:
            moments[i] = moments[i - 1]
    return moments


@dataclass
class Run:
    """One repeat's figures."""

    seed: int
    stored: dict[str, float] = field(default_factory=dict)
    folder: dict[str, float] = field(default_factory=dict)
    """Study UID -> seconds from stored to first seen in a finished run folder."""
    fhir: dict[str, float] = field(default_factory=dict)
    """Study UID -> seconds from stored to arrival at the FHIR simulator."""
    together: int = 0
    idle_seconds: float = 0.0
    idle_cpu_seconds: float = 0.0
    idle_requests: float = 0.0
    idle_polls: float = 0.0
    idle_fhir_requests: int = 0
    idle_folders: int = 0
    exit_code: int | None = None
    stop_seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    idle_by_kind: dict[str, float] = field(default_factory=dict)
    """The idle window's requests by kind."""
    problems: list[str] = field(default_factory=list)


def measure(args: argparse.Namespace, seed: int, workdir: Path) -> Run:
    run = Run(seed=seed)
    rng = random.Random(seed)
    preload = corpus_studies(args.preload, first=0)
    uploads = corpus_studies(args.studies, first=args.preload + (seed - args.seed) * args.studies)   # new UIDs in every repeat
    stable_age = max(1, math.ceil(args.stable_after))
    server = orthanc.start(workdir / "orthanc", config={"StableAge": stable_age})
    session = requests.Session()
    process: subprocess.Popen | None = None
    scanner: FolderWatch | None = None
    fhir = TimedFhir(version="5.0.0").start()
    try:
        for _, files in preload:
            for body in files:
                session.post(f"{server.url}/instances", data=body, timeout=60).raise_for_status()
        port = orthanc.free_port()
        out = workdir / "out"
        command = [sys.executable, "-m", "crawler", "watch", server.dicomweb, "--changes", "orthanc",
                   "--interval", f"{args.interval:g}", "--stable-after", f"{args.stable_after:g}",
                   "--roll-every", f"{args.roll_every:g}", *(["--roll-studies", str(args.roll_studies)] if args.roll_studies else []),
                   "--out", str(out), "--fhir-url", fhir.url, "--state", str(workdir / "state.db"),
                   "--metrics-port", str(port), "--timezone", "UTC", "--json"]
        with open(workdir / "watch.log", "w") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True, cwd=workdir)
        scanner = FolderWatch(out)
        metrics_url = f"http://127.0.0.1:{port}/metrics"

        def scrape() -> str:
            return requests.get(metrics_url, timeout=10).text

        def alive() -> None:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the watch exited with {process.returncode}: {(workdir / 'watch.log').read_text()[-2000:]}")

        def everything(uids: list[str]) -> bool:
            alive()
            return all(u in scanner.seen and u in fhir.received for u in uids)

        log(f"  watch started (pid {process.pid}); waiting for its first listing of {len(preload)} studies")
        until(lambda: everything([u for u, _ in preload]), 120, "the first listing")

        moments = schedule(len(uploads), args.spread, rng)
        run.together = sum(1 for a, b in itertools.pairwise(moments) if a == b)
        log(f"  uploading {len(uploads)} studies over {args.spread:g} s ({run.together} together with the one before)")
        start = time.monotonic()
        for moment, (study, files) in zip(moments, uploads):
            delay = start + moment - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for body in files:
                session.post(f"{server.url}/instances", data=body, timeout=60).raise_for_status()
            run.stored[study] = time.monotonic()
        uids = list(run.stored)
        try:
            until(lambda: everything(uids), args.stable_after + args.interval + 120, "every uploaded study")
        except TimeoutError as exc:
            run.problems.append(f"{exc}: {sum(u not in scanner.seen for u in uids)} not in a finished run folder, "
                                f"{sum(u not in fhir.received for u in uids)} not at the FHIR simulator")
        for u in uids:
            if u in scanner.seen:
                run.folder[u] = scanner.seen[u] - run.stored[u]
            if u in fhir.received:
                run.fhir[u] = fhir.received[u] - run.stored[u]

        log("  waiting until the watch has read Orthanc's whole change log and nothing changes")
        quiet = args.stable_after + 2 * args.interval
        end = time.monotonic() + quiet + 180
        while True:
            alive()
            # Orthanc logs StableStudy StableAge seconds after a study's last instance (later on a
            # busy machine): until every study is stable, a change is still to come
            stable = all(server.rest("GET", f"/studies/{study}").json().get("IsStable") for study in server.rest("GET", "/studies").json())
            last = server.rest("GET", "/changes?last").json()["Last"]
            cursor = metric(scrape(), "qido_crawler_watch_cursor")
            if stable and cursor == last:
                time.sleep(quiet)
                if server.rest("GET", "/changes?last").json()["Last"] == last and metric(scrape(), "qido_crawler_watch_cursor") == last:
                    break
            if time.monotonic() > end:
                raise TimeoutError("the watch's cursor did not reach Orthanc's last change")
            time.sleep(args.interval)

        log(f"  idle for {args.idle:g} s")
        folders, fhir_requests = len(scanner.folders), len(fhir.requests)
        before_text, cpu_before, started = scrape(), process_cpu(process.pid), time.monotonic()
        time.sleep(args.idle)
        after_text, cpu_after, ended = scrape(), process_cpu(process.pid), time.monotonic()
        scanner.scan()
        run.idle_seconds = ended - started
        run.idle_cpu_seconds = cpu_after - cpu_before

        def delta(text_name: str, **labels: str) -> float:
            return (metric(after_text, text_name, **labels) or 0.0) - (metric(before_text, text_name, **labels) or 0.0)

        run.idle_requests = sum(requests_by_kind(after_text).values()) - sum(requests_by_kind(before_text).values())
        run.idle_polls = delta("qido_crawler_watch_polls_total")
        run.idle_fhir_requests = len(fhir.requests) - fhir_requests
        run.idle_folders = len(scanner.folders) - folders
        synced = delta("qido_crawler_watch_studies_total", outcome="synced")
        if synced or run.idle_folders:
            run.problems.append(f"the idle window was not idle: {synced:g} studies synced, {run.idle_folders} run folders finished")
        run.idle_by_kind = {kind: count - requests_by_kind(before_text).get(kind, 0.0)
                                for kind, count in requests_by_kind(after_text).items()}

        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            stdout, _ = process.communicate(timeout=10)
            run.exit_code = process.returncode
        except subprocess.TimeoutExpired:
            run.problems.append("the watch did not stop within 10 s of SIGTERM")
            process.kill()
            stdout, _ = process.communicate()
        run.stop_seconds = time.monotonic() - asked
        if run.exit_code != 0:
            run.problems.append(f"the watch exited with {run.exit_code} on SIGTERM: {(workdir / 'watch.log').read_text()[-1000:]}")
        try:
            run.summary = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
        except ValueError:
            run.problems.append("the watch's --json summary is not JSON")
    finally:
        if scanner is not None:
            scanner.close()
        if process is not None and process.poll() is None:
            process.kill()
            process.communicate()
        fhir.stop()
        session.close()
        server.stop()
    return run


# --------------------------------------------------------------------------- report


def quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    if len(values) == 1:
        return {"p50": values[0], "p95": values[0], "max": values[0], "min": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "max": max(values), "min": min(values)}


def figures(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    folder = [v for r in runs for v in r.folder.values()]
    fhir = [v for r in runs for v in r.fhir.values()]
    idle = sum(r.idle_seconds for r in runs)
    cpu_share = 100 * sum(r.idle_cpu_seconds for r in runs) / idle if idle else None
    intervals = idle / args.interval if idle else 0
    per_interval = sum(r.idle_requests for r in runs) / intervals if intervals else None
    p_folder, p_fhir = quantiles(folder), quantiles(fhir)
    return {
        "latency": {
            "finished_run_folder": {"studies": len(folder), **(p_folder or {})},
            "fhir_simulator": {"studies": len(fhir), **(p_fhir or {})},
            "floor_seconds": args.stable_after + args.interval,
        },
        "idle": {
            "seconds": round(idle, 1),
            "cpu_percent_of_a_core": cpu_share,
            "requests": sum(r.idle_requests for r in runs),
            "polls": sum(r.idle_polls for r in runs),
            "requests_per_interval": per_interval,
            "fhir_requests": sum(r.idle_fhir_requests for r in runs),
        },
        "targets": {
            "p95_finished_run_folder": {"target": f"< {TARGET_P95:g} s", "met": p_folder is not None and p_folder["p95"] < TARGET_P95},
            "p95_fhir": {"target": f"< {TARGET_P95:g} s", "met": p_fhir is not None and p_fhir["p95"] < TARGET_P95},
            "idle_cpu": {"target": f"< {TARGET_CPU:g}% of a core", "met": cpu_share is not None and cpu_share < TARGET_CPU},
            "idle_requests": {"target": f"<= {TARGET_REQUESTS:g} per interval", "met": per_interval is not None and per_interval <= TARGET_REQUESTS},
        },
    }


def table(runs: list[Run], found: dict[str, Any], header: str, args: argparse.Namespace) -> str:
    columns = ("latency from stored to", "studies", "p50 s", "p95 s", "max s", "min s", "target p95", "")
    rows = []
    goals = found["targets"]
    for name, key, goal in (("ImagingStudy in a finished run folder", "finished_run_folder", "p95_finished_run_folder"),
                            ("ImagingStudy at the FHIR simulator", "fhir_simulator", "p95_fhir")):
        f = found["latency"][key]
        cells = [f"{f[k]:.2f}" if k in f else "-" for k in ("p50", "p95", "max", "min")]
        rows.append((name, str(f["studies"]), *cells, f"< {TARGET_P95:g} s", "met" if goals[goal]["met"] else "MISSED"))
    floor = args.stable_after + args.interval
    rows.append(("floor: --stable-after + --interval", "", "", f"{floor:.2f}", "", "", "", ""))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def line(cells: tuple[str, ...] | list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [header, "", line(columns), line(["-" * w for w in widths]), *map(line, rows), ""]
    idle = found["idle"]
    cpu = idle["cpu_percent_of_a_core"]
    per = idle["requests_per_interval"]
    out += [
        f"idle, {idle['seconds']:g} s with nothing changing ({len(runs)} x --idle {args.idle:g} s):",
        f"  watch process CPU                     {cpu:.2f}% of one core   target < {TARGET_CPU:g}%   "
        + ("met" if goals["idle_cpu"]["met"] else "MISSED"),
        f"  requests to Orthanc per interval      {per:.2f} ({idle['requests']:g} requests, {idle['polls']:g} polls, "
        f"{idle['seconds'] / args.interval:.1f} intervals of {args.interval:g} s)   target <= {TARGET_REQUESTS:g}   "
        + ("met" if goals["idle_requests"]["met"] else "MISSED"),
        f"  requests to the FHIR simulator        {idle['fhir_requests']}",
    ]
    if len(runs) > 1:
        out.append("")
        out.append("every run (finished run folder p50 / p95 / max s; FHIR p95 s; idle CPU %; requests per interval):")
        for r in runs:
            q, qf = quantiles(list(r.folder.values())), quantiles(list(r.fhir.values()))
            share = 100 * r.idle_cpu_seconds / r.idle_seconds if r.idle_seconds else float("nan")
            out.append(f"  seed {r.seed}: " + (f"{q['p50']:.2f} / {q['p95']:.2f} / {q['max']:.2f}" if q else "-")
                       + (f"; {qf['p95']:.2f}" if qf else "; -") + f"; {share:.2f}%; {r.idle_requests / (r.idle_seconds / args.interval):.2f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, help="studies uploaded while watched (default 20; --quick 5)")
    parser.add_argument("--spread", type=float, help="seconds over which they are uploaded (default 60; --quick 10)")
    parser.add_argument("--idle", type=float, help="seconds of the idle measurement (default 60; --quick 10)")
    parser.add_argument("--preload", type=int, help="studies on Orthanc before the watch starts (default 5; --quick 2)")
    parser.add_argument("--interval", type=float, default=2.0, help="the watch's --interval (default %(default)g)")
    parser.add_argument("--stable-after", type=float, default=5.0, help="the watch's --stable-after, and Orthanc's StableAge (default %(default)g)")
    parser.add_argument("--roll-every", type=float, default=1.0, help="the watch's --roll-every (default %(default)g)")
    parser.add_argument("--roll-studies", type=int, default=1, help="the watch's --roll-studies; 0: not given (default %(default)s)")
    parser.add_argument("--seed", type=int, default=16, help="seed of the upload moments (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="whole measurements, each on a fresh Orthanc and watch (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 studies over 10 s, 10 s idle")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    defaults = {"studies": (20, 5), "spread": (60.0, 10.0), "idle": (60.0, 10.0), "preload": (5, 2)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.studies, args.repeat, args.preload) < 1 or args.spread < 0 or args.idle <= 0 or args.interval <= 0 or args.stable_after < 0:
        parser.error("--studies, --preload and --repeat must be at least 1, --idle and --interval above 0")

    started = time.monotonic()
    load_before = loadavg()
    runs: list[Run] = []
    for attempt in range(args.repeat):
        workdir = Path(tempfile.mkdtemp(prefix="qido-crawler-bench-watch-"))
        try:
            log(f"run {attempt + 1}/{args.repeat} (seed {args.seed + attempt}) in {workdir}")
            runs.append(measure(args, args.seed + attempt, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = loadavg()
    found = figures(runs, args)
    problems = [p for r in runs for p in r.problems]
    roll = f"--roll-every {args.roll_every:g}" + (f" --roll-studies {args.roll_studies}" if args.roll_studies else "")
    if args.json:
        print(json.dumps({
            "settings": {"studies": args.studies, "spread_seconds": args.spread, "idle_seconds": args.idle, "preload": args.preload,
                         "interval": args.interval, "stable_after": args.stable_after, "roll_every": args.roll_every,
                         "roll_studies": args.roll_studies or None, "seed": args.seed, "repeat": args.repeat,
                         "series_per_study": SERIES, "instances_per_series": INSTANCES},
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "loadavg_before": load_before, "loadavg_after": load_after,
            **found,
            "runs": [{"seed": r.seed, "together": r.together, "finished_run_folder": r.folder, "fhir_simulator": r.fhir,
                      "idle_cpu_seconds": r.idle_cpu_seconds, "idle_seconds": r.idle_seconds, "idle_requests": r.idle_requests,
                      "idle_polls": r.idle_polls, "idle_requests_by_kind": r.idle_by_kind, "exit_code": r.exit_code,
                      "stop_seconds": round(r.stop_seconds, 2), "summary": r.summary} for r in runs],
            "benchmark_seconds": round(time.monotonic() - started, 1),
            "checks": problems or "ok",
        }, indent=2))
    else:
        together = sum(r.together for r in runs)
        header = (f"qido-crawler watch benchmark: {args.studies} studies ({SERIES} series x {INSTANCES} instances) uploaded at random "
                  f"moments over {args.spread:g} s (seed {args.seed}, {together} back to back with the one before), "
                  f"x {args.repeat}; watch --changes orthanc --interval {args.interval:g} --stable-after {args.stable_after:g} {roll}, "
                  f"--out and --fhir-url (the FHIR simulator), Orthanc StableAge {max(1, math.ceil(args.stable_after))}; "
                  f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.2f}' for x in load_before)} before, "
                  f"{' '.join(f'{x:.2f}' for x in load_after)} after")
        print(table(runs, found, header, args))
        stops = ", ".join(f"{r.stop_seconds:.1f} s (exit {r.exit_code})" for r in runs)
        print(f"\nSIGTERM -> stopped in {stops}")
        print(f"checks: {'ok (every study in a finished run folder and at the FHIR simulator; idle window idle; exit 0)' if not problems else 'FAILED'}")
        print(f"benchmark took {time.monotonic() - started:.0f} s")
    for problem in problems:
        log(f"CHECK FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
