"""The report's figures as PNG bytes: a forest plot of gaps, score vs budget, per-split bars.

Why bytes: the report writes each figure to a file AND embeds it in report.html as base64, so the
HTML is one self-contained file. Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas
directly (no pyplot), so no global backend or figure state is touched and it works without a display.
All values are in points (x 100), as in the report's text.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DPI = 110


@dataclass(frozen=True)
class ForestRow:
    label: str
    gap: float  # A - B, points
    low: float
    high: float
    significant: bool  # after Holm
    paper_gap: float | None = None


@dataclass(frozen=True)
class Series:
    """One configuration family across budgets (same method, version, model, quant, ...)."""

    label: str
    budgets: tuple  # x
    values: tuple  # y, points
    lows: tuple
    highs: tuple
    published: tuple = field(default_factory=tuple)  # ((budget, value), ...)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def forest(rows: Sequence[ForestRow], *, metric: str = "mean F1 (LLaVA rule)") -> bytes:
    """Each comparison's gap with its 95% interval; filled = significant after Holm; x = paper's gap."""
    fig = _figure(8, 0.9 + 0.42 * max(1, len(rows)))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]  # first comparison on top
    for yi, row in zip(y, rows):
        colour = "tab:blue" if row.significant else "tab:gray"
        ax.errorbar(row.gap, yi, xerr=[[row.gap - row.low], [row.high - row.gap]], fmt="o", color=colour,
                    markerfacecolor=colour if row.significant else "white", capsize=3)
        if row.paper_gap is not None:
            ax.plot(row.paper_gap, yi, "x", color="tab:red", markersize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [r.label for r in rows])
    ax.set_xlabel(f"gap A - B in {metric}, points (95% paired cluster-bootstrap CI)")
    ax.set_title("Gaps (filled: significant after Holm; red x: the papers' gap)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def budget_curves(series: Sequence[Series], references: Sequence[tuple[str, float]] = ()) -> bytes:
    """Mean F1 vs budget per method with 95% intervals; dashed lines for unpruned references;
    hollow squares for published values."""
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(series))]
    for colour, s in zip(colours, series):
        order = np.argsort(s.budgets)
        x, v = np.asarray(s.budgets, float)[order], np.asarray(s.values)[order]
        err = [v - np.asarray(s.lows)[order], np.asarray(s.highs)[order] - v]
        ax.errorbar(x, v, yerr=err, marker="o", capsize=3, color=colour, label=s.label,
                    linestyle="-" if len(x) > 1 else "none")
        if s.published:
            px, pv = zip(*s.published)
            ax.plot(px, pv, "s", markerfacecolor="none", color=colour, markersize=8, label=f"{s.label} (paper)")
    for i, (name, value) in enumerate(references):
        ax.axhline(value, linestyle="--", color=f"C{(len(series) + i) % 10}", linewidth=1, label=name)
    budgets = sorted({b for s in series for b in s.budgets})
    if budgets:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(int(b)) if float(b).is_integer() else str(b) for b in budgets])
        ax.minorticks_off()
    ax.set_xlabel("visual-token budget (nominal)")
    ax.set_ylabel("mean F1 over splits (LLaVA rule), points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def split_bars(labels: Sequence[str], splits: Sequence[str], values: np.ndarray) -> bytes:
    """F1 per split (LLaVA rule) for each configuration: (n_configs, n_splits) points."""
    values = np.asarray(values, dtype=float)
    fig = _figure(max(6.0, 0.7 * len(labels) * max(1, len(splits)) / 2 + 2), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(splits))
    for s, split in enumerate(splits):
        ax.bar(x + (s - (len(splits) - 1) / 2) * width, values[:, s], width, label=split)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("F1 (LLaVA rule), points")
    low = np.nanmin(values) if values.size else 0
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
