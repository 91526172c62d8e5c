"""Linear probe against scikit-learn, and the protocol rules: selection on train only, train statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.evaluators import probe
from ssl_patchbench.evaluators.probe import (
    CHUNK_ELEMENTS,
    MAX_ITER,
    TOLERANCE,
    _fit,
    _Scaler,
    linear_probe,
    stratified_split,
)


def blobs(n: int, num_classes: int, dim: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian classes with an offset and uneven feature scales (so standardising matters)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(num_classes, dim))
    scales = np.random.default_rng(98).uniform(0.1, 10.0, size=dim)
    labels = rng.integers(0, num_classes, size=n)
    feats = (centers[labels] + 2.0 * rng.normal(size=(n, dim))) * scales + 5.0
    return torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def data():
    train, train_labels = blobs(800, 8, seed=1)
    test, test_labels = blobs(400, 8, seed=2)
    return train, train_labels, test, test_labels


@pytest.fixture(params=[probe.SCIPY, probe.TORCH])
def solver(request, monkeypatch) -> str:
    """Each L-BFGS in turn: the torch one by lowering the size from which it is chosen to every problem."""
    if request.param == probe.TORCH:
        monkeypatch.setattr(probe, "LARGE_PROBE_WEIGHTS", 0)
    assert probe.solver_for(8, 24) == request.param
    return request.param


def sklearn_probe(train, train_labels, test, wd: float) -> LogisticRegression:
    """scikit-learn's L2 logistic regression with the same objective: C = 1 / (wd * N_fit)."""
    scaler = StandardScaler().fit(train.numpy().astype(np.float64))
    model = LogisticRegression(C=1.0 / (wd * len(train)), max_iter=5000, tol=1e-8)
    model.fit(scaler.transform(train.numpy().astype(np.float64)), train_labels.numpy())
    return model, scaler


def test_matches_sklearn_at_fixed_weight_decay(data):
    train, train_labels, test, test_labels = data
    wd = 1e-2
    got = linear_probe(train, train_labels, test, test_labels, weight_decays=[wd], device="cpu", tol=1e-6)
    model, scaler = sklearn_probe(train, train_labels, test, wd)
    x_test = scaler.transform(test.numpy().astype(np.float64))
    assert got.top1 == pytest.approx(100.0 * model.score(x_test, test_labels.numpy()), abs=1.0)
    assert got.weight_decay == wd and got.val_top1 == {}

    init = (torch.zeros(8, 24), torch.zeros(8))
    w, b, _ = _fit(train, train_labels, _Scaler.fit(train), wd, init, max_iter=1000, tol=1e-6)
    np.testing.assert_allclose(w.numpy(), model.coef_, atol=2e-3)
    probs = torch.softmax(torch.from_numpy(x_test).float() @ w.T + b, dim=1).numpy()
    np.testing.assert_allclose(probs, model.predict_proba(x_test), atol=2e-3)


def test_the_default_tolerance_reaches_the_optimum_scikit_learn_finds(data, solver):
    """The probe's number is the objective's, not where a solver stopped: at the default tolerance the weights are
    scikit-learn's (tol 1e-8) to within the float32 objective's noise, and the test predictions are the same,
    whichever of the two solvers fits them."""
    train, train_labels, test, _ = data
    wd = 1e-4  # weakly regularised: the slowest case to converge
    model, scaler = sklearn_probe(train, train_labels, test, wd)
    init = (torch.zeros(8, 24), torch.zeros(8))
    w, b, _ = _fit(train, train_labels, _Scaler.fit(train), wd, init, max_iter=MAX_ITER, tol=TOLERANCE)
    np.testing.assert_allclose(w.numpy(), model.coef_, rtol=0, atol=2e-3 * np.abs(model.coef_).max())
    x_test = torch.from_numpy(scaler.transform(test.numpy().astype(np.float64))).float()
    np.testing.assert_array_equal((x_test @ w.T + b).argmax(1).numpy(), model.predict(x_test.double().numpy()))


def test_a_fit_cut_by_max_iter_says_so_and_a_converged_one_does_not(data, solver, caplog):
    train, train_labels = data[0], data[1]
    init, scaler = (torch.zeros(8, 24), torch.zeros(8)), _Scaler.fit(train)
    with caplog.at_level("WARNING", logger=probe.__name__):
        _, _, n_iter = _fit(train, train_labels, scaler, 1e-4, init, max_iter=MAX_ITER, tol=TOLERANCE)
        assert not caplog.records
        _fit(train, train_labels, scaler, 1e-4, init, max_iter=n_iter // 2, tol=TOLERANCE)
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"wd=0.0001: L-BFGS stopped at max_iter={n_iter // 2} before reaching tol"]


