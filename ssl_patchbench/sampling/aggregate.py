"""Aggregation of the patch embeddings of one image into its representation (bag of patches and kin)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.labels import gridpool_params
from ssl_patchbench.sampling.patches import PatchSpec


@dataclass(frozen=True)
class Aggregation:
    """``mean`` (the bag of patches), ``concat``, or ``gridpool`` (average-pool the patch grid with
    ``kernel``/``stride``, then flatten: 5x5 patches, kernel 3, stride 2 -> 2x2xd, paper Table 5)."""

    kind: str = "mean"
    kernel: int = 3
    stride: int = 2

    @classmethod
    def parse(cls, text: str) -> Aggregation:
        """``mean``, ``concat``, ``gridpool`` or ``gridpool:K:S`` / ``gridpool(K,S)``."""
        text = text.strip().lower()
        if text in ("mean", "concat"):
            return cls(kind=text)
        params = gridpool_params(text)
        if params is None:
            raise UserError(f"unknown aggregation {text!r}: choose mean, concat, gridpool or gridpool:K:S")
        kernel, stride = params
        if kernel <= 0 or stride <= 0:
            raise UserError(f"gridpool kernel and stride must be positive, got {kernel}, {stride}")
        return cls(kind="gridpool", kernel=kernel, stride=stride)

    @property
    def label(self) -> str:
        return f"gridpool({self.kernel},{self.stride})" if self.kind == "gridpool" else self.kind

    def check(self, spec: PatchSpec) -> None:
        """Refuse combinations that have no meaning (gridpool without a patch grid, pool larger than grid)."""
        if self.kind != "gridpool":
            return
        side = spec.grid_side
        if self.kernel > side:
            raise UserError(f"gridpool kernel {self.kernel} is larger than the {side}x{side} patch grid")

    def output_dim(self, dim: int, spec: PatchSpec) -> int:
        if self.kind == "mean":
            return dim
        if self.kind == "concat":
            return dim * spec.num_patches
        pooled = (spec.grid_side - self.kernel) // self.stride + 1
        return dim * pooled * pooled

    def __call__(self, features: torch.Tensor, spec: PatchSpec) -> torch.Tensor:
        """``[B, n, d]`` patch embeddings (row-major patch order) -> ``[B, D]``."""
        if self.kind == "mean":
            return features.mean(dim=1)
        if self.kind == "concat":
            return features.flatten(1)
        side = spec.grid_side
        grid = features.reshape(features.shape[0], side, side, -1).permute(0, 3, 1, 2)
        return F.avg_pool2d(grid, self.kernel, self.stride).flatten(1)
