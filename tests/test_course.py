"""Tests of `python -m common.course`: choosing chapters, passing flags on, and running a course.

Most tests run a fake repository of three tiny chapters (one passes and writes a summary.json, one
fails, one passes), so they take about a second; one test runs the real chapter 01 --quick.
"""

import json
import os
import re
import signal
import textwrap
from pathlib import Path

import pytest

from common import course
from common.modules import ROOT

pytestmark = pytest.mark.common

ALL = [f"{n:02d}" for n in range(1, 11)]


# -- which chapters ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("all", ALL),
    ("03-06", ["03", "04", "05", "06"]),
    ("5", ["05"]),
    ("05", ["05"]),
    ("01,03-04", ["01", "03", "04"]),
    ("04,01,04", ["01", "04"]),  # in course order, each once
    ("09-10", ["09", "10"]),
])
def test_parse_which_reads_all_ranges_and_lists(text, expected):
    assert course.parse_which(text, ALL) == expected


@pytest.mark.parametrize("text, message", [
    ("11", "no chapter 11"),
    ("00", "no chapter 00"),
    ("03-12", "no chapter 11"),
    ("06-03", "runs backwards"),
    ("3-", "cannot read"),
    ("x", "cannot read"),
    ("", "cannot read"),
    ("3;4", "cannot read"),
])
def test_parse_which_rejects_what_it_cannot_run(text, message):
    with pytest.raises(ValueError, match=message):
        course.parse_which(text, ALL)


@pytest.mark.parametrize("argv, message", [
    (["11"], "argument which: there is no chapter 11"),
    (["--seed", "-1"], "argument --seed"),
    (["--show"], "--show"),
])
def test_bad_arguments_are_a_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        course.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


# -- flags passed on -----------------------------------------------------------------------------
def test_only_the_shared_flags_given_are_passed_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["03-06", "--verbose", "--threads", "1", "--quick", "--seed", "3", "--outdir", "out"]
    args = course.make_parser().parse_args(argv)
    # --threads 1 is the shared parser's default, but 09 and 10 default to every core: a flag
    # the user typed is passed on even when it equals a default. --outdir becomes absolute
    # because the chapters run from the repository root.
    assert course.explicit_shared_flags(argv, args) == [
        "--quick", "--seed", "3", "--outdir", str(tmp_path / "out"), "--threads", "1"]


def test_no_flags_given_passes_none_on():
    assert course.explicit_shared_flags([], course.make_parser().parse_args([])) == []


# -- a fake repository ---------------------------------------------------------------------------
PASSING = """
    import argparse, json, sys
    from pathlib import Path
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--outdir", type=Path, default=Path("outputs"))
    args = parser.parse_args()
    out = args.outdir / Path(__file__).stem
    out.mkdir(parents=True, exist_ok=True)
    (out / "a.png").write_bytes(b"")
    rows = [["argv", " ".join(sys.argv[1:]), ""], ["the answer", "42", "42"]]
    (out / "summary.json").write_text(json.dumps({"rows": rows, "figures": ["a.png"]}))
    print("done")
"""
FAILING = """
    import sys
    sys.stderr.write("training:  50%|#####     | 5/10 [00:01<00:01, 5.00it/s]\\r")
    raise RuntimeError("boom: the score network diverged")
"""
INTERRUPTING = """
    import os, signal, time
    os.kill(os.getppid(), signal.SIGINT)  # what Ctrl-C in the terminal does to the course
    time.sleep(60)
"""
KEY_ROWS = {"01": (("the answer", "answer"),), "03": (("the answer", "answer"),)}


