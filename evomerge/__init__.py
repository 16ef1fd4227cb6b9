"""evomerge: search for model merges with evolutionary and black-box optimizers on Ray.

The repository keeps the strategies and fitnesses in folders beside this package (populations/, fitness/);
installed, they are its sub-packages evomerge.populations and evomerge.fitness (setuptools' package_dir).
From a checkout (run.py, or an editable install whose finder does not map them), `_Checkout` maps the two
names onto the folders, so both import the same way everywhere."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

_BESIDE = ("fitness", "populations")


class _Checkout(importlib.abc.MetaPathFinder):
    """evomerge.fitness / evomerge.populations -> <checkout>/fitness, <checkout>/populations."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        head, _, name = fullname.rpartition(".")
        if head != __name__ or name not in _BESIDE:
            return None
        init = self.root / name / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def _map_checkout() -> None:
    here = Path(__file__).resolve().parent
    if all((here / name / "__init__.py").is_file() for name in _BESIDE):
        return  # installed: they are inside this package
    root = here.parent
    if any((root / name / "__init__.py").is_file() for name in _BESIDE) and not any(
            isinstance(f, _Checkout) for f in sys.meta_path):
        sys.meta_path.append(_Checkout(root))


_map_checkout()
