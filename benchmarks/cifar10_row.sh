#!/usr/bin/env bash
# Issue 13: CIFAR-10 evaluations in one `eval` each, wall seconds of each as JSON lines (after its rows).
# Usage: benchmarks/cifar10_row.sh CHECKPOINT DATA_ROOT WORK_DIR [row|superset|separate]
#   row (default): the Table-1 row (central, 1, 16, 256; kNN and linear), then a rerun of central on the complete
#     stores (the per-call overhead); cache WORK_DIR.
#   superset: that row + the 25 sliding 16 px windows at stride 4 (mean and gridpool) + central in the projection
#     space, in ONE call, on a fresh cache (WORK_DIR/superset).
#   separate: the same seven records as the three calls they took before (random counts, --mode sliding,
#     --space projection), on another fresh cache (WORK_DIR/separate): the side-by-side baseline of superset.
#   DATA_ROOT holds cifar10/{train,test} (python ../shared/data/materialize.py cifar10 DATA_ROOT).
set -euo pipefail
ckpt=$1 data=$2 work=$3 what=${4:-row}
# start every eval as on a usual install, with its modules' bytecode cached (benchmarks/common.py: cache_bytecode)
python -c "import sys; sys.path.insert(0, sys.argv[1]); from common import cache_bytecode; cache_bytecode(sys.argv[2])" \
  "$(dirname "$0")" "$work/pycache"
export PYTHONPYCACHEPREFIX=$work/pycache
unset PYTHONDONTWRITEBYTECODE
timed() {  # HOME NAME ARGS...: run `patchbench eval ARGS` and print its rows and one line with its wall seconds
  local home=$1 name=$2 start end
  shift 2
  start=$(date +%s.%N)
  python -m ssl_patchbench eval --model resnet18_cifar --checkpoint "$ckpt" --dataset cifar10 --data-dir "$data" \
    --home "$home" --json "$@"
  end=$(date +%s.%N)
  python -c "import json, torch; print(json.dumps({'measurement': 'cifar10_eval', 'run': '$name', \
'wall_seconds': round($end - $start, 1), 'gpu': torch.cuda.get_device_name(0), 'date': '$(date -u +%F)', \
'child_bytecode': 'cached', 'command': 'patchbench eval $*'}))"
}
windows=(--patch-size 16 --stride 4 --aggregate mean,gridpool)
case $what in
  row)
    timed "$work" "table-1 row" --patches central,1,16,256
    timed "$work" "central rerun (stores complete)" --patches central
    ;;
  superset)
    timed "$work/superset" "superset, one call" --patches central,1,16,256,sliding "${windows[@]}" \
      --space embedding,projection:central
    ;;
  separate)
    timed "$work/separate" "superset 1/3: table-1 row" --patches central,1,16,256
    timed "$work/separate" "superset 2/3: sliding" --mode sliding --patches all "${windows[@]}"
    timed "$work/separate" "superset 3/3: central projection" --patches central --space projection
    ;;
  *)
    echo "error: unknown run '$what': choose row, superset or separate" >&2
    exit 2
    ;;
esac
