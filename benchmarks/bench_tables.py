"""Tables benchmark: what ``--parquet`` and ``--delta`` add to a sync of a simulated PACS.

    python benchmarks/bench_tables.py [--sizes 10000,100000] [--repeat 1] [--workers 8] [--json]
    python benchmarks/bench_tables.py --quick          # a smoke run: 1,000 studies

Run from the repository root with the tables extra installed (``pip install -e '.[tables]'``);
Linux (it reads ``/proc``).

What it does, for each size (``--sizes``):

1. **Simulated PACS.** ``benchmarks/simulator.py`` (``fixtures.fakepacs.FakePacs`` in its own
   process) serves that many studies generated on demand from ``--seed``: 1-4 series of 1-5
   instances each (about 2.5 series and 7.5 instances a study; the exact row counts are printed).
2. **Five first syncs**, each on a fresh state and fresh output folders, as a child process
   (``python -m crawler sync URL --metadata never --json -q --workers N`` under
   ``bench_scale.CHILD``, which reports the process's own peak RSS, ``VmHWM``)::

       ndjson           --out DIR                     (the baseline)
       ndjson+parquet   --out DIR --parquet DIR2
       ndjson+delta     --out DIR --delta DIR3
       parquet          --parquet DIR2                (the tables alone: no --out)
       delta            --delta DIR3

   ``--repeat N`` runs the five N times; the order is reversed every other round (and for every
   other size), so that no variant always runs first or last on a machine whose load drifts.
3. **Figures** for each sync: wall time of the child process and its ratio to the baseline
   *of the same round* (like with like); the crawler's CPU (user + system, all threads);
   requests (from ``--json``; they must be equal across the variants: the same work); the table
   rows written (studies + series + instances, read back from the Parquet footers and the Delta
   log); **rows/s**, two ways: rows / the sync's wall time (the rate the tables fill, end to end)
   and rows / the time the tables added (wall time minus the baseline's of the same round; shown
   only when that is above 0.5 s, below which it is noise); bytes on disk of the NDJSON run folder,
   the Parquet folder and the Delta folder (all files; for Delta also the files of the table's
   current version, as the merges leave the files they replaced until a ``VACUUM``) and their
   ratio to the NDJSON; peak RSS.
4. **Checks** (a failed check makes the exit status 1): every sync exits 0 and finds every study
   as new; every variant sends the same requests as the baseline; the tables hold exactly the
   simulator's studies, series and instances (counted from ``FakePacs``, the ground truth); the
   NDJSON holds one ImagingStudy line per study.
5. **Targets** (issue 17), shown met or missed, never failing the run (the machine is shared):
   the tables add under 25% to the sync's wall time (each table variant against the baseline,
   median ratio over the rounds); peak RSS under 200 MB; flat between the smallest and the
   largest size (within 20%, the scale benchmark's measure).

``--json`` prints one JSON object instead of the tables. States and outputs go to ``--tmp``
(default: the system's temporary folder) and are removed after each sync unless ``--keep``
(a 100,000-study NDJSON folder is about 700 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
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

from benchmarks.bench_scale import CHILD, MB, _loadavg, _RssSampler, count_lines  # noqa: E402
from benchmarks.simulator import simulator  # noqa: E402

TABLES = ("studies", "series", "instances")
BASELINE = "ndjson"
VARIANTS: dict[str, tuple[bool, str | None]] = {
    # name: (writes --out, table sink)
    "ndjson": (True, None),
    "ndjson+parquet": (True, "parquet"),
    "ndjson+delta": (True, "delta"),
    "parquet": (False, "parquet"),
    "delta": (False, "delta"),
}
ADDED_TIME_TARGET = 0.25
RSS_TARGET_MB = 200.0
RSS_FLAT_RATIO = 1.20
MIN_ADDED_SECONDS = 0.5   # below this the time the tables added is noise: no rows/s over it


# --- one sync -------------------------------------------------------------------------------------


def run_child(url: str, workdir: Path, variant: str, workers: int, extra: list[str]) -> dict[str, Any]:
    """One first sync of ``variant`` on a fresh state in ``workdir``; the child's figures."""
    out, sink = VARIANTS[variant]
    args = ["sync", url, "--state", str(workdir / "state.db"), "--metadata", "never", "--json", "-q", "--workers", str(workers)]
    if out:
        args += ["--out", str(workdir / "out")]
    if sink == "parquet":
        args += ["--parquet", str(workdir / "parquet")]
    elif sink == "delta":
        args += ["--delta", str(workdir / "delta")]
    stats = workdir / "child.json"
    process = subprocess.Popen([sys.executable, "-c", CHILD, str(stats), *args, *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir)
    started = time.perf_counter()
    sampler = _RssSampler(process.pid)
    sampler.start()
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(process.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    stdout = process.stdout.read()  # type: ignore[union-attr]
    code = process.wait()
    wall = time.perf_counter() - started
    reader.join()
    sampler.stopping.set()
    sampler.join()
    stderr = b"".join(err).decode(errors="replace")
    try:
        child = json.loads(stats.read_text())
    except (OSError, ValueError):
        raise RuntimeError(f"the crawler child left no figures (exit {code}): {stderr[-2000:]}") from None
    try:
        summary = json.loads(stdout)
    except ValueError:
        summary = {}
    cpu = child["utime"] + child["stime"]
    return {
        "exit": code, "summary": summary, "wall": round(wall, 3), "cpu": round(cpu, 3),
        "peak_rss_mb": round(child.get("VmHWM", child["maxrss_kb"]) / MB, 1),
        "base_rss_mb": round(child["base_rss_kb"] / MB, 1),
        "rss_at": {f"{int(f * 100)}%": sampler.at(f) for f in (0.1, 0.5, 0.9, 1.0)},
        "stderr": stderr[-2000:],
    }


# --- what a sync left on disk -------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def parquet_rows(folder: Path) -> dict[str, int]:
    """Rows of each table of a Parquet change log (the footers of the visible ``*.parquet`` files)."""
    import pyarrow.parquet as pq

    return {name: sum(pq.ParquetFile(path).metadata.num_rows for path in sorted((folder / name).glob("*.parquet")))
            for name in TABLES}


def delta_figures(uri: Path) -> tuple[dict[str, int], int, int]:
    """(rows of each table, bytes of the current version's files, commits) of the Delta tables."""
    import pyarrow as pa
    from deltalake import DeltaTable

    rows: dict[str, int] = {}
    live = commits = 0
    for name in TABLES:
        if not (uri / name).exists():
            rows[name] = 0
            continue
        table = DeltaTable(str(uri / name))
        actions = pa.table(table.get_add_actions(flatten=True))
        rows[name] = sum(actions["num_records"].to_pylist())
        live += sum(actions["size_bytes"].to_pylist())
        commits += table.version() + 1
    return rows, live, commits


def truth_rows(n: int, seed: int) -> dict[str, int]:
    """The simulator's studies, series and instances, counted from ``FakePacs`` (not started)."""
    from fixtures.fakepacs import FakePacs

    pacs = FakePacs(n, seed)
    series = instances = 0
    for uid in pacs.study_uids():
        series += pacs.n_series(uid)
        instances += pacs.n_instances(uid)
    return {"studies": n, "series": series, "instances": instances}


def measure(n: int, variant: str, workdir: Path, result: dict[str, Any], truth: dict[str, int]) -> list[str]:
    """Adds the on-disk figures to ``result``; returns the failed checks."""
    checks: list[str] = []
    out, sink = VARIANTS[variant]
    s = result["summary"]
    if result["exit"] != 0:
        checks.append(f"exit status {result['exit']}: {result['stderr'][-500:]}")
    if s.get("studies_listed") != n or s.get("studies_new") != n:
        checks.append(f"listed {s.get('studies_listed')}, new {s.get('studies_new')}, expected {n}")
    result["ndjson_bytes"] = folder_bytes(workdir / "out") if out else None
    if out:
        run_dir = s.get("run_dir")
        lines = count_lines(workdir / run_dir / "ImagingStudy.ndjson") if run_dir else 0   # a relative run_dir is the child's (cwd workdir)
        if lines != n:
            checks.append(f"ImagingStudy.ndjson has {lines} lines, expected {n}")
    rows: dict[str, int] | None = None
    result["table_bytes"] = result["table_live_bytes"] = result["delta_commits"] = None
    if sink == "parquet":
        rows = parquet_rows(workdir / "parquet")
        result["table_bytes"] = result["table_live_bytes"] = folder_bytes(workdir / "parquet")
    elif sink == "delta":
        rows, live, commits = delta_figures(workdir / "delta")
        result["table_bytes"], result["table_live_bytes"], result["delta_commits"] = folder_bytes(workdir / "delta"), live, commits
    result["rows"] = rows
    result["table_rows"] = sum(rows.values()) if rows else None
    if rows is not None and rows != truth:
        checks.append(f"the {sink} tables hold {rows}, the simulator {truth}")
    return checks


# --- one size ----------------------------------------------------------------------------------------


def size_case(index: int, n: int, args: argparse.Namespace, variants: list[str], base: Path) -> dict[str, Any]:
    _progress(f"{n:,} studies: counting the simulator's series and instances ...")
    truth = truth_rows(n, args.seed)
    extra = ["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every else []
    rounds: list[dict[str, Any]] = []
    checks: list[str] = []
    with simulator(n, args.seed, args.latency) as sim:
        for r in range(args.repeat):
            order = variants if (index + r) % 2 == 0 else variants[::-1]
            runs: dict[str, Any] = {}
            for variant in order:
                workdir = Path(tempfile.mkdtemp(prefix=f"tables-{n}-{variant.replace('+', '-')}-", dir=base))
                try:
                    _progress(f"{n:,} studies, round {r + 1}/{args.repeat}: {variant} ... (load {_load1():.2f})")
                    sim.reset()
                    result = run_child(sim.url, workdir, variant, args.workers, extra)
                    result["simulator_requests"] = sim.counts()["requests"]
                    result["load_after"] = _load1()
                    failed = measure(n, variant, workdir, result, truth)
                    checks += [f"round {r + 1} {variant}: {c}" for c in failed]
                    runs[variant] = result
                    _progress(f"  {result['wall']:.1f} s, CPU {result['cpu']:.1f} s, peak RSS {result['peak_rss_mb']} MB"
                              + (f", {result['table_rows']:,} table rows" if result["table_rows"] else ""))
                finally:
                    if not args.keep:
                        shutil.rmtree(workdir, ignore_errors=True)
            base_requests = runs[BASELINE]["summary"].get("requests", {})
            for variant, result in runs.items():
                req = result["summary"].get("requests", {})
                if req != base_requests:
                    checks.append(f"round {r + 1} {variant}: requests {req} differ from {BASELINE}'s {base_requests}")
                baseline = runs[BASELINE]["wall"]
                result["ratio"] = round(result["wall"] / baseline, 3) if baseline else None
                result["cpu_ratio"] = round(result["cpu"] / runs[BASELINE]["cpu"], 3) if runs[BASELINE]["cpu"] else None
                added = result["wall"] - baseline
                result["added_seconds"] = round(added, 3)
                rows = result["table_rows"]
                result["rows_per_s_wall"] = round(rows / result["wall"]) if rows and result["wall"] else None
                result["rows_per_s_added"] = round(rows / added) if rows and added > MIN_ADDED_SECONDS else None
                nd = runs[BASELINE]["ndjson_bytes"]
                result["bytes_vs_ndjson"] = round(result["table_bytes"] / nd, 4) if result["table_bytes"] and nd else None
                result["live_bytes_vs_ndjson"] = round(result["table_live_bytes"] / nd, 4) if result["table_live_bytes"] and nd else None
            rounds.append({"order": order, "runs": runs})
    return {"studies": n, "truth": truth, "rounds": rounds, "summary": summarise(rounds, variants), "checks": checks}


def summarise(rounds: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant over the rounds: best wall, median ratio, largest peak RSS, the rest from the best run."""
    out: dict[str, dict[str, Any]] = {}
    for variant in variants:
        runs = [rd["runs"][variant] for rd in rounds]
        best = min(runs, key=lambda r: r["wall"])
        out[variant] = {
            "wall_best": best["wall"], "walls": [r["wall"] for r in runs],
            "ratio_median": round(statistics.median(r["ratio"] for r in runs), 3),
            "ratios": [r["ratio"] for r in runs],
            "cpu_best": min(r["cpu"] for r in runs),
            "cpu_ratio_median": round(statistics.median(r["cpu_ratio"] for r in runs), 3),
            "added_seconds_median": round(statistics.median(r["added_seconds"] for r in runs), 3),
            "requests": best["summary"].get("requests", {}).get("total"),
            "table_rows": best["table_rows"], "rows": best["rows"],
            "rows_per_s_wall": best["rows_per_s_wall"],
            "rows_per_s_added": _median_or_none([r["rows_per_s_added"] for r in runs]),
            "ndjson_bytes": best["ndjson_bytes"], "table_bytes": best["table_bytes"], "table_live_bytes": best["table_live_bytes"],
            "bytes_vs_ndjson": best["bytes_vs_ndjson"], "live_bytes_vs_ndjson": best["live_bytes_vs_ndjson"],
            "delta_commits": best["delta_commits"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "base_rss_mb": best["base_rss_mb"],
            "load_after": [r["load_after"] for r in runs],
        }
    return out


def _median_or_none(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return round(statistics.median(present)) if present else None


# --- report ----------------------------------------------------------------------------------------


def targets(cases: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    tables = [v for v in variants if VARIANTS[v][1]]
    for c in cases:
        for v in tables:
            ratio = c["summary"][v]["ratio_median"]
            out.append({"target": f"{c['studies']:,} studies, {v}: adds under {ADDED_TIME_TARGET * 100:.0f}% to the NDJSON sync's wall time",
                        "value": f"+{(ratio - 1) * 100:.1f}% ({c['summary'][v]['wall_best']:.1f} s against {c['summary'][BASELINE]['wall_best']:.1f} s)",
                        "met": ratio < 1 + ADDED_TIME_TARGET})
    for v in variants:
        peaks = [c["summary"][v]["peak_rss_mb"] for c in cases]
        out.append({"target": f"{v}: peak RSS under {RSS_TARGET_MB:.0f} MB", "value": " / ".join(f"{p} MB" for p in peaks),
                    "met": max(peaks) < RSS_TARGET_MB})
    if len(cases) > 1:
        small, large = cases[0], cases[-1]
        for v in variants:
            a, b = small["summary"][v]["peak_rss_mb"], large["summary"][v]["peak_rss_mb"]
            out.append({"target": f"{v}: peak RSS flat from {small['studies']:,} to {large['studies']:,} studies (within {(RSS_FLAT_RATIO - 1) * 100:.0f}%)",
                        "value": f"{b / a:.3f}x ({a} -> {b} MB, {b - a:+.1f} MB)", "met": b / a <= RSS_FLAT_RATIO})
    else:
        out.append({"target": "peak RSS flat between sizes", "value": "not run (one size)", "met": None})
    return out


def _mb(n: int | None) -> str:
    return f"{n / 1e6:.1f}" if n is not None else "-"


def print_report(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"qido-crawler tables benchmark  (Python {env['python']}, {env['cpus']} CPUs, {env['machine']}; pyarrow {env['pyarrow']}, deltalake {env['deltalake']})")
    print(f"crawler: {env['crawler']} ({env['checkout']})")
    print(f"load average {', '.join(f'{x:.2f}' for x in env['loadavg_before'])} before the run, "
          f"{', '.join(f'{x:.2f}' for x in env['loadavg_after'])} after")
    print(f"simulator: FakePacs in its own process, seed {report['seed']}, latency {report['latency']} s; crawler: first sync, --workers "
          f"{report['workers']} --metadata never, checkpoint every {report['checkpoint_every'] or 1000} studies; {report['repeat']} round(s), order reversed every other")
    print()
    head = (f"{'studies':>8} {'variant':15} {'wall s':>7} {'x ndjson':>8} {'CPU s':>6} {'x CPU':>6} {'requests':>9} {'table rows':>10} "
            f"{'rows/s':>7} {'rows/s+':>8} {'NDJSON MB':>9} {'tables MB':>9} {'live MB':>7} {'/NDJSON':>7} {'peak MB':>7}  check")
    print(head)
    print("-" * len(head))
    for c in report["sizes"]:
        ok = "ok" if not c["checks"] else "FAILED"
        for v, s in c["summary"].items():
            ratio = f"{s['ratio_median']:.3f}" if v != BASELINE else "1"
            rows = f"{s['table_rows']:,}" if s["table_rows"] else "-"
            rps = f"{s['rows_per_s_wall']:,}" if s["rows_per_s_wall"] else "-"
            rpa = f"{s['rows_per_s_added']:,}" if s["rows_per_s_added"] else "-"
            share = f"{s['live_bytes_vs_ndjson'] * 100:.1f}%" if s["live_bytes_vs_ndjson"] else "-"
            print(f"{c['studies']:>8,} {v:15} {s['wall_best']:>7.1f} {ratio:>8} {s['cpu_best']:>6.1f} {s['cpu_ratio_median']:>6.2f} {s['requests'] or 0:>9,} {rows:>10} "
                  f"{rps:>7} {rpa:>8} {_mb(s['ndjson_bytes']):>9} {_mb(s['table_bytes']):>9} {_mb(s['table_live_bytes']):>7} {share:>7} {s['peak_rss_mb']:>7.1f}  {ok}")
        t = c["truth"]
        print(f"{'':>8} simulator: {t['studies']:,} studies, {t['series']:,} series, {t['instances']:,} instances; every run: "
              + "; ".join(f"{v} {'/'.join(f'{w:.1f}' for w in s['walls'])} s (load {'/'.join(f'{x:.1f}' for x in s['load_after'])} after)"
                           for v, s in c["summary"].items()))
        for check in c["checks"]:
            print(f"{'':>8} ! {check}")
    print()
    print("x ndjson: wall time / the NDJSON-only sync's in the same round (median over rounds); x CPU: the same for the crawler's CPU;")
    print("rows/s: table rows (studies + series + instances) / the sync's wall time; rows/s+: / the time the tables added")
    print(f"(wall - the NDJSON sync's of the same round; shown when over {MIN_ADDED_SECONDS} s); tables MB: every file of the Parquet or")
    print("Delta folder; live MB: the files of the Delta tables' current version (the rest are files the merges replaced, kept")
    print("until a VACUUM); /NDJSON: live MB / the NDJSON run folder of the baseline.")
    if len(report["sizes"]) > 1:
        small, large = report["sizes"][0], report["sizes"][-1]
        print("peak RSS growth " + f"{small['studies']:,} -> {large['studies']:,}: " + ", ".join(
            f"{v} {small['summary'][v]['peak_rss_mb']} -> {large['summary'][v]['peak_rss_mb']} MB "
            f"({large['summary'][v]['peak_rss_mb'] / small['summary'][v]['peak_rss_mb']:.3f}x)" for v in large["summary"]))
    print()
    print("Targets")
    for t in report["targets"]:
        mark = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        print(f"  {mark:7} {t['target']}: {t['value']}")


def checkout(root: Path) -> str:
    """The commit of ``root`` and whether the crawler's files differ from it (others edit the tree)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "crawler", "fixtures", "benchmarks/simulator.py"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"{commit}{' with local changes to ' + str(len(changed.splitlines())) + ' file(s)' if changed else ''}"


def _load1() -> float:
    load = _loadavg()
    return load[0] if load else 0.0


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="What --parquet and --delta add to a sync of a simulated PACS (see the module docstring).")
    p.add_argument("--sizes", help="study counts, comma-separated (default 10000,100000; with --quick 1000)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the variants, order reversed every other round (default 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, among {', '.join(VARIANTS)} (default all; {BASELINE} always runs)")
    p.add_argument("--workers", type=int, default=8, help="crawler --workers (default 8)")
    p.add_argument("--checkpoint-every", type=int, help="crawler --checkpoint-every (default: the crawler's, 1000)")
    p.add_argument("--latency", type=float, default=0.0, help="simulator latency per request, seconds (default 0)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a smoke run: --sizes 1000 unless given")
    p.add_argument("--tmp", type=Path, help="folder for states and outputs (default: the system's temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep states and outputs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = p.parse_args(argv)
    sizes = [int(s.replace("_", "")) for s in (args.sizes or ("1000" if args.quick else "10000,100000")).split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    if BASELINE not in variants:
        variants.insert(0, BASELINE)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    import deltalake
    import pyarrow

    import crawler

    base = Path(tempfile.mkdtemp(prefix="qido-bench-tables-", dir=args.tmp))
    started = time.monotonic()
    load_before = _loadavg()
    try:
        cases = [size_case(k, n, args, variants, base) for k, n in enumerate(sizes)]
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    report = {
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
                        "pyarrow": pyarrow.__version__, "deltalake": deltalake.__version__,
                        "crawler": str(Path(crawler.__file__).resolve().parent), "checkout": checkout(ROOT),
                        "loadavg_before": load_before, "loadavg_after": _loadavg()},
        "seed": args.seed, "latency": args.latency, "workers": args.workers, "checkpoint_every": args.checkpoint_every,
        "repeat": args.repeat, "variants": variants, "seconds": round(time.monotonic() - started, 1), "sizes": cases,
    }
    report["targets"] = targets(cases, variants)
    if args.json:
        for c in cases:
            for rd in c["rounds"]:
                for r in rd["runs"].values():
                    r.pop("stderr", None)
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
        print(f"\n({report['seconds']:.0f} s)")
    return 1 if any(c["checks"] for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
