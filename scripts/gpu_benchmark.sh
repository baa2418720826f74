#!/usr/bin/env bash
# One GPU benchmark run on a lent H100/H200, writing everything into $OUT (at most 8 files come back).
#
# Run from the repository root on the device machine, with the wheels in .whl carried (see docs/benchmark.md):
#   bash scripts/gpu_benchmark.sh
# Every step has its own time limit, so one slow step cannot eat the others; each benchmark step writes its JSON
# after every measurement, so a step cut short keeps what it measured. Total: under 6 minutes.
set -u
OUT=${OUT:-runs/gpu}
WORK=/tmp/gpu_bench
mkdir -p "$OUT" "$WORK"
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

bench() {  # bench NAME LIMIT_S ARGS...: one benchmark run into $WORK/NAME
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)"
    timeout --signal=INT --kill-after=10 "$limit" python3 scripts/benchmark.py --device cuda --output "$WORK/$name" "$@"
    echo "=== $name exit $? at $((SECONDS - START))s"
}

# 1. The targets: fast configuration, bf16, torch.compile (CUDA graphs); batch 32 first (throughput), then 1, 8.
bench fast_bf16 165 --models esp-medsam-fast --dtypes bf16 --batch-sizes 32 1 8 --channels-last --compile on
# 2. Fast configuration in fp32 without compile (compiling fp32 too would not fit the time).
bench fast_fp32 35 --models esp-medsam-fast --dtypes fp32 --batch-sizes 1 8 32 --channels-last --compile off
# 3. The baseline of every ratio: eager attention, BatchNorm unfused, no compile.
bench plain 45 --models esp-medsam-plain --dtypes fp32 bf16 --batch-sizes 1 8 32 --warmup 3 --iterations 10
# 4. The peers: SAM ViT-B and ViT-H (transformers, random init, one box prompt), LiteMedSAM where installed.
bench sam 75 --models sam-vit-b sam-vit-h litemedsam --dtypes bf16 fp32 --batch-sizes 1 8 32 --warmup 2 --iterations 5

# One merged report (JSON, Markdown table, chart) from every run that wrote a JSON.
python3 - "$WORK" "$OUT" <<'PY'
import json, sys
from pathlib import Path
from esp_medsam_hf.benchmark import format_table, merge_reports, write_report
work, out = Path(sys.argv[1]), Path(sys.argv[2])
reports = [json.loads(p.read_text()) for p in sorted(work.glob("*/benchmark.json"))]
if reports:
    merged = merge_reports(reports)
    write_report(merged, out, stem="benchmark_gpu")
    print(format_table(merged))
else:
    print("no benchmark JSON was written")
PY

# 5. Training throughput (another engineer's script), student and teacher, bf16, if it exists.
if [ -f scripts/benchmark_training.py ]; then
    echo "=== training (at $((SECONDS - START))s)"
    timeout --signal=INT --kill-after=10 45 python3 scripts/benchmark_training.py --device cuda --bf16 \
        --json "$OUT/training_gpu.json"
    echo "=== training exit $? at $((SECONDS - START))s"
fi
echo "total ${SECONDS}s"
