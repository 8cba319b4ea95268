"""`greenrun train|smoke|plan|resume|archive|report|export|sample`. Hydra composes; the DictConfig stops here.

Exit codes: 0 success, 1 runtime failure, 2 configuration or usage error.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from greenrun.core import checks, output

if TYPE_CHECKING:
    from greenrun import config, job

log = logging.getLogger("greenrun")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
COMMANDS = ("train", "smoke", "plan", "resume", "archive", "report", "export", "sample")
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
  smoke  [key=value ...]           the real config for two steps (a free GPU, else the CPU): PASS/FAIL, a memory
                                   estimate, and the full run's projected GPU-hours, kWh, kgCO2e and $
  plan   budget.dollars=N|budget.gpu_hours=N|budget.kgco2=N [key=value ...]
                                   what one budget buys: the compute-optimal preset, its steps, the train command
  resume RUN_DIR|s3://B/P/RUN [key=value ...]
                                   continue the newest valid checkpoint with the run's saved config
  archive RUN_DIR|s3://B/P/RUN [older_than_days=30] [storage_class=GLACIER_IR]
                                   move old checkpoints in S3 to a colder storage class (newest and best stay hot)
  report RUN_DIR|s3://B/P/RUN [RUN_DIR ...] [out=PATH] [storage.*=...]
                                   a summary table here and one HTML file (figures, kWh, kgCO2e, $, equivalents);
                                   default RUN_DIR/report.html for one run, else ./report.html
  export RUN_DIR|s3://B/P/RUN [--format hf|safetensors] [--dtype bf16|fp16|fp32] [--out DIR] [--step N]
                                   a checkpoint's weights for other tools: a transformers GPT2LMHeadModel
                                   directory with the run's tokenizer (hf, the default), or model-only safetensors
  sample RUN_DIR|s3://B/P/RUN ["PROMPT"] [max_new_tokens=N] [temperature=0.8] [top_k=50] [seed=N] [step=N]
                                   text from the newest valid checkpoint (or step=N); the same seed, the same text

examples:
  greenrun train                               the tiny model on the bundled corpus (CPU, a few minutes)
  greenrun train +recipe=bf16_ckpt optimizer.lr=3e-4
  greenrun train -m precision=fp32,bf16        a sweep: one run per value
  greenrun train trainer.nproc_per_node=auto   one process per GPU here, through torch's launcher (torchrun)
  greenrun train --cfg job                     print the composed config and exit
  greenrun train --help                        every config group, option and key
  greenrun report runs/a runs/b out=ab.html    two runs side by side
  greenrun export runs/a --dtype fp32          runs/a/export/hf-step-N-fp32/, for AutoModelForCausalLM
  greenrun sample runs/a "def " seed=1         text from runs/a's newest checkpoint
  greenrun train logger=[jsonl,tensorboard]    metrics.jsonl and RUN_DIR/tensorboard/ (also: mlflow, wandb)
  greenrun plan budget.dollars=50 energy.usd_per_gpu_hour=2.5   what $50 trains at $2.50 per GPU-hour
"""


def _finish(result) -> int:
    """Say what went wrong, if anything, and return the exit code."""
    if result.message:
        log.error(result.message)
    return result.exit_code


def _usage_error(message: str) -> int:
    log.error(message)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    output.setup(main=int(os.environ.get("RANK", "0")) == 0)
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:  # Ctrl-C while starting up (importing torch takes seconds): no traceback
        log.error("interrupted")
        return 130


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        output.say(USAGE)
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] in ("-V", "--version"):
        from greenrun import __version__

        output.say(f"greenrun {__version__}")
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    if command in (
        "_worker",
        "_preflight",
    ):  # started by greenrun.launch for `train trainer.nproc_per_node=N`
        from greenrun import launch

        return launch.worker(rest) if command == "_worker" else launch.preflight(rest)
    if command not in COMMANDS:
        near = checks.closest(command, COMMANDS)
        return _usage_error(
            f"unknown command '{command}'" + (f"; did you mean '{near}'?" if near else "") + "\n" + USAGE
        )
    if "-h" in rest or "--help" in rest:
        if command in ("export", "sample"):
            from greenrun.interop import options  # the arguments and their help, without torch

            output.say(options.HELP[command])
        else:
            output.say(USAGE if command == "report" else help_text(command))
        return EXIT_OK
    if command == "report":  # reads files only: it needs neither torch nor the job machinery
        return _report(rest)
    # The whole stack (torch included) loads only once a command is known to run.
    from greenrun import job

    if command == "resume":
        return _finish(job.guarded(lambda: _resume(rest)))
    if command == "archive":
        return _finish(job.guarded(lambda: _archive(rest)))
    if command in ("export", "sample"):
        return _finish(job.guarded(lambda: _model_out(command, rest)))
    return _compose_and_run(command, rest)


