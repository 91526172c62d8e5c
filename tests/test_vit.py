"""Vision Transformers: every family's upstream file layout loads strictly, its features equal an independent
forward of the same weights, the readout equals hand-pooled tokens, and wrong files are one `error:` line.

Tiny test entries copy the real zoo entries (weights layout, vit block, preprocessing) and shrink the timm model
through `vit.overrides`; their checkpoint files are written here in the upstream layouts, with random weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models import loading, registry
from ssl_patchbench.models.archs import build_entry_backbone
from ssl_patchbench.results.records import flatten, readout_label, representation_key
from tests.clitools import run_cli

D, DEPTH, HEADS = 48, 2, 4  # 48: DINOv2-g's SwiGLU width (8/3 * 4 * 48 rounded to 8s) equals timm's packed one
DEC = 16  # MAE decoder width


@dataclass(frozen=True)
class Family:
    """One upstream layout: the zoo entry it copies, its patch size and what its files hold."""

    entry: str
    patch: int
    file_grid: int = 2  # the position grid the file was trained at (the model's is 2x2)
    layerscale: bool = False
    swiglu: bool = False
    registers: int = 0


FAMILIES = {
    "dino": Family("dino_vits16", 16),
    "dinov2": Family("dinov2_vits14", 14, file_grid=3, layerscale=True),
    "dinov2_reg": Family("dinov2_vits14_reg", 14, file_grid=3, layerscale=True, registers=4),
    "dinov2_g": Family("dinov2_vitg14", 14, file_grid=3, layerscale=True, swiglu=True),
    "mae": Family("mae_vitb16", 16),
    "mocov3": Family("mocov3_vits16", 16),
    "ibot": Family("ibot_vits16", 16),
}


# ---------------------------------------------------------------- upstream files, written by hand


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * 0.2


def upstream_vit(fam: Family, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A ViT backbone under the upstream names (DINO's vision_transformer.py, DINOv2's, timm 0.3-0.4's)."""
    hidden = 4 * D
    sd = {
        "cls_token": _randn(gen, 1, 1, D),
        "pos_embed": _randn(gen, 1, 1 + fam.file_grid**2, D),
        "patch_embed.proj.weight": _randn(gen, D, 3, fam.patch, fam.patch),
        "patch_embed.proj.bias": _randn(gen, D),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + _randn(gen, D), b + "norm1.bias": _randn(gen, D)})
        sd.update({b + "attn.qkv.weight": _randn(gen, 3 * D, D), b + "attn.qkv.bias": _randn(gen, 3 * D)})
        sd.update({b + "attn.proj.weight": _randn(gen, D, D), b + "attn.proj.bias": _randn(gen, D)})
        sd.update({b + "norm2.weight": 1 + _randn(gen, D), b + "norm2.bias": _randn(gen, D)})
        if fam.swiglu:  # dinov2/layers/swiglu_ffn.py: hidden = (int(2/3 * 4D) + 7) // 8 * 8, w12 packs two
            width = (int(hidden * 2 / 3) + 7) // 8 * 8
            sd.update({b + "mlp.w12.weight": _randn(gen, 2 * width, D), b + "mlp.w12.bias": _randn(gen, 2 * width)})
            sd.update({b + "mlp.w3.weight": _randn(gen, D, width), b + "mlp.w3.bias": _randn(gen, D)})
        else:
            sd.update({b + "mlp.fc1.weight": _randn(gen, hidden, D), b + "mlp.fc1.bias": _randn(gen, hidden)})
            sd.update({b + "mlp.fc2.weight": _randn(gen, D, hidden), b + "mlp.fc2.bias": _randn(gen, D)})
        if fam.layerscale:
            sd.update({b + "ls1.gamma": _randn(gen, D), b + "ls2.gamma": _randn(gen, D)})
    sd.update({"norm.weight": 1 + _randn(gen, D), "norm.bias": _randn(gen, D)})
    if fam.registers:
        sd["register_tokens"] = _randn(gen, 1, fam.registers, D)
    return sd


