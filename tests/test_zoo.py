"""The zoo: every entry parses and builds; every checkpoint layout loads exactly; every mis-load is a UserError."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
import yaml
from torch import nn

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models import loading, registry
from ssl_patchbench.models.archs import TinyResNet, build_backbone
from ssl_patchbench.models.encoder import Encoder

D = TinyResNet.embed_dim

REAL_CKPT = Path(__file__).parents[1].parent / "shared" / "checkpoints" / "vicreg_resnet18_cifar10.ckpt"
REAL_SHA256 = "3be869a54f609bd8bb695996d911482a3340c67aa36f33fb2df956d640abf3ea"  # its README
IMAGENET = {
    "input_size": 224,
    "resize": 256,
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


class _Hparams:
    """A class only this module can unpickle: stands in for a Lightning hparams object."""


@pytest.fixture(autouse=True)
def _packaged_zoo_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATCHBENCH_ZOO", raising=False)


def _random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """`model`'s state with every float tensor random (BN statistics too), so a mis-load changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = torch.randn(value.shape, generator=gen) * 0.1
            value = value.abs() + 0.5 if key.endswith("running_var") else value
        state[key] = value
    return state


def _tiny_projector() -> nn.Sequential:
    return nn.Sequential(nn.Linear(D, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256))


def _cifar_resnet18() -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    model.maxpool, model.fc = nn.Identity(), nn.Identity()
    return model


def _reference(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def _assert_same_outputs(loaded: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))


def _entry(name: str, *, arch: str = "tiny_cnn", **fields: object) -> dict:
    entry = {
        "name": name,
        "arch": arch,
        "description": "test entry",
        "needs_checkpoint": True,
        "preprocessing": {"input_size": 32, "resize": None, "mean": [0.5] * 3, "std": [0.25] * 3},
        "patch_scale": [0.08, 1.0],
    }
    return {**entry, **fields}


def _use_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *entries: dict) -> None:
    path = tmp_path / "extra_zoo.yaml"
    path.write_text(yaml.safe_dump({"models": list(entries)}))
    monkeypatch.setenv("PATCHBENCH_ZOO", str(path))


def _solo_checkpoint(seed: int = 0, prefix: str = "backbone.") -> tuple[dict, nn.Module, nn.Module]:
    """A solo-learn Lightning dict for `tiny_cifar` and the reference modules its online weights define."""
    backbone, momentum = _random_state(TinyResNet(), seed), _random_state(TinyResNet(), seed + 1)
    projector, momentum_projector = _random_state(_tiny_projector(), seed), _random_state(_tiny_projector(), seed + 1)
    state = {f"{prefix}{k}": v for k, v in backbone.items()}
    state |= {f"projector.{k}": v for k, v in projector.items()}
    state |= {f"momentum_backbone.{k}": v for k, v in momentum.items()}
    state |= {f"momentum_projector.{k}": v for k, v in momentum_projector.items()}
    state |= {"classifier.weight": torch.randn(10, D), "classifier.bias": torch.randn(10)}
    checkpoint = {"state_dict": state, "epoch": 3, "global_step": 12}
    return checkpoint, _reference(TinyResNet(), backbone), _reference(_tiny_projector(), projector)


# ---------------------------------------------------------------- the entries


