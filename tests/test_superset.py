"""One `eval` of several layouts, aggregations and spaces (issue 13's superset: central, random counts, sliding
windows with mean and gridpool, central in the projection space) gives exactly the records and features of the
separate calls it replaces; the combinations that mean nothing are one error line."""

import json

import numpy as np
import pytest

from ssl_patchbench.features.store import FeatureStore
from ssl_patchbench.models.registry import get_entry
from ssl_patchbench.pipeline.config import EvalConfig
from ssl_patchbench.pipeline.representations import evaluations
from ssl_patchbench.results.records import NUMBER_FIELDS
from ssl_patchbench.results.store import read_records

from .clitools import model_args, run_cli
from .factories import assert_user_error

WINDOWS = ("--patch-size", "16", "--stride", "4")
SUPERSET = ("--patches", "central,1,4,16,sliding", *WINDOWS, "--aggregate", "mean,gridpool")
SUPERSET = (*SUPERSET, "--space", "embedding,projection:central")
SEPARATE = (  # how the superset took three calls: random counts, sliding windows (--mode sliding), projection
    ("--patches", "central,1,4,16"),
    ("--mode", "sliding", "--patches", "all", *WINDOWS, "--aggregate", "mean,gridpool"),
    ("--patches", "central", "--space", "projection"),
)
SMALL = ("--train-per-class", "3", "--test-per-class", "2", "--eval", "knn", "--store-dtype", "float32")


def _run(capsys, monkeypatch, tiny_checkpoint, cifar_dir, home, *args):
    command = ["eval", *model_args(tiny_checkpoint, cifar_dir), *SMALL, *args, "--home", str(home), "--json"]
    code, out, err = run_cli(capsys, monkeypatch, *command)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def _features(home, record):
    return {
        split: np.array(FeatureStore(home / "features", key).load().features)
        for split, key in record["feature_stores"].items()
    }


@pytest.mark.slow  # four evals in-process: about 8 s on a shared CPU
def test_the_superset_in_one_call_equals_the_three_separate_calls(
    capsys, monkeypatch, tiny_checkpoint, cifar_dir, tmp_path
):
    one, apart = tmp_path / "one", tmp_path / "apart"
    rows = _run(capsys, monkeypatch, tiny_checkpoint, cifar_dir, one, *SUPERSET)
    for args in SEPARATE:
        _run(capsys, monkeypatch, tiny_checkpoint, cifar_dir, apart, *args)
    together, separate = read_records(one / "results.jsonl"), read_records(apart / "results.jsonl")
    described = [(r["representation"], r["patches"]["mode"], r["aggregation"], r["space"]) for r in together]
    assert described == [
        ("central", "central", "mean", "embedding"),
        ("1", "random", "mean", "embedding"),
        ("4", "random", "mean", "embedding"),
        ("16", "random", "mean", "embedding"),
        ("25", "sliding", "mean", "embedding"),
        ("25", "sliding", "gridpool(3,2)", "embedding"),
        ("central", "central", "mean", "projection"),
    ]
    assert [(str(r["patches"]), r["aggregation"], r["space"]) for r in rows] == [(d[0], d[2], d[3]) for d in described]
    assert len(separate) == len(together)
    for joint, alone in zip(together, separate, strict=True):
        assert {k: joint[k] for k in NUMBER_FIELDS} == {k: alone[k] for k in NUMBER_FIELDS}
        assert joint["feature_stores"] == alone["feature_stores"]  # the same store keys: the same identity
        assert joint["metrics"] == alone["metrics"] and joint["dim"] == alone["dim"]
        for split, features in _features(one, joint).items():
            np.testing.assert_allclose(features, _features(apart, alone)[split], atol=1e-5, rtol=1e-5)
    assert together[0]["patches"]["size"] is None  # --patch-size is the windows' side, not the random bags'
    # one decoded pass per split: 1 and 4 are prefixes of 16, central's projection reuses central's forward
    passes = {json.dumps(r["timings"]["extraction_train"]["pass"], sort_keys=True) for r in together}
    assert len(passes) == 1
    shared = together[0]["timings"]["extraction_train"]["pass"]
    assert shared["representations"] == ["central", "1", "4", "16", "25 sliding", "central projection"]
    assert shared["forwarded_patches"] == 30 * (1 + 16 + 25)


