"""What a checkpoint costs on this machine: training-loop stall, local commit, upload, SIGTERM-to-commit.

    python3 scripts/bench_checkpoint.py --out docs/bench/<date>_checkpoint/checkpoint.json

(a) GPT-2 124M (`model.GPT(preset("gpt2"))`) with AdamW state from one optimizer step on a tiny batch, saved
    through `pipeline.Checkpointer.save` the way the trainer saves: the loop blocks only for the snapshot (a CPU copy
    of model + optimizer + trainer state); checkpoint.write (safetensors + torch.save + sha256 + fsync + rename)
    runs on the background thread. Each save waits for the previous commit first, so the stall measured is the
    snapshot alone.
(b) Those committed checkpoints uploaded to a moto S3 server on 127.0.0.1 through `remote.Remote.upload_checkpoint`
    (the real multipart path: 16 MiB parts, 4 in parallel), then fetched back and verified (`Remote.fetch`).
(c) A real `greenrun train` subprocess of the tiny model: from the SIGTERM (os.kill) to the committed manifest and
    to the process's exit 75, with storage=local and with storage=s3 (the emergency path also uploads).
(d) A real `greenrun train` subprocess of GPT-2 124M (`model=gpt2`, micro-batch 1 of GPT2_SEQ_LEN tokens so that a
    step stays short on a CPU) with storage=s3 on the moto server, checkpoint.interval=0: from the SIGTERM to the
    emergency checkpoint committed locally, to its manifest committed in the bucket (polled every 20 ms from here)
    and to the exit code, with the emergency save's own phases from summary.json. First, once, `greenrun smoke`
    of the same config prints whether an emergency checkpoint fits the deadline at the measured upload speed.

    python3 scripts/bench_checkpoint.py --sections gpt2_sigterm --gpt2-trials 3 --out <dir>/sigterm.json

Not a test: numbers depend on the disk, the CPU count and the page cache. moto keeps objects in memory and runs in
this process, so (b) measures greenrun's client path plus moto, not a network. The fetch figure is moto-bound: moto
answers each ranged GET (16 MiB ranges, 4 at a time) by slicing a copy of the whole object, which is several times
slower than one plain GET of the same object on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import CheckpointConfig, Snapshot
from greenrun.ckpt.pipeline import Checkpointer
from greenrun.ckpt.remote import Remote
from greenrun.storage import S3Storage, StorageConfig
from greenrun.train import model, optimizer

log = logging.getLogger("bench_checkpoint")

GB = 1e9
# The tiny default model (conf/model/tiny.yaml) on a 200k-character slice of the bundled corpus.
TINY_TRAIN = ["model=tiny", "data.max_chars=200000", "preflight=false", "trainer.log_interval=1"]
GPT2_SEQ_LEN = 32
GPT2_TRAIN = [
    "model=gpt2",
    f"model.seq_len={GPT2_SEQ_LEN}",
    "trainer.micro_batch_size=1",
    "data.max_chars=200000",
    "trainer.log_interval=1",
    "trainer.eval_interval=100000",
    "trainer.eval_batches=1",
    "trainer.sample_tokens=0",
]
SECTIONS = ("save", "upload", "sigterm", "gpt2_sigterm")
BUCKET = "greenrun-bench"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def gpt2_with_adamw_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = model.GPT(model.preset("gpt2"))
    opt = optimizer.build(optimizer.OptimizerConfig(), m)
    x = torch.randint(0, m.cfg.vocab_size, (1, 16))
    _, loss = m(x, x)
    loss.backward()
    opt.step()  # creates exp_avg and exp_avg_sq for every parameter: the full 3x-parameters state
    opt.zero_grad(set_to_none=True)
    return m, opt


def snapshot_fn(m: torch.nn.Module, opt: torch.optim.Optimizer, step: int):
    """What Trainer.snapshot does, without a Trainer (whose dataset build would dominate the run time)."""

    def snap() -> Snapshot:
        unique, aliases = checkpoint.unique_tensors(m.state_dict())
        trainer_state = {"step": step, "best_val": float("inf"), "first_val": None, "scaler": {}}
        trainer_state["rng"] = {"cpu": torch.get_rng_state()}
        return Snapshot(
            step=step,
            model=checkpoint.to_cpu(unique),
            aliases=aliases,
            optimizer=checkpoint.to_cpu(opt.state_dict()),
            trainer=checkpoint.to_cpu(trainer_state),
            meta={"config_hash": "bench", "world_size": 1, "data_cache_key": "", "val_loss": None},
        )

    return snap


def bench_saves(work: Path, saves: int) -> tuple[dict, list[Path]]:
    m, opt = gpt2_with_adamw_state()
    notes: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    logging.getLogger("greenrun.ckpt.pipeline").addHandler(Collect())
    logging.getLogger("greenrun.ckpt.pipeline").setLevel(logging.INFO)
    persister = Checkpointer(CheckpointConfig(keep_last=saves), work / "checkpoints")
    blocked, commit = [], []
    for step in range(1, saves + 1):
        persister.save(snapshot_fn(m, opt, step))
        blocked.append(persister.blocked_s[-1])
        persister._join()  # the next save would wait for this commit anyway; keep the stall pure snapshot
        (seconds,) = [
            float(x)
            for x in re.findall(rf"checkpoint step {step} committed locally in ([\d.]+) s", " ".join(notes))
        ]
        commit.append(seconds)
        log.info(f"  save {step}: loop blocked {blocked[-1]:.3f} s, background commit {seconds:.2f} s")
    persister.close()
    dirs = checkpoint.committed(work / "checkpoints")[::-1]
    files = {name: (dirs[0] / name).stat().st_size for name in checkpoint.FILES}
    params = sum(p.numel() for p in m.parameters())
    return {
        "model": "gpt2 (124M)",
        "parameters": params,
        "checkpoint_bytes": sum(files.values()),
        "file_bytes": files,
        "saves": saves,
        "loop_blocked_s": blocked,
        "loop_blocked_s_median": statistics.median(blocked),
        "local_commit_s": commit,
        "local_commit_s_median": statistics.median(commit),
        "local_commit_GBps_median": sum(files.values()) / statistics.median(commit) / GB,
    }, dirs


def start_moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def bench_upload(dirs: list[Path], endpoint: str, work: Path) -> dict:
    storage = S3Storage(StorageConfig(kind="s3", bucket=BUCKET, prefix="bench", endpoint_url=endpoint))
    storage.client.create_bucket(Bucket=BUCKET)
    remote = Remote(storage, "gpt2-run")
    up, down = [], []
    for d in dirs:
        result = remote.upload_checkpoint(d)
        assert result.committed, result.note
        up.append({"step": result.step, "bytes": result.bytes, "s": result.seconds})
        log.info(f"  upload step {result.step}: {result.bytes / GB:.2f} GB in {result.seconds:.1f} s")
        t0 = time.perf_counter()
        fetched = remote.fetch(result.step, work / "fetched")  # download + sha256 verify
        down.append({"step": result.step, "bytes": result.bytes, "s": time.perf_counter() - t0})
        log.info(f"  fetch  step {result.step}: {down[-1]['s']:.1f} s (verified)")
        shutil.rmtree(fetched)
    return {
        "part_size_mb": StorageConfig().part_size_mb,
        "max_concurrency": StorageConfig().max_concurrency,
        "uploads": up,
        "upload_MBps_median": statistics.median(u["bytes"] / u["s"] / 1e6 for u in up),
        "fetches": down,
        "fetch_verify_MBps_median": statistics.median(f["bytes"] / f["s"] / 1e6 for f in down),
    }


def _metrics_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError):  # the line being written
            steps.append(json.loads(line)["step"])
    return max(steps, default=-1)


def sigterm_trial(work: Path, extra: list[str], env: dict, tag: str) -> dict:
    run_dir = work / f"sigterm-{tag}"
    cmd = [sys.executable, "-m", "greenrun", "train", *TINY_TRAIN, "trainer.max_steps=100000"]
    cmd += ["checkpoint.interval=0", f"data.cache_dir={work / 'cache'}", f"run.dir={run_dir}", *extra]
    with open(work / f"{tag}.log", "w") as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while _metrics_step(run_dir) < 5:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{tag}: training did not start; see {work / f'{tag}.log'}")
            time.sleep(0.01)
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGTERM)
        committed_at = None
        while proc.poll() is None:
            if committed_at is None and checkpoint.committed(run_dir / "checkpoints"):
                committed_at = time.perf_counter() - t0
            time.sleep(0.001)
        exited_at = time.perf_counter() - t0
        if committed_at is None and checkpoint.committed(run_dir / "checkpoints"):
            committed_at = exited_at  # committed within the last poll interval before the exit
    ok = proc.returncode == 75 and committed_at is not None
    if not ok:
        raise RuntimeError(
            f"{tag}: exit {proc.returncode}, committed={committed_at}; see {work / f'{tag}.log'}"
        )
    (path,) = checkpoint.committed(run_dir / "checkpoints")
    size = sum((path / n).stat().st_size for n in checkpoint.FILES)
    shutil.rmtree(run_dir)
    return {"to_manifest_s": committed_at, "to_exit_75_s": exited_at, "checkpoint_bytes": size}


def bench_sigterm(work: Path, trials: int, endpoint: str | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    variants = {"local": []}
    if endpoint:
        variants["s3"] = ["storage=s3", f"storage.bucket={BUCKET}", f"storage.endpoint_url={endpoint}"]
    out = {}
    for name, extra in variants.items():
        rows = []
        for i in range(trials):
            rows.append(sigterm_trial(work, extra, env, f"{name}-{i}"))
            row = rows[-1]
            log.info(
                f"  {name} trial {i}: manifest {row['to_manifest_s']:.3f} s, exit 75 {row['to_exit_75_s']:.3f} s"
            )
        out[name] = {
            "trials": rows,
            "to_manifest_s_median": statistics.median(r["to_manifest_s"] for r in rows),
            "to_exit_75_s_median": statistics.median(r["to_exit_75_s"] for r in rows),
            "to_exit_75_s_max": max(r["to_exit_75_s"] for r in rows),
        }
    return out


def _manifests(client, prefix: str) -> list[str]:
    found = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return [item["Key"] for item in found if item["Key"].endswith("/manifest.json")]


def gpt2_smoke(work: Path, endpoint: str, deadline_s: float) -> dict:
    """`greenrun smoke` of the (d) config: its emergency-checkpoint line, as a user sees it before a run."""
    cmd = [sys.executable, "-m", "greenrun", "smoke", *GPT2_TRAIN, f"data.cache_dir={work / 'cache'}"]
    cmd += ["storage=s3", f"storage.bucket={BUCKET}", f"storage.endpoint_url={endpoint}"]
    cmd += [f"spot.deadline_s={deadline_s}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [line.strip() for line in proc.stdout.splitlines() if "emergency checkpoint" in line]
    return {"exit": proc.returncode, "seconds": time.perf_counter() - t0, "line": lines[0] if lines else ""}


def gpt2_sigterm_trial(work: Path, endpoint: str, client, tag: str, deadline_s: float) -> dict:
    run_dir = work / f"gpt2-{tag}"
    cmd = [sys.executable, "-m", "greenrun", "train", *GPT2_TRAIN, "trainer.max_steps=100000"]
    cmd += ["checkpoint.interval=0", "preflight=false", f"data.cache_dir={work / 'cache'}"]
    cmd += ["storage=s3", f"storage.bucket={BUCKET}", f"storage.endpoint_url={endpoint}"]
    cmd += [f"spot.deadline_s={deadline_s}", f"run.dir={run_dir}"]
    prefix = f"greenrun/{run_dir.name}/checkpoints/"  # conf/storage/s3.yaml's storage.prefix
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    with open(work / f"{tag}.log", "w") as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while _metrics_step(run_dir) < 2:  # past the first step, which warms up
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{tag}: training did not start; see {work / f'{tag}.log'}")
            time.sleep(0.05)
        at_step = _metrics_step(run_dir)
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGTERM)
        local_at = bucket_at = None
        while proc.poll() is None:
            now = time.perf_counter() - t0
            if local_at is None and checkpoint.committed(run_dir / "checkpoints"):
                local_at = now
            if bucket_at is None and _manifests(client, prefix):
                bucket_at = now
            time.sleep(0.02)
        exited_at = time.perf_counter() - t0
    if bucket_at is None and _manifests(client, prefix):
        bucket_at = exited_at  # committed within the last poll interval before the exit
    if local_at is None and checkpoint.committed(run_dir / "checkpoints"):
        local_at = exited_at
    summary = json.loads((run_dir / "summary.json").read_text())
    open_uploads = client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
    row = {
        "exit_code": proc.returncode,
        "signal_at_step": at_step,
        "saved_step": summary["step"],
        "to_local_commit_s": local_at,
        "to_bucket_manifest_s": bucket_at,
        "to_exit_s": exited_at,
        "emergency": summary["emergency"],
        "emergency_phases_s": summary["emergency_s"],
        "checkpoint_bytes": summary["remote"]["checkpoints"][-1]["bytes"],
        "open_multipart_uploads_after": len(open_uploads),
    }
    shutil.rmtree(run_dir)
    return row


def bench_gpt2_sigterm(work: Path, trials: int, endpoint: str, deadline_s: float) -> dict:
    client = S3Storage(StorageConfig(kind="s3", bucket=BUCKET, endpoint_url=endpoint)).client
    with contextlib.suppress(Exception):
        client.create_bucket(Bucket=BUCKET)
    smoke = gpt2_smoke(work, endpoint, deadline_s)
    log.info(f"  smoke: {smoke['line']}")
    rows = []
    for i in range(trials):
        rows.append(gpt2_sigterm_trial(work, endpoint, client, f"gpt2-{i}", deadline_s))
        r = rows[-1]
        log.info(
            f"  trial {i}: exit {r['exit_code']}, local commit {r['to_local_commit_s']}, bucket manifest "
            f"{r['to_bucket_manifest_s']}, exit {r['to_exit_s']:.2f} s; phases {r['emergency_phases_s']}"
        )
    in_bucket = [r["to_bucket_manifest_s"] for r in rows if r["to_bucket_manifest_s"] is not None]
    return {
        "config": GPT2_TRAIN,
        "deadline_s": deadline_s,
        "smoke": smoke,
        "trials": rows,
        "committed_in_bucket": f"{len(in_bucket)} of {len(rows)}",
        "to_bucket_manifest_s_median": statistics.median(in_bucket) if in_bucket else None,
        "to_exit_s_max": max(r["to_exit_s"] for r in rows),
        "exit_codes": [r["exit_code"] for r in rows],
    }


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("boto3", "botocore", "moto", "safetensors", "hydra-core")}


def machine(work: Path) -> dict:
    usage = shutil.disk_usage(work)
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        **versions(),
        "workdir": str(work),
        "disk_free_GB": usage.free / GB,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="where to write the JSON results")
    ap.add_argument("--saves", type=int, default=3, help="GPT-2 124M saves to time (default 3)")
    ap.add_argument("--trials", type=int, default=5, help="SIGTERM trials per storage kind (default 5)")
    ap.add_argument(
        "--workdir", help="scratch directory (default: a temp dir, removed at the end); needs ~6 GB"
    )
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    ap.add_argument("--gpt2-trials", type=int, default=3, help="GPT-2 124M SIGTERM trials (default 3)")
    ap.add_argument("--deadline", type=float, default=25.0, help="spot.deadline_s for (d) (default 25)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    # Only a local moto server is ever contacted: fake credentials, nothing from the user's AWS setup.
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(FAKE_AWS)

    scratch = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="greenrun-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(scratch)}
        results["command"] = " ".join(["python3", "scripts/bench_checkpoint.py", *sys.argv[1:]])
        server, endpoint = start_moto()
        if {"save", "upload"} & sections:
            log.info("(a) GPT-2 124M saves through Checkpointer.save")
            results["save"], dirs = bench_saves(scratch / "saves", args.saves)
            if "upload" in sections:
                log.info(f"(b) upload to moto at {endpoint} through Remote.upload_checkpoint")
                results["upload"] = bench_upload(dirs, endpoint, scratch)
            shutil.rmtree(scratch / "saves")
        if "sigterm" in sections:
            log.info("(c) SIGTERM -> committed checkpoint, tiny model, `greenrun train` subprocess")
            results["sigterm"] = bench_sigterm(scratch, args.trials, endpoint)
        if "gpt2_sigterm" in sections:
            log.info("(d) SIGTERM -> committed in the bucket, GPT-2 124M, `greenrun train` subprocess")
            results["gpt2_sigterm"] = bench_gpt2_sigterm(scratch, args.gpt2_trials, endpoint, args.deadline)
    finally:
        if server is not None:
            server.stop()
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    log.info(table(results))
    log.info("\nJSON: %s", out)
    return 0


def table(r: dict) -> str:
    """The headline numbers as an aligned two-column text table."""
    m, rows = r["machine"], []
    if "save" in r:
        rows += _save_rows(r)
    for kind, v in r.get("sigterm", {}).items():
        size = v["trials"][0]["checkpoint_bytes"] / 1e6
        rows.append(
            (
                f"SIGTERM -> manifest, tiny ({size:.1f} MB), {kind}",
                f"{v['to_manifest_s_median']:.3f} s median of {len(v['trials'])}",
            )
        )
        rows.append(
            (
                f"SIGTERM -> exit 75, tiny, {kind}",
                f"{v['to_exit_75_s_median']:.3f} s median, {v['to_exit_75_s_max']:.3f} s max",
            )
        )
    g = r.get("gpt2_sigterm")
    if g:
        median = g["to_bucket_manifest_s_median"]
        rows.append(
            (
                "GPT-2 124M SIGTERM -> manifest in the bucket",
                f"{median:.1f} s median" if median is not None else "never",
            )
        )
        rows.append(("GPT-2 124M committed in the bucket", f"{g['committed_in_bucket']} trials"))
        rows.append(
            ("GPT-2 124M SIGTERM -> exit", f"{g['to_exit_s_max']:.1f} s max, codes {g['exit_codes']}")
        )
    width = max(len(k) for k, _ in rows)
    lines = [
        f"\nmachine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, {m['platform']}",
        f"{'measure':<{width}}  value",
        f"{'-' * width}  {'-' * 40}",
    ]
    return "\n".join(lines + [f"{k:<{width}}  {v}" for k, v in rows])


def _save_rows(r: dict) -> list[tuple[str, str]]:
    s = r["save"]
    rows = [
        (
            "GPT-2 124M checkpoint size",
            f"{s['checkpoint_bytes'] / GB:.2f} GB ({s['parameters'] / 1e6:.1f}M params + AdamW)",
        ),
        (
            "training loop blocked per save (snapshot)",
            f"{s['loop_blocked_s_median']:.2f} s median of {s['saves']}",
        ),
        (
            "background local commit",
            f"{s['local_commit_s_median']:.2f} s median ({s['local_commit_GBps_median']:.2f} GB/s)",
        ),
    ]
    u = r.get("upload")
    if u:
        rows.append(("upload to local moto", f"{u['upload_MBps_median']:.0f} MB/s median"))
        rows.append(
            ("fetch + sha256 verify from local moto", f"{u['fetch_verify_MBps_median']:.0f} MB/s median")
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
