"""kNN speed: our tiled matmul + top-k (GPU and CPU) against faiss (CPU, IndexFlatIP) and a naive full-matrix
implementation, on synthetic clustered features.

    python benchmarks/knn.py [--quick]

Sizes: 50k train x 10k test x 512 (CIFAR-like) on CPU and GPU; 1.28M x 50k x 2048 (ImageNet-like) on the GPU.
faiss at ImageNet size on the CPU is timed on a slice of the queries and scaled (the line says so).
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from common import emit, timed

from ssl_patchbench.evaluators.knn import knn_classify


def clustered(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99))  # shared by train and test
    labels = torch.randint(0, classes, (n,), generator=g)
    return (centres[labels] + 1.5 * torch.randn(n, d, generator=g)).half(), labels


def naive(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, k: int, device: torch.device) -> None:
    """What one writes first: the whole similarity matrix, then top-k and a weighted vote."""
    a = torch.nn.functional.normalize(test.to(device).float(), dim=1)
    b = torch.nn.functional.normalize(train.to(device).float(), dim=1)
    sims, idx = (a @ b.T).topk(k, dim=1)
    votes = torch.zeros(len(a), int(train_labels.max()) + 1, device=device)
    votes.scatter_add_(1, train_labels.to(device)[idx], (sims / 0.07).exp())
    votes.argmax(1).cpu()


def bench(
    name: str, n_train: int, n_test: int, d: int, classes: int, device: torch.device, *, run_ours: bool, run_naive: bool
) -> None:
    train, y_train = clustered(n_train, d, classes, 0)
    test, y_test = clustered(n_test, d, classes, 1)
    size = {"n_train": n_train, "n_test": n_test, "dim": d, "classes": classes, "device": device.type}
    if run_ours:
        found, seconds = timed(
            lambda: knn_classify(train, y_train, test, y_test, ks=(20, 200), device=device, num_classes=classes),
            device=device,
        )
        emit(bench="knn", impl="patchbench", size=name, seconds=round(seconds, 3), top1_k20=found[20].top1, **size)
    if run_naive:
        _, seconds = timed(lambda: naive(train, y_train, test, 200, device), device=device)
        emit(bench="knn", impl="naive-full-matrix", size=name, seconds=round(seconds, 3), **size)
    if device.type == "cpu" and importlib.util.find_spec("faiss"):
        queries = n_test if n_train * n_test <= 50_000 * 10_000 else 1_000
        _, seconds = timed(
            lambda: knn_classify(
                train, y_train, test[:queries], y_test[:queries], backend="faiss", num_classes=classes
            ),
            device=device,
        )
        emit(
            bench="knn",
            impl="faiss-cpu-flat",
            size=name,
            queries_timed=queries,
            seconds=round(seconds * n_test / queries, 3),
            scaled=queries != n_test,
            **{**size, "device": "cpu"},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    scale = 20 if args.quick else 1
    cpu = torch.device("cpu")
    bench("cifar", 50_000 // scale, 10_000 // scale, 512, 10, cpu, run_ours=True, run_naive=True)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        bench("cifar", 50_000, 10_000, 512, 10, gpu, run_ours=True, run_naive=True)
        bench("imagenet", 1_281_167 // scale, 50_000 // scale, 2048, 1000, gpu, run_ours=True, run_naive=False)
        bench("imagenet", 1_281_167 // scale, 50_000 // scale, 2048, 1000, cpu, run_ours=False, run_naive=False)


if __name__ == "__main__":
    main()
