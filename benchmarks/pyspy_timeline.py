"""Where a command's main thread spends each second: a py-spy speedscope recording as a timeline.

    py-spy record -r 100 --idle -f speedscope -o OUT.json -- python -m ssl_patchbench eval ...
    python benchmarks/pyspy_timeline.py OUT.json [--rate 100] [--bin 1]

Per bin, the two most frequent stacks of the busiest thread, each named by its innermost package frame, its
innermost torch or torchvision frame and its innermost frame. ``--idle`` recordings sample every tick, so a
bin's seconds add up to its width (py-spy's sampling errors aside).
"""

from __future__ import annotations

import argparse
import collections
import json


def _label(stack: list[int], frames: list[dict]) -> str:
    named = [frames[i] for i in stack]
    if not named:
        return "(no stack)"
    ours = [f for f in named if "ssl_patchbench" in f["file"]]
    libraries = ("site-packages/torch/", "site-packages/torchvision/")
    torch_frames = [f for f in named if any(lib in f["file"] for lib in libraries)]
    package = f"{ours[-1]['name']}:{ours[-1]['line']}" if ours else named[0]["name"]
    library = ""
    if torch_frames:
        library = f"{torch_frames[-1]['file'].split('site-packages/')[-1]}:{torch_frames[-1]['name']}"
    return f"{package} | {library} | {named[-1]['name']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recording")
    parser.add_argument("--rate", type=float, default=100.0, help="py-spy's samples per second")
    parser.add_argument("--bin", type=float, default=1.0, help="seconds per line")
    args = parser.parse_args()
    with open(args.recording) as f:
        data = json.load(f)
    frames = data["shared"]["frames"]
    busiest = max(data["profiles"], key=lambda p: len(p["samples"]))
    bins: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for i, stack in enumerate(busiest["samples"]):
        bins[int(i / args.rate / args.bin)][_label(stack, frames)] += 1
    for b in sorted(bins):
        top = " || ".join(f"{n / args.rate:.1f} s {label}" for label, n in bins[b].most_common(2))
        print(f"{b * args.bin:6.1f} s  {top}")


if __name__ == "__main__":
    main()
