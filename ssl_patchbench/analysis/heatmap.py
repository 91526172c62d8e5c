"""Figure 5: similarity of every sliding window of an image to one query window, embedding vs projection.

Each cell of a heatmap is one window, drawn at the window's centre with the stride as its side, so the map
lies over the image in its own pixel coordinates. Both spaces (and all images) share one colour scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ssl_patchbench.core.errors import UserError

from .embed import Inputs, PatchEmbedder, check_spaces, image_boxes, sliding_spec

_SPACE_TITLES = {"embedding": "embedding (h)", "projection": "projection (z)"}


def similarity_grid(features: torch.Tensor, query: int, side: int) -> np.ndarray:
    """Cosine similarity of every window ``[n, d]`` to window ``query``, as a ``[side, side]`` row-major map."""
    unit = torch.nn.functional.normalize(features.double(), dim=1)
    return (unit @ unit[query]).reshape(side, side).numpy()


def query_index(query: str | tuple[int, int], side: int) -> int:
    """``"center"`` or ``(row, col)`` in the window grid -> the window's row-major index."""
    if query == "center":
        return (side // 2) * side + side // 2
    row, col = query  # type: ignore[misc]
    if not (0 <= row < side and 0 <= col < side):
        raise UserError(f"query window ({row}, {col}) is outside the {side}x{side} window grid")
    return row * side + col


@dataclass(frozen=True)
class Heatmaps:
    """Per image: the maps of each space, the query window, and every window's box."""

    images: np.ndarray
    maps: dict[str, np.ndarray]  # space -> [B, side, side]
    query: int
    boxes: np.ndarray  # [B, n, 4] original pixels
    side: int
    size: int
    stride: int

    def table(self) -> pd.DataFrame:
        """One row per (image, space, window): its grid position, box and similarity to the query."""
        rows = []
        for space, maps in self.maps.items():
            for b, image in enumerate(self.images):
                for i, sim in enumerate(maps[b].ravel()):
                    x1, y1, x2, y2 = self.boxes[b, i]
                    row, col = divmod(i, self.side)
                    rows.append((int(image), space, row, col, x1, y1, x2, y2, float(sim), i == self.query))
        columns = ["image", "space", "row", "col", "x1", "y1", "x2", "y2", "similarity", "is_query"]
        return pd.DataFrame(rows, columns=columns)


def run_heatmap(
    inputs: Inputs,
    embedder: PatchEmbedder,
    *,
    images: np.ndarray,
    query: str | tuple[int, int] = "center",
    size: int = 16,
    stride: int = 2,
    spaces: tuple[str, ...] = ("embedding", "projection"),
) -> Heatmaps:
    """Embed every window of ``images`` and map each one's similarity to the query window."""
    check_spaces(inputs.model, spaces)
    spec = sliding_spec(inputs.model, size, stride)
    side = spec.grid_side
    q = query_index(query, side)
    features = embedder.spaces(embedder.embed(inputs.split, images, spec), spaces)
    maps = {s: np.stack([similarity_grid(f[b], q, side) for b in range(len(images))]) for s, f in features.items()}
    boxes = image_boxes(inputs.split, images, spec)
    return Heatmaps(np.asarray(images), maps, q, boxes, side, size, stride)


def _extent(boxes: np.ndarray, side: int) -> tuple[float, float, float, float]:
    """imshow extent putting cell (r, c) at the centre of window (r, c), cells one stride wide."""
    centres_x = (boxes[:, 0] + boxes[:, 2]) / 2 - 0.5
    centres_y = (boxes[:, 1] + boxes[:, 3]) / 2 - 0.5
    step_x = (centres_x[1] - centres_x[0]) if side > 1 else boxes[0, 2] - boxes[0, 0]
    step_y = (centres_y[side] - centres_y[0]) if side > 1 else boxes[0, 3] - boxes[0, 1]
    return (
        centres_x.min() - step_x / 2,
        centres_x.max() + step_x / 2,
        centres_y.max() + step_y / 2,
        centres_y.min() - step_y / 2,
    )


def _grey(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _panel(ax, title: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, pad=3)


def plot_heatmaps(result: Heatmaps, inputs: Inputs):
    """Rows of images: the image with the query box, then one heatmap per space over the greyed image.

    A heatmap cell sits at its window's centre (so the map covers the window centres, not the image border);
    the query window's cell is outlined. All panels share one colour scale and one colourbar.
    """
    from matplotlib.patches import Rectangle

    from .figures import COLUMN_IN, new_figure, styled

    spaces = list(result.maps)
    vmin = np.floor(min(float(m.min()) for m in result.maps.values()) * 10) / 10
    rows, cols = len(result.images), 1 + len(spaces)
    q_row, q_col = divmod(result.query, result.side)
    with styled():
        fig = new_figure(COLUMN_IN, 0.3 + rows * COLUMN_IN * 0.9 / (cols + 0.3))
        grid = fig.add_gridspec(
            rows, cols + 1, width_ratios=[1] * cols + [0.07], wspace=0.06, hspace=0.06, bottom=0.05, top=0.93
        )
        for b, image in enumerate(result.images):
            pixels = inputs.split.image(int(image))
            h, w = pixels.shape[:2]
            x1, y1, x2, y2 = result.boxes[b, result.query]
            extent = _extent(result.boxes[b], result.side)
            cell_w = (extent[1] - extent[0]) / result.side
            cell_h = (extent[2] - extent[3]) / result.side
            for c in range(cols):
                ax = fig.add_subplot(grid[b, c])
                title = None if b else ("image, query" if c == 0 else _SPACE_TITLES[spaces[c - 1]])
                _panel(ax, title)
                if c == 0:
                    ax.imshow(pixels, interpolation="nearest")
                    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color="#E8384F", lw=1))
                    continue
                ax.imshow(_grey(pixels), cmap="gray", alpha=0.45, interpolation="nearest")
                im = ax.imshow(
                    result.maps[spaces[c - 1]][b],
                    cmap="viridis",
                    vmin=vmin,
                    vmax=1.0,
                    extent=extent,
                    interpolation="nearest",
                )
                corner = (extent[0] + q_col * cell_w, extent[3] + q_row * cell_h)
                ax.add_patch(Rectangle(corner, cell_w, cell_h, fill=False, color="#E8384F", lw=1))
                ax.set_xlim(-0.5, w - 0.5)
                ax.set_ylim(h - 0.5, -0.5)
        fig.colorbar(im, cax=fig.add_subplot(grid[:, cols])).set_label("cosine similarity to the query window")
        fig.text(
            0.45,
            0.035,
            f"{result.size} px windows at stride {result.stride}; each cell sits at its window's centre; red: query",
            ha="center",
            va="top",
            fontsize=5,
        )
    return fig


def write_heatmap(result: Heatmaps, inputs: Inputs, out: Path) -> list[Path]:
    """``heatmap.csv`` and ``heatmap.png`` under ``out``."""
    from .figures import save_png

    out.mkdir(parents=True, exist_ok=True)
    csv = out / "heatmap.csv"
    result.table().to_csv(csv, index=False, float_format="%.6f")
    return [csv, save_png(plot_heatmaps(result, inputs), out / "heatmap.png")]
