"""Exercises: listing them at the end of a module, and checking them with pytest.

How an exercise works
---------------------
1. The module's Section 5 defines a stub ``exercise_<what>(...)`` whose docstring states the task,
   shapes and a hint, and whose body is ``raise NotImplementedError``.
2. ``solutions/NN_<name>.py`` holds a reference answer under the same function name.
3. ``tests/test_NN_exercises.py`` writes one *check* per exercise (a function that takes an
   implementation and raises ``AssertionError`` with a helpful message when it is wrong), lists
   plausible wrong answers, and calls :func:`exercise_tests`. That one call creates four tests:

   - ``test_reference_passes[<exercise>]``   the reference passes the check (the check works);
   - ``test_wrong_answer_fails[<wrong>]``    each wrong answer fails it (the check can fail);
   - ``test_your_answer[<exercise>]``        the learner's function passes, or the test is
     skipped with a message naming the exercise and file while it still raises
     NotImplementedError;
   - ``test_every_exercise_in_the_module_is_checked``  every ``exercise_*`` of the module has
     an ``Exercise`` entry and every entry names a function the module has.

Adding a checked exercise to a module is therefore: a stub, a reference solution, a check, one
wrong answer, and one ``Exercise(...)`` line.

Hints in steps
--------------
A failing check should not hand over the answer. :func:`assert_close` says *what* is wrong (the
values, where the error is largest, and, given ``mistakes``, which known mistake the answer
matches), then the *idea* (``hint``). The formula itself (``formula``) is shown only when the
learner asks for it by setting the environment variable ``SBGM_SHOW_SOLUTION=1``::

    SBGM_SHOW_SOLUTION=1 pytest tests/test_03_exercises.py -k your_answer
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from common.modules import load_module, load_solutions, module_path

# ----------------------------------------------------------------------------------------------
# Writing checks
# ----------------------------------------------------------------------------------------------
SHOW_SOLUTION = "SBGM_SHOW_SOLUTION"


def show_solution() -> bool:
    """True when the learner asked for formulas in failure messages (SBGM_SHOW_SOLUTION=1)."""
    return os.environ.get(SHOW_SOLUTION, "").strip().lower() not in ("", "0", "false", "no")


def _hint_lines(hint: str, formula: str, diagnosis: str = "") -> str:
    """The steps of a hint: what is wrong, the idea, and the formula only when asked for."""
    lines = f"\n  what is wrong: {diagnosis}" if diagnosis else ""
    lines += f"\n  hint: {hint}" if hint else ""
    if formula:
        lines += (f"\n  formula: {formula}" if show_solution() else
                  f"\n  (still stuck? run again with {SHOW_SOLUTION}=1 to see the formula)")
    return lines


def _matches(actual: torch.Tensor, value, rtol: float, atol: float) -> bool:
    if isinstance(value, torch.Tensor):
        value = value.detach().double().cpu()
    else:  # a Python number or list: straight to float64 (float32 would lose digits)
        value = torch.as_tensor(value, dtype=torch.float64)
    if tuple(value.shape) != tuple(actual.shape) or not torch.isfinite(value).all():
        return False
    return bool(((actual - value).abs() <= atol + rtol * value.abs()).all())


def call_checked(fn: Callable, *args, what: str, hint: str = ""):
    """``fn(*args)``, with an error raised inside ``fn`` (e.g. a shape mismatch from a transposed
    matrix product) turned into an ``AssertionError`` that says so, instead of a raw traceback.

    NotImplementedError passes through: it means "not attempted yet", not "wrong".
    """
    __tracebackhide__ = True
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
        raise AssertionError(
            f"{what}: your function raised {type(err).__name__}: {first}\n"
            f"  the tensor arguments had shapes {shapes}; check each matrix product's shapes "
            f"(rows are points: a (N, D) batch times a (D, D) matrix is x @ A.T)"
            + (f"\n  hint: {hint}" if hint else "")) from None


def assert_close(actual, expected, *, what: str, hint: str = "", rtol: float = 1e-5,
                 atol: float = 1e-6, formula: str = "",
                 mistakes: Sequence[tuple[object, str]] = ()) -> None:
    """Raise ``AssertionError`` unless ``actual`` matches ``expected`` in shape and value.

    The message says what was being checked, the expected and returned values (the entries
    where they differ most), where the largest error is, and then a hint in steps:

    - ``mistakes``: (value a known mistake would give, what that mistake is) pairs; when the
      answer matches one of the values, the message names the mistake ("what is wrong");
    - ``hint``: the idea, always shown;
    - ``formula``: shown only when SBGM_SHOW_SOLUTION=1 is set, so a first failure does not
      give the answer away.

    Both ``actual`` and ``expected`` may be tensors, arrays or numbers.
    """
    __tracebackhide__ = True  # pytest shows the learner the message, not this function's code
    hint_line = _hint_lines(hint, formula)
    if not isinstance(actual, torch.Tensor):
        try:
            actual = torch.as_tensor(actual)
        except (TypeError, ValueError, RuntimeError):
            raise AssertionError(f"{what}: expected a tensor, got {type(actual).__name__}"
                                 f"{hint_line}") from None
    expected = torch.as_tensor(expected)
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, "
                             f"got {tuple(actual.shape)}{hint_line}")
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    diagnosis = next((message for value, message in mistakes
                      if _matches(actual, value, rtol, atol)), "")
    hint_line = _hint_lines(hint, formula, diagnosis)
    if not torch.isfinite(actual).all():
        bad = (~torch.isfinite(actual)).flatten().nonzero()[:, 0]
        first = tuple(int(i) for i in torch.unravel_index(bad[0], actual.shape)) \
            if actual.ndim else ()
        where = f" ({len(bad)} of {actual.numel()} entries, first at index {first})" \
            if actual.ndim else ""
        raise AssertionError(f"{what}: the result contains NaN or inf{where}{hint_line}")
    err = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    if (err <= allowed).all():
        return
    worst = int((err - allowed).flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape)) \
        if err.ndim else ()
    where = f" at index {index}" if err.ndim else ""
    if err.numel() <= 8:
        values = f"  expected: {_preview(expected)}\n  got:      {_preview(actual)}\n"
    else:
        values = _worst_entries(expected, actual, err - allowed)
    raise AssertionError(
        f"{what}: values differ.\n"
        f"{values}"
        f"  largest error {err.flatten()[worst].item():.3g}{where} "
        f"(allowed {atol:g} + {rtol:g} * |expected|)"
        f"{hint_line}"
    )


def _preview(t: torch.Tensor) -> str:
    if t.ndim == 0:
        return f"{t.item():.6g}"
    shown = ", ".join(f"{v:.4g}" for v in t.flatten().tolist())
    return f"[{shown}] (shape {tuple(t.shape)})"


def _worst_entries(expected: torch.Tensor, actual: torch.Tensor, excess: torch.Tensor,
                   n: int = 5) -> str:
    """The ``n`` entries that miss their tolerance by the most, worst first, with indices."""
    order = excess.flatten().argsort(descending=True)[:n]
    lines = [f"  the {n} worst of {excess.numel()} entries (shape {tuple(expected.shape)}):"]
    for k in order.tolist():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), expected.shape))
        lines.append(f"    index {index}: expected {expected.flatten()[k].item():.6g}, "
                     f"got {actual.flatten()[k].item():.6g}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Turning checks into tests
# ----------------------------------------------------------------------------------------------


@dataclass
class Exercise:
    """One checked exercise.

    name:  the function name, the same in the module and in ``solutions/``.
    check: ``check(fn)`` raises ``AssertionError`` (with a helpful message) when ``fn`` is wrong.
    wrong: plausible wrong answers (same signature) that ``check`` must reject.
    """

    name: str
    check: Callable[[Callable], None]
    wrong: Sequence[Callable] = field(default_factory=list)

    def __post_init__(self):
        if not self.wrong:
            raise ValueError(f"{self.name}: give at least one wrong answer the check must reject")


def exercise_tests(number: str, exercises: Sequence[Exercise]):
    """Create the four tests for the exercises of module ``number`` (see the module docstring).

    Use in a test file as::

        (test_reference_passes, test_wrong_answer_fails, test_your_answer,
         test_every_exercise_in_the_module_is_checked) = exercise_tests(
            "01", [Exercise("exercise_gaussian_score", check_gaussian_score, [sign_flipped])])
    """
    import pytest

    ids = [ex.name for ex in exercises]
    wrong_cases = [(ex, w) for ex in exercises for w in ex.wrong]
    wrong_ids = [f"{ex.name}-{w.__name__}" for ex, w in wrong_cases]

    @pytest.mark.parametrize("exercise", exercises, ids=ids)
    def test_reference_passes(exercise):
        exercise.check(getattr(load_solutions(number), exercise.name))

    @pytest.mark.parametrize("exercise, wrong", wrong_cases, ids=wrong_ids)
    def test_wrong_answer_fails(exercise, wrong):
        with pytest.raises(AssertionError):
            exercise.check(wrong)

    @pytest.mark.parametrize("exercise", exercises, ids=ids)
    def test_your_answer(exercise):
        module = load_module(number)
        try:
            exercise.check(getattr(module, exercise.name))
        except NotImplementedError:
            pytest.skip(f"{exercise.name} in {module_path(number).name} is not attempted yet: "
                        f"replace its 'raise NotImplementedError' with your answer")

    def test_every_exercise_in_the_module_is_checked():
        in_module = {name for name, _ in list_exercises(vars(load_module(number)))}
        checked = {ex.name for ex in exercises}
        assert in_module == checked, (
            f"module {number}: exercises without a check {sorted(in_module - checked)}, "
            f"checks of functions the module does not define {sorted(checked - in_module)}")

    return (test_reference_passes, test_wrong_answer_fails, test_your_answer,
            test_every_exercise_in_the_module_is_checked)


# ----------------------------------------------------------------------------------------------
# Listing the exercises at the end of a run
# ----------------------------------------------------------------------------------------------


def list_exercises(namespace: dict) -> list[tuple[str, str]]:
    """(name, first docstring line) of every ``exercise_*`` function, in source order."""
    found = [(name, obj) for name, obj in namespace.items()
             if name.startswith("exercise_") and inspect.isfunction(obj)]
    found.sort(key=lambda item: item[1].__code__.co_firstlineno)
    return [(name, (inspect.getdoc(fn) or "").splitlines()[0] if fn.__doc__ else "")
            for name, fn in found]


def print_exercises(namespace: dict, number: str) -> None:
    """Print the module's exercises and the command that checks them (a module's last lines)."""
    path = module_path(number)
    print(f"\nExercises (Section 5 of {path.name}):")
    for name, summary in list_exercises(namespace):
        print(f"  - {name}: {summary}")
    print(f"Check your answers:  pytest tests/test_{number}_exercises.py -k your_answer")
    print(f"(skipped = not attempted yet; {SHOW_SOLUTION}=1 adds formulas to the hints; "
          f"reference solutions: solutions/{path.name})")
