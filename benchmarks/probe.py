"""Linear probe: ours (L-BFGS over an objective on the device, with its weight-decay sweep; SciPy's L-BFGS-B or,
from LARGE_PROBE_WEIGHTS weights on, torch.optim.LBFGS) against scikit-learn's LogisticRegression at the same weight
decay, on the same synthetic features: accuracy and time.

    python benchmarks/probe.py [--quick] [--imagenet] [--both-solvers]

``--imagenet`` adds 1.28M x 2048 x 1000 classes on the GPU (ours only: scikit-learn would take hours).
``--both-solvers`` fits each problem with the solver its size picks and then with the other one (the size from
which torch.optim runs, LARGE_PROBE_WEIGHTS, moved for that fit): their times and numbers side by side.
"""

from __future__ import annotations

import argparse

import torch
from common import emit, timed
from sklearn.linear_model import LogisticRegression

from ssl_patchbench.evaluators import probe
from ssl_patchbench.evaluators.probe import linear_probe


def features(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 0.06
    labels = torch.randint(0, classes, (n,), generator=g)
    return (centres[labels] + torch.randn(n, d, generator=g)).half(), labels


def bench(name: str, n: int, d: int, classes: int, device: torch.device, *, sklearn: bool, both: bool) -> None:
    x_train, y_train = features(n, d, classes, 0)
    x_test, y_test = features(max(1000, n // 5), d, classes, 1)
    size = {"n_train": n, "dim": d, "classes": classes, "device": device.type}
    picked, chosen_wd = probe.solver_for(classes, d), None

    def fit() -> probe.ProbeResult:
        return linear_probe(x_train, y_train, x_test, y_test, device=device)

    for solver in (picked, probe.SCIPY if picked == probe.TORCH else probe.TORCH)[: 2 if both else 1]:
        threshold = probe.LARGE_PROBE_WEIGHTS
        if solver != picked:
            probe.LARGE_PROBE_WEIGHTS = 0 if solver == probe.TORCH else classes * (d + 1) + 1
        try:
            result, seconds = timed(fit, device=device)
        finally:
            probe.LARGE_PROBE_WEIGHTS = threshold
        chosen_wd = chosen_wd or result.weight_decay
        emit(
            bench="probe",
            impl="patchbench (sweep + refit)" + ("" if solver == picked else ", the other solver"),
            size=name,
            seconds=round(seconds, 2),
            top1=result.top1,
            weight_decay=result.weight_decay,
            solver=result.solver,
            n_iter=result.n_iter,
            **size,
        )
    if sklearn:
        mean, std = x_train.float().mean(0), x_train.float().std(0)
        xs, xt = ((x_train.float() - mean) / std).numpy(), ((x_test.float() - mean) / std).numpy()
        model = LogisticRegression(C=1.0 / (chosen_wd * n), max_iter=1000)
        _, fit_seconds = timed(lambda: model.fit(xs, y_train.numpy()), device=torch.device("cpu"))
        top1 = 100.0 * float((model.predict(xt) == y_test.numpy()).mean())
        emit(
            bench="probe",
            impl="scikit-learn lbfgs (one fit at our wd)",
            size=name,
            seconds=round(fit_seconds, 2),
            top1=round(top1, 2),
            **{**size, "device": "cpu"},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--imagenet", action="store_true")
    parser.add_argument("--both-solvers", action="store_true")
    args = parser.parse_args()
    scale = 20 if args.quick else 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    both = args.both_solvers
    bench("cifar", 50_000 // scale, 512, 10, device, sklearn=True, both=both)
    if device.type == "cuda":
        bench("cifar", 50_000, 512, 10, torch.device("cpu"), sklearn=False, both=False)
        if args.imagenet:
            bench("imagenet", 1_281_167, 2048, 1000, device, sklearn=False, both=both)


if __name__ == "__main__":
    main()
