"""The benchmark's figures, read back from matplotlib: labels that do not overlap, a legend entry for every kind of
marker, no time axis without times, one colour scale with a colour bar, MiB labels that are not rounded to 0, and a
returned figure that a notebook shows once."""

import itertools

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from monai_ckpt.benchmark import BenchmarkRow  # noqa: E402
from monai_ckpt.plots import _text_box, mib_text, plot_benchmark  # noqa: E402
from monai_ckpt.profiling import BlockCost, MiB  # noqa: E402

# the crowded case: "none" on top of the plain UNet, "cheap" next to "encoder" and MONAI's nested row
TIMES = [("MONAI UNet (plain)", 1.0, 1.0), ('CheckpointUNet "none"', 1.0, 1.01), ('CheckpointUNet "all"', 0.865, 1.25),
         ('CheckpointUNet "cheap"', 0.865, 1.86), ('CheckpointUNet "sqrt"', 0.909, 2.12),
         ('CheckpointUNet "encoder"', 0.865, 1.92), ('CheckpointUNet "decoder"', 0.909, 1.25),
         ("MONAI CheckpointUNet (nested)", 0.865, 1.64)]
BLOCKS = [BlockCost("encoder0", "encoder0", "encoder", 0, 8 * MiB, 2 * MiB),
          BlockCost("bottleneck", "bottleneck", "bottleneck", 1, int(0.03 * MiB), int(0.004 * MiB)),
          BlockCost("decoder0", "decoder0", "decoder", 0, 6 * MiB, 2 * MiB)]
TIMELINES = {'"none"': [(0, 10 * MiB, "forward"), (1, 20 * MiB, "backward")]}


def _rows(timed: bool) -> list[BenchmarkRow]:
    return [BenchmarkRow(name, 100 * vs, vs, t if timed else None, None, {}, None, 0.05 if timed else None)
            for name, vs, t in TIMES]


@pytest.fixture(scope="module")
def measured():
    fig = plot_benchmark(None, _rows(True), TIMELINES, BLOCKS, title="unet 64x64x64")
    FigureCanvasAgg(fig)  # a canvas to measure the text on (the returned figure is detached from pyplot)
    return fig


def test_point_labels_do_not_overlap_each_other_or_the_points(measured):
    ax = measured.axes[0]
    renderer = measured.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text()]
    assert len(labels) == len(TIMES)
    boxes = [_text_box(t, renderer) for t in labels]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    points = [ax.transData.transform((t, 100 * vs)) for _, vs, t in TIMES]
    for box, (x, y) in itertools.product(boxes, points):
        assert not (box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1)


def test_every_kind_of_marker_has_a_legend_entry(measured):
    legend = [t.get_text() for t in measured.axes[0].get_legend().get_texts()]
    assert legend == ["noise band of this run (+-0.05)", "plain MONAI network (the reference)", "monai_ckpt policy",
                      "MONAI's own checkpointing"]


def test_the_segment_heatmap_has_one_scale_a_colour_bar_and_readable_mib(measured):
    heatmap, colorbar = measured.axes[2], measured.axes[3]
    (image,) = heatmap.get_images()
    assert image.norm.vmin == 0 and image.norm.vmax == pytest.approx(8.0)  # one scale for every row
    assert colorbar.get_ylabel() == "MiB"
    assert [t.get_text() for t in heatmap.texts] == ["8.0", "0.03", "6.0", "2.0", "<0.01", "2.0"]
    assert [mib_text(v) for v in (0, 0.004, 0.25, 3.25, 42.4)] == ["0", "<0.01", "0.25", "3.2", "42"]


def test_estimate_mode_has_no_time_axis_and_the_figure_is_shown_once(tmp_path):
    fig = plot_benchmark(None, _rows(False))
    assert fig.number not in plt.get_fignums()  # detached: a notebook's display(fig) is its only appearance
    ax = fig.axes[0]
    assert ax.get_xlabel() == "peak training memory, % of plain" and "time" not in ax.get_title()[:25]
    assert [t.get_text() for t in ax.get_yticklabels()] == [name.split(" ", 1)[1] for name, _, _ in TIMES]
    assert len(ax.get_legend().get_texts()) == 3
    plot_benchmark(str(tmp_path / "estimate.png"), _rows(False), TIMELINES, BLOCKS)
    assert (tmp_path / "estimate.png").stat().st_size > 10_000
