"""The report's pictures as PNG bytes (matplotlib, non-interactive Agg backend), for data URIs.

- structure heat map of a pruned variant: the same picture ``prune`` leaves next to the
  checkpoint (:func:`pipeline.pruning.summary.draw_heatmap`: heads kept per layer, kept fraction
  of each row unit, and after step 2 the kept share of blocks per matrix), redrawn from the
  summary so the report never depends on a PNG that may be stale or absent;
- accuracy vs latency: one point per variant at one batch x sequence point, with the Pareto
  front (no other variant is both at least as fast and at least as accurate) drawn as a step line;
- speedup vs dense per batch x sequence point, grouped bars per pruned variant.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

BASELINE_COLOR = "#555555"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def variant_colors(names: list[str], baseline: str | None) -> dict[str, str]:
    """Grey for the baseline, then the palette in the run's variant order."""
    others = [n for n in names if n != baseline]
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(others)}
    return {**colors, **({baseline: BASELINE_COLOR} if baseline else {})}


@dataclass(frozen=True)
class ParetoPoint:
    name: str
    latency_ms: float
    metric: float
    label: str = ""


def pareto_front(points: list[ParetoPoint]) -> list[ParetoPoint]:
    """Points no other point dominates (lower-or-equal latency and higher-or-equal metric,
    strictly better in one), sorted by latency."""

    def dominated(p: ParetoPoint) -> bool:
        return any(
            q.latency_ms <= p.latency_ms
            and q.metric >= p.metric
            and (q.latency_ms < p.latency_ms or q.metric > p.metric)
            for q in points
        )

    return sorted((p for p in points if not dominated(p)), key=lambda p: p.latency_ms)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def structure_png(structure: dict[str, Any]) -> bytes:
    from pipeline.pruning.summary import draw_heatmap  # torch-free module

    buf = io.BytesIO()
    draw_heatmap(structure, buf)  # savefig takes a file object as well as a path
    return buf.getvalue()


def _labels_left(points: list[ParetoPoint]) -> list[bool]:
    """Which labels go left of their point: those whose right-hand neighbour (by latency) is
    close in both axes, where two labels above would overlap."""
    lat = [p.latency_ms for p in points]
    met = [p.metric for p in points]
    x_span, y_span = max(max(lat), 1e-9), max(max(met) - min(met), 1e-9)
    left = [False] * len(points)
    order = sorted(range(len(points)), key=lambda i: lat[i])
    for a, b in pairwise(order):
        if lat[b] - lat[a] < 0.25 * x_span and abs(met[b] - met[a]) < 0.15 * y_span + 1e-6:
            left[a] = True
    return left


def pareto_png(points: list[ParetoPoint], metric_name: str, point_key: str, colors: dict[str, str]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    front = pareto_front(points)
    ax.step(
        [p.latency_ms for p in front],
        [p.metric for p in front],
        where="post",
        color="#999999",
        linestyle="--",
        label="Pareto front",
        zorder=1,
    )
    lat = [p.latency_ms for p in points]
    met = [p.metric for p in points]
    for p, left in zip(points, _labels_left(points), strict=True):
        ax.scatter(
            p.latency_ms,
            p.metric,
            s=90,
            color=colors[p.name],
            edgecolor="black" if p in front else "none",
            zorder=2,
        )
        # above or left of the point: the front's segments leave each point rightwards and
        # reach it from below, so neither side is crossed by a line
        ax.annotate(
            f"{p.name}\n{p.label}".strip(),
            (p.latency_ms, p.metric),
            (-9, 0) if left else (0, 9),
            textcoords="offset points",
            ha="right" if left else "center",
            va="center" if left else "bottom",
            fontsize=9,
        )
    ax.set_xlim(0, max(lat) * 1.25)
    pad = max((max(met) - min(met)) * 0.2, 0.005)
    ax.set_ylim(min(met) - pad, max(met) + 2 * pad)  # room for the labels above the top point
    batch, seq = point_key.split("x")
    ax.set(
        xlabel=f"p50 latency, ms (batch {batch}, sequence {seq})",
        ylabel=f"dev {metric_name}",
        title=f"{metric_name} vs latency (up and left is better)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _png(fig)


def speedup_png(speedups: dict[str, dict[str, float]], colors: dict[str, str]) -> bytes:
    """``speedups``: variant -> {point key -> speedup vs dense}."""
    import numpy as np

    plt = _pyplot()
    keys = sorted(
        {k for v in speedups.values() for k in v}, key=lambda k: tuple(int(x) for x in k.split("x"))
    )
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(keys) + 2.5), 3.6))
    width = 0.8 / max(len(speedups), 1)
    x = np.arange(len(keys))
    for i, (variant, points) in enumerate(speedups.items()):
        values = [points.get(k, np.nan) for k in keys]
        bars = ax.bar(x + i * width, values, width, label=variant, color=colors[variant])
        ax.bar_label(bars, fmt="%.2fx", fontsize=8, padding=2)
    ax.axhline(1.0, color=BASELINE_COLOR, linestyle="--", linewidth=1, label="dense")
    ax.set_xticks(x + width * (len(speedups) - 1) / 2)
    ax.set_xticklabels([k.replace("x", " x ") for k in keys])
    top = max((v for p in speedups.values() for v in p.values()), default=1.0)
    ax.set_ylim(0, max(top, 1.0) * 1.2)
    ax.set(xlabel="batch x sequence", ylabel="speedup vs dense", title="speedup vs dense (median of rounds)")
    ax.legend(fontsize=9, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
