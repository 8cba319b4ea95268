"""The root config: typed schema, where the YAML lives, and validation that reports every problem at once.

The DictConfig stops in this module and cli.py: everything below them receives the typed `Config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from greenrun.runtime import energy, spot
from greenrun.runtime.energy import EnergyConfig
from greenrun.runtime.spot import SpotConfig
from greenrun.storage import StorageConfig
from greenrun.train import activation_checkpointing, optimizer, precision, schedule
from greenrun.train.activation_checkpointing import ActivationCheckpointingConfig
from greenrun.train.model import ModelConfig
from greenrun.train.optimizer import OptimizerConfig
from greenrun.train.precision import PrecisionConfig
from greenrun.train.schedule import ScheduleConfig


class ConfigError(ValueError):
    """Bad configuration or usage: reported as one message, exit code 2."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = "configuration error" if n == 1 else f"{n} configuration problems"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


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
    seed: int = maths(1337)  # seeds init, data order and dropout
    device: str = plain("auto")  # auto | cpu | cuda
    stop_at_step: int | None = plain(None)  # commit a checkpoint at this step and exit 0 (train in slices)
    compile: bool | None = plain(None)  # torch.compile the model; None = on for CUDA
    sample_tokens: int = plain(120)  # tokens generated for the sample printed at the end (0 = none)
    profile_every: int = plain(0)  # run the torch profiler for profile_steps steps every N steps (0 = off)
    profile_steps: int = plain(3)  # steps per profiler window; traces land in RUN_DIR/profile/


@dataclass
class RunConfig:
    # The one default not written here: `greenrun train` names a new directory after its start time.
    dir: str = plain("runs/default")  # this run's output directory: config.yaml, metrics.jsonl, checkpoints/


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    spot: SpotConfig = field(default_factory=SpotConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    preflight: bool = plain(True)  # run the two-step CPU smoke check before training
    resume: str = plain("never")  # train: never | auto (continue run.dir from its newest valid checkpoint)
    allow_config_change: bool = plain(False)  # resume: accept overrides that change the training math


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


def validate(cfg: Config, check_device: bool = True) -> None:
    """Collect every problem, component by component, and raise once.

    `check_device=False` for the smoke test, which runs a GPU config on the CPU on purpose.
    """
    problems: list[str] = []
    problems += schedule.validate(cfg.schedule)
    problems += optimizer.validate(cfg.optimizer)
    precision_problems = precision.validate(cfg.precision)
    problems += precision_problems
    if check_device and not precision_problems:
        problems += _device_problems(cfg)
    problems += energy.validate(cfg.energy)
    problems += activation_checkpointing.validate(cfg.activation_checkpointing, cfg.model.n_layer)
    problems += data.validate(cfg.data)
    problems += storage.validate(cfg.storage)
    problems += spot.validate(cfg.spot)
    problems += _model_problems(cfg.model)
    problems += _trainer_problems(cfg)
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
    return precision.device_problems(cfg.precision, resolve_device(cfg.trainer.device))


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
    return problems


def _trainer_problems(cfg: Config) -> list[str]:
    t, problems = cfg.trainer, []
    for key in ("max_steps", "grad_accum_steps", "eval_interval", "eval_batches", "log_interval"):
        if getattr(t, key) < 1:
            problems.append(f"trainer.{key}: must be >= 1, got {getattr(t, key)}")
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
    if t.stop_at_step is not None and not 1 <= t.stop_at_step <= t.max_steps:
        problems.append(
            f"trainer.stop_at_step: must be in [1, trainer.max_steps={t.max_steps}], got {t.stop_at_step}"
        )
    if cfg.checkpoint.interval < 0:
        problems.append(f"checkpoint.interval: must be >= 0, got {cfg.checkpoint.interval}")
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


def math_hash(cfg: Config) -> str:
    """Hash of what determines the training math; a resume with the same hash continues the same run."""
    return fields.math_hash(cfg)


def diff(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


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


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_yaml(path: Path) -> Config:
    """A run's saved config.yaml, checked against today's schema."""
    try:
        raw = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except (OmegaConfBaseException, OSError) as e:
        raise ConfigError([f"{path}: cannot read the saved config ({str(e).splitlines()[0]})"]) from None
    return to_typed(merged)
