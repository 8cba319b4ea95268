"""The root config: typed schema, where the YAML lives, and validation that reports every problem at once.

The DictConfig stops in this module and cli.py: everything below them receives the typed `Config`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from greenrun import data, storage
from greenrun.ckpt.checkpoint import CheckpointConfig
from greenrun.core import checks, fields
from greenrun.core.fields import maths, plain
from greenrun.core.shipped import conf_dir, recipes_dir
from greenrun.data import DataConfig
from greenrun.runtime import budget, distributed, energy, profiling, sinks, spot, window
from greenrun.runtime.budget import BudgetConfig
from greenrun.runtime.energy import EnergyConfig
from greenrun.runtime.spot import SpotConfig
from greenrun.runtime.window import WindowConfig
from greenrun.storage import StorageConfig
from greenrun.train import (
    activation_checkpointing,
    curriculum,
    early_stopping,
    optimizer,
    parallel,
    precision,
    schedule,
    target,
)
from greenrun.train.activation_checkpointing import ActivationCheckpointingConfig
from greenrun.train.curriculum import CurriculumConfig
from greenrun.train.early_stopping import NONFINITE_MODES, EarlyStoppingConfig
from greenrun.train.model import ModelConfig
from greenrun.train.optimizer import OptimizerConfig
from greenrun.train.parallel import DistributedConfig
from greenrun.train.precision import PrecisionConfig
from greenrun.train.schedule import ScheduleConfig
from greenrun.train.target import SmokeConfig


class ConfigError(ValueError):
    """Bad configuration or usage: reported as one message, exit code 2."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = "configuration error" if n == 1 else f"{n} configuration problems"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


# torch.compile's modes. The two with CUDA graphs replay each micro-step's kernels as one graph launch: no
# host gaps between kernels, at the price of graph memory pools and a capture per new shape.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainerConfig:
    max_steps: int = maths(600)  # optimizer steps in the whole run (schedules span all of them)
    micro_batch_size: Any = maths(
        32
    )  # sequences per forward/backward on each device, or auto (probe GPU memory)
    global_batch_tokens: int = maths(0)  # tokens per optimizer step for micro_batch_size=auto
    grad_accum_steps: int = maths(
        1
    )  # micro-batches per optimizer step (global batch = micro x accum x world)
    eval_interval: int = plain(100)  # steps between validation evaluations (also at step 0 and the last step)
    eval_batches: int = plain(8)  # micro-batches per validation evaluation
    log_interval: int = plain(10)  # steps between metrics.jsonl lines and progress updates
    grad_clip: float = maths(1.0)  # max global gradient norm (0 = no clipping)
    seed: int = maths(1337)  # seeds init and data order (draws are per (step, slot), any world size)
    device: str = plain("auto")  # auto | cpu | cuda
    stop_at_step: int | None = plain(None)  # commit a checkpoint at this step and exit 0 (train in slices)
    compile: bool | None = plain(None)  # torch.compile the model; None = on for CUDA
    compile_mode: str = plain(
        "default"
    )  # torch.compile mode: default | max-autotune-no-cudagraphs | reduce-overhead | max-autotune
    sample_tokens: int = plain(120)  # tokens generated for the sample printed at the end (0 = none)
    sample_prompt: str = plain("")  # the sample's prompt; "" = the data source's own (stdlib: "def ")
    cpu_threads: int = plain(0)  # torch intra-op threads on a CPU; 0 = OMP_NUM_THREADS if set, else the cores
    profile_every: int = plain(0)  # run the torch profiler for profile_steps steps every N steps (0 = off)
    profile_steps: int = plain(3)  # steps per profiler window; traces land in RUN_DIR/profile/
    on_nonfinite: str = plain("stop")  # non-finite loss or grad norm: stop (exit 1) | skip (drop the update)
    nproc_per_node: Any = plain(1)  # processes on this machine: N, or auto (1 per visible GPU, 1 on a CPU)
    nnodes: str = plain("1")  # machines: N, or MIN:MAX for an elastic range (e.g. 1:4)
    rdzv_endpoint: str = plain(
        ""
    )  # host:port of the c10d rendezvous (needed when nnodes > 1); "" = this machine
    max_restarts: int = plain(0)  # times torch's launcher restarts a failed process group (each continues)


