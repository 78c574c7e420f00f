"""Scale benchmark: the crawler against a simulated PACS of 10,000 to 1,000,000 studies.

    python benchmarks/bench_scale.py [--sizes 10000,100000] [--latency 0] [--workers 8] [--json]

Run from the repository root with the package installed (``pip install -e .``); it needs
nothing beyond the project's dependencies and the standard library (Linux: it reads ``/proc``).

What it does:

1. **Simulated PACS.** For each size, ``benchmarks/simulator.py`` (``fixtures.fakepacs.FakePacs``
   in its own process, see there) serves that many studies generated on demand from ``--seed``
   (1-4 series of 1-5 instances each; nothing stored), with ``--latency`` seconds per request
   and, optionally, a result cap (``--max-results``/``--cap-mode``) and a page cap
   (``--max-limit``).
2. **First sync** on a fresh state, as a child process::

       python -m crawler sync URL --state TMP/state.db --out TMP/out --metadata never --json -q --workers N

   ``--metadata never``: the simulator's QIDO answers are complete, so a study costs exactly one
   ``/studies/{uid}/instances`` request besides its share of the listing.
3. **Steady-state sync**: the same command with ``--full`` on that state; nothing changed, so it
   must send only listing requests and write nothing.
4. For each sync: wall time of the child process, its requests (from ``--json``; the
   simulator's own count is shown next to it), the crawler's **peak RSS** (``VmHWM`` read by the
   child itself at exit, see ``CHILD``; RSS is also sampled every 50 ms from ``/proc`` to show
   whether it climbs during the run), its CPU time (user + system, all threads) and the
   simulator's. Its RSS right after importing the crawler (``base``) is shown too.
5. **Checks** (a failed check makes the exit status 1): the first sync finds every study exactly
   once (the state holds exactly the simulator's study UIDs: count and an order-independent
   checksum of the UIDs, computed by streaming on both sides; ``ImagingStudy.ndjson`` has one line
   per study), the steady-state sync finds them all unchanged, writes nothing and sends listing
   requests only.
6. **Throughput**: a simulator with ``--tp-latency`` (0.02 s) per request, a first sync with
   ``--workers`` 1, 2, 4, 8, 16, 32 (``--tp-workers``) on ``max(400, min(--tp-studies,
   250 x workers))`` studies. Requests per second against the ideal ``workers / latency``:
   overall (all requests over the sync's own ``seconds``: the listing is sequential and the
   first window's silent-cap check lists it twice) and for the study-crawl phase (instance
   requests between the first and the last one, timed by the simulator). Crawler CPU in % of
   one core, and the CPU the ideal rate would need (ideal requests/s x CPU seconds per study):
   a Python process does its work on one core at a time (the GIL), so when either reaches 80%
   of a core the crawler's CPU is saturated (threads then queue for the interpreter, and answers
   wait for them); the report says where that happens and the rate one core allows (1 / CPU
   seconds per study).
7. **Targets** (from the issue) next to the figures: peak RSS at 1,000,000 studies <= 150 MB
   and within 20% of the 10,000-study figure; steady state: listing requests only; throughput
   at least 80% of ``workers / latency`` up to the point where the crawler's CPU saturates.

A first sync costs about one request per study: 1,000,000 studies take over an hour on a
2-core machine, so the default sizes are 10,000 and 100,000; add 1000000 to ``--sizes`` for
the full run (``--skip-throughput`` to run only the scale part). The steady-state sync of
1,000,000 studies is about 10,000 listing requests.

``--json`` prints one JSON object (environment, sizes, throughput, targets) on stdout instead of
the tables. ``--tmp DIR`` puts the states and outputs there (a 1,000,000-study first sync
writes about 4.5 GB of NDJSON and a 2 GB state); they are removed after each size unless
``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.simulator import simulator  # noqa: E402

# The crawler runs in a child process under this wrapper, which reports its own peak RSS
# (VmHWM: exact, and not mixed up with other children as RUSAGE_CHILDREN's maximum would be),
# its CPU time, and its RSS/CPU after importing the crawler, into the file named by argv[1].
CHILD = r"""
import json, resource, runpy, sys
def status():
    out = {}
    with open('/proc/self/status') as f:
        for line in f:
            key, _, value = line.partition(':')
            if key in ('VmHWM', 'VmRSS'):
                out[key] = int(value.split()[0])
    return out
def cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
stats_path = sys.argv[1]
sys.argv = ['qido-crawler', *sys.argv[2:]]
import crawler.cli
base = {'base_rss_kb': status()['VmRSS'], 'base_cpu': cpu()}
code = 0
try:
    runpy.run_module('crawler', run_name='__main__', alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    with open(stats_path, 'w') as f:
        json.dump({**base, **status(), 'maxrss_kb': ru.ru_maxrss, 'utime': ru.ru_utime, 'stime': ru.ru_stime}, f)
sys.exit(code)
"""

MB = 1024.0
RSS_TARGET_MB = 150.0
RSS_RATIO_TARGET = 1.20
THROUGHPUT_TARGET = 0.80
SATURATED_CPU = 0.80   # of one core: saturated (see _saturation)
PLATEAU = 1.15         # a larger worker count that adds less than 15% to the rate: saturated


# --- running the crawler ----------------------------------------------------------------------


def _vmrss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _RssSampler(threading.Thread):
    """Samples a process's VmRSS every ``interval`` seconds; keeps one sample per second (the
    largest) so that an hour-long run stays small."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stopping.wait(self.interval):
            kb = _vmrss_kb(self.pid)
            if kb is None:
                continue
            t = time.monotonic() - start
            if self.samples and int(self.samples[-1][0]) == int(t):
                if kb > self.samples[-1][1]:
                    self.samples[-1] = (self.samples[-1][0], kb)
            else:
                self.samples.append((t, kb))

    def at(self, fraction: float) -> float | None:
        """RSS (MB) of the sample at ``fraction`` of the run."""
        if not self.samples:
            return None
        t = self.samples[-1][0] * fraction
        best = min(self.samples, key=lambda s: abs(s[0] - t))
        return round(best[1] / MB, 1)


def run_sync(url: str, workdir: Path, *extra: str, workers: int = 8, python: str = sys.executable,
             sample: bool = True) -> dict[str, Any]:
    """One ``qido-crawler sync`` in a child process on ``workdir/state.db`` (output in ``workdir/out``).

    Returns the ``--json`` summary (``summary``), ``exit`` status, ``wall`` seconds,
    ``peak_rss_mb`` (VmHWM), ``base_rss_mb`` (after importing the crawler), ``cpu`` seconds
    (user + system, all threads) and ``run_cpu`` (without the imports), ``rss_at`` (sampled RSS
    at 10/50/90/100% of the run) and the tail of stderr.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stats = workdir / f"child-{time.monotonic_ns()}.json"
    cmd = [python, "-c", CHILD, str(stats), "sync", url, "--state", str(workdir / "state.db"), "--out", str(workdir / "out"),
           "--metadata", "never", "--json", "-q", "--workers", str(workers), *extra]
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir)
    sampler = _RssSampler(process.pid)
    if sample:
        sampler.start()
    # stderr is drained in a thread: a chatty crawler must not block on a full pipe
    err_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: err_chunks.append(process.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    out = process.stdout.read()  # type: ignore[union-attr]
    code = process.wait()
    wall = time.perf_counter() - started
    reader.join()
    sampler.stopping.set()
    if sample:
        sampler.join()
    stderr = b"".join(err_chunks).decode(errors="replace")
    try:
        child = json.loads(stats.read_text())
        stats.unlink()
    except (OSError, ValueError):
        raise RuntimeError(f"the crawler child left no figures (exit {code}): {stderr[-2000:]}") from None
    try:
        summary = json.loads(out)
    except ValueError:
        summary = {}
    cpu = child["utime"] + child["stime"]
    return {
        "exit": code,
        "summary": summary,
        "wall": round(wall, 3),
        "peak_rss_mb": round(child.get("VmHWM", child["maxrss_kb"]) / MB, 1),
        "base_rss_mb": round(child["base_rss_kb"] / MB, 1),
        "cpu": round(cpu, 3),
        "run_cpu": round(cpu - child["base_cpu"], 3),
        "rss_at": {f"{int(f * 100)}%": sampler.at(f) for f in (0.1, 0.5, 0.9, 1.0)} if sample else {},
        "stderr": stderr[-2000:],
    }


# --- ground truth -------------------------------------------------------------------------------


def _uid_hash(uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big")


def truth_digest(n_studies: int, seed: int) -> tuple[int, int]:
    """(count, sum of UID hashes mod 2**64) of the simulator's studies, streamed."""
    from fixtures.fakepacs import FakePacs

    count = total = 0
    for uid in FakePacs(n_studies, seed).study_uids():
        count += 1
        total = (total + _uid_hash(uid)) & 0xFFFFFFFFFFFFFFFF
    return count, total


