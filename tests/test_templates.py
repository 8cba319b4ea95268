"""The cluster templates in scripts/cluster/: they parse, they restart on greenrun's exit codes, and their two
helpers do what the templates rely on (launch.sh turns a worker's 75 into the machine's exit code under
torchrun, which itself exits 1; restore.py brings a run from its bucket onto an empty disk).

SkyPilot's own loader checks skypilot.yaml only where `sky` is importable (CI does not install it; see
docs/distributed.md for the command that was run with skypilot installed).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml

from greenrun.ckpt import checkpoint
from greenrun.runtime.spot import EXIT_ABORTED, EXIT_PREEMPTED
from tests.common import run_cli

if TYPE_CHECKING:
    from tests.s3_fixtures import S3Bucket

pytest_plugins = ["tests.s3_fixtures"]

CLUSTER = Path(__file__).resolve().parents[1] / "scripts" / "cluster"
SBATCH = CLUSTER / "greenrun.sbatch"
LAUNCH = CLUSTER / "launch.sh"
RESTORE = CLUSTER / "restore.py"
SKYPILOT = CLUSTER / "skypilot.yaml"

# sbatch options the script uses, as sbatch(1) names them (Slurm 22.05's man page; unchanged since).
SBATCH_OPTIONS = {
    "--job-name",
    "--nodes",
    "--ntasks-per-node",
    "--gpus-per-node",
    "--exclusive",
    "--mem",
    "--time",
    "--signal",
    "--requeue",
    "--open-mode",
    "--output",
}
# sbatch(1): --signal=[{R|B}:]<sig_num>[@sig_time], sig_time an integer in 0..65535.
SIGNAL_SPEC = re.compile(r"^(?:[RB]:)?(?:USR1|SIGUSR1|10)(?:@(\d+))?$")


def sbatch_directives() -> list[tuple[str, str]]:
    """(option, value) of each #SBATCH line before the first command, where sbatch stops reading them."""
    found = []
    for line in SBATCH.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            option, _, value = stripped.removeprefix("#SBATCH").strip().partition("=")
            found.append((option, value))
    return found


# --- the shell scripts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [SBATCH, LAUNCH], ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed (apt install shellcheck)"
)
@pytest.mark.parametrize("script", [SBATCH, LAUNCH], ids=lambda p: p.name)
def test_shellcheck_is_clean(script: Path) -> None:
    r = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed (apt install shellcheck)"
)
@pytest.mark.parametrize("block", ["setup", "run"])
def test_shellcheck_is_clean_on_the_skypilot_blocks(block: str, tmp_path: Path) -> None:
    script = tmp_path / f"{block}.sh"
    script.write_text("#!/bin/bash\n" + yaml.safe_load(SKYPILOT.read_text())[block])
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sbatch_directives_are_documented_options() -> None:
    directives = dict(sbatch_directives())
    assert set(directives) <= SBATCH_OPTIONS, set(directives) - SBATCH_OPTIONS
    match = SIGNAL_SPEC.match(directives["--signal"])
    # B: the batch shell gets the notice: it forwards it, and it decides about the requeue.
    assert match and directives["--signal"].startswith("B:"), directives["--signal"]
    assert 0 <= int(match.group(1)) <= 65535
    assert "--requeue" in directives and directives["--open-mode"] == "append"
    # Every directive comes before the first command: none is left unread below it.
    assert len(sbatch_directives()) == SBATCH.read_text().count("\n#SBATCH")


def test_sbatch_requeues_on_preemption_codes_after_the_notice_only() -> None:
    text = SBATCH.read_text()
    assert "resume=auto" in text and "scripts/cluster/launch.sh train" in text
    case = re.search(r"^\s*(\d+) \| (\d+)\)$", text, re.M)
    assert case and {int(case[1]), int(case[2])} == {EXIT_PREEMPTED, EXIT_ABORTED}
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and 'if [[ -n "$notice" ]]' in text


FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" >"$SHIM_LOG/srun.args"
env >"$SHIM_LOG/srun.env"
trap 'exit 75' USR1 TERM  # a greenrun rank 0 that committed its emergency checkpoint
while :; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/bin/bash
case $1 in
    show) printf 'node1\\nnode2\\n' ;;
    requeue) echo "$2" >"$SHIM_LOG/requeued" ;;
