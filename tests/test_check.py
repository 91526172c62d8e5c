import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.pipeline.evaluate import EvalConfig, evaluate
from ssl_patchbench.reporting.check import (
    CheckReport,
    compare,
    junit_xml,
    markdown,
    parse_min,
    results_baseline,
    zoo_baseline,
)
from ssl_patchbench.results.store import append_record, read_records

from .clitools import model_args, run_cli
from .conftest import CHECKPOINT
from .factories import record


def with_metrics(**values) -> dict:
    r = record()
    r["metrics"] = {name.replace("knn", "knn@"): {"top1": v} for name, v in values.items()}
    return r


def test_compare_floor_is_baseline_minus_tolerance(tmp_path):
    path = tmp_path / "base.jsonl"
    append_record(path, with_metrics(knn20=70.0))
    expectations = results_baseline(path, dataset="cifar10")
    assert [(e.metric, e.value) for e in expectations] == [("knn@20", 70.0)]
    at_floor = compare([with_metrics(knn20=69.8)], expectations, 0.2)[0]
    below = compare([with_metrics(knn20=69.79)], expectations, 0.2)[0]
    assert at_floor.passed and at_floor.floor == pytest.approx(69.8) and at_floor.diff == pytest.approx(-0.2)
    assert not below.passed
    with pytest.raises(UserError, match="no cifar100 results"):
        results_baseline(path, dataset="cifar100")


def test_results_baseline_matches_the_same_representation_only(tmp_path):
    path = tmp_path / "base.jsonl"
    random = {"mode": "random", "n": 16, "scale": [0.2, 0.2], "ratio": [0.75, 4 / 3], "size": None}
    base = with_metrics(knn20=50.0)
    base.update(representation="16", patches=random)
    append_record(path, base)
    other_scale = with_metrics(knn20=10.0)
    other_scale.update(representation="16", patches={**random, "scale": [0.08, 1.0]})
    with pytest.raises(UserError, match="no number for any representation"):
        compare([other_scale], results_baseline(path, dataset="cifar10"), 0.2)


def test_min_floors_and_their_errors():
    floor = parse_min("central/linear=80")
    assert (floor.representation, floor.aggregation, floor.metric, floor.value) == ("central", None, "linear", 80.0)
    assert parse_min("25/gridpool/knn@20=70").aggregation == "gridpool"
    result = with_metrics(knn20=69.95, linear=80.0)
    comparisons = compare([result], [floor, parse_min("knn@20=70")], 5.0)  # floors ignore the tolerance
    assert [c.passed for c in comparisons] == [True, False]
    with pytest.raises(UserError, match="METRIC=VALUE"):
        parse_min("linear>80")
    with pytest.raises(UserError, match="no evaluated representation"):
        compare([result], [parse_min("16/linear=1")], 0.2)


def test_zoo_baseline_reads_reference_numbers():
    expectations = zoo_baseline("vicreg_rn50", dataset="imagenet")
    assert {(e.representation, e.metric, e.value) for e in expectations} == {
        ("central", "linear", 73.2),
        ("1", "linear", 57.6),
        ("16", "linear", 74.2),
        ("48", "linear", 74.4),
    }
    with pytest.raises(UserError, match="no reference numbers for cifar10"):
        zoo_baseline("vicreg_rn50", dataset="cifar10")


def test_reports_markdown_and_junit():
    comparisons = compare([with_metrics(knn20=60.0, knn200=50.0)], [parse_min("knn@20=61"), parse_min("knn@200=40")], 0)
    report = CheckReport("tiny_cifar", "cifar10", 0.2, comparisons, [record()], {})
    assert not report.passed and len(report.regressions) == 1
    suite = ET.fromstring(junit_xml(report)).find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    assert failed == ["central/mean/knn@20"]
    md = markdown(report)
    assert "FAILED: 1 regression" in md and "| central | mean | knn@20 | 60.00 | 61.00 | 61.00 | -1.00 |" in md


def tiny_args(ckpt, data, results, *extra):
    return (
        "--model",
        "tiny_cifar",
        "--checkpoint",
        str(ckpt),
        "--dataset",
        "cifar10",
        "--data-dir",
        str(data),
        "--train-per-class",
        "6",
        "--test-per-class",
        "3",
        "--results",
        str(results),
        *extra,
    )