def state_digest(state: Path) -> tuple[int, int, dict[str, int]]:
    """(count, sum of UID hashes mod 2**64, studies by status) of a state, streamed."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    try:
        count = total = 0
        statuses: dict[str, int] = {}
        for uid, status in db.execute("SELECT study_uid, status FROM studies"):
            count += 1
            total = (total + _uid_hash(uid)) & 0xFFFFFFFFFFFFFFFF
            statuses[status] = statuses.get(status, 0) + 1
        return count, total, statuses
    finally:
        db.close()


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


# --- the scale part ---------------------------------------------------------------------------


def _requests(result: dict[str, Any]) -> dict[str, int]:
    return dict(result["summary"].get("requests", {}))


def scale_case(n: int, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"scale-{n}-", dir=base))
    case: dict[str, Any] = {"studies": n, "dir": str(workdir)}
    checks: list[str] = []
    try:
        options = {"max_results": args.max_results, "cap_mode": args.cap_mode, "max_limit": args.max_limit}
        with simulator(n, args.seed, args.latency, **{k: v for k, v in options.items() if v is not None}) as sim:
            for phase, extra in (("first", ()), ("steady", ("--full",))):
                _progress(f"{n:,} studies: {phase} sync ...")
                sim.reset()
                cpu0 = sim.cpu_seconds()
                result = run_sync(sim.url, workdir, *extra, workers=args.workers)
                sim_counts = sim.counts()
                result["simulator"] = {"requests": sim_counts["requests"], "cpu": round(sim.cpu_seconds() - cpu0, 3),
                                       "rss_mb": sim_counts["rss_mb"]}
                case[phase] = result
                s, req = result["summary"], _requests(result)
                _progress(f"  {result['wall']:.1f} s, {req.get('total', 0):,} requests, peak RSS {result['peak_rss_mb']} MB, CPU {result['cpu']:.1f} s")
                if result["exit"] != 0:
                    checks.append(f"{phase}: exit status {result['exit']}: {result['stderr'][-500:]}")
                if phase == "first":
                    if s.get("studies_listed") != n or s.get("studies_new") != n:
                        checks.append(f"first: listed {s.get('studies_listed')}, new {s.get('studies_new')}, expected {n}")
                    if not args.no_verify:
                        truth = truth_digest(n, args.seed)
                        count, total, statuses = state_digest(workdir / "state.db")
                        if (count, total) != truth or statuses != {"synced": n}:
                            checks.append(f"first: the state holds {count} studies {statuses}, not the simulator's {n}")
                        run_dir = s.get("run_dir")
                        lines = count_lines(Path(run_dir) / "ImagingStudy.ndjson") if run_dir else 0
                        if lines != n:
                            checks.append(f"first: ImagingStudy.ndjson has {lines} lines, expected {n}")
                        case["verified"] = {"state_studies": count, "checksum_equal": (count, total) == truth, "ndjson_lines": lines}
                else:
                    if s.get("studies_unchanged") != n or s.get("resources_written") != 0 or s.get("run_dir"):
                        checks.append(f"steady: unchanged {s.get('studies_unchanged')} of {n}, wrote {s.get('resources_written')}")
                    other = {k: v for k, v in req.items() if k not in ("total", "studies", "retries") and v}
                    if other or req.get("total") != req.get("studies"):
                        checks.append(f"steady: requests other than listing: {other}")
                if not args.keep and phase == "first" and (workdir / "out").exists():
                    shutil.rmtree(workdir / "out")   # the steady run writes nothing; free the disk early
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    case["checks"] = checks
    return case


# --- the throughput part ------------------------------------------------------------------------


def throughput(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    workers_list = [int(w) for w in args.tp_workers.split(",")]
    latency = args.tp_latency
    rows = []
    for w in workers_list:
        n = max(400, min(args.tp_studies, 250 * w))
        workdir = Path(tempfile.mkdtemp(prefix=f"tp-{w}-", dir=base))
        _progress(f"throughput: {w} workers, {n:,} studies, latency {latency} s ...")
        try:
            with simulator(n, args.seed, latency) as sim:
                cpu0 = sim.cpu_seconds()
                result = run_sync(sim.url, workdir, workers=w, sample=False)
                span = sim.counts()["spans"].get("instances")
                sim_cpu = sim.cpu_seconds() - cpu0
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        s = result["summary"]
        req = _requests(result)
        seconds = s.get("seconds") or result["wall"]
        instances = req.get("instances", 0)
        ideal = w / latency
        overall = req.get("total", 0) / seconds if seconds else 0.0
        phase = (instances - 1) / span if span and instances > 1 else None
        cpu_share = result["run_cpu"] / seconds if seconds else 0.0
        row = {
            "workers": w, "studies": n, "ideal_rps": round(ideal, 1), "seconds": round(seconds, 3),
            "requests": req, "overall_rps": round(overall, 1), "crawl_rps": round(phase, 1) if phase else None,
            "crawl_vs_ideal": round(phase / ideal, 3) if phase else None, "overall_vs_ideal": round(overall / ideal, 3),
            "crawler_cpu": result["run_cpu"], "crawler_cpu_share": round(cpu_share, 3),
            "cpu_ms_per_study": round(result["run_cpu"] / n * 1000, 3),
            "cpu_needed_at_ideal": round(ideal * result["run_cpu"] / n, 3),
            "simulator_cpu": round(sim_cpu, 3), "peak_rss_mb": result["peak_rss_mb"], "exit": result["exit"],
        }
        rows.append(row)
        _progress(f"  crawl phase {row['crawl_rps']} req/s of ideal {ideal:.0f} ({(row['crawl_vs_ideal'] or 0) * 100:.0f}%), "
                  f"crawler CPU {cpu_share * 100:.0f}% of a core")
    return {"latency": latency, "rows": rows, **_saturation(rows)}


def _saturation(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the crawler's CPU saturates, and whether the rate held up to there.

    Saturated: the crawler uses at least ``SATURATED_CPU`` of one core (a CPython process does
    its Python work on one core at a time, and with many threads it tops out near 80-85% of it),
    or the ideal rate would need that much (``cpu_needed_at_ideal``: once the threads queue for
    the interpreter, the CPU they are seen to use stays below what they need), or the next
    (larger) worker count adds less than ``PLATEAU`` to the crawl rate.
    """
    saturated_at = None
    for k, r in enumerate(rows):
        following = rows[k + 1] if k + 1 < len(rows) else None
        plateau = following is not None and (following["crawl_rps"] or 0) < (r["crawl_rps"] or 0) * PLATEAU
        if r["crawler_cpu_share"] >= SATURATED_CPU or r["cpu_needed_at_ideal"] >= SATURATED_CPU or plateau:
            saturated_at = r["workers"]
            break
    before = [r for r in rows if saturated_at is None or r["workers"] < saturated_at]
    misses = [r["workers"] for r in before if (r["crawl_vs_ideal"] or 0) < THROUGHPUT_TARGET]
    held = [r["workers"] for r in rows if (r["crawl_vs_ideal"] or 0) >= THROUGHPUT_TARGET]
    best = max(rows, key=lambda r: r["crawl_rps"] or 0)
    largest = max(rows, key=lambda r: r["studies"])      # least diluted by per-run costs
    cpu_bound = 1000.0 / largest["cpu_ms_per_study"] if largest["cpu_ms_per_study"] else None
    return {
        "saturated_at_workers": saturated_at,
        "target_held_at_workers": held,
        "misses_before_saturation": misses,
        "max_crawl_rps": best["crawl_rps"],
        "max_crawl_rps_workers": best["workers"],
        "one_core_bound_rps": round(cpu_bound, 1) if cpu_bound else None,
        "met": bool(before) and not misses,
    }