def fake_repository(root: Path, **chapters: str) -> Path:
    """Write chapters named like 01_pass.py from {"01_pass": source}; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in chapters.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    return root


def test_a_failing_chapter_is_reported_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    root = fake_repository(tmp_path / "repo", **{"01_pass": PASSING, "02_fail": FAILING,
                                                 "03_pass": PASSING})
    out = tmp_path / "out"
    stale = out / "02_fail" / "summary.json"  # left by an earlier run: not this run's figures
    stale.parent.mkdir(parents=True)
    stale.write_text('{"rows": [], "figures": ["old.png"]}')
    monkeypatch.setattr(course, "KEY_ROWS", KEY_ROWS)

    status = course.main(["--quick", "--outdir", str(out)], root=root)

    text = capsys.readouterr().out
    table = text[text.index("The course"):]
    rows = {line.split()[0]: line.split() for line in table.splitlines()
            if line.startswith(("01_", "02_", "03_")) and line.split()[1] in ("passed", "failed")}
    assert status == 1
    assert rows["01_pass"][1] == "passed" and rows["03_pass"][1] == "passed"  # the run went on
    assert rows["01_pass"][4] == "1" and rows["01_pass"][5:] == ["answer:", "42"]
    assert rows["02_fail"][1] == "failed" and rows["02_fail"][4:] == ["-", "-"]
    log = out / "course" / "02_fail.log"
    assert (f"02_fail failed: RuntimeError: boom: the score network diverged\n"
            f"  log (the whole message): {log}") in text
    assert "total (2 of 3 passed)" in text
    assert "  01  the answer: 42  |  " in text  # key row beside what was expected
    assert "--quick: smoke-run sizes" in text
    assert "Traceback" in log.read_text()  # the whole error is in the log
    assert log.read_text().startswith("$ python 02_fail.py --quick --outdir ")  # what ran
    # the shared flags reached the chapter
    argv = json.loads((out / "01_pass" / "summary.json").read_text())["rows"][0][1]
    assert argv.split() == ["--quick", "--outdir", str(out)]


def test_exit_status_is_zero_when_every_chapter_passed(tmp_path, capsys):
    root = fake_repository(tmp_path / "repo", **{"01_pass": PASSING, "02_pass": PASSING})
    assert course.main(["--outdir", str(tmp_path / "out")], root=root) == 0
    assert course.main(["02", "--outdir", str(tmp_path / "out")], root=root) == 0
    assert "[1/1] 02_pass: passed" in capsys.readouterr().out


def test_ctrl_c_stops_the_chapter_and_still_prints_the_table(tmp_path, capsys):
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: give
    # this process Python's usual Ctrl-C handler, whatever started pytest.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _check_ctrl_c(tmp_path, capsys)
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_ctrl_c(tmp_path, capsys):
    root = fake_repository(tmp_path / "repo", **{"01_pass": PASSING, "02_stop": INTERRUPTING,
                                                 "03_pass": PASSING})
    results, interrupted = course.run_course(["01", "02", "03"], [], tmp_path / "out", root,
                                             grace=0.2)
    assert interrupted
    assert [(r.name, r.status) for r in results] == [("01_pass", "passed"),
                                                      ("02_stop", "interrupted")]
    assert results[1].seconds < 30  # the sleeping chapter was stopped, not waited for
    course.print_results(results, not_run=["03_pass"])
    text = capsys.readouterr().out
    assert "02_stop was stopped by Ctrl-C" in text
    assert re.search(r"^03_pass +not run", text, re.M)


@pytest.mark.parametrize("tail, expected", [
    ("Traceback ...\nValueError: bad\n", "ValueError: bad"),
    ("ValueError: bad\nsteps:  40%|####      | 4/10\r\n", "ValueError: bad"),
    ("usage: x\nx.py: error: argument --steps: must be positive\n",
     "x.py: error: argument --steps: must be positive"),
    ("\n\n", ""),
    # a chapter's own several-line message: its first line says what is wrong
    ("error: MNIST is not under /d/MNIST/raw.\nPlace these four files there:\n    /d/a\n"
     "With network access, add --download to fetch it.\n",
     "error: MNIST is not under /d/MNIST/raw."),
])
def test_the_error_is_the_last_line_that_is_not_a_progress_bar(tail, expected):
    assert course.last_error_line(tail) == expected


# -- the key numbers -----------------------------------------------------------------------------
def test_every_key_row_is_named_in_its_chapter():
    """Each KEY_ROWS prefix still appears in its chapter's source (a renamed row fails here;
    test_real_chapter_01 and the slow test below check the rows the runs actually print)."""
    chapters = course.find_chapters()
    assert set(course.KEY_ROWS) == set(chapters)
    missing = [(number, prefix) for number, rows in course.KEY_ROWS.items()
               for prefix, _ in rows if prefix not in chapters[number].read_text()]
    assert not missing


def test_key_numbers_take_the_first_row_that_starts_with_each_prefix():
    summary = {"rows": [["ULA variance, eps=1", "1.3", ""], ["ULA variance, eps=2", "1.6", ""],
                        ["MALA variance", "1.0", ""]]}
    key_rows = (("ULA variance", "ULA"), ("MALA", "MALA"), ("not printed", "x"))
    assert course.key_numbers(summary, key_rows) == "ULA: 1.3; MALA: 1.0"


def test_real_chapter_01_end_to_end(tmp_path, capsys):
    status = course.main(["01", "--quick", "--threads", "1", "--outdir", str(tmp_path)])
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("01_score_functions_basics"))
    assert status == 0, text
    assert row.split()[1] == "passed" and int(row.split()[4]) >= 5  # figures written
    for _, label in course.KEY_ROWS["01"]:
        assert f"{label}: " in row
    assert "Figures (" in (tmp_path / "course" / "01_score_functions_basics.log").read_text()


@pytest.mark.slow
def test_every_chapter_quick_prints_its_key_rows(tmp_path, capsys):
    os.environ.setdefault("SBGM_DATA_DIR", str(ROOT / "data"))
    status = course.main(["all", "--quick", "--threads", "1", "--outdir", str(tmp_path)])
    text = capsys.readouterr().out
    assert status == 0, text
    for number, rows in course.KEY_ROWS.items():
        summary = json.loads(next(tmp_path.glob(f"{number}_*/summary.json")).read_text())
        for prefix, _ in rows:
            assert any(row[0].startswith(prefix) for row in summary["rows"]), (number, prefix)
