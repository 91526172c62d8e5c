"""The model zoo's registry: entries as frozen, validated dataclasses, filled in from `model_zoo.yaml`.

Entries are shaped after timm's PretrainedCfg; YAML only fills them in, field by typed field. Listing or showing
entries never imports a deep-learning framework: this module knows names and numbers, not weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
import urllib.parse
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from ssl_patchbench.core.errors import UserError, did_you_mean
from ssl_patchbench.core.yamlfile import read_yaml
from ssl_patchbench.models.sources import cache_path

ZOO_FILE = Path(__file__).with_name("model_zoo.yaml")
ZOO_ENV = "PATCHBENCH_ZOO"
INTERPOLATIONS = ("bilinear", "bicubic")
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")
TINY_ARCH = "tiny_cnn"
TIMM_PREFIX = "timm:"
STEMS = ("imagenet", "cifar", "tf_same")
POOLS = ("cls", "mean", "cls+mean")
VIT_KEY_MAPS = ("timm", "dinov2")
VIT_OVERRIDES = ("depth", "embed_dim", "num_heads")
INPUT_SIZES = (8, 1024)  # px: what a zoo entry's model may take (ViTs at 518 px included)
MAX_RESIZE = 2048
MAX_WIDTH = 65536  # projector layers


def check_arch(arch: str, stem: str = "imagenet") -> None:
    """Raise UserError for an unknown arch or stem, so a bad zoo entry fails before any weights load (a timm
    name is checked against timm when the model is built: listing the zoo does not import timm)."""
    if arch.startswith(TIMM_PREFIX):
        if not arch.removeprefix(TIMM_PREFIX):
            raise UserError("timm architectures are named timm:<name>, e.g. timm:resnet50.a1_in1k")
    elif arch not in (*TORCHVISION_ARCHS, TINY_ARCH):
        hint = did_you_mean(arch, (*TORCHVISION_ARCHS, TINY_ARCH))
        raise UserError(
            f"unknown architecture '{arch}'{hint}: use one of {', '.join(TORCHVISION_ARCHS)}, "
            f"{TINY_ARCH} or timm:<name>"
        )
    if stem not in STEMS:
        raise UserError(f"unknown stem '{stem}'{did_you_mean(stem, STEMS)}: use one of {', '.join(STEMS)}")
    if stem != "imagenet" and arch not in TORCHVISION_ARCHS:
        raise UserError(f"stem '{stem}' applies to torchvision ResNets only: use 'imagenet' for '{arch}'")


@dataclass(frozen=True)
class Preprocessing:
    """The authors' evaluation transform: the whole image (`resize` null, CIFAR/STL-size entries) or, for any image
    size, the shorter side resized to `resize` and the centre `input_size` crop; `interpolation` for the central
    view and the patches; `mean`/`std` on [0, 1] pixels."""

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
class VitSpec:
    """A Vision Transformer entry: its upstream key map, timm overrides and readout (one vector per image).

    `keys`: `timm` (DINO, iBOT, MAE, MoCo v3 name their tensors as timm does) or `dinov2` (renames, registers).
    `pool` of the last `last_blocks` blocks, each through the final LayerNorm, concatenated. A position-embedding
    grid trained at another size is resampled once at load time, bicubic, as the upstream forward does it:
    `pos_embed_offset` is DINO's historical +0.1 on the target grid (0 = plain output size).
    """

    keys: str = "timm"
    pool: str = "cls"
    last_blocks: int = 1
    overrides: dict[str, int] = field(default_factory=dict)
    pos_embed_offset: float = 0.1
    pos_embed_antialias: bool = False


@dataclass(frozen=True)
class ZooEntry:
    """One pretrained model: architecture, weights, preprocessing and the numbers its authors report."""

    name: str
    arch: str
    preprocessing: Preprocessing
    patch_scale: tuple[float, float]  # the default --patch-scale: the paper's protocol, (0.08, 1) for Table 4
    description: str
    stem: str = "imagenet"
    source: Source = Source()
    weights: WeightsLayout = WeightsLayout()
    projector: tuple[int, ...] | None = None
    projector_batchnorm: bool = True
    pretrain_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pretrain_crop_scale: tuple[float, float] | None = None  # the model's own RandomResizedCrop scale (recorded)
    references: dict[str, float] = field(default_factory=dict)
    license: str | None = None
    needs_checkpoint: bool = False
    vit: VitSpec | None = None
    quantized: bool = False  # the file holds torch-quantized tensors (qint8, ...): dequantized to float32 on load

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view, hashed into store keys. A CNN has no `vit` block and leaves it out, so the store keys
        of CNN results are the ones they had before Vision Transformers joined the zoo."""
        view = dataclasses.asdict(self)
        return view if self.vit is not None else {k: v for k, v in view.items() if k != "vit"}

    def with_readout(self, pool: str | None = None, last_blocks: int | None = None) -> ZooEntry:
        """This entry with its ViT readout overridden (`--pool`, `--last-blocks`); None keeps the entry's own."""
        if pool is None and last_blocks is None:
            return self
        if self.vit is None:
            raise UserError(
                f"--pool and --last-blocks apply to Vision Transformer entries; '{self.name}' ({self.arch}) "
                "is a CNN: leave them out"
            )
        vit = dataclasses.replace(self.vit, pool=pool or self.vit.pool, last_blocks=last_blocks or self.vit.last_blocks)
        _validate_vit(vit, f"model '{self.name}'")
        return dataclasses.replace(self, vit=vit)


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
    data = read_yaml(path, "zoo file ")  # size-bounded, alias bombs refused
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise UserError(f"{path}: expected a top-level 'models:' list of entries")
    return [_parse_entry(item, path) for item in data["models"]]


