"""Every chapter's command line refuses impossible input the same way: exit code 2, a last line on
stderr that names the flag and its allowed range, no traceback, and nothing written (the --outdir
and --checkpoint-dir given do not exist afterwards).

The cases come from each chapter's own parser (``parser._actions``), so a flag is covered as soon
as it is declared: every integer flag (a ``common.cli.Count``) gets a negative value, 0 when 0 is
outside its range, a fraction, a word, the first value above its range and 1e12; every number
flag (a ``common.cli.Real``) NaN, both infinities, a word and the nearest values outside its
interval; every flag with choices an unknown choice. On top: a seed of 2**64, 2**31 threads, an
absent --device, an unknown flag, and SPECIAL, the checks that need a chapter's own knowledge.
"""

import math

import pytest

from common import cli
from common.device import available_devices
from common.modules import ROOT, load_module

NUMBERS = sorted(p.name[:2] for p in ROOT.glob("[0-9][0-9]_*.py"))
BIG = "1e12"  # a size no run of this course can hold or finish: refused for every size flag
ACCEPTS_BIG = {"--seed"}  # seeds go up to 2**64 - 1: BIG is a valid seed

# (chapter, argv, what the last line must contain): checks of two flags, or of a chapter's limits
SPECIAL = [
    ("03", ["--step-size", "5"], "argument --step-size: ULA on the 2D mixture is stable only for "
                                 "eps < 1.20"),
    ("09", ["--guide-interval", "5", "1"], "argument --guide-interval: LO must be below HI"),
]


def parser_of(number: str):
    return load_module(number).make_parser()


def sized_actions(parser):
    """The parser's flags that take values, with the option string used to pass them."""
    return [(action.option_strings[-1], action) for action in parser._actions
            if action.option_strings and action.nargs != 0 and action.dest != "help"]


def just_outside(kind: cli.Real) -> list[str]:
    """The nearest values outside a Real's interval (an open end is itself outside)."""
    values, low, high = [], kind.low, kind.upper()
    if math.isfinite(low):
        values.append(low if kind.low_open else low - max(1e-3, abs(low) / 1e3))
    if math.isfinite(high):
        values.append(high if kind.high_open and high == kind.high
                      else high + max(1e-3, high / 1e3))
    return [repr(v) for v in values]


def a_valid_value(kind) -> str:
    if isinstance(kind, cli.Count):
        return str(kind.low)
    if isinstance(kind, cli.Real):
        if math.isfinite(kind.low) and math.isfinite(kind.high):
            return repr((kind.low + kind.high) / 2)
        return repr(kind.low + 1 if math.isfinite(kind.low) else 0.0)
    return str(next(iter(kind)))  # choices


def bad_values(flag: str, action) -> list[tuple[str, str]]:
    """(bad value, text the error line must contain) for one flag."""
    kind = action.type
    if isinstance(kind, cli.Count):
        limits = f"must be {kind.describe()}"
        values = ["-1", "1.5", "abc", str(kind.upper() + 1)]
        values += ["0"] if kind.low > 0 else []
        values += [str(kind.low - 1)] if kind.low > 1 else []
        values += [] if flag in ACCEPTS_BIG else [BIG]
        return [(v, limits) for v in values]
    if isinstance(kind, cli.Real):
        limits = f"must be {kind.describe()}"
        minus_inf = [] if action.nargs else ["-inf"]  # see argv_for
        return [(v, limits) for v in ["nan", "inf", *minus_inf, "abc", *just_outside(kind)]]
    if action.choices:
        return [("no-such-choice", "invalid choice")]
    return []  # paths take any text


def argv_for(flag: str, action, value: str) -> list[str]:
    """The flag with ``value`` last, after valid values where it takes several (each is checked).
    A single value goes in as ``--flag=value``, the form a value such as -inf needs (argparse
    reads ``--flag -inf`` as a flag without its value)."""
    if action.nargs in ("+", "*"):
        return [flag, a_valid_value(action.type or action.choices), value]
    if isinstance(action.nargs, int):
        return [flag, *[a_valid_value(action.type)] * (action.nargs - 1), value]
    return [f"{flag}={value}"]


def all_cases():
    cases = []
    for number in NUMBERS:
        mark = getattr(pytest.mark, f"ch{number}")

        def case(argv, expect, number=number, mark=mark):
            cases.append(pytest.param(number, argv, expect, marks=mark,
                                      id=f"{number} {' '.join(argv)}"))

        for flag, action in sized_actions(parser_of(number)):
            for value, expect in bad_values(flag, action):
                case(argv_for(flag, action, value), f"argument {flag}: {expect}")
        case(["--seed", str(2**64)], f"argument --seed: must be an integer from 0 to "
                                     f"{cli.SEED_MAX:,}")
        case(["--threads", str(2**31)], "argument --threads: must be an integer from 1 to")
        case(["--no-such-flag"], "unrecognized arguments: --no-such-flag")
        for device in ("cuda", "mps"):
            if device not in available_devices():
                case(["--device", device],
                     f"argument --device: {device} was requested but")
    for number, argv, expect in SPECIAL:
        cases.append(pytest.param(number, argv, expect, marks=getattr(pytest.mark, f"ch{number}"),
                                  id=f"{number} {' '.join(argv)}"))
    return cases


