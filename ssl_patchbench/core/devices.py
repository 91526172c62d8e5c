"""Device choice and CPU thread counts, shared by extraction, evaluation and pretraining."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ssl_patchbench.core.errors import UserError

log = logging.getLogger(__name__)
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


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


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (taskset, SLURM, containers), capped by a cgroup v2
    CPU quota; ``os.cpu_count()`` counts the whole host, which oversubscribes a shared or limited machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    """Whole cores allowed by ``cpu.max`` (``"200000 100000"`` -> 2), None when unlimited or unknown."""
    try:
        limit, period = CGROUP_CPU_MAX.read_text().split()[:2]
        return None if limit == "max" else max(1, int(limit) // int(period))
    except (OSError, ValueError):
        return None


def use_available_cores() -> int:
    """Size torch's intra-op (OpenMP) pool to the cores available, for a CPU run; a user's ``OMP_NUM_THREADS``
    wins. OpenMP runtimes loaded later (faiss) and child processes see the same count. Returns the thread count."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = available_cores()
    if torch.get_num_threads() != cores:
        log.debug("torch threads: %d -> %d (available cores)", torch.get_num_threads(), cores)
        torch.set_num_threads(cores)
    os.environ["OMP_NUM_THREADS"] = str(cores)
    return cores
