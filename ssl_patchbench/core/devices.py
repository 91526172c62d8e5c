"""Device choice, shared by extraction, evaluation and pretraining."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ssl_patchbench.core.errors import UserError


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
def exact_fp32() -> Iterator[None]:
    """IEEE float32 matmuls and convolutions while inside, restored after: TF32's 10-bit mantissa would reorder
    near-ties and make GPUs disagree with CPUs (the one place patchbench touches these global flags)."""
    matmul, cudnn = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
