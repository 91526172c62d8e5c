#!/usr/bin/env bash
# Issue 18 in one GPU call: the speed comparison, then (concurrently, on the one GPU) a 10-epoch run at scale
# 0.08,1 and the two 100-epoch runs, each followed by its central kNN.
#
# Usage: benchmarks/pretrain_gpu_run.sh DATA_ROOT OUT_DIR [BUDGET_S]     (run from the repository root)
#   1. `benchmarks/pretrain_speed.py --epochs 3 --modes reference,eager,compiled,cudagraphs` (OUT/speed.jsonl);
#   2. the fastest mode that ran and whose epoch losses agree with eager's (within 2%) is used for every run;
#   3. three background `pretrain_stability.sh` calls: 10 epochs at 0.08,1, 100 epochs at 0.08,1 and at 0.2.
#      Their s/epoch is not a speed number: they share the GPU. RUN_TIMEOUT stops them so that the whole script ends within BUDGET_S (default 540 s) of its
#      start; a stopped run reports the epochs it finished and its last checkpoint is evaluated.
# Under OUT_DIR: speed.jsonl, runs.jsonl (summaries + evals), metrics.jsonl (every epoch), the logs' tails.
set -uo pipefail
data=$1 out=$2 budget=${3:-540}
start=$(date +%s)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/device.txt" 2>&1
timeout $((budget / 2)) python benchmarks/pretrain_speed.py --data "$data" --epochs 3 \
  --modes reference,eager,compiled,cudagraphs >"$out/speed.jsonl" 2>"$out/speed.log"
mode=$(python - "$out/speed.jsonl" <<'PY'
import json, sys
rows = {r["mode"]: r for r in map(json.loads, open(sys.argv[1])) if "seconds_per_epoch" in r}
eager = rows.get("eager", {}).get("epoch_losses")
flag = {"eager": "off", "compiled": "on", "cudagraphs": "cudagraphs"}
ok = [m for m in flag if m in rows and (eager is None or all(
    abs(a - b) <= 0.02 * abs(b) for a, b in zip(rows[m]["epoch_losses"], eager)))]
print(flag[min(ok, key=lambda m: rows[m]["seconds_per_epoch"])] if ok else "off")
PY
)
echo "{\"chosen_compile\": \"$mode\", \"after_speed_s\": $(($(date +%s) - start))}" >"$out/runs.jsonl"
left=$((start + budget - $(date +%s) - 40)) # 40 s for the last evals
left=$((left > 60 ? left : 60))
run() { # NAME SCALE EPOCHS
  SCALES=$2 EPOCHS_LIST=$3 KNN_SCALES=$2 KNN_EPOCHS=$3 RUN_TIMEOUT=$left PRETRAIN_ARGS="--compile $mode" \
    PATCHBENCH_HOME="/tmp/home_$1" benchmarks/pretrain_stability.sh "$data" "/tmp/stab_$1" >"/tmp/$1.jsonl" 2>"/tmp/$1.err"
}
run scale008_10 0.08,1 10 &
run scale008_100 0.08,1 100 &
run scale02_100 0.2 100 &
wait
for name in scale008_10 scale008_100 scale02_100; do
  grep '^{' "/tmp/$name.jsonl" | sed "s/^{/{\"name\": \"$name\", /" >>"$out/runs.jsonl"
  for metrics in /tmp/stab_"$name"/*/metrics.jsonl; do
    sed "s/^{/{\"name\": \"$name\", /" "$metrics" >>"$out/metrics.jsonl"
  done
  tail -n 3 /tmp/stab_"$name"/*.log >>"$out/progress_tail.log" 2>/dev/null
  { echo "== $name"; tail -n 40 "/tmp/$name.err"; } >>"$out/runs.err"
done
echo "{\"total_s\": $(($(date +%s) - start))}" >>"$out/runs.jsonl"
