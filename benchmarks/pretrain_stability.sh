#!/usr/bin/env bash
# Issue 18's stability grid: `patchbench pretrain` (VICReg, ResNet-18 CIFAR stem, batch 512, default lr and
# warm-up, bf16) for each of EPOCHS_LIST at each of SCALES; right after each run whose scale is in KNN_SCALES and
# whose epochs are in KNN_EPOCHS, its central kNN@20. A run that diverges ends with `error: the loss became nan
# ...` and exit 2: the script goes on and prints `"diverged": true` for it. A run stopped by RUN_TIMEOUT (seconds;
# 0: none) prints `"timed_out": true` with the epochs it finished (its last checkpoint is still evaluated).
#
# Usage: benchmarks/pretrain_stability.sh DATA_ROOT OUT_DIR      (DATA_ROOT holds cifar10/{train,test})
#   EPOCHS_LIST (default "10 6 20"), SCALES (default "0.08,1 0.2"), KNN_EPOCHS (default "10"), KNN_SCALES (default
#   "0.08,1"), RUN_TIMEOUT (default 0), PRETRAIN_ARGS (e.g. "--compile cudagraphs").
# Prints one JSON line per run (the pretrain summary, or the error) and the eval's JSON lines.
set -uo pipefail
data=$1 out=$2
read -r -a pretrain_args <<<"${PRETRAIN_ARGS:-}"
export PATCHBENCH_HOME=${PATCHBENCH_HOME:-$out/home}
mkdir -p "$out"
for scale in ${SCALES:-0.08,1 0.2}; do
  for epochs in ${EPOCHS_LIST:-10 6 20}; do
    run="$out/vicreg_${scale/,/-}_${epochs}ep"
    timeout "${RUN_TIMEOUT:-0}" python -m ssl_patchbench pretrain --arch resnet18_cifar --dataset cifar10 \
      --data-dir "$data" --scale "$scale" --epochs "$epochs" --out "$run" --no-resume \
      ${pretrain_args[@]+"${pretrain_args[@]}"} >"$run.json" 2>"$run.log"
    code=$?
    if [ "$code" = 0 ]; then
      python -c "import json,sys; d=json.load(open(sys.argv[1])); d['diverged']=False; print(json.dumps(d))" "$run.json"
    elif [ "$code" = 124 ]; then
      python -c "import json,os,sys; m=[json.loads(l) for l in open(sys.argv[2])] if os.path.exists(sys.argv[2]) else []; print(json.dumps({'run': sys.argv[1], 'timed_out': True, 'epochs': int(sys.argv[3]), 'epochs_done': len(m), 'last_loss': m[-1]['loss'] if m else None, 'diverged': False}))" "$run" "$run/metrics.jsonl" "$epochs"
    else
      python -c "import json,sys; print(json.dumps({'run': sys.argv[1], 'diverged': True, 'error': open(sys.argv[2]).read().strip().splitlines()[-1]}))" "$run" "$run.log"
    fi
    if [[ " ${KNN_SCALES:-0.08,1} " == *" $scale "* ]] && [[ " ${KNN_EPOCHS:-10} " == *" $epochs "* ]] &&
      [ -f "$run/last.ckpt" ]; then
      python -m ssl_patchbench eval --model resnet18_cifar --checkpoint "$run/last.ckpt" --dataset cifar10 \
        --data-dir "$data" --patches central --eval knn --json
    fi
  done
done
exit 0
