"""Bad input gets one clear message naming the key or file, the right exit code and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greenrun.core import shipped
from tests.common import run_cli


def test_ctrl_c_while_starting_up_prints_no_traceback(tiny: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for delay in (0.5, 1.5, 3.0):
        proc = subprocess.Popen(
            [sys.executable, "-m", "greenrun", "train", *tiny, f"run.dir={tmp_path / str(delay)}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert "Traceback" not in out + err, err[-3000:]
        # Before training a Ctrl-C is "interrupted" (130); once training runs it is a preemption (75). A signal
        # that beats the interpreter's own start-up kills it outright (-SIGINT), which prints nothing either.
        assert proc.returncode in (130, 75, -signal.SIGINT), (proc.returncode, err[-2000:])


def test_a_yaml_mistake_in_a_user_recipe_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "recipe").mkdir()
    bad = tmp_path / "recipe" / "broken.yaml"
    bad.write_text("# @package _global_\ntrainer:\n  max_steps: 3\n   eval_interval: [1, 2\n")
    r = run_cli("train", f"hydra.searchpath=[file://{tmp_path}]", "+recipe=broken", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"{bad}:4" in r.stderr and "not valid YAML" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_a_shipped_recipe_copied_into_a_searchpath_works_as_a_user_recipe(tmp_path: Path) -> None:
    (tmp_path / "recipe").mkdir()
    shutil.copy(shipped.recipes_dir() / "bf16_ckpt.yaml", tmp_path / "recipe" / "mine.yaml")
    r = run_cli(
        "train", f"hydra.searchpath=[file://{tmp_path}]", "+recipe=mine", "--cfg", "job", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "name: bf16" in r.stdout and "policy: full" in r.stdout


def test_binary_input_is_refused_naming_the_file(tiny: list[str], tmp_path: Path) -> None:
    blob = tmp_path / "model.bin"
    blob.write_bytes(bytes(range(256)) * 64)
    r = run_cli(
        "train", *tiny, "data=text", f"data.paths=[{blob}]", f"run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert r.returncode == 2, r.stderr
    assert str(blob) in r.stderr and "binary" in r.stderr and "Traceback" not in r.stderr


def test_non_utf8_text_is_refused_unless_an_encoding_or_policy_is_set(
    tiny: list[str], tmp_path: Path
) -> None:
    good = tmp_path / "good.txt"
    good.write_text("def add(a, b):\n    return a + b\n" * 4000)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème brûlée\n".encode("latin-1") * 2000)
    common = [*tiny, "data=text", f"data.paths=[{tmp_path}/*.txt]", "preflight=false", "trainer.max_steps=1"]
    r = run_cli("train", *common, f"run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert r.returncode == 2 and str(latin) in r.stderr and "data.encoding" in r.stderr, r.stderr
    r = run_cli("train", *common, "data.encoding_errors=skip", f"run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"left out {latin}" in r.stderr
    r = run_cli("train", *common, "data.encoding=latin-1", f"run.dir={tmp_path / 'c'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # both files decode as latin-1 (ASCII is a subset)


def test_a_bad_endpoint_url_is_a_config_error_before_the_preflight(tmp_path: Path) -> None:
    r = run_cli("train", "storage=s3", "storage.bucket=b", "storage.endpoint_url=notaurl", cwd=tmp_path)
    assert r.returncode == 2 and "storage.endpoint_url" in r.stderr, r.stderr
    assert "smoke" not in r.stdout.lower() and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["train", "model.n_head=3"], ["smoke", "model.n_layer=0"]])
def test_failed_checks_and_smoke_runs_leave_no_run_directory_behind(args: list[str], tmp_path: Path) -> None:
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert not (tmp_path / "runs").exists(), list((tmp_path / "runs").rglob("*"))


def test_ctrl_c_during_tokenisation_stops_promptly_and_publishes_no_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "greenrun",
            "train",
            "data.max_chars=0",
            f"data.cache_dir={cache}",
            "preflight=false",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4.0)  # the whole standard library takes far longer than this to tokenise on 2 cores
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    waited = time.monotonic() - t0
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    assert waited < 10, f"took {waited:.1f} s to act on Ctrl-C"
    assert not list(cache.rglob("meta.json")), "an interrupted build must never look complete"


def test_a_run_that_fails_in_its_preflight_leaves_no_run_directory(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("def f():\n    return 1\n")
    r = run_cli(
        "train", "data=text", "data.paths=[small.txt]", f"data.cache_dir={tmp_path / 'c'}", cwd=tmp_path
    )
    assert r.returncode == 2, r.stderr
    assert "small.txt" in r.stderr or "corpus" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resuming_a_finished_run_changes_nothing(tiny: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "done"
    r = run_cli("train", *tiny, "trainer.max_steps=3", "preflight=false", f"run.dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    summary = json.loads((run_dir / "summary.json").read_text())
    for args in (
        ["resume", str(run_dir)],
        ["train", *tiny, "trainer.max_steps=3", f"run.dir={run_dir}", "resume=auto"],
    ):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"already finished at step 3, val loss {summary['val_loss']:.4f}" in r.stdout
        after = {
            p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")
        }
        assert after == before


def test_a_torn_last_line_in_metrics_does_not_block_resume(tiny: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "torn"
    common = [*tiny, "trainer.max_steps=6", "trainer.log_interval=1", "preflight=false", f"run.dir={run_dir}"]
    r = run_cli("train", *common, "trainer.stop_at_step=3", "checkpoint.interval=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.1, "to')  # a kill in the middle of a write
    r = run_cli("resume", str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dropped 1 torn line" in r.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6 and steps.count(4) == 1


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs: room for one checkpoint of the test model and not for two."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_says_so_keeps_the_previous_checkpoint_and_exits_1(tiny: list[str], small_disk: Path):
    from greenrun.ckpt import checkpoint

    run_dir = small_disk / "run"
    r = run_cli(
        "train",
        *tiny,
        "trainer.max_steps=6",
        "checkpoint.interval=1",
        "checkpoint.keep_last=2",
        "trainer.sample_tokens=0",
        "preflight=false",
        f"run.dir={run_dir}",
    )
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "no space left on" in r.stderr and "previous checkpoints are kept" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "enforce fail" not in r.stderr
    good = checkpoint.latest_valid(run_dir / "checkpoints")
    assert good is not None and checkpoint.verify(good) is None
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
