"""What someone who can write a shared bucket or a run directory can no longer make greenrun do.

A config from a bucket or a run directory is plain data: `${...}` in it is refused, never resolved. Keys that
name local paths and URLs come from this machine, never from the bucket. Writes in a run directory never go
through a symlink. A config.yaml that is garbage is a usage error naming the file and key. Everything runs the
real CLI in subprocesses against moto on 127.0.0.1, with AWS_SECRET_ACCESS_KEY set to a marker that must
appear nowhere.
"""

from __future__ import annotations

import os
import sysconfig
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from greenrun import data
from greenrun.core import fs
from tests.common import TINY, run_cli

pytest_plugins = ["tests.s3_fixtures"]

MARKER = f"LEAKED{uuid.uuid4().hex}"  # the child's AWS secret: must reach no output, file, object or request
PREFIX = "greenrun"  # storage.prefix of conf/storage/s3.yaml
INTERPOLATION = "${oc.env:AWS_SECRET_ACCESS_KEY}"


class Recorder:
    """An HTTP server on 127.0.0.1 that answers 404 and remembers every request line and header."""

    def __init__(self) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                seen.append(f"{self.command} {self.path} {dict(self.headers)}")
                self.send_error(404)

            do_PUT = do_POST = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.stop()


@pytest.fixture
def child_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    # HOME under tmp_path: the default data.cache_dir (~/.cache/greenrun) is then searched below too.
    return {"AWS_SECRET_ACCESS_KEY": MARKER, "HOME": str(home), "OMP_NUM_THREADS": "1", "COLUMNS": "400"}


def s3_args(bucket) -> list[str]:
    return ["storage=s3", f"storage.bucket={bucket.name}", f"storage.endpoint_url={bucket.endpoint_url}"]


def corpus(tmp_path: Path) -> Path:
    """A text corpus: real Python source nobody here wrote, enough for the tiny model's tokenizer."""
    path = tmp_path / "corpus" / "code.txt"
    path.parent.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path.write_text("".join((stdlib / name).read_text() for name in ("os.py", "argparse.py", "inspect.py")))
    return path


def train_into_bucket(tmp_path: Path, bucket, env: dict) -> tuple[str, Path]:
    """A data=text run mirrored to the bucket, stopped at step 3 of 6. Returns (its s3:// URL, its corpus)."""
    text = corpus(tmp_path)
    run_dir = tmp_path / "first" / "tampered-run"
    r = run_cli(
        "train",
        *TINY,
        "data=text",
        f"data.paths=[{text}]",
        f"data.cache_dir={tmp_path / 'first-cache'}",
        "trainer.max_steps=6",
        "trainer.stop_at_step=3",
        "preflight=false",
        *s3_args(bucket),
        f"run.dir={run_dir}",
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return f"s3://{bucket.name}/{PREFIX}/{run_dir.name}", text


def bucket_objects(bucket) -> dict[str, bytes]:
    pages = bucket.client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name)
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    return {key: bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read() for key in keys}


def plant(bucket, url: str, changes: dict[str, object]) -> None:
    """Rewrite the bucket's config.yaml of the run at `url` with dotted-key changes, as an attacker would."""
    key = url.removeprefix(f"s3://{bucket.name}/") + "/config.yaml"
    saved = yaml.safe_load(bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read())
    for dotted, value in changes.items():
        group, name = dotted.split(".")
        saved[group][name] = value
    bucket.client.put_object(Bucket=bucket.name, Key=key, Body=yaml.safe_dump(saved).encode())


def everything_written(root: Path) -> list[tuple[str, bytes]]:
    """(path, content) of every file below root; directory and file names count as content too."""
    found = []
    for d, dirs, names in os.walk(root):
        found += [(str(Path(d, n)), b"") for n in dirs]
        found += [(str(Path(d, n)), Path(d, n).read_bytes()) for n in names if not Path(d, n).is_symlink()]
    return found


def decoded_token_caches(root: Path) -> list[str]:
    """The text of every token cache below root, decoded back from its shards."""
    texts = []
    for meta in root.rglob("meta.json"):
        if not (meta.parent / "tokenizer.json").is_file():
            continue  # a checkpoint's or a download's marker, not a token cache
        ds = data.Dataset(meta.parent)
        ids = np.concatenate([np.asarray(s) for split in ds.shards.values() for s in split])
        texts.append(ds.decode(ids.tolist()))
    return texts


# --- a bucket config.yaml with ${...} in it ----------------------------------------------------------------