# --- report ---------------------------------------------------------------------------------------


def _loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return []


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def targets(cases: list[dict[str, Any]], tp: dict[str, Any] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    by_n = {c["studies"]: c for c in cases}
    largest = max(by_n) if by_n else None
    for phase in ("first", "steady"):
        million = by_n.get(1_000_000)
        out.append({
            "target": f"{phase}: peak RSS at 1,000,000 studies <= {RSS_TARGET_MB:.0f} MB",
            "value": f"{million[phase]['peak_rss_mb']} MB" if million else "not run (add 1000000 to --sizes)",
            "met": million[phase]["peak_rss_mb"] <= RSS_TARGET_MB if million else None,
        })
        if 10_000 in by_n and largest and largest != 10_000:
            ratio = by_n[largest][phase]["peak_rss_mb"] / by_n[10_000][phase]["peak_rss_mb"]
            out.append({
                "target": f"{phase}: peak RSS at {largest:,} within 20% of 10,000",
                "value": f"{ratio:.3f}x ({by_n[largest][phase]['peak_rss_mb']} / {by_n[10_000][phase]['peak_rss_mb']} MB)",
                "met": ratio <= RSS_RATIO_TARGET,
            })
    for c in cases:
        req = _requests(c["steady"])
        first = _requests(c["first"])
        out.append({
            "target": f"steady {c['studies']:,}: listing requests only",
            "value": f"{req.get('total', 0):,} requests, {req.get('studies', 0):,} listing ({req.get('total', 0) / max(first.get('total', 1), 1) * 100:.2f}% of first sync's)",
            "met": req.get("total") == req.get("studies") and not c["checks"],
        })
    if tp:
        sat = tp["saturated_at_workers"]
        out.append({
            "target": f"throughput >= {THROUGHPUT_TARGET * 100:.0f}% of workers/latency until the crawler's CPU saturates",
            "value": (f">= {THROUGHPUT_TARGET * 100:.0f}% at workers {tp['target_held_at_workers'] or 'none'}; "
                      f"saturated at {sat or 'no'} workers; missed before that at {tp['misses_before_saturation'] or 'none'}; "
                      f"max {tp['max_crawl_rps']} req/s ({tp['max_crawl_rps_workers']} workers), "
                      f"CPU per study allows ~{tp['one_core_bound_rps']} req/s"),
            "met": tp["met"],
        })
    return out


def print_report(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"qido-crawler scale benchmark  (Python {env['python']}, {env['cpus']} CPUs, {env['machine']})")
    load = env.get("loadavg_before") or []
    if load and load[0] > 0.5:
        print(f"note: load average {load[0]:.2f} before the run ({', '.join(f'{x:.2f}' for x in env.get('loadavg_after') or [])} after): "
              "other work on this machine makes times and rates lower than they would be alone")
    print(f"simulator: FakePacs in its own process, seed {report['seed']}, latency {report['latency']} s; crawler: --workers {report['workers']} --metadata never, page size 100")
    print()
    head = f"{'studies':>10} {'sync':6} {'wall s':>8} {'requests':>10} {'listing':>8} {'instances':>10} {'req/s':>7} {'CPU s':>7} {'ms/study':>8} {'sim CPU s':>9} {'base MB':>7} {'peak MB':>7} {'RSS 10/50/90/100% MB':>22}  check"
    print(head)
    print("-" * len(head))
    for c in report["sizes"]:
        for phase in ("first", "steady"):
            r = c[phase]
            req = _requests(r)
            rate = req.get("total", 0) / r["wall"] if r["wall"] else 0
            at = r["rss_at"]
            curve = "/".join(f"{at.get(k) or 0:.0f}" for k in ("10%", "50%", "90%", "100%"))
            ok = "ok" if not c["checks"] else "FAILED"
            print(f"{c['studies']:>10,} {phase:6} {r['wall']:>8.1f} {req.get('total', 0):>10,} {req.get('studies', 0):>8,} {req.get('instances', 0):>10,} {rate:>7.0f} "
                  f"{r['run_cpu']:>7.1f} {r['run_cpu'] / c['studies'] * 1000:>8.3f} {r['simulator']['cpu']:>9.1f} {r['base_rss_mb']:>7.1f} {r['peak_rss_mb']:>7.1f} {curve:>22}  {ok}")
        for check in c["checks"]:
            print(f"{'':>10} ! {check}")
    sizes = report["sizes"]
    if len(sizes) > 1:
        small = sizes[0]
        print()
        for c in sizes[1:]:
            print(f"ratios {c['studies']:,} / {small['studies']:,}: peak RSS first {c['first']['peak_rss_mb'] / small['first']['peak_rss_mb']:.3f}x, "
                  f"steady {c['steady']['peak_rss_mb'] / small['steady']['peak_rss_mb']:.3f}x; "
                  f"steady requests / first requests {_requests(c['steady']).get('total', 0) / max(_requests(c['first']).get('total', 1), 1):.4f}")
    tp = report.get("throughput")
    if tp:
        print()
        print(f"Throughput: first sync, simulator latency {tp['latency']} s per request, ideal = workers / latency")
        head = f"{'workers':>7} {'studies':>7} {'ideal/s':>8} {'overall/s':>9} {'%ideal':>6} {'crawl/s':>8} {'%ideal':>6} {'crawler CPU':>11} {'at ideal':>8} {'ms CPU/study':>12} {'sim CPU s':>9} {'peak MB':>7}"
        print(head)
        print("-" * len(head))
        for r in tp["rows"]:
            crawl = f"{r['crawl_rps']:.0f}" if r["crawl_rps"] else "-"
            pct = f"{r['crawl_vs_ideal'] * 100:.0f}%" if r["crawl_vs_ideal"] else "-"
            print(f"{r['workers']:>7} {r['studies']:>7,} {r['ideal_rps']:>8.0f} {r['overall_rps']:>9.0f} {r['overall_vs_ideal'] * 100:>5.0f}% {crawl:>8} {pct:>6} "
                  f"{r['crawler_cpu_share'] * 100:>10.0f}% {r['cpu_needed_at_ideal'] * 100:>7.0f}% {r['cpu_ms_per_study']:>12.2f} {r['simulator_cpu']:>9.1f} {r['peak_rss_mb']:>7.1f}")
        print("overall: all requests / the sync's seconds (sequential listing included); crawl: instance requests between the")
        print(f"first and the last one, timed by the simulator; crawler CPU in % of one core, used and needed at the ideal rate.")
        print(f"Saturated at {tp['saturated_at_workers'] or '-'} workers")
        print(f"(CPU used or needed at the ideal rate >= {SATURATED_CPU * 100:.0f}% of a core, or more workers add < {(PLATEAU - 1) * 100:.0f}% to the rate); "
              f"the crawler's CPU per study allows ~{tp['one_core_bound_rps']} req/s.")
    print()
    print("Targets")
    for t in report["targets"]:
        mark = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        print(f"  {mark:7} {t['target']}: {t['value']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Scale benchmark of qido-crawler against a simulated PACS (see the module docstring).")
    p.add_argument("--sizes", default="10000,100000", help="study counts, comma-separated (default 10000,100000; add 1000000 for the full run)")
    p.add_argument("--latency", type=float, default=0.0, help="simulator latency per request for the scale part, seconds (default 0)")
    p.add_argument("--workers", type=int, default=8, help="crawler --workers for the scale part (default 8)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-results", type=int, help="simulator result cap (scale part)")
    p.add_argument("--cap-mode", default=None, help="simulator cap mode with --max-results (default warning)")
    p.add_argument("--max-limit", type=int, help="simulator page cap: largest limit answered (scale part)")
    p.add_argument("--tp-latency", type=float, default=0.02, help="simulator latency for the throughput part (default 0.02)")
    p.add_argument("--tp-workers", default="1,2,4,8,16,32", help="worker counts for the throughput part (default 1,2,4,8,16,32)")
    p.add_argument("--tp-studies", type=int, default=5000, help="at most this many studies per throughput run (default 5000)")
    p.add_argument("--skip-scale", action="store_true", help="only the throughput part")
    p.add_argument("--skip-throughput", action="store_true", help="only the scale part")
    p.add_argument("--no-verify", action="store_true", help="skip the ground-truth comparison of the state (it takes seconds per million)")
    p.add_argument("--tmp", type=Path, help="folder for states and outputs (default: the system's temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep states and outputs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = p.parse_args(argv)
    if args.max_results is None and args.cap_mode:
        p.error("--cap-mode goes with --max-results")
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    base = Path(tempfile.mkdtemp(prefix="qido-bench-scale-", dir=args.tmp))
    started = time.monotonic()
    load_before = _loadavg()
    try:
        cases = [] if args.skip_scale else [scale_case(n, args, base) for n in sizes]
        tp = None if args.skip_throughput else throughput(args, base)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    report = {
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
                        "loadavg_before": load_before, "loadavg_after": _loadavg()},
        "seed": args.seed, "latency": args.latency, "workers": args.workers, "seconds": round(time.monotonic() - started, 1),
        "sizes": cases, "throughput": tp,
    }
    report["targets"] = targets(cases, tp)
    if args.json:
        for c in cases:
            for phase in ("first", "steady"):
                c[phase].pop("stderr", None)
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
        print(f"\n({report['seconds']:.0f} s)")
    failed = any(c["checks"] for c in cases) or any(r["exit"] != 0 for r in (tp["rows"] if tp else []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