esac
"""


def run_sbatch_with(signal_to: str, sig: signal.Signals, tmp_path: Path) -> tuple[int, Path, str]:
    """Run greenrun.sbatch under bash with srun and scontrol faked; deliver sig once srun runs."""
    shims, log = tmp_path / "shims", tmp_path / "log"
    shims.mkdir()
    log.mkdir()
    for name, text in {
        "srun": FAKE_SRUN,
        "scontrol": FAKE_SCONTROL,
        "python": "#!/bin/bash\nexit 0\n",
    }.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shims}:{os.environ['PATH']}",
        "PYTHON": str(shims / "python"),  # restore.py: nothing to restore
        "SHIM_LOG": str(log),
        "SLURM_SUBMIT_DIR": str(SBATCH.parents[2]),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_PER_NODE": "h100:8",
        "SLURM_CPUS_ON_NODE": "32",
        "GREENRUN_BUCKET": "my-bucket",
    }
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "trainer.max_steps=10"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not (log / "srun.env").is_file() or not (log / "srun.env").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    time.sleep(0.2)  # the batch shell is in its wait loop
    # "batch": the batch shell only (--signal=B:...); "job": every process of the job (scancel, time limit).
    (os.kill if signal_to == "batch" else os.killpg)(proc.pid, sig)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, log, out


def test_sbatch_requeues_after_the_time_limit_notice(tmp_path: Path) -> None:
    rc, log, out = run_sbatch_with("batch", signal.SIGUSR1, tmp_path)
    assert rc == EXIT_PREEMPTED and (log / "requeued").read_text().strip() == "42", out
    args = (log / "srun.args").read_text().splitlines()
    assert {"--kill-on-bad-exit=0", "--ntasks-per-node=1", "--cpus-per-task=32", "resume=auto"} <= set(args)
    assert f"run.dir={SBATCH.parents[2]}/runs/greenrun-42" in args and args[-1] == "trainer.max_steps=10"
    env = dict(line.split("=", 1) for line in (log / "srun.env").read_text().splitlines() if "=" in line)
    assert (env["NNODES"], env["NPROC_PER_NODE"]) == ("2", "8")
    assert (env["RDZV_ENDPOINT"], env["RDZV_ID"]) == ("node1:29500", "42")


def test_sbatch_does_not_requeue_after_a_plain_sigterm(tmp_path: Path) -> None:
    rc, log, out = run_sbatch_with("job", signal.SIGTERM, tmp_path)  # scancel: the user wants it stopped
    assert rc == EXIT_PREEMPTED and not (log / "requeued").exists(), out
    assert "not requeued" in out


# --- skypilot.yaml -------------------------------------------------------------------------------------


def skypilot_task() -> dict:
    return yaml.safe_load(SKYPILOT.read_text())


def test_skypilot_yaml_recovers_on_exit_75_and_resumes() -> None:
    task = skypilot_task()
    resources = task["resources"]
    assert resources["use_spot"] is True
    recovery = resources["job_recovery"]
    codes = recovery["recover_on_exit_codes"]
    assert EXIT_PREEMPTED in codes and 137 not in codes  # 137: SkyPilot's own
    assert isinstance(recovery["max_restarts_on_errors"], int)
    assert "resume=auto" in task["run"] and "scripts/cluster/restore.py" in task["run"]
    for name in ("SKYPILOT_NUM_NODES", "SKYPILOT_NUM_GPUS_PER_NODE", "SKYPILOT_NODE_IPS", "SKYPILOT_TASK_ID"):
        assert name in task["run"], name
    assert "GREENRUN_BUCKET" in task["envs"]


def test_skypilot_loader_accepts_the_task() -> None:
    sky = pytest.importorskip("sky", reason="skypilot not installed (CI does not install it)")
    from sky.utils import schemas

    with pytest.raises(ValueError, match="GREENRUN_BUCKET"):  # the bucket must be given at launch
        sky.Task.from_yaml(str(SKYPILOT))
    task = sky.Task.from_yaml_config(skypilot_task(), env_overrides=[("GREENRUN_BUCKET", "my-bucket")])
    (resources,) = task.resources
    assert resources.use_spot and resources.job_recovery["recover_on_exit_codes"] == [75, 76]
    # The client lets unknown job_recovery keys through (the API server checks them): check the names here.
    known = schemas.get_resources_schema()["properties"]["job_recovery"]["anyOf"][1]["properties"]
    assert set(skypilot_task()["resources"]["job_recovery"]) <= set(known)


# --- launch.sh: torchrun's exit 1 becomes rank 0's 75 ----------------------------------------------------


def torchrun_forwards_usr1() -> bool:
    import torch.distributed.run as torchrun

    return "--signals-to-handle" in inspect.getsource(torchrun)


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torchrun_forwards_usr1(),
    reason="torch without torch.distributed, or a torchrun without --signals-to-handle",
)
def test_launch_exits_75_when_torchrun_forwards_usr1(tiny: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "launched"
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    args = [*tiny, "trainer.device=cpu", "trainer.max_steps=100000", "trainer.log_interval=1"]
    cmd = [
        "bash",
        str(LAUNCH),
        "train",
        *args,
        "checkpoint.interval=0",
        "preflight=false",
        f"run.dir={run_dir}",
    ]
    # A session of its own, as an srun task is: the signal goes to launch.sh and torchrun, and torchrun
    # forwards it to the workers (each in a session of its own).
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 240
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()[1].decode()[-4000:]
            assert time.monotonic() < deadline, "no training step within 240 s"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = err.decode()
    assert proc.returncode == EXIT_PREEMPTED, log[-4000:]
    assert re.search(r"launch\.sh: rank 0 exited 75 \(torchrun: [1-9]", log), log[-4000:]
    assert checkpoint.latest_valid(run_dir / "checkpoints") is not None  # storage=local: committed here
    assert json.loads((run_dir / "summary.json").read_text())["preempted"]


# --- restore.py: an empty disk gets the bucket's newest checkpoint --------------------------------------


def restore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RESTORE), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # two short CPU trainings against a moto bucket: ~40 s on 2 cores
def test_restore_then_resume_auto_continues_on_an_empty_disk(
    tiny: list[str], s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    s3 = ["storage=s3", f"storage.bucket={s3_bucket.name}", f"storage.endpoint_url={s3_bucket.endpoint_url}"]
    common = [*tiny, *s3, "trainer.max_steps=4", "checkpoint.interval=2", "preflight=false"]
    first = tmp_path / "machine-a" / "run-x"
    r = run_cli("train", *common, "trainer.stop_at_step=2", f"run.dir={first}")
    assert r.returncode == 0, r.stderr[-4000:]
    url, endpoint = f"s3://{s3_bucket.name}/greenrun/run-x", f"storage.endpoint_url={s3_bucket.endpoint_url}"
    cache = next(o for o in tiny if o.startswith("data.cache_dir="))

    # Nothing in the bucket under another name: a first start, nothing written.
    never = tmp_path / "machine-b" / "run-y"
    r = restore(f"s3://{s3_bucket.name}/greenrun/run-y", str(never), endpoint, cache)
    assert r.returncode == 0 and "no committed checkpoint" in r.stdout, r.stdout + r.stderr
    assert not never.exists()
    # The run is on this disk already: resume=auto continues it, nothing to fetch.
    r = restore(url, str(first), endpoint, cache)
    assert r.returncode == 0 and "resume=auto continues it" in r.stdout, r.stdout + r.stderr

    fresh = tmp_path / "machine-b" / "run-x"
    r = restore(url, str(fresh), endpoint, cache)
    assert r.returncode == 0 and "restored step-00000002" in r.stdout, r.stdout + r.stderr
    assert checkpoint.latest_valid(fresh / "checkpoints").name == "step-00000002"
    r = run_cli("train", *common, "resume=auto", f"run.dir={fresh}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((fresh / "summary.json").read_text())["step"] == 4
    steps = [json.loads(line)["step"] for line in (fresh / "metrics.jsonl").read_text().splitlines()]
    assert min(steps) >= 2, steps  # continued from step 2: steps 0-1 ran on the other machine only

    wrong = tmp_path / "machine-c" / "other-name"
    r = restore(url, str(wrong), endpoint)
    assert r.returncode == 2 and "must be named run-x" in r.stderr, r.stdout + r.stderr