def test_an_interpolation_planted_in_the_bucket_config_is_refused_and_never_resolved(
    s3_bucket, recorder, child_env, tmp_path
):
    url, _ = train_into_bucket(tmp_path, s3_bucket, child_env)
    planted = {
        "spot.metadata_url": f"{recorder.url}/{INTERPOLATION}",
        "spot.provider": "aws",
        "run.dir": f"{tmp_path}/{INTERPOLATION}",
        "data.cache_dir": f"{tmp_path}/{INTERPOLATION}",
        "trainer.device": INTERPOLATION,
    }
    plant(s3_bucket, url, planted)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli("resume", url, f"storage.endpoint_url={s3_bucket.endpoint_url}", cwd=elsewhere, env=child_env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{url}/config.yaml" in r.stderr and "plain data" in r.stderr and "Traceback" not in r.stderr
    for key in ("spot.metadata_url", "run.dir", "data.cache_dir", "trainer.device"):
        assert f"{key}: " in r.stderr, key
    assert MARKER not in r.stdout + r.stderr
    assert list(elsewhere.iterdir()) == [], "nothing may be written for a refused config"
    assert [
        p for p, content in everything_written(tmp_path) if MARKER in p or MARKER.encode() in content
    ] == []
    assert [
        k for k, body in bucket_objects(s3_bucket).items() if MARKER in k or MARKER.encode() in body
    ] == []
    assert recorder.seen == []


# --- local paths and URLs planted in the bucket config: this machine's values are used ---------------------


def test_paths_and_urls_planted_in_the_bucket_config_are_not_used(s3_bucket, recorder, child_env, tmp_path):
    url, text = train_into_bucket(tmp_path, s3_bucket, child_env)
    secret = tmp_path / "secret.txt"
    secret_text = f"TOPSECRET {uuid.uuid4().hex} do not tokenize\n" * 400
    secret.write_text(secret_text)
    evil_cache, evil_run = tmp_path / "evil-cache", tmp_path / "evil-run" / "tampered-run"
    plant(
        s3_bucket,
        url,
        {
            "data.paths": [str(secret)],
            "data.cache_dir": str(evil_cache),
            "run.dir": str(evil_run),
            "spot.metadata_url": f"{recorder.url}/leak",
        },
    )
    # Without the bucket's token cache the tokens would have to be rebuilt: from data.paths of this command
    # line only, so with none given the resume stops and says what to pass.
    for key in [k for k in bucket_objects(s3_bucket) if "/data/" in k]:
        s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key=key)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    common = [url, f"storage.endpoint_url={s3_bucket.endpoint_url}", f"data.cache_dir={tmp_path / 'cache2'}"]
    r = run_cli("resume", *common, cwd=elsewhere, env=child_env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "data.paths=[...]" in r.stderr and "never from a saved config" in r.stderr, r.stderr[-3000:]

    # With the corpus on the command line the run continues: same text, same token cache key.
    r = run_cli("resume", *common, f"data.paths=[{text}]", cwd=elsewhere, env=child_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 3" in r.stdout + r.stderr
    restored = elsewhere / "runs" / "tampered-run"
    saved = yaml.safe_load((restored / "config.yaml").read_text())
    assert saved["data"]["paths"] == [str(text)] and saved["data"]["cache_dir"] == str(tmp_path / "cache2")
    assert saved["run"]["dir"] == str(restored) and saved["spot"]["metadata_url"] is None

    assert not evil_cache.exists() and not evil_run.exists()
    assert recorder.seen == []
    marker = secret_text.splitlines()[0].encode()
    assert [p for p, content in everything_written(tmp_path) if marker in content and p != str(secret)] == []
    assert [k for k, body in bucket_objects(s3_bucket).items() if marker in body] == []
    caches = decoded_token_caches(tmp_path)
    assert caches and not [t for t in caches if "TOPSECRET" in t]
    assert [p for p, c in everything_written(tmp_path) if MARKER in p or MARKER.encode() in c] == []


# --- garbage in a run directory's config.yaml ---------------------------------------------------------------


@pytest.mark.parametrize(
    "content,names",
    [
        (bytes(range(256)) * 8, ["not UTF-8"]),
        (b"model:\n  n_layer: many\n", ["model.n_layer"]),
        (b"- just\n- a list\n", ["not list"]),
        (b"model: 7\noptimizer:\n  lr: [1, 2\n", ["not valid YAML", "line"]),
        (b"model:\n  n_layer: 2\nmystery: 1\n", ["mystery: no such key"]),
        (f"optimizer:\n  name: '{INTERPOLATION}'\n".encode(), ["optimizer.name", "plain data"]),
    ],
    ids=["binary", "wrong-type", "not-a-mapping", "bad-yaml", "unknown-key", "interpolation"],
)
def test_resume_of_a_garbage_config_yaml_names_the_file_and_key(content, names, child_env, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_bytes(content)
    r = run_cli("resume", str(run_dir), env=child_env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert str(run_dir / "config.yaml") in r.stderr and "Traceback" not in r.stderr
    for name in names:
        assert name in r.stderr, (name, r.stderr[-2000:])
    assert MARKER not in r.stderr


# --- symlinks in a run directory --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["summary.json", "config.yaml", "metrics.jsonl", "export"])
def test_a_symlink_in_the_run_dir_is_refused_and_its_target_unchanged(name, tiny, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / ("dir" if name == "export" else "precious.txt")
    if name == "export":
        target.mkdir()
    else:
        target.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to(target)
    r = run_cli("train", *tiny, "trainer.max_steps=2", "preflight=false", f"run.dir={run_dir}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert str(run_dir / name) in r.stderr and "symlink" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in outside.rglob("*")) == [target.name]
    if name != "export":
        assert target.read_text() == "precious"


def test_writes_refuse_symlinks_even_when_planted_mid_run(tmp_path):
    """The run directory check happens at start; each write checks again (a link can appear later)."""
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    for name in ("summary.json", "metrics.jsonl"):
        (tmp_path / name).symlink_to(target)
    with pytest.raises(fs.UnsafePath):
        fs.atomic_write(tmp_path / "summary.json", "{}")
    with pytest.raises(fs.UnsafePath):
        fs.append(tmp_path / "metrics.jsonl", "{}\n")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(fs.UnsafePath):  # a FIFO would block the writer forever
        fs.append(tmp_path / "fifo", "{}\n")
    assert target.read_text() == "precious"
    fs.append(tmp_path / "fresh.jsonl", "a\n")
    fs.append(tmp_path / "fresh.jsonl", "b\n")
    assert (tmp_path / "fresh.jsonl").read_text() == "a\nb\n"
