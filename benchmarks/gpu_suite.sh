#!/usr/bin/env bash
# Every GPU benchmark of benchmarks/ in one go (extraction + baseline, kNN, 1 vs 2 GPU extraction, probe).
# Usage, from the repo root on a machine with 2 GPUs: benchmarks/gpu_suite.sh CIFAR_ROOT IMAGENETTE_ROOT OUT_DIR
set -uo pipefail
cifar=$1 imagenette=$2 out=$3
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
cd benchmarks
nvidia-smi -L
CUDA_VISIBLE_DEVICES=0 timeout 420 python extraction.py --cifar "$cifar" --imagenette "$imagenette" --workers 16 \
  | tee "$out/extraction.jsonl"
CUDA_VISIBLE_DEVICES=0 timeout 100 python knn.py | tee "$out/knn.jsonl"
for gpus in 1 2; do
  timeout 60 python -m torch.distributed.run --standalone --nproc-per-node $gpus distributed.py \
    --store "/tmp/pb-dist-$gpus" --images 4096 --patches 48 | tee -a "$out/distributed.jsonl"
done
CUDA_VISIBLE_DEVICES=0 timeout 150 python probe.py --imagenet | tee "$out/probe.jsonl"