def test_every_entry_parses_with_its_documented_facts() -> None:
    entries = {e.name: e for e in registry.list_entries()}
    assert set(entries) >= {
        "vicreg_rn50",
        "swav_rn50",
        "dino_rn50",
        "byol_rn50",
        "resnet50.a1_in1k",
        "resnet18_cifar",
        "resnet34_cifar",
        "resnet50_solo",
        "tiny_cifar",
    }
    for name in ("vicreg_rn50", "byol_rn50"):  # evaluate.py / byol-convert's validate.py
        assert dataclasses.asdict(entries[name].preprocessing) == IMAGENET
    assert dataclasses.asdict(entries["swav_rn50"].preprocessing) == IMAGENET | {"std": (0.228, 0.224, 0.225)}
    assert dataclasses.asdict(entries["dino_rn50"].preprocessing) == IMAGENET | {"interpolation": "bicubic"}
    assert entries["resnet50.a1_in1k"].preprocessing.interpolation == "bicubic"
    assert all(e.patch_scale == (0.08, 1.0) for e in entries.values())  # the paper's Table 4 protocol
    crops = {name: entries[name].pretrain_crop_scale for name in ("swav_rn50", "dino_rn50", "resnet18_cifar")}
    assert crops == {"swav_rn50": (0.14, 1.0), "dino_rn50": (0.14, 1.0), "resnet18_cifar": (0.2, 1.0)}
    assert entries["vicreg_rn50"].references["imagenet/linear/48"] == 74.4
    assert entries["dino_rn50"].references == {"imagenet/linear/central": 75.3, "imagenet/knn/central": 67.5}
    assert entries["swav_rn50"].weights.strip_prefixes == ("module.",)
    assert entries["byol_rn50"].stem == "tf_same" and entries["byol_rn50"].needs_checkpoint
    cifar = entries["resnet18_cifar"]
    assert (cifar.stem, cifar.projector, cifar.preprocessing.resize) == ("cifar", (2048, 2048, 2048), None)
    assert cifar.preprocessing.std == (0.2470, 0.2435, 0.2616)
    assert all(json.loads(json.dumps(e.to_dict()))["name"] == e.name for e in entries.values())


@pytest.mark.parametrize("entry", registry.list_entries(), ids=lambda e: e.name)
def test_every_entry_builds_and_embeds(entry: registry.ZooEntry) -> None:
    model, dim = build_backbone(entry.arch, stem=entry.stem)  # never timm's download
    size = min(entry.preprocessing.input_size, 32)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, size, size)).shape == (1, dim)


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(UserError, match=r"unknown model 'vicreg_r50' \(did you mean: vicreg_rn50"):
        registry.get_entry("vicreg_r50")


def test_entry_needing_a_checkpoint_says_so() -> None:
    with pytest.raises(UserError, match="`tiny_cifar` needs --checkpoint PATH"):
        loading.load_model("tiny_cifar")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"patch_scale": "big"}, r"entry 'bad', field 'patch_scale': expected"),
        ({"weights": {"containers": "state_dict"}}, r"entry 'bad', field 'weights.containers'"),
        ({"weights": {"backbone_prefix": ["x."]}}, r"unknown field 'weights.backbone_prefix' \(did you mean"),
        ({"arch": "resnet05"}, r"entry 'bad', field 'arch': unknown architecture"),
        ({"stem": "cifar"}, r"entry 'bad', field 'stem'"),
        ({"patch_scale": [0.5, 0.2]}, r"entry 'bad', field 'patch_scale'"),
        ({"pretrain_crop_scale": [0.5, 0.2]}, r"entry 'bad', field 'pretrain_crop_scale'"),
        (
            {
                "preprocessing": {
                    "input_size": 32,
                    "resize": None,
                    "mean": [0.5] * 3,
                    "std": [0.5] * 3,
                    "interpolation": "nearest",
                }
            },
            r"field 'preprocessing.interpolation'",
        ),
        ({"pretrain_scale": [0.08, 1.0]}, r"entry 'bad': field 'pretrain_scale' is now 'patch_scale'"),
        ({"needs_checkpoint": False}, r"entry 'bad', field 'source'"),
        (
            {"source": {"url": "https://x/y.pth", "sha256": "abc"}, "needs_checkpoint": False},
            r"entry 'bad', field 'source.sha256'",
        ),
    ],
)
def test_malformed_entry_names_entry_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict, message: str
) -> None:
    _use_zoo(tmp_path, monkeypatch, _entry("bad", **change))
    with pytest.raises(UserError, match=message):
        registry.list_entries()


def test_missing_required_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _entry("bad")
    del entry["preprocessing"]["resize"]
    _use_zoo(tmp_path, monkeypatch, entry)
    with pytest.raises(UserError, match=r"entry 'bad': missing required field 'preprocessing\.resize'"):
        registry.list_entries()


