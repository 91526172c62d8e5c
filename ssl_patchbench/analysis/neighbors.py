"""Figure 4: nearest patches of query patches in the embedding and projection spaces, and their statistics.

The bank is every sliding window of a set of images; queries are drawn from it with a seeded generator. A
neighbour is any other bank patch (the query itself is excluded; other windows of its image are not). Each
neighbour is "same image", "same class" (another image of the query's class) or "other class"; same-image
neighbours are also measured for locality (IoU of their box with the query's box). Everything is a pure
function of (images, spec, seed), so a CPU and a GPU run agree up to float ties.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch

from ssl_patchbench.core.devices import exact_fp32
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.evaluators.knn import knn_search

from .embed import Inputs, PatchEmbedder, check_spaces, image_boxes, sliding_spec

RELATIONS = ("same image", "same class", "other class")


@dataclass(frozen=True)
class Bank:
    """Patches of many images: which image, which class and which box (original pixels) each one is."""

    image: np.ndarray  # [M] dataset index of the patch's image
    label: np.ndarray  # [M]
    boxes: np.ndarray  # [M, 4]
    features: dict[str, torch.Tensor]  # space -> [M, d]


@dataclass(frozen=True)
class Neighbors:
    """The k nearest bank patches of each query, in one space."""

    queries: np.ndarray  # [Q] bank rows
    index: np.ndarray  # [Q, k] bank rows, nearest first
    similarity: np.ndarray  # [Q, k] cosine similarity


def choose_queries(bank_size: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct bank rows drawn with a seeded generator (independent of device and batch size)."""
    return np.random.default_rng(seed).choice(bank_size, size=min(count, bank_size), replace=False)


def nearest(features: torch.Tensor, queries: np.ndarray, k: int, *, image: np.ndarray | None = None) -> Neighbors:
    """Cosine top-k of each query among all other bank rows (the kNN evaluator's exact search, on the features'
    device). With ``image`` (the bank's image ids), every patch of the query's own image is excluded too."""
    rows = torch.as_tensor(queries, device=features.device)
    own = 1 if image is None else int(np.unique(image, return_counts=True)[1].max())  # rows a query may exclude
    available = len(features) - own
    if available <= 0:
        raise UserError("the patch bank holds no candidate neighbours: use more images (--per-class)")
    k = min(k, available)
    sims, index = knn_search(features, features[rows], k + own, device=features.device)
    excluded = index == rows[:, None]
    if image is not None:
        ids = torch.as_tensor(image, device=features.device)
        excluded |= ids[index] == ids[rows][:, None]
    keep = torch.sort(excluded.to(torch.int8), dim=1, stable=True).indices[:, :k]  # nearest allowed rows, in order
    return Neighbors(
        queries=np.asarray(queries),
        index=index.gather(1, keep).cpu().numpy(),
        similarity=sims.gather(1, keep).cpu().numpy(),
    )