# --- train, smoke and plan: through hydra.main, so --cfg, -m and friends behave as Hydra users expect -------


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

    from greenrun import config, job

    problems = config.check_overrides(_overrides(args)) + _searchpath_problems(_overrides(args))
    fleet = os.environ.get("GREENRUN_PRECISION")
    if fleet is not None:
        problems += checks.choice(
            "GREENRUN_PRECISION (environment variable)", fleet, config.groups()["precision"]
        )
    if problems:
        return _usage_error(
            str(config.ConfigError(problems)) + f"\nSee `greenrun {command} --help` for every group and key."
        )
    config.register()
    started = {"task": False}
    sweep: list[tuple[str, job.JobResult]] = []  # -m: each job's overrides and result, for the final table
    swept = {a.partition("=")[0].lstrip("+~") for a in _overrides(args) if _is_sweep(a)}

    def task(dcfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        started["task"] = True
        hydra_cfg = HydraConfig.get()
        mine = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.")]
        varied = [o for o in mine if o.partition("=")[0].lstrip("+~") in swept]  # what tells the jobs apart
        label = " ".join(varied or mine) or "(defaults)"
        multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
        if multirun:
            log.info(f"sweep job {hydra_cfg.job.num}: {label}")
        result = job.guarded(lambda: _task(command, dcfg))
        sweep.append((label, result))
        if multirun and result.summary:
            log.info(f"sweep job {hydra_cfg.job.num} ({label}) ended: {_brief(result)}")
        code = _finish(result)
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
        if len(sweep) > 1:
            output.table(
                "sweep",
                ["overrides", "exit", "val loss", "tok/s", "wall s", "run directory"],
                [
                    [label, str(r.exit_code), *_brief(r, columns=True), str(r.run_dir or "-")]
                    for label, r in sweep
                ],
            )
    return EXIT_OK


def _is_sweep(override: str) -> bool:
    """key=a,b / range(…) / glob(…) / choice(…): a -m sweep over that key."""
    value = override.partition("=")[2]
    return (
        "," in value.strip("[]")
        and not value.startswith("[")
        or value.startswith(("range(", "glob(", "choice("))
    )


def _brief(result: job.JobResult, columns: bool = False):
    """val loss, tok/s and wall time of a train result: one phrase, or three table cells."""
    s = result.summary
    val = "-" if s.get("val_loss") is None else f"{s['val_loss']:.4f}"
    tps = f"{s['tok_per_s']:,.0f}" if "tok_per_s" in s else "-"
    wall = f"{s['wall_s']:.1f}" if "wall_s" in s else "-"
    if columns:
        return [val, tps, wall]
    return f"val loss {val}, {tps} tok/s, {wall} s"


def _task(command: str, dcfg) -> job.JobResult:
    """Hydra's composed config -> the typed Config -> the job. The DictConfig goes no further."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from greenrun import config, job

    hydra_cfg = HydraConfig.get()
    with open_dict(dcfg):
        # Resolved once (${now:} would drift). A sweep job's directory is Hydra's numbered one; a single run's
        # is run.dir itself, which nothing creates before training starts (a failed check leaves no trace).
        multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
        dcfg.run.dir = hydra_cfg.runtime.output_dir if multirun else str(dcfg.run.dir)
    cfg = config.to_typed(dcfg)
    # Only training needs this machine's device; a plan reads no corpus either.
    config.validate(cfg, check_device=command == "train", need_corpus=command != "plan")
    if command == "smoke":
        return job.run_smoke(cfg)
    if command == "plan":
        # The user's overrides, repeated in the command the plan prints (hydra.searchpath: for their recipes).
        searchpath = [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.searchpath=")]
        return _plan(cfg, [*searchpath, *hydra_cfg.overrides.task])
    from greenrun import launch

    # trainer.nproc_per_node, nnodes, max_restarts: torch's launcher starts the processes (greenrun.launch).
    how = launch.layout(cfg)
    if how is not None:
        return launch.launch(cfg, how)
    return job.train_or_continue(cfg)


def _plan(cfg: config.Config, overrides: list[str]) -> job.JobResult:
    """Exactly one of budget.dollars, budget.gpu_hours, budget.kgco2 > 0 -> greenrun.plan's lines."""
    from greenrun import config, job, plan

    kinds = [kind for kind in plan.BUDGETS if getattr(cfg.budget, kind) > 0]
    if len(kinds) != 1:
        keys = ", ".join(f"budget.{kind}" for kind in plan.BUDGETS)
        given = " and ".join(f"budget.{kind}={getattr(cfg.budget, kind):g}" for kind in kinds) or "none"
        problem = f"plan needs exactly one budget > 0, one of {keys} (got {given})"
        raise config.ConfigError([problem + "; e.g. greenrun plan budget.dollars=50"])
    budget = plan.Budget(kinds[0], getattr(cfg.budget, kinds[0]))
    inputs, runs_dir = plan.inputs_from(cfg), plan.runs_dir_of(cfg)
    result = plan.plan(
        budget, inputs, cfg, overrides=overrides, runs_dir=runs_dir, pricing=cfg.energy.pricing
    )
    output.say("\n".join(plan.format_plan(result)))
    return job.JobResult(job.Outcome.OK)


# --- resume, archive and report: their own argument shapes ---------------------------------------------


def _resume(args: list[str]) -> job.JobResult:
    from greenrun import config, job

    positional = [a for a in args if "=" not in a and not a.startswith(("-", "~", "+"))]
    overrides = [a for a in args if a not in positional]
    if len(positional) > 1:
        raise config.ConfigError([f"resume takes one RUN_DIR or s3:// URL, got {positional}"])
    return job.resume(positional[0] if positional else ".", overrides)


def _archive(args: list[str]) -> job.JobResult:
    from greenrun import config, job

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
    try:
        days = float(opts["older_than_days"])
    except ValueError:
        raise config.ConfigError([f"older_than_days={opts['older_than_days']}: not a number"]) from None
    storage_overrides = [a for a in args if a.startswith("storage.")]
    return job.archive(positional[0], days, opts["storage_class"], storage_overrides)


def _model_out(command: str, args: list[str]) -> job.JobResult:
    """`greenrun export` and `greenrun sample`: a run's model out (greenrun.interop)."""
    from greenrun import job
    from greenrun.interop import options

    if command == "export":
        from greenrun.interop import export

        target, chosen, overrides = options.export_args(args)
        export.export(target, chosen, overrides)
    else:
        from greenrun.interop import sampling

        target, prompt, picked, overrides = options.sample_args(args)
        text, _ = sampling.sample(target, prompt, picked, overrides)
        output.say(text)
    return job.JobResult(job.Outcome.OK)


def _report(args: list[str]) -> int:
    from greenrun import report

    targets, out, storage_overrides = [], None, []
    it = iter(args)
    for a in it:
        if a == "--out":
            out = next(it, None)
            if out is None:
                return _usage_error("report: --out needs a PATH")
        elif a.startswith(("--out=", "out=")):
            out = a.partition("=")[2]
        elif a.startswith("storage.") and "=" in a:
            storage_overrides.append(a)
        elif a.startswith("-") or "=" in a:
            return _usage_error(
                f"report: unknown option '{a}'; use out=PATH (or --out PATH) and storage.* for an s3:// run"
            )
        else:
            targets.append(a)
    if not targets:
        return _usage_error("report takes one or more RUN_DIR or s3://bucket/prefix/run\n" + USAGE)
    if out == "":
        return _usage_error("report: out= needs a PATH")
    try:
        report.make(targets, Path(out) if out else None, storage_overrides)
    except report.ReportError as e:
        log.error(str(e))
        return e.exit_code
    except Exception as e:  # as job.guarded: one line, the traceback only when asked for
        if os.environ.get("GREENRUN_DEBUG"):
            raise
        log.error(f"report failed: {type(e).__name__}: {e}\n(set GREENRUN_DEBUG=1 to see the traceback)")
        return EXIT_FAIL
    return EXIT_OK


# --- help: groups, options and every key with its one-line comment -------------------------------------


def _searchpath_problems(overrides: list[str]) -> list[str]:
    """YAML errors in the user's recipe folders, named by file and line (Hydra would print a long traceback)."""
    import yaml

    problems = []
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key.lstrip("+") != "hydra.searchpath":
            continue
        for entry in value.strip("[]").split(","):
            folder = Path(entry.strip().strip("'\"").removeprefix("file://"))
            for path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
                try:
                    yaml.safe_load(path.read_text())
                except yaml.YAMLError as e:
                    mark = getattr(e, "problem_mark", None)
                    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
                    problems.append(
                        f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); fix that line"
                    )
                except (OSError, UnicodeDecodeError) as e:
                    problems.append(f"{path}: cannot be read ({e})")
    return problems


def help_text(command: str) -> str:
    """Groups, options and every key with its default and meaning, without importing torch."""
    from greenrun.core import helpdoc, shipped

    lines = [USAGE, "config groups (choose with group=option; +recipe=NAME adds a preset):"]
    for group, options in shipped.groups().items():
        lines.append(f"  {group:<26} {', '.join(options)}")
    lines.append("\nkeys (set with key=value; the defaults of `greenrun train` with no overrides):")
    for key in helpdoc.config_keys():
        lines.append(f"  {key.name:<36} {key.default:<14} {key.doc}")
    lines.append(
        "\nYour own recipes: put NAME.yaml (starting with `# @package _global_`) in DIR/recipe/ and add "
        "hydra.searchpath=[file://DIR] +recipe=NAME."
    )
    lines.append("Hydra's own flags: --cfg job, -m/--multirun, --info, --hydra-help.")
    return "\n".join(lines)