class Accepted(Exception):
    """Raised instead of running a chapter whose flags were all accepted."""


@pytest.mark.parametrize("number, argv, expect", all_cases())
def test_bad_input_is_one_line_naming_the_flag_and_its_range(number, argv, expect, tmp_path,
                                                               capsys, monkeypatch):
    module = load_module(number)
    out, ck = tmp_path / "out", tmp_path / "ck"
    extra = ["--checkpoint-dir", str(ck)] if "checkpoint_dir" in vars(
        module.make_parser().parse_args([])) else []

    def start_run_then_stop(*args, **kwargs):  # a value let through must not start the run
        module_start_run(*args, **kwargs)
        raise Accepted(f"{' '.join(argv)} was accepted")

    module_start_run = module.start_run
    monkeypatch.setattr(module, "start_run", start_run_then_stop)
    with pytest.raises(SystemExit) as info:
        module.main([*argv, "--outdir", str(out), *extra])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert info.value.code == 2, err
    assert expect in last, f"expected {expect!r} in the last line, got:\n{err}"
    assert "Traceback" not in err
    assert not out.exists() and not ck.exists(), "the run wrote before its flags were checked"


@pytest.mark.parametrize("number", [pytest.param(n, marks=getattr(pytest.mark, f"ch{n}"))
                                    for n in NUMBERS])
def test_every_value_flag_has_a_range_and_accepts_its_ends(number):
    """Every flag that takes a number declares its range with common.cli (a plain ``int`` or
    ``float`` would take 1e12 or NaN), and its range is not empty: both ends are accepted."""
    for flag, action in sized_actions(parser_of(number)):
        kind = action.type
        assert kind not in (int, float), f"{number} {flag}: use common.cli.Count or Real"
        if isinstance(kind, cli.Count):
            assert kind(str(kind.low)) == kind.low and kind(str(kind.upper())) == kind.upper()
            if flag not in ACCEPTS_BIG:
                assert kind.upper() < float(BIG), f"{number} {flag} takes {BIG}"
        elif isinstance(kind, cli.Real):
            value = a_valid_value(kind)
            assert kind(value) == float(value)


@pytest.mark.parametrize("number", [pytest.param(n, marks=getattr(pytest.mark, f"ch{n}"))
                                    for n in NUMBERS])
def test_hours_long_runs_are_warned_about_not_refused(number):
    """A value that makes the run hours long (by the flag's own cost) parses and gives one
    warning line naming the flag; the chapter's defaults give none."""
    parser = parser_of(number)
    assert cli.warn_if_slow(parser, parser.parse_args([])) is None
    timed = [(flag, action) for flag, action in sized_actions(parser)
             if getattr(action.type, "seconds_each", 0)]
    for flag, action in timed:
        value = math.ceil(3 * cli.WARN_SECONDS / action.type.seconds_each)
        if isinstance(action.type, cli.Count) and value > action.type.upper():
            continue  # memory runs out before the hours do: refused, as the test above checks
        args = parser.parse_args(argv_for(flag, action, str(value)))
        warning = cli.warn_if_slow(parser, args)
        assert warning is not None and warning.startswith("warning:") and flag in warning
        assert "\n" not in warning and " h of CPU" in warning



ABSENT_DEVICE = next((d for d in ("cuda", "mps") if d not in available_devices()), None)
needs_absent_device = pytest.mark.skipif(ABSENT_DEVICE is None,
                                         reason="this machine has both CUDA and MPS")


@needs_absent_device
@pytest.mark.parametrize("script", ["bench_2d", "bench_mnist", "bench_samplers"])
def test_bench_scripts_refuse_an_absent_device_in_one_line(script, tmp_path, capsys,
                                                           monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    with pytest.raises(SystemExit) as info:
        importlib.import_module(script).main(["--device", ABSENT_DEVICE,
                                              "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert f"argument --device: {ABSENT_DEVICE} was requested" in err.strip().splitlines()[-1]


@needs_absent_device
@pytest.mark.ch09
def test_torchrun_reports_an_absent_device_once(tmp_path):
    """Under torchrun every process parses the same flags; rank 0 alone reports them (the
    launcher then adds its own summary of the failed processes, which is torchrun's)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "09_image_generation.py", "--device",
                           ABSENT_DEVICE, "--outdir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    ours = [line for line in proc.stderr.splitlines()
            if line.startswith("09_image_generation.py: error:")]
    assert proc.returncode != 0 and not out.exists()
    assert len(ours) == 1 and f"argument --device: {ABSENT_DEVICE} was requested" in ours[0], \
        proc.stderr[-3000:]
