"""solo-learn checkpoints of every method load: the projector each method trains, rebuilt from keys and config.

Each checkpoint is written in that method's exact layout (module definitions transcribed from
vturrisi/solo-learn's solo/methods/<method>.py, random weights and batch-norm statistics, its extra keys), with
the run configuration where solo-learn keeps it (args.json beside the file) or in Lightning's hyper_parameters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models import loading
from ssl_patchbench.models.archs import TinyResNet
from ssl_patchbench.models.encoder import Encoder

D, HIDDEN, OUT = TinyResNet.embed_dim, 48, 24
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # solo-learn's MEANS_N_STD
CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


@pytest.fixture(autouse=True)
def _packaged_zoo_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATCHBENCH_ZOO", raising=False)


def _mlp(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def _relu3(bn_last: bool = False) -> nn.Sequential:  # VICReg, Barlow Twins (NNCLR adds a last BN)
    tail = [nn.BatchNorm1d(OUT)] if bn_last else []
    return _mlp(
        nn.Linear(D, HIDDEN),
        nn.BatchNorm1d(HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.BatchNorm1d(HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, OUT),
        *tail,
    )


def _vibcreg() -> nn.Sequential:
    return _mlp(
        nn.Linear(D, HIDDEN),
        nn.BatchNorm1d(HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.BatchNorm1d(HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, OUT),
        nn.Identity(),  # iternorm: False
    )


def _byol() -> nn.Sequential:
    return _mlp(nn.Linear(D, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def _simclr() -> nn.Sequential:  # MoCo v2+ too
    return _mlp(nn.Linear(D, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def _mocov3() -> nn.Sequential:  # _build_mlp(2, ...): no biases, last BN without affine
    return _mlp(
        nn.Linear(D, HIDDEN, bias=False),
        nn.BatchNorm1d(HIDDEN),
        nn.ReLU(inplace=True),
        nn.Linear(HIDDEN, OUT, bias=False),
        nn.BatchNorm1d(OUT, affine=False),
    )


def _simsiam() -> nn.Sequential:
    return _mlp(
        nn.Linear(D, HIDDEN, bias=False),
        nn.BatchNorm1d(HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN, bias=False),
        nn.BatchNorm1d(HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, OUT),
        nn.BatchNorm1d(OUT, affine=False),
    )


class _DINOHead(nn.Module):
    """solo-learn's DINOHead(use_bn=False, num_layers=3), with torch's own weight_norm as the reference."""

    def __init__(self, prototypes: int = 40) -> None:
        super().__init__()
        self.mlp = _mlp(nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT))
        self.last_layer = nn.utils.weight_norm(nn.Linear(OUT, prototypes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and batch-norm statistics (and weight_g away from 1), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if tensor.is_floating_point():
                value = torch.randn(tensor.shape, generator=gen) * 0.3
                tensor.copy_(value.abs() + 0.5 if name.endswith(("running_var", "weight_g")) else value)
    return module.eval()


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().clone() for k, v in module.state_dict().items()}


def _extras(method: str) -> dict[str, torch.Tensor]:
    """The keys beside backbone.* and the projector that each method's LightningModule saves."""
    extra = {"classifier.weight": torch.randn(10, D), "classifier.bias": torch.randn(10)}
    momentum = _prefixed("momentum_backbone.", _randomised(TinyResNet(), 9))
    if method == "byol":
        extra |= momentum | _prefixed("momentum_projector.", _byol()) | _prefixed("predictor.", _byol())
    elif method == "mocov2plus":
        extra |= momentum | _prefixed("momentum_projector.", _simclr())
        extra |= {"queue": torch.randn(2, OUT, 16), "queue_ptr": torch.zeros(1, dtype=torch.long)}
    elif method == "simsiam":
        extra |= _prefixed("predictor.", _byol())
    elif method == "mocov3":
        extra |= momentum | _prefixed("momentum_projector.", _mocov3()) | _prefixed("predictor.", _mocov3())
    elif method == "dino":
        extra |= momentum | _prefixed("momentum_head.", _DINOHead()) | {"dino_loss_func.center": torch.randn(1, 40)}
    return extra