def _parse_entry(item: object, path: Path) -> ZooEntry:
    """One validated entry; errors name the file, the entry and the field."""
    name = item.get("name") if isinstance(item, dict) else None
    if not isinstance(name, str):
        raise UserError(f"{path}: every entry needs a 'name' string (got {_short(item)})")
    where = f"{path}: entry '{name}'"
    if "pretrain_scale" in item:
        raise UserError(
            f"{where}: field 'pretrain_scale' is now 'patch_scale' (the default patch scale); "
            "the model's own pretraining crop goes in 'pretrain_crop_scale'"
        )
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
    elif tp is float and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    elif tp in (str, int, bool) and type(value) is tp:
        return value
    expected = {float: "a finite number"}.get(tp) or (tp.__name__ if tp in (str, int, bool) else str(tp))
    raise UserError(f"{where}, field '{name}': expected {expected}, got {_short(value)}")


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters for an error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
            INPUT_SIZES[0] <= pre.input_size <= INPUT_SIZES[1],
            "preprocessing.input_size",
            f"expected {INPUT_SIZES[0]} to {INPUT_SIZES[1]} px, got {pre.input_size}",
        ),
        (
            pre.resize is None or pre.input_size <= pre.resize <= MAX_RESIZE,
            "preprocessing.resize",
            f"expected input_size <= resize <= {MAX_RESIZE} px (or null), got {pre.resize}",
        ),
        (all(0 <= m <= 1 for m in pre.mean), "preprocessing.mean", "expected values in [0, 1] (of [0, 1] pixels)"),
        (all(0 < s <= 1 for s in pre.std), "preprocessing.std", "expected values in (0, 1] (of [0, 1] pixels)"),
        (0 < e.patch_scale[0] <= e.patch_scale[1] <= 1, "patch_scale", "expected 0 < min <= max <= 1"),
        (
            e.pretrain_crop_scale is None or 0 < e.pretrain_crop_scale[0] <= e.pretrain_crop_scale[1] <= 1,
            "pretrain_crop_scale",
            "expected 0 < min <= max <= 1, or null",
        ),
        (0 < e.pretrain_ratio[0] <= e.pretrain_ratio[1], "pretrain_ratio", "expected 0 < min <= max"),
        (
            e.projector is None or (e.projector and min(e.projector) > 0 and max(e.projector) <= MAX_WIDTH),
            "projector",
            f"expected a non-empty list of widths from 1 to {MAX_WIDTH}, or null",
        ),
        (
            all(0 <= v <= 100 for v in e.references.values()),
            "references",
            "expected accuracies in % (0 to 100)",
        ),
    ]
    if e.vit is not None:
        checks += [
            (e.arch.startswith(TIMM_PREFIX), "arch", "a Vision Transformer is built by timm: use timm:<vit name>"),
            (not src.timm_pretrained, "source.timm_pretrained", "a ViT entry names its upstream file (url or path)"),
            (
                e.projector is None and e.weights.projector_prefix is None,
                "projector",
                "ViT heads go in ignore_prefixes",
            ),
        ]
    _raise_first_failure(checks, where)
    if e.vit is not None:
        _validate_vit(e.vit, where)


def _validate_vit(vit: VitSpec, where: str) -> None:
    """The ViT block's values, each naming its field."""
    unknown = [k for k in vit.overrides if k not in VIT_OVERRIDES]
    checks = [
        (vit.keys in VIT_KEY_MAPS, "vit.keys", f"use one of {', '.join(VIT_KEY_MAPS)}"),
        (vit.pool in POOLS, "vit.pool", f"use one of {', '.join(POOLS)}"),
        (vit.last_blocks >= 1, "vit.last_blocks", "expected a positive number of blocks"),
        (not unknown, "vit.overrides", f"unknown {unknown[:1]}: timm settings allowed are {', '.join(VIT_OVERRIDES)}"),
        (all(v > 0 for v in vit.overrides.values()), "vit.overrides", "expected positive values"),
        (0 <= vit.pos_embed_offset < 1, "vit.pos_embed_offset", "expected 0 <= offset < 1"),
    ]
    _raise_first_failure(checks, where)


def _raise_first_failure(checks: list[tuple[object, str, str]], where: str) -> None:
    """A UserError naming the field of the first failed (ok, field, fix) check."""
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
