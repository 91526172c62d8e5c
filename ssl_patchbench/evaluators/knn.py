"""Weighted k-nearest-neighbour classifier on frozen features (the DINO ``eval_knn`` / solo-learn protocol).

The search is exact: a tiled cosine-similarity matmul and top-k, with the bank streamed in blocks so device
memory stays bounded for any bank or test size. faiss (exact inner product, CPU) is an optional second
backend, useful as a cross-check; both feed the same voting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssl_patchbench.core.devices import exact_fp32, resolve_device
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.evaluators.inputs import check_labelled_features
from ssl_patchbench.evaluators.metrics import TopKHits

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss")
DEFAULT_TILE_BYTES = 256 * 2**20
"""float32 bytes of one bank block on the device, and of one (test x bank) similarity tile."""


@dataclass(frozen=True)
class KnnResult:
    """Accuracy (percent) at one ``k``; ``top5`` is None when there are 5 classes or fewer."""

    k: int
    top1: float
    top5: float | None


def _unit_rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows moved to ``device``, cast to float32 and L2-normalised; non-finite features are refused."""
    x = x.to(device).float()
    if not torch.isfinite(x).all():
        raise UserError("features contain NaN or inf (a float16 overflow?): store them as float32")
    return F.normalize(x, dim=1)


