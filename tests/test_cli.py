"""The real `greenrun` command in a subprocess: help, config printing, errors and exit codes."""

from tests.common import run_cli


def test_no_args_prints_usage_and_exits_2():
    r = run_cli()
    assert r.returncode == 2 and "usage: greenrun" in r.stdout


def test_unknown_command_suggests():
    r = run_cli("trian")
    assert r.returncode == 2 and "did you mean 'train'" in r.stderr


def test_help_lists_groups_options_and_documented_keys():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    for text in ("precision", "bf16", "recipe", "bf16_ckpt", "optimizer.lr", "peak learning rate"):
        assert text in r.stdout


def test_cfg_job_prints_composed_config(tiny):
    r = run_cli("train", "+recipe=bf16_ckpt", "optimizer.lr=3e-4", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert "lr: 0.0003" in r.stdout and "name: bf16" in r.stdout and "policy: full" in r.stdout


def test_bad_overrides_are_reported_together_with_exit_2():
    r = run_cli("train", "trainer.max_step=3", "optimizer.lr=fast")
    assert r.returncode == 2
    assert "2 configuration problems" in r.stderr
    assert "did you mean trainer.max_steps" in r.stderr and "optimizer.lr=fast" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_impossible_combination_exit_2(tmp_path):
    r = run_cli("train", "model.n_head=5", "trainer.stop_at_step=9999", f"run.dir={tmp_path / 'r'}")
    assert r.returncode == 2
    assert "model.n_embd" in r.stderr and "trainer.stop_at_step" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_data_path_is_one_clear_message(tmp_path, tiny):
    r = run_cli("train", *tiny, "data=text", "data.paths=[nowhere/*.txt]", f"run.dir={tmp_path / 'r'}")
    assert r.returncode == 2
    assert "data.paths" in r.stderr and "nowhere/*.txt" in r.stderr
    assert "Traceback" not in r.stderr


def test_s3_without_bucket_names_the_key(tmp_path):
    r = run_cli("train", "storage=s3", f"run.dir={tmp_path / 'r'}")
    assert r.returncode == 2 and "storage.bucket" in r.stderr


def test_resume_refuses_a_non_run_directory(tmp_path):
    r = run_cli("resume", str(tmp_path))
    assert r.returncode == 2 and "config.yaml" in r.stderr
