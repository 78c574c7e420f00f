"""Mapping benchmark: our plain-data mapper against the fhir.resources models, on the same studies.

    python benchmarks/bench_mapping.py [--repeat 5] [--sizes 1,100,10000] [--json]

What it does:

1. **Studies.** Synthetic, deterministic studies of 1, 100 and 10,000 instances in the DICOM JSON
   the crawler gets from QIDO-RS: one study-level result (study attributes, issuer of patient ID
   and accession, procedure code, counts) and one instance-level result per instance carrying
   its series' attributes (series UID, number, date/time, modality, description, body part,
   laterality, performing physician and operator with their identification sequences,
   manufacturer and model, institution) and its own (SOP Instance/Class UID, InstanceNumber,
   ImageType, RetrieveURL). 1 series for 1 instance, 3 for 100, 10 for 10,000. Each result
   goes through ``orjson.dumps``/``orjson.loads`` once, so the mapper reads freshly parsed JSON
   (separate objects per instance, as from the wire).
2. **Warm-up**: each path once on a one-instance study, not counted (a first call pays for lazy
   set-up once per process, e.g. pydantic's validators). Its figures are printed apart.
3. **Paths**, for each size in the same run, each timed with ``time.perf_counter`` and reported
   as the best of ``--repeat`` runs (``gc.collect()`` before each run; gc stays enabled). As
   ``timeit`` does, a run calls the path enough times in a row to last at least ``--min-run``
   seconds (default 0.2; found by doubling from one call), and the time per call is reported:
   a single call of a fraction of a millisecond is at the mercy of the timer, a cold cache or
   another process taking the core, which made the one-instance ratio swing between 7x and 14x
   from run to run. Both paths are measured the same way, and a crawl maps studies back to back
   too. Calls per run are printed (``calls``).

   ``ours``            ``orjson.dumps(map_study(data, options))``: DICOM JSON to bytes.
   ``fhir.resources``  ``ImagingStudy.model_validate(resource).model_dump_json()`` on the
                       resource our mapper built (the mapping itself is not timed): what a
                       models-based crawler would pay on top of building the content.

   The models path stops repeating once its runs for a size have taken ``--budget`` seconds
   (default 10), after at least one run (a run at 10,000 instances takes about a second, so
   only ``--repeat`` above 10 or a slow machine meets the budget). Fewer runs are shown.
4. **Check**: both outputs are parsed with ``json.loads`` and compared after dropping ``None``,
   empty strings, lists and objects (recursively); a difference is reported with its JSON path
   and makes the exit status 1.
   ``ours+validate``   ``map_study``, validation with fhir.resources (what ``--validate`` adds),
                       ``orjson.dumps``: what a user who asks for validation pays.
5. **map CLI** (``--map-cli N``, default 10,000 instances): ``qido-crawler map FILE`` end to end
   in a new process on the study's instance-level results with every attribute (about 34 MB of
   DICOM JSON at 10,000), and the process start-up (``qido-crawler --version``)
   apart, best of ``--repeat``; the printed resource is checked against the mapping of a full parse.
6. **Targets** (from the issues), printed next to the figures: ratio models/ours >= 10x at every
   size; the 10,000-instance study mapped and serialised in under 100 ms; the map CLI under 0.3 s
   beyond start-up.

``--json`` prints one JSON object (environment, sizes with their figures, check results,
targets) on stdout instead of the table. The environment includes the load average at the
start: on a shared machine, figures taken under load are not comparable.

Run from the repository root with the package installed (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import orjson

from crawler.dicomjson import Tag
from crawler.mapping import MappingOptions, StudyInput, map_study
from crawler.mapping.validate import validate

TARGET_RATIO = 10.0
TARGET_LARGE_MS = 100.0
TARGET_CLI_S = 0.3
LARGE = 10_000
SERIES_FOR_SIZE = {1: 1, 100: 3, 10_000: 10}

SOURCE = "https://pacs.example.org/dicom-web"
OPTIONS = MappingOptions(source=SOURCE, wado_base=SOURCE)

STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
BODY_PARTS = ["CHEST", "ABDOMEN", "HEAD", "PELVIS", "NECK", "KNEE", "ABDOMENPELVIS", "SPINE", "HEART", "BRAIN"]
LATERALITY = ["", "", "", "", "", "R", "L", "", "", ""]


# --------------------------------------------------------------------------------------------
# Synthetic DICOM JSON
# --------------------------------------------------------------------------------------------


def el(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def pn(name: str) -> dict[str, Any]:
    return {"vr": "PN", "Value": [{"Alphabetic": name}]}


def code(value: str, scheme: str, meaning: str) -> dict[str, Any]:
    return {Tag.CodeValue: el("SH", value), Tag.CodingSchemeDesignator: el("SH", scheme), Tag.CodeMeaning: el("LO", meaning)}


def person_id(value: str) -> dict[str, Any]:
    return {Tag.PersonIdentificationCodeSequence: el("SQ", code(value, "99HOSP", "Staff number"))}


def study_result(n_instances: int, n_series: int) -> dict[str, Any]:
    """The study-level QIDO-RS result, with the fields the crawler asks for."""
    return {
        Tag.SpecificCharacterSet: el("CS", "ISO_IR 192"),
        Tag.StudyDate: el("DA", "20240315"),
        Tag.StudyTime: el("TM", "093015.123456"),
        Tag.AccessionNumber: el("SH", "ACC20240315001"),
        Tag.IssuerOfAccessionNumberSequence: el("SQ", {Tag.LocalNamespaceEntityID: el("UT", "RIS"), Tag.UniversalEntityID: el("UT", "1.2.3.4.5.6"), Tag.UniversalEntityIDType: el("CS", "ISO")}),
        Tag.QueryRetrieveLevel: el("CS", "STUDY"),
        Tag.RetrieveAETitle: el("AE", "PACS"),
        Tag.InstanceAvailability: el("CS", "ONLINE"),
        Tag.ModalitiesInStudy: el("CS", "CT", "SR"),
        Tag.ReferringPhysicianName: pn("Referrer^Rita^^Dr"),
        Tag.ReferringPhysicianIdentificationSequence: el("SQ", person_id("R0042")),
        Tag.TimezoneOffsetFromUTC: el("SH", "+0100"),
        Tag.StudyDescription: el("LO", "CT CHEST ABDOMEN PELVIS WITH CONTRAST"),
        Tag.ProcedureCodeSequence: el("SQ", code("RPID16", "RADLEX", "CT Chest Abdomen Pelvis with IV Contrast")),
        Tag.InstitutionalDepartmentName: el("LO", "Radiology"),
        Tag.RetrieveURL: el("UR", f"{SOURCE}/studies/{STUDY_UID}"),
        Tag.PatientName: pn("Doe^Jane^Q"),
        Tag.PatientID: el("LO", "PAT0001234"),
        Tag.IssuerOfPatientID: el("LO", "HOSP"),
        Tag.IssuerOfPatientIDQualifiersSequence: el("SQ", {Tag.UniversalEntityID: el("UT", "1.2.3.4.5.7"), Tag.UniversalEntityIDType: el("CS", "ISO")}),
        Tag.PatientBirthDate: el("DA", "19700101"),
        Tag.PatientSex: el("CS", "F"),
        Tag.StudyInstanceUID: el("UI", STUDY_UID),
        Tag.StudyID: el("SH", "S0001"),
        Tag.NumberOfStudyRelatedSeries: el("IS", n_series),
        Tag.NumberOfStudyRelatedInstances: el("IS", n_instances),
        Tag.ReasonForTheRequestedProcedure: el("LO", "Staging"),
    }  # fmt: skip


def series_attributes(index: int, n_instances: int) -> dict[str, Any]:
    """The series attributes each instance-level result of series ``index`` carries."""
    last = index == 9 and n_instances > 1  # the tenth series of the large study: a report
    return {
        Tag.SeriesInstanceUID: el("UI", f"{STUDY_UID}.{index + 1}"),
        Tag.SeriesNumber: el("IS", index + 1),
        Tag.SeriesDate: el("DA", "20240315"),
        Tag.SeriesTime: el("TM", f"09{31 + index:02d}00"),
        Tag.Modality: el("CS", "SR" if last else "CT"),
        Tag.SeriesDescription: el("LO", "Report" if last else f"Axial {1 + index % 3}.0 mm {BODY_PARTS[index].lower()}"),
        Tag.BodyPartExamined: el("CS", BODY_PARTS[index]),
        Tag.Laterality: el("CS", LATERALITY[index]) if LATERALITY[index] else el("CS"),
        Tag.PerformingPhysicianName: pn("Performer^Paul"),
        Tag.PerformingPhysicianIdentificationSequence: el("SQ", person_id("P0007")),
        Tag.OperatorsName: {"vr": "PN", "Value": [{"Alphabetic": "Tech^Tina"}, {"Alphabetic": "Tech^Tom"}]},
        Tag.OperatorIdentificationSequence: el("SQ", person_id("T0101"), person_id("T0102")),
        Tag.Manufacturer: el("LO", "ACME Medical"),
        Tag.ManufacturerModelName: el("LO", "Scanner 3000"),
        Tag.InstitutionName: el("LO", "General Hospital"),
    }


def instance_result(series: dict[str, Any], number: int) -> dict[str, Any]:
    series_uid = series[Tag.SeriesInstanceUID]["Value"][0]
    sop_uid = f"{series_uid}.{number}"
    sr = series[Tag.Modality]["Value"][0] == "SR"
    own = {
        Tag.SOPClassUID: el("UI", ENHANCED_SR if sr else CT_IMAGE),
        Tag.SOPInstanceUID: el("UI", sop_uid),
        Tag.InstanceNumber: el("IS", number),
        Tag.ImageType: el("CS") if sr else el("CS", "ORIGINAL", "PRIMARY", "AXIAL"),
        Tag.RetrieveURL: el("UR", f"{SOURCE}/studies/{STUDY_UID}/series/{series_uid}/instances/{sop_uid}"),
        Tag.InstanceAvailability: el("CS", "ONLINE"),
    }
    return {**series, **own}


def build_study(n_instances: int) -> StudyInput:
    """A study of ``n_instances`` instances over ``SERIES_FOR_SIZE`` series, parsed from JSON."""
    n_series = SERIES_FOR_SIZE.get(n_instances, max(1, min(10, n_instances // 1000)))
    per_series = [n_instances // n_series + (1 if i < n_instances % n_series else 0) for i in range(n_series)]
    instances = []
    for index, count in enumerate(per_series):
        series = series_attributes(index, n_instances)
        instances += [instance_result(series, number) for number in range(1, count + 1)]
    study = study_result(n_instances, n_series)
    # From the wire: every result parsed on its own, no shared objects.
    return StudyInput(study=orjson.loads(orjson.dumps(study)), instances=orjson.loads(orjson.dumps(instances)))


# --------------------------------------------------------------------------------------------
# Timing and checks
# --------------------------------------------------------------------------------------------


def calls_per_run(run: Callable[[], Any], min_run: float) -> int:
    """How many calls in a row last at least ``min_run`` seconds: 1, 2, 4 ... (as timeit's
    autorange), so that short calls are timed over many and long ones once."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            run()
        if time.perf_counter() - start >= min_run or number >= 1 << 20:
            return number
        number *= 2


