"""The command line every module shares.

Every module accepts the same flags::

    --quick          a smoke run with tiny sizes, 5-15 s (09: about 25 s; used by the tests)
    --device D       auto | cpu | cuda | mps  (auto: cuda, then mps, then cpu)
    --seed N         random seed, 0 .. 2**64 - 1 (default 0)
    --outdir DIR     where figures go; each module writes to DIR/<module name>/ (default outputs/)
    --show           also open figure windows (default: save PNGs only, safe without a display)
    --data-dir DIR   data root for image data sets (default: $SBGM_DATA_DIR, else ./data)
    --deterministic  ask torch for deterministic kernels
    --threads N      CPU threads for torch, 1 .. 1024 (default 1: fastest for the small
                     tensors of 2D examples; the image modules default to all cores)

A module adds its own flags to the parser from :func:`make_parser`, each numeric one with its
allowed range (:class:`Count`, :class:`Real`), and then calls :func:`start_run`, which checks
the flags (an optional ``validate`` for checks involving two flags), seeds, picks the device and
only then creates the output folder. A bad value stops the program with one line naming the flag
and its allowed range, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from common.device import DEVICE_CHOICES, pick_device
from common.seeding import seed_everything

# -- allowed ranges ------------------------------------------------------------------------------
# A flag's argparse ``type=`` is one of the two classes below: it parses the text, checks the
# value against the flag's allowed range and stops the program with one line naming both when it
# is outside. A size flag also says what one unit costs (bytes held, CPU seconds), so a value that
# cannot fit in this machine's memory is refused with the estimate, one that would run for weeks
# is refused as a typo, and one that would run for hours gets a warning before the run starts
# (:func:`warn_if_slow`): a user may mean it.

HOUR = 3600.0
WARN_SECONDS = 1 * HOUR  # an estimate above this prints one warning line before the run
REFUSE_SECONDS = 1000 * HOUR  # six weeks of CPU: not a run anyone means, so a typo
SEED_MAX = 2**64 - 1  # torch.manual_seed accepts 0 .. 2**64 - 1
# More threads than cores only wait for each other, and torch.set_num_threads crashes the
# process at exit for very large counts: 1024 is above any CPU this course runs on.
MAX_THREADS = 1024
INT64_MAX = 2**63 - 1  # the largest size a torch tensor dimension (int64) can hold


@functools.cache
def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (None where the OS does not say, e.g. Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: float) -> str:
    """1.5e10 -> '15 GB' (decimal units, three significant digits)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """A duration for reading: '45 s', '12 min', '3.2 h', '1,200,000 h'."""
    if seconds < 60:
        return f"{seconds:.2g} s"
    if seconds < HOUR:
        return f"{seconds / 60:.0f} min"
    hours = seconds / HOUR
    return f"{hours:.2g} h" if hours < 100 else f"{hours:,.0f} h"


def _plural(unit: str, n) -> str:
    return unit if n == 1 or unit.endswith("s") else unit + "s"


def _too_slow(text: str, value: float, seconds_each: float, unit: str) -> str:
    """The reason a value is refused for time: ': 1e12 steps would take about ... h ...'."""
    return (f": {text} {_plural(unit, value)} would take about "
            f"{format_duration(value * seconds_each)} of CPU time at "
            f"~{format_duration(seconds_each)} per {unit}")


