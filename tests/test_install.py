"""A clean install: `pip install .` finds every shipped preset folder as a package it was told about
(setuptools prints a 'Package would be ignored' block for each one it was not), and what a build
leaves in the checkout is ignored by git."""

import ast
import importlib
import importlib.util
import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_preset_folder_is_a_listed_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    root = Path(config["package-dir"]["c2c.presets_data"])
    folders = {"c2c.presets_data." + ".".join(p.relative_to(ROOT / root).parts)
               for p in (ROOT / root).rglob("*") if p.is_dir() and p.name != "__pycache__"}
    assert folders and folders <= set(config["packages"]), sorted(folders - set(config["packages"]))


def test_every_library_package_is_listed():
    """The library's subpackages (c2c.core, c2c.app, c2c.tools): one left out of the list would install
    without its modules, and `import c2c.core.engine` would fail only after `pip install .`."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "c2c").rglob("__init__.py")}
    assert {"c2c", "c2c.core", "c2c.app", "c2c.tools"} <= packages <= set(config["packages"]), sorted(packages - set(config["packages"]))


def test_build_artefacts_are_ignored_by_git():
    for path in ("build/lib/c2c/core/engine.py", "c2c_speculative.egg-info/PKG-INFO"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_every_c2c_import_and_module_command_in_the_repository_resolves():
    """After the split into c2c.core / c2c.app / c2c.tools: every `import c2c...` / `from c2c... import x`
    in the repository's tracked Python files (scripts, tests, bench, the preset builders) and every
    `-m c2c...` command in its docs and scripts names a module that exists (a stale one fails only
    when that script runs)."""
    tracked = [ROOT / p for p in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                                 check=True).stdout.splitlines()]
    files = [p for p in tracked if p.suffix == ".py" and p.exists()]
    missing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "c2c":
                if importlib.util.find_spec(node.module) is None:
                    missing.append(f"{path.name}: {node.module}")
                    continue
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
            elif isinstance(node, ast.Import):
                missing += [f"{path.name}: {a.name}" for a in node.names
                            if a.name.split(".")[0] == "c2c" and importlib.util.find_spec(a.name) is None]
    for path in [p for p in tracked if p.suffix in (".md", ".sh", ".py") and p.exists()]:
        for name in re.findall(r"-m (c2c(?:\.\w+)*)", path.read_text(encoding="utf-8")):
            if importlib.util.find_spec(name) is None:
                missing.append(f"{path.name}: -m {name}")
    assert len(files) > 50 and not missing, missing


def test_the_old_addresses_still_work():
    """0.3.0 moved the API and the trainer: the documented old imports and commands forward."""
    import warnings

    import c2c

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import c2c.api

        importlib.reload(c2c.api)
    assert c2c.api.SpeculativePipeline is c2c.SpeculativePipeline
    assert any("c2c.app.api" in str(w.message) for w in caught)
    import sys

    out = subprocess.run([sys.executable, "-m", "c2c.train_fuser", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--base_model" in out.stdout and "c2c.tools.train_fuser" in out.stderr
