"""Device choice, shared by extraction, evaluation and pretraining."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}: choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """Turn TF32 off while inside: its 10-bit mantissa would reorder near-ties and make GPUs disagree."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
