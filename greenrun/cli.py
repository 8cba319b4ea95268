"""The `greenrun` command: train, smoke, resume. Hydra composes; the DictConfig stops here.

Exit codes: 0 success, 1 runtime failure, 2 configuration or usage error.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
COMMANDS = ("train", "smoke", "resume", "archive")
# Hydra flags that take a value: their value is not an override.
VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
}

USAGE = """usage: greenrun COMMAND [overrides] [hydra flags]

commands:
  train  [key=value ...]           compose the config, run the CPU preflight, train, checkpoint
  smoke  [key=value ...]           the real config for two steps on the CPU: PASS/FAIL and a memory estimate
  resume RUN_DIR|s3://B/P/RUN [key=value ...]
                                   continue the newest valid checkpoint with the run's saved config
  archive RUN_DIR|s3://B/P/RUN [older_than_days=30] [storage_class=GLACIER_IR]
                                   move old checkpoints in S3 to a colder storage class (newest and best stay hot)

examples:
  greenrun train                               the tiny model on the bundled corpus (CPU, a few minutes)
  greenrun train +recipe=bf16_ckpt optimizer.lr=3e-4
  greenrun train -m precision=fp32,bf16        a sweep: one run per value
  greenrun train --cfg job                     print the composed config and exit
  greenrun train --help                        every config group, option and key
