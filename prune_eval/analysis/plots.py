"""The report's figures as PNG bytes: the reconciliation walk, a forest plot of gaps, score vs budget
(with at least two budgets), per-split bars from 0 with their intervals.

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


@dataclass(frozen=True)
class Walk:
    """One reconciliation: ((label, 'total' | 'step', points), ...) from the published gap to the
    measured one, and the measured gap's 95% interval (points)."""

    title: str
    steps: tuple
    interval: tuple


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


def split_bars(labels: Sequence[str], splits: Sequence[str], values: np.ndarray, errors: np.ndarray | None = None) -> bytes:
    """F1 per split (LLaVA rule) for each configuration: values (n_configs, n_splits) points; errors
    (2, n_configs, n_splits) below/above (NaN: none). Bars start at 0: their length is the value."""
    values = np.asarray(values, dtype=float)
    fig = _figure(max(6.0, 0.7 * len(labels) * max(1, len(splits)) / 2 + 2), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(splits))
    for s, split in enumerate(splits):
        err = None if errors is None else np.nan_to_num(np.asarray(errors)[:, :, s])
        ax.bar(x + (s - (len(splits) - 1) / 2) * width, values[:, s], width, label=split, yerr=err, capsize=2,
               error_kw={"linewidth": 0.8})
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("F1 (LLaVA rule), points; 95% image-cluster CI")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def reconciliation(walks: Sequence[Walk]) -> bytes:
    """A waterfall per reconciliation: totals (published gap, published for the versions run,
    measured) as bars from 0, each axis as a floating bar from the running total; the measured gap
    with its 95% interval."""
    fig = _figure(8.5, 0.8 + 2.8 * max(1, len(walks)))
    for k, walk in enumerate(walks):
        ax = fig.add_subplot(len(walks), 1, k + 1)
        running, labels, ends = 0.0, [], [0.0, *walk.interval]
        for i, (label, kind, value) in enumerate(walk.steps):
            if kind == "total":
                colour = "tab:blue" if label == "measured" else "tab:gray"
                ax.bar(i, value, color=colour, width=0.6)
                top, running = value, value
            else:
                ax.bar(i, value, bottom=running, color="tab:green" if value >= 0 else "tab:red", width=0.6)
                running += value
                top = running
            ends += [top, top - value]
            up = top >= 0 if kind == "total" else value >= 0
            ax.annotate(f"{value:+.2f}", (i + (0.33 if label == "measured" else 0), top), xytext=(0, 4 if up else -4),
                        textcoords="offset points", ha="left" if label == "measured" else "center",
                        va="bottom" if up else "top", fontsize=8)
            labels.append(label.replace(", ", ",\n"))
        low, high = walk.interval
        measured = walk.steps[-1][2]
        ax.errorbar(len(walk.steps) - 1, measured, yerr=[[measured - low], [high - measured]], color="black", capsize=4,
                    linewidth=1, label="measured 95% CI")
        ax.axhline(0, color="black", linewidth=0.8)
        pad = 0.18 * (max(ends) - min(ends) or 1.0)  # room for the labels (bars' sticky edges defeat margins)
        ax.set_ylim(min(ends) - pad, max(ends) + pad)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("gap A - B, points", fontsize=8)
        ax.set_title(walk.title + " (grey: published; red/green: an axis' effect; blue: measured)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)
