"""README's "How the code is laid out" names every module and package of crawler/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_layout_table_names_every_module_of_the_package():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### How the code is laid out", 1)[1].split("\n#", 1)[0]
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", section))
    package = ROOT / "crawler"
    modules = {p.name for p in package.glob("*.py") if p.name != "__main__.py"}
    packages = {f"{p.name}/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert len(modules) > 20 and "executors/" in packages
    missing = sorted((modules | packages) - named)
    assert not missing, f"README's layout table does not name: {missing}"
    existing = {p.name for p in package.rglob("*.py")}
    stale = sorted(name for name in named if name.endswith(".py") and "/" not in name and name not in existing)
    assert not stale, f"README's layout table names modules that do not exist: {stale}"
