"""Every group option and every recipe composes into a valid typed config; bad input is reported together."""

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from greenrun import config
from greenrun.core import fields


@pytest.fixture(autouse=True)
def _hydra():
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base=None):
        yield
    GlobalHydra.instance().clear()


def typed(overrides):
    """Composed and validated as `greenrun smoke` does: GPU-only settings are fine to compose on this CPU."""
    cfg = config.to_typed(compose(config_name="config", overrides=overrides))
    config.validate(cfg, check_device=False)
    return cfg


def choices(overrides):
    """The option Hydra picked for each config group, e.g. {"precision": "bf16", ...}."""
    return dict(
        compose(config_name="config", overrides=overrides, return_hydra_config=True).hydra.runtime.choices
    )


def yaml_sets(path):
    """(dotted key, value) for every value a shipped YAML file sets, its defaults list aside."""

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            elif key != "defaults" or prefix:
                yield f"{prefix}{key}", value

    return list(walk(OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}, ""))


def value_at(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def assert_applied(cfg, sets, prefix, extra):
    """Every value the YAML sets arrived in the typed config (except required ??? and command-line ones)."""
    for key, want in sets:
        full = f"{prefix}{key}"
        if want == "???" or any(e.startswith(f"{full}=") for e in extra):
            continue
        assert value_at(cfg, full) == want, f"{full}: {value_at(cfg, full)!r}, the YAML sets {want!r}"


def test_device_checks_refuse_gpu_settings_on_a_cpu():
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = typed(["+recipe=gpt2_gpu", "precision=fp8"])
    with pytest.raises(config.ConfigError) as e:
        config.validate(cfg)
    assert "trainer.device=cuda" in str(e.value)


OPTIONS = [(g, o) for g, opts in config.groups().items() if g != "recipe" for o in opts]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    extra = ["storage.bucket=b"] if (group, option) == ("storage", "s3") else []
    extra += ["data.paths=[x.txt]"] if (group, option) == ("data", "text") else []
    extra += ["data.name=x"] if (group, option) == ("data", "hf") else []
    cfg = typed([f"{group}={option}", *extra])
    sets = yaml_sets(config.conf_dir() / group / f"{option}.yaml")
    assert_applied(cfg, sets, f"{group}.", extra)
    # Not the default option: it must change something, or `group=option` could be ignored unnoticed.
    default = choices([])[group]
    if option != default and not (group == "precision" and os.environ.get("GREENRUN_PRECISION") == option):
        before = typed([])
        assert any(value_at(before, f"{group}.{k}") != v for k, v in sets if v != "???"), (
            f"{group}={option} composes the same {group} values as the default {group}={default}"
        )


@pytest.mark.parametrize("recipe", config.groups()["recipe"])
def test_every_recipe_composes_and_says_how_to_run_it(recipe):
    path = config.recipes_dir() / f"{recipe}.yaml"
    header, command = path.read_text().splitlines()[:2]
    assert header == "# @package _global_"  # Hydra reads the package header on the first line only
    assert command == f"# Run: greenrun train +recipe={recipe}"
    cfg = typed([f"+recipe={recipe}"])
    # Its keys (package _global_) and its `override /group: option` defaults both take effect.
    assert_applied(cfg, yaml_sets(path), "", [])
    picked = choices([f"+recipe={recipe}"])
    for entry in OmegaConf.load(path).get("defaults", []):
        if isinstance(
            entry, str
        ):  # another recipe it builds on: that one's values hold unless this file sets them
            own = {key for key, _ in yaml_sets(path)}
            base = [(k, v) for k, v in yaml_sets(config.recipes_dir() / f"{entry}.yaml") if k not in own]
            assert_applied(cfg, base, "", [])
            continue
        for key, option in entry.items():
            group = key.removeprefix("override ").strip("/")
            assert picked[group] == option, f"{recipe}: {group}={picked[group]}, the recipe picks {option}"


def test_bf16_ckpt_recipe_sets_both_levers():
    cfg = typed(["+recipe=bf16_ckpt"])
    assert cfg.precision.name == "bf16"
    assert cfg.activation_checkpointing.policy == "full"


def test_gpu_recipe_is_gpt2_124m():
    cfg = typed(["+recipe=gpt2_gpu"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.trainer.device) == (12, 768, "cuda")


def test_every_yaml_key_has_a_comment():
    for path in sorted(config.conf_dir().rglob("*.yaml")) + sorted(config.recipes_dir().glob("*.yaml")):
        for line in path.read_text().splitlines():
            body = line.split("#")[0]
            if ":" in body and not body.rstrip().endswith(":") and not body.lstrip().startswith("-"):
                assert "#" in line, f"{path.name}: '{line.strip()}' has no comment"


def test_unknown_key_suggests_the_closest():
    problems = config.check_overrides(
        ["trainer.max_step=3", "optimizer.lr=abc", "model=gpt3", "precision=bf61"]
    )
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "did you mean trainer.max_steps" in text
    assert "optimizer.lr=abc" in text
    assert "model: unknown value 'gpt3'" in text and "gpt2" in text
    assert "did you mean bf16" in text


def test_valid_overrides_pass_check():
    assert (
        config.check_overrides(["optimizer.lr=3e-4", "+recipe=bf16_ckpt", "model=gpt2", "~preflight"]) == []
    )


def test_semantic_problems_are_collected():
    cfg = typed([])
    cfg.model.n_head = 3
    cfg.trainer.max_steps = 0
    cfg.checkpoint.keep_last = 0
    with pytest.raises(config.ConfigError) as e:
        config.validate(cfg)
    text = "\n".join(e.value.problems)
    # All three reported at once, each naming its key.
    assert "model.n_head" in text and "trainer.max_steps" in text and "checkpoint.keep_last" in text
    assert len(e.value.problems) >= 3


def test_compile_mode_and_fp8_head_checks_name_their_keys():
    overrides = ["precision=fp8", "precision.fp8.lm_head=true", "model.loss_chunk=4096"]
    cfg = config.to_typed(compose(config_name="config", overrides=overrides))
    cfg.trainer.compile_mode = "max-autotune-nocudagraphs"
    with pytest.raises(config.ConfigError) as e:
        config.validate(cfg, check_device=False)
    text = "\n".join(e.value.problems)
    assert "trainer.compile_mode" in text and "max-autotune-no-cudagraphs" in text  # the closest valid mode
    assert "fp8.lm_head" in text and "model.loss_chunk=0" in text
    for mode in config.COMPILE_MODES:
        ok = typed([f"trainer.compile_mode={mode}", "precision=fp8", "precision.fp8.lm_head=true"])
        config.validate(ok, check_device=False)


def test_math_hash_ignores_bookkeeping_keys():
    a = typed([])
    b = typed(["checkpoint.interval=7", "trainer.eval_interval=3", "run.dir=elsewhere"])
    c = typed(["optimizer.lr=1e-3", "run.dir=elsewhere"])
    assert config.math_hash(a) == config.math_hash(b) != config.math_hash(c)
    assert [k for k, _, _ in config.diff(b, c)] == [
        "checkpoint.interval",
        "optimizer.lr",
        "trainer.eval_interval",
    ]


def test_apply_overrides_on_typed_config():
    cfg = config.apply_overrides(typed([]), ["optimizer.lr=1e-3", "precision=bf16"])
    assert cfg.optimizer.lr == 1e-3 and cfg.precision.name == "bf16"


# --- local keys and saved configs as plain data ------------------------------------------------------------


def test_the_local_keys_are_exactly_the_paths_urls_and_commands():
    """Keys declared `local=True` never come from a bucket's config. A new path, URL or command key (a window
    or carbon command, say) must be declared local and added here."""
    assert sorted(config.LOCAL_KEYS) == [
        "curriculum.reference",
        "data.cache_dir",
        "data.cache_endpoint_url",
        "data.cache_url",
        "data.name",
        "data.paths",
        "data.tokenizer_path",
        "run.dir",
        "spot.metadata_url",
        "window.carbon_cmd",
        "window.carbon_file",
    ]
    remote = config.apply_overrides(
        config.Config(),
        ["data.paths=[/etc/passwd]", "data.cache_dir=/x", "run.dir=/y", "spot.metadata_url=http://evil/"]
        + ["window.carbon_cmd='curl evil'", "window.carbon_file=/etc/shadow"],
    )
    here = config.local_from(remote, config.Config())
    assert config.flatten(here) == config.flatten(config.Config())


def test_local_keys_leave_the_hash_and_the_math_diff_but_old_hashes_still_match():
    a = typed(["data=text", "data.paths=[a.txt]"])
    b = typed(["data=text", "data.paths=[b.txt]"])
    assert config.math_hash(a) == config.math_hash(b)  # the token cache key pins the data, not the path
    assert config.math_diff(a, b) == []
    legacy = fields.math_hash(a, with_local=True)
    assert config.hash_matches(a, legacy) and not config.hash_matches(b, legacy)


def test_saved_configs_round_trip_as_plain_yaml(tmp_path):
    cfg = typed(["optimizer.lr=1e-5", "data=text", "data.paths=[a.txt, '~/b *.txt']"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load_yaml(path) == cfg
    escaped = config.apply_overrides(cfg, ["data.paths=['\\${oc.env:HOME}']"])
    with pytest.raises(config.ConfigError, match=r"data.paths: .* holds '\$\{'"):
        config.to_yaml(escaped)  # never saved: a resume would refuse it
    with pytest.raises(config.ConfigError, match=r"data.paths: .* holds '\$\{'"):
        config.validate(escaped)


def test_load_yaml_resolves_nothing_and_names_every_bad_key(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENRUN_TEST_SECRET", "s3cr3t")
    path = tmp_path / "config.yaml"
    path.write_text(
        "optimizer:\n  lr: ${oc.env:GREENRUN_TEST_SECRET}\n  name: '${oc.decode:x}'\n"
        "data:\n  paths: ['${oc.env:GREENRUN_TEST_SECRET}']\nmodel:\n  n_layer: lots\n"
    )
    with pytest.raises(config.ConfigError) as e:
        config.load_yaml(path, name="s3://b/p/run/config.yaml")
    text = str(e.value)
    assert "s3cr3t" not in text
    for key in ("optimizer.lr", "optimizer.name", "data.paths", "model.n_layer"):
        assert f"s3://b/p/run/config.yaml: {key}: " in text, key
    # A billion-laughs file stops at a bound instead of expanding.
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcdefg", "bcdefgh", strict=True)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(config.ConfigError, match="more than"):
        config.load_yaml(path)
