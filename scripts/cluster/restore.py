"""Bring a run's newest checkpoint down from its bucket before `greenrun train … resume=auto` starts on a machine
whose disk does not have the run: a SkyPilot recovery (always a new cluster) or a Slurm job on a new scratch dir.

    python scripts/cluster/restore.py s3://BUCKET/PREFIX/RUN RUN_DIR [storage.KEY=VALUE ...] [data.cache_dir=DIR]

`resume=auto` continues RUN_DIR only when RUN_DIR/config.yaml is on this disk; on an empty disk it starts the run
again from step 0. So, once per machine and before torchrun:

- RUN_DIR/config.yaml is here: nothing to do (resume=auto continues what this disk has);
- the bucket has no committed checkpoint of the run: nothing to do (a first start; train starts it);
- else: config.yaml, the newest checkpoint that verifies and the token cache come down (what
  `greenrun resume s3://…` does first), so every rank of the next start continues that step.

RUN_DIR's name must be RUN, the run's key in the bucket (greenrun's own rule). Exit 0 in the three cases, 1 when
the bucket cannot be read or no checkpoint verifies, 2 for a usage error; the reason is printed. One process per
machine, not one per rank: the download goes into RUN_DIR once, under the run directory's lock.
"""

from __future__ import annotations

import sys
from pathlib import Path

from greenrun import config, job, runs, storage
from greenrun.ckpt import checkpoint
from greenrun.ckpt.remote import Remote, parse_run_url
from greenrun.config import ConfigError


def restore(url: str, run_dir: Path, overrides: list[str]) -> job.JobResult:
    if (run_dir / "config.yaml").is_file():
        return job.JobResult(job.Outcome.OK, f"{run_dir} holds the run: resume=auto continues it")
    bad = [o for o in overrides if not o.startswith(("storage.", "data.cache_dir="))]
    if bad:
        raise ConfigError([f"{o}: only storage.KEY=VALUE and data.cache_dir=DIR are passed on" for o in bad])
    try:
        bucket, key = parse_run_url(url)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    prefix, _, run_id = key.rpartition("/")
    if run_dir.resolve().name != run_id:
        raise ConfigError([f"{run_dir}: the run directory of {url} must be named {run_id}"])
    # The same storage settings `greenrun resume s3://…` would use: the URL's bucket and prefix, then storage.*.
    probe = config.apply_overrides(
        config.Config(),
        [f"storage.bucket={bucket}", f"storage.prefix={prefix}", "storage.kind=s3"]
        + [o for o in overrides if o.startswith("storage.")],
    )
    if problems := storage.validate(probe.storage):
        raise ConfigError(problems)
    if not Remote(storage.build(probe.storage, run_dir.parent), run_id).steps():
        return job.JobResult(
            job.Outcome.OK, f"{url}: no committed checkpoint yet; the run starts from step 0"
        )
    found = runs.find(url, [*overrides, f"run.dir={run_dir}"])
    with runs.hold(found.local_dir):
        runs.restore(found)
    newest = next(iter(checkpoint.committed(found.local_dir / "checkpoints")), None)
    where = newest.name if newest is not None else "the run"
    return job.JobResult(job.Outcome.OK, f"{url}: restored {where} into {found.local_dir}")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    result = job.guarded(lambda: restore(argv[0], Path(argv[1]), argv[2:]))
    print(f"restore.py: {result.message}", file=sys.stderr if result.exit_code else sys.stdout)
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
