"""Same seed, same numbers: every chapter's --quick summary tables are identical across two runs
on the CPU, and a run whose stderr is a pipe (a CI log) writes no progress bar to it.

The first run is the session's shared one (``quick_run`` in conftest.py, which the chapter's
end-to-end test reads too); the second is a fresh process with stdout and stderr piped, so it
also catches state that differs from process to process (Python's hash seed, which orders sets
of strings) and shows what a log receives.

Timings legitimately differ from run to run. They are excluded in two ways, each with a reason:

1. rows the chapter marks as timings: ``common.cli.timing_row`` prints them with the
   ``[timing]`` tag. This is for quantities computed from clocks that carry no unit (a ratio of
   two times, the exponent of a time-against-dimension fit), which no rule on the text can tell
   from a measured number; the rows are dropped;
2. a number followed by a time unit (ms, s, min, h, or a rate per second such as images/s) is
   replaced by ``<time>``: timings inside a row of other numbers ("NFE 11, 0.3 s, 19%").

Everything else in every table (each block that ``common.cli.print_table`` printed) must match
character for character.
"""

import re
import subprocess
import sys

import numpy as np
import pytest

from common.cli import TIMING_TAG
from common.modules import ROOT, load_module

NUMBERS = sorted(p.name[:2] for p in ROOT.glob("[0-9][0-9]_*.py"))
IMAGE_CHAPTERS = {"09", "10"}  # they run on a small folder of images instead of MNIST
RULE = re.compile(r"^-+(  -+)*$")
TIME = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?\s*"
                  r"(?:[A-Za-z]+/)?(?:ms|us|s|min|h)(?:/[A-Za-z]+)?\b")


def summary_tables(stdout: str) -> list[list[str]]:
    """Every table print_table wrote: title, rule, header, rule, rows, rule (as lines)."""
    lines, tables, i = stdout.splitlines(), [], 1
    while i + 2 < len(lines):
        if RULE.match(lines[i]) and lines[i + 2] == lines[i]:
            end = lines.index(lines[i], i + 3)
            tables.append(lines[i - 1:end + 1])
            i = end + 1
        else:
            i += 1
    return tables


def without_timings(table: list[str]) -> list[str]:
    return [TIME.sub("<time>", line) for line in table if TIMING_TAG not in line]


def test_the_normalisation_keeps_numbers_and_drops_only_timings():
    table = ["Title", "-----  ---", "q      m", "-----  ---",
             f"a {TIMING_TAG}  4x and 45x", "b      NFE 11, 0.3 s, 19% / 40 steps, 149 images/s",
             "c      1.5e-3 / 2 h / 12 ms / 0.1 min", "-----  ---"]
    assert summary_tables("noise\n" + "\n".join(table) + "\nafter\n") == [table]
    kept = without_timings(table)
    assert kept[4] == "b      NFE 11, <time>, 19% / 40 steps, <time>"
    assert kept[5] == "c      1.5e-3 / <time> / <time> / <time>"
    # a changed measurement still shows: a wrong-seed run would fail the comparison
    changed = [line.replace("19%", "20%") for line in table]
    assert without_timings(changed) != kept


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """64 grey 28x28 images in two class folders (bright top or bottom half): enough for
    chapter 09's and 10's --quick runs (one batch of 32, labels for 10's guidance)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("two_classes")
    rng = np.random.default_rng(0)
    for i in range(64):
        img = np.zeros((28, 28), dtype=np.uint8)
        rows = slice(0, 14) if i % 2 == 0 else slice(14, 28)
        img[rows] = rng.integers(150, 250)
        folder = root / f"class_{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def extra_flags(number: str, image_folder, run: str) -> list[str]:
    """The image chapters' data, and a checkpoint folder per run (run a's and b's models are
    each trained, by 09, or trained and then reused, by 10)."""
    if number not in IMAGE_CHAPTERS:
        return []
    return ["--dataset", "folder", "--data-dir", str(image_folder), "--image-size", "28",
            "--checkpoint-dir", str(image_folder.parent / f"checkpoints_{run}"), "--threads", "1"]


@pytest.mark.parametrize("number", [pytest.param(n, marks=getattr(pytest.mark, f"ch{n}"))
                                    for n in NUMBERS])
def test_same_seed_same_summary_and_no_bars_in_a_pipe(number, quick_run, request, tmp_path):
    folder = request.getfixturevalue("image_folder") if number in IMAGE_CHAPTERS else None
    first = quick_run(number, *extra_flags(number, folder, "a"))
    second = subprocess.run(
        [sys.executable, load_module(number).__file__, "--quick", "--outdir", str(tmp_path),
         *extra_flags(number, folder, "b")],
        cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    tables = [without_timings(t) for t in summary_tables(first.out)]
    assert tables, "no summary table found in the first run's output"
    assert [without_timings(t) for t in summary_tables(second.stdout)] == tables
    for err in (first.err, second.stderr):  # a bar redraws its line with \r
        assert "\r" not in err and "it/s" not in err, err[-2000:]
