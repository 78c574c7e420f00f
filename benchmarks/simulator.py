"""Simulated PACS in its own process: ``fixtures.fakepacs.FakePacs`` behind a command line.

    python benchmarks/simulator.py --studies 100000 --seed 7 --latency 0.02 --port 0
                                   [--max-results N --cap-mode silent] [--max-limit N]

This is a **simulator**, not a PACS: a QIDO-RS/WADO-RS server on 127.0.0.1 that generates
deterministic studies on demand from ``--seed`` (nothing is stored; a study is a function of the
seed and its index), with a fixed per-request latency (``--latency`` seconds from a request's
arrival to its answer, waited in the server's connection thread, so concurrent requests overlap
as on a real server; the answer is built during that wait, so the simulator's own work does not
add to the latency as long as it takes less) and optional caps: ``--max-results`` with
``--cap-mode`` (``warning``, ``warning2013``, ``silent`` like Orthanc's ``LimitFindResults``,
``413``), and ``--max-limit`` (the largest page it answers).
See ``fixtures/fakepacs.py`` for the data and the options.

It runs in its own process because a ``requests`` client in the same process as the simulator
only reaches about 250 requests/s (both fight for one GIL): a benchmark that measures the
crawler must not also be measuring the server's share of its interpreter.

Protocol: the first line on stdout is the DICOMweb base URL (``http://127.0.0.1:PORT/dicom-web``).
Then it serves until it is killed or its stdin is closed (with ``--no-stdin``, or when stdin is
``/dev/null``, until it is killed). Lines on stdin are commands, each answered by one JSON line
on stdout:

    counts   {"requests": {"studies": N, "instances": N, ...}, "spans": {kind: seconds from the first to
             the last request of that kind}, "statuses": {...}, "cpu": SECONDS, "rss_mb": MB}
    reset    forget the counts so far; answers {"ok": true}

Unlike ``FakePacs`` in tests, the process keeps only counts per request kind, not a record of
every request (a million-study crawl would otherwise hold a million query strings).

From Python (the benchmark and tests use this)::

    from benchmarks.simulator import simulator
    with simulator(studies=10_000, seed=7, latency=0.02) as sim:
        sim.url, sim.counts(), sim.reset()
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fixtures.fakepacs import CAP_MODES, FakePacs  # noqa: E402


class CountingPacs(FakePacs):
    """FakePacs that counts requests by kind instead of recording each one (flat memory), and
    answers each request ``latency`` seconds after it arrived (FakePacs waits the latency first and
    then builds the answer, so every answer comes late by the time it took to build)."""

    def __init__(self, *args: Any, latency: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.latency = latency
        self._arrival = threading.local()
        self._kinds: Counter[str] = Counter()
        self._first: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._fields: dict[tuple[frozenset[str], tuple[tuple[str, str], ...]], frozenset[str] | None] = {}

    def _record(self, kind: str, query: str, path: str = "") -> int:
        now = time.monotonic()
        self._arrival.at = now
        with self._lock:
            self._number += 1
            self._kinds[kind] += 1
            self._first.setdefault(kind, now)
            self._last[kind] = now
            return self._number

    def _send(self, h: Any, status: int, headers: list[tuple[str, str]], body: bytes, truncate: bool = False) -> None:
        arrived = getattr(self._arrival, "at", None)
        self._arrival.at = None
        if arrived is not None and self.latency:
            remaining = arrived + self.latency - time.monotonic()
            if remaining > 0 and self._stopping.wait(remaining):
                return
        super()._send(h, status, headers, body, truncate)

    def _keys(self, default: frozenset[str], params: list[tuple[str, str]]) -> frozenset[str] | None:
        """The fields to answer, kept per query (the crawler asks every study the same)."""
        key = (default, tuple(params))
        if key not in self._fields:
            if len(self._fields) > 1000:
                self._fields.clear()
            self._fields[key] = super()._keys(default, params)
        return self._fields[key]

    def spans(self) -> dict[str, float]:
        """Seconds between the first and the last request of each kind (since the last reset)."""
        with self._lock:
            return {kind: self._last[kind] - first for kind, first in self._first.items()}

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._kinds)

    def reset_counts(self) -> None:
        with self._lock:
            self._number = 0
            self._kinds.clear()
            self._first.clear()
            self._last.clear()
            self._statuses.clear()


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run a simulated PACS (FakePacs) in this process; print its URL, serve until stdin closes.")
    p.add_argument("--studies", type=int, required=True, help="number of studies")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data (default 0)")
    p.add_argument("--latency", type=float, default=0.0, metavar="SECONDS", help="answer every request this long after it arrived (default 0)")
    p.add_argument("--max-results", type=int, metavar="N", help="cap on the results of one query")
    p.add_argument("--cap-mode", choices=CAP_MODES, default="warning", help="how the cap shows (default warning)")
    p.add_argument("--max-limit", type=int, metavar="N", help="largest page (limit) answered; larger limits are clamped")
    p.add_argument("--no-date-fraction", type=float, default=0.0, help="fraction of studies without StudyDate (default 0)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--no-stdin", action="store_true", help="ignore stdin: serve until killed (also when stdin is /dev/null)")
    return p


def _stdin_is_null() -> bool:
    """True when stdin is /dev/null or closed (e.g. a background job of a script): no commands can come."""
    try:
        st, null = os.fstat(sys.stdin.fileno()), os.stat(os.devnull)
    except (OSError, ValueError, AttributeError):
        return True
    return (st.st_dev, st.st_ino) == (null.st_dev, null.st_ino)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pacs = CountingPacs(
        args.studies, args.seed, no_date_fraction=args.no_date_fraction, host=args.host, port=args.port,
        latency=args.latency, max_results=args.max_results, cap_mode=args.cap_mode, max_limit=args.max_limit,
    )
    pacs.start()
    out = sys.stdout
    out.write(pacs.url + "\n")
    out.flush()
    try:
        if args.no_stdin or _stdin_is_null():
            threading.Event().wait()      # until SIGINT (KeyboardInterrupt) or SIGTERM
        for line in sys.stdin:
            command = line.strip()
            if command == "counts":
                answer: dict[str, Any] = {
                    "requests": dict(pacs.counts()), "spans": {k: round(v, 4) for k, v in pacs.spans().items()},
                    "statuses": {str(k): v for k, v in pacs.statuses.items()},
                    "cpu": round(_cpu_seconds(), 3), "rss_mb": round(_rss_mb(), 1),
                }
            elif command == "reset":
                pacs.reset_counts()
                answer = {"ok": True}
            elif command == "quit":
                break
            elif not command:
                continue
            else:
                answer = {"error": f"unknown command {command!r}"}
            out.write(json.dumps(answer) + "\n")
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        pacs.stop()
    return 0


# --- the Python side ---------------------------------------------------------------------------


class Simulator:
    """A running simulator process: ``url``, ``pid``, ``counts()``, ``reset()``, ``cpu_seconds()``, ``stop()``."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _ask(self, command: str) -> dict[str, Any]:
        with self._lock:
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"simulator exited (status {self.process.poll()})")
        return json.loads(line)

    def counts(self) -> dict[str, Any]:
        """{"requests": {kind: n}, "spans": {kind: s}, "statuses": {...}, "cpu": s, "rss_mb": MB} since the last reset
        (``cpu`` and ``rss_mb`` are the process's totals)."""
        return self._ask("counts")

    def reset(self) -> None:
        self._ask("reset")

    def cpu_seconds(self) -> float:
        """The simulator process's CPU (user + system), from /proc."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def start_simulator(
    studies: int,
    seed: int = 0,
    latency: float = 0.0,
    *,
    max_results: int | None = None,
    cap_mode: str = "warning",
    max_limit: int | None = None,
    no_date_fraction: float = 0.0,
    python: str = sys.executable,
) -> tuple[subprocess.Popen[str], str]:
    """Start ``simulator.py`` as a child process; returns (process, DICOMweb base URL)."""
    cmd = [python, str(Path(__file__).resolve()), "--studies", str(studies), "--seed", str(seed), "--latency", str(latency), "--port", "0"]
    if max_results is not None:
        cmd += ["--max-results", str(max_results), "--cap-mode", cap_mode]
    if max_limit is not None:
        cmd += ["--max-limit", str(max_limit)]
    if no_date_fraction:
        cmd += ["--no-date-fraction", str(no_date_fraction)]
    process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url.startswith("http://"):
        process.kill()
        _, err = process.communicate()
        raise RuntimeError(f"simulator did not start: {url!r} {err.strip()}")
    return process, url


@contextmanager
def simulator(studies: int, seed: int = 0, latency: float = 0.0, **options: Any) -> Iterator[Simulator]:
    """A simulator process for the ``with`` block; stopped (stdin closed) afterwards."""
    process, url = start_simulator(studies, seed, latency, **options)
    sim = Simulator(process, url)
    try:
        yield sim
    finally:
        sim.stop()


if __name__ == "__main__":
    sys.exit(main())
