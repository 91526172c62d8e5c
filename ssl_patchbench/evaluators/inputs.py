"""What both evaluators accept: 2-D train/test features with one non-negative class label per row, and features
that can carry information at all (finite, not all zero, not one row repeated)."""

from __future__ import annotations

import torch

from ssl_patchbench.core.errors import UserError


def check_labelled_features(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None,
) -> int:
    """Refuse what cannot be a (features, labels) train and test pair; returns the number of classes."""
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise UserError(f"train and test features must be 2-D with one width, got {train.shape} and {test.shape}")
    if train.shape[0] == 0 or test.shape[0] == 0:
        raise UserError("train and test features must each have at least one row")
    if train_labels.shape != (train.shape[0],) or test_labels.shape != (test.shape[0],):
        raise UserError("labels must be 1-D with one label per feature row")
    if min(int(train_labels.min()), int(test_labels.min())) < 0:
        raise UserError("labels must be non-negative class indices")
    seen = int(max(train_labels.max(), test_labels.max())) + 1
    if num_classes is not None and num_classes < seen:
        raise UserError(f"num_classes={num_classes} but the labels go up to {seen - 1}")
    return seen if num_classes is None else num_classes


def check_usable_features(features: torch.Tensor, what: str) -> None:
    """Refuse features no evaluator can learn from, naming ``what`` and the likely cause.

    Non-finite values, all zeros, or every row identical (with two rows or more) give chance accuracy or NaN
    without any error downstream: a collapsed model, weights that did not load, or features lost to the store dtype.
    """
    if not bool(torch.isfinite(features).all()):
        raise UserError(
            f"{what} hold NaN or inf: the model's weights are broken or the forward overflowed "
            "(retry with --precision fp32 and --store-dtype float32; check the checkpoint)"
        )
    if not bool(features.any()):
        raise UserError(
            f"{what} are all zero: the model collapsed or its weights did not load (a dead ReLU stage, an integer "
            "checkpoint), or the values underflowed the store dtype (retry with --store-dtype float32)"
        )
    if len(features) > 1 and bool((features == features[:1]).all()):
        raise UserError(
            f"{what} are the same for every image: the model collapsed (a representation collapse in pretraining, "
            "or weights that ignore the input); check the checkpoint"
        )
