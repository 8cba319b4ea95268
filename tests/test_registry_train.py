"""The named options of greenrun.train: one registry per group, matching conf/<group>/, no silent defaults."""

from __future__ import annotations

import dataclasses

import pytest

from greenrun.core import fields
from greenrun.core.registry import Registry
from greenrun.core.shipped import load_option, option_names
from greenrun.train import (
    activation_checkpointing,
    curriculum,
    early_stopping,
    model,
    optimizer,
    precision,
    schedule,
)
from greenrun.train.activation_checkpointing import ActivationCheckpointingConfig
from greenrun.train.curriculum import CurriculumConfig
from greenrun.train.early_stopping import EarlyStoppingConfig
from greenrun.train.fp8 import Fp8Config
from greenrun.train.model import ModelConfig
from greenrun.train.optimizer import OptimizerConfig
from greenrun.train.precision import PrecisionConfig
from greenrun.train.schedule import ScheduleConfig

# group -> (its registry, the config key it fills, a config with that key set to `name`, its validate)
GROUPS = {
    "precision": (
        precision.PRECISIONS,
        "precision.name",
        lambda name: PrecisionConfig(name=name),
        precision.validate,
    ),
    "activation_checkpointing": (
        activation_checkpointing.POLICIES,
        "activation_checkpointing.policy",
        lambda name: ActivationCheckpointingConfig(policy=name),
        lambda cfg: activation_checkpointing.validate(cfg, n_layer=4),
    ),
    "optimizer": (
        optimizer.OPTIMIZERS,
        "optimizer.name",
        lambda name: OptimizerConfig(name=name),
        optimizer.validate,
    ),
    "schedule": (
        schedule.SCHEDULES,
        "schedule.name",
        lambda name: ScheduleConfig(name=name),
        schedule.validate,
    ),
    "early_stopping": (
        early_stopping.STOPPERS,
        "early_stopping.name",
        lambda name: EarlyStoppingConfig(name=name),
        early_stopping.validate,
    ),
    "curriculum": (
        curriculum.CURRICULA,
        "curriculum.name",
        lambda name: CurriculumConfig(name=name),
        lambda cfg: curriculum.validate(cfg, seq_len=1024, max_steps=10_000),
    ),
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_shipped_yaml_options_are_exactly_the_registered_names(group):
    registry, key, _, _ = GROUPS[group]
    assert isinstance(registry, Registry) and registry.key == key
    assert option_names(group) == sorted(registry.names())


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_yaml_option_names_its_registered_option(group):
    registry, key, make, validate = GROUPS[group]
    field = key.split(".", 1)[1]
    for name in option_names(group):
        assert load_option(group, name)[field] == name
        assert validate(make(name)) == []


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_unknown_name_fails_validation_with_the_closest_names(group):
    registry, key, make, validate = GROUPS[group]
    real = registry.names()[0]
    typo = real[:-1] + ("x" if real[-1] != "x" else "y")
    problems = validate(make(typo))
    assert problems and problems[0].startswith(f"{key}: unknown value '{typo}'")
    assert f"did you mean {real}?" in problems[0]
    assert all(name in problems[0] for name in registry.names())  # "choose one of ..." lists them all


def test_unknown_names_never_fall_through_to_a_default():
    with pytest.raises(KeyError, match="did you mean adamw"):
        optimizer.build(OptimizerConfig(name="adamx"), model.GPT(ModelConfig(n_layer=1)))
    with pytest.raises(KeyError, match="did you mean cosine"):
        schedule.lr_at(100, ScheduleConfig(name="cosin"), 1.0, 200)
    with pytest.raises(ValueError, match="did you mean sqrt"):
        activation_checkpointing.plan(ActivationCheckpointingConfig(policy="sqr"), 4)
    with pytest.raises(KeyError, match="did you mean bf16"):
        precision.get("bf61")


# group -> (its default option in conf/config.yaml, the dataclass that option fills)
DEFAULTS = {
    "model": ("tiny", ModelConfig),
    "precision": ("fp32", PrecisionConfig),
    "activation_checkpointing": ("none", ActivationCheckpointingConfig),
    "optimizer": ("adamw", OptimizerConfig),
    "schedule": ("cosine", ScheduleConfig),
    "early_stopping": ("none", EarlyStoppingConfig),
    "curriculum": ("none", CurriculumConfig),
}


@pytest.mark.parametrize("group", sorted(DEFAULTS))
def test_default_option_yaml_sets_the_dataclass_defaults(group):
    name, cls = DEFAULTS[group]
    defaults = fields.flatten(cls())
    values = load_option(group, name)
    flat = {f"{k}.{kk}": vv for k, v in values.items() if isinstance(v, dict) for kk, vv in v.items()}
    flat |= {k: v for k, v in values.items() if not isinstance(v, dict)}
    assert flat, f"conf/{group}/{name}.yaml sets nothing"
    for key, value in flat.items():
        assert key in defaults, f"conf/{group}/{name}.yaml sets {key}, which {cls.__name__} has no field for"
        assert value == defaults[key], (
            f"conf/{group}/{name}.yaml: {key}={value!r}, dataclass {defaults[key]!r}"
        )


@pytest.mark.parametrize(
    "cls, math",
    [
        (ModelConfig, True),
        (OptimizerConfig, True),
        (ScheduleConfig, True),
        (PrecisionConfig, True),
        (Fp8Config, True),
        (ActivationCheckpointingConfig, False),
    ],
)
def test_every_field_says_whether_it_changes_the_maths(cls, math):
    for key, _, f in fields.leaves(cls()):
        assert fields.is_math(f) is math, f"{cls.__name__}.{key}"


def test_fp8_sub_config_is_a_container_under_precision():
    f = {f.name: f for f in dataclasses.fields(PrecisionConfig)}["fp8"]
    assert fields.is_math(f) is None  # not a leaf: its own fields carry the marks
    assert fields.math_keys(PrecisionConfig()) == [
        "name",
        "fp8.recipe",
        "fp8.min_width",
        "fp8.lm_head",
        "tf32",
    ]
