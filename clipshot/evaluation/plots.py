"""Figures for the evaluation report, rendered headless with the Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` instead of pyplot: no
display is needed, no global backend is switched under the host application, and nothing stays
registered in pyplot's figure manager after saving.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clipshot.anomaly_map import OVERLAY_COLORMAP, OVERLAY_COLORMAP_START, colour_scale

from .metrics import QUALITY_METRICS

if TYPE_CHECKING:
    from .protocol import Example

_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
           "image_f1max": "image F1-max", "pixel_f1max": "pixel F1-max"}
_LINESTYLES = ("-", "--", ":", "-.")
# The service overlay's palette: normal pixels untinted (masked), yellow -> dark red from threshold to 2x.
_OVERLAY_CMAP = mpl.colors.ListedColormap(mpl.colormaps[OVERLAY_COLORMAP](np.linspace(OVERLAY_COLORMAP_START, 1, 256)))



def plot_shots(rows: Sequence[dict[str, Any]], out_path: str | Path, *,
               metrics: Sequence[str] = QUALITY_METRICS) -> Path:
    """Metrics vs shot count, one subplot per category (incl. the mean row), error bars = std.

    Input is ``report.aggregate`` output. Shot counts are evenly spaced on the x axis (0, 1, 2, 4,
    ... would crowd on a linear axis and 0 has no log). Several modes get different line styles.
    """
    if not rows:
        raise ValueError("no aggregated rows to plot")
    categories = list(dict.fromkeys(r["category"] for r in rows))  # aggregate() order: mean last
    modes = sorted({r["mode"] for r in rows})
    shot_values = sorted({int(r["shots"]) for r in rows})
    xpos = {k: i for i, k in enumerate(shot_values)}
    ncols = min(4, len(categories))
    nrows = math.ceil(len(categories) / ncols)
    fig = _figure((max(7.0, 4.2 * ncols), 3.3 * nrows + 0.8))  # room for the legend below
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    colors = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, cat in zip(axes.flat, categories, strict=False):
        for mi, mode in enumerate(modes):
            sel = sorted((r for r in rows if r["category"] == cat and r["mode"] == mode),
                         key=lambda r: r["shots"])
            for ci, metric in enumerate(metrics):
                pts = [(xpos[r["shots"]], r["metrics"][metric]) for r in sel if metric in r["metrics"]]
                if not pts:
                    continue
                label = _LABELS.get(metric, metric) + (f" ({mode})" if len(modes) > 1 else "")
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                            yerr=[p[1]["std"] for p in pts], label=label, capsize=3, marker="o",
                            markersize=3, color=colors[ci % len(colors)],
                            linestyle=_LINESTYLES[mi % len(_LINESTYLES)])
        ax.set_title(cat)
        ax.set_xticks(range(len(shot_values)), [str(k) for k in shot_values])
        ax.set_xlabel("shots")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(categories):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    fig.tight_layout(rect=(0, 0.16 if nrows == 1 else 0.08, 1, 1))
    return _save(fig, out_path)


def plot_examples(examples: Sequence[Example], out_path: str | Path) -> Path:
    """Grid of (image | ground truth | heatmap overlay) triples titled with score, threshold and verdict.

    Each overlay uses the service's colour scale (``colour_scale``: 0 .. 2 x the adapter's threshold), so
    colours mean the same here as in a predict response, and the threshold contour shows what was flagged."""
    if not examples:
        raise ValueError("no examples to plot")
    groups = max(1, math.ceil(math.sqrt(len(examples) / 3)))  # triples per row, roughly square
    nrows = math.ceil(len(examples) / groups)
    fig = _figure((1.9 * 3 * groups, 2.1 * nrows))
    axes = fig.subplots(nrows, 3 * groups, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, example in enumerate(examples):
        row, col = divmod(i, groups)
        ax_img, ax_gt, ax_map = axes[row, 3 * col: 3 * col + 3]
        image, amap = example.image, np.asarray(example.amap, dtype=np.float32)
        extent = (0, image.width, image.height, 0)  # maps/masks may be coarser than the image
        ax_img.imshow(image)
        ax_img.set_title(example.title, fontsize=5, loc="left")
        ax_gt.imshow(np.asarray(example.mask, dtype=bool), cmap="gray", vmin=0, vmax=1, extent=extent)
        ax_gt.set_title("ground truth", fontsize=6)
        lo, hi = colour_scale(example.threshold)
        ax_map.imshow(image)
        ax_map.imshow(np.ma.masked_less_equal(amap, lo), cmap=_OVERLAY_CMAP, alpha=0.6, vmin=lo, vmax=hi,
                      extent=extent)
        if amap.max() > lo > amap.min():
            ax_map.contour(amap, levels=[lo], colors="red", linewidths=0.6, extent=extent, origin="upper")
        ax_map.set_title("above threshold (service colours)", fontsize=5)
    fig.tight_layout()
    return _save(fig, out_path, dpi=80)


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path: str | Path, dpi: int = 100) -> Path:
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
