"""The encoder an evaluation runs: pixels in [0, 255] -> normalised -> backbone h (-> projector z), one forward
for every space asked for."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models.loading import LoadedModel, ResolvedModel

SPACES = ("embedding", "projection")


def check_spaces(model: LoadedModel | ResolvedModel, spaces: str | Sequence[str]) -> tuple[str, ...]:
    """``spaces`` as a tuple, each known and each one the model can give: projection needs projector weights
    (decided from the state dicts, so a resolved model's answer is the built one's)."""
    spaces = (spaces,) if isinstance(spaces, str) else tuple(spaces)
    if not spaces or len(set(spaces)) != len(spaces):
        raise ValueError(f"an encoder needs distinct spaces, got {spaces}")
    for space in spaces:
        if space not in SPACES:
            raise UserError(f"unknown space {space!r}: choose embedding or projection")
    if "projection" in spaces and not model.has_projector:
        reason = model.projector_note or f"{model.entry.name}: the checkpoint has no projector weights"
        raise UserError(f"{reason}; use --space embedding")
    return spaces


class Encoder(nn.Module):
    """A loaded model's normalisation, backbone and (for the projection space) projector as one module.

    ``spaces``: one space, or several; with several, one forward returns their features side by side (the
    projector reads the very backbone output that the embedding columns hold), and :meth:`columns` says where
    each space's features lie. ``dim`` is the width of what :meth:`forward` returns.
    """

    def __init__(self, model: LoadedModel, spaces: str | Sequence[str]) -> None:
        super().__init__()
        self.spaces = check_spaces(model, spaces)
        pre = model.entry.preprocessing
        self.backbone = model.backbone
        self.projector = model.projector if "projection" in self.spaces else None
        self.register_buffer("shift", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0))
        widths = {"embedding": model.embed_dim, "projection": model.projection_dim}
        self.dims: dict[str, int] = {space: int(widths[space]) for space in self.spaces}  # type: ignore[arg-type]
        self.dim = sum(self.dims.values())
        object.__setattr__(self, "_compiled", None)  # not a registered submodule: it wraps this module

    def columns(self, space: str | None = None) -> slice:
        """Where ``space``'s features lie in a row of :meth:`forward`'s output (None: the encoder's only space)."""
        if space is None:
            if len(self.spaces) != 1:
                raise ValueError(f"this encoder computes {', '.join(self.spaces)}: name the space")
            space = self.spaces[0]
        if space not in self.dims:
            raise ValueError(f"this encoder does not compute the {space} space (it computes {', '.join(self.spaces)})")
        start = sum(self.dims[s] for s in self.spaces[: self.spaces.index(space)])
        return slice(start, start + self.dims[space])

    def compiled(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This encoder under ``torch.compile`` (static shapes), built once so later extractions reuse it.

        Its graphs are compiled with Inductor's freezing: under ``inference_mode`` the weights become constants
        folded into the kernels (batch-norm into the convolutions), which ran a ResNet-50 at 224 px 15% faster on
        one H200 (27.8k against 24.2k patches/s). Graphs compile at their first call, so the setting is patched
        around each call (``torch.compile``'s ``options`` did not reach the freezing pass: no gain measured).
        Extraction never changes an encoder's weights after this."""
        if self._compiled is None:
            compiled = torch.compile(self, dynamic=False)

            def frozen(pixels: torch.Tensor) -> torch.Tensor:
                with torch._inductor.config.patch(freezing=True):
                    return compiled(pixels)

            object.__setattr__(self, "_compiled", frozen)
        return self._compiled

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[M, 3, S, S]`` pixels -> ``[M, dim]``: each space's features, in the order of ``spaces``."""
        h = self.backbone((pixels - self.shift) * self.scale)
        found = {"embedding": h}
        if self.projector is not None:
            found["projection"] = self.projector(h)
        if len(self.spaces) == 1:
            return found[self.spaces[0]]
        return torch.cat([found[space] for space in self.spaces], dim=1)