def _mlp_head(prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A projector MLP with BatchNorm (MoCo v3's base_encoder.head, its predictor, DINO's head)."""
    return {
        f"{prefix}0.weight": _randn(gen, 64, D),
        f"{prefix}1.weight": 1 + _randn(gen, 64),
        f"{prefix}1.bias": _randn(gen, 64),
        f"{prefix}1.running_mean": _randn(gen, 64),
        f"{prefix}1.running_var": 1 + _randn(gen, 64).abs(),
        f"{prefix}1.num_batches_tracked": torch.tensor(7),
        f"{prefix}3.weight": _randn(gen, 32, 64),
    }


def upstream_file(family: str, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write `family`'s published file layout to `path`; returns the backbone tensors under upstream names."""
    fam, gen = FAMILIES[family], torch.Generator().manual_seed(seed)
    vit = upstream_vit(fam, gen)
    if family.startswith("dinov2"):  # hub file: the backbone as a plain state dict, plus the iBOT mask token
        obj: object = {**vit, "mask_token": _randn(gen, 1, D)}
    elif family == "dino":  # "backbone only": the teacher backbone as a plain state dict
        obj = vit
    elif family == "mae":  # {"model": encoder + decoder} (the *_full.pth files; the others lack the decoder)
        decoder = {
            "mask_token": _randn(gen, 1, 1, DEC),
            "decoder_embed.weight": _randn(gen, DEC, D),
            "decoder_embed.bias": _randn(gen, DEC),
            "decoder_pos_embed": _randn(gen, 1, 1 + fam.file_grid**2, DEC),
            "decoder_blocks.0.norm1.weight": _randn(gen, DEC),
            "decoder_norm.weight": _randn(gen, DEC),
            "decoder_pred.weight": _randn(gen, fam.patch**2 * 3, DEC),
        }
        obj = {"model": {**vit, **decoder}}
    elif family == "mocov3":  # main_moco.py save_checkpoint of the DDP-wrapped MoCo_ViT
        base = {f"module.base_encoder.{k}": v for k, v in vit.items()} | _mlp_head("module.base_encoder.head.", gen)
        momentum = {k.replace("base_encoder", "momentum_encoder"): v + 1 for k, v in base.items()}
        state = {**base, **momentum, **_mlp_head("module.predictor.", gen)}
        optimizer = {"state": {}, "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.1, "params": [0, 1]}]}
        obj = {"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": optimizer}
    else:  # iBOT extract_backbone_weights.py --with_head true: {"state_dict": backbone + the teacher's head}
        obj = {"state_dict": {**vit, **_mlp_head("head.mlp.", gen)}}
    torch.save(obj, path)
    return vit


# ---------------------------------------------------------------- test-only zoo entries


def _tiny(real: str, name: str, patch: int, **changes) -> dict:
    """A YAML entry copying the real entry `real` with a tiny timm model at a 2x2 patch grid."""
    entry = json.loads(json.dumps(registry.get_entry(real).to_dict()))
    entry.update(name=name, source={}, needs_checkpoint=True, description=f"tiny {real} for tests")
    entry["preprocessing"].update(input_size=2 * patch, resize=None)
    entry["vit"]["overrides"] = {"depth": DEPTH, "embed_dim": D, "num_heads": HEADS}
    entry.update(changes)
    return entry


@pytest.fixture
def tiny_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATCHBENCH_ZOO file with `tiny_<family>` for every family (and the DINO full-checkpoint example)."""
    monkeypatch.delenv(registry.ZOO_ENV, raising=False)
    models = [_tiny(f.entry, f"tiny_{name}", f.patch) for name, f in FAMILIES.items()]
    full = {"containers": ["teacher"], "strip_prefixes": ["backbone."], "ignore_prefixes": ["head."]}
    models.append(_tiny("dino_vits16", "tiny_dino_full", 16, weights=full))
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    monkeypatch.setenv(registry.ZOO_ENV, str(path))
    return path


# ---------------------------------------------------------------- the independent forward


def reference_vit(fam: Family) -> VisionTransformer:
    """timm's VisionTransformer built from the upstream architecture's own numbers (not from our entry)."""
    kwargs: dict = {"img_size": 2 * fam.patch, "patch_size": fam.patch, "embed_dim": D, "depth": DEPTH}
    kwargs.update(num_heads=HEADS, num_classes=0)
    if fam.layerscale:
        kwargs["init_values"] = 1.0
    if fam.swiglu:
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2.66667 * 2)
    return VisionTransformer(**kwargs).eval()


def _interpolated(pos: torch.Tensor, fam: Family) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding for a 2x2 target grid (class position kept)."""
    if fam.file_grid == 2:
        return pos
    m = fam.file_grid
    grid = pos[:, 1:].reshape(1, m, m, D).permute(0, 3, 1, 2)
    if fam.registers:  # *_reg hub models: interpolate_offset=0.0, interpolate_antialias=True
        grid = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True)
    else:  # interpolate_offset=0.1: scale factor (2 + 0.1) / M
        grid = F.interpolate(grid, scale_factor=(2.1 / m, 2.1 / m), mode="bicubic", antialias=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 4, D)], dim=1)


