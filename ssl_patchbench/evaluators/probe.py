"""Linear probe on frozen, cached features: multinomial logistic regression fitted full-batch by L-BFGS.

Two L-BFGS solvers, chosen by the size of the problem alone (so the same dataset and representation always get
the same one, on any device): SciPy's L-BFGS-B up to ``LARGE_PROBE_WEIGHTS`` weights, ``torch.optim.LBFGS`` from
there, whose history stays where the features are. Both stop at the same relative tolerance, where they agree.

Weight decay is chosen on a seeded, stratified hold-out of the train split (never the test split), then
the model is refit on the whole train split and that final model's test accuracy is reported. This is the
cached-feature protocol, not the paper's 100-epoch augmented SGD probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import threadpoolctl
import torch

from ssl_patchbench.core.devices import exact_fp32, resolve_device
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.evaluators.inputs import check_labelled_features
from ssl_patchbench.evaluators.metrics import TopKHits

log = logging.getLogger(__name__)

DEFAULT_WEIGHT_DECAYS = tuple(10.0**-e for e in range(8))
"""1 down to 1e-7 by decades: the optimum moves from ~1e-1 (a few samples a class) to ~1e-6 (ImageNet)."""
PATIENCE = 2
"""Stop the sweep (large to small decay) after this many decays in a row fail to beat the best val top-1."""
HISTORY_SIZE = 20
TOLERANCE = 1e-5
"""A fit stops when its largest gradient entry falls below this times its value at zero weights. At 1e-3 (before
2026-12-04) two L-BFGS solvers differed by up to 0.18 points of test accuracy on real CIFAR-10 features, up to 0.19
from the converged answer; at 1e-5 both give the 1e-6 answer to 0.01 points: the number is the objective's, not
the solver's."""
MAX_ITER = 3000
"""Iterations a fit may take (a 2048-d projection-space fit at wd 1e-5 took 734)."""
TOLERANCE_CHANGE = 1e-9
"""A fit also stops when an iteration lowers the objective by less than this, relative to the objective (L-BFGS-B)
or to its value at zero weights (``torch.optim.LBFGS``, whose threshold is absolute)."""
LARGE_PROBE_WEIGHTS = 2**17
"""From this many weights (classes x (dim + 1)) on, a fit runs ``torch.optim.LBFGS`` instead of SciPy's L-BFGS-B.
L-BFGS-B's iterations run on the host, at about 86 ns a weight (172 ms at 2M weights, 1000 ImageNet classes x 2048,
on a 2-core CPU; on one H200 such a probe took 60.6 s with it against 37.0 s with ``torch.optim``, both at 1e-3).
``torch.optim``'s run on the features' device but cost a process's first use the 1.5 s import of ``torch._dynamo``
and a few small kernels per iteration. Every 10-class problem stays below; ImageNet-100 and ImageNet at 2048
dimensions sit above."""
SCIPY, TORCH = "L-BFGS-B", "torch.optim.LBFGS"
CHUNK_ELEMENTS = 2**26
"""Logit elements per chunk of rows in the objective: bounds its memory to a few hundred MB."""


@dataclass(frozen=True)
class ProbeResult:
    """Test accuracy (percent) of the refit model and how it was chosen.

    ``val_top1`` maps each weight decay tried to its held-out accuracy (empty when only one was given;
    the sweep may stop before the smallest); ``n_iter`` counts the L-BFGS iterations of the final refit;
    ``solver`` is the L-BFGS that fitted it (:func:`solver_for`); ``seconds`` is the wall time of the whole probe.
    """

    top1: float
    top5: float | None
    weight_decay: float
    val_top1: dict[float, float]
    n_iter: int
    solver: str
    seconds: float


