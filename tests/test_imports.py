"""Dependency hygiene: every module of the package imports in a fresh interpreter, and every
third-party module it imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import minidistill

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(minidistill.__file__).parent


def package_modules() -> list[str]:
    return sorted(
        ["minidistill"] + [m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="minidistill.")]
    )


def imported_top_level(path: Path) -> set[str]:
    """Top-level names of absolute imports anywhere in a file (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_normalise(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_module_imports_in_a_fresh_interpreter():
    modules = package_modules()
    assert len(modules) > 30 and "minidistill.publish.hub" in modules and "minidistill.prune.pipeline" in modules
    script = (
        "import importlib, json, sys, traceback\n"
        "failed = {}\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed[name] = traceback.format_exc(limit=3)\n"
        "print(json.dumps(failed))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert failed == {}, "\n".join(f"{k}:\n{v}" for k, v in failed.items())


def test_every_third_party_import_is_declared():
    stdlib = set(sys.stdlib_module_names)
    dist_of = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    undeclared: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in imported_top_level(path) - stdlib - {"minidistill"}:
            dists = dist_of.get(name)
            assert dists, f"{path.relative_to(ROOT)} imports {name!r}, which no installed distribution provides"
            if not any(_normalise(d) in declared for d in dists):
                undeclared[name] = str(path.relative_to(ROOT))
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"


def test_declared_ranges_admit_the_installed_versions():
    """The ranges in pyproject.toml hold the versions the test suite runs against."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    checked = 0
    for raw in project["dependencies"]:
        req = Requirement(raw)
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"installed {req.name}=={version} is outside {raw!r}"
        checked += 1
    assert checked >= 15
