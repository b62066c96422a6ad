"""A clean install: `pip install .` finds every shipped preset folder as a package it was told about
(setuptools prints a 'Package would be ignored' block for each one it was not), and what a build
leaves in the checkout is ignored by git."""

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
