"""kNN evaluator against a plain brute-force reference, scikit-learn and faiss."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.evaluators.knn import knn_classify, knn_search, knn_vote


def clustered(n: int, num_classes: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy Gaussian clusters (overlapping, so accuracy is neither 0 nor 100) with continuous values."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, size=n)
    feats = centers[labels] + 1.5 * rng.normal(size=(n, dim))
    return torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(labels)


def reference_knn(train, train_labels, test, test_labels, k, temperature, num_classes, weighted):
    """Brute force in float64 with explicit loops: (top1 %, top5 %)."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    top1 = top5 = 0
    for i in range(len(test)):
        sims = np.array([float(np.dot(test[i], train[j])) for j in range(len(train))])
        scores = np.zeros(num_classes)
        for j in np.argsort(-sims, kind="stable")[:k]:
            scores[int(train_labels[j])] += math.exp(sims[j] / temperature) if weighted else 1.0
        ranked = np.argsort(-scores, kind="stable")[:5]
        top1 += int(ranked[0] == test_labels[i])
        top5 += int(test_labels[i] in ranked)
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


@pytest.mark.parametrize("n_test", [1, 7, 99, 250])
@pytest.mark.parametrize("n_train", [150, 400])
def test_weighted_matches_brute_force(n_test, n_train):
    train, train_labels = clustered(n_train, 10, seed=1)
    test, test_labels = clustered(n_test, 10, seed=2)
    ks = (1, 5, 20, 200)
    got = knn_classify(train, train_labels, test, test_labels, ks=ks, device="cpu")
    assert set(got) == set(ks)
    for k in ks:
        top1, top5 = reference_knn(train, train_labels, test, test_labels, k, 0.07, 10, weighted=True)
        assert got[k].k == min(k, n_train)
        assert got[k].top1 == pytest.approx(top1)
        assert got[k].top5 == pytest.approx(top5)


@pytest.mark.parametrize("k", [1, 5, 21])
def test_unweighted_matches_sklearn(k):
    train, train_labels = clustered(300, 2, seed=3)  # two classes and odd k: no vote ties
    test, test_labels = clustered(120, 2, seed=4)
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="uniform", algorithm="brute")
    expected = sk.fit(train.numpy(), train_labels.numpy()).predict(test.numpy())

    sims, idx = knn_search(train, test, k, device="cpu")
    predicted = knn_vote(sims, train_labels[idx], 2, weighted=False).argmax(dim=1)
    np.testing.assert_array_equal(predicted.numpy(), expected)

    got = knn_classify(train, train_labels, test, test_labels, ks=(k,), weighted=False, device="cpu")[k]
    assert got.top1 == pytest.approx(100.0 * np.mean(expected == test_labels.numpy()))
    assert got.top5 is None


def test_faiss_backend_equals_torch():
    pytest.importorskip("faiss")
    from ssl_patchbench.evaluators.knn import faiss_search

    train, train_labels = clustered(500, 10, seed=5)
    test, test_labels = clustered(80, 10, seed=6)
    sims_t, idx_t = knn_search(train, test, 50, device="cpu")
    sims_f, idx_f = faiss_search(train, test, 50)
    torch.testing.assert_close(idx_f.long(), idx_t)
    torch.testing.assert_close(sims_f, sims_t, atol=1e-5, rtol=0)
    by_torch = knn_classify(train, train_labels, test, test_labels, backend="torch", device="cpu")
    by_faiss = knn_classify(train, train_labels, test, test_labels, backend="faiss", device="cpu")
    assert by_faiss == by_torch


def test_tiling_does_not_change_results():
    train, train_labels = clustered(230, 10, seed=7)
    test, test_labels = clustered(97, 10, seed=8)
    tiny = 4 * 16 * 13  # 13 bank rows a block, 16 test rows a tile, 16 rows a vote chunk
    sims_a, idx_a = knn_search(train, test, 40, device="cpu")
    sims_b, idx_b = knn_search(train, test, 40, device="cpu", tile_bytes=tiny)
    torch.testing.assert_close(idx_b, idx_a)
    torch.testing.assert_close(sims_b, sims_a)
    whole = knn_classify(train, train_labels, test, test_labels, ks=(1, 20, 200), device="cpu")
    tiled = knn_classify(train, train_labels, test, test_labels, ks=(1, 20, 200), device="cpu", tile_bytes=tiny)
    assert tiled == whole