def test_extra_zoo_adds_entries_and_refuses_collisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_zoo(tmp_path, monkeypatch, _entry("my_model"))
    assert registry.get_entry("my_model").arch == "tiny_cnn"
    assert registry.get_entry("tiny_cifar").arch == "tiny_cnn"
    (tmp_path / "dup").mkdir()
    _use_zoo(tmp_path / "dup", monkeypatch, _entry("tiny_cifar"))
    with pytest.raises(UserError, match="'tiny_cifar' is already defined"):
        registry.list_entries()


# ---------------------------------------------------------------- layouts


def _like(real: str, arch: str = "tiny_cnn", stem: str = "imagenet") -> dict:
    """A test entry with the real entry's weights layout on a small architecture."""
    weights = dataclasses.asdict(registry.get_entry(real).weights)
    return _entry(f"{real}_small", arch=arch, stem=stem, weights=weights)


def _plain(state: dict) -> dict:
    return state


def _swav(state: dict) -> dict:
    extra = {"projection_head.0.weight": torch.randn(8, D), "prototypes.weight": torch.randn(3, 8)}
    return {f"module.{k}": v for k, v in (state | extra).items()}


def _dino(state: dict) -> dict:
    return state | {"fc.weight": torch.randn(5, D), "fc.bias": torch.randn(5)}


def _byol(state: dict) -> dict:
    kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return {f"module.{k}": v for k, v in kept.items()} | {"module.fc.weight": torch.randn(5, D)}


@pytest.mark.parametrize(
    ("real", "make"), [("vicreg_rn50", _plain), ("swav_rn50", _swav), ("dino_rn50", _dino), ("byol_rn50", _byol)]
)
def test_published_layouts_load_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real: str, make) -> None:
    _use_zoo(tmp_path, monkeypatch, _like(real))
    state = _random_state(TinyResNet(), seed=1)
    torch.save(make(state), tmp_path / "w.pth")
    loaded = loading.load_model(f"{real}_small", checkpoint=tmp_path / "w.pth")
    _assert_same_outputs(loaded.backbone, _reference(TinyResNet(), state), torch.randn(2, 3, 32, 32))
    assert loaded.projector is None and loaded.projection_dim is None
    assert loaded.checkpoint == str(tmp_path / "w.pth")


def test_plain_resnet18_cifar_state_dict_as_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_zoo(tmp_path, monkeypatch, _like("vicreg_rn50", arch="resnet18", stem="cifar"))
    state = _random_state(_cifar_resnet18(), seed=2)
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    loaded = loading.load_model("vicreg_rn50_small", checkpoint=tmp_path / "w.safetensors")
    _assert_same_outputs(loaded.backbone, _reference(_cifar_resnet18(), state), torch.randn(2, 3, 32, 32))
    assert loaded.embed_dim == 512


@pytest.mark.parametrize("prefix", ["backbone.", "encoder."])
def test_solo_learn_lightning_takes_online_not_momentum_weights(tmp_path: Path, prefix: str) -> None:
    checkpoint, backbone, projector = _solo_checkpoint(prefix=prefix)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    loaded = loading.load_model("tiny_cifar", checkpoint=tmp_path / "last.ckpt")
    x = torch.randn(4, 3, 32, 32)
    _assert_same_outputs(loaded.backbone, backbone, x)
    with torch.no_grad():
        torch.testing.assert_close(loaded.projector(loaded.backbone(x)), projector(backbone(x)))
    assert (loaded.embed_dim, loaded.projection_dim) == (D, 256)
    assert not loaded.backbone.training and not loaded.projector.training


def test_bf16_checkpoint_is_cast_to_float32(tmp_path: Path) -> None:
    checkpoint, _, _ = _solo_checkpoint()
    checkpoint["state_dict"] = {
        k: v.bfloat16() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()
    }
    torch.save(checkpoint, tmp_path / "bf16.ckpt")
    loaded = loading.load_model("tiny_cifar", checkpoint=tmp_path / "bf16.ckpt")
    online = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    assert all(p.dtype == torch.float32 for p in loaded.backbone.state_dict().values() if p.is_floating_point())
    _assert_same_outputs(loaded.backbone, _reference(TinyResNet(), online), torch.randn(2, 3, 32, 32))