def best_of(run: Callable[[], Any], repeat: int, budget: float | None = None, number: int = 1) -> tuple[float, int, Any]:
    """(best seconds per call, runs, last result) over ``repeat`` runs of ``number`` calls each;
    stops early once ``budget`` seconds are spent."""
    best = float("inf")
    spent = 0.0
    result = None
    runs = 0
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        for _ in range(number):
            result = run()
        elapsed = time.perf_counter() - start
        best = min(best, elapsed / number)
        spent += elapsed
        runs += 1
        if budget is not None and spent >= budget:
            break
    return best, runs, result


def pruned(value: Any) -> Any:
    """``value`` without None, empty strings, empty lists and empty objects, recursively."""
    if isinstance(value, dict):
        out = {k: pruned(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        items = [pruned(v) for v in value]
        return [v for v in items if v not in (None, "", [], {})]
    return value


def differences(a: Any, b: Any, path: str = "$", limit: int = 5) -> list[str]:
    """Up to ``limit`` JSON paths where ``a`` and ``b`` differ, with both values."""
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'ours' if key in a else 'fhir.resources'}")
            else:
                out += differences(a[key], b[key], f"{path}.{key}", limit - len(out))
            if len(out) >= limit:
                break
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} items in ours, {len(b)} in fhir.resources")
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{path}[{i}]", limit - len(out))
            if len(out) >= limit:
                break
    elif a != b or type(a) is not type(b):
        out.append(f"{path}: ours {json.dumps(a)[:80]}, fhir.resources {json.dumps(b)[:80]}")
    return out[:limit]


