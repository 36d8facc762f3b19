"""The notebook route: every chapter converts to a notebook whose first cell is its title page in
markdown, and runs headless cell by cell at --quick sizes with its figures inline and saved.

Needs the optional extras of requirements-notebooks.txt (jupytext, nbclient, ipykernel); without
them this file is skipped with that reason. Chapters 09 and 10 also need real MNIST
($SBGM_DATA_DIR), like their other tests.
"""

import re
import sys

import pytest

from common import notebook
from common.modules import ROOT, load_module
from common.notebook import chapter_path, chapters, to_notebook

REASON = "the notebook route needs the optional extras: pip install -r requirements-notebooks.txt"
jupytext = pytest.importorskip("jupytext", reason=REASON)
nbformat = pytest.importorskip("nbformat", reason=REASON)
nbclient = pytest.importorskip("nbclient", reason=REASON)
pytest.importorskip("ipykernel", reason=REASON)  # provides the "python3" kernel

NUMBERS = [p.name[:2] for p in chapters()]
CHAPTERS = [pytest.param(n, id=n, marks=getattr(pytest.mark, f"ch{n}")) for n in NUMBERS]
NEEDS_MNIST = {"09", "10"}


@pytest.fixture(autouse=True)
def kernel_picks_its_own_backend(monkeypatch):
    """Kernels inherit the environment: CI's MPLBACKEND=Agg (set for headless test runs) would
    override the inline backend a real Jupyter session starts with, and hide every figure."""
    monkeypatch.delenv("MPLBACKEND", raising=False)


def execute(nb, cwd=ROOT, timeout: int = 600):
    """Run every cell of ``nb`` in a fresh python3 kernel started in ``cwd``; stop at the first
    cell that raises (its error output stays in the notebook for :func:`cell_errors`)."""
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError:
        pass
    return nb


def cell_errors(nb) -> list[str]:
    """One line per cell that raised: its number (1-based, as in the notebook), first line and
    the exception."""
    return [f"cell {i} ({cell.source.splitlines()[0] if cell.source else ''}): "
            f"{out.ename}: {out.evalue}"
            for i, cell in enumerate(nb.cells, start=1) if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.output_type == "error"]


def inline_images(nb) -> int:
    return sum("image/png" in out.get("data", {})
               for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


# -- conversion ---------------------------------------------------------------------------------
@pytest.mark.parametrize("number", CHAPTERS)
def test_title_page_is_markdown_and_the_script_entry_point_does_not_run(number):
    """The docstring becomes the first, markdown cell (the script keeps it as __doc__); the
    `if __name__ == "__main__"` cell is not a code cell of the notebook (a kernel's __name__ is
    "__main__", so it would rerun the whole default program); demo cells exist."""
    nb = to_notebook(chapter_path(number))
    first = nb.cells[0]
    assert first.cell_type == "markdown", first.source[:200]
    for part in (f"# Chapter {number}:", "## Learning objectives", "## Mathematical background",
                 "```text"):
        assert part in first.source, f"title page lacks {part!r}:\n{first.source[:500]}"
    assert "LEARNING OBJECTIVES:" in load_module(number).__doc__  # the script's docstring stays
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [c.source for c in code if "__main__" in c.source]
    assert sum("active-ipynb" in c.metadata.get("tags", []) for c in code) >= 2


def test_title_page_keeps_aligned_sections_in_a_code_block():
    doc = """
FILE: 99_x.py
DIFFICULTY: Beginner
PREREQUISITES: one,
               two

LEARNING OBJECTIVES:
- Learn a thing,
  and another.

MATHEMATICAL BACKGROUND:
- Score:     s(x) = grad log p(x)
"""
    md = notebook.docstring_to_markdown(doc, "Chapter 99: X")
    assert md.startswith("# Chapter 99: X\n")
    assert "- **Prerequisites:** one, two" in md
    objectives = md.split("## Learning objectives")[1].split("##")[0]
    assert "```" not in objectives and "- Learn a thing,\n  and another." in objectives
    assert "```text\n- Score:     s(x) = grad log p(x)\n```" in md


def test_converter_command_line(tmp_path, capsys):
    notebook.main(["01", "--outdir", str(tmp_path)])
    written = tmp_path / "01_score_functions_basics.ipynb"
    assert nbformat.read(written, as_version=4).cells[0].cell_type == "markdown"
    with pytest.raises(SystemExit) as info:
        notebook.main(["99"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no chapter '99': choose one of 01," in err


# -- execution ------------------------------------------------------------------------------------
def test_a_raising_cell_is_reported_by_number_and_the_run_stops_there():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_markdown_cell("text"),
                                         nbformat.v4.new_code_cell("raise ValueError('boom')"),
                                         nbformat.v4.new_code_cell("never = 1")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    errors = cell_errors(execute(nb, timeout=60))
    assert errors == ["cell 3 (raise ValueError('boom')): ValueError: boom"]
    assert not nb.cells[3].get("outputs") and nb.cells[3].get("execution_count") is None


def test_a_learners_own_plot_still_shows_inline_after_a_chapter_set_up_matplotlib():
    """setup_matplotlib (called by every chapter's start_run) keeps the kernel's inline backend:
    switching to Agg would hide every later figure for as long as the kernel runs."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from common.plotting import setup_matplotlib\n"
        "setup_matplotlib(show=False, draft=True)\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([0, 1], [1, 0]);")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    execute(nb, timeout=60)
    assert not cell_errors(nb), cell_errors(nb)
    assert inline_images(nb) == 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One checkpoint folder for 09 and 10: chapter 10 reuses the model 09's notebook trained."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.mark.parametrize("number", CHAPTERS)
def test_notebook_runs_cell_by_cell_with_figures_inline_and_saved(number, tmp_path, monkeypatch,
                                                                  checkpoints, request):
    if number in NEEDS_MNIST:
        request.getfixturevalue("real_mnist_root")  # skips, saying why, without real MNIST
    flags = f"--outdir {tmp_path} --threads 1"
    if number in NEEDS_MNIST:
        flags += f" --checkpoint-dir {checkpoints}"
    monkeypatch.setenv(notebook.FLAGS_VARIABLE, flags)  # the kernel inherits the environment
    nb = execute(to_notebook(chapter_path(number)))
    errors = cell_errors(nb)
    assert not errors, f"chapter {number}'s notebook raised:\n  " + "\n  ".join(errors)
    saved = list((tmp_path / chapter_path(number).stem).glob("*.png"))
    assert saved, f"no PNG saved under {tmp_path}"
    shown = inline_images(nb)
    assert shown >= len(saved), f"{len(saved)} figures saved but only {shown} shown inline"
    quick = [c for c in nb.cells if re.search(r"^QUICK = True$", c.source, re.M)]
    assert len(quick) == 1, "one cell sets QUICK"


def test_converter_without_the_extras_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jupytext", None)  # as if not installed
    with pytest.raises(SystemExit) as info:
        notebook.main(["01"])
    assert info.value.code == 1
    assert capsys.readouterr().err == f"error: jupytext is missing: {notebook.EXTRAS}\n"
