"""Several GPUs (issue 19): ``patchbench eval --nproc N`` on the ImageNet-like JPEG folder, for each N, in one run.

    cd benchmarks && python multi_gpu.py --root DIR [--nproc 1,2,4,8] [--train 20000 --val 2000] [--patches ...]
    cd benchmarks && python multi_gpu.py --root /tmp/mg --nproc 1,2 --train 40 --val 10 --patches central  # CPU

The folder and the random ResNet-50 (VICReg's file layout) are those of ``imagenet_like.py``. For each N: one
``eval --nproc N --compile on --eval knn`` in a fresh process and cache, as a user runs it; per representation
its wall seconds, train images/s and forwarded patches/s, the scaling efficiency against N x the one-process
rate, and whether every store's features equal those of N = 1 (the same store keys: the features are a function
of the images and the boxes, not of how the chunks were shared). One JSON line each; the first N must be 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from common import emit
from imagenet_like import write_folder

from ssl_patchbench.features.store import FeatureStore
from ssl_patchbench.results.store import read_records


def run(nproc: int, checkpoint: Path, data: Path, home: Path, patches: str) -> tuple[float, list[dict]]:
    command = [sys.executable, "-m", "ssl_patchbench", "eval", "--model", "vicreg_rn50", "--checkpoint"]
    command += [str(checkpoint), "--dataset", "imagenet", "--data-dir", str(data), "--eval", "knn", "--json"]
    command += ["--patches", patches, "--nproc", str(nproc), "--home", str(home)]
    command += ["--compile", "on"] if torch.cuda.is_available() else ["--device", "cpu"]  # CPU: a gloo smoke run
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        emit(measurement="multi_gpu", nproc=nproc, error=done.stderr[-2000:])
        return wall, []
    return wall, read_records(home / "results.jsonl")


def same_features(home: Path, reference: Path) -> dict[str, dict[str, float]]:
    """Per store key of the N = 1 run: how far this run's features are from it (the largest difference relative
    to the store's largest magnitude, and the share of values bit-equal; a forward slice's composition changes
    float rounding, so one float16 step here and there is expected)."""
    diffs = {}
    for manifest in sorted((reference / "features").glob("*/meta.json")):
        key = manifest.parent.name
        ours, theirs = FeatureStore(home / "features", key), FeatureStore(reference / "features", key)
        a = np.asarray(ours.load().features, np.float32) if ours.is_complete() else None
        b = np.asarray(theirs.load().features, np.float32)
        if a is None or a.shape != b.shape:
            diffs[key] = {"max_relative_diff": float("inf"), "equal_fraction": 0.0}
            continue
        scale = float(np.abs(b).max()) or 1.0
        diffs[key] = {"max_relative_diff": float(np.abs(a - b).max()) / scale, "equal_fraction": float((a == b).mean())}
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--nproc", default="1,2,4,8", help="process counts, the first 1 (the reference)")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--val", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--patches", default="central,16,48")
    args = parser.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    if counts[0] != 1:
        parser.error("--nproc must start with 1: it is the reference for rates and features")
    if torch.cuda.is_available():
        counts = [n for n in counts if n <= torch.cuda.device_count()]
    data = args.root / "imagenet_like"
    write_folder(data, args.train, args.val, args.classes)
    checkpoint = args.root / "vicreg_rn50_random.pth"
    state = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    torch.save(state, checkpoint)
    reference_rates: dict[str, float] = {}
    for nproc in counts:
        home = args.root / f"home_{nproc}"
        wall, records = run(nproc, checkpoint, data, home, args.patches)
        diffs = same_features(home, args.root / "home_1") if nproc > 1 else {}
        for record in records:
            train = record["timings"].get("extraction_train") or {}
            rate = train.get("images_per_s", 0.0)
            rep = record["representation"]
            reference_rates.setdefault(rep, rate)
            emit(
                measurement="multi_gpu",
                nproc=nproc,
                representation=rep,
                wall_seconds=round(wall, 1),
                train_images_per_s=round(rate),
                forwarded_patches_per_s=round((train.get("pass") or {}).get("forwarded_patches_per_s", 0)),
                scaling_efficiency=round(rate / (nproc * reference_rates[rep]), 3) if reference_rates[rep] else None,
                knn20=(record["metrics"].get("knn@20") or {}).get("top1"),
            )
        if diffs:
            emit(
                measurement="multi_gpu_features",
                nproc=nproc,
                stores=len(diffs),
                max_relative_diff_vs_one_process=max(d["max_relative_diff"] for d in diffs.values()),
                min_equal_fraction=min(d["equal_fraction"] for d in diffs.values()),
            )


if __name__ == "__main__":
    main()
