"""The model zoo: validated registry entries, and checkpoints loaded strictly into their architecture.

Entries are frozen dataclasses (shape after timm's PretrainedCfg); `model_zoo.yaml` only fills them in.
A load never silently leaves random weights: every missing, unexpected or mis-shaped key is an error.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
import re
import types
import typing
import urllib.parse
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ssl_patchbench.archs import build_backbone, build_projector, check_arch
from ssl_patchbench.checkpoints import (
    cache_path,
    default_cache_dir,
    fetch,
    load_file,
    sha256_file,
    state_dict_sha256,
    verify_sha256,
)
from ssl_patchbench.errors import UserError, did_you_mean

ZOO_FILE = Path(__file__).with_name("model_zoo.yaml")
ZOO_ENV = "PATCHBENCH_ZOO"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_SHOWN = 5


@dataclass(frozen=True)
class Preprocessing:
    """Central view: whole image up to 96 px; larger ones resize the shorter side to `resize`, crop `input_size`."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class Source:
    """Where the weights come from; hub fields are provenance (the file is fetched from `url`)."""

    url: str | None = None
    sha256: str | None = None
    hub_repo: str | None = None
    hub_entry: str | None = None
    path: str | None = None
    timm_pretrained: bool = False


@dataclass(frozen=True)
class WeightsLayout:
    """How to find the backbone and projector tensors in a checkpoint file; every other key is an error.

    Keys are stripped of the first matching `strip_prefixes`, then sorted by `startswith`: projector first,
    then ignored, then backbone ("" takes every remaining key). `allow_missing` holds fnmatch patterns.
    """

    containers: tuple[str, ...] = ()
    strip_prefixes: tuple[str, ...] = ()
    backbone_prefixes: tuple[str, ...] = ("",)
    projector_prefix: str | None = None
    ignore_prefixes: tuple[str, ...] = ()
    allow_missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class ZooEntry:
    """One pretrained model: architecture, weights, preprocessing and the numbers its authors report."""

    name: str
    arch: str
    preprocessing: Preprocessing
    pretrain_scale: tuple[float, float]
    description: str
    stem: str = "imagenet"
    source: Source = Source()
    weights: WeightsLayout = WeightsLayout()
    projector: tuple[int, ...] | None = None
    projector_batchnorm: bool = True
    pretrain_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    references: dict[str, float] = field(default_factory=dict)
    license: str | None = None
    needs_checkpoint: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view, hashed into store keys."""
        return dataclasses.asdict(self)


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


# ---------------------------------------------------------------- registry


def list_entries() -> list[ZooEntry]:
    """All entries: the packaged zoo plus the file named by $PATCHBENCH_ZOO, if any."""
    return list(_registry(os.environ.get(ZOO_ENV) or None).values())


def get_entry(name: str) -> ZooEntry:
    """The entry called `name`; an unknown name suggests the closest ones."""
    entries = _registry(os.environ.get(ZOO_ENV) or None)
    if name not in entries:
        raise UserError(
            f"unknown model '{name}'{did_you_mean(name, entries)}: use a name from "
            f"{ZOO_FILE.name} or add an entry in a file named by ${ZOO_ENV}"
        )
    return entries[name]


@functools.cache
def _registry(extra: str | None) -> dict[str, ZooEntry]:
    """Parse the zoo files once per process; a name defined twice is an error, never an override."""
    entries: dict[str, ZooEntry] = {}
    for path in [ZOO_FILE, *([Path(extra).expanduser()] if extra else [])]:
        for entry in _parse_file(path):
            if entry.name in entries:
                raise UserError(f"{path}: entry '{entry.name}' is already defined: rename it")
            entries[entry.name] = entry
    return entries


def _parse_file(path: Path) -> list[ZooEntry]:
    """Entries of one zoo file: a top-level `models:` list of mappings."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read zoo file {path} ({str(err).splitlines()[0]}): fix or remove it") from err
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise UserError(f"{path}: expected a top-level 'models:' list of entries")
    return [_parse_entry(item, path) for item in data["models"]]


def _parse_entry(item: object, path: Path) -> ZooEntry:
    """One validated entry; errors name the file, the entry and the field."""
    name = item.get("name") if isinstance(item, dict) else None
    if not isinstance(name, str):
        raise UserError(f"{path}: every entry needs a 'name' string (got {str(item)[:60]})")
    where = f"{path}: entry '{name}'"
    entry = _build(ZooEntry, item, where, "")
    _validate(entry, where)
    return entry


