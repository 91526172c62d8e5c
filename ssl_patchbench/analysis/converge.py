"""Figure 3a: how fast the mean of N patch embeddings converges to the image's embeddings as N grows.

For each image the sliding windows are put in a seeded random order (a pure function of seed and image
index); the bag of the first N is compared, by cosine similarity, with the central view's embedding and with
the mean of all windows. The means are prefixes, as the 16-patch bag is a prefix of the 256-patch bag in eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .embed import Inputs, PatchEmbedder, central_spec, check_spaces, cosine, sliding_spec


def default_counts(n: int) -> list[int]:
    """1, 2, 4, ... below ``n``, then ``n`` itself (all windows)."""
    counts = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
    return [*counts, n]


def patch_orders(image_ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A random order of the ``n`` windows of each image ``[B, n]``; depends only on (seed, image index)."""
    return np.stack([np.random.default_rng([seed, int(i)]).permutation(n) for i in image_ids])


def prefix_means(patches: torch.Tensor, orders: np.ndarray, counts: list[int]) -> torch.Tensor:
    """Means of the first N patches of each image in its order, ``[B, len(counts), d]`` (float64)."""
    ordered = torch.take_along_dim(patches.double(), torch.from_numpy(orders)[..., None], dim=1)
    cumulative = ordered.cumsum(dim=1)
    index = torch.tensor(counts) - 1
    return cumulative[:, index] / torch.tensor(counts, dtype=torch.float64)[None, :, None]


def convergence(
    patches: torch.Tensor, central: torch.Tensor, orders: np.ndarray, counts: list[int]
) -> dict[str, np.ndarray]:
    """Per-image cosine similarities ``[B, len(counts)]`` of the N-patch mean to each reference."""
    means = prefix_means(patches, orders, counts)
    references = {"central": central.double(), "all-patch mean": patches.double().mean(dim=1)}
    return {name: cosine(means, ref[:, None, :]).numpy() for name, ref in references.items()}


def summarize(similarities: dict[str, np.ndarray], counts: list[int], space: str) -> pd.DataFrame:
    """Mean, standard deviation and 10/90 % quantiles over images, one row per (reference, N)."""
    rows = []
    for reference, values in similarities.items():
        for j, n in enumerate(counts):
            column = values[:, j]
            rows.append(
                {
                    "space": space,
                    "reference": reference,
                    "n_patches": n,
                    "mean": float(column.mean()),
                    "std": float(column.std()),
                    "q10": float(np.quantile(column, 0.1)),
                    "q90": float(np.quantile(column, 0.9)),
                    "n_images": len(column),
                }
            )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class ConvergeResult:
    """The summary table and what produced it."""

    table: pd.DataFrame
    patch_size: int
    stride: int
    windows: int
    images: int


def run_converge(
    inputs: Inputs,
    embedder: PatchEmbedder,
    *,
    images: np.ndarray,
    size: int = 16,
    stride: int = 4,
    spaces: tuple[str, ...] = ("embedding", "projection"),
    seed: int = 0,
) -> ConvergeResult:
    """Embed the central view and every window of ``images``, then summarise the convergence per space."""
    check_spaces(inputs.model, spaces)
    spec = sliding_spec(inputs.model, size, stride)
    patches = embedder.spaces(embedder.embed(inputs.split, images, spec), spaces)
    central = embedder.spaces(embedder.embed(inputs.split, images, central_spec(inputs.model))[:, 0], spaces)
    counts = default_counts(spec.num_patches)
    orders = patch_orders(images, spec.num_patches, seed)
    tables = [summarize(convergence(patches[s], central[s], orders, counts), counts, s) for s in spaces]
    return ConvergeResult(pd.concat(tables, ignore_index=True), size, stride, spec.num_patches, len(images))


def plot_converge(result: ConvergeResult, title: str | None = None):
    """Cosine similarity against N (log2 axis): colour = space, line style = reference, band = 10-90 %."""
    from .figures import SPACE_COLORS, new_figure, styled

    styles = {"central": ("-", "o"), "all-patch mean": ("--", "s")}
    with styled():
        fig = new_figure(height=2.3)
        ax = fig.add_subplot()
        for (space, reference), rows in result.table.groupby(["space", "reference"], sort=False):
            line, marker = styles[reference]
            color = SPACE_COLORS[space]
            ax.plot(rows.n_patches, rows["mean"], line, marker=marker, color=color, label=f"{space} vs {reference}")
            ax.fill_between(rows.n_patches, rows.q10, rows.q90, color=color, alpha=0.12, linewidth=0)
        counts = sorted(result.table.n_patches.unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel(f"N patches averaged ({result.patch_size} px windows, stride {result.stride})")
        ax.set_ylabel("cosine similarity")
        ax.set_ylim(top=1.01)
        ax.grid(alpha=0.3, linewidth=0.4)
        ax.legend(loc="lower right")
        ax.set_title(title or f"Mean of N patch embeddings ({result.images} images; band: 10-90 %)")
    return fig


def write_converge(result: ConvergeResult, out: Path, title: str | None = None) -> list[Path]:
    """``converge.csv`` and ``converge.png`` under ``out``."""
    from .figures import save_png

    out.mkdir(parents=True, exist_ok=True)
    csv = out / "converge.csv"
    result.table.to_csv(csv, index=False, float_format="%.6f")
    return [csv, save_png(plot_converge(result, title), out / "converge.png")]
