"""What every benchmark shares: the repository on sys.path, the machine line, and the report.

Each benchmark prints its tables and, with ``--write-report``, puts the same tables into
``BENCHMARKS.md`` between the markers ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``, so the
numbers there always come from a run, never from an edit by hand.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/bench_x.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

REPORT = ROOT / "BENCHMARKS.md"


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device | str = "cpu") -> str:
    """One line that says where and with what a benchmark ran."""
    where = (torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda")
             else f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    return (f"{time.strftime('%Y-%m-%d')}, {where}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def markdown_table(header, rows) -> str:
    """Rows of cells as a GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, markdown: str, path: Path = REPORT) -> Path:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``.

    The section is appended (with its markers) when the file lacks it, and the file is written
    to a temporary name first and renamed, so an interrupted run never leaves half a report.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if (begin in text) != (end in text) or \
            (begin in text and text.index(end) < text.index(begin)):
        raise ValueError(f"{path} has a broken {name} section: it needs {begin} and then {end}")
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def label_quality_axes(ax_frechet, ax_confident, frechet_label: str) -> None:
    """The two panels of a quality-against-cost figure: log NFE on x, the Frechet distance (log)
    on the left and the confident fraction (%) on the right."""
    for ax, what in ((ax_frechet, frechet_label),
                     (ax_confident, "confident fraction, % (higher is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample (NFE)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    ax_frechet.set_yscale("log")
