import json
import os
import re
import subprocess
import sys

import pytest
import torch

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.results.store import read_records

from .clitools import model_args, run_cli
from .conftest import CHECKPOINT


def test_eval_json_rows_and_results_record(capsys, monkeypatch, tiny_checkpoint, cifar_dir, tmp_path):
    results = tmp_path / "results.jsonl"
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "eval",
        *model_args(tiny_checkpoint, cifar_dir),
        "--patches",
        "central,1,4",
        "--train-per-class",
        "10",
        "--test-per-class",
        "5",
        "--results",
        str(results),
        "--json",
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["patches"] for r in rows] == ["central", 1, 4]
    for r in rows:
        assert {"mode", "knn@20", "knn@200", "linear", "n_train", "n_test"} <= r.keys()
        assert r["n_train"] == 100 and r["n_test"] == 50
        assert 0 <= r["knn@20"] <= 100 and 0 <= r["linear"] <= 100
    records = read_records(results)
    assert len(records) == 3 and records[0]["schema_version"] == 1
    assert records[2]["patches"]["n"] == 4 and records[2]["checkpoint_sha256"]
    assert records[0]["metrics"]["knn@20"]["top1"] == rows[0]["knn@20"]
    assert records[2]["timings"]["extraction_train"]["compiled"] is False  # auto: never on a CPU
    # not a terminal (a pipe, a CI log): every pass leaves plain lines saying how far and how fast it went
    pattern = r"^train central \+ 1 \+ 4: 100 images in \d+:\d\d:\d\d \([\d,]+ img/s [\d,]+ patch/s\)$"
    assert re.search(pattern, err, re.M)
    assert re.search(r"^test central \+ 1 \+ 4: ", err, re.M)


