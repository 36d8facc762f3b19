"""Progress bars that show where someone is watching, and stay out of logs.

Every long loop in the course (training, sampling, sweeps) goes through :func:`progress`, a thin
wrapper of ``tqdm.auto.tqdm``: in a terminal it draws the usual bar, in a Jupyter notebook a
widget, and when stderr is a file or a pipe (a CI log, ``python 08_score_sde.py 2> log``) it
draws nothing. tqdm's own ``disable=None`` does half of this: it also switches the bar off in a
notebook, whose stderr is not a terminal either.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from common.cli import in_notebook


def is_watched(stream=None) -> bool:
    """True when a person is likely watching ``stream`` (default: stderr, where bars go): it is a
    terminal, or this is a Jupyter kernel (which shows the bar as a widget)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return in_notebook() or bool(isatty and isatty())


def progress(iterable=None, **tqdm_kwargs) -> tqdm:
    """``tqdm(iterable, **tqdm_kwargs)``, silent unless :func:`is_watched` (its ``file``).

    A ``disable=True`` of the caller (e.g. "only rank 0 shows a bar") still switches it off.
    A silent bar costs nothing and keeps its methods (``set_postfix``, ``update``), so loops
    need no second code path.
    """
    watched = is_watched(tqdm_kwargs.get("file"))
    tqdm_kwargs["disable"] = bool(tqdm_kwargs.get("disable")) or not watched
    return tqdm(iterable, **tqdm_kwargs)


def write(text: str) -> None:
    """Print a line to stdout without breaking a progress bar that is being drawn."""
    tqdm.write(text)