def test_a_fit_on_many_rows_reaches_the_objective_scikit_learn_reaches(solver):
    """20,000 rows, weakly regularised: the loss must be summed row by row. Taken as the difference of two sums
    over the rows it lost the digits the line search needs, and the fit stopped at 1.7e-5 above the optimum."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 8, size=20_000)
    centres = np.random.default_rng(99).normal(size=(8, 32))
    x = torch.from_numpy(((centres[labels] + 1.5 * rng.normal(size=(20_000, 32))) * 3 + 5).astype(np.float32))
    y, wd = torch.from_numpy(labels), 1e-6
    standardised = StandardScaler().fit_transform(x.double().numpy())
    model = LogisticRegression(C=1.0 / (wd * len(x)), tol=1e-12, max_iter=10_000).fit(standardised, labels)

    def objective(w, b) -> float:  # float64, as the protocol states it
        w, b = torch.as_tensor(w, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        logits = torch.from_numpy(standardised) @ w.T + b
        return (torch.nn.functional.cross_entropy(logits, y) + 0.5 * wd * w.square().sum()).item()

    w, b, _ = _fit(x, y, _Scaler.fit(x), wd, (torch.zeros(8, 32), torch.zeros(8)), max_iter=MAX_ITER, tol=TOLERANCE)
    optimum = objective(model.coef_, model.intercept_)
    assert 0 <= objective(w, b) - optimum < 1e-6 * optimum


def _autograd_objective(x, y, scaler, wd, weights):
    """The objective written as the protocol states it, differentiated by autograd: the reference."""
    weights = weights.clone().requires_grad_(True)
    w, b = weights[:-8].view(8, -1), weights[-8:]
    loss = torch.nn.functional.cross_entropy((x - scaler.mean) / scaler.std @ w.T + b, y) + 0.5 * wd * w.square().sum()
    loss.backward()
    return torch.cat([loss.detach().reshape(1), weights.grad])


@pytest.mark.parametrize("chunk_elements", [CHUNK_ELEMENTS, 8 * 100])  # one chunk, and chunks of 100 rows
def test_the_written_out_gradient_is_autograds(data, monkeypatch, chunk_elements):
    monkeypatch.setattr(probe, "CHUNK_ELEMENTS", chunk_elements)
    train, train_labels = data[0].double(), data[1]
    scaler = _Scaler.fit(train)
    objective = probe._Objective(train, train_labels, scaler, 1e-2, 8)
    for seed in range(3):
        weights = 0.1 * torch.randn(8 * 25, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        torch.testing.assert_close(objective(weights), _autograd_objective(train, train_labels, scaler, 1e-2, weights))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_replayed_cuda_graph_computes_what_the_eager_objective_does(data):
    train, train_labels = data[0].cuda(), data[1].cuda()
    scaler = _Scaler.fit(train)
    objective = probe._Objective(train, train_labels, scaler, 1e-2, 8)
    assert objective._graph is not None
    for seed in range(3):  # each replay reads the weights copied in last
        weights = 0.1 * torch.randn(8 * 25, generator=torch.Generator().manual_seed(seed))
        replayed = objective(weights).clone()
        torch.testing.assert_close(replayed, objective._compute())
        torch.testing.assert_close(
            replayed.cpu(),
            _autograd_objective(data[0], data[1], _Scaler.fit(data[0]), 1e-2, weights),
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_both_solvers_fit_from_the_replayed_graph_on_a_gpu(data, solver):
    """On a GPU the objective is a replayed graph whose output the next replay overwrites: each solver must copy
    what it keeps, and reach the CPU fit's weights."""
    train, train_labels = data[0], data[1]
    init = (torch.zeros(8, 24), torch.zeros(8))
    w_cpu, _, _ = _fit(train, train_labels, _Scaler.fit(train), 1e-3, init, max_iter=MAX_ITER, tol=TOLERANCE)
    cuda = train.cuda(), train_labels.cuda()
    gpu_init = (init[0].cuda(), init[1].cuda())
    w_gpu, _, _ = _fit(*cuda, _Scaler.fit(cuda[0]), 1e-3, gpu_init, max_iter=MAX_ITER, tol=TOLERANCE)
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=0, atol=1e-3 * w_cpu.abs().max().item())


@pytest.mark.parametrize("large", [False, True])
def test_the_probe_runs_and_reports_the_solver_its_size_picks(data, monkeypatch, large):
    """Below LARGE_PROBE_WEIGHTS only SciPy may run, from there only torch.optim; the result names the one that did."""
    train, train_labels, test, test_labels = data
    monkeypatch.setattr(probe, "LARGE_PROBE_WEIGHTS", 8 * 25 if large else 8 * 25 + 1)

    def refuse(*args, **kwargs):
        raise AssertionError("the other solver ran")

    monkeypatch.setattr(*((torch.optim, "LBFGS") if not large else (probe.scipy.optimize, "minimize")), refuse)
    got = linear_probe(train, train_labels, test, test_labels, weight_decays=[1e-2], device="cpu")
    assert got.solver == (probe.TORCH if large else probe.SCIPY)
    assert got.top1 > 50 and got.n_iter > 0