def test_projector_layout_is_inferred_when_the_entry_has_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = dataclasses.asdict(registry.get_entry("tiny_cifar").weights)
    _use_zoo(tmp_path, monkeypatch, _entry("free", weights=weights))
    mlp = nn.Sequential(nn.Linear(D, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32), nn.BatchNorm1d(32))
    backbone, projector = _random_state(TinyResNet(), 3), _random_state(mlp, 3)
    state = {f"backbone.{k}": v for k, v in backbone.items()} | {f"projector.{k}": v for k, v in projector.items()}
    torch.save({"state_dict": state, "meta": {"method": "vicreg"}}, tmp_path / "w.ckpt")
    loaded = loading.load_model("free", checkpoint=tmp_path / "w.ckpt")
    h = torch.randn(3, D)
    _assert_same_outputs(loaded.projector, _reference(mlp, projector), h)
    assert loaded.projection_dim == 32
    torch.save({"state_dict": state}, tmp_path / "anonymous.ckpt")  # ReLU or GELU? nothing says: refused
    anonymous = loading.load_model("free", checkpoint=tmp_path / "anonymous.ckpt")
    assert anonymous.projector is None and "does not say which method trained it" in anonymous.projector_note
    _assert_same_outputs(anonymous.backbone, loaded.backbone, torch.randn(2, 3, 32, 32))


@pytest.mark.skipif(not REAL_CKPT.is_file(), reason="shared VICReg checkpoint not present")
def test_real_vicreg_resnet18_cifar_checkpoint() -> None:
    loaded = loading.load_model("resnet18_cifar", checkpoint=REAL_CKPT)
    assert (loaded.embed_dim, loaded.projection_dim, loaded.checkpoint_sha256) == (512, 2048, REAL_SHA256)
    raw = torch.load(REAL_CKPT, weights_only=True)["state_dict"]
    reference = _reference(_cifar_resnet18(), {k[9:]: v for k, v in raw.items() if k.startswith("backbone.")})
    maps = {}
    loaded.backbone.layer4.register_forward_hook(lambda _m, _i, out: maps.setdefault("layer4", out))
    x = torch.randn(2, 3, 32, 32)
    _assert_same_outputs(loaded.backbone, reference, x)
    assert maps["layer4"].shape == (2, 512, 5, 5)
    with torch.no_grad():
        assert loaded.projector(loaded.backbone(x)).shape == (2, 2048)


# ---------------------------------------------------------------- mis-loads


