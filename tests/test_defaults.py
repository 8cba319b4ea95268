"""One source of every default: the dataclasses. The YAML must not disagree, and every field says whether it
changes the training maths."""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from greenrun import config
from greenrun.core import fields, shipped
from greenrun.core.fields import maths, plain


def _composed(overrides: list[str] | None = None) -> dict:
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(shipped.conf_dir()), version_base=None):
        node = compose(config_name="config", overrides=overrides or [])
    raw = OmegaConf.to_container(node, resolve=False)
    raw.pop("hydra", None)
    return raw


def test_composed_default_equals_the_dataclass_defaults(monkeypatch):
    monkeypatch.delenv("GREENRUN_PRECISION", raising=False)
    composed = _composed()
    schema = OmegaConf.to_container(OmegaConf.structured(config.Config()), resolve=False)
    # The run directory is named at launch (a timestamp), the one default the schema cannot hold.
    assert composed["run"]["dir"].startswith("runs/${now:")
    composed["run"]["dir"] = schema["run"]["dir"]
    assert composed == schema


@pytest.mark.parametrize("group", sorted(set(config.groups()) - {"recipe"}))
def test_every_option_file_sets_only_known_keys_to_valid_types(group):
    """An option's YAML changes values of the group's schema; a stray key or type fails composition here."""
    for option in shipped.option_names(group):
        values = shipped.load_option(group, option)
        section = getattr(config.Config(), group)
        known = {f.name for f in dataclasses.fields(section)}
        assert set(values) <= known, f"conf/{group}/{option}.yaml: unknown keys {set(values) - known}"
        _composed([f"{group}={option}"] + (["storage.bucket=b"] if option == "s3" else []))


def test_default_option_files_repeat_no_value_differently():
    """Where the default option's YAML writes a key, it writes the dataclass default (one source of truth)."""
    defaults = {"model": "tiny", "precision": "fp32", "activation_checkpointing": "none"}
    defaults |= {
        "optimizer": "adamw",
        "schedule": "cosine",
        "data": "stdlib",
        "storage": "local",
        "spot": "none",
    }
    cfg = config.Config()
    for group, option in defaults.items():
        section = OmegaConf.to_container(OmegaConf.structured(getattr(cfg, group)))
        for key, value in shipped.load_option(group, option).items():
            assert section[key] == value, (
                f"conf/{group}/{option}.yaml: {key}={value!r}, dataclass {section[key]!r}"
            )


def test_every_field_of_every_group_is_classified_as_math_or_not():
    unclassified = [key for key, _, f in fields.leaves(config.Config()) if fields.is_math(f) is None]
    assert unclassified == [], f"declare these with maths(...) or plain(...): {unclassified}"


def test_math_classification_drives_the_resume_guard_and_the_hash():
    assert config.is_math_key("optimizer.lr") and config.is_math_key("model.n_layer")
    assert config.is_math_key("trainer.micro_batch_size") and config.is_math_key("data.paths")
    assert not config.is_math_key("trainer.log_interval") and not config.is_math_key("checkpoint.interval")
    assert not config.is_math_key("storage.bucket")
    base = config.Config()
    lr = dataclasses.replace(base, optimizer=dataclasses.replace(base.optimizer, lr=base.optimizer.lr * 2))
    logs = dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, log_interval=99))
    assert config.math_hash(lr) != config.math_hash(base)
    assert config.math_hash(logs) == config.math_hash(base)


def test_a_new_field_is_classified_where_it_is_declared():
    @dataclasses.dataclass
    class Probe:
        width: int = maths(8)  # changes the maths
        every: int = plain(2)  # does not

    assert fields.math_keys(Probe()) == ["width"]
    assert fields.math_hash(Probe()) != fields.math_hash(Probe(width=9))
    assert fields.math_hash(Probe()) == fields.math_hash(Probe(every=3))


def test_help_read_from_the_source_matches_the_real_schema():
    """--help reads the dataclass source without importing torch; it must say what the schema holds."""
    from greenrun.core import helpdoc

    keys = helpdoc.config_keys()
    real = {key: value for key, value, _ in fields.leaves(config.Config())}
    assert [k.name for k in keys] == list(real)
    for k in keys:
        want = real[k.name]
        assert k.default == str(want), f"{k.name}: help says {k.default}, the schema {want!r}"
        assert k.doc, f"{k.name} has no one-line comment to show in --help"


def test_train_help_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from greenrun import cli; cli.main(['train', '--help']); print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("False") and "optimizer.lr" in r.stdout
