"""Checks every chapter must pass, run once for each NN_*.py file in the repository root.

Chapter-specific tests live in tests/test_NN_*.py; what is the same for every chapter lives
here, so a new chapter gets these checks without copying them.
"""

import importlib.util
import inspect
import re
import sys
from types import ModuleType

import pytest

from common.exercises import list_exercises
from common.modules import ROOT, load_module, load_solutions

NUMBERS = sorted(p.name[:2] for p in ROOT.glob("[0-9][0-9]_*.py"))
# Each chapter's case carries its chNN marker, so `pytest -m ch03` runs these checks for 03 too.
CHAPTERS = [pytest.param(n, id=n, marks=getattr(pytest.mark, f"ch{n}")) for n in NUMBERS]
HEADER = ("FILE:", "DIFFICULTY:", "ESTIMATED TIME:", "PREREQUISITES:", "LEARNING OBJECTIVES:",
          "MATHEMATICAL BACKGROUND:", "IMPLEMENTATION NOTES:")


@pytest.mark.parametrize("number", CHAPTERS)
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


@pytest.mark.parametrize("number", CHAPTERS)
def test_chapter_follows_the_conventions(number):
    """Title-page header, percent cells, >= 4 exercises, each with a reference solution."""
    module = load_module(number)
    text = open(module.__file__).read()
    missing = [h for h in HEADER if h not in text[:6000]]
    assert not missing, f"header lacks {missing}"
    assert "# %% [markdown]" in text and re.search(r"^# %%$", text, re.M)
    problems = cell_problems(text)
    assert not problems, "\n".join(problems)
    for section in range(1, 6):
        assert f"# # Section {section}" in text, f"no Section {section} heading"
    names = [name for name, _ in list_exercises(vars(module))]
    assert len(names) >= 4, names
    solutions = load_solutions(number)
    assert all(hasattr(solutions, name) for name in names)


# Percent-cell markers a chapter may use. The two tagged kinds exist on one side only (jupytext):
# notebook-only cells are comments in the script, script-only cells are inert in the notebook.
NOTEBOOK_ONLY, SCRIPT_ONLY = '# %% tags=["active-ipynb"]', '# %% tags=["active-py"]'
CELL_MARKERS = ("# %%", "# %% [markdown]", NOTEBOOK_ONLY, SCRIPT_ONLY)


def cell_problems(text: str) -> list[str]:
    """What is wrong with a chapter's cells: an unknown marker; a notebook-only cell with a line
    that is not a comment (the script would run it); no notebook-only cell (nothing runs the
    demos in a notebook); an `if __name__ == "__main__"` outside a script-only cell (a kernel's
    __name__ is "__main__": the notebook would rerun the whole default program)."""
    cells, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("# %%"):
            cells.append((line.rstrip(), number, []))
            if line.rstrip() not in CELL_MARKERS:
                problems.append(f"line {number}: unknown cell marker {line!r}")
        elif cells:
            cells[-1][2].append(line)
    notebook_only = [(start, body) for marker, start, body in cells if marker == NOTEBOOK_ONLY]
    if not notebook_only:
        problems.append(f"no notebook-only cell ({NOTEBOOK_ONLY}) runs the demos")
    for start, body in notebook_only:
        if any(line.strip() and not line.startswith("#") for line in body):
            problems.append(f"line {start}: a notebook-only cell has a line that is not a comment")
    for marker, start, body in cells:
        if any(line.startswith("if __name__ ==") for line in body) and marker != SCRIPT_ONLY:
            problems.append(f"line {start}: `if __name__ == ...` outside a {SCRIPT_ONLY} cell")
    return problems


def test_cell_check_can_fail():
    good = f'"""Doc."""\n\n# %%\nx = 1\n\n{NOTEBOOK_ONLY}\n# run = 1\n\n{SCRIPT_ONLY}\n' \
        'if __name__ == "__main__":\n    main()\n'
    assert cell_problems(good) == []
    live = good.replace("# run = 1", "run = 1")
    assert cell_problems(live) == ["line 6: a notebook-only cell has a line that is not a comment"]
    plain_main = good.replace(SCRIPT_ONLY, "# %%")
    assert cell_problems(plain_main) == [f"line 9: `if __name__ == ...` outside a {SCRIPT_ONLY} "
                                         "cell"]
    no_demos = good.replace(NOTEBOOK_ONLY, "# %% [markdown]")
    assert cell_problems(no_demos) == [f"no notebook-only cell ({NOTEBOOK_ONLY}) runs the demos"]
    assert cell_problems(good.replace("# %%\nx", "# %% [md]\nx")) == [
        "line 3: unknown cell marker '# %% [md]'"]


# -- One name, one contract ----------------------------------------------------------------------
# Names every chapter defines for itself *as a script*: its settings, its command line, its entry
# point, its summary table and its demonstration steps. They are allowed to differ from chapter to
# chapter because no chapter uses another's (test_no_chapter_uses_another_chapters_script_steps).
SCRIPT_STEPS = {"Config", "main", "make_parser", "summary_rows"}


