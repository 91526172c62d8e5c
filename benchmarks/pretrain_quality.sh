#!/usr/bin/env bash
# Issue 18's quality side by side: for each seed, a 10-epoch `patchbench pretrain` (defaults: VICReg, ResNet-18
# CIFAR stem, batch 512, scale 0.08,1, bf16, --compile auto) and the independent eager reference
# (`pretrain_speed.py --modes reference`: tests/vicreg_reference.py's LARS and loss, the same views and schedule),
# each followed by its central kNN@20 through `patchbench eval`. PARALLEL runs share the GPU at a time (their
# seconds are not speed numbers).
#
# Usage: benchmarks/pretrain_quality.sh DATA_ROOT OUT_DIR     (run from the repository root)
#   SEEDS (default "0 1 2 3 4"), TRAINERS (default "patchbench reference"), EPOCHS (default 10), PARALLEL (default 1: four at a time made each about 4x slower
#   on one H200, run 8, so they gain nothing and risk a time limit), PRETRAIN_ARGS (extra `patchbench pretrain`
#   options, e.g. "--vicreg-weights 25,50,1 --compile cudagraphs"; echoed as "args").
# Prints one JSON line per trained model: {"trainer": "patchbench"|"reference", "args", "seed", "epochs", "knn@20", "knn@200"}.
set -uo pipefail
data=$1 out=$2
epochs=${EPOCHS:-10}
export PATCHBENCH_HOME=${PATCHBENCH_HOME:-$out/home}
mkdir -p "$out"
knn() { # TRAINER SEED CHECKPOINT
  python -m ssl_patchbench eval --model resnet18_cifar --checkpoint "$3" --dataset cifar10 --data-dir "$data" \
    --patches central --eval knn --json 2>>"$out/eval.err" |
    python -c "import json,sys; r=[json.loads(l) for l in sys.stdin]; print(json.dumps({'trainer': sys.argv[1], 'args': sys.argv[4], 'seed': int(sys.argv[2]), 'epochs': int(sys.argv[3]), 'knn@20': r[0]['knn@20'], 'knn@200': r[0]['knn@200']}))" "$1" "$2" "$epochs" "${PRETRAIN_ARGS:-}"
}
train() { # TRAINER SEED
  local dir="$out/$1_seed$2"
  mkdir -p "$dir"
  if [ "$1" = patchbench ]; then
    python -m ssl_patchbench pretrain --arch resnet18_cifar --dataset cifar10 --data-dir "$data" --scale 0.08,1 \
      --epochs "$epochs" --seed "$2" --out "$dir" --no-resume ${PRETRAIN_ARGS:-} >"$dir/summary.json" 2>"$dir/log" && knn "$1" "$2" "$dir/last.ckpt"
  else
    python benchmarks/pretrain_speed.py --data "$data" --modes reference --epochs "$epochs" --schedule-epochs "$epochs" \
      --seed "$2" --save "$dir/last.ckpt" >"$dir/summary.json" 2>"$dir/log" && knn "$1" "$2" "$dir/last.ckpt"
  fi
  [ -f "$dir/last.ckpt" ] || echo "{\"trainer\": \"$1\", \"seed\": $2, \"error\": \"$(tail -1 "$dir/log" | tr -d '"\\')\"}"
}
jobs_running() { jobs -rp | wc -l; }
for seed in ${SEEDS:-0 1 2 3 4}; do
  for trainer in ${TRAINERS:-patchbench reference}; do
    while [ "$(jobs_running)" -ge "${PARALLEL:-1}" ]; do sleep 1; done
    train "$trainer" "$seed" &
  done
done
wait
