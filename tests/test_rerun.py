"""A rerun on complete feature stores reads and hashes the checkpoint but builds no network: its records and store
keys are the first run's, and what the state dicts decide (no projector) is still refused up front."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models.archs import TinyResNet
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.models.loading import load_model
from ssl_patchbench.models.registry import get_entry
from ssl_patchbench.pipeline import context
from ssl_patchbench.pipeline.config import EvalConfig
from ssl_patchbench.pipeline.evaluate import evaluate
from ssl_patchbench.results.records import DESCRIPTIVE_ZOO_FIELDS, FEATURE_FIELDS, NUMBER_FIELDS
from ssl_patchbench.results.store import read_records

from .clitools import model_args, run_cli

SAME_IN_A_RERUN = (*NUMBER_FIELDS, "model", "checkpoint", "representation", "metrics", "dim", "feature_stores")


def _as_json(value: object) -> object:
    """What a record or a store's meta reads back as (tuples become lists)."""
    return json.loads(json.dumps(value))


def _refuse_to_build(*_args, **_kwargs):
    raise AssertionError("a rerun on complete stores built the network")


def test_a_rerun_on_complete_stores_builds_no_network(tmp_path, tiny_checkpoint, cifar_dir, monkeypatch):
    cfg = EvalConfig(
        model="tiny_cifar",
        checkpoint=str(tiny_checkpoint),
        dataset="cifar10",
        data_dir=str(cifar_dir),
        patches=("central", "2"),
        space=("embedding", "projection"),
        train_per_class=3,
        test_per_class=2,
        device="cpu",
        home=tmp_path,
    )
    first = evaluate(cfg)
    monkeypatch.setattr(context, "build_model", _refuse_to_build)
    again = evaluate(cfg)

    assert len(first) == len(again) == 4 and not any(r.reused_features for r in first)
    assert all(r.reused_features for r in again)
    for one, two in zip(first, again, strict=True):
        assert (one.knn, one.linear) == (two.knn, two.linear)
        assert {k: one.record[k] for k in SAME_IN_A_RERUN} == {k: two.record[k] for k in SAME_IN_A_RERUN}
        # the identity the built model gave before the split: the file's own hash, the entry as written (the
        # tiny checkpoint's configuration names no dataset, so its normalisation stays the entry's)
        assert two.record["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
        entry = {k: v for k, v in get_entry("tiny_cifar").to_dict().items() if k not in DESCRIPTIVE_ZOO_FIELDS}
        assert _as_json(two.record["zoo_entry"]) == _as_json(entry)
        for split, key in two.record["feature_stores"].items():  # the stores the first run wrote, their material
            meta = json.loads((tmp_path / "features" / key / "meta.json").read_text())
            material = {**{k: two.record[k] for k in FEATURE_FIELDS}, "data": two.record["data"][split]}
            assert {k: meta[k] for k in FEATURE_FIELDS} == _as_json(material)
    assert len(read_records(tmp_path / "results.jsonl")) == 8


def test_no_projector_is_refused_before_anything_even_on_a_rerun(
    capsys, monkeypatch, tmp_path, cifar_dir, tiny_checkpoint
):
    """Decided from the state dict, not from a built module: the same one line as the built model gives."""
    path = tmp_path / "backbone_only.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in TinyResNet().state_dict().items()}}, path)
    common = [*model_args(path, cifar_dir), "--patches", "central", "--train-per-class", "2", "--test-per-class", "2"]
    common += ["--home", str(tmp_path / "home"), "--device", "cpu"]
    code, _, err = run_cli(capsys, monkeypatch, "eval", *common, "--space", "embedding")
    assert code == 0, err
    with pytest.raises(UserError, match="no projector weights") as built:
        Encoder(load_model("tiny_cifar", checkpoint=path), "projection")

    monkeypatch.setattr(context, "build_model", _refuse_to_build)
    for spaces in ("embedding,projection", "projection"):
        code, out, err = run_cli(capsys, monkeypatch, "eval", *common, "--space", spaces)
        assert (code, out) == (2, "")
        assert err.strip().splitlines() == [f"error: {built.value}"]
    assert len(read_records(tmp_path / "home" / "results.jsonl")) == 1


@pytest.mark.slow
def test_a_cached_rerun_imports_neither_torchvision_timm_nor_dynamo(
    capsys, monkeypatch, tmp_path, cifar_dir, tiny_checkpoint
):
    """Importing torchvision pulls in torch._dynamo, as torch.optim's optimizers do when used: seconds of every
    rerun (timm: about one more). The rerun's linear probe runs all the same."""
    args = ["eval", *model_args(tiny_checkpoint, cifar_dir), "--patches", "central", "--train-per-class", "2"]
    args += ["--test-per-class", "2", "--home", str(tmp_path), "--device", "cpu", "--json"]
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    code = (
        "import json, sys; from ssl_patchbench.cli.main import cli; "
        f"cli({args!r}, standalone_mode=False); "
        "print(json.dumps([m in sys.modules for m in ('torchvision', 'timm', 'torch._dynamo')]))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=os.environ)
    row, imported = done.stdout.splitlines()
    assert json.loads(row)["reused_features"] is True and json.loads(row)["linear"] > 0
    assert json.loads(imported) == [False, False, False]


def test_a_build_that_releases_the_weights_leaves_no_second_copy(tiny_checkpoint):
    """A run keeps its resolved model: once the network is built from it, it holds no state dict of its own,
    and the built network's weights are the checkpoint's."""
    from ssl_patchbench.models.loading import build_model, resolve_model

    resolved = resolve_model("tiny_cifar", checkpoint=tiny_checkpoint)
    expected = {k: v.clone() for k, v in resolved.weights["backbone"].items()}
    built = build_model(resolved, release=True)
    assert resolved.weights == {}
    state = built.backbone.state_dict()
    assert set(expected) == set(state)
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in expected.items())
    with pytest.raises(ValueError, match="released"):
        build_model(resolved)
