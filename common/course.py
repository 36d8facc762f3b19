"""Run the whole course, or part of it, in one command.

    python -m common.course --quick          # every chapter as a smoke run (a few minutes)
    python -m common.course 03-06            # chapters 03 to 06 with their default sizes
    python -m common.course 05 --seed 1      # one chapter; 01,03-04 also works

Each chapter runs as ``python NN_name.py <flags>`` in its own process, from the repository root,
with the flags every chapter shares (``--quick``, ``--seed``, ``--outdir``, ...; see
``common.cli.make_parser``) passed through as given. Its output goes to
``OUTDIR/course/NN_name.log`` (and to the terminal as well with ``--verbose``); the terminal
shows one line when a chapter starts and one when it ends. A chapter that fails is reported with
its error and its log, and the run goes on with the next one; Ctrl-C stops the running chapter
and still prints what ran. The closing table gives, per chapter, its status, wall time, CPU time
(where the platform reports it), the number of figures written and one or two key numbers from
its summary table (read from ``OUTDIR/NN_name/summary.json``, which ``Run.finish`` writes).

The exit status is 0 only when every chapter passed (1 otherwise, 130 after Ctrl-C, 2 for bad
arguments).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import cli
from common.modules import ROOT

# The one or two rows of each chapter's summary table that the closing table shows, as
# (start of the quantity text, short label). tests/test_course.py checks that every one of them
# still names a row, so renaming a row cannot silently empty the table.
KEY_ROWS = {
    "01": (("closed form vs autograd, 3-component mixture", "score vs autograd"),
           ("E_p[s s^T] entries (11, 12, 22), Gaussian", "E[s s^T]")),
    "02": (("Gaussian: min J_ISM vs -1/2 tr S^-1", "min J_ISM"),
           ("DSM - ESM: C_sigma at sigma", "DSM - ESM")),
    "03": (("chi-square p-value", "chi2 test"),
           ("mode weights recovered by ULA", "ULA weights")),
    "04": (("Tweedie (learned) - posterior mean", "Tweedie RMS"),
           ("Swiss roll sigma=", "Swiss roll SW")),
    "05": (("SSM/SSM-VR mean over", "SSM vs ISM"),
           ("time ratio ISM / SSM", "ISM/SSM time")),
    "06": (("excess, full: raw / EMA / slow EMA", "excess loss raw/EMA/slow"),),
    "07": (("weights: plain Langevin", "Langevin weights"),
           ("weights: annealed, learned NCSN", "annealed weights")),
    "08": (("ODE NFE, exact score / learned score", "ODE NFE"),
           ("final DSM loss", "DSM loss")),
    "09": (("final training loss", "loss"), ("bits/dim, ", "bits/dim")),
    "10": (("recommended: classifier-free guidance", "CFG as requested"),
           ("super-resolution", "super-res.")),
}

# Progress bars redraw a line with carriage returns: never "the error" of a failed chapter.
_PROGRESS_BAR = re.compile(r"\d+%\|")
# The line that states an error: argparse's and the chapters' "error: ...", or a traceback's last
# line ("ValueError: ..."). A chapter's own error message may run on for several lines (what to
# place where); its first line says what went wrong.
_ERROR_LINE = re.compile(r"(^|\s)error:|^[\w.]*(Error|Exception|Interrupt)\b")
_INTERRUPTED = 130  # the shell's exit status after Ctrl-C (128 + SIGINT)


@dataclass
class Result:
    """What one chapter's run left behind; ``status`` is passed, failed or interrupted."""

    name: str
    status: str
    seconds: float
    cpu_seconds: float | None
    log: Path
    figures: int | None = None
    key_numbers: str = ""
    key_rows: list = field(default_factory=list)  # (quantity, measured, expected) rows
    error: str = ""


def find_chapters(root: Path = ROOT) -> dict[str, Path]:
    """The chapter files ``NN_*.py`` in ``root``, by number: {"01": root/01_..., ...}."""
    return {path.name[:2]: path for path in sorted(root.glob("[0-9][0-9]_*.py"))}