def test_compile_auto_only_for_large_cuda_extractions(monkeypatch):
    from ssl_patchbench.pipeline import context

    monkeypatch.setattr(context, "_triton_available", lambda device: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    big, small = context.AUTO_COMPILE_MIN_PATCHES, context.AUTO_COMPILE_MIN_PATCHES - 1
    assert context.compiles("auto", cuda, big) and not context.compiles("auto", cuda, small)
    assert not context.compiles("auto", cpu, big)
    assert context.compiles("on", cpu, 1) and not context.compiles("off", cuda, big)
    with pytest.raises(UserError, match="choose auto, on or off"):
        context.compiles("yes", cuda, big)


def test_compile_auto_counts_the_patches_of_the_whole_pass(monkeypatch):
    """Every representation of an eval shares one pass and one slice shape: the rule counts what the pass
    forwards (central 1 + sliding 25 + the 256-bag that holds the 16-bag: 282 per image), on train + test."""
    from types import SimpleNamespace

    from ssl_patchbench.pipeline import context
    from ssl_patchbench.pipeline.config import EvalConfig
    from ssl_patchbench.sampling.patches import PatchSpec

    seen = []
    monkeypatch.setattr(context, "compiles", lambda setting, device, patches: seen.append(patches) or False)
    cfg = EvalConfig(model="m", dataset="cifar10")
    ranks = SimpleNamespace(rank=0, world=1, active=False)
    fake = SimpleNamespace(
        cfg=cfg, device=torch.device("cpu"), precision="fp32", ranks=ranks, splits={"a": [0] * 7, "b": [0] * 3}
    )
    specs = [PatchSpec(mode="central"), PatchSpec(mode="random", n=16), PatchSpec(mode="random", n=256)]
    specs.append(PatchSpec(mode="sliding", size=16, stride=4, out_size=32))
    context.RunContext.settings(fake, specs + specs[:1])
    assert seen == [282 * 10]


def test_second_run_reuses_the_stores_and_gives_the_same_numbers(capsys, monkeypatch, tiny_checkpoint, cifar_dir):
    args = (
        "eval",
        *model_args(tiny_checkpoint, cifar_dir),
        "--patches",
        "2",
        "--eval",
        "knn",
        "--test-per-class",
        "4",
        "--json",
    )
    first = run_cli(capsys, monkeypatch, *args)
    again = run_cli(capsys, monkeypatch, *args)
    assert first[0] == again[0] == 0
    assert json.loads(first[1])["knn@20"] == json.loads(again[1])["knn@20"]
    assert json.loads(first[1])["linear"] is None


def test_sliding_gridpool_representation(capsys, monkeypatch, tiny_checkpoint, cifar_dir):
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "eval",
        *model_args(tiny_checkpoint, cifar_dir),
        "--patches",
        "25",
        "--mode",
        "sliding",
        "--patch-size",
        "16",
        "--stride",
        "4",
        "--aggregate",
        "mean,gridpool",
        "--eval",
        "knn",
        "--train-per-class",
        "5",
        "--test-per-class",
        "2",
        "--json",
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    dim = rows[0]["dim"]
    assert [(r["aggregation"], r["dim"]) for r in rows] == [("mean", dim), ("gridpool(3,2)", dim * 2 * 2)]


@pytest.mark.parametrize(
    "args,message",
    [
        (("eval", "--model", "vicreg_rn5", "--dataset", "cifar10"), "did you mean: vicreg_rn50"),
        (("eval", "--model", "resnet18_cifar", "--dataset", "cifar10"), "--checkpoint"),
        (("eval", "--model", "tiny_cifar", "--checkpoint", "/nonexistent.ckpt", "--dataset", "digits"), "nonexistent"),
        (
            ("eval", "--model", "tiny_cifar", "--checkpoint", "{ckpt}", "--dataset", "digits", "--patches", "0"),
            "positive",
        ),
        (
            ("eval", "--model", "tiny_cifar", "--checkpoint", "{ckpt}", "--dataset", "digits", "--patch-scale", "1.5"),
            "scale",
        ),
        (
            (
                "eval",
                "--model",
                "tiny_cifar",
                "--checkpoint",
                "{ckpt}",
                "--dataset",
                "digits",
                "--mode",
                "sliding",
                "--patches",
                "25",
                "--patch-size",
                "48",
                "--stride",
                "4",
            ),
            "larger than",
        ),
        (("eval", "--model", "tiny_cifar", "--checkpoint", "{ckpt}", "--dataset", "imagenet"), "--data-dir"),
        (
            ("eval", "--model", "tiny_cifar", "--checkpoint", "{ckpt}", "--dataset", "digits", "--eval", "svm"),
            "unknown evaluator",
        ),
        (("zoo", "show", "dinov2"), "unknown"),
        (
            ("eval", "--model", "tiny_cifar", "--checkpoint", "{ckpt}", "--dataset", "digits", "--max-patches", "-5"),
            "--max-patches",
        ),
        (("eval", "--model", "tiny_cifar"), "Missing option"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, monkeypatch, tiny_checkpoint, args, message):
    args = tuple(a.replace("{ckpt}", str(tiny_checkpoint)) for a in args)
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert message in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_user_error(capsys, monkeypatch, tiny_checkpoint):
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "eval",
        "--model",
        "tiny_cifar",
        "--checkpoint",
        str(tiny_checkpoint),
        "--dataset",
        "digits",
        "--device",
        "cuda",
    )
    assert code == 2 and "no CUDA GPU" in err


def test_zoo_list_and_show(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "zoo", "list")
    assert code == 0 and "vicreg_rn50" in out and "resnet18_cifar" in out
    code, out, _ = run_cli(capsys, monkeypatch, "zoo", "show", "swav_rn50")
    assert code == 0 and "module." in out and "swav_800ep_pretrain" in out


@pytest.mark.slow
def test_help_does_not_import_torch():
    code = "import sys; from ssl_patchbench.cli.main import cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


_ENTRY = """
import atexit, sys, threading, time
from pathlib import Path
marks = Path(sys.argv[1])
def late_writer():
    time.sleep(0.5)
    with open(marks, "a") as f:
        f.write("thread ")
threading.Thread(target=late_writer).start()  # not a daemon: Python's exit waits for it
class Finalised:
    def __init__(self, path, open=open):
        self.path, self.open = str(path), open  # module globals may be gone by the time it is collected
    def __del__(self):  # runs only in the interpreter's teardown
        with self.open(self.path, "a") as f:
            f.write("teardown ")
keep = Finalised(marks)
atexit.register(lambda: open(marks, "a").write("exit-handler "))
sys.argv = ["patchbench", *sys.argv[2:]]
if sys.argv[1:2] == ["profiled"]:
    sys.argv.pop(1)
    import cProfile
    cProfile.Profile().enable()
from ssl_patchbench.cli.main import entry
entry()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "code", "marks"),
    [
        (["zoo", "list"], 0, "thread exit-handler "),
        (["eval", "--model", "no_such_model", "--dataset", "cifar10"], 2, "thread exit-handler "),
        (["profiled", "zoo", "list"], 0, "thread exit-handler teardown "),
    ],
)
def test_the_command_skips_the_interpreter_teardown_but_not_exit_handlers_or_output(tmp_path, args, code, marks):
    """``entry`` leaves by os._exit once non-daemon threads are done and the exit handlers have run: all output, the
    exit code, and no teardown (which costs a cached rerun 0.6 s); under a profiler Python exits as usual."""
    done = subprocess.run(
        [sys.executable, "-c", _ENTRY, str(tmp_path / "marks"), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == code
    assert (tmp_path / "marks").read_text() == marks
    if code == 0:
        assert "vicreg_rn50" in done.stdout and "resnet18_cifar" in done.stdout
    else:
        assert done.stderr.strip().count("\n") == 0 and "no_such_model" in done.stderr


@pytest.mark.slow
def test_a_resnet_evaluation_builds_its_model_without_importing_timm():
    """timm costs about a second of every run's start-up; only ViT and timm entries need it."""
    code = (
        "import sys; import ssl_patchbench.pipeline.evaluate; from ssl_patchbench.models.archs import build_backbone; "
        "build_backbone('resnet50'); assert 'timm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="../shared/checkpoints is not beside the repository")
def test_shared_vicreg_checkpoint_is_far_above_chance(capsys, monkeypatch, cifar_dir):
    """A mis-loaded stem, wrong normalisation or broken vote would sit near 10% here."""
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "eval",
        *model_args(CHECKPOINT, cifar_dir, "resnet18_cifar"),
        "--patches",
        "central",
        "--test-per-class",
        "10",
        "--json",
    )
    assert code == 0, err
    row = json.loads(out)
    assert row["knn@20"] > 45 and row["linear"] > 45


@pytest.mark.slow
def test_demo_runs_offline_end_to_end(capsys, monkeypatch, tmp_path):
    code, out, err = run_cli(capsys, monkeypatch, "demo", "--epochs", "1", "--home", str(tmp_path), "--json")
    assert code == 0, err
    assert re.search(r"^epoch 1/1 done: loss [\d.]+", err, re.M)  # the pretraining reports its progress
    assert f"results appended to {tmp_path / 'results.jsonl'}" in err and "patchbench report" in err
    assert len(read_records(tmp_path / "results.jsonl")) == 3
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["patches"] for r in rows] == ["central", 1, 16]
    assert all(r["n_train"] == 1437 and r["n_test"] == 360 for r in rows)
    assert rows[0]["knn@20"] > 50  # digits are easy: even one epoch of VICReg is far above chance (10%)
    assert list((tmp_path / "demo").glob("*.ckpt"))


def test_a_patch_larger_than_the_images_is_refused_before_any_store_exists(
    capsys, monkeypatch, tiny_checkpoint, cifar_dir, tmp_path
):
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "eval",
        *model_args(tiny_checkpoint, cifar_dir),
        "--patches",
        "2",
        "--patch-size",
        "48",
        "--home",
        str(tmp_path),
    )
    assert code == 2 and "larger than" in err
    assert not (tmp_path / "features").exists()
