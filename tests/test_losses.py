"""The pretraining objectives against hand computations and direct formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_patchbench.pretrain.losses import coding_rate, tcr_loss, tcr_terms, vicreg_loss, vicreg_terms, vicreg_views


def _hand_vicreg(z1: list[list[float]], z2: list[list[float]]) -> float:
    """VICReg 25/25/1 with plain Python loops, written from the paper's definitions."""
    n, d = len(z1), len(z1[0])
    invariance = sum((a - b) ** 2 for r1, r2 in zip(z1, z2, strict=True) for a, b in zip(r1, r2, strict=True)) / (n * d)
    variance = covariance = 0.0
    for z in (z1, z2):
        means = [sum(row[j] for row in z) / n for j in range(d)]
        cov = [[sum((row[i] - means[i]) * (row[j] - means[j]) for row in z) / (n - 1) for j in range(d)]
               for i in range(d)]  # fmt: skip
        variance += sum(max(0.0, 1 - math.sqrt(cov[j][j] + 1e-4)) for j in range(d)) / d / 2
        covariance += sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return 25 * invariance + 25 * variance + covariance


_Z1 = [[1.0, 0.0, 0.5], [0.0, 2.0, -1.0], [0.3, 0.3, 0.3], [-1.0, 0.5, 2.0]]
_Z2 = [[0.5, 0.0, 1.0], [0.2, 1.0, -1.0], [0.0, 0.0, 0.3], [-1.5, 1.0, 2.5]]


def test_vicreg_matches_hand_computation():
    got = vicreg_loss(torch.tensor(_Z1), torch.tensor(_Z2))
    assert got.item() == pytest.approx(_hand_vicreg(_Z1, _Z2), rel=1e-5)


def test_solo_learns_vicreg_is_a_variance_weight_of_50():
    """solo-learn sums the variance hinge over the two branches where Bardes et al. average it: its 25/25/1 loss
    is ours at weights 25/50/1 (what ``--vicreg-weights 25,50,1`` selects)."""
    z1, z2 = torch.tensor(_Z1), torch.tensor(_Z2)
    variance = covariance = 0.0
    for z in (z1, z2):  # solo-learn's terms, each branch's added
        variance = variance + F.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()
        cov = torch.cov(z.T)
        covariance = covariance + (cov - torch.diag(cov.diagonal())).pow(2).sum() / z.shape[1]
    theirs = 25 * F.mse_loss(z1, z2) + 25 * variance + covariance
    assert vicreg_loss(z1, z2, var=50.0).item() == pytest.approx(theirs.item(), rel=1e-5)


def test_vicreg_variance_hinge_is_zero_above_unit_std():
    z = torch.randn(256, 8, generator=torch.Generator().manual_seed(0)) * 3
    _, variance, _ = vicreg_terms(torch.stack([z, z]))
    assert variance.item() == 0.0


def test_vicreg_multi_view_invariance_is_the_mean_pairwise_mse():
    views = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1))
    pairs = [F.mse_loss(views[i], views[j]) for i in range(4) for j in range(i + 1, 4)]
    invariance, _, _ = vicreg_terms(views)
    assert invariance.item() == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-5)


def test_vicreg_views_with_two_views_is_vicreg():
    z1, z2 = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(2))
    assert vicreg_views(torch.stack([z1, z2])).item() == pytest.approx(vicreg_loss(z1, z2).item(), rel=1e-6)


@pytest.mark.parametrize("b, d", [(8, 16), (16, 8)])
def test_coding_rate_is_half_logdet_of_the_feature_covariance(b, d):
    z = F.normalize(torch.randn(b, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64), dim=1)
    eps = 0.2
    direct = 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (b * eps) * z.T @ z)
    assert coding_rate(z.float(), eps=eps).item() == pytest.approx(direct.item(), rel=1e-4)


def test_tcr_loss_is_minus_rate_minus_lambda_cosine_to_the_mean():
    views = torch.randn(3, 10, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = F.normalize(views, dim=-1)
    rates = [0.5 * torch.logdet(torch.eye(6, dtype=torch.float64) + 6 / (10 * 0.2) * zk.T @ zk) for zk in z]
    mean = z.mean(dim=0)
    cosine = sum(F.cosine_similarity(zk, mean, dim=1).mean() for zk in z) / 3
    expected = -sum(rates) / 3 - 200 * cosine
    assert tcr_loss(views.float()).item() == pytest.approx(expected.item(), rel=1e-4)
    _, similarity = tcr_terms(views.float())
    assert similarity.item() == pytest.approx(cosine.item(), rel=1e-5)


def test_losses_reject_a_single_view():
    with pytest.raises(ValueError, match="K >= 2"):
        vicreg_views(torch.randn(1, 4, 3))
