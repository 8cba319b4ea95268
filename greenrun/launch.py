"""`greenrun train trainer.nproc_per_node=N|auto`: one start, several processes, through torch's own launcher.

The launching process composes and validates the config (cli.py), writes it once (as plain YAML, to a folder
of its own on this machine), runs the preflight once (`_preflight`, a child that gives its GPU back), and hands torch.distributed's elastic agent
(`elastic_launch`, what torchrun runs) the command `python -m greenrun _worker CONFIG.yaml` for each process.
A worker reads that file, not the command line, and does what `greenrun train` does in one process
(job.train_or_continue: rank 0 locks run.dir and writes RUN_DIR/config.yaml, checkpoints and metrics); in a group
the agent restarts (trainer.max_restarts) it continues from the newest checkpoint, if the run got to one.
Several machines run the same command line with the same trainer.rdzv_endpoint and a run.dir they share.

Exit codes are the workers': 0 when every rank finished; after a preemption rank 0's (75 with the emergency
checkpoint committed, 76, 77: runtime/spot.py); otherwise the first failure's, 2 for a usage error and 1 for
anything else (a crash, a signal), its rank named in the message. Each worker writes its outcome to a folder of
the launcher's (GREENRUN_LAUNCH_OUTCOMES) just before it exits, so that a launcher stopped by a signal still
knows what its workers made of it.

Signals: the agent forwards SIGTERM, SIGINT and SIGUSR1 (SLURM's --signal=USR1@90) to every worker, which then
write their emergency checkpoint (runtime/spot.py), and waits `spot.deadline_s` plus a margin (at least torch's
30 s) before SIGKILL; TORCH_ELASTIC_SHUTDOWN_TIMEOUT, when set, wins. When one worker stops on its own (a signal
sent to it alone), the agent stops the others with SIGTERM: workers past their job ignore that, and on rank 0's
machine the other ranks of a preemption wait for rank 0's outcome first, so the agent never cuts the writer short.

NCCL_* and the other environment variables reach the workers as they are; greenrun sets none of NCCL's (NVLink
SHARP, NCCL_NVLS_ENABLE, stays as the environment says). OMP_NUM_THREADS, when unset, becomes the cores divided
by the processes on this machine (torchrun would make it 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from greenrun import config, job, runs
from greenrun.ckpt import checkpoint
from greenrun.config import Config, ConfigError
from greenrun.core.fs import atomic_write
from greenrun.runtime import distributed
from greenrun.runtime.spot import EXIT_ABORTED, EXIT_LOCAL_ONLY, EXIT_PREEMPTED

log = logging.getLogger(__name__)

OUTCOMES_ENV = "GREENRUN_LAUNCH_OUTCOMES"  # the launcher's folder where each worker leaves its exit code
STOPPED = (EXIT_PREEMPTED, EXIT_ABORTED, EXIT_LOCAL_ONLY)  # a stop every rank agreed on (rank 0 knows how)
WRITER_WAIT_S = 60.0  # how long the other ranks of a preemption wait for rank 0's outcome before exiting
SHUTDOWN_MARGIN_S = 10.0  # past spot.deadline_s: the workers' exit after their emergency checkpoint
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # the agent forwards these to the workers


@dataclass(frozen=True)
class Layout:
    """How many processes on how many machines, resolved from trainer.* on this machine."""

    nproc_per_node: int
    min_nodes: int
    max_nodes: int
    rdzv_endpoint: str  # "" = a rendezvous on this machine (one node)
    max_restarts: int


def under_torchrun() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE): this process is one rank already."""
    return "WORLD_SIZE" in os.environ


def layout(cfg: Config) -> Layout | None:
    """The launch trainer.* asks for, or None for today's single process (nproc 1, one machine, no restarts).

    Under torchrun the keys are ignored (one note says so): that launcher already made this process a rank.
    """
    t = cfg.trainer
    span = distributed.node_range(t.nnodes)
    assert span is not None, "config.validate checks trainer.nnodes"
    asked = (t.nproc_per_node, span, t.rdzv_endpoint, t.max_restarts) != (1, (1, 1), "", 0)
    if under_torchrun():
        if asked and int(os.environ.get("RANK", "0")) == 0:
            log.info(
                f"trainer.nproc_per_node={t.nproc_per_node} trainer.nnodes={t.nnodes} ignored: this process is "
                f"rank 0 of {os.environ['WORLD_SIZE']} started by torchrun, which decides the processes"
            )
        return None
    n = _processes(cfg)
    if (n, span, t.rdzv_endpoint, t.max_restarts) == (1, (1, 1), "", 0):
        return None
    return Layout(n, span[0], span[1], t.rdzv_endpoint, t.max_restarts)


