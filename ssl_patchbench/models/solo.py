"""solo-learn checkpoints: which method wrote them, on which data, and its projector rebuilt exactly.

solo-learn keeps a run's configuration beside its checkpoints (``args.json``, ``solo/utils/checkpointer.py``);
Lightning files may also carry it as ``hyper_parameters``; ``patchbench pretrain`` writes ``meta``. The method
name decides what the keys cannot say (ReLU or GELU between the layers, DINO's head); the keys give every
width. A projector that cannot be rebuilt exactly is refused with a reason (the embedding space still loads).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ssl_patchbench.core.errors import UserError

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# solo-learn's normalisation per training set (MEANS_N_STD, solo/data/pretrain_dataloader.py)
SOLO_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261)),
    "imagenet100": IMAGENET_STATS,
    "imagenet": IMAGENET_STATS,
}
# solo/methods/<method>.py: MLP projectors as nn.Sequential, ReLU or GELU between Linear(+BatchNorm) layers.
# patchbench's own methods (vicreg, tcr) train models.archs.build_projector, a ReLU MLP.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    **dict.fromkeys(
        ("barlow_twins", "byol", "mocov2plus", "mocov3", "nnclr", "simclr", "simsiam", "vicreg", "tcr"), nn.ReLU
    ),
    "vibcreg": nn.GELU,
}
_DINO = "dino"  # DINOHead under head.*: GELU MLP, L2 normalisation, weight-normalised prototypes
_BATCHNORM_KEYS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


class ProjectorUnavailable(UserError):
    """The checkpoint's projector cannot be rebuilt exactly; only the embedding space can be evaluated."""


@dataclass(frozen=True)
class TrainingInfo:
    """What a checkpoint says about its training; ``origin`` is solo-learn, patchbench or None (nothing found)."""

    origin: str | None = None
    method: str | None = None
    dataset: str | None = None
    crop_scale: tuple[float, float] | None = None
    method_kwargs: dict = field(default_factory=dict)

    @property
    def projector_prefix(self) -> str:
        """Where the projector's keys live: DINO calls its projector ``head``."""
        return "head." if self.method == _DINO else "projector."


def training_info(obj: object, path: Path) -> TrainingInfo:
    """The training configuration in a loaded checkpoint (``hyper_parameters``, ``meta``) or beside it."""
    if isinstance(obj, Mapping) and isinstance(obj.get("hyper_parameters"), Mapping):
        hp = obj["hyper_parameters"]
        return _solo_info(hp["cfg"] if isinstance(hp.get("cfg"), Mapping) else hp)
    args = path.parent / "args.json"
    if args.is_file():
        try:
            config = json.loads(args.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {args} (solo-learn's run configuration): {err}") from err
        return _solo_info(config if isinstance(config, Mapping) else {})
    if isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping):
        meta = obj["meta"]
        return TrainingInfo(
            "patchbench", _name(meta.get("method")), _name(meta.get("dataset")), _pair(meta.get("scale"))
        )
    return TrainingInfo()


def _solo_info(cfg: Mapping) -> TrainingInfo:
    """solo-learn's configuration: hydra's nested layout (method_kwargs, data.dataset, augmentations[].rrc) or
    a flat mapping (method, dataset, proj_hidden_dim ... at the top level)."""
    data = cfg.get("data")
    dataset = data.get("dataset") if isinstance(data, Mapping) else cfg.get("dataset")
    kwargs = cfg.get("method_kwargs")
    kwargs = dict(kwargs) if isinstance(kwargs, Mapping) else {k: cfg[k] for k in _KWARGS if k in cfg}
    crops = cfg.get("augmentations")
    rrc = crops[0].get("rrc") if isinstance(crops, list | tuple) and crops and isinstance(crops[0], Mapping) else None
    scale = _pair([rrc.get("crop_min_scale"), rrc.get("crop_max_scale")]) if isinstance(rrc, Mapping) else None
    return TrainingInfo("solo-learn", _name(cfg.get("method")), _name(dataset), scale, kwargs)


_KWARGS = ("proj_hidden_dim", "proj_output_dim", "num_prototypes")


def _name(value: object) -> str | None:
    return value.lower() if isinstance(value, str) else None


def _pair(value: object) -> tuple[float, float] | None:
    ok = isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value)
    return (float(value[0]), float(value[1])) if ok else None  # type: ignore[index]


def rebuilds(method: str | None) -> bool:
    """Whether patchbench knows ``method``'s projector layout (the keys then give its widths)."""
    return method == _DINO or method in _ACTIVATIONS


