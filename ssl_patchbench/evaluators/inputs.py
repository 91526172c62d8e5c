"""What both evaluators accept: 2-D train/test features with one non-negative class label per row."""

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
