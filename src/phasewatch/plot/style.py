"""Paper styles: true sizes, embedded TrueType fonts, a colour-blind-safe palette, deterministic PDFs."""

from __future__ import annotations

import contextlib

import matplotlib as mpl

WIDTHS = {"column": 3.25, "text": 5.5, "full": 6.75}  # inches

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision
# deficiencies; line styles carry the same information a second time.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)), (0, (5, 5))]

RC = {
    "pdf.fonttype": 42,  # TrueType, never Type 3
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "svg.hashsalt": "phasewatch",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "lines.linewidth": 1.0,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "figure.dpi": 150,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "path.simplify": True,
}

# No creation date, no producer version: the same figure gives the same bytes.
SAVE_METADATA = {
    "pdf": {"CreationDate": None, "Producer": None, "Creator": "phasewatch"},
    "svg": {"Date": None, "Creator": "phasewatch"},
    "png": {"Software": "phasewatch"},
}


@contextlib.contextmanager
def paper_style(**overrides):
    """Context manager applying the paper rcParams (plus overrides)."""
    with mpl.rc_context({**RC, **overrides}):
        yield


def save(fig, path, fmt: str | None = None) -> None:
    """Save a figure deterministically (no dates) with embedded fonts."""
    from pathlib import Path

    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".") or "pdf"
    with mpl.rc_context(RC):
        fig.savefig(path, format=fmt, metadata=SAVE_METADATA.get(fmt))
