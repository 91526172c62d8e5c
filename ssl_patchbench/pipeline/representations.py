"""What one ``EvalConfig`` evaluates: the patch specs its ``--patches`` tokens name (central, counts, sliding
windows), and every (spec, aggregation, space) triple, each of which is one record.

The rules (docs/protocol.md, "One call, several representations"): an aggregation applies to every bag it is
defined for (gridpool to grid and sliding layouts whose grid is at least its kernel), central is its one patch's
embedding; a space evaluates every representation, or the ``--patches`` tokens it names (``projection:central``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models.encoder import SPACES
from ssl_patchbench.models.registry import ZooEntry
from ssl_patchbench.pipeline.config import EvalConfig
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec

SLIDING_TOKENS = ("sliding", "all")  # all: how --mode sliding command lines named the windows before `sliding`


class Representation(NamedTuple):
    """One record's representation: its patch spec, its aggregation and the space of its features."""

    spec: PatchSpec
    aggregation: Aggregation
    space: str


def representations(cfg: EvalConfig, entry: ZooEntry) -> list[PatchSpec]:
    """The distinct specs of ``cfg.patches`` in token order (a repeated token is one spec), in the model's input
    size, central view and interpolation."""
    parse = _token_parser(cfg, entry)
    return list(dict.fromkeys(parse(token) for token in cfg.patches))


def evaluations(cfg: EvalConfig, entry: ZooEntry) -> list[Representation]:
    """Every representation one ``eval`` of ``cfg`` evaluates: space by space in ``--space`` order, each in
    ``--patches`` order, each spec in ``--aggregate`` order."""
    specs = representations(cfg, entry)
    aggregations = _aggregations(cfg, specs)
    return [
        Representation(spec, agg, space)
        for space, members in _space_members(cfg, entry, specs)
        for spec in members
        for agg in aggregations[spec]
    ]


def space_names(cfg: EvalConfig) -> tuple[str, ...]:
    """The spaces ``--space`` lists, in order, each once (what the encoder computes in its one forward)."""
    names = [item.partition(":")[0].strip().lower() for item in cfg.space]
    for name in names:
        if name not in SPACES:
            raise UserError(f"unknown space {name!r} in --space: choose embedding or projection")
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated:
        raise UserError(f"--space names {repeated} twice: list each space once")
    return tuple(names)


def _space_members(cfg: EvalConfig, entry: ZooEntry, specs: list[PatchSpec]) -> list[tuple[str, list[PatchSpec]]]:
    """Each listed space and the specs evaluated in it: all of them, or the tokens after ``SPACE:`` (joined
    by ``+``); every spec must be in at least one space."""
    parse = _token_parser(cfg, entry)
    found = []
    for name, item in zip(space_names(cfg), cfg.space, strict=True):
        scope = item.partition(":")[2]
        if not scope.strip():
            found.append((name, specs))
            continue
        chosen = set()
        for token in (t for t in scope.split("+") if t.strip()):
            spec = parse(token)
            if spec not in specs:
                raise UserError(f"--space {item}: {token.strip()} is not among --patches {','.join(cfg.patches)}")
            chosen.add(spec)
        found.append((name, [spec for spec in specs if spec in chosen]))
    alone = next((spec for spec in specs if not any(spec in members for _, members in found)), None)
    if alone is not None:
        raise UserError(
            f"representation {_name(alone)} is in no space of --space {','.join(cfg.space)}: "
            "list a space without a ':' scope (e.g. embedding,projection:central)"
        )
    return found


def _aggregations(cfg: EvalConfig, specs: list[PatchSpec]) -> dict[PatchSpec, list[Aggregation]]:
    """The aggregations of each spec: central is its one patch (recorded as mean, whatever ``--aggregate``
    says); a bag gets every listed aggregation defined for it. A bag with none, or an aggregation that no bag
    takes, is an error."""
    listed = list(dict.fromkeys(Aggregation.parse(a) for a in cfg.aggregations))
    found = {
        spec: [Aggregation()] if spec.mode == "central" else [a for a in listed if _why_not(a, spec) is None]
        for spec in specs
    }
    bags = [spec for spec in specs if spec.mode != "central"]
    for spec in bags:
        if not found[spec]:
            raise UserError(
                f"--aggregate {','.join(a.label for a in listed)} gives representation {_name(spec)} no "
                f"aggregation: {_why_not(listed[0], spec)}; add mean or concat"
            )
    for agg in listed:
        if bags and not any(agg in found[spec] for spec in bags):
            closest = next((spec for spec in bags if spec.mode in ("grid", "sliding")), bags[0])
            raise UserError(
                f"--aggregate {agg.label} applies to no representation of --patches {','.join(cfg.patches)}: "
                f"{_why_not(agg, closest)}"
            )
    return found


def _why_not(agg: Aggregation, spec: PatchSpec) -> str | None:
    """Why ``agg`` has no meaning for the bag ``spec`` (None: it has one)."""
    if agg.kind == "gridpool" and spec.mode not in ("grid", "sliding"):
        return f"gridpool needs a patch grid ({spec.mode} patches have none: grid counts or sliding windows do)"
    try:
        agg.check(spec)
    except UserError as exc:
        return str(exc)
    return None


def _name(spec: PatchSpec) -> str:
    return spec.label if spec.mode == "central" else f"{spec.label} ({spec.mode})"


def _token_parser(cfg: EvalConfig, entry: ZooEntry) -> Callable[[str], PatchSpec]:
    """``--patches`` token -> spec. ``sliding`` (or ``all``) is the windows of ``--patch-size``/``--stride``; a
    count is a random bag (``--mode random``), a g x g grid (``--mode grid``) or, with ``--mode sliding``, the
    windows again (it must be their number). With sliding windows in the call, ``--patch-size`` is their side
    and random bags are RandomResizedCrop boxes at ``--patch-scale``."""
    pre = entry.preprocessing
    common = {"out_size": pre.input_size, "resize": pre.resize, "interpolation": pre.interpolation, "seed": cfg.seed}
    windows = cfg.mode == "sliding" or any(t.strip().lower() in SLIDING_TOKENS for t in cfg.patches)

    def parse(token: str) -> PatchSpec:
        token = token.strip().lower()
        if token == "central":
            return PatchSpec(mode="central", **common)
        if token in SLIDING_TOKENS or cfg.mode == "sliding":
            spec = PatchSpec(mode="sliding", size=cfg.size, stride=cfg.stride, **common)
            if token not in (*SLIDING_TOKENS, str(spec.num_patches)):
                raise UserError(
                    f"sliding {cfg.size} px windows at stride {cfg.stride} give {spec.num_patches} patches, "
                    f"not {token}: use --patches {spec.num_patches} (or sliding)"
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
        size = None if windows else cfg.size
        return PatchSpec(mode="random", n=n, scale=tuple(scale), ratio=cfg.ratio, size=size, **common)

    return parse


def _count(token: str) -> int:
    try:
        n = int(token)
    except ValueError:
        raise UserError(f"--patches takes central, sliding (or all) and positive counts, got {token!r}") from None
    if n <= 0:
        raise UserError(f"the number of patches must be positive, got {n}")
    return n