def measure(n_instances: int, repeat: int, budget: float, imaging_study: Any, min_run: float = 0.2) -> dict[str, Any]:
    data = build_study(n_instances)
    options = OPTIONS

    def ours() -> bytes:
        return orjson.dumps(map_study(data, options))

    resource = map_study(data, options)

    def models() -> Any:
        return imaging_study.model_validate(resource).model_dump_json()

    def validated() -> bytes:
        mapped = map_study(data, options)
        validate(mapped, "R5", None)
        return orjson.dumps(mapped)

    ours_calls = calls_per_run(ours, min_run)
    models_calls = calls_per_run(models, min_run)
    validated_calls = calls_per_run(validated, min_run)
    ours_s, ours_runs, ours_bytes = best_of(ours, repeat, number=ours_calls)
    models_s, models_runs, models_json = best_of(models, repeat, budget, number=models_calls)
    validated_s, _, validated_bytes = best_of(validated, repeat, budget, number=validated_calls)
    ours_content = pruned(json.loads(ours_bytes))
    models_content = pruned(json.loads(models_json))
    diff = differences(ours_content, models_content)
    return {
        "instances": n_instances,
        "series": len(resource.get("series", [])),
        "ours_ms": ours_s * 1000,
        "ours_runs": ours_runs,
        "ours_calls": ours_calls,
        "models_calls": models_calls,
        "models_ms": models_s * 1000,
        "models_runs": models_runs,
        "ratio": models_s / ours_s,
        "validated_ms": validated_s * 1000,
        "validated_calls": validated_calls,
        "ours_bytes": len(ours_bytes),
        "models_bytes": len(models_json.encode() if isinstance(models_json, str) else models_json),
        "same_content": not diff and validated_bytes == ours_bytes,
        "differences": diff,
    }