def test_float16_inputs_match_float32():
    train, train_labels = clustered(200, 10, seed=9)
    test, test_labels = clustered(50, 10, seed=10)
    train, test = train.half(), test.half()
    got = knn_classify(train, train_labels, test, test_labels, device="cpu")
    assert got == knn_classify(train.float(), train_labels, test.float(), test_labels, device="cpu")


@pytest.mark.parametrize(("num_classes", "has_top5"), [(2, False), (5, False), (6, True)])
def test_top5_only_above_five_classes(num_classes, has_top5):
    train, train_labels = clustered(100, num_classes, seed=11)
    test, test_labels = clustered(20, num_classes, seed=12)
    got = knn_classify(train, train_labels, test, test_labels, ks=(10,), num_classes=num_classes, device="cpu")
    assert (got[10].top5 is not None) == has_top5


def test_hand_computed_three_point_vote():
    # test point along x; bank: one class-0 point at cos 0.9, two class-1 points at cos 0.8
    test = torch.tensor([[1.0, 0.0]])
    train = torch.tensor([[0.9, math.sqrt(1 - 0.81)], [0.8, 0.6], [0.8, -0.6]])
    train_labels, test_labels = torch.tensor([0, 1, 1]), torch.tensor([0])
    # T=0.07: exp(0.9/0.07) = 3.85e5 > 2 exp(0.8/0.07) = 1.85e5, so class 0 wins
    sims, idx = knn_search(train, test, 3, device="cpu")
    torch.testing.assert_close(sims, torch.tensor([[0.9, 0.8, 0.8]]))
    scores = knn_vote(sims, train_labels[idx], 2, temperature=0.07)
    hand = torch.tensor([[math.exp(0.9 / 0.07), 2 * math.exp(0.8 / 0.07)]]) / math.exp(0.9 / 0.07)
    torch.testing.assert_close(scores, hand)
    assert knn_classify(train, train_labels, test, test_labels, ks=(3,), device="cpu")[3].top1 == 100.0
    # T=1: exp(0.9) = 2.46 < 2 exp(0.8) = 4.45, and unweighted 1 < 2: class 1 wins
    assert knn_classify(train, train_labels, test, test_labels, ks=(3,), temperature=1.0, device="cpu")[3].top1 == 0
    assert knn_classify(train, train_labels, test, test_labels, ks=(3,), weighted=False, device="cpu")[3].top1 == 0


def test_small_temperature_does_not_overflow():
    # exp(1 / 1e-4) overflows even float64; as T -> 0 the vote becomes 1-NN
    train, train_labels = clustered(100, 10, seed=13)
    test, test_labels = clustered(30, 10, seed=14)
    got = knn_classify(train, train_labels, test, test_labels, ks=(20,), temperature=1e-4, device="cpu")
    top1, _ = reference_knn(train, train_labels, test, test_labels, 1, 0.07, 10, weighted=True)
    assert got[20].top1 == pytest.approx(top1)


def test_errors_are_user_errors(monkeypatch):
    train, train_labels = clustered(20, 3)
    with pytest.raises(UserError, match="backend"):
        knn_classify(train, train_labels, train, train_labels, backend="annoy", device="cpu")
    with pytest.raises(UserError, match="width"):
        knn_classify(train, train_labels, train[:, :5], train_labels, device="cpu")
    with pytest.raises(UserError, match="NaN"):
        knn_classify(train, train_labels, train * torch.nan, train_labels, device="cpu")
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(UserError, match="faiss-cpu"):
        knn_classify(train, train_labels, train, train_labels, backend="faiss", device="cpu")
