"""Prints the survival table of the last mutation run (``tox -e mutants``, docs/testing.md):
one row per mutated module, from the results mutmut keeps in ``mutants/**/*.py.meta``.

    python tools/mutation_table.py [--survivors] [PATTERN ...]

PATTERNs (mutant name globs, as given to ``mutmut run``) restrict the table to those mutants.
A mutant no selected test reaches counts as surviving: nothing would notice it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3, 37}
SURVIVED = {0}
NO_TESTS = {5, 33}
TIMEOUT = {24, -24, 152, 255, 36}
COLUMNS = ("mutants", "killed", "survived", "no tests", "timeout", "other", "not run")


def _kind(code: int | None) -> str:
    if code is None:
        return "not run"
    if code in KILLED:
        return "killed"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    if code in TIMEOUT:
        return "timeout"
    return "other"


def results(root: Path, patterns: list[str]) -> dict[str, dict[str, int | None]]:
    """{module file: {mutant name: exit code or None}} for the mutants matching ``patterns``."""
    out: dict[str, dict[str, int | None]] = {}
    for meta in sorted(root.glob("**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        chosen = {k: v for k, v in codes.items() if not patterns or any(fnmatch.fnmatch(k, p) for p in patterns)}
        if chosen:
            out[str(meta.relative_to(root))[: -len(".meta")]] = chosen
    return out


def table(by_module: dict[str, dict[str, int | None]]) -> list[str]:
    lines = [f"{'module':<22}" + "".join(f"{c:>10}" for c in COLUMNS) + f"{'survival':>10}"]
    total: Counter[str] = Counter()
    for module, codes in by_module.items():
        counts = Counter(_kind(code) for code in codes.values())
        counts["mutants"] = len(codes)
        total.update(counts)
        lines.append(_row(module, counts))
    if len(by_module) > 1:
        lines.append(_row("all", total))
    return lines


def _row(name: str, counts: Counter[str]) -> str:
    run = counts["mutants"] - counts["not run"]
    rate = f"{100 * (counts['survived'] + counts['no tests']) / run:.1f}%" if run else "-"
    return f"{name:<22}" + "".join(f"{counts[c]:>10}" for c in COLUMNS) + f"{rate:>10}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", help="mutant name globs (default: every mutant)")
    parser.add_argument("--survivors", action="store_true", help="also list the surviving mutants by name")
    parser.add_argument("--root", type=Path, default=Path("mutants"), help="mutmut's working folder (default: mutants)")
    parser.add_argument("--max-children", help="ignored: taken by `mutmut run` when tox passes the same arguments to both")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"no mutation results in {args.root}: run `tox -e mutants` first", file=sys.stderr)
        return 2
    by_module = results(args.root, args.patterns)
    print("\n".join(table(by_module)))
    if args.survivors:
        for module, codes in by_module.items():
            for name, code in codes.items():
                if _kind(code) in ("survived", "no tests"):
                    print(f"  {_kind(code):<9} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
