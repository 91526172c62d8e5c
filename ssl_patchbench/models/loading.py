"""Checkpoints loaded strictly into their zoo entry's architecture.

A load never silently leaves random weights: every missing, unexpected or mis-shaped key is an error.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models.archs import build_backbone, build_projector
from ssl_patchbench.models.checkpoints import fetch, load_file, sha256_file, state_dict_sha256, verify_sha256
from ssl_patchbench.models.registry import WeightsLayout, ZooEntry, get_entry
from ssl_patchbench.models.sources import default_cache_dir

_SHOWN = 5


@dataclass(frozen=True)
class LoadedModel:
    """A zoo entry's modules in eval mode (float32) plus the provenance of their weights."""

    entry: ZooEntry
    backbone: nn.Module
    projector: nn.Module | None
    embed_dim: int
    projection_dim: int | None
    checkpoint_sha256: str
    checkpoint: str


def load_model(
    name: str, *, checkpoint: str | Path | None = None, trust_pickle: bool = False, cache_dir: Path | None = None
) -> LoadedModel:
    """Entry `name` with its weights loaded strictly; `checkpoint` (path or URL) overrides the entry's source."""
    entry = get_entry(name)
    if entry.source.timm_pretrained and checkpoint is None:
        return _load_timm_pretrained(entry)
    path, digest, origin = _resolve(entry, checkpoint, cache_dir or default_cache_dir())
    loaded = load_file(path, trust_pickle=trust_pickle)
    state = _find_state_dict(loaded, entry.weights.containers, path, quantized=entry.quantized)
    backbone_sd, projector_sd = _split(state, entry.weights)
    backbone, dim = build_backbone(entry.arch, stem=entry.stem)
    _load_strict(backbone, backbone_sd, entry.weights.allow_missing, what=f"`{name}` backbone")
    projector = _load_projector(entry, projector_sd, dim) if projector_sd else None
    return LoadedModel(
        entry=entry,
        backbone=backbone.float().eval(),
        projector=projector,
        embed_dim=dim,
        projection_dim=_out_features(projector),
        checkpoint_sha256=digest,
        checkpoint=origin,
    )


def _load_timm_pretrained(entry: ZooEntry) -> LoadedModel:
    """timm's own weights; their provenance hash is taken over the tensors (timm hides the file)."""
    backbone, dim = build_backbone(entry.arch, stem=entry.stem, pretrained=True)
    return LoadedModel(
        entry=entry,
        backbone=backbone.float().eval(),
        projector=None,
        embed_dim=dim,
        projection_dim=None,
        checkpoint_sha256=state_dict_sha256(backbone.state_dict()),
        checkpoint=entry.arch,
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


def _load_projector(entry: ZooEntry, state: dict[str, torch.Tensor], in_dim: int) -> nn.Module:
    """Projector from the entry's layout, or inferred from the checkpoint's Linear/BatchNorm keys."""
    if entry.projector is not None:
        projector = build_projector(in_dim, entry.projector, batchnorm=entry.projector_batchnorm)
    else:
        projector = _infer_projector(state, in_dim, entry.name)
    _load_strict(projector, state, entry.weights.allow_missing, what=f"`{entry.name}` projector")
    return projector.float().eval()


def _infer_projector(state: dict[str, torch.Tensor], in_dim: int, name: str) -> nn.Sequential:
    """A solo-learn style MLP matching `state` (Linear weights are 2-D, BatchNorm has running stats)."""
    heads = {key.split(".", 1)[0] for key in state}
    if not all(h.isdigit() for h in heads):
        raise UserError(
            f"`{name}`: cannot infer the projector from keys like '{next(iter(state))}': "
            "set the entry's projector field"
        )
    linears = sorted(int(h) for h in heads if state.get(f"{h}.weight", torch.empty(0)).ndim == 2)
    norms = [int(h) for h in heads if f"{h}.running_mean" in state]
    if not linears:
        raise UserError(f"`{name}`: the checkpoint's projector has no Linear layer: set the entry's projector field")
    return build_projector(
        in_dim,
        [state[f"{i}.weight"].shape[0] for i in linears],
        batchnorm=any(i < linears[-1] for i in norms),
        last_batchnorm=any(i > linears[-1] for i in norms),
    )


def _out_features(projector: nn.Module | None) -> int | None:
    """Width of the projector's last Linear layer."""
    if projector is None:
        return None
    return [m for m in projector.modules() if isinstance(m, nn.Linear)][-1].out_features
