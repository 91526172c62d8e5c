"""Vision Transformers: timm's architecture, the published checkpoints' keys mapped onto timm's, and the readout.

The upstream files of DINO, iBOT, MAE and MoCo v3 name their tensors exactly as timm does (all four descend from
timm's ViT); DINOv2 differs in three places, mapped in :func:`dinov2_to_timm`. What the map leaves over or misses
is left to the strict load (``models/loading.py``) to name. The readout turns the token sequence into one vector
per image, the way each family's own evaluation does it (class token, mean patch token, over the last N blocks).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ssl_patchbench.core.errors import UserError, did_you_mean
from ssl_patchbench.models.registry import TIMM_PREFIX, VitSpec, ZooEntry

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

# DINOv2 -> timm: SwiGLU (ViT-g) packs its two input projections as `w12` and names its output `w3`;
# registers are `register_tokens`. `mask_token` (iBOT-style masking during training) is in ignore_prefixes.
_DINOV2_RENAMES = (
    (re.compile(r"^(blocks\.\d+\.mlp)\.w12\.(weight|bias)$"), r"\1.fc1.\2"),
    (re.compile(r"^(blocks\.\d+\.mlp)\.w3\.(weight|bias)$"), r"\1.fc2.\2"),
    (re.compile(r"^register_tokens$"), "reg_token"),
)


def build_vit(entry: ZooEntry) -> VisionTransformer:
    """The entry's timm ViT (random init, no classifier) for its input size, with fused attention on."""
    import timm  # imported when used: about a second of every run that builds no ViT
    from timm.models.vision_transformer import VisionTransformer

    assert entry.vit is not None, "build_vit needs a ViT entry"
    name = entry.arch.removeprefix(TIMM_PREFIX)
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}'{did_you_mean(name, timm.list_models('vit_*'))}")
    try:
        model = timm.create_model(name, num_classes=0, img_size=entry.preprocessing.input_size, **entry.vit.overrides)
    except (TypeError, ValueError, AssertionError) as err:
        raise UserError(f"`{entry.name}`: timm cannot build {name} with {entry.vit.overrides} ({err})") from err
    if not isinstance(model, VisionTransformer):
        raise UserError(f"`{entry.name}`: timm's {name} is not a VisionTransformer; a vit block needs one")
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True  # F.scaled_dot_product_attention, whatever TIMM_FUSED_ATTN says
    return model


def vit_state_dict(state: dict[str, torch.Tensor], model: VisionTransformer, spec: VitSpec) -> dict[str, torch.Tensor]:
    """An upstream backbone state dict under timm's names, its position embeddings on the model's grid."""
    mapped = dict(state)
    if "pos_embed" in mapped:  # a DINOv2 file's grid follows the class token's position; a timm-named file's, timm's
        prefix = 1 if spec.keys == "dinov2" else (0 if model.no_embed_class else model.num_prefix_tokens)
        grid = tuple(model.patch_embed.grid_size)
        mapped["pos_embed"] = resample_pos_embed(mapped["pos_embed"], prefix, grid, spec)
    return dinov2_to_timm(mapped, model) if spec.keys == "dinov2" else mapped


def dinov2_to_timm(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """DINOv2's names -> timm's. With registers timm keeps class and register tokens out of the position
    embedding (``no_embed_class``): DINOv2 adds ``pos_embed[:, 0]`` to the class token only, so it moves there."""
    mapped = {}
    for key, value in state.items():
        for pattern, replacement in _DINOV2_RENAMES:
            key = pattern.sub(replacement, key)
        mapped[key] = value
    if model.no_embed_class and "cls_token" in mapped and "pos_embed" in mapped:
        pos = mapped["pos_embed"]
        mapped["cls_token"] = mapped["cls_token"] + pos[:, :1]
        mapped["pos_embed"] = pos[:, 1:]
    return mapped


def resample_pos_embed(pos: torch.Tensor, prefix: int, grid: tuple[int, int], spec: VitSpec) -> torch.Tensor:
    """Position embeddings of a square grid (after `prefix` class/register positions) resized to `grid`, bicubic,
    exactly as DINO/DINOv2 interpolate in their forward (scale factor (grid + offset) / M when an offset is set)."""
    tokens = pos.shape[1] - prefix if pos.ndim == 3 else -1
    side = math.isqrt(max(tokens, 0))
    if side == 0 or side * side != tokens:
        raise UserError(
            f"pos_embed of shape {tuple(pos.shape)} is not a square grid after {prefix} prefix token(s): "
            "the checkpoint is for another architecture; use the zoo entry that matches it"
        )
    if (side, side) == grid:
        return pos
    patch_pos = pos[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    offset = spec.pos_embed_offset
    size = {"scale_factor": tuple((g + offset) / side for g in grid)} if offset else {"size": grid}
    patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=spec.pos_embed_antialias, **size)
    if tuple(patch_pos.shape[-2:]) != grid:
        raise UserError(f"resampling pos_embed from {side}x{side} gave {tuple(patch_pos.shape[-2:])}, not {grid}")
    return torch.cat([pos[:, :prefix], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)


class VitReadout(nn.Module):
    """[B, 3, S, S] -> [B, D * k]: the pooled tokens of the last ``last_blocks`` blocks, each through the final
    LayerNorm, concatenated oldest block first; per block ``cls`` (D), ``mean`` of the patch tokens (D, register
    tokens excluded) or ``cls+mean`` (2D, in that order)."""

    def __init__(self, vit: VisionTransformer, spec: VitSpec, *, name: str) -> None:
        super().__init__()
        depth = len(vit.blocks)
        if spec.last_blocks > depth:
            raise UserError(f"--last-blocks {spec.last_blocks}: `{name}` has {depth} blocks; use at most {depth}")
        if vit.cls_token is None:
            raise UserError(f"`{name}`: timm's model has no class token; the readout needs one (class_token=True)")
        self.vit, self.pool, self.last_blocks = vit, spec.pool, spec.last_blocks
        self.dim = vit.num_features * spec.last_blocks * (2 if spec.pool == "cls+mean" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.vit.forward_intermediates(
            x,
            indices=self.last_blocks,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
        return torch.cat([self._pool(patches, prefix) for patches, prefix in blocks], dim=1)

    def _pool(self, patches: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            return prefix[:, 0]
        if self.pool == "mean":
            return patches.mean(dim=1)
        return torch.cat([prefix[:, 0], patches.mean(dim=1)], dim=1)