def _chunk_sizes(n_test: int, n_train: int, dim: int, tile_bytes: int) -> tuple[int, int]:
    """(test rows, bank rows) per tile so that a bank block and a similarity tile each fit ``tile_bytes``."""
    train_chunk = min(n_train, max(1, tile_bytes // (4 * dim)))
    test_chunk = min(n_test, max(1, tile_bytes // (4 * train_chunk)))
    return test_chunk, train_chunk


def _merge_topk(best_sims: torch.Tensor, best_idx: torch.Tensor, sims: torch.Tensor, offset: int) -> None:
    """Fold one tile's top-k (bank rows ``offset`` onwards) into the running top-k, in place."""
    tile_sims, tile_idx = sims.topk(min(best_sims.shape[1], sims.shape[1]), dim=1)
    merged_sims = torch.cat([best_sims, tile_sims], dim=1)
    merged_idx = torch.cat([best_idx, tile_idx + offset], dim=1)
    top_sims, pos = merged_sims.topk(best_sims.shape[1], dim=1)
    best_sims.copy_(top_sims)
    best_idx.copy_(merged_idx.gather(1, pos))


def knn_search(
    train: torch.Tensor,
    test: torch.Tensor,
    k: int,
    *,
    device: str | torch.device | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and bank indices of the ``min(k, n_train)`` nearest bank rows of each test row.

    Sorted most similar first, on ``device``. Each bank block is copied to the device once and its top-k
    merged into a running top-k, so memory is O(tile_bytes + n_test * (k + dim)) whatever the bank size.
    """
    device = resolve_device("auto" if device is None else str(device))
    k = min(k, train.shape[0])
    test_chunk, train_chunk = _chunk_sizes(test.shape[0], train.shape[0], train.shape[1], tile_bytes)
    queries = _unit_rows(test, device)
    best_sims = torch.full((test.shape[0], k), -torch.inf, device=device)
    best_idx = torch.zeros((test.shape[0], k), dtype=torch.long, device=device)
    with exact_fp32():
        for start in range(0, train.shape[0], train_chunk):
            block = _unit_rows(train[start : start + train_chunk], device)
            for q in range(0, test.shape[0], test_chunk):
                sims = queries[q : q + test_chunk] @ block.T
                _merge_topk(best_sims[q : q + test_chunk], best_idx[q : q + test_chunk], sims, start)
    return best_sims, best_idx


def faiss_search(train: torch.Tensor, test: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`knn_search`, with exact search by ``faiss.IndexFlatIP`` on the CPU."""
    try:
        import faiss
    except ImportError as err:
        raise UserError("backend 'faiss' needs faiss: pip install faiss-cpu (or ssl-patchbench[faiss])") from err
    cpu = torch.device("cpu")
    index = faiss.IndexFlatIP(train.shape[1])
    block = max(1, DEFAULT_TILE_BYTES // (4 * train.shape[1]))
    for start in range(0, train.shape[0], block):
        index.add(_unit_rows(train[start : start + block], cpu).numpy())
    sims, idx = index.search(_unit_rows(test, cpu).numpy(), min(k, train.shape[0]))
    return torch.from_numpy(sims), torch.from_numpy(idx)


def knn_vote(
    sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    num_classes: int,
    *,
    temperature: float = 0.07,
    weighted: bool = True,
) -> torch.Tensor:
    """Class scores (n_test, num_classes): each neighbour adds ``exp(sim / T)`` (or 1) to its class.

    The row's best similarity is subtracted before ``exp``; that rescales a row by a positive constant,
    so rankings are unchanged, and small temperatures cannot overflow float32.
    """
    shifted = sims - sims.max(dim=1, keepdim=True).values
    votes = (shifted / temperature).exp() if weighted else torch.ones_like(sims)
    scores = torch.zeros((sims.shape[0], num_classes), device=sims.device, dtype=votes.dtype)
    return scores.scatter_add_(1, neighbour_labels, votes)


def _ranked_classes(scores: torch.Tensor, top: int) -> torch.Tensor:
    """The ``top`` best classes per row; equal scores go to the lower class index (as scikit-learn)."""
    return scores.sort(dim=1, descending=True, stable=True).indices[:, :top]


def _results_for_k(
    sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    num_classes: int,
    *,
    temperature: float,
    weighted: bool,
    tile_bytes: int,
) -> KnnResult:
    """Vote with the first ``k`` neighbours, in test chunks so the score matrix stays within ``tile_bytes``."""
    counter = TopKHits(num_classes, sims.device)
    rows = max(1, tile_bytes // (4 * num_classes))
    for q in range(0, sims.shape[0], rows):
        scores = knn_vote(
            sims[q : q + rows, :k],
            neighbour_labels[q : q + rows, :k],
            num_classes,
            temperature=temperature,
            weighted=weighted,
        )
        counter.add(_ranked_classes(scores, counter.depth), test_labels[q : q + rows])
    top1, top5 = counter.percent()
    return KnnResult(k=k, top1=top1, top5=top5)


def knn_classify(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    weighted: bool = True,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> dict[int, KnnResult]:
    """kNN top-1/top-5 (percent) of ``test`` against the ``train`` bank for each k in ``ks``.

    One search for ``max(ks)`` neighbours serves every k. A k larger than the bank is clipped to the bank
    size; the result stays keyed by the requested k and its ``KnnResult.k`` says the k used.
    """
    num_classes = check_labelled_features(train, train_labels, test, test_labels, num_classes)
    if not ks or min(ks) < 1 or temperature <= 0:
        raise UserError(f"need ks >= 1 and temperature > 0, got ks={list(ks)}, temperature={temperature}")
    if backend not in BACKENDS:
        raise UserError(f"unknown kNN backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    device = resolve_device("auto" if device is None else str(device))
    if max(ks) > train.shape[0]:
        log.warning("k=%d exceeds the %d train rows: clipped to %d", max(ks), train.shape[0], train.shape[0])
    if backend == "faiss":
        sims, idx = faiss_search(train, test, max(ks))
    else:
        sims, idx = knn_search(train, test, max(ks), device=device, tile_bytes=tile_bytes)
    sims, idx = sims.to(device), idx.to(device)
    neighbour_labels = train_labels.to(device=device, dtype=torch.long)[idx]
    test_labels = test_labels.to(device=device, dtype=torch.long)
    return {
        k: _results_for_k(
            sims,
            neighbour_labels,
            test_labels,
            min(k, train.shape[0]),
            num_classes,
            temperature=temperature,
            weighted=weighted,
            tile_bytes=tile_bytes,
        )
        for k in ks
    }