def relations(bank: Bank, found: Neighbors) -> np.ndarray:
    """0 = same image, 1 = same class (other image), 2 = other class; ``[Q, k]``."""
    q, n = found.queries[:, None], found.index
    same_image = bank.image[n] == bank.image[q]
    same_class = bank.label[n] == bank.label[q]
    return np.where(same_image, 0, np.where(same_class, 1, 2))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``[..., 4]`` (x1, y1, x2, y2), elementwise."""
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@dataclass(frozen=True)
class SpaceStats:
    """Where the neighbours of one space come from, over all queries."""

    same_image: float
    same_class: float
    other_class: float
    same_image_mean_iou: float | None  # mean IoU with the query's box, over same-image neighbours
    same_image_overlapping: float | None  # share of same-image neighbours whose box overlaps the query's
    mean_similarity: float
    other_images_same_class: float | None = None  # share of same class among the k nearest from other images


def neighbor_stats(bank: Bank, found: Neighbors) -> SpaceStats:
    """Shares of same image / same class / other class (they sum to 1) and locality of same-image ones."""
    rel = relations(bank, found)
    shares = np.bincount(rel.ravel(), minlength=3) / rel.size
    iou = box_iou(bank.boxes[found.index], bank.boxes[found.queries][:, None, :])[rel == 0]
    return SpaceStats(
        same_image=float(shares[0]),
        same_class=float(shares[1]),
        other_class=float(shares[2]),
        same_image_mean_iou=float(iou.mean()) if iou.size else None,
        same_image_overlapping=float((iou > 0).mean()) if iou.size else None,
        mean_similarity=float(found.similarity.mean()),
    )


def chance_shares(bank: Bank, queries: np.ndarray) -> dict[str, float]:
    """The shares a random neighbour (any other bank patch) would have: the baseline for the statistics."""
    same_image = np.array([(bank.image == bank.image[q]).sum() - 1 for q in queries])
    same_label = np.array([(bank.label == bank.label[q]).sum() - 1 for q in queries])
    others = len(bank.image) - 1
    return {
        "same_image": float(same_image.mean() / others),
        "same_class": float((same_label - same_image).mean() / others),
        "other_class": float((others - same_label).mean() / others),
    }


def build_bank(
    inputs: Inputs, embedder: PatchEmbedder, images: np.ndarray, size: int, stride: int, spaces: tuple[str, ...]
) -> Bank:
    """Every ``size`` px window at ``stride`` of ``images``, embedded in each space."""
    check_spaces(inputs.model, spaces)
    spec = sliding_spec(inputs.model, size, stride)
    h = embedder.embed(inputs.split, images, spec)
    n = spec.num_patches
    features = {space: f.reshape(len(images) * n, -1) for space, f in embedder.spaces(h, spaces).items()}
    return Bank(
        image=np.repeat(images, n),
        label=np.repeat(inputs.split.labels[images], n),
        boxes=image_boxes(inputs.split, images, spec).reshape(-1, 4),
        features=features,
    )


@dataclass(frozen=True)
class NeighborsResult:
    """Neighbours and statistics per space, plus the chance baseline and the settings."""

    bank: Bank
    found: dict[str, Neighbors]
    stats: dict[str, SpaceStats]
    chance: dict[str, float]
    settings: dict

    def stats_json(self) -> dict:
        """The numbers to compare across runs and devices."""
        return {
            "settings": self.settings,
            "spaces": {space: asdict(s) for space, s in self.stats.items()},
            "chance": self.chance,
        }

    def table(self) -> pd.DataFrame:
        """One row per (space, query, rank): the neighbour, its image, class, similarity, relation and IoU."""
        frames = []
        for space, found in self.found.items():
            rel = relations(self.bank, found)
            iou = box_iou(self.bank.boxes[found.index], self.bank.boxes[found.queries][:, None, :])
            q, k = found.index.shape
            frames.append(
                pd.DataFrame(
                    {
                        "space": space,
                        "query": np.repeat(found.queries, k),
                        "query_image": np.repeat(self.bank.image[found.queries], k),
                        "rank": np.tile(np.arange(1, k + 1), q),
                        "neighbor": found.index.ravel(),
                        "neighbor_image": self.bank.image[found.index].ravel(),
                        "similarity": found.similarity.ravel(),
                        "relation": np.array(RELATIONS)[rel.ravel()],
                        "iou": np.where(rel == 0, iou, np.nan).ravel(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)


def analyse_bank(
    bank: Bank, *, queries: int, k: int, seed: int, device: torch.device | None = None, other_images: bool = False
) -> dict:
    """Neighbours, statistics and chance baseline of a built bank (pure: no model, no I/O).

    The statistics always hold both searches (any other patch, and other images only); ``other_images``
    picks which neighbours are kept for the figure and the table.
    """
    chosen = choose_queries(len(bank.image), queries, seed)
    anywhere, elsewhere, stats = {}, {}, {}
    for space, f in bank.features.items():
        f = f.to(device or "cpu")
        with exact_fp32():  # TF32 would reorder near-ties between CPU and GPU
            anywhere[space] = nearest(f, chosen, k)
            elsewhere[space] = nearest(f, chosen, k, image=bank.image)
        cross = neighbor_stats(bank, elsewhere[space])
        stats[space] = replace(neighbor_stats(bank, anywhere[space]), other_images_same_class=cross.same_class)
    chance = chance_shares(bank, chosen)
    chance["other_images_same_class"] = chance["same_class"] / (1 - chance["same_image"])
    return {"found": elsewhere if other_images else anywhere, "stats": stats, "chance": chance}


def run_neighbors(
    inputs: Inputs,
    embedder: PatchEmbedder,
    *,
    images: np.ndarray,
    size: int = 16,
    stride: int = 4,
    spaces: tuple[str, ...] = ("embedding", "projection"),
    queries: int = 500,
    k: int = 10,
    seed: int = 0,
    other_images: bool = False,
) -> NeighborsResult:
    """Build the bank of ``images`` and find the ``k`` nearest patches of ``queries`` seeded queries."""
    bank = build_bank(inputs, embedder, images, size, stride, spaces)
    with_device = analyse_bank(bank, queries=queries, k=k, seed=seed, device=embedder.device, other_images=other_images)
    settings = {
        "model": inputs.model.entry.name,
        "checkpoint_sha256": inputs.model.checkpoint_sha256,
        "data": inputs.split.identity,
        "images": len(images),
        "patch_size": size,
        "stride": stride,
        "bank_patches": len(bank.image),
        "queries": len(with_device["found"][spaces[0]].queries),
        "k": k,
        "seed": seed,
        "shown_neighbors": "other images only" if other_images else "any other patch",
    }
    return NeighborsResult(bank=bank, settings=settings, **with_device)