@dataclass(frozen=True)
class _Scaler:
    """Per-feature mean and std of the rows a model is fitted on (zero-variance features keep scale 1)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> _Scaler:
        std, mean = torch.std_mean(x, dim=0, correction=0)
        return cls(mean, torch.where(std > 1e-6 * mean.abs().clamp_min(1.0), std, 1.0))


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, val) row indices: per class, a seeded random ``round(val_fraction * n_c)`` rows go to val.

    Every class with at least two rows keeps at least one row on each side, so tiny splits still select.
    """
    labels = labels.cpu().long()
    perm = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    grouped = perm[torch.sort(labels[perm], stable=True).indices]
    counts = torch.bincount(labels)
    n_val = (counts * val_fraction).round().long().clamp(min=1).minimum(counts - 1).clamp(min=0)
    starts = torch.cumsum(counts, 0) - counts
    sorted_labels = labels[grouped]
    rank = torch.arange(labels.shape[0]) - starts[sorted_labels]
    is_val = rank < n_val[sorted_labels]
    return grouped[~is_val].sort().values, grouped[is_val].sort().values


def _on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Features moved to ``device`` as float32; non-finite features are refused (they poison the fit)."""
    x = x.to(device).float()
    if not torch.isfinite(x).all():
        raise UserError("features contain NaN or inf (a float16 overflow?): store them as float32")
    return x


def _folded(w: torch.Tensor, b: torch.Tensor, scaler: _Scaler) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights and bias that act on raw features as ``(w, b)`` act on standardised ones: the scaling folded
    into the weights, so the features are never copied."""
    w_raw = w / scaler.std
    return w_raw, b - w_raw @ scaler.mean


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scaler: _Scaler) -> torch.Tensor:
    """Logits of standardised ``x``."""
    w_raw, b_raw = _folded(w, b, scaler)
    return torch.addmm(b_raw, x, w_raw.T)


