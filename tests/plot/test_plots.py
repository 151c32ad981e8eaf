"""Figures for papers: every single-run figure from the shipped sample run and from synthetic analyses,
checked as files (fonts, page size, determinism, size, not blank) and as layouts (nothing clipped,
legends off the data), and the numbers they draw checked against the data they were given."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import phasewatch  # noqa: E402
from phasewatch.analysis import tails  # noqa: E402
from phasewatch.analysis.events import first_crossing, jumps  # noqa: E402
from phasewatch.analysis.pipeline import Analysis  # noqa: E402
from phasewatch.cli import main  # noqa: E402
from phasewatch.plot import FIGURES, WIDTHS, MissingDataError, paper_style, save, style  # noqa: E402
from phasewatch.plot import figures as F  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "data"
SAMPLE = DATA / "grokking-p71.h5"
CURVATURE_FIGURES = ("sharpness", "ntk", "criticality")


# ------------------------------------------------------------------------------------------------
# a synthetic analysis with every table filled, shaped like a grokking run at the edge of stability
# ------------------------------------------------------------------------------------------------
def synthetic_analysis(n: int = 2000, window: int = 8, *, probe_every: int | None = None,
                       curvature_every: int | None = None, seed: int = 0, probes: bool = True,
                       curvature: bool = True, tail: bool = True) -> Analysis:
    """An :class:`Analysis` built from formulas: a planted spectral gap after mode 2 in the middle
    of training, A(t) sweeping through all three regimes, Pareto(α = 1.5) gradient norms, C rising
    through 1, progressive sharpening to 2/η and slightly beyond, an NTK reorganisation, and Φ and
    the "all three critical" flag computed as DEFINITIONS §6 states them."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1, dtype=np.int64)
    t = steps / n
    eta = 0.05
    j = np.arange(window)
    sigma = np.exp(-0.35 * j)[None, :] * (1 + 0.1 * np.sin(20 * t))[:, None] \
        * np.exp(0.05 * rng.standard_normal((n, window)))
    mid = (t > 0.4) & (t < 0.7)
    sigma[mid, 2:] /= 8.0
    sigma = -np.sort(-sigma, axis=1)
    ratio = sigma[:, :-1] / sigma[:, 1:]
    kstar = ratio.argmax(axis=1) + 1
    valid = np.ones(n, dtype=bool)
    valid[n // 3: n // 3 + max(2, n // 200)] = False
    A = 10 ** (2.0 * np.sin(3 * np.pi * t) + 0.3 * rng.standard_normal(n))
    regime = np.where(A < 0.1, 0, np.where(A > 10, 2, 1))
    rows = np.arange(n)
    table = {
        "step": steps, "lr": np.full(n, eta), "update_norm": sigma[:, 0] / np.sqrt(window),
        "kstar": kstar.astype(np.int64), "gap_ratio": ratio.max(axis=1),
        "gap": sigma[rows, kstar - 1] - sigma[rows, kstar], "kstar_weighted": kstar.astype(np.int64),
        "g23": sigma[:, 1] ** 2 - sigma[:, 2] ** 2, "sigma1_over_dcrit": sigma[:, 0] * 3,
        "sigma1_over_edge": sigma[:, 0] * 2, "A": A, "A_eigen": 0.4 * A, "regime": regime.astype(np.int64),
        "valid": valid, "sigma": sigma, "stability": np.ones((n, window)),
    }
    scalars = {"step": steps, "loss": 2 * np.exp(-5 * t) + 0.01 * rng.random(n), "lr": np.full(n, eta),
               "grad_norm": rng.pareto(1.5, n) + 1.0, "update_norm": table["update_norm"],
               "flags": np.zeros(n, dtype=np.int32)}
    ev = np.unique(np.linspace(1, n, min(n, 200)).astype(np.int64))
    te = ev / n
    test_acc = 1 / (1 + np.exp(-(te - 0.55) * 30))
    train_acc = 1 / (1 + np.exp(-(te - 0.2) * 30))
    metrics = {"test_acc": (ev, test_acc), "train_acc": (ev, train_acc)}
    events = [e for e in [first_crossing(ev, test_acc, 0.95, "test_acc", kind="grokking")] if e]
    events += jumps(ev, test_acc, metric="test_acc")

    def C_of(tt):
        return 10 ** (2.5 * (tt - 0.5))

    pr: dict[str, np.ndarray] = {}
    if probes:
        ps = np.arange(probe_every or max(1, n // 40), n + 1, probe_every or max(1, n // 40), dtype=np.int64)
        C = C_of(ps / n)
        lo, hi = C / 1.6, C * 1.6
        p, p_lo, p_hi = C / (1 + C), lo / (1 + lo), hi / (1 + hi)
        phase = np.where(p_hi < 0.5, "exploration", np.where(p_lo > 0.5, "generalization", "transition"))
        pr = {"step": ps, "n": np.full(len(ps), 32), "b": np.ones(len(ps)), "C": C, "C_lo": lo, "C_hi": hi,
              "p": p, "p_lo": p_lo, "p_hi": p_hi, "C_naive": C + 0.3, "phase": phase.astype(str)}
    ti: dict[str, np.ndarray] = {}
    if tail and n >= 100:
        s = steps[99:]
        a = 1.5 + 0.3 * np.sin(6 * s / n)
        ti = {"step": s, "alpha": a, "alpha_lo": a - 0.4, "alpha_hi": a + 0.5}
    cv: dict[str, np.ndarray] = {}
    if curvature:
        every = curvature_every or max(1, n // 60)
        cs = np.arange(every, n + 1, every, dtype=np.int64)
        tc = cs / n
        thr = np.full(len(cs), 2 / eta)
        S = np.interp(tc, [0, 0.3, 0.45, 0.5, 0.6, 0.8, 1.0], [32, 12, 1.0, 0.05, -0.08, -0.5, -0.3])
        lam = thr - S
        rate = 1.2 * np.exp(-(((tc - 0.55) / 0.08) ** 2))
        rho = -50 + np.cumsum(rate * every)
        Cc = C_of(tc)
        phi = np.exp(-((Cc - 1) ** 2 / (2 * 0.3**2) + S**2 / (2 * 0.15**2) + (rate - 1) ** 2 / (2 * 0.5**2)))
        crit = (Cc >= 0.8) & (Cc <= 1.2) & (np.abs(S) <= 0.1) & (np.abs(rate) > 0.5)
        cv = {"step": cs, "lr": np.full(len(cs), eta), "lambda_max": lam, "lambda_residual": 1e-3 * lam,
              "hvps": np.full(len(cs), 40), "threshold": thr, "S": S, "eta_opt": 2 * 0.01 / lam,
              "trace": 5 * lam, "trace_lo": 4 * lam, "trace_hi": 6 * lam, "ntk_rho": rho, "ntk_rate": rate,
              "phi": phi, "all_critical": crit, "I": Cc / (1 + Cc) * S / 2}
    # three layer groups: the planted gap in all, locked in at different depths of the gap
    lay = {f"block{i}": {**table, "gap_excess": table["gap_ratio"] / (1.5 + i), "above_null": table["gap_ratio"] > 3 + i}
           for i in range(3)}
    return Analysis(source="synthetic", window=window, n_params=1000, table=table, scalars=scalars,
                    metrics=metrics, events=events, probes=pr, tail_index=ti, curvature=cv, layers=lay)


# ------------------------------------------------------------------------------------------------
# what a reader (and a journal's PDF checker) sees
# ------------------------------------------------------------------------------------------------
def pdf_fonts(pdf: bytes) -> list[str]:
    """The /Subtype of every font object in a PDF."""
    return [m.decode() for m in re.findall(rb"/Type\s*/Font\s*/Subtype\s*/(\w+)", pdf)]


def check_pdf(pdf: bytes, width_in: float) -> None:
    assert pdf.startswith(b"%PDF")
    assert b"/Type3" not in pdf and b"/Subtype /Type3" not in pdf, "Type 3 font in the PDF"
    fonts = pdf_fonts(pdf)
    assert fonts and set(fonts) <= {"TrueType", "Type0", "CIDFontType2"}, fonts
    assert pdf.count(b"/FontFile2") >= fonts.count("TrueType") + fonts.count("CIDFontType2")  # embedded
    box = re.findall(rb"/MediaBox\s*\[\s*([\d.\s]+)\]", pdf)
    assert len(box) == 1
    x0, y0, w, h = (float(v) for v in box[0].split())
    assert (x0, y0) == (0, 0) and abs(w - 72 * width_in) < 0.01 and 72 <= h <= 72 * 9.5
    assert b"CreationDate" not in pdf


def check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    ink = np.any(img < 0.97, axis=-1).mean()  # fraction of pixels that are not white paper
    assert ink > 0.03 and img.std() > 0.05, f"{path.name} looks blank (ink {ink:.3f})"


def layout_problems(fig) -> list[str]:
    """Anything drawn outside the page, legends over a panel's data area or over a title,
    overlapping titles."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    out = []
    drawn = fig.get_tightbbox(r)  # inches; only what is drawn (tick labels in view, titles, legends)
    w, h = fig.get_size_inches()
    tol = 1 / 72
    if drawn.x0 < -tol or drawn.y0 < -tol or drawn.x1 > w + tol or drawn.y1 > h + tol:
        out.append(f"clipped: drawn area {drawn.bounds} exceeds the page {w:g} x {h:g} in")
    titles = [(ax, ax._left_title) for ax in fig.axes if ax._left_title.get_text()]
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None:
            continue
        lb = leg.get_window_extent(r)
        inner = ax.bbox.padded(-2)
        if lb.overlaps(inner):
            out.append(f"legend over the data of {ax._left_title.get_text()!r}")
        for _, tt in titles:
            if lb.overlaps(tt.get_window_extent(r)):
                out.append(f"legend over the title {tt.get_text()!r}")
    for i, (_, a) in enumerate(titles):
        for _, b in titles[i + 1:]:
            if a.get_window_extent(r).overlaps(b.get_window_extent(r)):
                out.append(f"titles overlap: {a.get_text()!r}, {b.get_text()!r}")
    return out


@pytest.fixture(scope="module")
def sample():
    return phasewatch.analyze(SAMPLE, window=10, layers=True)


@pytest.fixture(scope="module")
def synth():
    return synthetic_analysis(1500)


# ------------------------------------------------------------------------------------------------
# styles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("science", [False, True])
def test_paper_style_settings(science):
    if science and not style.scienceplots_available():
        pytest.skip("SciencePlots not installed")
    with paper_style(science=science):
        rc = matplotlib.rcParams
        assert rc["pdf.fonttype"] == 42 and rc["ps.fonttype"] == 42 and not rc["text.usetex"]
        sizes = [rc[k] for k in ("font.size", "axes.titlesize", "axes.labelsize", "xtick.labelsize",
                                 "ytick.labelsize", "legend.fontsize")]
        assert all(7 <= s <= 9 for s in sizes)
        assert rc["axes.prop_cycle"].by_key()["color"][:3] == ["#0072B2", "#E69F00", "#009E73"]
        assert rc["font.family"][-1] == "DejaVu Sans" and "serif" not in rc["font.family"]
        assert (rc["font.family"][0] == "STIXGeneral") == science
    assert matplotlib.rcParams["pdf.fonttype"] != 42 or matplotlib.rcParams["font.size"] != 8  # restored


def test_widths_and_errors():
    assert WIDTHS == {"column": 3.25, "text": 5.5, "full": 6.75}
    assert style.figure_width("column") == 3.25 and style.figure_width(4) == 4.0
    for bad in ("wide", 0.2):
        with pytest.raises(phasewatch.PhasewatchError):
            style.figure_width(bad)
    if not style.scienceplots_available():
        with pytest.raises(phasewatch.PhasewatchError, match="SciencePlots"):
            with paper_style(science=True):
                pass
    with pytest.raises(phasewatch.PhasewatchError, match="format"):
        save(plt.figure(), "/tmp/x.gif")
    assert len(set(style.PALETTE)) == 8 and len({str(s) for s in style.LINESTYLES}) == 8


# ------------------------------------------------------------------------------------------------
# the reductions of long series, against brute force
# ------------------------------------------------------------------------------------------------
def test_decimate_keeps_every_bucket_extreme_in_order():
    rng = np.random.default_rng(3)
    n, buckets = 10_007, 100
    x = np.arange(n) * 2 + 5
    y = rng.standard_normal(n)
    y[1234] = 50.0
    y[8000] = -40.0
    y[3000:3200] = np.nan  # a gap of whole buckets
    xs, ys = F._decimate(x, y, buckets)
    m = -(-n // buckets)
    assert len(xs) == 2 * (-(-n // m)) <= 2 * buckets
    for b in range(-(-n // m)):
        seg = y[b * m:(b + 1) * m]
        got = ys[2 * b: 2 * b + 2]
        if not np.isfinite(seg).any():
            assert np.isnan(got).all()
            continue
        lo, hi = np.nanargmin(seg) + b * m, np.nanargmax(seg) + b * m
        assert sorted(got.tolist()) == sorted([y[lo], y[hi]])
        assert xs[2 * b: 2 * b + 2].tolist() == [x[min(lo, hi)], x[max(lo, hi)]]  # order of occurrence
    assert ys[np.isfinite(ys)].max() == 50.0 and ys[np.isfinite(ys)].min() == -40.0
    short = np.arange(50.0)
    assert F._decimate(short, short, 100)[1] is not None and len(F._decimate(short, short, 100)[1]) == 50


def test_envelope_and_shading_reductions():
    rng = np.random.default_rng(4)
    n = 5000
    x = np.arange(n)
    lo = rng.random(n)
    hi = lo + rng.random(n)
    xe, le, he = F._envelope(x, lo, hi, buckets=50)
    assert len(xe) == 100
    for b in range(50):
        assert le[2 * b] == lo[b * 100:(b + 1) * 100].min() and he[2 * b] == hi[b * 100:(b + 1) * 100].max()
        assert (xe[2 * b], xe[2 * b + 1]) == (b * 100, b * 100 + 99)
    codes = np.repeat([0, 2, 1, 2], [1000, 1020, 2500, 480])
    codes[10:30] = 2  # a minority inside a bucket (of 50) does not win it
    fig, ax = plt.subplots()
    F._shade_codes(ax, x, codes, F.REGIME_COLOURS, buckets=100)
    spans = sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches)
    assert spans == [(0, 1000), (1000, 2000), (2000, 4500), (4500, 4999)]
    colours = [p.get_facecolor() for p in sorted(ax.patches, key=lambda p: p.get_x())]
    want = [matplotlib.colors.to_rgba(F.REGIME_COLOURS[c]) for c in (0, 2, 1, 2)]
    assert [tuple(np.round(c, 6)) for c in colours] == [tuple(np.round(c, 6)) for c in want]
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# every figure, from the sample run and from synthetic analyses
# ------------------------------------------------------------------------------------------------
def test_sample_run_figures(sample):
    """The sample run (Adam, 300 steps, no gradient samples or curvature probes) gives the
    overview, noise, spectrum and Hill figures, laid out cleanly at text width (their files are
    checked through the command line below; noise is the overview's α panel); the curvature
    figures say what to record."""
    for name, fn in FIGURES.items():
        if name == "noise":
            continue
        if name in CURVATURE_FIGURES:
            with pytest.raises(MissingDataError) as ei:
                fn(sample)
            msg = str(ei.value)
            assert "\n" not in msg and msg.startswith(name) and "record" in msg
            continue
        fig = fn(sample, width="text")
        assert layout_problems(fig) == [], name
        if name == "overview":  # loss/accuracy, σ, k*, A and α (no gradient samples: no C)
            titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
            assert [t[:3] for t in titles] == ["(a)", "(b)", "(c)", "(d)", "(e)"] and "Hill" in titles[-1]
        plt.close(fig)


def test_synthetic_figures(synth, tmp_path):
    """Every figure, with every panel filled, at column width (the hardest to lay out)."""
    for name, fn in FIGURES.items():
        fig = fn(synth, width="column")
        assert layout_problems(fig) == [], name
        save(fig, tmp_path / f"{name}.pdf")
        if name == "overview":
            assert sum(1 for ax in fig.axes if ax.get_title(loc="left")) == 6  # C and α panels included
        plt.close(fig)
        check_pdf((tmp_path / f"{name}.pdf").read_bytes(), 3.25)


def test_synthetic_figures_lay_out_at_full_width(synth):
    """The figures with the most legend entries (text width: the sample run's figures above; the
    single-panel figures also in a grid below)."""
    for name in ("overview", "spectrum", "hill"):
        fig = FIGURES[name](synth, width="full")
        assert abs(fig.get_figwidth() - 6.75) < 1e-9
        assert layout_problems(fig) == [], name
        plt.close(fig)


def test_plain_savefig_still_embeds_truetype(synth, tmp_path):
    """A user who saves with ``fig.savefig`` outside the style gets the same safe PDF."""
    assert matplotlib.rcParams["pdf.fonttype"] == 3  # matplotlib's default: Type 3
    fig = FIGURES["criticality"](synth, width="column")
    fig.savefig(tmp_path / "c.pdf")
    fig.savefig(tmp_path / "c2.pdf")
    plt.close(fig)
    pdf = (tmp_path / "c.pdf").read_bytes()
    check_pdf(pdf, 3.25)
    assert pdf == (tmp_path / "c2.pdf").read_bytes() and matplotlib.rcParams["pdf.fonttype"] == 3


def test_plain_matplotlib_path(synth, tmp_path, monkeypatch):
    """Without SciencePlots (forced), the same figures embed DejaVu as TrueType."""
    monkeypatch.setattr(style, "SCIENCE", False)
    fig = FIGURES["noise"](synth, width="column")
    assert layout_problems(fig) == []
    save(fig, tmp_path / "o.pdf")
    pdf = (tmp_path / "o.pdf").read_bytes()
    check_pdf(pdf, 3.25)
    assert b"DejaVuSans" in pdf and b"STIX" not in pdf
    plt.close(fig)


@pytest.mark.parametrize("fmt", ["pdf", "svg", "png"])
def test_files_are_byte_identical_on_repeat(synth, tmp_path, fmt):
    for name in ("spectrum", "sharpness") if fmt == "pdf" else ("spectrum",):
        blobs = []
        for i in range(2):
            fig = FIGURES[name](synth, width="column")
            save(fig, tmp_path / f"{name}{i}.{fmt}", dpi=72)
            plt.close(fig)
            blobs.append((tmp_path / f"{name}{i}.{fmt}").read_bytes())
        assert blobs[0] == blobs[1], name
    if fmt == "svg":
        assert b"<dc:date>" not in blobs[0]


def test_million_step_run_gives_small_pdfs(tmp_path):
    """10⁶ steps (10⁴ gradient measurements, 10³ curvature probes): the figures of long series under
    300 kB each (NTK and criticality draw the same 10³ probes as sharpness), each
    line at most 2 points per bucket, and the extremes of the series still drawn."""
    big = synthetic_analysis(1_000_000, window=6, probe_every=100, curvature_every=1000)
    big.table["A"][777_777] = 1e9  # a one-step spike must survive decimation
    sizes = {}
    for name in ("overview", "spectrum", "hill", "sharpness"):  # the overview holds noise's two panels
        fig = FIGURES[name](big, width="full")
        for ax in fig.axes:
            for line in ax.get_lines():
                assert len(line.get_xdata()) <= 2 * F._nb(fig) + 2, (name, line.get_label())
        if name == "overview":
            a_panel = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("(d)"))
            assert max(np.nanmax(ln.get_ydata()) for ln in a_panel.get_lines()) == 1e9
        save(fig, tmp_path / f"{name}.pdf")
        plt.close(fig)
        sizes[name] = (tmp_path / f"{name}.pdf").stat().st_size
        check_pdf((tmp_path / f"{name}.pdf").read_bytes(), 6.75)
    assert max(sizes.values()) < 300_000, sizes


# ------------------------------------------------------------------------------------------------
# the numbers drawn are the numbers given
# ------------------------------------------------------------------------------------------------
def test_spectrum_heat_map_holds_the_gap_ratios():
    a = synthetic_analysis(300, window=6)
    fig = FIGURES["spectrum"](a)
    mesh = next(c for c in fig.axes[0].collections if hasattr(c, "get_array"))
    got = np.ma.filled(mesh.get_array().reshape(5, 300).astype(float), np.nan)
    sig = a.table["sigma"]
    want = (sig[:, :-1] / sig[:, 1:]).T
    want[:, ~a.table["valid"]] = np.nan
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the planted gap after mode 2 is the largest ratio in the middle of training
    middle = (a.table["step"] > 130) & (a.table["step"] < 200)
    assert np.all(np.nanargmax(got[:, middle], axis=0) == 1)
    plt.close(fig)
    # long runs: the largest ratio per column
    big = synthetic_analysis(50_000, window=6, probes=False, curvature=False)
    fig = F.spectrum(big, columns=100)
    mesh = next(c for c in fig.axes[0].collections if hasattr(c, "get_array"))
    got = np.ma.filled(mesh.get_array().reshape(5, 100).astype(float), np.nan)
    sig = big.table["sigma"]
    r = sig[:, :-1] / sig[:, 1:]
    r[~big.table["valid"]] = -np.inf
    want = r.reshape(100, 500, 5).max(axis=1).T
    np.testing.assert_allclose(got, want, rtol=1e-12)
    plt.close(fig)


def test_hill_plot_marks_the_estimate(synth):
    fig = FIGURES["hill"](synth)
    ax = fig.axes[0]
    ref = tails.hill(synth.scalars["grad_norm"], rule="fraction", input_description="gradient norms")
    assert ref.k == 150 and abs(ref.estimate - 1.5) < 0.35  # Pareto(1.5) norms
    pts = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 1]
    assert any(ln.get_xdata()[0] == ref.k and ln.get_ydata()[0] == pytest.approx(ref.estimate, rel=1e-12)
               for ln in pts)
    curve = next(ln for ln in ax.get_lines() if len(ln.get_xdata()) > 50)
    k = np.asarray(curve.get_xdata(), dtype=np.int64)
    np.testing.assert_allclose(curve.get_ydata(), tails.hill_curve(synth.scalars["grad_norm"], k).alpha)
    title = ax.get_title(loc="left").replace("$", "")
    assert f"k = {ref.k}" in title and f"{ref.estimate:.2f} [{ref.ci[0]:.2f}, {ref.ci[1]:.2f}]" in title
    plt.close(fig)
    fig = F.hill_plot(synth, rule="ks", x=np.random.default_rng(0).standard_normal(3000), description="Gaussian")
    assert "no evidence of a stable heavy tail" in fig.axes[0].get_title(loc="left")
    plt.close(fig)


def test_sharpness_threshold_and_beyond_the_edge(synth):
    cv = synth.curvature
    fig = FIGURES["sharpness"](synth)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert r"$2/\eta$" in labels and r"$S < 0$" in labels
    thr = next(ln for ln in ax.get_lines() if ln.get_label() == r"$2/\eta$")
    np.testing.assert_allclose(thr.get_ydata(), 2 / cv["lr"])
    bars = next(c for c in ax.containers if "Lanczos" in c.get_label())  # λ_max with residual bars
    np.testing.assert_allclose(bars.lines[0].get_ydata(), cv["lambda_max"])
    segs = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in segs], 2 * cv["lambda_residual"], rtol=1e-9)
    beyond = cv["step"][cv["lambda_max"] > cv["threshold"]]
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
    assert spans and spans[0][0] == beyond[0]
    plt.close(fig)
    # an optimizer-specific threshold is not labelled 2/η
    other = synthetic_analysis(600)
    other.curvature["threshold"] = 38 / other.curvature["lr"]
    fig = FIGURES["sharpness"](other)
    assert "stability threshold" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)


def test_criticality_windows_cover_the_critical_probes(synth):
    cv = synth.curvature
    assert cv["all_critical"].sum() >= 1
    fig = FIGURES["criticality"](synth)
    ax = fig.axes[0]
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
    st = cv["step"].astype(float)
    for s, c in zip(st, cv["all_critical"]):
        inside = any(a <= s <= b for a, b in spans)
        assert inside == bool(c), s
    phi = next(ln for ln in ax.get_lines() if ln.get_label() == r"$\Phi$")
    np.testing.assert_allclose(phi.get_ydata(), cv["phi"])
    plt.close(fig)


def test_ntk_panels(synth):
    fig = FIGURES["ntk"](synth)
    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert len(axes) == 2
    np.testing.assert_allclose(axes[0].get_lines()[0].get_ydata(), synth.curvature["ntk_rho"])
    np.testing.assert_allclose(axes[1].get_lines()[0].get_ydata(), synth.curvature["ntk_rate"])
    plt.close(fig)


def test_single_panel_figures_draw_into_a_given_axes(synth, tmp_path):
    with paper_style():
        fig, axes = plt.subplots(2, 3, figsize=(6.75, 4), layout="constrained")
    for ax, name in zip(axes.ravel(), ("spectrum", "hill", "sharpness", "ntk", "criticality")):
        assert FIGURES[name](synth, ax=ax) is fig
        assert ax.has_data()
    assert len(fig.axes) == 6 + 1  # the colour bar of the heat map
    save(fig, tmp_path / "grid.pdf")
    check_pdf((tmp_path / "grid.pdf").read_bytes(), 6.75)
    plt.close(fig)


def test_missing_data_raises_one_line(synth):
    bare = synthetic_analysis(80, probes=False, curvature=False, tail=False)
    for name in ("noise", *CURVATURE_FIGURES):
        with pytest.raises(MissingDataError) as ei:
            FIGURES[name](bare)
        assert "\n" not in str(ei.value) and str(ei.value).startswith(name)
    with pytest.raises(MissingDataError, match="C"):
        F.overview(bare, panels=("loss", "C"))
    with pytest.raises(phasewatch.PhasewatchError, match="choose from"):
        F.overview(bare, panels=("nope",))
    fig = F.overview(bare)  # what there is: loss, σ, k*, A
    assert sum(1 for ax in fig.axes if ax.get_title(loc="left")) == 4
    plt.close(fig)
    only_c = synthetic_analysis(600, curvature=False, tail=False)
    fig = F.noise(only_c)
    assert [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")] == ["consolidation ratio"]
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------
def test_cli_plot_all_skips_absent_data(tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["plot", str(SAMPLE), "--figure", "all", "--format", "pdf", "png", "--width", "column",
                 "--dpi", "60", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    skipped = [ln for ln in lines if ln.startswith("skipped")]
    assert [ln.split()[1].rstrip(":") for ln in skipped] == list(CURVATURE_FIGURES)
    for name in ("overview", "noise", "spectrum", "hill"):
        check_pdf((out / f"{name}.pdf").read_bytes(), 3.25)
        check_png(out / f"{name}.png")
        import matplotlib.image as mpimg

        assert mpimg.imread(out / f"{name}.png").shape[1] == round(3.25 * 60)
    assert not (out / "sharpness.pdf").exists()
    # a named figure whose data are absent is an error, in one line
    assert main(["plot", str(SAMPLE), "--figure", "sharpness", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("phasewatch: error: sharpness:") and "\n" not in err
    for args, needle in ((["--figure", "nope"], "unknown figure"), (["--format", "eps"], "--format eps"),
                         (["--dpi", "1"], "--dpi")):
        assert main(["plot", str(SAMPLE), "--out", str(out), *args]) == 1
        assert needle in capsys.readouterr().err


def test_cli_on_a_run_with_gradient_samples(tmp_path, capsys):
    """A run file holding updates, gradient norms, evaluations and gradient-sample statistics
    (written by the store's RunWriter from known arrays): the overview gets its C and α panels."""
    from phasewatch.analysis import noise as nz
    from phasewatch.analysis.gram import band_from_updates
    from phasewatch.store import RunWriter
    from phasewatch.store import format as fmt

    rng = np.random.default_rng(7)
    T, P, k = 160, 60, 8
    U = rng.standard_normal((T, P)) * np.linspace(1.0, 0.2, T)[:, None]
    band = band_from_updates(U, k)
    steps = np.arange(1, T + 1)
    meta = {"model": {"n_params": P, "groups": [{"name": "all"}]}, "recorder": {"k": k, "mode": "exact"}}
    tables = [fmt.steps_table(1, 1), fmt.band_table(1, k), fmt.metrics_table(), fmt.grad_samples_table(1, 8)]
    with RunWriter(tmp_path / "run", meta, tables) as w:
        w.append("steps", step=steps, wall_time=np.zeros(T), loss=np.exp(-steps / 60), lr=np.full((T, 1), 0.1),
                 grad_norm=rng.pareto(1.5, T) + 1, layer_grad_norm=np.ones((T, 1)),
                 update_norm=np.sqrt(band[:, 0]), flags=np.zeros(T, dtype="i4"))
        w.append("band", step=steps, lr=np.full(T, 0.1), band=band, layer_band=band[:, None, :])
        ev = steps[::10]
        w.append("metrics", step=ev, name=np.array([b"test_acc"] * len(ev)), value=np.minimum(1.0, ev / 120))
        for i, mu in enumerate(np.linspace(0.02, 1.0, 12)):
            G = rng.standard_normal((32, P)) + mu
            st = nz.sufficient_statistics(G)
            w.append("grad_samples", step=[10 * (i + 1)], n=[32], b=[1.0], source=[b"per_example"],
                     mean_sq_norm=[st.mean_sq_norm], trace=[st.trace], quad=[st.quad], trace_sq=[st.trace_sq],
                     fourth=[st.fourth], third=[st.third], layer_mean_sq_norm=[[st.mean_sq_norm]],
                     layer_trace=[[st.trace]], sample_norms=[np.linalg.norm(G, axis=1)[:8]])
    out = tmp_path / "figs"
    assert main(["plot", str(tmp_path / "run"), "--window", "5", "--figure", "overview", "--format", "pdf",
                 "--width", "full", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'overview.pdf'}"
    check_pdf((out / "overview.pdf").read_bytes(), 6.75)
    res = phasewatch.analyze(tmp_path / "run", window=5)
    assert len(res.probes["step"]) == 12 and len(res.tail_index["step"]) == T - 99
    fig = FIGURES["overview"](res, width="full")
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert titles[-2].startswith("(e) consolidation") and titles[-1].startswith("(f) Hill")
    C = next(ln for ln in fig.axes[4].get_lines() if ln.get_label() == "C (canonical)")
    np.testing.assert_allclose(C.get_ydata(), res.probes["C"])
    plt.close(fig)


def test_gallery_images_are_small():
    """docs/gallery (made with ``phasewatch plot … --format png --dpi 150``) stays light for the README."""
    gallery = Path(__file__).resolve().parents[2] / "docs" / "gallery"
    pngs = sorted(gallery.glob("*.png"))
    assert {p.stem for p in pngs} >= {"overview", "spectrum", "hill"}
    for p in pngs:
        assert p.stat().st_size < 200_000, p.name
        check_png(p)


def test_noise_panel_shows_the_upper_end_where_C_is_zero(synth):
    """A bias-corrected C reported as 0 has no place on the log axis: a marker at the CI's upper end
    instead of a drop to the axis (issue 17)."""
    import dataclasses

    pr = dict(synth.probes)
    zero = np.arange(len(pr["C"])) % 5 == 0
    pr["C"] = np.where(zero, 0.0, pr["C"])
    pr["C_lo"] = np.where(zero, 0.0, pr["C_lo"])
    fig = F.noise(dataclasses.replace(synth, probes=pr))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    marks = [ln for ln in ax.get_lines() if ln.get_marker() == "v"]
    assert len(marks) == 1
    np.testing.assert_array_equal(marks[0].get_xdata(), pr["step"][zero])
    np.testing.assert_array_equal(marks[0].get_ydata(), pr["C_hi"][zero])
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "C (canonical)")
    xy = line.get_transform().transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
    assert not np.isfinite(xy[zero, 1]).any() and np.isfinite(xy[~zero, 1]).all()  # masked: a gap, no drop
    plt.close(fig)


def test_overview_shows_logged_losses(tmp_path):
    """A run that logs ``val_loss`` with ``rec.log`` shows it in panel (a) beside the train loss, at
    the logged steps with the logged values (a real recorded run)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    xv, yv = torch.randn(16, 4), torch.randn(16, 2)
    logged = {}
    with phasewatch.Recorder(tmp_path / "run", model, opt, k=8, strict=True) as rec:
        for step in range(1, 41):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            rec.loss(loss)
            opt.step()
            if step % 10 == 0:
                with torch.no_grad():
                    logged[step] = float(torch.nn.functional.mse_loss(model(xv), yv))
                rec.log(step, val_loss=logged[step])
    a = phasewatch.analyze(tmp_path / "run", window=5)
    fig = F.overview(a)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert "train loss" in lines and "val_loss" in lines
    np.testing.assert_array_equal(lines["val_loss"].get_xdata(), sorted(logged))
    np.testing.assert_allclose(lines["val_loss"].get_ydata(), [logged[s] for s in sorted(logged)], rtol=1e-7)
    plt.close(fig)
