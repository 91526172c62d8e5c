"""Self-supervised objectives on K >= 2 views of each image: VICReg and TCR (total coding rate).

Every loss takes the projector outputs stacked as ``[K, B, D]`` (view k of image b) and is computed in
float32: the covariance and log-determinant terms lose too much in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_views(views: torch.Tensor) -> None:
    if views.ndim != 3 or views.shape[0] < 2 or views.shape[1] < 2:
        raise ValueError(f"views must be [K >= 2, B >= 2, D], got {tuple(views.shape)}")


def vicreg_terms(views: torch.Tensor, *, std_eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(invariance, variance, covariance) of VICReg, generalised to K views.

    For K = 2 these are exactly Bardes et al.'s terms: MSE(z1, z2); the mean over both branches of the
    hinge on each dimension's std; the sum over both branches of the squared off-diagonal covariances / D.
    For K > 2 (EMP-SSL's mean-of-patches invariance) invariance is the mean pairwise MSE, computed as
    ``2K/(K-1)`` times the mean squared distance to the per-image mean of the views (the same number),
    variance the mean over views and covariance ``2/K`` times the sum over views, so K = 2 is unchanged.
    """
    _check_views(views)
    k, b, d = views.shape
    z = views.float()
    centre = z.mean(dim=0, keepdim=True)
    invariance = (z - centre).pow(2).mean() * (2 * k / (k - 1))
    centred = z - z.mean(dim=1, keepdim=True)
    std = torch.sqrt(centred.var(dim=1) + std_eps)  # [K, D]
    variance = F.relu(1.0 - std).mean()
    cov = torch.einsum("kbi,kbj->kij", centred, centred) / (b - 1)  # [K, D, D]
    diagonal = torch.eye(d, dtype=torch.bool, device=z.device)
    covariance = cov.masked_fill(diagonal, 0.0).pow(2).sum() / d * (2 / k)
    return invariance, variance, covariance


def vicreg_loss(
    z1: torch.Tensor, z2: torch.Tensor, *, sim: float = 25.0, var: float = 25.0, cov: float = 1.0
) -> torch.Tensor:
    """VICReg on two views ``[B, D]`` with coefficients 25/25/1 (Bardes, Ponce, LeCun 2022)."""
    return vicreg_views(torch.stack([z1, z2]), sim=sim, var=var, cov=cov)


def vicreg_views(views: torch.Tensor, *, sim: float = 25.0, var: float = 25.0, cov: float = 1.0) -> torch.Tensor:
    """VICReg on ``[K, B, D]`` views (see ``vicreg_terms``)."""
    invariance, variance, covariance = vicreg_terms(views)
    return sim * invariance + var * variance + cov * covariance


def coding_rate(z: torch.Tensor, *, eps: float) -> torch.Tensor:
    """R(Z) = 1/2 logdet(I_D + D / (B eps) Z^T Z) for rows ``z`` ``[B, D]`` (EMP-SSL's convention for eps).

    Computed on the smaller of the two Gram matrices (Sylvester: logdet(I + c Z^T Z) = logdet(I + c Z Z^T))
    by a Cholesky factor without error checking, so the GPU never waits on the host: the matrix is
    I + a positive semi-definite one, its eigenvalues are >= 1.
    """
    b, d = z.shape
    z = z.float()
    gram = z @ z.T if b <= d else z.T @ z
    matrix = torch.eye(len(gram), device=z.device) + (d / (b * eps)) * gram
    factor, _ = torch.linalg.cholesky_ex(matrix)
    return torch.log(torch.diagonal(factor)).sum()


def tcr_terms(views: torch.Tensor, *, eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean coding rate of the views, mean cosine similarity of each view to the per-image mean view).

    As in EMP-SSL (Tong, Chen, Ma, LeCun 2023): projections are L2-normalised, the rate is computed per
    view over the batch, and invariance pulls each view towards the mean of the views of its image.
    """
    _check_views(views)
    z = F.normalize(views.float(), dim=-1)
    rate = torch.stack([coding_rate(zk, eps=eps) for zk in z]).mean()
    similarity = F.cosine_similarity(z, z.mean(dim=0, keepdim=True), dim=-1).mean()
    return rate, similarity


def tcr_loss(views: torch.Tensor, *, eps: float = 0.2, lam: float = 200.0) -> torch.Tensor:
    """Minimised objective ``-R(Z) - lam * cos(z_k, mean_k z_k)`` (maximise rate and invariance)."""
    rate, similarity = tcr_terms(views, eps=eps)
    return -rate - lam * similarity
