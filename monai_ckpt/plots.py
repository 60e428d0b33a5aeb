"""Plots of benchmark results (matplotlib, written to PNG files without a display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from .profiling import BlockCost, MiB

__all__ = ["TradeoffPoint", "plot_benchmark"]


class TradeoffPoint(Protocol):
    """One policy on the memory/time plot (`monai_ckpt.benchmark.BenchmarkRow` is one)."""

    name: str
    peak_vs_plain: float
    time_ratio: float | None


def _pyplot():  # noqa: ANN202
    import matplotlib

    if "inline" not in matplotlib.get_backend():  # keep a notebook's inline backend
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_benchmark(
    path: str | None,
    rows: Sequence[TradeoffPoint],
    timelines: Mapping[str, Sequence[tuple[int, int, str]]] | None = None,
    blocks: Sequence[BlockCost] | None = None,
    title: str = "",
):  # noqa: ANN201 - a matplotlib Figure when path is None
    """Up to three panels: peak memory vs step time per policy, the memory timeline of one step for some
    policies, and a per-segment heatmap (activation memory kept, forward time). Written to ``path`` as a
    PNG; with ``path=None`` the figure is returned instead (to show it inline in a notebook)."""
    plt = _pyplot()
    panels = 1 + bool(timelines) + bool(blocks)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.2), squeeze=False)
    axes = list(axes[0])

    ax = axes.pop(0)
    timed = [r for r in rows if r.time_ratio is not None]
    xs = [r.time_ratio if r.time_ratio is not None else 1.0 for r in rows]
    for r, x in zip(rows, xs):
        monai = r.name.startswith("MONAI")
        ax.scatter(x, 100 * r.peak_vs_plain, s=40, marker="s" if monai else "o", color="tab:red" if monai else "tab:blue")
        ax.annotate(r.name.split(" ", 1)[-1][:40], (x, 100 * r.peak_vs_plain), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xlabel("step time vs plain" if timed else "step time vs plain (not measured: estimate mode)")
    ax.set_ylabel("peak training memory, % of plain")
    ax.set_title("memory / time trade-off")
    ax.grid(alpha=0.3)

    if timelines:
        ax = axes.pop(0)
        for name, points in timelines.items():
            ax.plot([p[0] for p in points], [p[1] / MiB for p in points], label=name[:40], linewidth=1)
        ax.set_xlabel("operator index in one training step")
        ax.set_ylabel("live tensors, MiB")
        ax.set_title("memory timeline (forward, backward, optimizer)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    if blocks:
        ax = axes.pop(0)
        segments = list(dict.fromkeys(b.segment for b in blocks))
        kept = [sum(b.saved_bytes for b in blocks if b.segment == s) / MiB for s in segments]
        last = {b.segment: b for b in blocks}
        boundary = [last[s].output_bytes / MiB for s in segments]
        fwd = [sum((b.forward_s or 0.0) for b in blocks if b.segment == s) * 1e3 for s in segments]
        metrics = [("activations kept, MiB", kept), ("output (boundary), MiB", boundary)]
        metrics += [("forward, ms", fwd)] if any(fwd) else []
        grid = [[v / (max(vals) or 1.0) for v in vals] for _, vals in metrics]
        ax.imshow(grid, aspect="auto", cmap="viridis")
        for i, (_, vals) in enumerate(metrics):
            for j, v in enumerate(vals):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(len(segments)), segments, rotation=60, fontsize=7)
        ax.set_yticks(range(len(metrics)), [m for m, _ in metrics], fontsize=8)
        ax.set_title("per segment, without checkpointing")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
