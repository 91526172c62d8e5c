#!/usr/bin/env bash
# The full CIFAR-10 evaluation of one checkpoint on a GPU (issue: `patchbench eval` end to end).
# Usage: benchmarks/gpu_eval_cifar10.sh CHECKPOINT DATA_ROOT OUT_DIR
#   DATA_ROOT holds cifar10/{train,test} (python ../shared/data/materialize.py cifar10 DATA_ROOT).
set -euo pipefail
ckpt=$1 data=$2 out=$3
mkdir -p "$out"
common=(--model resnet18_cifar --checkpoint "$ckpt" --dataset cifar10 --data-dir "$data" --json)
python -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'cuda', torch.version.cuda)"
start=$(date +%s.%N)
python -m ssl_patchbench eval "${common[@]}" --patches central,1,16,256 | tee "$out/random.jsonl"
mid=$(date +%s.%N)
python -m ssl_patchbench eval "${common[@]}" --mode sliding --patch-size 16 --stride 4 --patches 25 \
  --aggregate mean,gridpool | tee "$out/sliding.jsonl"
end=$(date +%s.%N)
python -c "print(f'wall: random {${mid}-${start}:.1f} s, sliding {${end}-${mid}:.1f} s, total {${end}-${start}:.1f} s')"
