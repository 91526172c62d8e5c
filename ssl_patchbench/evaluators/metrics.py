"""What both evaluators count: top-1 and top-5 hits over chunks of ranked predictions."""

from __future__ import annotations

import torch


class TopKHits:
    """Running top-1 / top-5 hit counts; ``top5`` is reported only with more than 5 classes."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.rows = 0
        self.hits = torch.zeros(2, dtype=torch.long, device=device)  # summed on the device: one sync at the end

    @property
    def depth(self) -> int:
        """How many best classes a chunk must rank (5, or every class when there are fewer)."""
        return min(5, self.num_classes)

    def add(self, ranked: torch.Tensor, labels: torch.Tensor) -> None:
        """``ranked``: ``[n, depth]`` best classes first; ``labels``: ``[n]``."""
        correct = ranked[:, : self.depth] == labels[:, None]
        self.hits[0] += correct[:, 0].sum()
        self.hits[1] += correct.any(dim=1).sum()
        self.rows += labels.shape[0]

    def percent(self) -> tuple[float, float | None]:
        """(top-1, top-5) accuracy in percent."""
        top1, top5 = (100.0 * h / max(self.rows, 1) for h in self.hits.tolist())
        return top1, (top5 if self.num_classes > 5 else None)
