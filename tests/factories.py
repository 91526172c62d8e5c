"""Shared test factories: results records shaped like the pipeline's, and the reliability cases' context."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from ssl_patchbench.models.registry import get_entry


def record(**over) -> dict:
    """A record shaped like api._record's, small enough to read."""
    base = {
        "model": "resnet18_cifar",
        "checkpoint": "a.ckpt",
        "checkpoint_sha256": "aaaa1111" + "0" * 56,
        "dataset": "cifar10",
        "data": {
            "train": {"dataset": "cifar10", "root": "/x/train", "n": 200, "per_class": 20, "files_sha256": "t1"},
            "test": {"dataset": "cifar10", "root": "/x/test", "n": 100, "per_class": 10, "files_sha256": "s1"},
        },
        "n_train": 200,
        "n_test": 100,
        "patches": {"mode": "central", "n": 1, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "size": None},
        "representation": "central",
        "aggregation": "mean",
        "space": "embedding",
        "precision": "fp32",
        "store_dtype": "float16",
        "seed": 0,
        "protocol": {"knn": {"ks": [20, 200], "temperature": 0.07}},
        "metrics": {"knn@20": {"top1": 60.0, "top5": 90.0}, "knn@200": {"top1": 58.0}, "linear": None},
        "environment": {"device": "cpu", "torch": "2.4", "date": "2026-01-01T00:00:00+00:00"},
    }
    for key, value in over.items():
        base[key] = value
    return base


def scale_record(scale, rep, acc, *, dataset="cifar10", space="embedding", n_train=10, n_test=5):
    return {
        "model": "m",
        "checkpoint": f"/x/scale{scale[0]}.ckpt",
        "checkpoint_sha256": "ab" * 32,
        "zoo_entry": {"pretrain_scale": scale},
        "dataset": dataset,
        "representation": rep,
        "patches": {"mode": "central" if rep == "central" else "random"},
        "aggregation": "mean",
        "space": space,
        "metrics": {"linear": {"top1": acc}, "knn@20": {"top1": acc - 1}},
        "n_train": n_train,
        "n_test": n_test,
    }


DATA = ("--dataset", "cifar10", "--patches", "1", "--eval", "knn", "--train-per-class", "2", "--test-per-class", "2")
DATA = (*DATA, "--json")


@dataclasses.dataclass
class Ctx:
    """What a case needs: a scratch folder, the tiny checkpoint and the CIFAR subset."""

    tmp: Path
    ckpt: Path
    data: Path
    monkeypatch: pytest.MonkeyPatch

    def tiny(self, checkpoint: Path | str | None = None) -> list[str]:
        return ["--model", "tiny_cifar", "--checkpoint", str(checkpoint or self.ckpt), "--data-dir", str(self.data)]

    def zoo(self, **changes: object) -> list[str]:
        """An extra zoo file ($PATCHBENCH_ZOO) holding a copy of tiny_cifar named `mine`, with `changes`."""
        entry = json.loads(json.dumps(dataclasses.asdict(get_entry("tiny_cifar"))))
        entry.update({"name": "mine", **changes})
        path = self.tmp / "zoo.yaml"
        path.write_text(yaml.safe_dump({"models": [entry]}))
        self.monkeypatch.setenv("PATCHBENCH_ZOO", str(path))
        return ["--model", "mine", "--data-dir", str(self.data)]

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path


PROGRESS_LINE = re.compile(r"^[^:]+: ([\d,]+/[\d,]+ images \(|[\d,]+ images in |reused cached features$)")


def assert_user_error(code: int, err: str, message: str) -> None:
    """Exit 2 and one ``error:`` line, last; before it at most the progress lines of work already done."""
    assert code == 2, err
    *before, last = err.strip().splitlines()
    assert last.startswith("error: ") and all(PROGRESS_LINE.match(line) for line in before), err
    assert "Traceback" not in err and message in last, err