def map_cli_input(n_instances: int) -> bytes:
    """What ``qido-crawler map`` reads: a study's instance-level results with every attribute
    (``includefield=all``: the study's attributes in each), as a server sends it (compact)."""
    data = build_study(n_instances)
    return orjson.dumps([{**data.study, **item} for item in data.instances])


def best_wall(command: list[str], repeat: int) -> float:
    """The shortest wall time of ``repeat`` runs of a command (stdout discarded)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def measure_map_cli(n_instances: int, repeat: int) -> dict[str, Any]:
    """``qido-crawler map FILE`` end to end in a new process, and the same process start-up
    (``qido-crawler --version``: the interpreter and the CLI's imports) apart; checked against
    the mapping of a full parse."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "study.json")
        body = map_cli_input(n_instances)
        with open(path, "wb") as handle:
            handle.write(body)
        base = [sys.executable, "-m", "crawler"]
        command = [*base, "map", path, "--source", SOURCE, "--wado-url", SOURCE, "--timezone", "UTC"]
        printed = subprocess.run(command, capture_output=True, check=True).stdout
        startup = best_wall([*base, "--version"], repeat)
        end_to_end = best_wall(command, repeat)
    from zoneinfo import ZoneInfo

    options = MappingOptions(source=SOURCE, wado_base=SOURCE, zone=ZoneInfo("UTC"))
    expected = map_study(StudyInput(study={}, instances=orjson.loads(body)), options)
    return {
        "instances": n_instances,
        "input_mb": len(body) / 1e6,
        "startup_s": startup,
        "end_to_end_s": end_to_end,
        "beyond_startup_s": end_to_end - startup,
        "same_content": orjson.loads(printed) == expected,
    }


def warm_up(imaging_study: Any) -> dict[str, float]:
    """One untimed-in-the-results call of each path on a one-instance study: the first call pays
    for lazy set-up (caches, pydantic's validators), which is not what a crawl of many studies
    pays per study."""
    data = build_study(1)
    start = time.perf_counter()
    resource = map_study(data, OPTIONS)
    orjson.dumps(resource)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    imaging_study.model_validate(resource).model_dump_json()
    models = time.perf_counter() - start
    return {"ours_ms": ours * 1000, "models_ms": models * 1000}


def targets(results: list[dict[str, Any]], cli: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = [
        {
            "target": f"ratio fhir.resources/ours >= {TARGET_RATIO:g}x",
            "figure": f"min {min(r['ratio'] for r in results):.1f}x",
            "met": all(r["ratio"] >= TARGET_RATIO for r in results),
        }
    ]
    large = [r for r in results if r["instances"] == LARGE]
    if large:
        out.append(
            {
                "target": f"{LARGE:,}-instance study < {TARGET_LARGE_MS:g} ms (ours)",
                "figure": f"{large[0]['ours_ms']:.1f} ms",
                "met": large[0]["ours_ms"] < TARGET_LARGE_MS,
            }
        )
    if cli is not None:
        out.append(
            {
                "target": f"map CLI on {cli['instances']:,} instances ({cli['input_mb']:.0f} MB): < {TARGET_CLI_S:g} s beyond start-up",
                "figure": f"{cli['beyond_startup_s']:.3f} s",
                "met": cli["beyond_startup_s"] < TARGET_CLI_S,
            }
        )
    return out


def environment() -> dict[str, str]:
    import fhir.resources
    import pydantic

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "orjson": orjson.__version__,
        "pydantic": pydantic.VERSION,
        "fhir.resources": fhir.resources.__version__,
        "load average": " ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def print_table(results: list[dict[str, Any]], goals: list[dict[str, Any]], env: dict[str, str], warmup: dict[str, float],
                cli: dict[str, Any] | None = None) -> None:
    print("Mapping benchmark: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print()
    header = f"{'instances':>9}  {'series':>6}  {'ours ms':>9}  {'fhir.resources ms':>17}  {'ratio':>7}  {'calls':>11}  {'ours+validate ms':>16}  {'same content':>12}"
    print(header)
    print("-" * len(header))
    for r in results:
        models = f"{r['models_ms']:.2f}" + (f" ({r['models_runs']} run{'s' if r['models_runs'] > 1 else ''})" if r["models_runs"] != r["ours_runs"] else "")
        print(
            f"{r['instances']:>9,}  {r['series']:>6}  {r['ours_ms']:>9.2f}  {models:>17}  {r['ratio']:>6.1f}x  {str(r['ours_calls']) + ' / ' + str(r['models_calls']):>11}  {r['validated_ms']:>16.2f}  {'yes' if r['same_content'] else 'NO':>12}"
        )
    print()
    print("ours: map_study + orjson.dumps (no validation); fhir.resources: ImagingStudy.model_validate + model_dump_json of the")
    print("resource ours built, i.e. the cost of the pydantic validation that the default path skips;")
    print("ours+validate: map_study + validation with fhir.resources (what --validate adds) + orjson.dumps")
    print(f"time per call, best of {results[0]['ours_runs'] if results else 0} runs (fhir.resources: fewer if a size's runs exceed the time budget)")
    print("calls: calls per run, ours / fhir.resources (each run lasts at least --min-run seconds)")
    print(f"first calls (warm-up, not in the table): ours {warmup['ours_ms']:.0f} ms, fhir.resources {warmup['models_ms']:.0f} ms")
    if cli is not None:
        print()
        print(f"map CLI end to end ({cli['instances']:,} instances, {cli['input_mb']:.1f} MB of DICOM JSON), best of --repeat runs:")
        print(f"  start-up (qido-crawler --version) {cli['startup_s']:.3f} s, map {cli['end_to_end_s']:.3f} s, "
              f"beyond start-up {cli['beyond_startup_s']:.3f} s, same content {'yes' if cli['same_content'] else 'NO'}")
    print()
    print("Targets (from the issue):")
    for goal in goals:
        print(f"  [{'met' if goal['met'] else 'NOT MET'}] {goal['target']}: {goal['figure']}")
    for r in results:
        if not r["same_content"]:
            print()
            print(f"Content differs at {r['instances']:,} instances:")
            for line in r["differences"]:
                print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per path and size; the best is reported (default 5)")
    parser.add_argument("--sizes", default="1,100,10000", help="instances per study, comma-separated (default 1,100,10000)")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds after which the models path stops repeating a size (default 10)")
    parser.add_argument("--min-run", type=float, default=0.2, help="seconds each timed run lasts at least; short calls are repeated within a run (default 0.2)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object instead of the table")
    parser.add_argument("--map-cli", type=int, default=LARGE, help=f"instances of the study given to the map CLI end to end (default {LARGE}; 0: no CLI row)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.min_run < 0:
        parser.error("--min-run must not be negative")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes takes integers, e.g. 1,100,10000")
    if not sizes or min(sizes) < 1:
        parser.error("--sizes takes positive integers")

    try:
        from fhir.resources.imagingstudy import ImagingStudy
    except ImportError:
        print("fhir.resources is not installed: pip install -e '.[test]'", file=sys.stderr)
        return 2

    env = environment()
    warmup = warm_up(ImagingStudy)
    results = [measure(n, args.repeat, args.budget, ImagingStudy, args.min_run) for n in sizes]
    cli = measure_map_cli(args.map_cli, args.repeat) if args.map_cli else None
    goals = targets(results, cli)
    if args.json:
        print(json.dumps({"environment": env, "repeat": args.repeat, "warmup": warmup, "results": results, "map_cli": cli, "targets": goals}, indent=2))
    else:
        print_table(results, goals, env, warmup, cli)
    return 0 if all(r["same_content"] for r in results) and (cli is None or cli["same_content"]) else 1


if __name__ == "__main__":
    sys.exit(main())
