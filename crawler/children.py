"""Sources of a ``--config`` file run as child processes: ``sync --parallel N`` and ``watch``.

Each child is the same command for one source (the parent's own arguments, the source picked
by ``SOURCE_ENV``), so it reads the file, its secrets from the environment and its options
exactly as a run of that source alone would, and nothing secret is on any command line. A
child's messages reach stderr one line at a time with the source's name before them; its
stdout (``--json`` lines, which name their source) passes through. SIGTERM and SIGINT are
passed on to the children, which end as they would alone (a watch: finishing its run folder).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO

SOURCE_ENV = "QIDO_CRAWLER_CONFIG_SOURCE"
"""Set for a child: the name of the one source of the file it runs."""

log = logging.getLogger(__name__)


def run_children(argv: Sequence[str], names: Sequence[str], parallel: int, prog: str) -> dict[str, int]:
    """Run ``prog argv`` once per source name, at most ``parallel`` at a time; returns each
    source's exit code (a child ended by a signal: 1)."""
    codes: dict[str, int] = {}
    running: dict[str, subprocess.Popen[str]] = {}
    pumps: list[threading.Thread] = []
    waiting = list(names)
    done = threading.Condition()
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()
        with done:
            for child in running.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            done.notify_all()

    def watch(name: str, child: subprocess.Popen[str]) -> None:
        code = child.wait()
        with done:
            if code < 0:
                log.error("%s: ended by signal %d", name, -code)
            codes[name] = 1 if code < 0 else code
            done.notify_all()

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    try:
        with done:
            while waiting or len(codes) < len(running):
                while waiting and len(running) - len(codes) < parallel and not stopping.is_set():
                    name = waiting.pop(0)
                    child = subprocess.Popen(
                        [sys.executable, "-m", "crawler", *argv], env={**os.environ, SOURCE_ENV: name},
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                    )
                    running[name] = child
                    assert child.stdout is not None and child.stderr is not None
                    for stream, out, prefix in ((child.stdout, sys.stdout, ""), (child.stderr, sys.stderr, f"[{name}] ")):
                        pump = threading.Thread(target=_pump, args=(stream, out, prefix), daemon=True)
                        pump.start()
                        pumps.append(pump)
                    threading.Thread(target=watch, args=(name, child), daemon=True).start()
                if stopping.is_set():
                    waiting.clear()
                if waiting or len(codes) < len(running):
                    done.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    for pump in pumps:
        pump.join(timeout=10)
    return codes


def _pump(stream: IO[str], out: IO[str], prefix: str) -> None:
    for line in stream:
        out.write(prefix + line)
        out.flush()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
