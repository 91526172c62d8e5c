#!/usr/bin/env bash
# Issue 18's stability grid: `patchbench pretrain` (VICReg, ResNet-18 CIFAR stem, batch 512, default lr and
# warm-up, bf16) for each of EPOCHS_LIST at each of SCALES; right after the KNN_EPOCHS run at scale 0.08,1,
# its central kNN@20. A run that diverges ends with `error: the loss became nan ...` and exit 2: the script goes on
# and prints `"diverged": true` for it.
#
# Usage: benchmarks/pretrain_stability.sh DATA_ROOT OUT_DIR      (DATA_ROOT holds cifar10/{train,test})
#   EPOCHS_LIST (default "10 6 20"), SCALES (default "0.08,1 0.2"), KNN_EPOCHS (default 10), PRETRAIN_ARGS.
# Prints one JSON line per run (the pretrain summary, or the error) and the eval's JSON lines.
set -uo pipefail
data=$1 out=$2
read -r -a pretrain_args <<<"${PRETRAIN_ARGS:-}"
export PATCHBENCH_HOME=${PATCHBENCH_HOME:-$out/home}
mkdir -p "$out"
for scale in ${SCALES:-0.08,1 0.2}; do
  for epochs in ${EPOCHS_LIST:-10 6 20}; do
    run="$out/vicreg_${scale/,/-}_${epochs}ep"
    if python -m ssl_patchbench pretrain --arch resnet18_cifar --dataset cifar10 --data-dir "$data" --scale "$scale" \
      --epochs "$epochs" --out "$run" --no-resume ${pretrain_args[@]+"${pretrain_args[@]}"} >"$run.json" 2>"$run.log"; then
      python -c "import json,sys; d=json.load(open(sys.argv[1])); d['diverged']=False; print(json.dumps(d))" "$run.json"
    else
      python -c "import json,sys; print(json.dumps({'run': sys.argv[1], 'diverged': True, 'error': open(sys.argv[2]).read().strip().splitlines()[-1]}))" "$run" "$run.log"
    fi
    if [ "$scale" = 0.08,1 ] && [ "$epochs" = "${KNN_EPOCHS:-10}" ] && [ -f "$run/last.ckpt" ]; then
      python -m ssl_patchbench eval --model resnet18_cifar --checkpoint "$run/last.ckpt" --dataset cifar10 \
        --data-dir "$data" --patches central --eval knn --json
    fi
  done
done
exit 0
