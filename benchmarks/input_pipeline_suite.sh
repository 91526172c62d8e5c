#!/usr/bin/env bash
# The GPU measurements issues 13 and 14 still owe, for one H200 `run` call each (about 9 minutes apiece), from the
# repo root; DATA holds the materialised CIFAR-10 (python data/materialize.py cifar10 DATA: copy it and
# cifar10_jpeg.npz into a git-ignored folder that travels with the call) and CKPT the shared VICReg ResNet-18.
#   benchmarks/input_pipeline_suite.sh imagenet OUT        # ImageNet-like folder: ceilings, eval rates, nvJPEG phases
#   benchmarks/input_pipeline_suite.sh cifar OUT CKPT DATA # the CIFAR-10 row, its cached rerun, the superset
#   (cifar10_row.sh ... separate times the superset's three old calls, for comparison)
# Every line is JSON with the device and the command; OUT gets one .jsonl per script.
set -uo pipefail
what=$1 out=$2
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
case $what in
  imagenet)
    (cd benchmarks && timeout 330 python imagenet_like.py --root /tmp/bench --train 10000 --val 1000 --skip \
      "user_baseline,central cpu,central+16+48,eval_decoder,nvjpeg_vs_pil,bf16_noise,model_only,model_only_channels_last,file_reads") \
      | tee "$out/imagenet_like.jsonl"
    for images in 4096 12288; do  # 12,288 (6.9 GB, still moved to the GPU once): the last chunk weighs a third
      (cd benchmarks && timeout 110 python vit.py --images $images --modes compiled) | tee -a "$out/vit.jsonl"
    done
    ;;
  cifar)
    ckpt=$3 data=$4
    timeout 200 benchmarks/cifar10_row.sh "$ckpt" "$data" /tmp/c10 row | tee "$out/cifar10_row.jsonl"
    timeout 150 benchmarks/cifar10_row.sh "$ckpt" "$data" /tmp/c10 superset | tee -a "$out/cifar10_row.jsonl"
    ;;
  *) echo "usage: $0 imagenet|cifar OUT [CKPT DATA]" >&2; exit 2 ;;
esac
