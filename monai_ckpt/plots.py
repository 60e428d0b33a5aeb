"""Plots of benchmark results (matplotlib, written to PNG files without a display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .profiling import BlockCost, MiB

__all__ = ["TradeoffPoint", "mib_text", "plot_benchmark"]


class TradeoffPoint(Protocol):
    """One policy on the memory/time plot (`monai_ckpt.benchmark.BenchmarkRow` is one; its ``time_noise``, the
    run's noise band, is shaded when the first row has one)."""

    name: str
    peak_vs_plain: float
    time_ratio: float | None


def _pyplot():  # noqa: ANN202
    import matplotlib

    if "inline" not in matplotlib.get_backend():  # keep a notebook's inline backend
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# how a row is drawn: (legend label, marker, colour), by what the row is
_STYLES = {
    "plain": ("plain MONAI network (the reference)", "*", "black"),
    "monai": ("MONAI's own checkpointing", "s", "tab:red"),
    "ours": ("monai_ckpt policy", "o", "tab:blue"),
}


def _style(row: TradeoffPoint) -> str:
    if row.name.endswith("(plain)"):
        return "plain"
    return "monai" if row.name.startswith("MONAI") else "ours"


def _label(row: TradeoffPoint) -> str:
    return row.name.split(" ", 1)[-1][:40]


def mib_text(mib: float) -> str:
    """A MiB figure with as many digits as it needs to be read: 0 only for nothing, ``<0.01`` for a few bytes."""
    if mib == 0:
        return "0"
    if abs(mib) < 0.01:
        return "<0.01"
    if abs(mib) < 1:
        return f"{mib:.2f}"
    return f"{mib:.1f}" if abs(mib) < 10 else f"{mib:.0f}"


def _text_box(label: Any, renderer: Any) -> Any:
    """The display box of an annotation's text alone (not its line), where it is drawn now."""
    from matplotlib.text import Text

    label.update_positions(renderer)
    return Text.get_window_extent(label, renderer)


def _separate_labels(ax: Any, labels: list[Any]) -> None:
    """Move point labels up (in their offset points), lowest point first, until no label's box overlaps another
    label's or any point's marker (a thin line then joins a moved label to its point)."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    r = 5 * fig.dpi / 72  # a marker's half size, in pixels
    markers = [Bbox.from_extents(x - r, y - r, x + r, y + r)
               for x, y in (ax.transData.transform(label.xy) for label in labels)]
    placed: list[Any] = []
    for label in sorted(labels, key=lambda t: t.xy[1]):
        for _ in range(4 * len(labels) + 10):
            box = _text_box(label, renderer)
            hits = [b for b in placed + markers if box.overlaps(b)]
            if not hits:
                break
            x, y = label.xyann
            label.xyann = (x, y + (max(b.y1 for b in hits) - box.y0 + 1) * 72 / fig.dpi)
        placed.append(_text_box(label, renderer))


def _tradeoff(ax: Any, rows: Sequence[TradeoffPoint]) -> list[Any]:
    """Peak memory against step time, one labelled point per row, a legend for each kind of point; returns the
    labels (to separate once the figure's layout is final)."""
    seen: set[str] = set()
    labels = []
    noise = getattr(rows[0], "time_noise", None)
    if noise:
        ax.axvspan(1 - noise, 1 + noise, color="0.85", zorder=0, label=f"noise band of this run (+-{noise:.2f})")
    for r in rows:
        kind = _style(r)
        legend, marker, colour = _STYLES[kind]
        y = 100 * r.peak_vs_plain
        ax.scatter(r.time_ratio, y, s=90 if marker == "*" else 40, marker=marker, color=colour, zorder=3,
                   label=None if kind in seen else legend)
        seen.add(kind)
        labels.append(ax.annotate(_label(r), (r.time_ratio, y), xytext=(7, -3), textcoords="offset points",
                                  fontsize=7, annotation_clip=False,
                                  arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.5, shrinkA=0, shrinkB=5)))
    ax.set_xlabel("step time vs plain (median of interleaved rounds)")
    ax.set_ylabel("peak training memory, % of plain")
    ax.set_title("memory / time trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    ax.margins(x=0.25, y=0.12)
    return labels


def _memory_only(ax: Any, rows: Sequence[TradeoffPoint]) -> list[Any]:
    """Estimate mode (no step time): peak memory per row as bars, coloured by kind, with a legend."""
    seen: set[str] = set()
    for i, r in enumerate(rows):
        kind = _style(r)
        legend, _, colour = _STYLES[kind]
        ax.barh(i, 100 * r.peak_vs_plain, color=colour, alpha=0.8, label=None if kind in seen else legend)
        ax.text(100 * r.peak_vs_plain + 1, i, f"{r.peak_vs_plain:.0%}", va="center", fontsize=7)
        seen.add(kind)
    ax.set_yticks(range(len(rows)), [_label(r) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 118)
    ax.set_xlabel("peak training memory, % of plain")
    ax.set_title("peak memory per policy (estimate: no step time)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    return []


def _timeline(ax: Any, timelines: Mapping[str, Sequence[tuple[int, int, str]]]) -> None:
    for name, points in timelines.items():
        ax.plot([p[0] for p in points], [p[1] / MiB for p in points], label=name[:40], linewidth=1)
    ax.set_xlabel("operator index in one training step")
    ax.set_ylabel("live tensors, MiB")
    ax.set_title("memory timeline (forward, backward, optimizer)")
    ax.legend(fontsize=7, title="policy", title_fontsize=7)
    ax.grid(alpha=0.3)


def _segments(ax: Any, blocks: Sequence[BlockCost]) -> Any:
    """Per segment, the activations it keeps and its output, on one colour scale (MiB) with a colour bar."""
    import matplotlib.colors

    segments = list(dict.fromkeys(b.segment for b in blocks))
    kept = [sum(b.saved_bytes for b in blocks if b.segment == s) / MiB for s in segments]
    last = {b.segment: b for b in blocks}
    boundary = [last[s].output_bytes / MiB for s in segments]
    metrics = [("activations kept", kept), ("output (boundary)", boundary)]
    top = max(max(kept), max(boundary)) or 1.0
    norm = matplotlib.colors.Normalize(vmin=0, vmax=top)
    image = ax.imshow([vals for _, vals in metrics], aspect="auto", cmap="viridis", norm=norm)
    for i, (_, vals) in enumerate(metrics):
        for j, v in enumerate(vals):
            ax.text(j, i, mib_text(v), ha="center", va="center", fontsize=7,
                    color="black" if norm(v) > 0.6 else "white")
    ax.set_xticks(range(len(segments)), segments, rotation=60, fontsize=7)
    ax.set_yticks(range(len(metrics)), [m for m, _ in metrics], fontsize=8)
    ax.set_title("per segment, without checkpointing (MiB)")
    colorbar = ax.figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    colorbar.set_label("MiB")
    return colorbar


def plot_benchmark(
    path: str | None,
    rows: Sequence[TradeoffPoint],
    timelines: Mapping[str, Sequence[tuple[int, int, str]]] | None = None,
    blocks: Sequence[BlockCost] | None = None,
    title: str = "",
):  # noqa: ANN201 - a matplotlib Figure when path is None
    """Up to three panels: peak memory vs step time per policy (peak memory alone when no row has a time, as in
    estimate mode), the memory timeline of one step for some policies, and per segment the activation memory it
    keeps and its output, on one colour scale with a colour bar. Written to ``path`` as a PNG; with ``path=None``
    the figure is returned instead, detached from pyplot, so that a notebook shows it once (as the cell's value or
    with ``display``)."""
    plt = _pyplot()
    panels = 1 + bool(timelines) + bool(blocks)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.2), squeeze=False)
    axes = list(axes[0])
    if title:
        fig.suptitle(title)
    timed = all(r.time_ratio is not None for r in rows)
    labels = _tradeoff(axes[0], rows) if timed else _memory_only(axes[0], rows)
    if timelines:
        _timeline(axes[1], timelines)
    if blocks:
        _segments(axes[-1], blocks)
    fig.tight_layout()
    if labels:
        _separate_labels(axes[0], labels)  # on the final layout
    plt.close(fig)  # detached: pyplot (and a notebook's inline backend) no longer shows it by itself
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    return None
