"""Paper styles: true sizes, embedded TrueType fonts, a colour-blind-safe palette, deterministic files.

Widths are the printed widths of common venues: one column of a two-column paper (3.25 in), the
NeurIPS/ICLR text width (5.5 in) and the full width of a two-column page (6.75 in).  Figures are
drawn at that size with 7–9 pt text (no scaling by LaTeX later: ``\\includegraphics`` at 100 %), laid
out with matplotlib's constrained layout and saved *without* a tight bounding box, so the page of a
PDF is exactly the requested width.

Fonts are embedded as TrueType (``pdf.fonttype 42``): no Type 3 bitmaps, text stays selectable and
editable.  Colours follow Okabe & Ito (2008), which stay distinguishable under the common colour-vision
deficiencies; line styles repeat the distinction for greyscale print.  When SciencePlots is installed
its ``science`` + ``no-latex`` styles set the look (serif STIX text, inward ticks); phasewatch's sizes,
palette and font embedding are applied on top, and LaTeX is never required.  Without SciencePlots,
plain matplotlib (DejaVu Sans) is used.

Saved files are deterministic: no creation date, no producer version, a fixed SVG hash salt, so the
same figure gives the same bytes (reproducible builds of a paper, clean diffs).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from pathlib import Path

import matplotlib as mpl

from ..errors import PhasewatchError

WIDTHS = {"column": 3.25, "text": 5.5, "full": 6.75}  # inches

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision
# deficiencies; line styles carry the same information a second time (greyscale print).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)), (0, (5, 5))]

RC = {
    "pdf.fonttype": 42,  # TrueType, never Type 3
    "ps.fonttype": 42,
    "svg.fonttype": "none",  # text stays text in SVG
    "svg.hashsalt": "phasewatch",  # fixed ids: deterministic SVG
    "text.usetex": False,  # never needs a LaTeX installation
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 9,
    "legend.frameon": False,
    "lines.linewidth": 1.0,
    "lines.markersize": 3.0,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "xtick.minor.visible": False,  # minor ticks only on log axes: less clutter at print size
    "ytick.minor.visible": False,
    "xtick.top": False,  # twin y axes and open spines need ticks on one side only
    "ytick.right": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "axes.titlelocation": "left",
    "image.cmap": "viridis",  # perceptually uniform, monotone in greyscale, colour-blind safe
    "figure.dpi": 150,
    "figure.constrained_layout.use": True,
    "savefig.dpi": 300,
    "savefig.bbox": "standard",  # keep the page exactly the requested size (constrained layout fits it)
    "savefig.pad_inches": 0.02,
    "savefig.facecolor": "white",
    "path.simplify": True,
    # plain-text tick labels (SciencePlots turns mathtext on for them: slower, and no better in print)
    "axes.formatter.use_mathtext": False,
}

#: Whether to base the style on SciencePlots: None uses it when installed; True/False force it.
SCIENCE: bool | None = None

# SciencePlots styles that never switch LaTeX on ("science" alone does; "no-latex" switches it off)
SCIENCE_STYLES = ("science", "no-latex")

# No creation date, no producer version: the same figure gives the same bytes.
SAVE_METADATA = {
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": "phasewatch"},
    "svg": {"Date": None, "Creator": "phasewatch"},
    "png": {"Software": "phasewatch"},
}
FORMATS = ("pdf", "png", "svg")


def scienceplots_available() -> bool:
    """True when the SciencePlots package is importable."""
    return importlib.util.find_spec("scienceplots") is not None


def figure_width(width: str | float) -> float:
    """Width in inches from a preset name (``column``, ``text``, ``full``) or a number of inches."""
    if isinstance(width, str):
        if width in WIDTHS:
            return WIDTHS[width]
        raise PhasewatchError(f"width {width!r}: use one of {', '.join(WIDTHS)} or a number of inches")
    w = float(width)
    if not 1.0 <= w <= 20.0:
        raise PhasewatchError(f"width {w:g} in: use 1 to 20 inches (column 3.25, text 5.5, full 6.75)")
    return w


def _register_scienceplots() -> None:
    # importing the package registers its styles; its loader uses matplotlib helpers deprecated in 3.11
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import scienceplots  # noqa: F401


_GENERIC = ("serif", "sans-serif", "monospace", "cursive", "fantasy")


def _concrete_families() -> list[str]:
    """The current ``font.family`` with generic names (``serif`` …) replaced by the installed fonts
    of their lists, so text keeps its font when drawn or saved outside the style (matplotlib resolves
    generic names from rcParams at draw time); DejaVu stays last as the glyph fallback."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    out: list[str] = []
    for fam in mpl.rcParams["font.family"]:
        names = mpl.rcParams[f"font.{fam}"] if fam in _GENERIC else [fam]
        out += [n for n in names if n in installed and n not in out]
    if "DejaVu Sans" not in out:
        out.append("DejaVu Sans")  # matplotlib's own font: glyphs missing from the first fall back here
    return out


