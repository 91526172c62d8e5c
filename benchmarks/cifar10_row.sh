#!/usr/bin/env bash
# Issue 13: the CIFAR-10 Table-1 row (central, 1, 16, 256; kNN and linear) in one `eval`, then a rerun of
# central on the complete stores (the per-call overhead), wall seconds of each as JSON lines.
# Usage: benchmarks/cifar10_row.sh CHECKPOINT DATA_ROOT WORK_DIR
#   DATA_ROOT holds cifar10/{train,test} (python ../shared/data/materialize.py cifar10 DATA_ROOT).
set -euo pipefail
ckpt=$1 data=$2 work=$3
common=(--model resnet18_cifar --checkpoint "$ckpt" --dataset cifar10 --data-dir "$data" --home "$work" --json)
timed() {  # NAME ARGS...: run `patchbench eval ARGS` and print its rows and one line with its wall seconds
  local name=$1 start end
  shift
  start=$(date +%s.%N)
  python -m ssl_patchbench eval "${common[@]}" "$@"
  end=$(date +%s.%N)
  python -c "import json, torch; print(json.dumps({'measurement': 'cifar10_eval', 'run': '$name', \
'wall_seconds': round($end - $start, 1), 'gpu': torch.cuda.get_device_name(0), 'date': '$(date -u +%F)', \
'command': 'patchbench eval $*'}))"
}
timed "table-1 row" --patches central,1,16,256
timed "central rerun (stores complete)" --patches central
