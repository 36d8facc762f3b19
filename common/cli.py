"""The command line every module shares.

Every module accepts the same flags::

    --quick          a smoke run with tiny sizes, 5-15 s (used by the tests)
    --device D       auto | cpu | cuda | mps  (auto: cuda, then mps, then cpu)
    --seed N         random seed (default 0)
    --outdir DIR     where figures go; each module writes to DIR/<module name>/ (default outputs/)
    --show           also open figure windows (default: save PNGs only, safe without a display)
    --data-dir DIR   data root for image data sets (default: $SBGM_DATA_DIR, else ./data)
    --deterministic  ask torch for deterministic kernels
    --threads N      CPU threads for torch (default 1: fastest for the small tensors of 2D
                     examples; the image modules default to all cores)

A module adds its own flags to the parser from :func:`make_parser` and then calls
:func:`start_run`, which validates, seeds, picks the device and prepares the output folder.
The ``positive_int``-style functions below are argparse ``type=`` validators: a bad value stops
the program with one line saying which flag was wrong and why.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.device import DEVICE_CHOICES, pick_device
from common.seeding import seed_everything


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = _parse(text, int, "an integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def int_at_least(minimum: int):
    """argparse type factory: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        value = _parse(text, int, "an integer")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _parse(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = _parse(text, float, "a number")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = _parse(text, float, "a number")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a non-negative finite number, got {text}")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = _parse(text, float, "a number")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _parse(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def make_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` that already has the shared flags; add module flags to it."""
    parser = argparse.ArgumentParser(description=description)
    shared = parser.add_argument_group("flags shared by every module")
    shared.add_argument("--quick", action="store_true",
                        help="smoke run: tiny sizes, 5-15 s; numbers are not meaningful")
    shared.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where to run (default: auto = cuda, then mps, then cpu)")
    shared.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    shared.add_argument("--outdir", type=Path, default=Path("outputs"),
                        help="figure folder; each module writes to OUTDIR/<module name>/ "
                             "(default: outputs)")
    shared.add_argument("--show", action="store_true", help="open figure windows as well")
    shared.add_argument(
        "--data-dir", type=Path, default=None,
        help="data root for image data sets (default: $SBGM_DATA_DIR, else ./data)",
    )
    shared.add_argument("--deterministic", action="store_true", help="deterministic kernels")
    shared.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads for torch (default: 1; for 2D examples more threads "
                             "only add synchronisation overhead)")
    return parser


@dataclass
class Run:
    """What a module needs once its flags are parsed.

    ``outdir`` is ``<--outdir>/<module name>``; ``save(fig, name)`` writes a figure there and
    remembers it, so the closing summary can list every file the run produced.
    """

    args: argparse.Namespace
    device: torch.device
    generator: torch.Generator
    outdir: Path
    figures: list[Path] = field(default_factory=list)

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    def save(self, fig, name: str) -> Path:
        from common.plotting import save_figure

        path = save_figure(fig, self.outdir, name, show=self.args.show)
        self.figures.append(path)
        return path

    def finish(self, rows, namespace: dict, number: str, title: str = "What this run measured"):
        """Print the summary table, the figures written, and the exercises (a module's last lines).

        ``rows`` are ``(quantity, measured, expected)`` triples; ``namespace`` is the module's
        ``globals()`` (to find its ``exercise_*`` functions).
        """
        from common.exercises import print_exercises

        print_table(title, rows)
        print(f"\nFigures ({len(self.figures)}) in {self.outdir}/:")
        for path in self.figures:
            print(f"  {path.name}")
        self.write_summary(rows)
        print_exercises(namespace, number)

    def write_summary(self, rows) -> Path:
        """Write the rows and the figure names to ``outdir/summary.json`` and return its path.

        Tools that run many modules (``python -m common.course``) read this file instead of
        parsing the printed table. Cells are strings, exactly as the table prints them.
        """
        import json

        summary = {"rows": [[str(cell) for cell in row] for row in rows],
                   "figures": [path.name for path in self.figures]}
        path = self.outdir / "summary.json"
        path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def print_table(title: str, rows,
                header=("quantity", "measured", "expected / reference")) -> None:
    """Print rows as an aligned plain-text table: by default ``(quantity, measured, expected)``
    triples; with ``header`` any number of columns, one per header entry."""
    cells = [tuple(header)] + [tuple(str(c) for c in row) for row in rows]
    if any(len(row) != len(header) for row in cells):
        raise ValueError(f"every row needs {len(header)} cells, one per header entry")
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}\n{line}")
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print(line)
    print(line)


def in_notebook() -> bool:
    """True inside a Jupyter (IPython kernel) session, where figures can show inline."""
    return "ipykernel" in sys.modules


def start_run(parser: argparse.ArgumentParser, module_name: str, argv=None) -> Run:
    """Parse ``argv`` (default: ``sys.argv``), seed everything, pick the device, set up figures.

    Errors in the flags (unknown flag, bad value, unavailable device) exit with argparse's usage
    message and a one-line reason, never a traceback. Inside a Jupyter kernel ``argv`` defaults
    to no flags, so the file also runs cell by cell as a notebook.
    """
    from common.plotting import setup_matplotlib

    if argv is None and in_notebook():
        argv = []  # a notebook kernel's own argv is not ours to parse
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
    except RuntimeError as err:
        parser.error(str(err))
    # Small tensors gain nothing from several threads, and on a busy machine threads that wait
    # for each other can make every operation tens of times slower.
    torch.set_num_threads(args.threads)
    generator = seed_everything(args.seed, deterministic=args.deterministic)
    setup_matplotlib(show=args.show, draft=args.quick)
    outdir = Path(args.outdir) / module_name
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"argument --outdir: cannot create {outdir}: {err.strerror}")
    return Run(args=args, device=device, generator=generator, outdir=outdir)