@contextlib.contextmanager
def paper_style(science: bool | None = None, **overrides):
    """Context manager applying the paper style: SciencePlots (``science`` + ``no-latex``) as the
    base, then phasewatch's sizes, palette and font embedding, then ``overrides`` (rcParams).

    ``science=None`` (the default) follows the module setting :data:`SCIENCE`, itself None by
    default: SciencePlots when installed, plain matplotlib otherwise.  True requires SciencePlots."""
    if science is None:
        science = SCIENCE
    if science is None:
        science = scienceplots_available()
    elif science and not scienceplots_available():
        raise PhasewatchError("science=True needs SciencePlots: pip install SciencePlots (or pass science=False)")
    with mpl.rc_context():
        if science:
            _register_scienceplots()
            mpl.style.use(list(SCIENCE_STYLES))
        mpl.rcParams.update({**RC, **overrides})
        mpl.rcParams["font.family"] = _concrete_families()
        yield


def bind_save_style(fig) -> None:
    """Make ``fig.savefig`` itself apply the paper settings read at save time (TrueType fonts,
    no dates), so a figure saved with plain ``fig.savefig("f.pdf")`` outside :func:`paper_style`
    still embeds TrueType, not Type 3, and has no creation date.  Idempotent."""
    if getattr(fig.savefig, "_phasewatch", False):
        return
    plain = fig.savefig

    def savefig(fname, *args, **kwargs):
        fmt = kwargs.get("format")
        if fmt is None and isinstance(fname, (str, Path)):
            fmt = Path(fname).suffix.lstrip(".").lower() or None
        fmt = fmt or mpl.rcParams["savefig.format"]
        kwargs.setdefault("metadata", SAVE_METADATA.get(fmt))
        with mpl.rc_context({k: RC[k] for k in _SAVE_KEYS}):
            return plain(fname, *args, **kwargs)

    savefig._phasewatch = True
    fig.savefig = savefig


# rcParams that matplotlib reads when saving (not when drawing artists)
_SAVE_KEYS = ("pdf.fonttype", "ps.fonttype", "svg.fonttype", "svg.hashsalt", "savefig.bbox",
              "savefig.pad_inches", "savefig.facecolor", "path.simplify")


def save(fig, path, fmt: str | None = None, *, dpi: float | None = None) -> Path:
    """Save ``fig`` deterministically (no dates, fixed ids) with embedded TrueType fonts, at the
    figure's own size (no tight crop).  ``fmt`` defaults to the suffix of ``path``; ``dpi`` applies to
    raster output (PNG; default 300)."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".") or "pdf").lower()
    if fmt not in FORMATS:
        raise PhasewatchError(f"format {fmt!r}: use pdf, png or svg")
    # the STIX fonts SciencePlots selects carry zero timestamps, which fontTools reports while
    # subsetting them for embedding: harmless, and not the user's concern
    head_log = logging.getLogger("fontTools.ttLib.tables._h_e_a_d")
    level = head_log.level
    head_log.setLevel(logging.ERROR)
    try:
        with mpl.rc_context(RC):
            fig.savefig(path, format=fmt, metadata=SAVE_METADATA[fmt], dpi=dpi or RC["savefig.dpi"])
    finally:
        head_log.setLevel(level)
    return path