def _chunk_rows(num_classes: int) -> int:
    """Rows per chunk so that one chunk's logits hold at most ``CHUNK_ELEMENTS`` values."""
    return max(1, CHUNK_ELEMENTS // num_classes)


class _Objective:
    """Mean cross-entropy + 0.5 * wd * ||w||^2 (bias not decayed) and its gradient, as one flat vector
    ``[loss, dL/dw, dL/db]`` at the flat weights ``[w, b]``; rows are taken chunk by chunk to bound memory.

    The gradient is written out (softmax minus one-hot, through the folded standardisation), not taken by autograd:
    half the kernels. On CUDA the whole evaluation is captured once as a CUDA graph and replayed, one launch instead
    of about twenty kernels per chunk: the problems a probe solves are small, so launches, not arithmetic, set its
    speed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, scaler: _Scaler, wd: float, num_classes: int) -> None:
        self.x, self.y, self.scaler, self.wd = x, y, scaler, wd
        self.shape = (num_classes, x.shape[1])
        self.weights = torch.zeros(num_classes * (x.shape[1] + 1), device=x.device, dtype=x.dtype)
        self._graph: torch.cuda.CUDAGraph | None = None
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):  # a graph is captured on the current device's streams
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._compute()  # warm-up outside the capture, as CUDA graphs require
                torch.cuda.current_stream().wait_stream(side)
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph):
                    self._out = self._compute()

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w, b)``, views of flat weights laid out as ``[w, b]``."""
        size = self.shape[0] * self.shape[1]
        return flat[:size].view(self.shape), flat[size:]

    @torch.no_grad()
    def _compute(self) -> torch.Tensor:
        x, y, scaler = self.x, self.y, self.scaler
        n = x.shape[0]
        w, b = self.split(self.weights)
        w_raw, b_raw = _folded(w, b, scaler)  # logits = x @ w_raw.T + b_raw
        loss = 0.5 * self.wd * w.square().sum()
        grad_raw, grad_b = torch.zeros_like(w), torch.zeros_like(b)
        rows = _chunk_rows(self.shape[0])
        for s in range(0, n, rows):
            xs, ys = x[s : s + rows], y[s : s + rows, None]
            log_probs = torch.addmm(b_raw, xs, w_raw.T)
            log_probs -= log_probs.logsumexp(1, keepdim=True)
            # each row's loss before the sum (a difference of two sums over the rows would lose the digits the
            # line search needs: fits then stopped early, 0.15 points short on a 2048-d space)
            loss -= log_probs.gather(1, ys).sum() / n
            residual = log_probs.exp_().scatter_add_(1, ys, torch.full_like(ys, -1, dtype=log_probs.dtype))
            residual /= n  # softmax minus one-hot, per row, over n
            grad_raw.addmm_(residual.T, xs)
            grad_b += residual.sum(0)
        grad_w = (grad_raw - grad_b[:, None] * scaler.mean) / scaler.std + self.wd * w
        return torch.cat([loss.reshape(1), grad_w.reshape(-1), grad_b])

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        """``[loss, gradient]`` at the flat ``weights`` (any device and float dtype); on CUDA the graph's own
        output, overwritten by the next call."""
        self.weights.copy_(weights)
        if self._graph is None:
            return self._compute()
        self._graph.replay()
        return self._out


def solver_for(num_classes: int, dim: int) -> str:
    """The L-BFGS a probe of ``num_classes`` classes on ``dim``-d features runs (see ``LARGE_PROBE_WEIGHTS``)."""
    return TORCH if num_classes * (dim + 1) >= LARGE_PROBE_WEIGHTS else SCIPY


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    scaler: _Scaler,
    wd: float,
    init: tuple[torch.Tensor, torch.Tensor],
    *,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise the objective from ``init`` (warm start) until the largest gradient entry falls below
    ``tol`` times its value at zero weights; returns (w, b, L-BFGS iterations).

    The objective and its gradient are computed where the features are; the solver is :func:`solver_for`'s."""
    objective = _Objective(x, y, scaler, wd, init[0].shape[0])
    # the yardsticks: the objective and its largest gradient entry at zero weights (whatever wd). Gradient entries
    # shrink like 1/classes, so an absolute tolerance that suits 10 classes would stop a 1000-class fit at once
    at_zero = objective(torch.zeros_like(objective.weights))
    tolerance_grad, tolerance_change = tol * at_zero[1:].abs().max().item(), TOLERANCE_CHANGE * at_zero[0].item()
    theta = torch.cat([init[0].reshape(-1), init[1]])
    if solver_for(*init[0].shape) == TORCH:
        found, n_iter, stopped = _torch_lbfgs(objective, theta, tolerance_grad, tolerance_change, max_iter)
    else:
        found, n_iter, stopped = _scipy_lbfgs(objective, theta, tolerance_grad, max_iter, cpu=x.device.type == "cpu")
    if stopped:
        log.warning("wd=%.3g: L-BFGS stopped at max_iter=%d before reaching tol", wd, max_iter)
    log.debug("wd=%.3g: %d L-BFGS iterations", wd, n_iter)
    w, b = objective.split(found.to(x.device, torch.float32))
    return w, b, n_iter


def _scipy_lbfgs(
    objective: _Objective, theta: torch.Tensor, tolerance_grad: float, max_iter: int, *, cpu: bool
) -> tuple[torch.Tensor, int, bool]:
    """SciPy's L-BFGS-B (scikit-learn's ``lbfgs``): iterations on the host over the weights only, in float64, one
    copy of the objective and gradient per evaluation; returns (weights, iterations, whether max_iter stopped it)."""

    def objective_and_gradient(weights: np.ndarray) -> tuple[float, np.ndarray]:
        both = objective(torch.from_numpy(weights)).cpu().double().numpy()
        return float(both[0]), both[1:]

    # on a CPU, NumPy's and SciPy's BLAS threads (torch's MKL is not seen) spin idle on the cores the objective's
    # torch threads need, halving its speed: one will do for the solver there
    with threadpoolctl.threadpool_limits(1 if cpu else None, user_api="blas"):
        found = scipy.optimize.minimize(
            objective_and_gradient,
            theta.cpu().double().numpy(),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "maxcor": HISTORY_SIZE, "gtol": tolerance_grad, "ftol": TOLERANCE_CHANGE},
        )
    return torch.from_numpy(found.x), int(found.nit), found.status == 1


def _torch_lbfgs(
    objective: _Objective, theta: torch.Tensor, tolerance_grad: float, tolerance_change: float, max_iter: int
) -> tuple[torch.Tensor, int, bool]:
    """``torch.optim.LBFGS`` with a strong-Wolfe line search, its history on the weights' device, in float32;
    returns (weights, iterations, whether max_iter stopped it). ``theta`` is stepped in place."""
    solver = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=max_iter,
        history_size=HISTORY_SIZE,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        both = objective(theta)
        theta.grad = both[1:]  # the solver copies it before the next evaluation overwrites it
        return both[0]

    solver.step(closure)
    state = solver.state[theta]  # it also stops after max_eval evaluations (1.25 x max_iter)
    stopped = state["n_iter"] >= max_iter or state["func_evals"] >= solver.defaults["max_eval"]
    return theta, int(state["n_iter"]), stopped


