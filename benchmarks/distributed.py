"""Extraction throughput on 1..N GPUs of one node, sharded by store chunk exactly as `patchbench eval --nproc N`.

    python -m torch.distributed.run --standalone --nproc-per-node N benchmarks/distributed.py --store DIR

Every rank holds the same synthetic ImageNet-size images (seeded) and a random ResNet-50; rank 0 lays the
store out, each rank extracts its chunks, and rank 0 times the span between two barriers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import emit
from extraction import head, ours, random_model, synthetic

from ssl_patchbench.core.distributed import from_environment, shutdown
from ssl_patchbench.features.extract import ExtractSettings, extract
from ssl_patchbench.features.store import FeatureStore
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True, help="a folder every rank can write")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--patches", type=int, default=48)
    parser.add_argument("--chunk-rows", type=int, default=128)
    args = parser.parse_args()
    ranks = from_environment()
    device = torch.device("cuda", ranks.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    model = random_model("vicreg_rn50")
    pre = model.entry.preprocessing
    spec = PatchSpec(mode="random", n=args.patches, scale=model.entry.patch_scale, out_size=224, resize=pre.resize)
    split = synthetic(args.images)
    encoder = Encoder(model, "embedding")
    ours(encoder, head(split, 64), PatchSpec(mode="random", n=4, out_size=224, resize=pre.resize), device)  # warm-up
    store = FeatureStore(Path(args.store), f"dist-{ranks.world}")

    def writer():
        return store.writer(
            labels=split.labels, dim=model.embed_dim, dtype="float16", chunk_rows=args.chunk_rows, meta={}
        )

    opened = writer() if ranks.is_main else None
    ranks.barrier()
    opened = opened or writer()
    ranks.barrier()
    start = time.perf_counter()
    extract(encoder, split, spec, {Aggregation(): opened}, ExtractSettings(device, shard=(ranks.rank, ranks.world)))
    ranks.barrier()
    seconds = time.perf_counter() - start
    if ranks.is_main:
        done = len(np.load(store.path / "features.npy", mmap_mode="r"))
        emit(
            bench="distributed-extraction",
            gpus=ranks.world,
            model="resnet50 (random init)",
            input_px=224,
            images=done,
            patches_per_image=args.patches,
            seconds=round(seconds, 2),
            patches_per_s=round(done * args.patches / seconds),
        )
    shutdown()


if __name__ == "__main__":
    main()