def _write(tmp_path: Path, method: str, projector: nn.Module, *, config: str = "args", **cfg: object) -> Path:
    """A solo-learn checkpoint of `method` and its run configuration (args.json or hyper_parameters)."""
    backbone = _randomised(TinyResNet(), 1)
    head = "head." if method == "dino" else "projector."
    state = _prefixed("backbone.", backbone) | _prefixed(head, projector) | _extras(method)
    run = {
        "method": method,
        "method_kwargs": {"proj_hidden_dim": HIDDEN, "proj_output_dim": OUT},
        "data": {"dataset": "cifar10"},
        "augmentations": [{"rrc": {"enabled": True, "crop_min_scale": 0.2, "crop_max_scale": 1.0}}],
        **cfg,
    }
    folder = tmp_path / method
    folder.mkdir(parents=True)
    checkpoint = {"state_dict": state, "epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.1.0"}
    if config == "hyper_parameters":
        checkpoint["hyper_parameters"] = {"cfg": run}
    else:
        (folder / "args.json").write_text(json.dumps(run))
    torch.save(checkpoint, folder / f"{method}-ep=1.ckpt")
    return folder / f"{method}-ep=1.ckpt"


METHODS: dict[str, Callable[[], nn.Module]] = {
    "vicreg": _relu3,
    "barlow_twins": _relu3,
    "nnclr": lambda: _relu3(bn_last=True),
    "vibcreg": _vibcreg,
    "byol": _byol,
    "simclr": _simclr,
    "mocov2plus": _simclr,
    "mocov3": _mocov3,
    "simsiam": _simsiam,
    "dino": _DINOHead,
}


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # the reference DINO head uses it, as solo-learn
@pytest.mark.parametrize("method", METHODS)
def test_each_method_loads_its_own_projector(tmp_path: Path, method: str) -> None:
    projector = _randomised(METHODS[method](), 2)
    loaded = loading.load_model("tiny_cifar", checkpoint=_write(tmp_path, method, projector))
    h = torch.randn(5, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded.projector(h), projector(h))
    assert loaded.projector_note is None and loaded.projection_dim == (40 if method == "dino" else OUT)
    assert loaded.entry.pretrain_crop_scale == (0.2, 1.0)


def test_vibcreg_gelu_never_loads_as_relu(tmp_path: Path) -> None:
    """The same keys as VICReg's projector: only the method tells GELU from ReLU."""
    projector = _randomised(_vibcreg(), 3)
    relu = _relu3()
    relu.load_state_dict(projector.state_dict(), strict=False)
    loaded = loading.load_model("tiny_cifar", checkpoint=_write(tmp_path, "vibcreg", projector))
    assert sum(isinstance(m, nn.GELU) for m in loaded.projector.modules()) == 2
    h = torch.randn(5, D)
    with torch.no_grad():
        assert not torch.allclose(loaded.projector(h), relu.eval()(h), atol=1e-3)


def test_config_in_lightning_hyper_parameters(tmp_path: Path) -> None:
    projector = _randomised(_byol(), 4)
    path = _write(tmp_path, "byol", projector, config="hyper_parameters", data={"dataset": "cifar100"})
    loaded = loading.load_model("tiny_cifar", checkpoint=path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.projector(torch.ones(2, D)), projector(torch.ones(2, D)))
    assert (loaded.entry.preprocessing.mean, loaded.entry.preprocessing.std) == CIFAR100


