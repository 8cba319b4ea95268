#!/usr/bin/env bash
# One H200: tokens/s of the same short gpt2_gpu run as a plain process, through greenrun's launcher (one worker under
# torch's elastic agent) and under a user's torchrun. Steady state: steps 20..end from metrics.jsonl.
set -u
common="+recipe=gpt2_gpu trainer.grad_accum_steps=1 trainer.max_steps=80 trainer.log_interval=5 trainer.eval_interval=1000 trainer.sample_tokens=0 checkpoint.interval=0 preflight=false data.cache_dir=/tmp/greenrun-cache"
for mode in plain launcher torchrun plain2; do
  case $mode in
    plain|plain2) cmd="python3 -m greenrun train $common run.dir=/tmp/r_$mode" ;;
    launcher) cmd="python3 -m greenrun train $common trainer.max_restarts=1 run.dir=/tmp/r_$mode" ;;
    torchrun) cmd="python3 -m torch.distributed.run --nproc_per_node=1 -m greenrun train $common run.dir=/tmp/r_$mode" ;;
  esac
  t0=$(date +%s.%N); $cmd > /tmp/log_$mode 2>&1; rc=$?; t1=$(date +%s.%N)
  python3 - "$mode" "$rc" "$t0" "$t1" <<'PY'
import json, sys
mode, rc, t0, t1 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rows = [json.loads(l) for l in open(f"/tmp/r_{mode}/metrics.jsonl") if '"tok_per_s"' in l] if rc == 0 else []
steady = [r for r in rows if r.get("step", 0) >= 20]
tps = sum(r["tok_per_s"] for r in steady) / len(steady) if steady else None
out = {"mode": mode, "rc": rc, "wall_s": t1 - t0, "steady_tok_per_s": tps, "rows": len(steady)}
print(json.dumps(out)); open(f"{__import__('os').environ['OUT']}/launcher_{mode}.json", "w").write(json.dumps({**out, "metrics": rows}))
PY
  [ $rc -ne 0 ] && tail -5 /tmp/log_$mode
done