def reference_blocks(family: str, vit: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output through the final norm, as the upstream forward computes it: the token sequence is
    built here (class token, position embeddings, registers) and the blocks' weights are mapped by hand."""
    fam = FAMILIES[family]
    model = reference_vit(fam)
    swiglu = {".mlp.w12.": ".mlp.fc1.", ".mlp.w3.": ".mlp.fc2."}
    blocks = {}
    for key, value in vit.items():
        if key.startswith(("blocks.", "norm.", "patch_embed.")):
            for old, new in swiglu.items():
                key = key.replace(old, new)
            blocks[key] = value
    missing = model.load_state_dict(blocks, strict=False).missing_keys
    assert set(missing) <= {"cls_token", "pos_embed", "reg_token"}, missing
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = torch.cat([vit["cls_token"].expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + _interpolated(vit["pos_embed"], fam)
        if fam.registers:  # DINOv2: registers go after the class token, without position embeddings
            regs = vit["register_tokens"].expand(len(x), -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        outputs = []
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(model.norm(tokens))
    return outputs


def hand_pool(outputs: list[torch.Tensor], pool: str, last: int, registers: int) -> torch.Tensor:
    parts = []
    for tokens in outputs[-last:]:
        cls, mean = tokens[:, 0], tokens[:, 1 + registers :].mean(dim=1)
        parts += {"cls": [cls], "mean": [mean], "cls+mean": [cls, mean]}[pool]
    return torch.cat(parts, dim=1)


def _images(fam: Family, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 2 * fam.patch, 2 * fam.patch, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("family", list(FAMILIES))
def test_upstream_file_loads_strictly_and_matches_the_upstream_forward(
    family: str, tiny_zoo: Path, tmp_path: Path
) -> None:
    fam = FAMILIES[family]
    path = tmp_path / "upstream.pth"
    vit = upstream_file(family, path)
    model = loading.load_model(f"tiny_{family}", checkpoint=path)
    default = registry.get_entry(fam.entry).vit
    assert model.entry.vit == dataclasses.replace(default, overrides={"depth": DEPTH, "embed_dim": D, "num_heads": 4})
    x = _images(fam)
    with torch.no_grad():
        ours = model.backbone(x)
    expected = hand_pool(reference_blocks(family, vit, x), default.pool, default.last_blocks, fam.registers)
    assert ours.shape == (3, model.embed_dim) == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["dino", "dinov2_reg", "mocov3"])
@pytest.mark.parametrize(("pool", "last"), [("cls", 2), ("mean", 1), ("mean", 2), ("cls+mean", 1), ("cls+mean", 2)])
def test_readout_variants_equal_hand_pooling(family: str, pool: str, last: int, tiny_zoo: Path, tmp_path: Path) -> None:
    fam = FAMILIES[family]
    path = tmp_path / "upstream.pth"
    vit = upstream_file(family, path, seed=3)
    model = loading.load_model(f"tiny_{family}", checkpoint=path, pool=pool, last_blocks=last)
    assert (model.entry.vit.pool, model.entry.vit.last_blocks) == (pool, last)
    x = _images(fam)
    with torch.no_grad():
        ours = model.backbone(x)
    expected = hand_pool(reference_blocks(family, vit, x), pool, last, fam.registers)
    assert model.embed_dim == D * last * (2 if pool == "cls+mean" else 1) == ours.shape[1]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_dino_full_checkpoint_takes_the_teacher_backbone(tiny_zoo: Path, tmp_path: Path) -> None:
    """DINO's full checkpoint (README "full ckpt"): student/teacher with `backbone.`/`head.`, through an entry
    like the one docs/zoo.md shows; the student's different weights must not be the ones loaded."""
    gen = torch.Generator().manual_seed(5)
    teacher = upstream_vit(FAMILIES["dino"], gen)
    student = {f"module.backbone.{k}": v + 1 for k, v in teacher.items()} | _mlp_head("module.head.mlp.", gen)
    path = tmp_path / "full.pth"
    torch.save(
        {
            "student": student,
            "teacher": {f"backbone.{k}": v for k, v in teacher.items()} | _mlp_head("head.mlp.", gen),
            "epoch": 800,
        },
        path,
    )
    model = loading.load_model("tiny_dino_full", checkpoint=path)
    x = _images(FAMILIES["dino"])
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), reference_blocks("dino", teacher, x)[-1][:, 0])


def test_dinov2_position_grid_is_resampled_to_the_input_size(tiny_zoo: Path, tmp_path: Path) -> None:
    path = tmp_path / "dinov2.pth"
    vit = upstream_file("dinov2", path)
    model = loading.load_model("tiny_dinov2", checkpoint=path)
    pos = model.backbone.vit.pos_embed
    assert pos.shape == (1, 1 + 4, D)
    torch.testing.assert_close(pos, _interpolated(vit["pos_embed"], FAMILIES["dinov2"]))
    assert not torch.allclose(pos[:, 1:], vit["pos_embed"][:, 1:5])  # not a crop of the 3x3 grid


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("blocks.1.ls2.gamma"), r"1 missing \(blocks\.1\.ls2\.gamma\)"),
        (lambda sd: sd.pop("register_tokens"), r"1 missing \(reg_token\)"),
        (lambda sd: sd.update(extra=torch.zeros(1)), r"0 missing \(\), 1 unexpected \(extra\)"),
        (lambda sd: sd.update({"blocks.0.attn.qkv.bias": torch.zeros(3)}), r"'blocks\.0\.attn\.qkv\.bias' has shape"),
        (lambda sd: sd.update(pos_embed=torch.zeros(1, 7, D)), r"pos_embed of shape \(1, 7, 48\) is not a square grid"),
    ],
)
def test_every_key_or_shape_mismatch_is_named(tiny_zoo: Path, tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "reg.pth"
    upstream_file("dinov2_reg", path)
    state = torch.load(path)
    edit(state)
    torch.save(state, path)
    with pytest.raises(UserError, match=message):
        loading.load_model("tiny_dinov2_reg", checkpoint=path)


def _eval_error(capsys, monkeypatch, cifar_dir: Path, *args: str) -> str:
    """The one error line of an eval on real images (a checkpoint's keys are checked when the model is built,
    after the data are opened)."""
    data = ["--dataset", "cifar10", "--data-dir", str(cifar_dir), "--train-per-class", "2", "--test-per-class", "2"]
    code, _, err = run_cli(capsys, monkeypatch, "eval", *args, *data, "--device", "cpu")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_dino_file_for_a_dinov2_entry_is_one_error_line(
    tiny_zoo: Path, tmp_path: Path, cifar_dir: Path, capsys, monkeypatch
) -> None:
    path = tmp_path / "dino.pth"
    upstream_file("dino", path)
    line = _eval_error(capsys, monkeypatch, cifar_dir, "--model", "tiny_dinov2", "--checkpoint", str(path))
    assert "4 missing (blocks.0.ls1.gamma, blocks.0.ls2.gamma" in line and "use the zoo entry" in line


def test_truncated_vit_file_is_one_error_line(
    tiny_zoo: Path, tmp_path: Path, cifar_dir: Path, capsys, monkeypatch
) -> None:
    path = tmp_path / "mae.pth"
    upstream_file("mae", path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    line = _eval_error(capsys, monkeypatch, cifar_dir, "--model", "tiny_mae", "--checkpoint", str(path))
    assert "is truncated or corrupt" in line


def test_readout_options_are_refused_where_they_cannot_apply(
    tiny_zoo: Path, tmp_path: Path, cifar_dir: Path, capsys, monkeypatch
) -> None:
    path = tmp_path / "ibot.pth"
    upstream_file("ibot", path)
    line = _eval_error(
        capsys, monkeypatch, cifar_dir, "--model", "tiny_ibot", "--checkpoint", str(path), "--last-blocks", "3"
    )
    assert "--last-blocks 3: `tiny_ibot` has 2 blocks" in line
    line = _eval_error(
        capsys, monkeypatch, cifar_dir, "--model", "tiny_cifar", "--checkpoint", str(path), "--pool", "cls"
    )
    assert "apply to Vision Transformer entries; 'tiny_cifar'" in line


def test_vit_download_is_fetched_into_the_cache(tiny_zoo: Path, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "published" / "dino_deitsmall16_pretrain.pth"
    path.parent.mkdir()
    upstream_file("dino", path)
    entry = _tiny("dino_vits16", "remote_dino", 16, needs_checkpoint=False, source={"url": path.as_uri()})
    zoo = tmp_path / "remote.yaml"
    zoo.write_text(yaml.safe_dump({"models": [entry]}))
    monkeypatch.setenv(registry.ZOO_ENV, str(zoo))
    cache = tmp_path / "cache"
    model = loading.load_model("remote_dino", cache_dir=cache)
    assert model.checkpoint == path.as_uri()
    assert [p.name for p in cache.rglob("*.pth")] == [path.name]


def test_cnn_entries_keep_their_identity_and_vit_entries_carry_their_readout() -> None:
    cnn = registry.get_entry("vicreg_rn50")
    assert cnn.vit is None and "vit" not in cnn.to_dict()
    assert set(cnn.to_dict()) == {f.name for f in dataclasses.fields(cnn)} - {"vit"}
    vit = registry.get_entry("dino_vitb16")
    assert vit.to_dict()["vit"]["pool"] == "cls"
    assert vit.with_readout("cls+mean").to_dict()["vit"] == {**vit.to_dict()["vit"], "pool": "cls+mean"}
    assert vit.with_readout() is vit


@pytest.mark.parametrize(
    ("vit", "message"),
    [
        ({"pool": "max"}, r"field 'vit\.pool': use one of cls, mean, cls\+mean"),
        ({"keys": "dinov3"}, r"field 'vit\.keys': use one of timm, dinov2"),
        ({"last_blocks": 0}, r"field 'vit\.last_blocks'"),
        ({"overrides": {"mlp_ratio": 2}}, r"field 'vit\.overrides': unknown \['mlp_ratio'\]"),
    ],
)
def test_bad_vit_block_names_its_field(tmp_path: Path, monkeypatch, vit: dict, message: str) -> None:
    entry = _tiny("dino_vits16", "bad", 16)
    entry["vit"].update(vit)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    monkeypatch.setenv(registry.ZOO_ENV, str(path))
    with pytest.raises(UserError, match=message):
        registry.list_entries()


# Published widths (the upstream model definitions), times the readout's blocks and pools.
WIDTHS = {"vits": 384, "vitb": 768, "vitl": 1024, "vith": 1280, "vitg": 1536}
VIT_ENTRIES = [e for e in registry.list_entries() if e.vit is not None]


def test_the_zoo_has_every_published_vit() -> None:
    dino = ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"]
    dinov2 = [f"dinov2_vit{s}14{r}" for r in ("", "_reg") for s in "sblg"]
    others = ["mae_vitb16", "mae_vitl16", "mae_vith14", "mocov3_vits16", "mocov3_vitb16", "ibot_vits16", "ibot_vitb16"]
    assert sorted(e.name for e in VIT_ENTRIES) == sorted(dino + dinov2 + others)
    for entry in VIT_ENTRIES:
        assert entry.references and all(k.startswith("imagenet/") for k in entry.references)
        assert entry.preprocessing.input_size == 224 and entry.preprocessing.resize == 256
        assert entry.license and entry.source.url and entry.source.url.startswith("https://")


@pytest.mark.parametrize("entry", VIT_ENTRIES, ids=lambda e: e.name)
def test_every_vit_entry_builds_with_its_published_width(entry: registry.ZooEntry) -> None:
    with torch.device("meta"):  # the architecture, shapes included, without allocating ViT-g's 1.1B weights
        model, dim = build_entry_backbone(entry)
        out = model(torch.empty(2, 3, 224, 224))
    width = WIDTHS[entry.name.split("_")[1][:4]]
    assert dim == width * entry.vit.last_blocks * (2 if entry.vit.pool == "cls+mean" else 1)
    assert out.shape == (2, dim)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


def test_readout_is_part_of_every_record_and_store_key(
    tiny_zoo: Path, tmp_path: Path, cifar_dir: Path, capsys, monkeypatch
) -> None:
    """Two readouts of one checkpoint: two stores and two records, each saying which readout it used."""
    path = tmp_path / "dino.pth"
    upstream_file("dino", path)
    results = tmp_path / "results.jsonl"
    common = ["eval", "--model", "tiny_dino", "--checkpoint", str(path), "--dataset", "cifar10"]
    common += ["--data-dir", str(cifar_dir), "--patches", "central,2", "--train-per-class", "4"]
    common += ["--test-per-class", "2", "--eval", "knn", "--knn-k", "3", "--results", str(results), "--json"]
    readouts = {"default": [], "both": ["--pool", "cls+mean", "--last-blocks", "2"]}
    dims = {}
    for name, extra in readouts.items():
        code, out, err = run_cli(capsys, monkeypatch, *common, *extra)
        assert code == 0, err
        dims[name] = {json.loads(line)["dim"] for line in out.splitlines()}
    assert dims == {"default": {D}, "both": {4 * D}}
    records = [json.loads(line) for line in results.read_text().splitlines()]
    readout = [(r["zoo_entry"]["vit"]["pool"], r["zoo_entry"]["vit"]["last_blocks"]) for r in records]
    assert readout == [("cls", 1)] * 2 + [("cls+mean", 2)] * 2
    stores = {r["feature_stores"]["train"] for r in records}
    assert len(stores) == 4  # central and 2 patches, for each readout


def test_records_of_two_readouts_are_two_representations() -> None:
    """A results baseline (`check --baseline FILE`) never compares a cls+mean number with a cls one."""
    vit = {"zoo_entry": {"vit": {"pool": "cls+mean", "last_blocks": 4}}, "representation": "central"}
    cls = {"zoo_entry": {"vit": {"pool": "cls", "last_blocks": 1}}, "representation": "central"}
    assert (readout_label(vit), readout_label(cls), readout_label({"zoo_entry": {}})) == ("cls+mean@4", "cls", None)
    assert representation_key(vit) != representation_key(cls)
    assert flatten(vit)["readout"] == "cls+mean@4"


def test_the_documented_patchbench_zoo_example_is_a_valid_entry(tmp_path: Path, monkeypatch) -> None:
    """docs/zoo.md's example parses, and its weights layout is the one the full-checkpoint test loads."""
    text = (Path(__file__).parents[1] / "docs" / "zoo.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "zoo.yaml"
    path.write_text(example)
    monkeypatch.setenv(registry.ZOO_ENV, str(path))
    entry = registry.get_entry("dino_vits16_full")
    assert entry.vit == registry.get_entry("dino_vits16").vit
    layout = registry.WeightsLayout(containers=("teacher",), strip_prefixes=("backbone.",), ignore_prefixes=("head.",))
    assert entry.weights == layout