def _save_solo(tmp_path: Path, edit) -> Path:
    checkpoint, _, _ = _solo_checkpoint()
    edit(checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "w.ckpt")
    return tmp_path / "w.ckpt"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update({"backbone.extra.weight": torch.ones(1)}), r"1 unexpected \(extra.weight\)"),
        (lambda s: s.update({"teacher.conv1.weight": torch.ones(1)}), r"unexpected checkpoint keys \(teacher"),
        (lambda s: s.pop("backbone.bn1.running_mean"), r"1 missing \(bn1.running_mean\)"),
        (
            lambda s: s.update({"backbone.conv1.weight": torch.ones(16, 3, 5, 5)}),
            r"'conv1.weight' has shape \(16, 3, 5, 5\) in the checkpoint but \(16, 3, 3, 3\)",
        ),
    ],
)
def test_key_and_shape_mismatches_are_named(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(UserError, match=message):
        loading.load_model("tiny_cifar", checkpoint=_save_solo(tmp_path, edit))


def test_projector_mismatch_leaves_the_embedding_space(tmp_path: Path) -> None:
    path = _save_solo(tmp_path, lambda s: s.update({"projector.3.weight": torch.ones(512, 256)}))
    loaded = loading.load_model("tiny_cifar", checkpoint=path)
    assert loaded.projector is None and "projector key '3.weight'" in loaded.projector_note
    assert Encoder(loaded, "embedding").dim == D
    with pytest.raises(UserError, match=r"projector not loaded .*projector key '3.weight'.*; use --space embedding"):
        Encoder(loaded, "projection")


def test_resnet34_weights_into_resnet18_is_refused(tmp_path: Path) -> None:
    with torch.device("meta"):
        names = torchvision.models.resnet34(weights=None).state_dict()
    state = {f"backbone.{k}": torch.zeros(v.shape, dtype=v.dtype) for k, v in names.items() if "fc." not in k}
    torch.save({"state_dict": state}, tmp_path / "r34.ckpt")
    with pytest.raises(UserError, match=r"backbone weights do not fit .* unexpected \(layer1\.2\.conv1\.weight"):
        loading.load_model("resnet18_cifar", checkpoint=tmp_path / "r34.ckpt")


def test_plain_state_dict_where_a_container_is_expected(tmp_path: Path) -> None:
    torch.save(_random_state(TinyResNet(), 0), tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"has none of the keys \['state_dict'\]"):
        loading.load_model("tiny_cifar", checkpoint=tmp_path / "w.pth")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file_is_a_user_error(tmp_path: Path, suffix: str) -> None:
    checkpoint, _, _ = _solo_checkpoint()
    path = tmp_path / f"w{suffix}"
    if suffix == ".ckpt":
        torch.save(checkpoint, path)
    else:
        safetensors.torch.save_file(checkpoint["state_dict"], path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        loading.load_model("tiny_cifar", checkpoint=path)


def test_pickle_needing_code_is_refused_unless_trusted(tmp_path: Path) -> None:
    checkpoint, backbone, _ = _solo_checkpoint()
    torch.save(checkpoint | {"hyper_parameters": _Hparams()}, tmp_path / "pickled.ckpt")
    with pytest.raises(UserError, match="--trust-checkpoint"):
        loading.load_model("tiny_cifar", checkpoint=tmp_path / "pickled.ckpt")
    loaded = loading.load_model("tiny_cifar", checkpoint=tmp_path / "pickled.ckpt", trust_pickle=True)
    _assert_same_outputs(loaded.backbone, backbone, torch.randn(2, 3, 32, 32))


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint not found"):
        loading.load_model("tiny_cifar", checkpoint=tmp_path / "nope.ckpt")


# ---------------------------------------------------------------- downloads


def _download_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sha256: str | None) -> tuple[str, str]:
    """A zoo entry whose url is a local file:// copy of a valid checkpoint; returns its url and real hash."""
    path = _save_solo(tmp_path, lambda s: None)
    weights = dataclasses.asdict(registry.get_entry("tiny_cifar").weights)
    source = {"url": path.as_uri(), "sha256": sha256}
    _use_zoo(tmp_path, monkeypatch, _entry("remote", weights=weights, source=source, needs_checkpoint=False))
    return path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_is_verified_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, digest = _download_entry(tmp_path, monkeypatch, sha256=None)
    cache = tmp_path / "cache"
    first = loading.load_model("remote", cache_dir=cache)
    assert (first.checkpoint, first.checkpoint_sha256) == (url, digest)
    assert [p.name for p in cache.rglob("*") if p.is_file()] == ["w.ckpt"]
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("downloaded twice"))
    assert loading.load_model("remote", cache_dir=cache).checkpoint_sha256 == digest


def test_download_with_wrong_sha256_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, digest = _download_entry(tmp_path, monkeypatch, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=f"expected {'0' * 64}, got {digest}"):
        loading.load_model("remote", cache_dir=cache)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_failed_download_says_where_to_put_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _download_entry(tmp_path, monkeypatch, sha256=None)
    (tmp_path / "w.ckpt").unlink()
    with pytest.raises(UserError, match=r"could not download .* copy the file to .*w\.ckpt or pass --checkpoint"):
        loading.load_model("remote", cache_dir=tmp_path / "cache")
