"""The notebook route: each chapter as a Jupyter notebook, its title page as a markdown cell.

A chapter is a percent-cell script (``# %%``), which jupytext reads as a notebook. Two kinds of
cells exist for one side only (jupytext's cell tags):

- ``# %% tags=["active-ipynb"]``: a notebook-only cell, commented out in the script. The chapters
  use them to run each demo right after the cell that defines it, at ``--quick`` sizes while the
  notebook's ``QUICK = True``.
- ``# %% tags=["active-py"]``: a script-only cell (a raw, inert cell in the notebook): the
  ``if __name__ == "__main__": main()`` that would otherwise run the whole program again.

jupytext puts a module docstring in a code cell; the chapters need theirs as ``__doc__`` (for
``--help`` and the tests), so the script keeps it and this converter turns it into a markdown
cell instead::

    python -m common.notebook 01          # writes 01_score_functions_basics.ipynb
    python -m common.notebook all         # every chapter
    python -m common.notebook 09 --outdir /tmp/nb

The notebooks are written beside the scripts (and git-ignored), so that a notebook's kernel
starts in the repository root, where ``common/``, ``outputs/``, ``data/`` and ``checkpoints/``
are. Needs the optional extras: ``pip install -r requirements-notebooks.txt``.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import sys
import textwrap
from pathlib import Path

from common.modules import ROOT

EXTRAS = "pip install -r requirements-notebooks.txt"
# Extra command-line flags for a notebook's run, e.g. "--device cuda" or (the tests)
# "--outdir /tmp/x --threads 1".
FLAGS_VARIABLE = "SBGM_NOTEBOOK_ARGS"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


# -- Inside a notebook -----------------------------------------------------------------------------
def notebook_flags(quick: bool) -> list[str]:
    """The flags of a notebook's run: ``--quick`` if ``quick``, then $SBGM_NOTEBOOK_ARGS."""
    return (["--quick"] if quick else []) + shlex.split(os.environ.get(FLAGS_VARIABLE, ""))


def notebook_run(parser: argparse.ArgumentParser, module_name: str, quick: bool = True):
    """What ``main()`` starts with, for a notebook: the chapter's ``Run`` with ``notebook_flags``.

    A bad flag in $SBGM_NOTEBOOK_ARGS stops the cell with argparse's one-line message.
    """
    from common.cli import start_run

    return start_run(parser, module_name, notebook_flags(quick))


# -- The title page as markdown --------------------------------------------------------------------
HEADING = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")  # "LEARNING OBJECTIVES:", "Run:", "References:"
FIELD = re.compile(r"^([A-Z][A-Z ]*):\s+(\S.*)$")  # "DIFFICULTY: Beginner"


def docstring_to_markdown(doc: str, title: str) -> str:
    """The module docstring as markdown: a title, the header fields as a list, one ``##`` heading
    per section. A section whose text is aligned in columns (the plain-text equations, the run
    commands) goes into a code block, where the alignment survives; the others (bullet lists)
    are markdown already.
    """
    fields, sections = _split_title_page(doc)
    parts = [f"# {title}", "\n".join(f"- **{key.capitalize()}:** {value}"
                                     for key, value in fields)]
    for heading, body in sections:
        text = "\n".join(body).strip("\n")
        if _is_aligned(body):
            text = f"```text\n{textwrap.dedent(text)}\n```"
        parts.append(f"## {heading.capitalize()}\n\n{text}")
    return "\n\n".join(p for p in parts if p.strip())


def _split_title_page(doc: str) -> tuple[list[tuple[str, str]], list[tuple[str, list[str]]]]:
    """(header fields as (key, value), sections as (heading, body lines))."""
    fields: list[tuple[str, str]] = []
    sections: list[tuple[str, list[str]]] = []
    for line in doc.strip("\n").splitlines():
        heading, field = HEADING.match(line), FIELD.match(line)
        if heading:
            sections.append((heading.group(1), []))
        elif sections:
            sections[-1][1].append(line)
        elif field:
            fields.append((field.group(1), field.group(2)))
        elif line.strip() and fields:  # an indented continuation of the last field
            key, value = fields[-1]
            fields[-1] = (key, f"{value} {line.strip()}")
    return fields, sections