def test_weight_decay_is_chosen_without_the_test_split(data):
    train, train_labels, test, test_labels = data
    wds = [1e-1, 1e-2, 1e-3, 1e-4]
    honest = linear_probe(train, train_labels, test, test_labels, weight_decays=wds, device="cpu")
    garbage_labels = test_labels[torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(0))]
    garbage = linear_probe(train, train_labels, test.flip(1), garbage_labels, weight_decays=wds, device="cpu")
    assert garbage.weight_decay == honest.weight_decay
    assert garbage.val_top1 == honest.val_top1
    assert garbage.top1 < honest.top1 - 30


def test_standardises_with_train_statistics_only(data):
    train, train_labels, test, test_labels = data
    args = {"weight_decays": [1e-3], "device": "cpu"}
    base = linear_probe(train, train_labels, test, test_labels, **args)
    scale, shift = torch.linspace(0.5, 4.0, 24), torch.linspace(-3.0, 3.0, 24)
    # a per-feature affine map of both splits is undone by standardisation
    mapped = linear_probe(train * scale + shift, train_labels, test * scale + shift, test_labels, **args)
    assert mapped.top1 == pytest.approx(base.top1, abs=0.5)
    # shifting the test split alone must hurt: test statistics would have re-centred it
    shifted = linear_probe(train, train_labels, test + 3.0 * train.std(0), test_labels, **args)
    assert shifted.top1 < base.top1 - 20


def test_deterministic_for_a_seed(data):
    train, train_labels, test, test_labels = data
    runs = [linear_probe(train, train_labels, test, test_labels, seed=3, device="cpu") for _ in range(2)]
    assert dataclasses.replace(runs[0], seconds=0) == dataclasses.replace(runs[1], seconds=0)


def test_stratified_split_is_seeded_disjoint_and_per_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 2 + [3] * 1)
    fit, val = stratified_split(labels, 0.1, seed=0)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[val], minlength=4).tolist() == [5, 3, 1, 0]
    again, _ = stratified_split(labels, 0.1, seed=0)
    other, _ = stratified_split(labels, 0.1, seed=1)
    assert torch.equal(again, fit) and not torch.equal(other, fit)


def test_tiny_two_class_problem_runs():
    train, train_labels = blobs(6, 2, dim=4, seed=4)
    train_labels = torch.tensor([0, 0, 0, 1, 1, 1])
    test, test_labels = blobs(4, 2, dim=4, seed=5)
    got = linear_probe(train, train_labels, test, test_labels, device="cpu")
    assert 0.0 <= got.top1 <= 100.0 and got.top5 is None
    assert got.weight_decay in got.val_top1


def test_one_sample_per_class_needs_a_single_weight_decay():
    train, _ = blobs(2, 2, dim=4, seed=6)
    labels = torch.tensor([0, 1])
    with pytest.raises(UserError, match="one weight decay"):
        linear_probe(train, labels, train, labels, device="cpu")
    assert linear_probe(train, labels, train, labels, weight_decays=[1e-2], device="cpu").top1 == 100.0


@pytest.mark.parametrize(("num_classes", "has_top5"), [(3, False), (5, False), (7, True)])
def test_top5_only_above_five_classes(num_classes, has_top5):
    train, train_labels = blobs(200, num_classes, seed=7)
    test, test_labels = blobs(50, num_classes, seed=8)
    got = linear_probe(train, train_labels, test, test_labels, weight_decays=[1e-3], device="cpu")
    assert (got.top5 is not None) == has_top5


def test_num_classes_counts_classes_missing_from_the_labels():
    train, train_labels = blobs(200, 5, seed=9)
    test, test_labels = blobs(50, 5, seed=10)
    got = linear_probe(train, train_labels, test, test_labels, weight_decays=[1e-3], num_classes=6, device="cpu")
    assert got.top5 is not None


def test_float16_features_and_bad_inputs(data):
    train, train_labels, test, test_labels = data
    half = linear_probe(train.half(), train_labels, test.half(), test_labels, weight_decays=[1e-2], device="cpu")
    full = linear_probe(train, train_labels, test, test_labels, weight_decays=[1e-2], device="cpu")
    assert half.top1 == pytest.approx(full.top1, abs=1.0)
    with pytest.raises(UserError, match="width"):
        linear_probe(train, train_labels, test[:, :3], test_labels, device="cpu")
    with pytest.raises(UserError, match="val_fraction"):
        linear_probe(train, train_labels, test, test_labels, val_fraction=1.5, device="cpu")
    with pytest.raises(UserError, match="NaN"):
        linear_probe(train, train_labels, test * torch.nan, test_labels, weight_decays=[1e-2], device="cpu")
    with pytest.raises(UserError, match="num_classes"):
        linear_probe(train, train_labels, test, test_labels, num_classes=3, device="cpu")
