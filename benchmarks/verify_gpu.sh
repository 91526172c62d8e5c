#!/usr/bin/env bash
# The GPU checks of issue 13's open targets in ONE device call, with one summary file (a device call returns only a
# few files and the tail of its output): the GPU-only tests, the CIFAR-10 Table-1 row with its cached rerun, the
# superset in one call (benchmarks/cifar10_row.sh), and both probe solvers on ImageNet-size features
# (benchmarks/probe.py). About 7-8 minutes on one H200.
# Usage, from the repo root: benchmarks/verify_gpu.sh CHECKPOINT DATA_ROOT OUT_DIR
#   DATA_ROOT holds cifar10/{train,test} (python ../shared/data/materialize.py cifar10 DATA_ROOT);
#   OUT_DIR gets every step's raw output and summary.txt (what RESULTS.md needs).
set -uo pipefail
ckpt=$1 data=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
summary=$out/summary.txt
{
  echo "verify_gpu.sh at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ)"
  nvidia-smi -L
  python -c "import torch; print('torch', torch.__version__)"
} >"$summary" 2>&1
note() { echo "== $1" >>"$summary"; }

note "GPU-only tests (tests/test_probe.py, the CUDA cases of tests/test_pretrain.py)"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_probe.py "tests/test_pretrain.py" -k "cuda or gpu or graph" \
  >"$out/tests.log" 2>&1
tail -3 "$out/tests.log" >>"$summary"

work=$(mktemp -d)
for what in row superset; do
  note "cifar10_row.sh $what"
  timeout 280 bash "$here/cifar10_row.sh" "$ckpt" "$data" "$work" "$what" >"$out/$what.jsonl" 2>"$out/$what.log"
  echo "exit $?" >>"$summary"
  python - "$out/$what.jsonl" >>"$summary" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    if r.get("measurement") == "cifar10_eval":
        print(f"  wall {r['wall_seconds']:6.1f} s  {r['run']}")
    elif r.get("measurement") == "cifar10_eval_timings":
        for t in r["records"]:
            print(f"    {t['representation']:>10} {t['aggregation'] or '':>9} {t['space'] or '':>10}"
                  f"  knn {t['knn_seconds']:5.2f} s  probe {t['probe_seconds']:6.2f} s")
    elif "knn@20" in r:
        linear = "-" if r.get("linear") is None else f"{r['linear']:.2f}"
        print(f"    {r['patches']:>10} {r['aggregation']:>9} {r['space']:>10}  knn@20 {r['knn@20']:.2f}  linear {linear}")
PY
done

note "probe.py --imagenet --both-solvers (1.28M x 2048 x 1000 classes picks torch.optim.LBFGS; 50k x 512 x 10, L-BFGS-B)"
(cd "$here" && timeout 240 python probe.py --imagenet --both-solvers) >"$out/probe.jsonl" 2>"$out/probe.log"
echo "exit $?" >>"$summary"
cut -c1-220 "$out/probe.jsonl" >>"$summary"
cat "$summary"