def _processes(cfg: Config) -> int:
    """trainer.nproc_per_node on this machine: auto = one per visible GPU the run trains on, else 1."""
    import torch

    n = cfg.trainer.nproc_per_node
    gpus = torch.cuda.device_count() if cfg.trainer.device != "cpu" and torch.cuda.is_available() else 0
    if n == "auto":
        return max(gpus, 1)
    if gpus and n > gpus:
        raise ConfigError(
            [
                f"trainer.nproc_per_node={n}: {gpus} GPU(s) visible here, one per process; use "
                f"trainer.nproc_per_node=auto (or {gpus}), or trainer.device=cpu for gloo processes"
            ]
        )
    return n


# --- the launching process -----------------------------------------------------------------------------


def launch(cfg: Config, how: Layout) -> job.JobResult:
    """Preflight once, write the composed config once, then run `how.nproc_per_node` workers on it."""
    run_dir = Path(cfg.run.dir)
    if problems := runs.run_dir_problems(run_dir):
        raise ConfigError(problems)
    # The workers' run.dir is the path they are given: the same text, so that rank 0 rewrites the same file.
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))
    continuing = cfg.resume == "auto" and bool(checkpoint.committed(run_dir / "checkpoints"))
    folder = Path(tempfile.mkdtemp(prefix="greenrun-launch-"))
    try:
        # The preflight runs here, once: the workers' copy says so, and is what they train with.
        path = folder / "config.yaml"
        atomic_write(path, config.to_yaml(dataclasses.replace(cfg, preflight=False)))
        # On one machine a second writer of run.dir is refused now, as `train` does (rank 0 takes the lock
        # again once the workers run); on several, the first machine's rank 0 may hold it already.
        with runs.hold(run_dir) if how.max_nodes == 1 else contextlib.nullcontext():
            # In a process of its own, which gives its GPU memory back before the workers start.
            command = [sys.executable, "-m", "greenrun", "_preflight", str(path)]
            if cfg.preflight and not continuing and subprocess.run(command, check=False).returncode:
                return job.JobResult(
                    job.Outcome.FAILED,
                    "preflight failed; fix the config (or skip the check with preflight=false)",
                )
        return _run_workers(cfg, how, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_workers(cfg: Config, how: Layout, folder: Path) -> job.JobResult:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    run_dir = Path(cfg.run.dir)
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // how.nproc_per_node))
    os.environ[OUTCOMES_ENV] = str(folder)
    # A restarted group must not meet the last one's addresses: the agent's own store outlives a restart and
    # keeps them (gloo then dials the dead rank 0), while rank 0's store, torch's other way, starts empty.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    shutdown = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    grace = int(shutdown) if shutdown else max(30, math.ceil(cfg.spot.deadline_s + SHUTDOWN_MARGIN_S))
    if how.rdzv_endpoint:  # every machine names the same endpoint: it names the job too
        endpoint = how.rdzv_endpoint
        run_id = "greenrun-" + hashlib.sha256(endpoint.encode()).hexdigest()[:16]
    else:  # torchrun --standalone: a rendezvous on a free port of this machine
        endpoint, run_id = "localhost:0", f"greenrun-{uuid.uuid4().hex[:16]}"
    wanted = {"signals_to_handle": SIGNALS, "shutdown_timeout": grace}
    launch_cfg = LaunchConfig(
        min_nodes=how.min_nodes,
        max_nodes=how.max_nodes,
        nproc_per_node=how.nproc_per_node,
        run_id=run_id,
        role="greenrun",
        rdzv_endpoint=endpoint,
        rdzv_backend="c10d",
        max_restarts=how.max_restarts,
        # Older torch (>= 2.4 is supported) forwards SIGTERM and SIGINT only and waits a fixed 30 s.
        **{k: v for k, v in wanted.items() if k in {f.name for f in dataclasses.fields(LaunchConfig)}},
    )
    nodes = how.max_nodes if how.min_nodes == how.max_nodes else f"{how.min_nodes}-{how.max_nodes}"
    log.info(
        f"launching {how.nproc_per_node} process(es) per machine on {nodes} machine(s) for {run_dir}"
        + (f", up to {how.max_restarts} restart(s)" if how.max_restarts else "")
    )
    failures: dict[int, tuple[int, int]] = {}  # global rank -> (exit code or -signal, pid)
    first: int | None = None
    try:
        elastic_launch(launch_cfg, sys.executable)("-m", "greenrun", "_worker", str(folder / "config.yaml"))
    except ChildFailedError as e:
        failures = {rank: (f.exitcode, f.pid) for rank, f in e.failures.items()}
        first = e.get_first_failure()[0]
    except SignalException as e:  # the agent forwarded it and waited for the workers: they said how it went
        log.warning(f"{e.sigval.name}: the workers were asked to stop")
        if not _reported(folder):  # none got to say: whatever they committed last is all there is
            message = (
                f"{e.sigval.name}: the workers ended before reporting; resume from the newest checkpoint"
            )
            return job.JobResult(job.Outcome.ABORTED, message, run_dir=run_dir)
    code, message = outcome(_reported(folder), failures, first)
    summary_path = run_dir / "summary.json"  # rank 0's, for a sweep's table and the Python API
    summary = json.loads(summary_path.read_text()) if code == 0 and summary_path.is_file() else {}
    return job.JobResult(_as_outcome(code), message, run_dir=run_dir, summary=summary)


def _reported(outcomes: Path) -> dict[int, int]:
    """global rank -> the exit code its worker reported (the workers of this machine that got that far)."""
    found = {}
    for path in outcomes.glob("rank-*.json"):
        try:
            found[int(path.stem.removeprefix("rank-"))] = int(json.loads(path.read_text())["exit"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def outcome(
    reported: dict[int, int], failures: dict[int, tuple[int, int]], first: int | None
) -> tuple[int, str]:
    """The launcher's exit code and message from what the workers reported and how their processes ended.

    reported: rank -> the code its job ended with; failures: rank -> (process exit code, pid) of each process
    that did not exit 0; first: the rank that failed first (torch's root cause), if one did.
    """
    ended = {rank: reported.get(rank, code) for rank, (code, _) in failures.items()} | reported
    if ended.get(0) in STOPPED:  # rank 0 wrote the emergency checkpoint and knows where it got
        others = sorted({code for rank, code in ended.items() if rank != 0})
        tail = f"; the other ranks: {', '.join(map(str, others))}" if others else ""
        return ended[0], (
            f"the workers stopped after a preemption: rank 0 exited {ended[0]}{tail}. The same command with "
            "resume=auto continues on as many processes"
        )
    bad = {rank: code for rank, code in ended.items() if code != 0}
    if not bad:
        return 0, ""
    root = first if first in bad else min(bad)
    code = bad[root]
    pid = failures.get(root, (0, 0))[1]
    how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited {code}"
    also = sorted(r for r in bad if r != root)
    message = f"rank {root}" + (f" (pid {pid})" if pid else "") + f" {how}, the first to fail"
    if also:
        message += "; then " + ", ".join(f"rank {r} ({_said(bad[r])})" for r in also)
    if code in (job.Outcome.USAGE, *STOPPED):
        return code, message
    return int(job.Outcome.FAILED), message + " (its messages are above)"


def _said(code: int) -> str:
    return _signal_name(-code) if code < 0 else f"exit {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _as_outcome(code: int) -> job.Outcome:
    try:
        return job.Outcome(code)
    except ValueError:
        return job.Outcome.FAILED


# --- one worker ----------------------------------------------------------------------------------------


def worker(args: list[str]) -> int:
    """`python -m greenrun _worker RUN_DIR`: one rank of a launched run; its exit code, also left for the
    launcher in GREENRUN_LAUNCH_OUTCOMES."""
    rank = int(os.environ.get("RANK", "0"))
    folder = os.environ.get(OUTCOMES_ENV)
    mine = Path(folder) / f"rank-{rank}.json" if folder else None
    if mine is not None:
        mine.unlink(missing_ok=True)  # an earlier attempt's (the agent restarted the group)
    result = job.guarded(lambda: _work(args))
    # The job is over: a signal now (the agent stopping the group after another rank exited) changes
    # nothing, and must not cut short the exit code, nor rank 0's last files.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if result.message:
        log.error(result.message)
    code = result.exit_code
    if mine is not None:
        atomic_write(mine, json.dumps({"exit": code}))
        if rank != 0 and code in STOPPED and os.environ.get("GROUP_RANK", "0") == "0":
            _wait_for(mine.with_name("rank-0.json"), WRITER_WAIT_S)
    return code


def preflight(args: list[str]) -> int:
    """`python -m greenrun _preflight CONFIG.yaml`: the launcher's preflight (smoke.run), 0 when it passed."""
    result = job.guarded(lambda: job.run_smoke(config.load_yaml(Path(args[0]))))
    if result.message:
        log.error(result.message)
    return result.exit_code


def _work(args: list[str]) -> job.JobResult:
    if len(args) != 1:
        raise ConfigError(
            ["_worker takes one CONFIG.yaml; `greenrun train trainer.nproc_per_node=N` starts it"]
        )
    cfg = config.load_yaml(Path(args[0]))
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return job.train_or_continue(cfg)  # what `greenrun train` does in one process
    # The agent restarted the group: continue from the newest checkpoint (if the run got to one).
    run_dir = Path(cfg.run.dir)
    with runs.hold(run_dir):
        saved = run_dir / "config.yaml"
        before = config.load_yaml(saved) if saved.is_file() else cfg
        return job.continue_run(before, cfg, run_dir, missing_ok=True)


def _wait_for(path: Path, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.05)