def is_script_step(name: str) -> bool:
    return name in SCRIPT_STEPS or name.startswith("demo_")


def public_objects(module: ModuleType) -> dict:
    """The public functions and classes a chapter defines or imports, by name."""
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))}


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(signature unavailable)"


def name_clashes(modules: dict[str, ModuleType]) -> list[str]:
    """One line per public name that two chapters bind to different objects.

    The same object under the same name (a re-export, or a helper imported from common/) is
    fine; two definitions are not, even with equal signatures (`mixture_2d()` once meant two
    different data sets), because a learner or a later chapter cannot tell which one they get.
    """
    by_name: dict[str, list[tuple[str, object]]] = {}
    for number, module in modules.items():
        for name, obj in public_objects(module).items():
            if not is_script_step(name):
                by_name.setdefault(name, []).append((number, obj))
    clashes = []
    for name, defs in sorted(by_name.items()):
        if len({id(obj) for _, obj in defs}) > 1:
            where = "; ".join(f"{number}: {name}{_signature(obj)}" for number, obj in defs)
            clashes.append(f"{name} -> {where}")
    return clashes


def test_one_name_one_contract():
    """No two chapters define the same public function or class name differently."""
    clashes = name_clashes({n: load_module(n) for n in NUMBERS})
    assert not clashes, ("the same public name means different things in different chapters; "
                         "give each contract its own name, or import the one definition:\n  "
                         + "\n  ".join(clashes))


def test_name_clash_check_can_fail():
    """The check flags two definitions under one name (different or equal signatures) and lets a
    re-export, a private helper and the script steps through."""
    def shared(x):
        return x

    def make(number, **names):
        module = ModuleType(f"fake{number}")
        vars(module).update(names)
        return module

    a = make("01", dsm_loss=lambda score_fn, x, sigma: 0, mixture_2d=lambda: 1, shared=shared,
             _private=lambda: 0, Config=type("Config", (), {}), demo_fields=lambda run: 0)
    b = make("02", dsm_loss=lambda score_fn, sde, x0: 0, mixture_2d=lambda: 2, shared=shared,
             _private=lambda y: 0, Config=type("Config", (), {"x": 1}), demo_fields=lambda: 0)
    clashes = name_clashes({"01": a, "02": b})
    assert [c.split(" ->")[0] for c in clashes] == ["dsm_loss", "mixture_2d"], clashes
    assert "(score_fn, x, sigma)" in clashes[0] and "(score_fn, sde, x0)" in clashes[0]


def test_no_chapter_uses_another_chapters_script_steps():
    """What SCRIPT_STEPS exempts from the name check stays private to its chapter in practice."""
    for path in sorted(ROOT.glob("[0-9][0-9]_*.py")):
        text = path.read_text()
        aliases = re.findall(r"(\w+)\s*=\s*load_module\(", text)
        # A chapter that runs an earlier chapter's model needs that chapter's Config (10 loads
        # and, if missing, trains 09's model); it then names its own settings differently.
        own_config = re.search(r"^class Config\b", text, re.M) is not None
        for alias in aliases:
            used = re.findall(rf"\b{alias}\.(\w+)", text)
            bad = sorted({name for name in used if is_script_step(name)
                          and not (name == "Config" and not own_config)})
            assert not bad, f"{path.name} uses another chapter's script steps {bad} via {alias}"


@pytest.mark.parametrize("number", CHAPTERS)
def test_exercise_checks_are_complete_and_selectable(number):
    """Every chapter's exercise tests guard that each exercise has a check; the command the
    chapter gives learners, `-k your_answer`, can select only `test_your_answer` there (no other
    test of that file has "your_answer" in its name); the chapter prints that command."""
    path = ROOT / "tests" / f"test_{number}_exercises.py"
    text = path.read_text()
    assert "test_every_exercise_in_the_module_is_checked" in text, path.name
    assert set(re.findall(r"\w*your_answer\w*", text)) == {"test_your_answer"}, path.name
    if number != "09":  # 09's text is left as it is (it names the command in its Section 5)
        source = open(load_module(number).__file__).read()
        assert f"pytest tests/test_{number}_exercises.py -k your_answer" in source


@pytest.mark.ch03
def test_learner_command_runs_only_the_learners_checks():
    """The command chapter 03 prints, run for real: only test_your_answer cases are collected."""
    import subprocess

    path = ROOT / "tests" / "test_03_exercises.py"
    out = subprocess.run([sys.executable, "-m", "pytest", str(path), "-k", "your_answer",
                          "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    names = sorted(name for name, _ in list_exercises(vars(load_module("03"))))
    selected = sorted(re.findall(r"::test_your_answer\[(\w+)\]", out))
    others = [line for line in out.splitlines()
              if "::" in line and "::test_your_answer[" not in line]
    assert selected == names and not others, out
