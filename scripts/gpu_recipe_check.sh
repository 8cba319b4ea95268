#!/usr/bin/env bash
# Train the GPT-2 124M GPU recipe for a few optimizer steps on one GPU and keep its metrics.
# Usage (on a GPU machine, repo root): OUT=results bash scripts/gpu_recipe_check.sh
# Each variant compiles once (~1 min); the steady-state tokens/s is the last metrics.jsonl line.
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/device.txt"
run() {  # name, overrides...
  local name=$1; shift
  local dir=/tmp/greenrun-runs/$name
  python3 -m greenrun train +recipe=gpt2_gpu trainer.max_steps=12 trainer.log_interval=2 \
    trainer.eval_interval=1000 checkpoint.interval=0 data.cache_dir=/tmp/greenrun-cache \
    run.dir="$dir" "$@" 2>&1 | tail -25
  echo "exit: ${PIPESTATUS[0]}"
  mkdir -p "$OUT/$name" && cp "$dir/metrics.jsonl" "$dir/summary.json" "$dir/config.yaml" "$OUT/$name/" 2>/dev/null
}
run recipe                                   # the recipe as shipped: micro 16 x accum 32
run micro32 trainer.micro_batch_size=32 trainer.grad_accum_steps=16 preflight=false
run eager trainer.compile=false preflight=false