def parse_which(text: str, available) -> list[str]:
    """Chapter numbers from ``all``, ``05``, ``3-6`` or a comma list of those, in order.

    Raises ValueError (one line) for anything ill-formed or naming a chapter that does not exist.
    """
    available = sorted(available)
    if text.strip().lower() == "all":
        return available
    chosen = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d{1,2})\s*(?:-\s*(\d{1,2})\s*)?", part)
        if not match:
            raise ValueError(f"cannot read {part.strip()!r}: use all, a number (05), a range "
                             f"(03-06) or a comma list (01,03-04)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        if last < first:
            raise ValueError(f"the range {part.strip()} runs backwards")
        for number in (f"{n:02d}" for n in range(first, last + 1)):
            if number not in available:
                raise ValueError(f"there is no chapter {number} (chapters: "
                                 f"{', '.join(available)})")
            if number not in chosen:
                chosen.append(number)
    return sorted(chosen)


def make_parser() -> argparse.ArgumentParser:
    """The chapters' own shared flags (common.cli.make_parser), plus WHICH and --verbose."""
    parser = cli.make_parser("Run the chapters in order, each in its own process, and "
                             "summarise what each measured.")
    parser.prog = "python -m common.course"
    parser.add_argument("which", nargs="?", default="all",
                        help="all (default), one chapter (05), a range (03-06) or a comma list "
                             "(01,03-04)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show each chapter's own output (it always goes to its log)")
    return parser


def explicit_shared_flags(argv: list[str], args: argparse.Namespace) -> list[str]:
    """The shared flags the user gave in ``argv``, validated (from ``args``), as a chapter's argv.

    Only flags given explicitly are passed on, so each chapter keeps its own defaults (chapters
    09 and 10 use every core unless told ``--threads``). Paths become absolute, because the
    chapters run from the repository root.
    """
    shared = cli.make_parser("")
    dests = vars(shared.parse_args([]))
    # argparse fills in a default only where the namespace lacks the attribute: a flag whose
    # value is still the placeholder afterwards was not on the command line.
    placeholder = object()
    given, _ = shared.parse_known_args(argv, argparse.Namespace(**dict.fromkeys(dests,
                                                                               placeholder)))
    flags = []
    for dest in dests:  # in the order the shared parser defines them
        if getattr(given, dest) is placeholder:
            continue
        value = getattr(args, dest)
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        else:
            flags += [flag, str(Path(value).resolve() if isinstance(value, Path) else value)]
    return flags


def last_error_line(stderr_tail: str) -> str:
    """The line that states a failed chapter's error: the last ``error: ...`` or
    ``SomeError: ...`` line it wrote to stderr, else its last line that is not a progress bar."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr_tail)]
    lines = [line for line in lines if line and not _PROGRESS_BAR.search(line)]
    stated = [line for line in lines if _ERROR_LINE.search(line)]
    return (stated or lines or [""])[-1]


def find_key_rows(summary: dict, key_rows) -> list[tuple[str, list]]:
    """(label, row) for each key row found in a chapter's summary (the first row whose quantity
    starts with the key's prefix); a row is [quantity, measured, expected]."""
    found = []
    for prefix, label in key_rows:
        for row in summary.get("rows", []):
            if row and row[0].startswith(prefix):
                found.append((label, row))
                break
    return found


def key_numbers(summary: dict, key_rows) -> str:
    """'label: measured' for each key row found in a chapter's summary, joined by '; '."""
    return "; ".join(f"{label}: {row[1]}" for label, row in find_key_rows(summary, key_rows))


def _copy_stream(source, sinks, tail: list | None) -> None:
    """Copy a child's output to every sink as it arrives; keep the last 8 kB in ``tail``."""
    for chunk in iter(lambda: source.read1(65536), b""):
        for sink in sinks:
            sink.write(chunk)
            sink.flush()
        if tail is not None:
            tail[0] = (tail[0] + chunk)[-8192:]


def run_chapter(path: Path, flags: list[str], log_path: Path, verbose: bool = False,
                grace: float = 10.0) -> tuple[int | None, str]:
    """Run ``python path flags`` from the file's folder; return (exit status, error line).

    stdout and stderr go to ``log_path`` (and to the terminal with ``verbose``). On Ctrl-C the
    chapter, which received the same Ctrl-C from the terminal, gets ``grace`` seconds to finish
    what it does on an interrupt (chapter 09 saves a checkpoint), is then terminated, and the
    KeyboardInterrupt is raised again.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        log.write(f"$ python {' '.join([path.name, *flags])}\n".encode())  # what ran
        process = subprocess.Popen([sys.executable, path.name, *flags], cwd=path.parent,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tail = [b""]
        out = [log] + ([sys.stdout.buffer] if verbose else [])
        err = [log] + ([sys.stderr.buffer] if verbose else [])
        readers = [threading.Thread(target=_copy_stream, args=(process.stdout, out, None)),
                   threading.Thread(target=_copy_stream, args=(process.stderr, err, tail))]
        for reader in readers:
            reader.start()
        try:
            status = process.wait()
        except KeyboardInterrupt:
            _stop(process, grace)
            raise
        finally:
            for reader in readers:
                reader.join()
    error = "" if status == 0 else last_error_line(tail[0].decode("utf-8", "replace"))
    return status, error


def _stop(process: subprocess.Popen, grace: float) -> None:
    try:
        process.wait(timeout=grace)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _children_cpu_seconds() -> float | None:
    """User + system CPU seconds of all finished child processes (None where unsupported)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_course(numbers, flags, outdir: Path, root: Path = ROOT, verbose: bool = False,
               key_rows=None, grace: float = 10.0) -> tuple[list[Result], bool]:
    """Run the chapters ``numbers`` of ``root`` in order with ``flags``.

    Returns the results of the chapters that ran and whether the run was interrupted.
    ``outdir`` must be where the chapters write (their ``--outdir``): the logs go to
    ``outdir/course/`` and each chapter's summary is read from ``outdir/NN_name/summary.json``.
    ``key_rows`` defaults to KEY_ROWS.
    """
    key_rows = KEY_ROWS if key_rows is None else key_rows
    chapters = find_chapters(root)
    results = []
    try:
        for i, number in enumerate(numbers, 1):
            result = _run_one(chapters[number], f"[{i}/{len(numbers)}]", flags, outdir, verbose,
                              key_rows.get(number, ()), grace)
            results.append(result)
            if result.status == "interrupted":
                return results, True
    except KeyboardInterrupt:  # between two chapters
        return results, True
    return results, False


def _run_one(path: Path, counter: str, flags, outdir: Path, verbose: bool, key_rows,
             grace: float) -> Result:
    """Run one chapter with a line before and after, and collect its Result."""
    log = outdir / "course" / f"{path.stem}.log"
    summary_path = outdir / path.stem / "summary.json"
    summary_path.unlink(missing_ok=True)  # a summary left by an earlier run is not this one's
    print(f"{counter} {path.stem}: running (log: {log})", flush=True)
    cpu_before, start = _children_cpu_seconds(), time.monotonic()
    try:
        status, error = run_chapter(path, flags, log, verbose, grace)
    except KeyboardInterrupt:
        status, error = None, "stopped by Ctrl-C"
    seconds = time.monotonic() - start
    cpu = None if cpu_before is None else _children_cpu_seconds() - cpu_before
    state = "passed" if status == 0 else "interrupted" if status is None else "failed"
    if state == "failed" and not error:
        error = f"exit status {status}"
    result = Result(path.stem, state, seconds, cpu, log, error=error)
    if summary_path.exists():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        result.figures = len(summary.get("figures", []))
        result.key_numbers = key_numbers(summary, key_rows)
        result.key_rows = [row for _, row in find_key_rows(summary, key_rows)]
    print(f"{counter} {path.stem}: {state} in {seconds:.1f} s", flush=True)
    return result


def print_results(results: list[Result], not_run=(), quick: bool = False) -> None:
    """The closing table (with a total), each key number beside what the chapter expected, then
    each failure with its error and log. ``not_run`` names chapters an interrupt left out."""
    rows = [(r.name, r.status, f"{r.seconds:.1f}",
             "-" if r.cpu_seconds is None else f"{r.cpu_seconds:.1f}",
             "-" if r.figures is None else r.figures, r.key_numbers or "-") for r in results]
    rows += [(name, "not run", "-", "-", "-", "-") for name in not_run]
    cpu = [r.cpu_seconds for r in results if r.cpu_seconds is not None]
    passed = sum(r.status == "passed" for r in results)
    rows.append((f"total ({passed} of {len(results) + len(not_run)} passed)", "",
                 f"{sum(r.seconds for r in results):.1f}", f"{sum(cpu):.1f}" if cpu else "-",
                 sum(r.figures or 0 for r in results), ""))
    cli.print_table("The course", rows, header=("chapter", "status", "wall s", "CPU s",
                                                "figures", "key numbers (measured)"))
    keyed = [r for r in results if r.key_rows]
    if keyed:
        print("\nKey numbers: each chapter's own summary row, as measured | as expected")
        for r in keyed:
            for quantity, measured, expected in r.key_rows:
                print(f"  {r.name[:2]}  {quantity}: {measured}  |  {expected}")
    if quick:
        print("\n--quick: smoke-run sizes; the numbers show the code runs, they are noise, not "
              "results (run without --quick for those).")
    for r in results:
        if r.status == "interrupted":
            print(f"{r.name} was stopped by Ctrl-C\n  log: {r.log}")
        elif r.status != "passed":
            print(f"{r.name} failed: {r.error}\n  log (the whole message): {r.log}")


def main(argv=None, root: Path = ROOT) -> int:
    """Parse the command line, run the chapters, print the table; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.show:
        parser.error("--show would stop at every chapter's figure windows: run one chapter with "
                     "--show instead (python NN_name.py --show)")
    try:
        numbers = parse_which(args.which, find_chapters(root))
    except ValueError as err:
        parser.error(f"argument which: {err}")
    flags = explicit_shared_flags(argv, args)
    # The chapters run from the root, so without --outdir they write to the root's outputs/.
    outdir = Path(flags[flags.index("--outdir") + 1]) if "--outdir" in flags else root / "outputs"
    results, interrupted = run_course(numbers, flags, outdir, root, args.verbose)
    chapters = find_chapters(root)
    not_run = [chapters[n].stem for n in numbers[len(results):]]
    print_results(results, not_run, quick=args.quick)
    if interrupted:
        return _INTERRUPTED
    return 0 if all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
