"""Checks every chapter must pass, run once for each NN_*.py file in the repository root.

Chapter-specific tests live in tests/test_NN_*.py; what is the same for every chapter lives
here, so a new chapter gets these checks without copying them.
"""

import importlib.util
import re
import sys

import pytest

from common.exercises import list_exercises
from common.modules import ROOT, load_module, load_solutions

NUMBERS = sorted(p.name[:2] for p in ROOT.glob("[0-9][0-9]_*.py"))
HEADER = ("FILE:", "DIFFICULTY:", "ESTIMATED TIME:", "PREREQUISITES:", "LEARNING OBJECTIVES:",
          "MATHEMATICAL BACKGROUND:", "IMPLEMENTATION NOTES:")


@pytest.mark.parametrize("number", NUMBERS)
def test_import_runs_nothing(number, tmp_path, monkeypatch):
    """Importing a chapter creates no output: all work happens in main()."""
    monkeypatch.chdir(tmp_path)
    path = load_module(number).__file__
    name = f"fresh_import_{number}"
    spec = importlib.util.spec_from_file_location(name, path)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, fresh)  # dataclasses look their module up
    spec.loader.exec_module(fresh)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("number", NUMBERS)
def test_unknown_flag_is_a_one_line_error(number, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        load_module(number).main(["--quikc", "--outdir", str(tmp_path)])
    assert info.value.code == 2 and "unrecognized arguments: --quikc" in capsys.readouterr().err


@pytest.mark.parametrize("number", NUMBERS)
def test_chapter_follows_the_conventions(number):
    """Title-page header, percent cells, >= 4 exercises, each with a reference solution."""
    module = load_module(number)
    text = open(module.__file__).read()
    missing = [h for h in HEADER if h not in text[:6000]]
    assert not missing, f"header lacks {missing}"
    assert "# %% [markdown]" in text and re.search(r"^# %%$", text, re.M)
    for section in range(1, 6):
        assert f"# # Section {section}" in text, f"no Section {section} heading"
    names = [name for name, _ in list_exercises(vars(module))]
    assert len(names) >= 4, names
    solutions = load_solutions(number)
    assert all(hasattr(solutions, name) for name in names)
