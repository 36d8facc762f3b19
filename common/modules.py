"""Load a tutorial module by its number.

The modules' file names start with digits (``01_score_functions_basics.py``), which ``import``
cannot name. ``load_module("01")`` finds the file beside ``common/`` and imports it with
importlib, so tests and later modules can reuse an earlier module's building blocks::

    basics = load_module("01")
    basics.gaussian_score(x, mean, cov)

Importing a module runs nothing expensive: every module keeps its demonstration under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def module_path(number: str | int, folder: str | Path | None = None) -> Path:
    """Path of the file ``NN_*.py`` in the repository root (or in ``folder`` below it)."""
    number = f"{int(number):02d}"
    where = ROOT if folder is None else ROOT / folder
    matches = sorted(where.glob(f"{number}_*.py"))
    if not matches:
        raise FileNotFoundError(f"no file {number}_*.py in {where}")
    if len(matches) > 1:
        raise RuntimeError(f"several files match {number}_*.py in {where}: {matches}")
    return matches[0]


def load_module(number: str | int, folder: str | Path | None = None) -> ModuleType:
    """Import ``NN_*.py`` (from the root, or from ``folder``, e.g. ``"solutions"``) once.

    Later calls return the same module object, so state such as cached tensors is shared.
    """
    path = module_path(number, folder)
    prefix = "" if folder is None else f"{Path(folder).name}_"
    name = f"{prefix}m{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_solutions(number: str | int) -> ModuleType:
    """The reference solutions of module ``number`` (``solutions/NN_*.py``)."""
    return load_module(number, folder="solutions")
