#!/usr/bin/env bash
# One GPU benchmark run on a lent H100/H200, writing everything into $OUT: under 6 minutes in all.
#
# Run from the repository root on the device machine, with the wheels in .whl carried (see docs/benchmark.md):
#   bash scripts/gpu_benchmark.sh
# scripts/gpu_benchmark.py keeps every phase inside its share of the budget (eager rows, one compile per dtype
# with a dynamic batch axis, training) and rewrites results.json after every row, so a run cut short keeps what it
# measured; the outer timeout bounds the whole. Files: env.txt, log.txt, results.json, results.md, training.json.
set -u
OUT=${OUT:-runs/gpu}
BUDGET_S=${BUDGET_S:-290}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
START=$SECONDS

# transformers on the image may be older than the package needs (>= 5.23); timm pinned to what the tests use.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "wheel install failed"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    nproc; grep -m1 "model name" /proc/cpuinfo
    python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'timm', timm.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "=== benchmark (budget ${BUDGET_S}s, at $((SECONDS - START))s)"
timeout --signal=INT --kill-after=15 $((BUDGET_S + 40)) \
    python3 scripts/gpu_benchmark.py --device cuda --output "$OUT" --budget-s "$BUDGET_S"
echo "=== benchmark exit $? at $((SECONDS - START))s"
[ -f "$OUT/results.md" ] || python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "scripts")
from gpu_benchmark import table
out = Path(sys.argv[1])
if (out / "results.json").is_file():
    text = table(json.loads((out / "results.json").read_text()))
    (out / "results.md").write_text(text)
    print(text)
PY
echo "total ${SECONDS}s"