def test_vibcreg_iternorm_is_refused_but_the_embedding_loads(tmp_path: Path) -> None:
    """iternorm: True puts IterNorm(OUT, num_groups=64, T=5, dim=2) at index 7: its buffers, not rebuilt."""
    path = _write(tmp_path, "vibcreg", _randomised(_vibcreg(), 5))
    checkpoint = torch.load(path, weights_only=True)
    groups = 4
    checkpoint["state_dict"]["projector.7.running_mean"] = torch.zeros(groups, OUT // groups, 1)
    checkpoint["state_dict"]["projector.7.running_wm"] = torch.eye(OUT // groups).repeat(groups, 1, 1)
    torch.save(checkpoint, path)
    loaded = loading.load_model("tiny_cifar", checkpoint=path)
    assert loaded.projector is None
    assert Encoder(loaded, "embedding").dim == D
    with pytest.raises(
        UserError, match=r"method 'vibcreg': projector layer 7 has keys \['running_mean', 'running_wm'\]"
    ):
        Encoder(loaded, "projection")


def test_widths_that_contradict_the_hyper_parameters_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "simclr", _randomised(_simclr(), 6), method_kwargs={"proj_hidden_dim": 99})
    loaded = loading.load_model("tiny_cifar", checkpoint=path)
    assert loaded.projector is None and "proj_hidden_dim=99 but the projector keys give [48]" in loaded.projector_note


def test_unknown_method_falls_back_to_the_entry_layout(tmp_path: Path) -> None:
    """A method patchbench does not know (solo-learn's SwAV) gets the entry's ReLU MLP, loaded strictly."""
    fits = _randomised(_mlp(nn.Linear(D, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256)), 7)
    loaded = loading.load_model("tiny_cifar", checkpoint=_write(tmp_path / "a", "swav", fits))
    with torch.no_grad():
        torch.testing.assert_close(loaded.projector(torch.ones(2, D)), fits(torch.ones(2, D)))
    loaded = loading.load_model("tiny_cifar", checkpoint=_write(tmp_path / "b", "swav", _randomised(_byol(), 7)))
    assert loaded.projector is None and "projector key '0.weight' has shape (48, 64)" in loaded.projector_note


def test_cifar100_statistics_follow_the_run_or_the_option(tmp_path: Path) -> None:
    path = _write(tmp_path, "vicreg", _randomised(_relu3(), 8), data={"dataset": "cifar100"})
    pre = loading.load_model("tiny_cifar", checkpoint=path).entry.preprocessing
    assert (pre.mean, pre.std) == CIFAR100
    pre = loading.load_model("tiny_cifar", checkpoint=path, norm_stats="entry").entry.preprocessing
    assert (pre.mean, pre.std) == CIFAR10
    pre = loading.load_model("tiny_cifar", checkpoint=path, norm_stats="cifar10").entry.preprocessing
    assert (pre.mean, pre.std) == CIFAR10
    encoder = Encoder(loading.load_model("tiny_cifar", checkpoint=path), "embedding")
    torch.testing.assert_close(encoder.shift.flatten(), torch.tensor(CIFAR100[0]) * 255)


def test_patchbench_meta_keeps_the_entry_statistics(tmp_path: Path) -> None:
    """`patchbench pretrain` normalises with the entry's statistics whatever the dataset."""
    backbone, projector = _randomised(TinyResNet(), 1), _randomised(_relu3(), 2)
    state = _prefixed("backbone.", backbone) | _prefixed("projector.", projector)
    meta = {"method": "vicreg", "dataset": "cifar100", "scale": [0.08, 0.08]}
    torch.save({"state_dict": state, "meta": meta}, tmp_path / "mine.ckpt")
    loaded = loading.load_model("tiny_cifar", checkpoint=tmp_path / "mine.ckpt")
    assert (loaded.entry.preprocessing.mean, loaded.entry.preprocessing.std) == CIFAR10
    assert loaded.entry.pretrain_crop_scale == (0.08, 0.08) and loaded.projection_dim == OUT


def test_unknown_norm_stats_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown normalisation statistics 'cifar1000'"):
        loading.load_model("tiny_cifar", norm_stats="cifar1000")


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_dino_without_its_run_configuration_still_loads_the_embedding(tmp_path: Path) -> None:
    path = _write(tmp_path, "dino", _randomised(_DINOHead(), 2))
    (path.parent / "args.json").unlink()
    loaded = loading.load_model("tiny_cifar", checkpoint=path)
    assert loaded.projector is None and Encoder(loaded, "embedding").dim == D
