"""The README's fenced commands, run as written (with short step counts and the tiny test model), so an example
that stops working fails here before a new user meets it. A command that needs a GPU or a bucket is listed with
the reason it is not run here; a new command that is neither run nor listed fails the test."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.common import TINY, run_cli

README = Path(__file__).resolve().parent.parent / "README.md"

# Commands the CPU suite cannot run, with the reason (the set-up lines are what .ci/run itself runs).
NOT_HERE = {
    "greenrun train +recipe=gpt2_gpu": "needs a CUDA GPU (trainer.device=cuda)",
    "torchrun": "the GPU multi-process example; tests/test_ddp.py runs torchrun with gloo on the CPU",
    "python3 -m venv": "the set-up command: .ci/run runs it on a clean clone",
    "pip install": "the set-up and test commands: .ci/run runs them",
}


def readme_commands() -> list[str]:
    """Every command line of every ```bash block, continuation lines joined and trailing comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            if line:
                commands.append(line)
    return commands


def _skipped(command: str) -> str | None:
    return next((why for start, why in NOT_HERE.items() if command.startswith(start)), None)


def test_every_readme_command_is_run_here_or_says_why_not():
    commands = readme_commands()
    assert commands, "no ```bash blocks found in README.md"
    unknown = [c for c in commands if not c.startswith("greenrun ") and _skipped(c) is None]
    assert unknown == [], f"README commands this test neither runs nor lists in NOT_HERE: {unknown}"


def test_the_readme_examples_work_as_written(tmp_path: Path, cache_dir: Path) -> None:
    """Run in order in one directory: the slice example makes the run that the resume example continues."""
    (tmp_path / "notes" / "sub").mkdir(parents=True)
    (tmp_path / "notes" / "sub" / "a.md").write_text(
        "# Notes\n\n" + "Some words about training, cheaply.\n" * 3000
    )
    quick = [*TINY, f"data.cache_dir={cache_dir}", "trainer.max_steps=4", "trainer.eval_interval=2"]
    ran, last_run_dir = 0, None
    for command in readme_commands():
        if _skipped(command) is not None:
            continue
        args = shlex.split(command)[1:]
        verb = args[0]
        if verb == "resume" and len(args) > 1 and not args[1].startswith("s3://"):
            assert last_run_dir is not None, "the README resumes a run before any example made one"
            args[1] = str(
                last_run_dir
            )  # the README's example run directory name stands for the run made above
        elif verb == "train":
            if "--cfg" in args or "--help" in args:
                pass
            else:
                stop = [a for a in args if a.startswith("trainer.stop_at_step=")]
                steps = ["trainer.max_steps=6", "trainer.stop_at_step=3"] if stop else []
                last_run_dir = tmp_path / f"run{ran}"
                flags = [a for a in args[1:] if a.startswith("-")]  # Hydra wants -m before the overrides
                rest = [a for a in args[1:] if not a.startswith(("-", "trainer."))]
                args = [verb, *flags, *quick, *rest, *steps, f"run.dir={last_run_dir}"]
        r = run_cli(*args, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, (
            f"README: `{command}` exited {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
        )
        assert "Traceback" not in r.stderr, command
        ran += 1
    assert ran >= 4, f"only {ran} README commands ran"


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith("greenrun ")])
def test_every_readme_greenrun_command_parses(command: str) -> None:
    """Even the commands that need a GPU or a bucket must name real keys and options."""
    args = [a for a in shlex.split(command)[1:] if a not in ("-m", "--multirun")]
    if args[0] not in ("train", "smoke"):
        pytest.skip("resume/archive take a run, not overrides alone")
    args = [a.split("=")[0] + "=" + a.split("=", 1)[1].split(",")[0] if "," in a else a for a in args]
    r = run_cli(*args, "--cfg", "job")  # a sweep's first value stands for all (each is checked when it runs)
    assert r.returncode == 0, f"`{command}` does not compose: {r.stderr[-2000:]}"
