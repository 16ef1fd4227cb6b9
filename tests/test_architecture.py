"""The code's shape, checked: import-linter's contracts (pyproject.toml [tool.importlinter]: the layers, no
import cycles) on the package laid out as installed, every module of evomerge/ in exactly one layer, and
plugins registered through their registries only."""
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


@pytest.fixture(scope="module")
def installed_layout(tmp_path_factory) -> Path:
    """evomerge/ with fitness/ and populations/ inside it, as the wheel installs them (import-linter reads
    one package's folder; in the checkout those two sit beside it)."""
    stage = tmp_path_factory.mktemp("layout")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "evomerge", stage / "evomerge", ignore=ignore)
    for name in ("fitness", "populations"):
        shutil.copytree(ROOT / name, stage / "evomerge" / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", stage / "pyproject.toml")
    return stage


def test_import_contracts_hold(installed_layout):
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--config", "pyproject.toml", "--no-cache", "--no-logo"], cwd=installed_layout,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(installed_layout)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout, r.stdout


def _layer_names() -> list[str]:
    contract = next(c for c in CONFIG["contracts"] if c["type"] == "layers")
    names = []
    for layer in contract["layers"]:
        names += [n.strip() for n in layer.replace("|", ":").split(":")]
    return names


def test_every_module_of_the_package_sits_in_one_layer():
    """A new module must be placed in a layer (pyproject.toml), else the contracts would not see it."""
    here = {p.stem for p in (ROOT / "evomerge").glob("*.py") if p.stem != "__init__"}
    here |= {p.parent.name for p in (ROOT / "evomerge").glob("*/__init__.py")}
    here |= {"fitness", "populations"}
    names = _layer_names()
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
    assert sorted(here - set(names)) == [], "modules in no layer of [tool.importlinter]"
    assert sorted(set(names) - here) == [], "layers naming modules that do not exist"
