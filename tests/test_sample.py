"""`greenrun sample`: text from a run's newest valid checkpoint or a chosen step, the same for the same seed,
the run's own end-of-run sample by default (one code path), from a local run directory and from s3://."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from greenrun import cli, config, job
from tests.common import TINY, run_cli

pytest_plugins = ["tests.s3_fixtures"]

RUN = ["trainer.max_steps=4", "trainer.eval_interval=2", "checkpoint.interval=2", "checkpoint.keep_last=3"]
RUN += ["optimizer.lr=1e-2", "trainer.sample_tokens=24", "preflight=false"]


def _train(run_dir: Path, cache_dir: Path, *extra: str) -> None:
    overrides = [*TINY, f"data.cache_dir={cache_dir}", *RUN, *extra, f"run.dir={run_dir}"]
    result = job.guarded(lambda: job.train(config.apply_overrides(config.Config(), overrides)))
    assert result.exit_code == 0, result.message


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("sample") / "run"
    _train(path, cache_dir)
    return path


def sample(capsys: pytest.CaptureFixture, *args: str) -> str:
    capsys.readouterr()
    assert cli.main(["sample", *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.rstrip("\n")


def test_the_same_seed_gives_the_same_text_and_another_seed_other_text(run_dir, capsys) -> None:
    first = sample(capsys, str(run_dir), "def ", "seed=7", "max_new_tokens=40", "temperature=1.0")
    again = sample(capsys, str(run_dir), "def ", "--seed", "7", "--max-new-tokens", "40", "temperature=1.0")
    other = sample(capsys, str(run_dir), "def ", "seed=8", "max_new_tokens=40", "temperature=1.0")
    assert first == again and first.startswith("def ")
    assert other != first  # 40 tokens drawn at temperature 1 from ~500: equal only by a fluke
    greedy = [sample(capsys, str(run_dir), "import ", "temperature=0", f"seed={s}") for s in (1, 2)]
    assert greedy[0] == greedy[1]  # greedy decoding ignores the seed


def test_the_defaults_reprint_the_runs_own_end_of_run_sample(run_dir, capsys) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sample"] and sample(capsys, str(run_dir)) == summary["sample"]


def test_a_chosen_step_is_sampled_and_a_missing_one_is_exit_2(run_dir, capsys) -> None:
    newest = sample(capsys, str(run_dir), "def ", "seed=3", "temperature=1.0", "max_new_tokens=40")
    assert (
        sample(capsys, str(run_dir), "def ", "seed=3", "temperature=1.0", "max_new_tokens=40", "step=4")
        == newest
    )
    older = sample(capsys, str(run_dir), "def ", "seed=3", "temperature=1.0", "max_new_tokens=40", "step=2")
    assert older != newest  # two optimizer steps at lr 1e-2 move the distribution
    r = run_cli("sample", str(run_dir), "def ", "step=3")  # the real command, as a user meets it
    assert r.returncode == 2 and "step=3" in r.stderr and "committed steps: 2, 4" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_options_name_the_option_exit_2(run_dir, capsys) -> None:
    for args, said in (
        (["top_k=-1"], "top_k=-1"),
        (["temperature=warm"], "temperature=warm"),
        (["seed=1.5"], "seed=1.5"),
        (["device=tpu"], "device"),
        (["topk=5"], "unknown option 'topk'"),
        (["a", "b"], "one PROMPT"),
    ):
        assert cli.main(["sample", str(run_dir), *args]) == 2, args
        assert said in capsys.readouterr().err, args
    assert cli.main(["sample"]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


def test_sample_from_the_bucket_at_a_step(run_dir, cache_dir, s3_bucket, tmp_path, capsys) -> None:
    """An s3:// run comes down as `resume` brings it (config, the checkpoint, the token cache), then samples."""
    trained = tmp_path / "up" / "s3-run"
    s3 = ["storage=s3", f"storage.bucket={s3_bucket.name}", f"storage.endpoint_url={s3_bucket.endpoint_url}"]
    _train(trained, cache_dir, *s3)
    url = f"s3://{s3_bucket.name}/greenrun/{trained.name}"
    here = [
        f"storage.endpoint_url={s3_bucket.endpoint_url}",
        f"data.cache_dir={tmp_path / 'fresh-cache'}",  # a fresh machine: the tokens come from the bucket
        f"run.dir={tmp_path / 'down' / trained.name}",
    ]
    picked = ["def ", "seed=5", "temperature=1.0", "max_new_tokens=30"]
    local = sample(capsys, str(trained), *picked, "step=2")
    assert sample(capsys, url, *picked, "step=2", *here) == local
    assert (tmp_path / "down" / trained.name / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    assert sample(capsys, url, *here) == json.loads((trained / "summary.json").read_text())["sample"]
    assert cli.main(["sample", url, "step=3", *here]) == 2
    assert "committed steps: 2, 4" in capsys.readouterr().err