def _is_aligned(lines: list[str]) -> bool:
    """True if a line is indented by 4+ spaces or has a gap of 3+ spaces inside its text."""
    return any(re.match(r"^ {4}", line) or re.search(r"\S {3,}\S", line) for line in lines)


def chapter_title(path: Path) -> str:
    """'01_score_functions_basics.py' -> 'Chapter 01: Score functions basics'."""
    number, _, name = path.stem.partition("_")
    return f"Chapter {number}: {name.replace('_', ' ').capitalize()}"


def _docstring_of(source: str) -> str | None:
    """The string if ``source`` is nothing but a string literal (a docstring), else None."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return None
    only = body[0] if len(body) == 1 else None
    if isinstance(only, ast.Expr) and isinstance(only.value, ast.Constant) \
            and isinstance(only.value.value, str):
        return only.value.value
    return None


# -- Conversion ------------------------------------------------------------------------------------
def to_notebook(path: str | Path):
    """Read a chapter with jupytext and return the notebook (an ``nbformat`` node), with the
    leading docstring-only code cell turned into a markdown cell."""
    import jupytext
    import nbformat

    path = Path(path)
    nb = jupytext.read(path)
    first = nb.cells[0] if nb.cells else None
    doc = _docstring_of(first.source) if first is not None and first.cell_type == "code" else None
    if doc is not None:
        nb.cells[0] = nbformat.v4.new_markdown_cell(docstring_to_markdown(doc, chapter_title(path)))
    for cell in nb.cells:
        # Keep the tags (active-ipynb / active-py); drop jupytext's layout hints.
        cell.metadata = {"tags": cell.metadata["tags"]} if "tags" in cell.metadata else {}
    # A plain notebook, not paired with the script: saving it never rewrites the chapter.
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    return nb


def chapter_path(number: str) -> Path:
    """The chapter file of a two-digit number; ValueError naming the choices if there is none."""
    matches = sorted(ROOT.glob(f"{number}_*.py")) if re.fullmatch(r"\d\d", number) else []
    if not matches:
        choices = ", ".join(p.name[:2] for p in chapters())
        raise ValueError(f"no chapter {number!r}: choose one of {choices}, or all")
    return matches[0]


def chapters() -> list[Path]:
    return sorted(ROOT.glob("[0-9][0-9]_*.py"))


def convert(number: str, outdir: str | Path = ROOT) -> Path:
    """Write chapter ``number`` as ``outdir/NN_name.ipynb`` and return the path."""
    import nbformat

    path = chapter_path(number)
    target = Path(outdir) / f"{path.stem}.ipynb"
    nbformat.write(to_notebook(path), target)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.notebook",
        description="Write chapters as Jupyter notebooks (title page as markdown).")
    parser.add_argument("chapters", nargs="+", metavar="NN", help="chapter numbers, or all")
    parser.add_argument("--outdir", type=Path, default=ROOT,
                        help="where to write the .ipynb files (default: the repository root, "
                             "so the kernel finds common/)")
    args = parser.parse_args(argv)
    try:
        import jupytext  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError as err:
        parser.exit(1, f"error: {err.name} is missing: {EXTRAS}\n")
    numbers = [p.name[:2] for p in chapters()] if "all" in args.chapters else args.chapters
    try:
        paths = [chapter_path(n) for n in numbers]
    except ValueError as err:
        parser.error(str(err))
    if not args.outdir.is_dir():
        parser.error(f"argument --outdir: {args.outdir} is not a folder")
    for path in paths:
        print(convert(path.name[:2], args.outdir))
    if args.outdir.resolve() != ROOT:
        print(f"Note: start Jupyter so that the kernel finds common/ (e.g. PYTHONPATH={ROOT}).",
              file=sys.stderr)


if __name__ == "__main__":
    main()
