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
timed() {  # HOME NAME ARGS...: run `patchbench eval ARGS`; print its rows, one line with its wall seconds and one
  # with where that time went (each record's kNN and probe seconds, each pass's seconds and first forward); its
  # info log goes to stderr, every line prefixed with the seconds since the command started
  local home=$1 name=$2 start end before
  shift 2
  before=0
  if [[ -f $home/results.jsonl ]]; then before=$(wc -l <"$home/results.jsonl"); fi
  start=$(date +%s.%N)
  python -m ssl_patchbench -v eval --model resnet18_cifar --checkpoint "$ckpt" --dataset cifar10 --data-dir "$data" \
    --home "$home" --json "$@" 2> >(python -u -c "import sys, time
for line in sys.stdin: print(f'{time.time() - $start:7.2f} {line}', end='', file=sys.stderr)")
  end=$(date +%s.%N)
  python -c "import json, torch; print(json.dumps({'measurement': 'cifar10_eval', 'run': '$name', \
'wall_seconds': round($end - $start, 1), 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none', 'date': '$(date -u +%F)', \
'child_bytecode': 'cached', 'command': 'patchbench eval $*'}))"
  python - "$home/results.jsonl" "$start" "$name" "$before" <<'PY'
import json, sys
recent = [json.loads(line) for line in open(sys.argv[1])][int(sys.argv[4]):]
started = float(sys.argv[2])
def split_pass(timing):
    if not timing:
        return None
    first = timing["pass"].get("first_forward_at")
    return {"seconds": timing["seconds"], "first_forward_after_s": round(first - started, 2) if first else None}
print(json.dumps({"measurement": "cifar10_eval_timings", "run": sys.argv[3], "records": [
    {"representation": r["representation"], "aggregation": r.get("aggregation"), "space": r.get("space"),
     "knn_seconds": round(r["timings"].get("knn_seconds", 0.0), 2),
     "probe_seconds": round(r["timings"].get("probe_seconds", 0.0), 2),
     "train_pass": split_pass(r["timings"].get("extraction_train")),
     "test_pass": split_pass(r["timings"].get("extraction_test"))} for r in recent]}))
PY
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