@dataclass
class RunConfig:
    # The one default not written here: `greenrun train` names a new directory after its start time.
    dir: str = plain(
        "runs/default", local=True
    )  # this run's output directory: config.yaml, metrics.jsonl, checkpoints/


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig
    )
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    spot: SpotConfig = field(default_factory=SpotConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    smoke: SmokeConfig = field(default_factory=SmokeConfig)
    preflight: bool = plain(True)  # run the two-step CPU smoke check before training
    resume: str = plain("never")  # train: never | auto (continue run.dir from its newest valid checkpoint)
    allow_config_change: bool = plain(False)  # resume: accept overrides that change the training math
    logger: Any = plain("jsonl")  # metric sinks, one or a list: jsonl (always) | tensorboard | mlflow | wandb


# --- where the YAML lives -------------------------------------------------------------------------


def groups() -> dict[str, list[str]]:
    """Every config group and its options, the recipes included."""
    found = {
        d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(conf_dir().iterdir()) if d.is_dir()
    }
    found["recipe"] = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    return found


def register() -> None:
    """Put the typed schema and the shipped recipes into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="greenrun_schema", node=Config)
    for path in sorted(recipes_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


# --- overrides: check them all before Hydra stops at the first -----------------------------------


def leaf_keys() -> list[str]:
    """Every settable dotted key of the schema, e.g. `optimizer.lr`."""
    keys: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for k in node:
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{k}.")
            else:
                keys.append(f"{prefix}{k}")

    walk(OmegaConf.structured(Config), "")
    return keys


def _values(override: Override) -> list[Any]:
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    return [value] if not override.is_sweep_override() else []


def check_overrides(overrides: list[str]) -> list[str]:
    """Unknown keys (with the closest valid one), unknown group options and wrong types, all together."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OmegaConfBaseException as e:  # hydra's grammar errors derive from this
        return [f"could not parse the overrides: {e}"]
    except Exception as e:  # noqa: BLE001 - the parser raises a plain OverrideParseException
        return [f"could not parse the overrides: {e}"]
    known = groups()
    keys = leaf_keys()
    schema = OmegaConf.structured(Config)
    problems: list[str] = []
    for ov in parsed:
        key = ov.key_or_group
        if key.startswith("hydra") or ov.is_delete():
            continue
        if key in known:
            if key == "recipe" and any(o.key_or_group == "hydra.searchpath" for o in parsed):
                continue  # a user recipe folder: Hydra resolves it
            for v in _values(ov):
                problems += checks.choice(key, str(v), known[key])
            continue
        if key not in keys:
            near = checks.closest(key, keys + list(known))
            hint = f"; did you mean {near}?" if near else ""
            problems.append(f"{key}: no such key{hint} (`greenrun train --help` lists every key)")
            continue
        for v in _values(ov):
            try:
                OmegaConf.update(schema, key, v, merge=True)
            except OmegaConfBaseException as e:
                msg = str(e).splitlines()[0]
                problems.append(f"{key}={v}: {msg}")
    return problems


# --- DictConfig -> typed objects -------------------------------------------------------------------


def to_typed(cfg: DictConfig) -> Config:
    """Convert a composed config to plain dataclasses, reporting every missing value at once."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError([f"{k}: required but not set (add {k}=VALUE to the command line)" for k in missing])
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError([str(e).splitlines()[0]]) from None
    assert isinstance(typed, Config)
    return typed


def validate(cfg: Config, check_device: bool = True, need_corpus: bool = True) -> None:
    """Collect every problem, component by component, and raise once.

    `check_device=False` for the smoke test, which runs a GPU config on the CPU on purpose.
    `need_corpus=False` for a resume whose token cache is here: the corpus is not read, so data.paths may be unset.
    """
    problems: list[str] = fields.interpolation_problems(fields.flatten(cfg))
    problems += schedule.validate(cfg.schedule)
    problems += optimizer.validate(cfg.optimizer)
    precision_problems = precision.validate(cfg.precision)
    problems += precision_problems
    if check_device and not precision_problems:
        problems += _device_problems(cfg)
    problems += energy.validate(cfg.energy)
    problems += budget.validate(cfg.budget)
    problems += window.validate(cfg.window)
    problems += activation_checkpointing.validate(cfg.activation_checkpointing, cfg.model.n_layer)
    problems += data.validate(cfg.data, need_corpus=need_corpus)
    problems += storage.validate(cfg.storage)
    problems += spot.validate(cfg.spot)
    problems += sinks.validate(cfg.logger)
    problems += target.validate(cfg.smoke)
    problems += _model_problems(cfg.model)
    problems += _trainer_problems(cfg)
    problems += early_stopping.validate(cfg.early_stopping)
    problems += parallel.validate(cfg.distributed, cfg.optimizer.name, cfg.precision.name)
    problems += curriculum.validate(cfg.curriculum, cfg.model.seq_len, cfg.trainer.max_steps)
    if cfg.precision.name == "fp8" and cfg.precision.fp8.lm_head and cfg.model.loss_chunk > 0:
        problems.append(
            "precision.fp8.lm_head=true with model.loss_chunk>0: the chunked loss runs its own bf16 head "
            "matmuls, so the fp8 head would never be used; set model.loss_chunk=0 or fp8.lm_head=false"
        )
    if problems:
        raise ConfigError(problems)


def _device_problems(cfg: Config) -> list[str]:
    """Impossible combinations of settings and this machine, found before anything is built."""
    import torch

    from greenrun.runtime.distributed import resolve_device

    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        return [
            "trainer.device=cuda: no CUDA GPU is visible here; use trainer.device=auto (or cpu), or a GPU machine"
        ]
    if cfg.trainer.device not in ("auto", "cpu", "cuda"):
        return []  # reported by the trainer checks
    device = resolve_device(cfg.trainer.device)
    return precision.device_problems(cfg.precision, device) + optimizer.device_problems(cfg.optimizer, device)


def _model_problems(m: ModelConfig) -> list[str]:
    problems = []
    for key in ("n_layer", "n_head", "n_embd", "seq_len", "vocab_size"):
        if getattr(m, key) < 1:
            problems.append(f"model.{key}: must be >= 1, got {getattr(m, key)}")
    if m.n_head >= 1 and m.n_embd % m.n_head:
        problems.append(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if m.vocab_size < 257:
        problems.append(f"model.vocab_size: a byte-level BPE needs at least 257 tokens, got {m.vocab_size}")
    if not 0.0 <= m.dropout < 1.0:
        problems.append(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if m.pad_logits not in ("mask", "learn"):
        problems.append(f"model.pad_logits: must be mask or learn, got {m.pad_logits!r}")
    return problems


def _trainer_problems(cfg: Config) -> list[str]:
    t, problems = cfg.trainer, []
    for key in ("max_steps", "grad_accum_steps", "eval_interval", "eval_batches", "log_interval"):
        if getattr(t, key) < 1:
            problems.append(f"trainer.{key}: must be >= 1, got {getattr(t, key)}")
    problems += profiling.validate(t.profile_every, t.profile_steps)
    if t.cpu_threads < 0:
        problems.append(f"trainer.cpu_threads: must be >= 0 (0 = automatic), got {t.cpu_threads}")
    if cfg.checkpoint.keep_exports < 1:
        problems.append(f"checkpoint.keep_exports: must be >= 1, got {cfg.checkpoint.keep_exports}")
    if t.micro_batch_size == "auto":
        if t.global_batch_tokens <= 0:
            problems.append(
                "trainer.micro_batch_size=auto keeps the global batch fixed: set trainer.global_batch_tokens "
                f"(tokens per optimizer step, e.g. {16 * cfg.model.seq_len * t.grad_accum_steps})"
            )
    elif not (isinstance(t.micro_batch_size, int) and t.micro_batch_size >= 1):
        problems.append(
            f"trainer.micro_batch_size: must be a positive integer or auto, got {t.micro_batch_size!r}"
        )
    problems += checks.choice("resume", cfg.resume, ("never", "auto"))
    problems += checks.choice(
        "checkpoint.weights_dtype", cfg.checkpoint.weights_dtype, ("bf16", "fp16", "fp32")
    )
    if cfg.checkpoint.every_minutes < 0:
        problems.append(f"checkpoint.every_minutes: must be >= 0, got {cfg.checkpoint.every_minutes}")
    problems += checks.choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    problems += checks.choice("trainer.compile_mode", t.compile_mode, COMPILE_MODES)
    problems += checks.choice("trainer.on_nonfinite", t.on_nonfinite, NONFINITE_MODES)
    if t.stop_at_step is not None and not 1 <= t.stop_at_step <= t.max_steps:
        problems.append(
            f"trainer.stop_at_step: must be in [1, trainer.max_steps={t.max_steps}], got {t.stop_at_step}"
        )
    if cfg.checkpoint.interval < 0:
        problems.append(f"checkpoint.interval: must be >= 0, got {cfg.checkpoint.interval}")
    problems += distributed.launch_problems(t.nproc_per_node, t.nnodes, t.rdzv_endpoint, t.max_restarts)
    if cfg.checkpoint.keep_last < 1:
        problems.append(
            f"checkpoint.keep_last: must be >= 1 (the newest checkpoint is always kept), got {cfg.checkpoint.keep_last}"
        )
    return problems


# --- hashing and drift ------------------------------------------------------------------------------


def flatten(cfg: Config) -> dict[str, Any]:
    return fields.flatten(cfg)


def is_math_key(key: str) -> bool:
    """Whether the dotted key's field is declared with `maths(...)`: changing it changes the training."""
    return key in _MATH_KEYS


_MATH_KEYS = frozenset(fields.math_keys(Config()))
# Keys naming a path, URL or command of this machine (`local=True`): never taken from a bucket's config.
LOCAL_KEYS = frozenset(fields.local_keys(Config()))


def math_hash(cfg: Config) -> str:
    """Hash of what determines the training math; a resume with the same hash continues the same run."""
    return fields.math_hash(cfg)


def hash_matches(cfg: Config, recorded: Any) -> bool:
    """Whether a checkpoint's recorded config hash is cfg's: today's, or the one that also covered local keys
    (data.paths), which checkpoints written before local keys left the hash carry."""
    return recorded in (fields.math_hash(cfg), fields.math_hash(cfg, with_local=True))


def diff(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def math_diff(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """The math keys that differ, local ones aside: where files are is not what is computed (the token
    cache key pins the data; job.continue_run checks it)."""
    return [(k, a, b) for k, a, b in diff(old, new) if is_math_key(k) and k not in LOCAL_KEYS]


def local_from(cfg: Config, source: Config) -> Config:
    """cfg with every local key (paths, URLs and commands of this machine) taken from `source`.

    `local_from(saved, Config())` is a config from elsewhere (a bucket) with this machine's defaults there.
    """
    return fields.replaced(cfg, {key: copy.deepcopy(fields.value_at(source, key)) for key in LOCAL_KEYS})


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Overrides on top of an already typed config (resume): `key=value` and `group=option`."""
    node = OmegaConf.structured(cfg)
    known = groups()
    for ov in OverridesParser.create().parse_overrides(overrides):
        key, value = ov.key_or_group, ov.value()
        if key == "recipe" or ov.is_delete() or key.startswith("hydra"):
            raise ConfigError([f"{ov.input_line}: resume takes key=value and group=option overrides only"])
        if key in known:
            fresh = OmegaConf.structured(type(getattr(cfg, key))())
            node[key] = OmegaConf.merge(fresh, OmegaConf.load(conf_dir() / key / f"{value}.yaml"))
        else:
            OmegaConf.update(node, key, value, merge=True)
    return to_typed(node)


# --- saved configs: plain data both ways -----------------------------------------------------------------

_MAX_SAVED_BYTES = 1 << 20  # a saved config is a few KiB; anything this big is not one


def to_yaml(cfg: Config) -> str:
    """cfg as plain YAML data, fully resolved: no value holds an interpolation (load_yaml would refuse it)."""
    problems = fields.interpolation_problems(flatten(cfg))
    if problems:
        raise ConfigError(problems)
    plain_data = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False)
    return yaml.safe_dump(plain_data, sort_keys=False, allow_unicode=True)


def load_yaml(path: Path, *, name: str | None = None) -> Config:
    """A run's saved config.yaml as plain data, checked against today's schema.

    Nothing in it is resolved: a `${...}` (an interpolation or a resolver such as ${oc.env:SECRET}) is refused,
    since a bucket or a shared run directory can be written by others. Every problem names the file (`name`,
    e.g. the s3:// URL it came from) and the key, as a ConfigError (exit 2).
    """
    where = name or str(path)

    def refused(problems: list[str]) -> ConfigError:
        return ConfigError([f"{where}: {p}" for p in problems])

    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise refused([f"cannot read the saved config ({e.strerror or e})"]) from None
    if len(blob) > _MAX_SAVED_BYTES:
        raise refused([f"{len(blob)} bytes: too large to be a saved greenrun config"])
    try:
        raw = yaml.safe_load(blob.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise refused([f"not a saved greenrun config: not UTF-8 text (byte {e.start})"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise refused([f"not valid YAML{at} ({getattr(e, 'problem', None) or e})"]) from None
    if not isinstance(raw, dict):
        raise refused([f"not a saved greenrun config: a mapping of keys, not {type(raw).__name__}"])
    try:
        leaves, odd = fields.raw_leaves(raw)
    except ValueError as e:
        raise refused([f"not a saved greenrun config: {e}"]) from None
    problems = [f"{k}: not a config key" for k in odd] + fields.interpolation_problems(dict(leaves))
    known = set(leaf_keys())
    schema = OmegaConf.structured(Config)
    for key, value in leaves:
        if key not in known:
            group = any(k.startswith(key + ".") for k in known)
            problems.append(
                f"{key}: " + (f"a group of keys, got {fields.short(value)}" if group else "no such key")
            )
        elif not fields.holds_interpolation(value):
            try:
                OmegaConf.update(schema, key, value, merge=True)
            except OmegaConfBaseException as e:
                problems.append(f"{key}: {str(e).splitlines()[0]}")
    if problems:
        raise refused(problems)
    try:
        return to_typed(schema)
    except ConfigError as e:
        raise refused(e.problems) from None