@torch.no_grad()
def _accuracy(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scaler: _Scaler
) -> tuple[float, float | None]:
    """Top-1 and top-5 (None for <= 5 classes) accuracy in percent."""
    counter = TopKHits(w.shape[0], x.device)
    rows = _chunk_rows(w.shape[0])
    for s in range(0, x.shape[0], rows):
        counter.add(_logits(x[s : s + rows], w, b, scaler).topk(counter.depth, dim=1).indices, y[s : s + rows])
    return counter.percent()


def _select_weight_decay(
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    weight_decays: Sequence[float],
    init: tuple[torch.Tensor, torch.Tensor],
    *,
    max_iter: int,
    tol: float,
) -> tuple[float, dict[float, float], tuple[torch.Tensor, torch.Tensor]]:
    """Sweep decays from large to small, each warm-started from the last; ties go to the larger decay.

    Returns the best decay, the val top-1 of every decay tried and the best decay's weights.
    """
    scaler = _Scaler.fit(x_fit)
    val_top1: dict[float, float] = {}
    best_wd, best_params, misses = None, init, 0
    for wd in sorted(weight_decays, reverse=True):
        w, b, _ = _fit(x_fit, y_fit, scaler, wd, init, max_iter=max_iter, tol=tol)
        init = (w, b)
        val_top1[wd] = _accuracy(x_val, y_val, w, b, scaler)[0]
        if best_wd is None or val_top1[wd] > val_top1[best_wd]:
            best_wd, best_params, misses = wd, (w, b), 0
        else:
            misses += 1
            if misses == PATIENCE:
                break
    log.info("weight decay %.3g chosen on %d held-out rows: %s", best_wd, x_val.shape[0], val_top1)
    return best_wd, val_top1, best_params


def linear_probe(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    weight_decays: Sequence[float] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device | None = None,
    max_iter: int = MAX_ITER,
    tol: float = TOLERANCE,
    num_classes: int | None = None,
) -> ProbeResult:
    """Fit the probe on ``train`` (decay chosen on a held-out part of it) and score it on ``test``.

    A fit stops when its largest gradient entry is below ``tol`` times that at zero weights (relative, unlike
    scikit-learn's absolute ``tol``, so 1000 classes converge as well as 10) or after ``max_iter`` iterations.
    Features are moved to ``device`` once, as float32; the objective runs in row chunks to bound memory.
    """
    start = time.perf_counter()
    num_classes = check_labelled_features(train, train_labels, test, test_labels, num_classes)
    weight_decays = DEFAULT_WEIGHT_DECAYS if weight_decays is None else tuple(weight_decays)
    if not weight_decays or min(weight_decays) < 0 or not 0 < val_fraction < 1:
        raise UserError(f"need weight decays >= 0 and 0 < val_fraction < 1, got {weight_decays}, {val_fraction}")
    device = resolve_device("auto" if device is None else str(device))
    init = (torch.zeros(num_classes, train.shape[1], device=device), torch.zeros(num_classes, device=device))
    with exact_fp32():
        if len(weight_decays) == 1:
            x, y = _on_device(train, device), train_labels.to(device).long()
            wd, val_top1 = weight_decays[0], {}
        else:
            fit_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
            if val_idx.numel() == 0:
                raise UserError("too few train rows per class to hold out a validation set: pass one weight decay")
            order = torch.cat([fit_idx, val_idx])
            x, y = _on_device(train[order], device), train_labels[order].to(device).long()
            n_fit = fit_idx.numel()
            wd, val_top1, init = _select_weight_decay(
                x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:], weight_decays, init, max_iter=max_iter, tol=tol
            )
        scaler = _Scaler.fit(x)
        w, b, n_iter = _fit(x, y, scaler, wd, init, max_iter=max_iter, tol=tol)
        del x, y
        top1, top5 = _accuracy(_on_device(test, device), test_labels.to(device).long(), w, b, scaler)
    solver = solver_for(num_classes, train.shape[1])
    return ProbeResult(top1, top5, wd, val_top1, n_iter, solver, time.perf_counter() - start)