def _build(cls: type, data: object, where: str, prefix: str) -> Any:
    """Fill dataclass `cls` from a YAML mapping, type-checking every field against its annotation."""
    if not isinstance(data, dict):
        raise UserError(f"{where}, field '{prefix.rstrip('.') or cls.__name__}': expected a mapping")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise UserError(f"{where}: unknown field '{prefix}{key}'{did_you_mean(str(key), names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], where, prefix + f.name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise UserError(f"{where}: missing required field '{prefix}{f.name}'")
    return cls(**kwargs)


def _coerce(value: object, tp: Any, where: str, name: str) -> Any:
    """`value` converted to annotation `tp` (dataclass, optional, tuple, dict or scalar) or a UserError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, name + ".")
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _coerce(value, inner, where, name)
    if origin is tuple and isinstance(value, list | tuple):
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(items) == len(value):
            pairs = enumerate(zip(value, items, strict=True))
            return tuple(_coerce(v, t, where, f"{name}[{i}]") for i, (v, t) in pairs)
    elif origin is dict and isinstance(value, dict):
        return {_coerce(k, args[0], where, name): _coerce(v, args[1], where, f"{name}.{k}") for k, v in value.items()}
    elif tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif tp in (str, int, bool) and type(value) is tp:
        return value
    expected = tp.__name__ if tp in (str, int, float, bool) else str(tp)
    raise UserError(f"{where}, field '{name}': expected {expected}, got {value!r}")


def _validate(e: ZooEntry, where: str) -> None:
    """Semantic checks the types cannot express, each naming its field."""
    for fld, stem in (("arch", "imagenet"), ("stem", e.stem)):
        try:
            check_arch(e.arch, stem)
        except UserError as err:
            raise UserError(f"{where}, field '{fld}': {err}") from err
    src, pre = e.source, e.preprocessing
    checks = [
        (
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", e.name),
            "name",
            "use letters, digits, '.', '_' and '-', starting with a letter or digit (a name is never a path)",
        ),
        (
            src.url or src.path or src.timm_pretrained or e.needs_checkpoint,
            "source",
            "give url, path or timm_pretrained: true, or set needs_checkpoint: true",
        ),
        (
            src.url is None or _cacheable(src.url),
            "source.url",
            "expected an http(s):// or file:// URL naming a file, without '..' segments",
        ),
        (
            src.sha256 is None or re.fullmatch("[0-9a-f]{64}", src.sha256),
            "source.sha256",
            "expected 64 lowercase hex digits or null",
        ),
        (not src.timm_pretrained or e.arch.startswith("timm:"), "source.timm_pretrained", "needs a timm:<name> arch"),
        (pre.interpolation in INTERPOLATIONS, "preprocessing.interpolation", f"use one of {INTERPOLATIONS}"),
        (
            pre.input_size > 0 and (pre.resize is None or pre.resize >= pre.input_size),
            "preprocessing.resize",
            "expected input_size > 0 and resize >= input_size (or null)",
        ),
        (0 < e.pretrain_scale[0] <= e.pretrain_scale[1] <= 1, "pretrain_scale", "expected 0 < min <= max <= 1"),
        (0 < e.pretrain_ratio[0] <= e.pretrain_ratio[1], "pretrain_ratio", "expected 0 < min <= max"),
        (
            e.projector is None or (e.projector and min(e.projector) > 0),
            "projector",
            "expected a non-empty list of positive widths, or null",
        ),
    ]
    for ok, fld, fix in checks:
        if not ok:
            raise UserError(f"{where}, field '{fld}': {fix}")


def _cacheable(url: str) -> bool:
    """A URL the checkpoint cache accepts: a known scheme and a file name that stays inside the cache."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        return False
    try:
        cache_path(url, Path("/cache"))
    except UserError:
        return False
    return True


# ---------------------------------------------------------------- loading


def load_model(
    name: str, *, checkpoint: str | Path | None = None, trust_pickle: bool = False, cache_dir: Path | None = None
) -> LoadedModel:
    """Entry `name` with its weights loaded strictly; `checkpoint` (path or URL) overrides the entry's source."""
    entry = get_entry(name)
    if entry.source.timm_pretrained and checkpoint is None:
        return _load_timm_pretrained(entry)
    path, digest, origin = _resolve(entry, checkpoint, cache_dir or default_cache_dir())
    state = _find_state_dict(load_file(path, trust_pickle=trust_pickle), entry.weights.containers, path)
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


def _find_state_dict(obj: object, containers: tuple[str, ...], path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file (first container key present), floats cast to float32."""
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
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


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
