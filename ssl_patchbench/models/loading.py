"""Checkpoints loaded strictly into their zoo entry's architecture.

A load never silently leaves random weights: every missing, unexpected or mis-shaped key is an error.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models.archs import build_backbone, build_entry_backbone, build_projector
from ssl_patchbench.models.checkpoints import fetch, load_file, sha256_file, state_dict_sha256, verify_sha256
from ssl_patchbench.models.registry import WeightsLayout, ZooEntry, get_entry
from ssl_patchbench.models.solo import (
    SOLO_STATS,
    ProjectorUnavailable,
    TrainingInfo,
    WeightNormLinear,
    build_projector_for,
    rebuilds,
    training_info,
    unknown_method,
)
from ssl_patchbench.models.sources import default_cache_dir
from ssl_patchbench.models.vit import VitReadout, vit_state_dict

log = logging.getLogger(__name__)
_SHOWN = 5
NORM_STATS = ("auto", "entry", *SOLO_STATS)


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint read, hashed and split into its modules' state dicts, with no module built: all that a
    result's identity needs (the entry as trained, the checkpoint's SHA-256 and origin), so a rerun whose
    features are all stored never pays for building the network (nor for importing torchvision).

    ``weights`` holds the ``backbone`` and ``projector`` state dicts until a build that releases them (a run
    keeps the resolved model: it must not keep a second copy of the weights beside the built network).
    ``has_projector``: there are projector weights a build may load; ``projector_note`` says why the projection
    space is unavailable when the state dicts and the training configuration already tell (a projector that
    cannot be rebuilt from its keys is found when it is built).
    """

    entry: ZooEntry
    checkpoint_sha256: str
    checkpoint: str
    weights: dict[str, dict[str, torch.Tensor]]
    training: TrainingInfo
    has_projector: bool = False
    projector_note: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A zoo entry's modules in eval mode (float32) plus the provenance of their weights.

    ``entry`` is the zoo entry as this checkpoint is evaluated: normalisation and pretraining crop taken from the
    checkpoint's training configuration where it gives them. ``projector_note`` says why there is no projector.
    """

    entry: ZooEntry
    backbone: nn.Module
    projector: nn.Module | None
    embed_dim: int
    projection_dim: int | None
    checkpoint_sha256: str
    checkpoint: str
    projector_note: str | None = None

    @property
    def has_projector(self) -> bool:
        """Whether the projection space can be evaluated."""
        return self.projector is not None


def load_model(name: str, **options: Any) -> LoadedModel:
    """Entry `name` with its weights loaded strictly: :func:`resolve_model` (which takes the same keyword
    options), then :func:`build_model`."""
    return build_model(resolve_model(name, **options))


def resolve_model(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    trust_pickle: bool = False,
    cache_dir: Path | None = None,
    norm_stats: str = "auto",
    pool: str | None = None,
    last_blocks: int | None = None,
) -> ResolvedModel:
    """Entry `name`'s checkpoint read, hashed and split; `checkpoint` (path or URL) overrides the entry's source,
    `pool` and `last_blocks` a ViT entry's readout (the returned entry carries the readout used).

    `norm_stats`: `auto` normalises as the checkpoint's training did where a solo-learn configuration names its
    dataset (else as the entry says), `entry` always as the entry says, or a dataset name: solo-learn's statistics.
    timm's own weights have no file to hash: their hash is taken over the tensors, so resolving them builds timm's
    model.
    """
    if norm_stats not in NORM_STATS:
        raise UserError(f"unknown normalisation statistics {norm_stats!r}: choose one of {', '.join(NORM_STATS)}")
    entry = get_entry(name).with_readout(pool, last_blocks)
    if entry.source.timm_pretrained and checkpoint is None:
        return _resolve_timm_pretrained(_as_trained(entry, TrainingInfo(), norm_stats))
    path, digest, origin = _resolve(entry, checkpoint, cache_dir or default_cache_dir())
    raw = load_file(path, trust_pickle=trust_pickle)
    state = _find_state_dict(raw, entry.weights.containers, path, quantized=entry.quantized)
    layout, info = entry.weights, TrainingInfo()
    if layout.projector_prefix is not None:  # solo-learn's layout: its configuration says the method and data
        info = training_info(raw, path)
        layout = dataclasses.replace(layout, projector_prefix=info.projector_prefix)
    backbone_sd, projector_sd = _split(state, layout)
    note = None
    if projector_sd and not rebuilds(info.method) and entry.projector is None:
        note = _projector_unavailable(entry, projector_sd, unknown_method(info))
    return ResolvedModel(
        entry=_as_trained(entry, info, norm_stats),
        checkpoint_sha256=digest,
        checkpoint=origin,
        weights={"backbone": backbone_sd, "projector": projector_sd},
        training=info,
        has_projector=bool(projector_sd) and note is None,
        projector_note=note,
    )


def build_model(model: ResolvedModel, *, release: bool = False) -> LoadedModel:
    """The resolved model's backbone and projector, their weights loaded strictly (a missing, unexpected or
    mis-shaped key is an error; a projector that cannot be rebuilt is left out with the reason). ``release``:
    the resolved model lets go of its state dicts once they are loaded (it cannot be built again)."""
    if not model.weights:
        raise ValueError(f"{model.entry.name}: its weights were released by an earlier build")
    backbone, dim = _load_backbone(model.entry, model.weights["backbone"])
    projector, note = None, model.projector_note
    if model.has_projector:
        projector, note = _load_projector(model.entry, model.training, model.weights["projector"], dim)
    if release:
        model.weights.clear()
    return LoadedModel(
        entry=model.entry,
        backbone=backbone.float().eval(),
        projector=projector,
        embed_dim=dim,
        projection_dim=_out_features(projector),
        checkpoint_sha256=model.checkpoint_sha256,
        checkpoint=model.checkpoint,
        projector_note=note,
    )


def _as_trained(entry: ZooEntry, info: TrainingInfo, norm_stats: str) -> ZooEntry:
    """The entry with the normalisation and pretraining crop this checkpoint was trained with, where known.

    Only solo-learn normalises by training set (`patchbench pretrain` uses the entry's statistics).
    """
    dataset = norm_stats if norm_stats in SOLO_STATS else None
    if norm_stats == "auto" and info.origin == "solo-learn" and info.dataset in SOLO_STATS:
        dataset = info.dataset
    if dataset is not None:
        mean, std = SOLO_STATS[dataset]
        entry = dataclasses.replace(entry, preprocessing=dataclasses.replace(entry.preprocessing, mean=mean, std=std))
    if info.crop_scale is not None:
        entry = dataclasses.replace(entry, pretrain_crop_scale=info.crop_scale)
    return entry


def _load_backbone(entry: ZooEntry, state: dict[str, torch.Tensor]) -> tuple[nn.Module, int]:
    """The entry's backbone with `state` loaded strictly; a ViT's keys are mapped onto timm's first."""
    backbone, dim = build_entry_backbone(entry)
    if isinstance(backbone, VitReadout):
        assert entry.vit is not None  # a readout is built for ViT entries only
        target, state = backbone.vit, vit_state_dict(state, backbone.vit, entry.vit)
    else:
        target = backbone
    _load_strict(target, state, entry.weights.allow_missing, what=f"`{entry.name}` backbone")
    return backbone, dim


def _resolve_timm_pretrained(entry: ZooEntry) -> ResolvedModel:
    """timm's own weights; their provenance hash is taken over the tensors (timm hides the file)."""
    backbone, _ = build_backbone(entry.arch, stem=entry.stem, pretrained=True)
    state = backbone.state_dict()
    return ResolvedModel(
        entry=entry,
        checkpoint_sha256=state_dict_sha256(state),
        checkpoint=entry.arch,
        weights={"backbone": state, "projector": {}},
        training=TrainingInfo(),
    )


def _resolve(entry: ZooEntry, checkpoint: str | Path | None, cache_dir: Path) -> tuple[Path, str, str]:
    """Local file, its verified SHA-256 and its provenance string (path or URL)."""
    if isinstance(checkpoint, str) and "://" in checkpoint:
        path, digest = fetch(checkpoint, sha256=None, cache_dir=cache_dir)
        return path, digest, checkpoint
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        return path, sha256_file(path), str(path)
    if entry.needs_checkpoint:
        raise UserError(f"`{entry.name}` needs --checkpoint PATH")
    if entry.source.path:
        path = Path(entry.source.path).expanduser()
        return path, verify_sha256(path, entry.source.sha256), str(path)
    assert entry.source.url is not None  # guaranteed by _validate
    path, digest = fetch(entry.source.url, sha256=entry.source.sha256, cache_dir=cache_dir)
    return path, digest, entry.source.url


def _find_state_dict(
    obj: object, containers: tuple[str, ...], path: Path, *, quantized: bool = False
) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file (first container key present), floats cast to float32.

    Torch-quantized tensors are dequantized when the entry says ``quantized: true`` and refused otherwise."""
    found = next((obj[key] for key in containers if isinstance(obj, dict) and key in obj), None)
    if containers and found is None:
        raise UserError(
            f"{path} has none of the keys {list(containers)} ({_describe(obj)}): "
            "check that it is the right checkpoint for this model"
        )
    state = obj if not containers else found
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"{path} is not a state dict ({_describe(state)}): check that it is the right checkpoint for this model"
        )
    stray = next((k for k in state if not isinstance(k, str)), None)
    if stray is not None:
        raise UserError(
            f"{path} is not a state dict: key {stray!r} (of type {type(stray).__name__}) is not a parameter name; "
            "check that it is the right checkpoint for this model"
        )
    packed = next((k for k, v in state.items() if v.is_quantized), None)
    if packed is not None and not quantized:
        raise UserError(
            f"{path} holds quantized weights ('{packed}' is {state[packed].dtype}): set quantized: true in the "
            "model's zoo entry to evaluate them dequantized, or use the float checkpoint"
        )
    return {k: _as_float(v) for k, v in state.items()}


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for floating and quantized tensors; integer ones (counters, or weights refused later) as they are."""
    if tensor.is_quantized:
        return tensor.dequantize().float()
    return tensor.float() if tensor.is_floating_point() else tensor


def _describe(obj: object) -> str:
    """A short description of a loaded object for error messages."""
    if isinstance(obj, dict):
        return f"top-level keys: {', '.join(map(str, list(obj)[:_SHOWN]))}"
    return f"a {type(obj).__name__}"


def _split(state: dict[str, torch.Tensor], layout: WeightsLayout) -> tuple[dict, dict]:
    """Backbone and projector tensors under their module names; a key no rule covers is an error."""
    parts: tuple[dict, dict] = ({}, {})
    stray = []
    for raw_key, value in state.items():
        key = _strip_first(raw_key, layout.strip_prefixes)
        if layout.projector_prefix and key.startswith(layout.projector_prefix):
            target, name = parts[1], key.removeprefix(layout.projector_prefix)
        elif key.startswith(layout.ignore_prefixes):
            continue
        elif (prefix := _first_prefix(key, layout.backbone_prefixes)) is not None:
            target, name = parts[0], key.removeprefix(prefix)
        else:
            stray.append(raw_key)
            continue
        if name in target:
            raise UserError(f"two checkpoint keys map to '{name}' (one is '{raw_key}'): fix the weights layout")
        target[name] = value
    if stray:
        raise UserError(
            f"{len(stray)} unexpected checkpoint keys ({_few(stray)}): this checkpoint does not "
            "match the entry's weights layout; add their prefixes to ignore_prefixes if harmless"
        )
    return parts


def _strip_first(key: str, prefixes: tuple[str, ...]) -> str:
    """`key` without the first of `prefixes` it starts with."""
    prefix = _first_prefix(key, prefixes)
    return key if prefix is None else key.removeprefix(prefix)


def _first_prefix(key: str, prefixes: tuple[str, ...]) -> str | None:
    """The first of `prefixes` that `key` starts with (startswith, never a substring match)."""
    return next((p for p in prefixes if key.startswith(p)), None)


def _few(keys: list[str]) -> str:
    """Up to five keys, and how many more, for error messages."""
    more = f", ... {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _load_strict(
    module: nn.Module, state: dict[str, torch.Tensor], allow_missing: tuple[str, ...], *, what: str
) -> None:
    """load_state_dict(strict=True) with errors that name the keys and shapes and state the fix."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not any(fnmatch.fnmatch(k, p) for p in allow_missing)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{what} weights do not fit the architecture: {len(missing)} missing ({_few(missing)}), "
            f"{len(unexpected)} unexpected ({_few(unexpected)}); "
            "use the zoo entry whose arch matches the checkpoint"
        )
    for key, value in state.items():
        if expected[key].is_floating_point() and not value.is_floating_point():
            raise UserError(
                f"{what} key '{key}' holds {value.dtype} values where the model has float weights (an integer or "
                "quantized export without its scales would give chance accuracy): use the float checkpoint"
            )
        if value.shape != expected[key].shape:
            raise UserError(
                f"{what} key '{key}' has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(expected[key].shape)} in the model: the checkpoint is for another "
                "architecture; use the zoo entry that matches it"
            )
    module.load_state_dict({**expected, **state}, strict=True)


def _load_projector(
    entry: ZooEntry, info: TrainingInfo, state: dict[str, torch.Tensor], in_dim: int
) -> tuple[nn.Module | None, str | None]:
    """The projector the checkpoint's method trains (rebuilt from its keys), else the entry's ReLU MLP layout
    (:func:`resolve_model` has made sure there is one); one that cannot be rebuilt exactly is left out with the
    reason (the embedding space still loads)."""
    try:
        if rebuilds(info.method):
            projector = build_projector_for(info, state)
        else:
            assert entry.projector is not None  # else resolve_model noted the projector unavailable
            projector = build_projector(in_dim, entry.projector, batchnorm=entry.projector_batchnorm)
        first = next(m for m in projector.modules() if isinstance(m, nn.Linear))
        if first.in_features != in_dim:
            raise ProjectorUnavailable(
                f"its first layer takes {first.in_features} features, the backbone gives {in_dim}"
            )
        _load_strict(projector, state, entry.weights.allow_missing, what=f"`{entry.name}` projector")
    except UserError as err:
        return None, _projector_unavailable(entry, state, str(err))
    return projector.float().eval(), None


def _projector_unavailable(entry: ZooEntry, state: dict[str, torch.Tensor], reason: str) -> str:
    """The note of a projector left out (logged as a warning): why, and that its keys are ignored."""
    note = f"`{entry.name}`: projector not loaded ({reason}); its {len(state)} keys are ignored"
    log.warning("%s: only --space embedding can be evaluated", note)
    return note


def _out_features(projector: nn.Module | None) -> int | None:
    """Width of the projector's last linear layer (nn.Linear, or DINO's weight-normalised prototypes)."""
    if projector is None:
        return None
    return [m.out_features for m in projector.modules() if isinstance(m, nn.Linear | WeightNormLinear)][-1]
