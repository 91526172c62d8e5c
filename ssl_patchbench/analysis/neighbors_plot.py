"""Plots and files of the neighbour analysis: the Figure 4 patch grid, the share-of-neighbours bar chart, and
``write_neighbors`` (the analysis itself, in ``neighbors``, knows nothing of either)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .embed import Inputs, patch_pixels
from .neighbors import RELATIONS, NeighborsResult, relations

_SPACE_TITLES = {"embedding": "embedding space (h)", "projection": "projection space (z)"}


def _frame(ax, color: str, width: float = 2.0) -> None:
    """Hide ticks; draw a coloured border around the image cell."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(color)
        spine.set_linewidth(width)


def _crop(result: NeighborsResult, inputs: Inputs, row: int) -> np.ndarray:
    size = inputs.model.entry.preprocessing.input_size
    return patch_pixels(inputs.split, int(result.bank.image[row]), result.bank.boxes[row][None], size)[0]


def _draw_query(fig, grid, r: int, result: NeighborsResult, inputs: Inputs, query: int) -> None:
    """The query's image with its box, then the query crop."""
    from matplotlib.patches import Rectangle

    image_ax = fig.add_subplot(grid[r, 0])
    image_ax.imshow(inputs.split.image(int(result.bank.image[query])), interpolation="nearest")
    x1, y1, x2, y2 = result.bank.boxes[query]
    image_ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color="#F0E442", lw=1.2))
    _frame(image_ax, "0.6", 0.5)
    query_ax = fig.add_subplot(grid[r, 1])
    query_ax.imshow(_crop(result, inputs, query), interpolation="nearest")
    _frame(query_ax, "black")
    if r == 0:
        image_ax.set_title("image", pad=3)
        query_ax.set_title("query", pad=3)


def plot_neighbor_grid(result: NeighborsResult, inputs: Inputs, *, show: int = 6, k: int = 5):
    """Rows of queries; their ``k`` nearest patches per space, framed by relation to the query."""
    from matplotlib.patches import Patch

    from .figures import DOUBLE_IN, RELATION_COLORS, new_figure, styled

    spaces = list(result.found)
    k = min(k, next(iter(result.found.values())).index.shape[1])
    rows = min(show, len(next(iter(result.found.values())).queries))
    colors = [RELATION_COLORS[name] for name in RELATIONS]
    widths = [1.0, 1.0]
    for _ in spaces:
        widths += [0.35] + [1.0] * k
    with styled():
        fig = new_figure(DOUBLE_IN, DOUBLE_IN * (rows + 0.7) / sum(widths) * 1.12)
        grid = fig.add_gridspec(rows, len(widths), width_ratios=widths, wspace=0.08, hspace=0.32)
        for r in range(rows):
            query = int(result.found[spaces[0]].queries[r])
            _draw_query(fig, grid, r, result, inputs, query)
            for s, space in enumerate(spaces):
                found = result.found[space]
                rel = relations(result.bank, found)[r]
                for j in range(k):
                    ax = fig.add_subplot(grid[r, 3 + s * (k + 1) + j])
                    ax.imshow(_crop(result, inputs, int(found.index[r, j])), interpolation="nearest")
                    _frame(ax, colors[rel[j]])
                    ax.set_xlabel(f"{found.similarity[r, j]:.2f}", fontsize=5, labelpad=1)
                    if r == 0 and j == k // 2:
                        ax.set_title(_SPACE_TITLES.get(space, space), pad=3)
        handles = [
            Patch(facecolor="white", edgecolor=c, linewidth=2, label=n) for n, c in zip(RELATIONS, colors, strict=True)
        ]
        fig.legend(handles=handles, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.01), handlelength=1.2)
        fig.text(0.99, -0.005, "numbers: cosine similarity to the query", ha="right", va="bottom", fontsize=5)
    return fig


def _stacked(ax, rows: dict[str, tuple[float, ...]], names: tuple[str, ...]) -> None:
    """Horizontal stacked bars, one per row, labelled with percentages where they fit."""
    from .figures import RELATION_COLORS

    labels = list(rows)[::-1]
    left = np.zeros(len(labels))
    for i, name in enumerate(names):
        values = np.array([rows[label][i] for label in labels])
        ax.barh(labels, values, left=left, color=RELATION_COLORS[name], label=name, height=0.62)
        for y, (x0, v) in enumerate(zip(left, values, strict=True)):
            if v >= 0.07:
                ax.text(x0 + v / 2, y, f"{100 * v:.0f}%", ha="center", va="center", color="white", fontsize=6)
        left += values
    ax.set_xlim(0, 1)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0", "25", "50", "75", "100"])
    ax.tick_params(axis="y", length=0)


def plot_neighbor_stats(result: NeighborsResult):
    """Where the k nearest patches come from, per space, against chance: (a) among all other patches of the
    bank, (b) among patches of other images only (the semantic part: same class or not)."""
    from .figures import COLUMN_IN, new_figure, styled

    chance = result.chance
    every = {space: (s.same_image, s.same_class, s.other_class) for space, s in result.stats.items()}
    every["chance"] = (chance["same_image"], chance["same_class"], chance["other_class"])
    cross = {space: (s.other_images_same_class, 1 - s.other_images_same_class) for space, s in result.stats.items()}
    cross["chance"] = (chance["other_images_same_class"], 1 - chance["other_images_same_class"])
    k, queries = result.settings["k"], result.settings["queries"]
    with styled():
        fig = new_figure(COLUMN_IN, 0.9 + 0.5 * len(every))
        top, bottom = fig.subplots(2, 1, gridspec_kw={"hspace": 0.95})
        _stacked(top, every, RELATIONS)
        top.set_title(f"(a) {k} nearest of any other patch", loc="left")
        top.legend(loc="lower center", bbox_to_anchor=(0.5, 1.12), ncol=3, handlelength=1.0)
        _stacked(bottom, cross, RELATIONS[1:])
        bottom.set_title(f"(b) {k} nearest from other images only", loc="left")
        bottom.set_xlabel(f"share of the nearest patches (%), {queries} queries")
    return fig


def write_neighbors(result: NeighborsResult, inputs: Inputs, out: Path, *, show: int = 6, show_k: int = 5) -> list:
    """``neighbors_stats.json``, ``neighbors.csv``, ``neighbors.png`` (grid) and ``neighbors_stats.png`` (bars)."""
    from .figures import save_png

    out.mkdir(parents=True, exist_ok=True)
    stats = out / "neighbors_stats.json"
    stats.write_text(json.dumps(result.stats_json(), indent=2, default=str) + "\n")
    table = out / "neighbors.csv"
    result.table().to_csv(table, index=False, float_format="%.6f")
    grid = save_png(plot_neighbor_grid(result, inputs, show=show, k=show_k), out / "neighbors.png")
    bars = save_png(plot_neighbor_stats(result), out / "neighbors_stats.png")
    return [stats, table, grid, bars]
