#!/usr/bin/env bash
# One machine's share of a greenrun job: one torchrun that starts this machine's workers, and the exit code a
# scheduler can act on. greenrun.sbatch runs it once per node (srun) and skypilot.yaml on every node (run:):
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 RDZV_ID=job-42 \
#       bash scripts/cluster/launch.sh train +recipe=gpt2_gpu storage=s3 storage.bucket=B resume=auto run.dir=runs/R
#
# Environment (the same values on every machine of a job):
#   NNODES            machines in the job (default 1)
#   NPROC_PER_NODE    workers on this machine, one per GPU (default: the GPUs `nvidia-smi -L` lists, else 1)
#   RDZV_ENDPOINT     host:port of the c10d rendezvous, on the first machine (default with NNODES=1: a free
#                     port of this machine, torchrun --standalone)
#   RDZV_ID           one id per job, the same on every machine (default greenrun)
#   SHUTDOWN_TIMEOUT  seconds torchrun waits for the workers after forwarding a signal, then SIGKILL (default
#                     60; keep it above spot.deadline_s, 25 s by default, plus ~10 s for the exit itself)
#   PYTHON            the interpreter that has torch and greenrun (default python3)
#   OMP_NUM_THREADS   left as set; when unset, this machine's cores divided by its workers (torchrun would
#                     make it 1, and greenrun's trainer.cpu_threads=0 follows OMP_NUM_THREADS)
#
# torchrun runs with --max_restarts=0: a worker that exits 75 is on a machine that is going away, so the
# restart belongs to the scheduler (requeue, recovery), which reruns the same command with resume=auto.
#
# Why not torchrun alone: torchrun exits 1 whenever a worker exits non-zero, so greenrun's 75 ("preempted, the
# emergency checkpoint is committed: restart me") would never reach the scheduler. Every worker runs through
# this script (--worker), which writes its exit code to a folder of this machine, and this machine exits with:
#   - rank 0's code, when rank 0 ran here (0, 75, 76, 77, 1, ...: rank 0 is the one that knows);
#   - 0 when rank 0 ran elsewhere and this machine's workers stopped with a greenrun code (0, 75, 76, 77):
#     rank 0's machine reports (srun returns the highest code of its tasks; SkyPilot recovers when any node
#     exits with a code in recover_on_exit_codes);
#   - else the first other failure here (1, 2, 128+signal), or torchrun's own code when no worker started.
set -u

self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

if [[ "${1:-}" == --worker ]]; then
    # One worker, started by torchrun in a session of its own; python is our child in the same process group,
    # so every signal torchrun forwards (to the group) reaches it. We only stay alive to write its exit code.
    status=$2
    shift 2
    trap ':' TERM INT HUP USR1
    "$@"
    rc=$?
    printf '%s\n' "$rc" >"$status/.rank-$RANK" && mv -f "$status/.rank-$RANK" "$status/rank-$RANK"
    # A preemption ends on every rank at once, after rank 0's commit (a barrier). If another rank of rank 0's
    # machine exits first, torchrun stops the rest with SIGTERM, and rank 0, still closing, would exit 76 or
    # die. So the other ranks of that machine wait for rank 0's code (60 s at most) before they exit.
    if [[ "$RANK" != 0 && "${GROUP_RANK:-0}" == 0 && "$rc" -ge 75 && "$rc" -le 77 ]]; then
        for _ in $(seq 600); do
            [[ -e "$status/rank-0" ]] && break
            sleep 0.1
        done
    fi
    exit "$rc"
fi

nnodes=${NNODES:-1}
workers=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')}
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || workers=1
cores=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / workers > 0 ? cores / workers : 1))}
python=${PYTHON:-python3}
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rendezvous=(--rdzv_backend=c10d "--rdzv_endpoint=$RDZV_ENDPOINT" "--rdzv_id=${RDZV_ID:-greenrun}")
elif [[ "$nnodes" == 1 ]]; then
    rendezvous=(--standalone)
else
    echo "launch.sh: NNODES=$nnodes needs RDZV_ENDPOINT=host:port (the first machine), the same on every machine" >&2
    exit 2
fi

status=$(mktemp -d "${TMPDIR:-/tmp}/greenrun-ranks.XXXXXX")
trap 'rm -rf "$status"' EXIT
# This shell must outlive a signal to report; torchrun forwards it to every worker (greenrun handles
# SIGTERM, SIGINT and SIGUSR1: an emergency checkpoint, then 75).
trap ':' TERM INT HUP USR1

"$python" -m torch.distributed.run \
    --nnodes="$nnodes" \
    --nproc_per_node="$workers" \
    "${rendezvous[@]}" \
    --max_restarts=0 \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-60}" \
    --no-python \
    bash "$self" --worker "$status" "$python" -m greenrun "$@"
torchrun_rc=$?

if [[ -e "$status/rank-0" ]]; then
    rc=$(<"$status/rank-0")
    echo "launch.sh: rank 0 exited $rc (torchrun: $torchrun_rc)" >&2
    exit "$rc"
fi
rc=$torchrun_rc
shopt -s nullglob
codes=("$status"/rank-*)
if ((${#codes[@]})); then
    rc=0
    for file in "${codes[@]}"; do
        code=$(<"$file")
        case "$code" in
            0 | 75 | 76 | 77) ;;
            *) rc=$code && break ;;
        esac
    done
fi
echo "launch.sh: rank 0 ran on another machine; this one exits $rc (torchrun: $torchrun_rc)" >&2
exit "$rc"
