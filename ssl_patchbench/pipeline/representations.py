"""The patch specs an ``EvalConfig`` names: ``central``, patch counts, or ``all`` sliding windows."""

from __future__ import annotations

import math

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models.registry import ZooEntry
from ssl_patchbench.pipeline.config import EvalConfig
from ssl_patchbench.sampling.patches import PatchSpec


def representations(cfg: EvalConfig, entry: ZooEntry) -> list[PatchSpec]:
    """One spec per token of ``cfg.patches``, in the model's input size, central view and interpolation."""
    pre = entry.preprocessing
    common = {"out_size": pre.input_size, "resize": pre.resize, "interpolation": pre.interpolation, "seed": cfg.seed}
    specs = [
        PatchSpec(mode="central", **common) if token == "central" else _patch_spec(cfg, entry, token, common)
        for token in cfg.patches
    ]
    if not specs:
        raise UserError("--patches is empty: give e.g. central,1,16")
    return specs


def _patch_spec(cfg: EvalConfig, entry: ZooEntry, token: str, common: dict) -> PatchSpec:
    if cfg.mode == "sliding":
        spec = PatchSpec(mode="sliding", size=cfg.size, stride=cfg.stride, **common)
        if token not in ("all", str(spec.num_patches)):
            raise UserError(
                f"sliding {cfg.size} px windows at stride {cfg.stride} give {spec.num_patches} patches, "
                f"not {token}: use --patches {spec.num_patches} (or all)"
            )
        return spec
    n = _count(token)
    if cfg.mode == "grid":
        side = math.isqrt(n)
        if side * side != n:
            raise UserError(f"grid mode needs a square number of patches (g*g), got {n}")
        return PatchSpec(mode="grid", grid=side, **common)
    if cfg.mode != "random":
        raise UserError(f"unknown patch mode {cfg.mode!r}: choose random, grid or sliding")
    scale = cfg.scale or entry.patch_scale
    return PatchSpec(mode="random", n=n, scale=tuple(scale), ratio=cfg.ratio, size=cfg.size, **common)


def _count(token: str) -> int:
    try:
        n = int(token)
    except ValueError:
        raise UserError(f"--patches takes central, all or positive counts, got {token!r}") from None
    if n <= 0:
        raise UserError(f"the number of patches must be positive, got {n}")
    return n
