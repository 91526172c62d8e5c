"""Shared matplotlib styling for paper figures: column width, fonts, colour-blind-safe colours, PNG output.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so no global
backend state is touched and nothing opens a window.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

COLUMN_IN = 3.5  # one column of a two-column paper
DOUBLE_IN = 7.0  # full text width
DPI = 300

# Okabe-Ito colours (safe for colour-blind readers and in greyscale print)
SPACE_COLORS = {"embedding": "#0072B2", "projection": "#D55E00"}
RELATION_COLORS = {"same image": "#0072B2", "same class": "#009E73", "other class": "#D55E00"}
SERIES_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")

RC: dict[str, Any] = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 6,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "font.family": "DejaVu Sans",
}


def new_figure(width: float = COLUMN_IN, height: float = 2.4, **kwargs: Any):
    """A Figure on the Agg canvas with the paper style applied (rc params are read at artist creation)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def styled():
    """Context manager applying the paper style while artists are created."""
    import matplotlib

    return matplotlib.rc_context(RC)


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes at print resolution."""
    buffer = io.BytesIO()
    with styled():
        fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def save_png(fig, path: Path) -> Path:
    """Write the figure as a PNG; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(fig))
    return path
