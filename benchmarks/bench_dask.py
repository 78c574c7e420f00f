"""Dask benchmark: first syncs of a slow simulated PACS with 1, 2 and 4 Dask worker processes.

    python benchmarks/bench_dask.py [--studies 100000] [--latency 0.05] [--workers 1,2,4]
                                    [--worker-threads 4] [--since 20230101 --until 20241231 | --all] [--json]

Run from the repository root with the package and its dask extra installed
(``pip install -e '.[dask]'``); Linux (it reads ``/proc``).

What it does:

1. **Simulated PACS**: ``benchmarks/simulator.py`` (``fixtures.fakepacs.FakePacs`` in its own
   process; deterministic studies generated on demand, nothing stored) with ``--studies``
   studies (default 100,000, StudyDates spread over 2000-2024) and ``--latency`` seconds slept per
   request (default 0.05: a cloud archive), concurrent requests overlapping.
2. **Syncs**, each a first sync on a fresh state in a child process (``--metadata never``: a
   study costs one ``/studies/{uid}/instances`` request besides its share of the listing):

   - ``dask P``: ``--executor dask --workers P --worker-threads T`` for P in ``--workers``: a local
     cluster of P worker processes of T threads, started by the sync itself (its start-up is in
     the time);
   - ``threads N``: the default executor, one process, ``--workers N`` with N = P x T for each
     ``dask P`` row: the same number of requests in flight (4 x 4 -> 16, 2 x 4 -> 8, 1 x 4 -> 4),
     against the same simulator, latency and sample, in the same run. Each Dask row and its
     thread-pool twin run back to back, in alternating order (dask first for the first pair,
     threads first for the next, ...), so that a change in the machine's load falls on both.

   By default the syncs cover StudyDates 2023-01-01 to 2024-12-31 of the 100,000 studies (about
   8,000 studies; ``--since``/``--until`` choose another range): at 50 ms a request one worker
   process of 4 threads crawls 80 studies a second at best, so all 100,000 take 20 minutes with one
   process, while a sync of a few seconds would mostly measure the cluster's start-up (about 2 s
   with the first listing). ``--all`` syncs every study (about an hour for the default worker
   counts).
3. **Figures** per sync: wall time of the child process, studies, requests (from ``--json``),
   studies per second, requests per second against the ideal (``processes x threads /
   latency``), the coordinator's CPU, and the **speed-up** over one Dask worker process
   (studies per second, and on the crawl phase alone: instance requests between the first and
   the last one, timed by the simulator, which leaves out the cluster's start-up), and
   **threads / dask**: the thread pool's studies per second over the Dask row's at the same
   concurrency (above 1: the thread pool is faster on this machine). The load average is printed
   before the run and after each sync.
4. **Checks** (exit status 1 when one fails): every sync finds exactly the simulator's studies in
   the range, all new, none failed, exit status 0.
5. **Target** (from the issue): at least 3x with 4 worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_scale import _loadavg, _progress, run_sync  # noqa: E402
from benchmarks.simulator import simulator  # noqa: E402
from fixtures.fakepacs import FakePacs  # noqa: E402

TARGET_SPEEDUP = 3.0


def one_sync(url: str, base: Path, label: str, extra: list[str], workers: int, expected: int, latency: float, sim: Any) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"dask-{label.replace(' ', '-')}-", dir=base))
    _progress(f"{label}: syncing {expected:,} studies ...")
    try:
        sim.reset()
        result = run_sync(url, workdir, *extra, workers=workers, sample=False)
        counts = sim.counts()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = result["summary"]
    requests = summary.get("requests", {})
    wall = result["wall"]
    span = counts["spans"].get("instances")
    instances = requests.get("instances", 0)
    checks = []
    if result["exit"] != 0:
        checks.append(f"exit status {result['exit']}: {result['stderr'][-400:]}")
    if summary.get("studies_listed") != expected or summary.get("studies_new") != expected or summary.get("studies_failed"):
        checks.append(f"listed {summary.get('studies_listed')}, new {summary.get('studies_new')}, failed {summary.get('studies_failed')}, expected {expected}")
    if counts["requests"].get("instances") != instances:
        checks.append(f"the simulator counted {counts['requests'].get('instances')} instance requests, the crawler {instances}")
    row = {
        "label": label, "wall": wall, "studies": summary.get("studies_listed"), "requests": requests,
        "studies_per_s": round(expected / wall, 1) if wall else None,
        "requests_per_s": round(requests.get("total", 0) / wall, 1) if wall else None,
        "crawl_rps": round((instances - 1) / span, 1) if span and instances > 1 else None,
        "coordinator_cpu": result["run_cpu"], "simulator_cpu": round(counts.get("cpu", 0.0), 1), "checks": checks,
    }
    _progress(f"  {wall:.1f} s, {row['studies_per_s']} studies/s, crawl phase {row['crawl_rps']} req/s{'; ' + '; '.join(checks) if checks else ''}")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Dask benchmark of qido-crawler against a slow simulated PACS (see the module docstring).")
    p.add_argument("--studies", type=int, default=100_000, help="studies in the simulated PACS (default 100000)")
    p.add_argument("--latency", type=float, default=0.05, help="simulator latency per request, seconds (default 0.05)")
    p.add_argument("--workers", default="1,2,4", help="Dask worker process counts (default 1,2,4)")
    p.add_argument("--worker-threads", type=int, default=4, help="threads per worker process (default 4)")
    p.add_argument("--since", default="20230101", help="first StudyDate synced (default 20230101)")
    p.add_argument("--until", default="20241231", help="last StudyDate synced (default 20241231)")
    p.add_argument("--all", action="store_true", help="sync every study instead of the --since/--until range")
    p.add_argument("--no-threads", action="store_true", help="leave out the thread-pool reference rows")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--tmp", type=Path, help="folder for states and outputs (default: the system's temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    processes = [int(w) for w in args.workers.split(",")]
    threads = args.worker_threads
    since, until = (None, None) if args.all else (args.since, args.until)
    expected = FakePacs(args.studies, args.seed).n_matching(since, until)
    scope = [] if args.all else ["--since", since, "--until", until]
    base = Path(tempfile.mkdtemp(prefix="qido-bench-dask-", dir=args.tmp))
    load_before = _loadavg()
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    try:
        with simulator(args.studies, args.seed, args.latency) as sim:
            for index, n in enumerate(processes):
                pair = [("dask", n)] + ([] if args.no_threads else [("threads", n * threads)])
                if index % 2:
                    pair.reverse()
                for kind, count in pair:
                    if kind == "dask":
                        extra = [*scope, "--executor", "dask", "--worker-threads", str(threads)]
                        row = one_sync(sim.url, base, f"dask {count}", extra, count, expected, args.latency, sim)
                        row.update(kind="dask", processes=count, threads=threads, ideal_rps=round(count * threads / args.latency, 1))
                    else:
                        row = one_sync(sim.url, base, f"threads {count}", list(scope), count, expected, args.latency, sim)
                        row.update(kind="threads", processes=1, threads=count, ideal_rps=round(count / args.latency, 1))
                    row.update(pair=index, loadavg_after=_loadavg())
                    rows.append(row)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    one = next((r for r in rows if r["kind"] == "dask" and r["processes"] == 1), None)
    for row in rows:
        if one and one["studies_per_s"] and row["studies_per_s"]:
            row["speedup"] = round(row["studies_per_s"] / one["studies_per_s"], 2)
        if one and one["crawl_rps"] and row["crawl_rps"]:
            row["crawl_speedup"] = round(row["crawl_rps"] / one["crawl_rps"], 2)
    for row in rows:
        twin = next((r for r in rows if r["pair"] == row["pair"] and r["kind"] == "threads"), None)
        if row["kind"] == "dask" and twin and row["studies_per_s"] and twin["studies_per_s"]:
            row["threads_over_dask"] = twin["threads_over_dask"] = round(twin["studies_per_s"] / row["studies_per_s"], 2)
    four = next((r for r in rows if r["kind"] == "dask" and r["processes"] == 4), None)
    measured = four is not None and one is not None
    target = {
        "target": f"speed-up with 4 Dask worker processes >= {TARGET_SPEEDUP:.0f}x one",
        "value": f"{four.get('speedup')}x (crawl phase {four.get('crawl_speedup')}x)" if measured and four
        else "not run (--workers needs both 1 and 4)",
        "met": (four.get("speedup") or 0) >= TARGET_SPEEDUP if measured and four else None,
    }
    report = {
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
                        "loadavg_before": load_before, "loadavg_after": _loadavg()},
        "studies_in_pacs": args.studies, "synced_studies": expected, "range": "all" if args.all else f"{since}-{until}",
        "latency": args.latency, "seed": args.seed, "seconds": round(time.monotonic() - started, 1), "rows": rows, "target": target,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    failed = any(r["checks"] for r in rows) or target["met"] is False
    return 1 if failed else 0


def print_report(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"qido-crawler Dask benchmark  (Python {env['python']}, {env['cpus']} CPUs, {env['machine']}; "
          f"load {', '.join(f'{x:.2f}' for x in env['loadavg_before'])} before)")
    print(f"simulated PACS: {report['studies_in_pacs']:,} studies, {report['latency'] * 1000:.0f} ms per request; "
          f"each sync: a first sync of StudyDates {report['range']} ({report['synced_studies']:,} studies), --metadata never")
    print()
    head = (f"{'executor':>10} {'procs':>5} {'threads':>7} {'in flight':>9} {'wall s':>7} {'studies/s':>9} {'req/s':>6} {'ideal/s':>7} {'crawl/s':>7} "
            f"{'speed-up':>8} {'crawl x':>7} {'threads/dask':>12} {'coord CPU s':>11} {'sim CPU s':>9} {'load after':>10}  check")
    print(head)
    print("-" * len(head))
    for r in report["rows"]:
        ratio = f"{r['threads_over_dask']}x" if "threads_over_dask" in r else "-"
        load = f"{r['loadavg_after'][0]:.2f}" if r.get("loadavg_after") else "-"
        print(f"{r['kind']:>10} {r['processes']:>5} {r['threads']:>7} {r['processes'] * r['threads']:>9} {r['wall']:>7.1f} {r['studies_per_s'] or 0:>9.1f} "
              f"{r['requests_per_s'] or 0:>6.0f} {r['ideal_rps']:>7.0f} {r['crawl_rps'] or 0:>7.0f} {(str(r['speedup']) + 'x') if 'speedup' in r else '-':>8} "
              f"{(str(r['crawl_speedup']) + 'x') if 'crawl_speedup' in r else '-':>7} {ratio:>12} {r['coordinator_cpu']:>11.1f} {r['simulator_cpu']:>9.1f} {load:>10}  "
              f"{'ok' if not r['checks'] else 'FAILED'}")
        for check in r["checks"]:
            print(f"{'':>10} ! {check}")
    print()
    print("studies/s: studies / the sync's wall time (cluster start-up included); crawl/s: instance requests between the first and")
    print("the last one, timed by the simulator; speed-up: against one Dask worker process; threads/dask: the thread pool's studies/s")
    print("over the Dask row's at the same number of requests in flight (above 1x: the thread pool is faster); coord CPU: the")
    print("coordinator process only; load after: the 1-minute load average when the sync ended.")
    t = report["target"]
    print()
    print(f"Target: {'met' if t['met'] else 'MISSED' if t['met'] is False else '-'}  {t['target']}: {t['value']}")
    print(f"\n({report['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