def _evaluations(**fields):
    return evaluations(EvalConfig(model="tiny_cifar", dataset="cifar10", **fields), get_entry("tiny_cifar"))


def _plan(**fields) -> list[tuple]:
    return [(r.spec.label, r.spec.mode, r.aggregation.label, r.space) for r in _evaluations(**fields)]


def test_each_aggregation_goes_to_every_layout_it_is_defined_for_and_each_space_to_its_tokens():
    layouts = ("central", "4", "16", "sliding")
    grid = _plan(mode="grid", patches=layouts, size=16, stride=8, aggregations=("mean", "gridpool:2:1"))
    assert grid == [
        ("central", "central", "mean", "embedding"),
        ("4", "grid", "mean", "embedding"),  # a 2x2 grid takes a 2x2 pool too
        ("4", "grid", "gridpool(2,1)", "embedding"),
        ("16", "grid", "mean", "embedding"),
        ("16", "grid", "gridpool(2,1)", "embedding"),
        ("9", "sliding", "mean", "embedding"),
        ("9", "sliding", "gridpool(2,1)", "embedding"),
    ]
    wide = _plan(mode="grid", patches=("4", "16"), aggregations=("mean", "gridpool:3:1"))
    assert [r[::2] for r in wide] == [("4", "mean"), ("16", "mean"), ("16", "gridpool(3,1)")]  # 2x2 < kernel 3
    both = _plan(patches=("central", "2"), space=("embedding", "projection"))
    expected = [("central", "embedding"), ("2", "embedding"), ("central", "projection"), ("2", "projection")]
    assert [r[::3] for r in both] == expected
    scoped = _plan(patches=("central", "2", "8"), space=("projection:8+central", "embedding:2"))
    assert [r[::3] for r in scoped] == [("central", "projection"), ("8", "projection"), ("2", "embedding")]


def test_older_command_lines_name_the_same_specs():
    windows = _evaluations(patches=("sliding",), size=16, stride=4)
    for old in (("all",), ("25",)):
        assert _evaluations(mode="sliding", patches=old, size=16, stride=4) == windows
    fixed = _evaluations(patches=("4",), size=8)
    assert fixed[0].spec.size == 8  # without sliding windows, --patch-size still draws fixed-size random squares
    assert _evaluations(patches=("central",), space="projection")[0].space == "projection"  # a str: one space


@pytest.mark.parametrize(
    "args,message",
    [
        (("--patches", "16", "--aggregate", "gridpool"), "gives representation 16 (random) no aggregation"),
        (
            ("--patches", "central,16,sliding", *WINDOWS, "--aggregate", "mean,gridpool:9:1"),
            "gridpool(9,1) applies to no",
        ),
        (("--patches", "central,2", "--aggregate", "mean,gridpool"), "gridpool(3,2) applies to no representation"),
        (("--patches", "central,sliding"), "sliding mode needs --patch-size PX and --stride PX"),
        (("--patches", "central,9", "--mode", "sliding", *WINDOWS), "give 25 patches, not 9"),
        (("--patches", "central,lots"), "--patches takes central, sliding (or all) and positive counts"),
        (("--space", "embedding,embedding"), "--space names embedding twice"),
        (("--space", "hidden"), "unknown space 'hidden'"),
        (("--patches", "central,2", "--space", "projection:central"), "representation 2 (random) is in no space"),
        (("--patches", "central", "--space", "embedding,projection:16"), "16 is not among --patches central"),
        (("--space", ","), "--space is empty"),
    ],
)
def test_a_combination_that_means_nothing_is_one_error_line(ctx, capsys, args, message):
    code, _, err = run_cli(capsys, ctx.monkeypatch, "eval", *ctx.tiny(), "--dataset", "cifar10", *args, "--json")
    assert_user_error(code, err, message)
