"""common/progress.py: a bar in a terminal or a notebook, nothing in a log.

Whole chapters run with stderr piped are checked in tests/test_determinism.py; here the helper
itself, on streams that say they are (or are not) a terminal.
"""

import io

import pytest

from common import progress as bars

pytestmark = pytest.mark.common


class Terminal(io.StringIO):
    """A stream that says it is a terminal, and keeps what is written to it."""

    def isatty(self) -> bool:
        return True


def drawn(stream, **kwargs) -> str:
    for _ in bars.progress(range(20), file=stream, desc="steps", **kwargs):
        pass
    return stream.getvalue()


def test_a_terminal_gets_a_bar_with_its_description():
    text = drawn(Terminal())
    assert "steps" in text and "20/20" in text


def test_a_log_gets_nothing():
    assert drawn(io.StringIO()) == ""


def test_a_notebook_gets_a_bar(monkeypatch):
    """In a Jupyter kernel stderr is not a terminal, but someone is watching the cell."""
    monkeypatch.setattr(bars, "in_notebook", lambda: True)
    assert "20/20" in drawn(io.StringIO())


def test_the_callers_disable_still_wins():
    """A module's own "only rank 0 draws" (disable=True) holds even in a terminal."""
    assert drawn(Terminal(), disable=True) == ""
    assert "20/20" in drawn(Terminal(), disable=False)  # False means "no objection", not "force"


def test_a_silent_bar_keeps_its_methods():
    bar = bars.progress(range(3), file=io.StringIO())
    bar.set_postfix(loss=1.0)  # modules call these whether or not the bar shows
    bar.update(0)
    assert list(bar) == [0, 1, 2]


def test_importing_ipykernel_does_not_make_a_notebook():
    """pytest imports ipykernel for the notebook tests; the chapters it then runs in-process
    must still see a plain stream (this was the bug: bars in a piped run after that import)."""
    pytest.importorskip("ipykernel", reason="needs ipykernel (requirements-notebooks.txt)")
    import ipykernel  # noqa: F401

    from common.cli import in_notebook

    assert not in_notebook()
