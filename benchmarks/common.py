"""What every benchmark script shares: one JSON line per measurement, stamped with the machine and command."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

H100_BF16_DENSE_FLOPS = 989.4e12  # H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet)
PEAK_BF16_FLOPS = {"H100": H100_BF16_DENSE_FLOPS, "H200": H100_BF16_DENSE_FLOPS}  # same chip, faster memory


def machine() -> dict[str, Any]:
    """Device, versions and the command line: every JSON line carries them."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        # whether the fresh processes a benchmark starts find their modules' bytecode cached (a normal install:
        # pip writes it) or compile every module's source again (PYTHONDONTWRITEBYTECODE, as on the GPU machine)
        "child_bytecode": "recompiled" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "cached",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
    }


def peak_flops() -> float | None:
    """Dense bf16 peak of the visible GPU, when known (for MFU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def emit(**fields: Any) -> None:
    """Print one measurement as one JSON line."""
    print(json.dumps({**fields, **machine()}, default=str), flush=True)


def timed(fn: Callable[[], Any], *, device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` once and return its result and wall seconds, the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def cache_bytecode(folder: str | os.PathLike) -> None:
    """Let the processes this benchmark starts cache their compiled bytecode under ``folder``, as on a usual
    install. A machine that sets PYTHONDONTWRITEBYTECODE over packages installed without bytecode makes every
    ``eval`` compile its imports again: 5.9 s of 1,677 modules on run 6's H200, which a user's start-up does
    not pay. One process here imports what an eval imports, so the first measured one is warm too."""
    os.environ["PYTHONPYCACHEPREFIX"] = os.fspath(folder)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    modules = "ssl_patchbench.cli.main, ssl_patchbench.pipeline.evaluate, torchvision, timm, torch._inductor.compile_fx"
    subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)


def kernel_profile(profile: torch.profiler.profile, top: int = 10) -> tuple[float, dict[str, float]]:
    """Seconds of GPU kernel time in a profile, and the ``top`` kernels' milliseconds (names cut to 70
    characters; kernels whose cut names coincide are summed)."""
    per_name: dict[str, float] = {}
    for event in profile.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:  # CPU operators' device time is their kernels'
            continue
        name = event.key[:70]
        per_name[name] = per_name.get(name, 0.0) + event.self_device_time_total / 1e3
    ranked = sorted(per_name.items(), key=lambda item: item[1], reverse=True)[:top]
    return sum(per_name.values()) / 1e3, {name: round(ms, 1) for name, ms in ranked}