"""


def err(message: str) -> None:
    print(f"greenrun: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] in ("-V", "--version"):
        from greenrun import __version__

        print(f"greenrun {__version__}")
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from greenrun.core.checks import closest

        near = closest(command, COMMANDS)
        err(f"unknown command '{command}'" + (f"; did you mean '{near}'?" if near else "") + "\n" + USAGE)
        return EXIT_USAGE
    if command == "resume":
        return _guard(lambda: resume(rest))
    if command == "archive":
        return _guard(lambda: archive(rest))
    if "-h" in rest or "--help" in rest:
        print(help_text(command))
        return EXIT_OK
    return _compose_and_run(command, rest)


# --- train and smoke: through hydra.main, so --cfg, -m and friends behave as Hydra users expect -------


def _overrides(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in VALUE_FLAGS:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def _compose_and_run(command: str, args: list[str]) -> int:
    import hydra

    from greenrun import config
    from greenrun.core import checks

    problems = config.check_overrides(_overrides(args))
    fleet = os.environ.get("GREENRUN_PRECISION")
    if fleet is not None:
        problems += checks.choice(
            "GREENRUN_PRECISION (environment variable)", fleet, config.groups()["precision"]
        )
    if problems:
        err(str(config.ConfigError(problems)) + f"\nSee `greenrun {command} --help` for every group and key.")
        return EXIT_USAGE
    config.register()
    started = {"task": False}

    def task(dcfg) -> None:
        started["task"] = True
        code = _guard(lambda: _task(command, dcfg))
        if code:
            sys.exit(code)

    saved_argv = sys.argv
    sys.argv = [f"greenrun {command}", *args]
    try:
        hydra.main(version_base=None, config_path=str(config.conf_dir()), config_name="config")(task)()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_FAIL
        # Hydra exits 1 on composition errors, before any task ran: that is a usage error.
        return EXIT_USAGE if code == 1 and not started["task"] else code
    finally:
        sys.argv = saved_argv
    return EXIT_OK


def _task(command: str, dcfg) -> int:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from greenrun import config

    with open_dict(dcfg):
        dcfg.run.dir = HydraConfig.get().runtime.output_dir  # resolved once: ${now:} would drift
    cfg = config.to_typed(dcfg)
    config.validate(cfg, check_device=command != "smoke")
    if command == "smoke":
        return smoke(cfg)
    run_dir = Path(cfg.run.dir)
    if cfg.resume == "auto" and (run_dir / "config.yaml").is_file():
        # A scheduler re-running the same command: continue this run if it has a checkpoint, else start it.
        return continue_run(config.load_yaml(run_dir / "config.yaml"), cfg, run_dir, missing_ok=True)
    return train(cfg, run_dir)


def _guard(fn: Callable[[], int]) -> int:
    """Known failures become one message and an exit code; a traceback only with GREENRUN_DEBUG=1."""
    from greenrun.ckpt.checkpoint import CheckpointError
    from greenrun.config import ConfigError
    from greenrun.data import DataError

    try:
        return fn()
    except (ConfigError, DataError) as e:
        err(str(e))
        return EXIT_USAGE
    except CheckpointError as e:
        err(f"checkpoint: {e}")
        return EXIT_FAIL
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except Exception as e:
        if os.environ.get("GREENRUN_DEBUG"):
            raise
        err(f"failed: {type(e).__name__}: {e}\n(set GREENRUN_DEBUG=1 to see the traceback)")
        return EXIT_FAIL


# --- the commands ---------------------------------------------------------------------------------------


def smoke(cfg) -> int:
    from greenrun import smoke as smoke_mod
    from greenrun.core.output import Reporter

    result = smoke_mod.run(cfg)
    smoke_mod.print_result(result, cfg, Reporter())
    return EXIT_OK if result.passed else EXIT_FAIL


def train(cfg, run_dir: Path, resume_from: Path | None = None) -> int:
    from greenrun import config, runs
    from greenrun import smoke as smoke_mod
    from greenrun.ckpt import checkpoint
    from greenrun.core.output import Reporter
    from greenrun.runtime.spot import EXIT_PREEMPTED
    from greenrun.trainer import Trainer

    reporter = Reporter(enabled=int(os.environ.get("RANK", "0")) == 0)
    if cfg.preflight and resume_from is None:
        result = smoke_mod.run(cfg)
        smoke_mod.print_result(result, cfg, reporter)
        if not result.passed:
            err("preflight failed; fix the config (or skip the check with preflight=false)")
            return EXIT_FAIL
    run_dir.mkdir(parents=True, exist_ok=True)
    data_cache = None
    if resume_from is not None:
        key = checkpoint.read_manifest(resume_from).get("data_cache_key", "")
        data_cache = Path(cfg.data.cache_dir).expanduser() / key[:16] if key else None
    is_main = int(os.environ.get("RANK", "0")) == 0
    remote = runs.open_remote(cfg, run_dir) if is_main else None
    trainer = Trainer(cfg, run_dir, reporter=reporter, data_cache=data_cache)
    try:
        if is_main:
            # Written after the trainer resolved micro_batch_size=auto, so a resume reuses the numbers.
            _write_atomic(run_dir / "config.yaml", config.to_yaml(cfg))
            trainer.persister.uploader = runs.start_mirror(remote, run_dir, trainer.data.cache_path, cfg)
        if resume_from is not None:
            trainer.resume_from(resume_from)
            reporter.note(f"resumed from {resume_from} at step {trainer.step}")
        result = trainer.train()
        if result["preempted"]:
            reporter.note(f"preempted at step {result['step']}; continue with: greenrun resume {run_dir}")
            return EXIT_PREEMPTED
        sample = trainer.sample() if result["finished"] else ""
        if is_main:
            _write_atomic(run_dir / "summary.json", json.dumps({**result, "sample": sample}, indent=1))
            trainer.export_weights()
        if result["finished"]:
            reporter.summary(result, str(run_dir), sample)
        else:
            reporter.note(f"stopped at step {result['step']}; continue with: greenrun resume {run_dir}")
        return EXIT_OK
    finally:
        trainer.close()
        if remote is not None:
            remote.prune(cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)


def resume(args: list[str]) -> int:
    from greenrun import config, runs

    if "-h" in args or "--help" in args:
        print(help_text("resume"))
        return EXIT_OK
    positional = [a for a in args if "=" not in a and not a.startswith(("-", "~", "+"))]
    overrides = [a for a in args if a not in positional]
    if len(positional) > 1:
        raise config.ConfigError([f"resume takes one RUN_DIR or s3:// URL, got {positional}"])
    problems = config.check_overrides(overrides)
    if problems:
        raise config.ConfigError(problems)
    target = positional[0] if positional else "."
    if target.startswith("s3://"):
        saved, run_dir, overrides = runs.restore(target, overrides)
    else:
        run_dir = Path(target)
        saved_path = run_dir / "config.yaml"
        if not saved_path.is_file():
            raise config.ConfigError(
                [
                    f"{saved_path}: not a greenrun run directory (no config.yaml); pass the RUN_DIR `greenrun train` made"
                ]
            )
        saved = config.load_yaml(saved_path)
    # stop_at_step ended the last slice; a resume runs on unless the command line sets a new stop.
    saved = dataclasses.replace(saved, trainer=dataclasses.replace(saved.trainer, stop_at_step=None))
    cfg = config.apply_overrides(saved, overrides)
    return continue_run(saved, cfg, run_dir, missing_ok=False)


def archive(args: list[str]) -> int:
    from greenrun import config, runs

    opts = {"older_than_days": "30", "storage_class": "GLACIER_IR"}
    positional = [a for a in args if "=" not in a]
    for a in args:
        key, _, value = a.partition("=")
        if key in opts:
            opts[key] = value
        elif a not in positional and not key.startswith("storage."):
            raise config.ConfigError(
                [f"archive: unknown option '{key}'; use older_than_days=, storage_class= or storage.*"]
            )
    if len(positional) != 1:
        raise config.ConfigError(["archive takes one RUN_DIR or s3://bucket/prefix/run"])
    storage_overrides = [a for a in args if a.startswith("storage.")]
    target = positional[0]
    if target.startswith("s3://"):
        remote = runs.remote_for_url(target, storage_overrides)
    else:
        saved = config.apply_overrides(config.load_yaml(Path(target) / "config.yaml"), storage_overrides)
        remote = runs.open_remote(saved, Path(target))
        if remote is None:
            raise config.ConfigError(
                [f"{target}: this run has storage=local; archive moves S3 checkpoints only"]
            )
    try:
        days = float(opts["older_than_days"])
    except ValueError:
        raise config.ConfigError([f"older_than_days={opts['older_than_days']}: not a number"]) from None
    moved = remote.archive(days, opts["storage_class"])
    print(f"archived {len(moved)} checkpoint(s) to {opts['storage_class']}: {moved}")
    return EXIT_OK


def continue_run(saved, cfg, run_dir: Path, missing_ok: bool) -> int:
    """Resume `run_dir` with `cfg`, refusing math changes from `saved` unless allowed; start fresh if allowed."""
    from greenrun import config
    from greenrun.ckpt import checkpoint

    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))
    config.validate(cfg)
    changed = [(k, a, b) for k, a, b in config.diff(saved, cfg) if config.is_math_key(k)]
    if changed and not cfg.allow_config_change:
        lines = [f"{k}: {a!r} (saved) -> {b!r}" for k, a, b in changed]
        raise config.ConfigError(
            [
                "these overrides change the training math of a run in progress:\n      "
                + "\n      ".join(lines)
                + "\n    add allow_config_change=true to continue anyway (the run is then no longer exact)"
            ]
        )
    path = checkpoint.latest_valid(run_dir / "checkpoints", warn=lambda m: err(m))
    if path is None:
        if missing_ok:
            return train(cfg, run_dir)
        raise checkpoint.CheckpointError(
            f"no valid checkpoint under {run_dir / 'checkpoints'}; nothing to resume"
        )
    manifest = checkpoint.read_manifest(path)
    problems = []
    if manifest.get("config_hash") != config.math_hash(cfg):
        problems.append(f"{path}: written by a different configuration (hash {manifest.get('config_hash')})")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if manifest.get("world_size", world) != world:
        problems.append(
            f"{path}: written by {manifest['world_size']} process(es), resuming with {world}: the global batch "
            "(micro x accum x world) and the batches each rank draws would change"
        )
    if problems and not cfg.allow_config_change:
        raise config.ConfigError([*problems, "add allow_config_change=true to continue anyway"])
    return train(cfg, run_dir, resume_from=path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --- help: groups, options and every key with its one-line comment -------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The trailing comment of each dataclass field: the source is the documentation."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs = {}
    for line in source.splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
        if m:
            docs[m.group(1)] = m.group(2)
    return docs


def _composed_defaults() -> dict:
    """The default config as Hydra composes it (conf/config.yaml and the default options), flattened."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from greenrun import config

    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base=None):
        raw = OmegaConf.to_container(compose(config_name="config"), resolve=False)
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(raw, "")
    return flat


def help_text(command: str) -> str:
    from greenrun import config

    lines = [USAGE, "config groups (choose with group=option; +recipe=NAME adds a preset):"]
    for group, options in config.groups().items():
        lines.append(f"  {group:<26} {', '.join(options)}")
    lines.append("\nkeys (set with key=value; values as `greenrun train` composes them with no overrides):")
    composed = _composed_defaults()

    def walk(cls: type, prefix: str) -> None:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            value = composed.get(prefix + f.name, default)
            lines.append(f"  {prefix + f.name:<36} {value!s:<14} {docs.get(f.name, '')}")

    walk(config.Config, "")
    lines.append(
        "\nYour own recipes: put NAME.yaml (starting with `# @package _global_`) in DIR/recipe/ and add "
        "hydra.searchpath=[file://DIR] +recipe=NAME."
    )
    lines.append("Hydra's own flags: --cfg job, -m/--multirun, --info, --hydra-help.")
    return "\n".join(lines)
