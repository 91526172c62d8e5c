#!/usr/bin/env bash
# The paper's Table 1 pattern on CIFAR-10 with ResNet-18 on one GPU (issue: `patchbench pretrain`):
# pretrain a standard VICReg model (RandomResizedCrop 0.08-1.0) and a patch-based I²VICReg model (fixed
# scale 0.2), then evaluate both on central / 1 / 16 / 256 patches at their pretraining scale (kNN + linear).
#
# Usage: benchmarks/pretrain_cifar10.sh DATA_ROOT OUT_DIR
#   DATA_ROOT holds cifar10/{train,test}; when missing it is made with materialize.py (../shared/data or .gpu/).
#   EPOCHS (default 40), BATCH (default 512) and RUNS (default "standard patch": which models) can be set in
#   the environment; PATCHBENCH_HOME defaults to
#   OUT_DIR/home, so the JPEGs are decoded once and shared by all four commands.
#   CPU dry run of the whole path (what the tests cannot reach): ARCH=tiny_cifar EPOCHS=1 BATCH=16 PATCHES=central,1,2
#   PRETRAIN_ARGS="--device cpu --train-per-class 4" EVAL_ARGS="--device cpu --train-per-class 4 --test-per-class 2"
# Prints: the device, one JSON line per pretraining (seconds_per_epoch, first_epoch_s, images_per_s, ...),
# one JSON line per representation per evaluation, and the wall times.
set -euo pipefail
data=$1 out=$2
epochs=${EPOCHS:-40} batch=${BATCH:-512} arch=${ARCH:-resnet18_cifar} patches=${PATCHES:-central,1,16,256}
read -r -a pretrain_args <<<"${PRETRAIN_ARGS:-}"
read -r -a eval_args <<<"${EVAL_ARGS:-}"
export PATCHBENCH_HOME=${PATCHBENCH_HOME:-$out/home}
mkdir -p "$out"
now() { date +%s.%N; }
start=$(now)

if [ ! -d "$data/cifar10/train" ]; then
  for m in "${MATERIALIZE:-}" ../shared/data/materialize.py .gpu/materialize.py .bench/materialize.py; do
    if [ -n "$m" ] && [ -f "$m" ]; then python "$m" cifar10 "$data"; break; fi
  done
fi
[ -d "$data/cifar10/train" ] || { echo "no $data/cifar10/train and no materialize.py found (set MATERIALIZE)" >&2; exit 2; }
python -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
  'torch', torch.__version__, 'cuda', torch.version.cuda)"

# name, --scale of pretraining (also the eval's --patch-scale)
runs=("standard 0.08,1.0" "patch 0.2")
for run in "${runs[@]}"; do
  read -r name scale <<<"$run"
  [[ " ${RUNS:-standard patch} " == *" $name "* ]] || continue
  t0=$(now)
  python -m ssl_patchbench pretrain --method vicreg --arch "$arch" --dataset cifar10 --data-dir "$data" \
    --scale "$scale" --epochs "$epochs" --batch-size "$batch" --out "$out/$name" --log-every 50 \
    ${pretrain_args[@]+"${pretrain_args[@]}"} | tee "$out/$name.pretrain.json"
  t1=$(now)
  python -m ssl_patchbench eval --model "$arch" --checkpoint "$out/$name/last.ckpt" --dataset cifar10 \
    --data-dir "$data" --patches "$patches" --patch-scale "$scale" --json ${eval_args[@]+"${eval_args[@]}"} \
    | tee "$out/$name.eval.jsonl"
  t2=$(now)
  python -c "print(f'wall $name: pretrain {$t1 - $t0:.1f} s, eval {$t2 - $t1:.1f} s')"
done
end=$(now)
python -c "print(f'wall total: {$end - $start:.1f} s ($epochs epochs per model, batch $batch)')"