@dataclass(frozen=True)
class Count:
    """argparse type: an integer in [low, high]; "1e6" is accepted for 1000000.

    ``bytes_each``: memory a run holds per unit of the flag (for example samples x dimension x
    8 bytes x the copies the code keeps, per sample); the largest allowed value is what fits in
    this machine's memory. ``seconds_each``: rough CPU time per unit, measured on a 2-core laptop
    at the module's default sizes; values past REFUSE_SECONDS are refused, past WARN_SECONDS
    warned about (:func:`warn_if_slow`). ``unit`` names one unit in the messages; ``why`` says
    where a fixed ``high`` comes from.
    """

    low: int = 1
    high: int = INT64_MAX
    bytes_each: float = 0.0
    seconds_each: float = 0.0
    unit: str = "unit"
    why: str = ""

    def upper(self) -> int:
        """The largest value allowed on this machine: ``high``, memory and time permitting."""
        limits = [self.high]
        memory = machine_memory()
        if self.bytes_each and memory:
            limits.append(int(memory // self.bytes_each))
        if self.seconds_each:
            limits.append(int(REFUSE_SECONDS // self.seconds_each))
        return max(self.low, min(limits))

    def describe(self) -> str:
        """The allowed range, as the error messages and --help say it."""
        return f"an integer from {self.low:,} to {self.upper():,}"

    def parse(self, text: str):
        try:
            return int(text)
        except ValueError:
            pass
        try:  # scientific notation for integers: 1e6, 2.5e3
            value = Decimal(text)
        except (InvalidOperation, ValueError):
            value = None
        if value is None or not value.is_finite() or value != value.to_integral_value():
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return int(value)

    def __call__(self, text: str):
        value = self.parse(text)
        if self.low <= value <= self.upper():
            return value
        raise argparse.ArgumentTypeError(f"must be {self.describe()}{self._why(value, text)}")

    def _why(self, value: int, text: str) -> str:
        """Why ``value`` is refused: below the range, the fixed bound, the memory, or the time."""
        memory = machine_memory()
        units = f"{text} {_plural(self.unit, value)}"
        if value < self.low or (value > self.high and not self.why):
            return f", got {text}"
        if value > self.high:
            return f" ({self.why}), got {text}"
        if self.bytes_each and memory and value * self.bytes_each > memory:
            return (f": {units} would need about {format_bytes(value * self.bytes_each)} of "
                    f"memory and this machine has {format_bytes(memory)}")
        return _too_slow(text, value, self.seconds_each, self.unit)


class Seed(int):
    """A seed in [0, 2**64). Seeds derived from it (``seed + 1``, ``1000 * seed + j``) wrap around
    modulo 2**64 like torch's own seeds, so every value --seed accepts gives valid derived seeds
    (without this, --seed 18446744073709551615 would overflow at the first ``seed + 1``)."""

    def _wrap(self, value):
        return Seed(value % 2**64) if isinstance(value, int) else value

    def __add__(self, other):
        return self._wrap(int(self) + other)

    def __radd__(self, other):
        return self._wrap(other + int(self))

    def __sub__(self, other):
        return self._wrap(int(self) - other)

    def __mul__(self, other):
        return self._wrap(int(self) * other)

    def __rmul__(self, other):
        return self._wrap(other * int(self))


@dataclass(frozen=True)
class SeedCount(Count):
    """argparse type for --seed: a :class:`Seed` in [0, 2**64 - 1]."""

    def __call__(self, text: str) -> Seed:
        return Seed(super().__call__(text))


@dataclass(frozen=True)
class Real:
    """argparse type: a finite number in the interval from ``low`` to ``high`` (each end closed
    unless ``low_open`` / ``high_open``); NaN and infinities are refused. ``seconds_each`` and
    ``unit`` as for :class:`Count` (for flags such as a total simulated time)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    seconds_each: float = 0.0
    unit: str = "unit"
    why: str = ""

    def upper(self) -> float:
        """The largest value allowed: ``high``, or less where the run would last for weeks."""
        return min(self.high, REFUSE_SECONDS / self.seconds_each if self.seconds_each
                   else math.inf)

    def describe(self) -> str:
        """The allowed range, as the error messages say it."""
        high, high_open = self.upper(), self.high_open and self.upper() == self.high
        if high == math.inf:
            return f"a number {'>' if self.low_open else '>='} {self.low:g}"
        return (f"a number in {'(' if self.low_open else '['}{self.low:g}, {high:g}"
                f"{')' if high_open else ']'}")

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        over_high = value > self.high or (self.high_open and value == self.high)
        below = value < self.low or (self.low_open and value == self.low)
        if math.isfinite(value) and not below and not over_high and value <= self.upper():
            return value
        if not math.isfinite(value) or below:
            why = f", got {text}"
        elif over_high:
            why = f" ({self.why}), got {text}" if self.why else f", got {text}"
        else:
            why = _too_slow(text, value, self.seconds_each, self.unit)
        raise argparse.ArgumentTypeError(f"must be {self.describe()}{why}")


# The ranges most flags need, under the names the modules have always used.
positive_int = Count(1)
nonnegative_int = Count(0)
positive_float = Real(0, low_open=True)


def int_at_least(minimum: int) -> Count:
    """argparse type: an integer >= ``minimum``."""
    return Count(minimum)


def warn_if_slow(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """One warning line when the flags given would make a run of hours, else None.

    The estimate adds value x ``seconds_each`` over the flags that declare a cost; it is rough
    (default sizes, a 2-core laptop CPU) and only meant to catch a typo before an hour is lost.
    """
    parts, total = [], 0.0
    for action in parser._actions:
        cost = getattr(action.type, "seconds_each", 0.0)
        value = getattr(args, action.dest, None)
        if cost and isinstance(value, (int, float)):
            total += value * cost
            parts.append(f"{action.option_strings[-1]} {value:g}" if isinstance(value, float)
                         else f"{action.option_strings[-1]} {value}")
    if total <= WARN_SECONDS:
        return None
    return (f"warning: {' and '.join(parts)} would take about {format_duration(total)} of CPU "
            f"time (a rough estimate); Ctrl-C stops the run")


def make_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` that already has the shared flags; add module flags to it."""
    parser = argparse.ArgumentParser(description=description)
    shared = parser.add_argument_group("flags shared by every module")
    shared.add_argument("--quick", action="store_true",
                        help="smoke run: tiny sizes, 5-15 s (09: about 25 s); numbers are noise")
    shared.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where to run (default: auto = cuda, then mps, then cpu)")
    shared.add_argument("--seed", type=SeedCount(0, SEED_MAX, unit="seed"), default=0,
                        help="random seed, 0 to 2**64 - 1 (default: 0)")
    shared.add_argument("--outdir", type=Path, default=Path("outputs"),
                        help="figure folder; each module writes to OUTDIR/<module name>/ "
                             "(default: outputs)")
    shared.add_argument("--show", action="store_true", help="open figure windows as well")
    shared.add_argument(
        "--data-dir", type=Path, default=None,
        help="data root for image data sets (default: $SBGM_DATA_DIR, else ./data)",
    )
    shared.add_argument("--deterministic", action="store_true", help="deterministic kernels")
    shared.add_argument("--threads", type=Count(1, MAX_THREADS, unit="thread",
                                                why="more threads than cores only wait"),
                        default=1, help=f"CPU threads for torch, 1 to {MAX_THREADS} (default: 1 in "
                                        "the 2D chapters 01-08, where more threads only add "
                                        "synchronisation overhead; every core in the image "
                                        "chapters 09 and 10)")
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

        if self.quick:
            title += " (--quick: smoke-run sizes, so these numbers are noise, not results)"
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


TIMING_TAG = "[timing]"


class TimingRow(tuple):
    """A table row whose numbers are timings (or ratios and exponents of timings): they change
    from run to run, so :func:`print_table` tags the row with TIMING_TAG, which tells the reader
    and the determinism test (tests/test_determinism.py) alike."""


def timing_row(*cells) -> TimingRow:
    """``timing_row(quantity, measured, expected)``: a summary row of timings."""
    return TimingRow(cells)


def print_table(title: str, rows,
                header=("quantity", "measured", "expected / reference")) -> None:
    """Print rows as an aligned plain-text table: by default ``(quantity, measured, expected)``
    triples; with ``header`` any number of columns, one per header entry. A :class:`TimingRow`'s
    first cell ends with TIMING_TAG."""
    cells = [tuple(header)] + [
        (f"{row[0]} {TIMING_TAG}", *row[1:]) if isinstance(row, TimingRow) else row
        for row in rows]
    cells = [tuple(str(c) for c in row) for row in cells]
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
    """True inside a Jupyter (IPython kernel) session, where figures can show inline.

    Asks IPython for the running shell rather than looking for ``ipykernel`` among the imported
    modules: a program that merely imports it (pytest running the notebook tests, say) is not a
    kernel, and its output must not be treated as a notebook's.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def start_run(parser: argparse.ArgumentParser, module_name: str, argv=None,
              validate=None) -> Run:
    """Parse ``argv`` (default: ``sys.argv``), seed everything, pick the device, set up figures.

    Errors in the flags (unknown flag, a value outside its range, an unavailable device, or what
    ``validate(args)`` returns: None when the flags go together, else the problem as
    ``"argument --flag: ..."``) exit with argparse's usage message and a one-line reason, never
    a traceback, and before anything is written: the output folder is made last. A run that the
    flags make hours long prints a warning first (:func:`warn_if_slow`). Inside a Jupyter
    kernel ``argv`` defaults to no flags, so the file also runs cell by cell as a notebook.
    """
    from common.plotting import setup_matplotlib

    if argv is None and in_notebook():
        argv = []  # a notebook kernel's own argv is not ours to parse
    args = parser.parse_args(argv)
    problem = validate(args) if validate is not None else None
    if problem:
        parser.error(problem)
    try:
        device = pick_device(args.device)
    except RuntimeError as err:
        parser.error(f"argument --device: {err}")
    warning = warn_if_slow(parser, args)
    if warning:
        print(warning, file=sys.stderr)
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