def build_projector_for(info: TrainingInfo, state: dict[str, torch.Tensor]) -> nn.Module:
    """The projector ``info.method`` trains, shaped by the keys of ``state`` (prefix stripped)."""
    if not rebuilds(info.method):
        raise ProjectorUnavailable(f"method '{info.method}': its projector layout is not known to patchbench")
    if info.method == _DINO:
        projector: nn.Module = _dino_head(state)
    else:
        projector = indexed_mlp(state, _ACTIVATIONS[str(info.method)], str(info.method))
    _check_widths(info, projector)
    return projector


def unknown_method(info: TrainingInfo) -> str:
    """Why a projector is not rebuilt when the checkpoint names no known method and the entry gives no layout."""
    if info.method is None:
        return (
            "the checkpoint does not say which method trained it (no hyper_parameters, no args.json beside it, "
            "no meta), so its projector's activations are unknown"
        )
    return f"method '{info.method}': its projector layout is not known to patchbench"


def indexed_mlp(state: dict[str, torch.Tensor], activation: type[nn.Module], method: str) -> nn.Sequential:
    """An ``nn.Sequential`` whose every index is what the keys say: Linear (2-D weight, bias if present),
    BatchNorm1d (running stats; affine if it has a weight), or, with no keys, ``activation``."""
    layers: dict[int, set[str]] = {}
    for key in state:
        head, _, rest = key.partition(".")
        if not head.isdigit():
            raise ProjectorUnavailable(f"method '{method}': projector key '{key}' is not an nn.Sequential index")
        layers.setdefault(int(head), set()).add(rest)
    modules: list[nn.Module] = []
    for i in range(max(layers, default=-1) + 1):
        names = layers.get(i, set())
        weight = state.get(f"{i}.weight")
        if not names:
            modules.append(activation())
        elif "running_mean" in names and names <= _BATCHNORM_KEYS:
            modules.append(nn.BatchNorm1d(state[f"{i}.running_mean"].shape[0], affine="weight" in names))
        elif names <= {"weight", "bias"} and weight is not None and weight.ndim == 2:
            modules.append(nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in names))
        else:
            raise ProjectorUnavailable(
                f"method '{method}': projector layer {i} has keys {sorted(names)} (e.g. VIbCReg's IterNorm), "
                "which patchbench cannot rebuild"
            )
    if not any(isinstance(m, nn.Linear) for m in modules):
        raise ProjectorUnavailable(f"method '{method}': the checkpoint's projector has no Linear layer")
    return nn.Sequential(*modules)


class WeightNormLinear(nn.Module):
    """``nn.utils.weight_norm(nn.Linear(d_in, d_out, bias=False))`` with its ``weight_g``/``weight_v`` names."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.out_features = d_out
        self.weight_g = nn.Parameter(torch.ones(d_out, 1))
        self.weight_v = nn.Parameter(torch.empty(d_out, d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """solo-learn's DINO head: ``last_layer(normalize(mlp(x)))``, the ``z`` its loss reads."""

    def __init__(self, mlp: nn.Module, bottleneck: int, prototypes: int) -> None:
        super().__init__()
        self.mlp = mlp
        self.last_layer = WeightNormLinear(bottleneck, prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def _dino_head(state: dict[str, torch.Tensor]) -> DINOHead:
    v = state.get("last_layer.weight_v")
    if v is None or v.ndim != 2 or "last_layer.weight_g" not in state:
        raise ProjectorUnavailable(
            "method 'dino': no head.last_layer.weight_g/weight_v keys (a weight-normalised prototype layer)"
        )
    mlp_state = {k.removeprefix("mlp."): t for k, t in state.items() if k.startswith("mlp.")}
    if set(mlp_state) <= {"weight", "bias"} and mlp_state:  # num_layers == 1: a single Linear
        mlp: nn.Module = nn.Linear(mlp_state["weight"].shape[1], mlp_state["weight"].shape[0])
    else:
        mlp = indexed_mlp(mlp_state, nn.GELU, _DINO)
    return DINOHead(mlp, v.shape[1], v.shape[0])


def _check_widths(info: TrainingInfo, projector: nn.Module) -> None:
    """The hyper-parameters' widths, where given, must be the keys' (a mismatch means a mixed-up file)."""
    mlp = projector.mlp if isinstance(projector, DINOHead) else projector
    widths = [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)]
    said = {
        "proj_hidden_dim": (info.method_kwargs.get("proj_hidden_dim"), widths[:-1]),
        "proj_output_dim": (info.method_kwargs.get("proj_output_dim"), widths[-1:]),
    }
    if isinstance(projector, DINOHead):
        said["num_prototypes"] = (info.method_kwargs.get("num_prototypes"), [projector.last_layer.weight_v.shape[0]])
    for name, (value, found) in said.items():
        if isinstance(value, int) and any(w != value for w in found):
            raise ProjectorUnavailable(
                f"method '{info.method}': hyper-parameter {name}={value} but the projector keys give {found}"
            )
