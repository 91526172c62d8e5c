"""The encoder an evaluation runs: pixels in [0, 255] -> normalised -> backbone (-> projector for z)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models.loading import LoadedModel

SPACES = ("embedding", "projection")


class Encoder(nn.Module):
    """A loaded model's normalisation, backbone and (in the projection space) projector as one module."""

    def __init__(self, model: LoadedModel, space: str) -> None:
        super().__init__()
        if space not in SPACES:
            raise UserError(f"unknown space {space!r}: choose embedding or projection")
        if space == "projection" and model.projector is None:
            reason = model.projector_note or f"{model.entry.name}: the checkpoint has no projector weights"
            raise UserError(f"{reason}; use --space embedding")
        pre = model.entry.preprocessing
        self.backbone = model.backbone
        self.projector = model.projector if space == "projection" else None
        self.register_buffer("shift", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0))
        self.dim = model.projection_dim if self.projector is not None else model.embed_dim
        object.__setattr__(self, "_compiled", None)  # not a registered submodule: it wraps this module

    def compiled(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This encoder under ``torch.compile`` (static shapes), built once so later extractions reuse it."""
        if self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self, dynamic=False))
        return self._compiled

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.backbone((pixels - self.shift) * self.scale)
        return self.projector(h) if self.projector is not None else h
