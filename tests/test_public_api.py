"""The public Python API: every name in ``crawler.__all__`` imports and is documented in
docs/api.md (as sqlite-utils' test_docs does for its CLI), the Airflow example of docs/api.md
runs against the live Orthanc, ``import crawler`` stays cheap, and ``sync()`` leaves the
process's garbage-collection settings alone while it runs."""

from __future__ import annotations

import gc
import inspect
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import crawler

ROOT = Path(__file__).parent.parent
API_DOC = (ROOT / "docs" / "api.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("name", crawler.__all__)
def test_every_public_name_imports(name):
    assert getattr(crawler, name) is not None


@pytest.mark.parametrize("name", crawler.__all__)
def test_every_public_name_is_documented(name):
    assert f"### `{name}" in API_DOC or f"`{name}`" in API_DOC, f"{name} is not in docs/api.md"


def test_the_documented_signatures_name_the_real_parameters():
    headings = re.findall(r"^### `(\w+)\((.*)\) -> .*`$", API_DOC, flags=re.M)
    assert {name for name, _ in headings} == {"sync", "dry_run", "watch", "export", "audit", "map_study"}
    for name, documented in headings:
        shown = [part.split(":")[0].strip() for part in re.split(r",\s*(?![^\[]*\])", documented)]
        assert shown == list(inspect.signature(getattr(crawler, name)).parameters), name


@pytest.mark.parametrize("name", ["Connection", "SyncConfig", "AuditConfig", "MappingOptions", "StudyInput"])
def test_the_documented_constructors_name_real_fields(name):
    """Every field a constructor line of docs/api.md names exists, in order; a line that does not
    end in ``...`` names them all."""
    (line,) = re.findall(rf"^`{name}\((.*)\)`", API_DOC, flags=re.M)
    shown = [part.split("=")[0].strip() for part in re.split(r",\s*(?![^(]*\))", line)]
    complete = shown[-1] != "..."
    shown = [n for n in shown if n not in ("*", "...", "*connection fields*")]
    from dataclasses import fields

    from crawler import Connection

    real = [f.name for f in fields(getattr(crawler, name))]
    if "*connection fields*" in line:
        real = real[:1] + real[len(fields(Connection)):]
    assert shown == (real if complete else [n for n in real if n in shown]), name
    assert set(shown) <= set(real)


def test_star_import_gives_every_public_name():
    names: dict[str, object] = {}
    exec("from crawler import *", names)
    assert set(crawler.__all__) <= set(names)


def test_sync_and_audit_are_the_functions_whatever_was_imported_first():
    """The submodules ``crawler.sync`` and ``crawler.audit`` share the functions' names; importing
    them first must not turn ``from crawler import sync`` into the module."""
    out = run_python(
        "import types, crawler.sync, crawler.audit, crawler.audit.run\n"
        "from crawler import SyncResult, audit, sync\n"
        "import crawler\n"
        "print(all(isinstance(f, types.FunctionType) for f in (sync, audit, crawler.sync, crawler.audit)))\n"
        "from crawler.audit import AuditConfig\n"
        "print(AuditConfig is crawler.AuditConfig)\n"
    )
    assert out.split() == ["True", "True"]


def test_import_crawler_loads_neither_the_http_stack_nor_the_run():
    loaded = json.loads(run_python("import sys, json, crawler; print(json.dumps(sorted(sys.modules)))"))
    assert "crawler" in loaded
    assert not {"requests", "urllib3", "tenacity", "orjson", "crawler.sync", "crawler.config", "crawler.mapping"} & set(loaded)
    assert {m for m in loaded if m.startswith("crawler.")} <= {"crawler.errors", "crawler.kinds"}


def test_py_typed_ships_with_the_package():
    assert (ROOT / "crawler" / "py.typed").is_file()
    settings = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^\[tool\.setuptools\.package-data\]\ncrawler = \[[^]]*"py\.typed"', settings, flags=re.M)


def test_the_airflow_example_runs_against_orthanc(pacs, corpus_study_uids, tmp_path):
    """The first python block that defines ``sync_pacs`` is run as written; the Airflow wiring
    (the next block) needs Airflow and is only checked to call it."""
    blocks = [b for b in python_blocks(API_DOC) if "def sync_pacs(" in b]
    assert blocks, "docs/api.md has no python block defining sync_pacs"
    (example,) = blocks
    assert any("@task" in b and "sync_pacs(" in b for b in python_blocks(API_DOC))
    namespace: dict[str, object] = {}
    exec(compile(example, "docs/api.md", "exec"), namespace)
    out = tmp_path / "copy"

    summary = namespace["sync_pacs"](pacs.dicomweb, str(out))  # type: ignore[operator]

    assert summary["exit_code"] == 0
    assert summary["studies_new"] == len(corpus_study_uids)
    assert (out / "state.db").is_file()
    (folder,) = (out / "runs").iterdir()
    assert summary["run_dir"] == str(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    counts = {entry["type"]: entry["count"] for entry in manifest["output"]}
    assert counts["ImagingStudy"] == len(corpus_study_uids)
    studies = (folder / "ImagingStudy.ndjson").read_text().splitlines()
    assert len(studies) == len(corpus_study_uids)
    json.dumps(summary)  # what a task returns goes to XCom as JSON

    again = namespace["sync_pacs"](pacs.dicomweb, str(out))  # type: ignore[operator]
    assert again["exit_code"] == 0 and again["studies_new"] == again["studies_changed"] == 0


def test_sync_leaves_the_garbage_collector_as_it_found_it(pacs, tmp_path):
    """A library caller (an Airflow worker, a notebook) keeps its own GC settings during and after
    a sync: the tuning is the CLI's (crawler.memory.tuned_for_bulk)."""
    from crawler import SyncConfig, sync

    before = (gc.get_threshold(), gc.get_freeze_count())
    seen: list[tuple[tuple[int, ...], int]] = []
    result = sync(SyncConfig(url=pacs.dicomweb, out=tmp_path / "out", state=tmp_path / "state.db"),
                  lambda figures: seen.append((gc.get_threshold(), gc.get_freeze_count())))
    assert result.exit_code == 0
    assert seen, "progress was never reported"
    assert set(seen) == {before}
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_tuned_for_bulk_tunes_inside_and_restores_after():
    from crawler.memory import tuned_for_bulk

    before = (gc.get_threshold(), gc.get_freeze_count())
    with tuned_for_bulk():
        assert gc.get_threshold() == (50_000, 20, 100)
        assert gc.get_freeze_count() > 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
    with pytest.raises(KeyError), tuned_for_bulk():
        raise KeyError("restored on the way out of an error too")
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_the_package_is_a_module_still():
    assert isinstance(crawler, types.ModuleType)
    assert "sync" in dir(crawler) and "Connection" in dir(crawler)
    with pytest.raises(AttributeError):
        crawler.no_such_name  # noqa: B018
