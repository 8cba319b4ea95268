"""`greenrun archive`: old checkpoints in S3 move to a colder storage class; the newest and the best stay hot."""

from tests.common import run_cli

pytest_plugins = ["tests.s3_fixtures"]


def test_archive_moves_old_checkpoints_only(s3_bucket, tiny, tmp_path):
    run_dir = tmp_path / "arch-run"
    s3 = [
        "storage=s3",
        f"storage.bucket={s3_bucket.name}",
        "storage.prefix=team",
        f"storage.endpoint_url={s3_bucket.endpoint_url}",
    ]
    r = run_cli(
        "train",
        *tiny,
        *s3,
        "trainer.max_steps=3",
        "checkpoint.interval=1",
        "checkpoint.keep_last=3",
        "trainer.eval_interval=1",
        "preflight=false",
        f"run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr
    url = f"s3://{s3_bucket.name}/team/arch-run"
    r = run_cli(
        "archive",
        url,
        "older_than_days=0",
        "storage_class=STANDARD_IA",
        f"storage.endpoint_url={s3_bucket.endpoint_url}",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    classes = {}
    for obj in s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix="team/arch-run/checkpoints/")[
        "Contents"
    ]:
        if obj["Key"].endswith(".safetensors"):
            step = obj["Key"].split("/")[3]
            head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=obj["Key"])
            classes[step] = head.get("StorageClass", "STANDARD")
    assert classes["step-00000003"] == "STANDARD"  # newest stays hot
    assert "STANDARD_IA" in classes.values()
    r = run_cli("archive", url, "older_than_days=zero", f"storage.endpoint_url={s3_bucket.endpoint_url}")
    assert r.returncode == 2 and "older_than_days" in r.stderr