def test_check_passes_on_its_own_results_and_fails_above_them(
    capsys, monkeypatch, tmp_path, tiny_checkpoint, cifar_dir
):
    base = tmp_path / "base.jsonl"
    sliding = ("--mode", "sliding", "--patch-size", "16", "--stride", "4", "--aggregate", "mean,gridpool")
    code, out, err = run_cli(
        capsys, monkeypatch, "eval", *tiny_args(tiny_checkpoint, cifar_dir, base, "--patches", "central")
    )
    assert code == 0, err
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "eval",
        *tiny_args(tiny_checkpoint, cifar_dir, base, "--patches", "25", *sliding, "--eval", "knn"),
    )
    assert code == 0, err
    # the table shows the filled cells beside the paper's once the row is bound to this checkpoint
    bind = f"table5/VICReg=tiny_cifar@{tiny_checkpoint}"
    code, out, err = run_cli(
        capsys, monkeypatch, "table", "table5", "--results", str(base), "--bind", bind, "--format", "markdown"
    )
    assert code == 0, err
    vicreg = next(line for line in out.splitlines() if line.startswith("| VICReg |"))
    assert vicreg.count(" / 90.8 (") == 1 and " / 93.1 (" in vicreg and "—" not in vicreg

    reports = tmp_path / "reports"
    results = tmp_path / "check.jsonl"
    check_args = tiny_args(tiny_checkpoint, cifar_dir, results, "--patches", "central,25", *sliding, "--eval", "knn")
    code, out, err = run_cli(
        capsys, monkeypatch, "check", *check_args, "--baseline", str(base), "--report-dir", str(reports)
    )
    assert code == 0, out + err
    report = json.loads((reports / "check.json").read_text())
    assert report["passed"] and len(report["comparisons"]) == 3 * 2  # 3 representations x knn@20, knn@200
    assert all(c["diff"] == 0 for c in report["comparisons"])

    raised = tmp_path / "raised.jsonl"
    for r in read_records(base):
        r["metrics"]["knn@20"]["top1"] += 1.0
        append_record(raised, r)
    code, out, err = run_cli(
        capsys, monkeypatch, "check", *check_args, "--baseline", str(raised), "--report-dir", str(reports)
    )
    assert code == 1
    assert "REGRESSION" in out and "check FAILED: 3 of" in out
    suite = ET.parse(reports / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "3"
    assert "❌" in (reports / "check.md").read_text()

    code, out, err = run_cli(capsys, monkeypatch, "check", *check_args, "--min", "linear>1")
    assert code == 2 and err.startswith("error: --min takes")


def test_same_numbers_with_other_forward_slices_and_batches(tmp_path, tiny_checkpoint, cifar_dir):
    def run(max_patches: int, name: str) -> tuple[dict, list]:
        cfg = EvalConfig(
            model="tiny_cifar",
            dataset="cifar10",
            checkpoint=str(tiny_checkpoint),
            data_dir=str(cifar_dir),
            patches=("central", "4"),
            scale=(0.2, 0.2),
            evals=("knn",),
            train_per_class=5,
            test_per_class=3,
            device="cpu",
            seed=3,
            max_patches=max_patches,
            home=tmp_path / name,  # no shared feature store: each run extracts its own features
        )
        results = evaluate(cfg)
        stores = sorted((tmp_path / name / "features").glob("*/features.npy"))
        return {r.spec.label: r.row() for r in results}, [np.load(p).astype(np.float32) for p in stores]

    small, small_features = run(8, "small")  # 2 images per batch of 4 patches, 8 patches per forward
    large, large_features = run(96, "large")  # 24 images per batch, 96 patches per forward
    assert len(small_features) == len(large_features) == 4  # central and 4 patches, train and test
    for a, b in zip(small_features, large_features, strict=True):
        assert np.abs(a - b).max() < 2e-3  # float16 stores of float32 features: the same up to rounding
    for label in ("central", "4"):
        for metric in ("knn@20", "knn@200"):
            assert small[label][metric] == pytest.approx(large[label][metric], abs=0.1), (label, metric)


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="../shared/checkpoints is not beside the repository")
def test_shared_checkpoint_fills_table5_and_gates_itself(capsys, monkeypatch, tmp_path, cifar_dir):
    results = tmp_path / "r.jsonl"
    args = (
        *model_args(CHECKPOINT, cifar_dir, "resnet18_cifar"),
        "--patches",
        "central",
        "--train-per-class",
        "4",
        "--test-per-class",
        "2",
        "--device",
        "cpu",
        "--results",
        str(results),
    )
    code, out, err = run_cli(capsys, monkeypatch, "eval", *args)
    assert code == 0, err
    code, out, err = run_cli(capsys, monkeypatch, "table", "table5", "--results", str(results), "--format", "markdown")
    vicreg = next(line for line in out.splitlines() if line.startswith("| VICReg |"))
    assert code == 0 and " / 90.8 (" in vicreg and " / 91.2 (" in vicreg and "— / 93.1" in vicreg
    code, out, err = run_cli(capsys, monkeypatch, "check", *args, "--eval", "knn", "--baseline", str(results))
    assert code == 0, out + err
    knn = read_records(results)[0]["metrics"]["knn@20"]["top1"]
    code, out, err = run_cli(capsys, monkeypatch, "check", *args, "--eval", "knn", "--min", f"knn@20={knn + 0.5}")
    assert code == 1 and "REGRESSION" in out
