"""Where one ``patchbench eval`` spends its time: the command run in this process under cProfile (the main
thread: Python functions by their own time, which is where a pass that is neither decode- nor model-bound
waits) and the PyTorch profiler (GPU kernels by their total time).

    python benchmarks/profile_eval.py [--top 30] -- eval --model ... --patches 16 ...

One JSON line: wall seconds, the top host functions by own and by cumulative time, the top GPU kernels and
the GPU's busy share of the wall time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch
from common import emit, kernel_profile

from ssl_patchbench.cli.main import cli


def host_profile(profile: cProfile.Profile, top: int) -> dict[str, list]:
    stats = pstats.Stats(profile).stats  # (file, line, function) -> (calls, primitive, own, cumulative, callers)

    def name(key: tuple) -> str:
        return f"{Path(key[0]).name}:{key[1]}:{key[2]}"

    def ranked(column: int) -> list:
        rows = sorted(stats.items(), key=lambda item: item[1][column], reverse=True)[:top]
        return [[name(key), value[0], round(value[column], 3)] for key, value in rows]

    return {"own_seconds": ranked(2), "cumulative_seconds": ranked(3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the patchbench arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    host = cProfile.Profile()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as device:
        host.enable()
        try:
            cli.main(command, standalone_mode=False)
        finally:
            host.disable()
    wall = time.perf_counter() - start
    kernel_s, kernels = kernel_profile(device, top=args.top)
    emit(
        bench="profile_eval",
        command=" ".join(command),
        wall_seconds=round(wall, 2),
        gpu_kernel_seconds=round(kernel_s, 2),
        gpu_busy=round(kernel_s / wall, 3),
        top_kernels_ms=kernels,
        **host_profile(host, args.top),
    )


if __name__ == "__main__":
    main()
