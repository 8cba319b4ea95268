"""`greenrun smoke` fails what training would fail: a peak memory prediction larger than the target device, and
data splits too small for the real sequence length. And a GPU config's CPU steps stay fast."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from greenrun import config, data, fit, smoke
from greenrun.config import Config
from greenrun.data import DataConfig, DataError
from greenrun.runtime import hardware
from greenrun.train import activation_checkpointing, memory, optimizer, precision, target
from greenrun.train.model import ModelConfig
from greenrun.train.target import GiB, SmokeConfig
from tests.common import run_cli


def _peak(cfg: Config, micro_batch: int, policy: str = "none") -> int:
    """The estimate as greenrun.train.memory computes it, independently of smoke's own plumbing."""
    plan = activation_checkpointing.plan(
        dataclasses.replace(cfg.activation_checkpointing, policy=policy), cfg.model.n_layer
    )
    return memory.estimate(
        cfg.model, micro_batch, cfg.model.seq_len, cfg.precision.name, plan, cfg.optimizer.name
    ).total


def _gpt2_gpu(**trainer) -> Config:
    """What `+recipe=gpt2_gpu` trains: GPT-2 124M, bf16, micro-batch 16 x 1024, on CUDA."""
    base = Config()
    return dataclasses.replace(
        base,
        model=ModelConfig(name="gpt2", n_layer=12, n_head=12, n_embd=768, seq_len=1024, vocab_size=50257),
        precision=dataclasses.replace(base.precision, name="bf16"),
        trainer=dataclasses.replace(
            base.trainer, device="cuda", **({"micro_batch_size": 16, "grad_accum_steps": 32} | trainer)
        ),
    )


# --- the target device --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["auto", "cpu", "t4", "A100-80GB", "a100_40gb", "h100", "24", "0.5", "1"])
def test_targets_that_exist_are_accepted(value):
    assert target.validate(SmokeConfig(value)) == []


def test_an_unknown_target_names_the_choices():
    (problem,) = target.validate(SmokeConfig("a100"))
    assert "a100-40gb, a100-80gb" in problem and "auto, cpu" in problem
    assert target.validate(SmokeConfig("0")) == ["smoke.target: a size must be > 0 GiB, got 0"]
    with pytest.raises(config.ConfigError, match="smoke.target"):
        config.validate(dataclasses.replace(Config(), smoke=SmokeConfig("h1OO")), check_device=False)


def test_auto_targets_the_configs_training_device(monkeypatch):
    monkeypatch.setattr(target.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(target, "ram", lambda: 21 * GiB)
    cpu = target.resolve(SmokeConfig(), "auto")
    assert (cpu.memory, cpu.gpu) == (21 * GiB, False)
    gpu = target.resolve(
        SmokeConfig(), "cuda"
    )  # a GPU recipe checked where no GPU is: every GPU of the table
    assert gpu.memory is None and gpu.gpu and gpu.capacity() == max(g.memory for g in target.GPUS.values())
    t4 = target.resolve(SmokeConfig("T4"), "auto")
    assert t4.memory == 16 * GiB and t4.gpu and "T4" in t4.name
    size = target.resolve(SmokeConfig("1"), "cuda")
    assert size.memory == GiB and size.gpu


# --- memory: FAIL with the numbers and levers that exist ------------------------------------------------------


def test_the_issue_gpt2_on_a_cpu_with_21_gib_fails(monkeypatch):
    # `greenrun smoke model=gpt2` said PASS while printing "does not fit: 50.8 GiB needed, 21.5 GiB".
    monkeypatch.setattr(target.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(target, "ram", lambda: int(21.5 * GiB))
    base = Config()
    cfg = dataclasses.replace(base, model=_gpt2_gpu().model)  # trainer.device=auto, micro-batch 32, fp32
    why, levers = fit.memory_verdict(cfg, target.resolve(cfg.smoke, cfg.trainer.device))
    full = _peak(cfg, 32)
    assert full > 21.5 * GiB  # the premise: GPT-2 at 32 x 1024 in fp32 is far more than the 21.5 GiB here
    assert (
        why == f"predicted peak {full / GiB:.1f} GiB per device does not fit: 21.5 GiB on this machine's RAM"
    )
    assert levers[0].settings == "trainer.micro_batch_size=8 trainer.grad_accum_steps=4"
    assert levers[0].total == _peak(cfg, 8) <= 21.5 * GiB < _peak(cfg, 16)


def test_a_gpu_config_too_large_for_the_named_gpu_fails_with_computed_levers():
    cfg = dataclasses.replace(_gpt2_gpu(), smoke=SmokeConfig("t4"))
    where = target.resolve(cfg.smoke, cfg.trainer.device)
    why, levers = fit.memory_verdict(cfg, where)
    full = _peak(cfg, 16)
    assert full > 16 * GiB  # the premise: 19.5 GiB of GPT-2 at 16 x 1024 in bf16 is more than a T4's 16 GiB
    assert why == f"predicted peak {full / GiB:.1f} GiB per device does not fit: 16.0 GiB on {where.name}"
    by_settings = {lever.settings: lever.total for lever in levers}
    # The largest smaller micro-batch that fits, with the accumulation raised to keep 512 sequences per step.
    assert by_settings["trainer.micro_batch_size=8 trainer.grad_accum_steps=64"] == _peak(cfg, 8) <= 16 * GiB
    assert by_settings["activation_checkpointing=full"] == _peak(cfg, 16, "full")
    for settings in by_settings:
        assert config.check_overrides(settings.split(" or ")[0].split()) == [], settings


def test_levers_name_only_registered_options_and_combine_when_none_fits_alone():
    # A 1 GiB target that no single lever reaches: the lowest of each kind together, then the micro-batch.
    cfg = dataclasses.replace(_gpt2_gpu(micro_batch_size=64, grad_accum_steps=8), smoke=SmokeConfig("1"))
    levers = fit.find_levers(cfg, target.resolve(cfg.smoke, cfg.trainer.device))
    names = {
        "activation_checkpointing": set(activation_checkpointing.POLICIES),
        "precision": set(precision.PRECISIONS),
        "optimizer": set(optimizer.OPTIMIZERS),
    }
    for lever in levers:
        for setting in lever.settings.replace(" or ", " ").split():
            key, value = setting.split("=")
            if key in names:
                assert value in names[key], setting
            else:
                assert key in config.leaf_keys(), setting
    assert all(lever.total > GiB for lever in levers[:-1])
    together = levers[-1].settings
    assert "activation_checkpointing=full" in together and "trainer.micro_batch_size=1" in together


def test_precisions_the_target_cannot_run_are_not_suggested(monkeypatch):
    monkeypatch.setattr(target, "ram", lambda: 2 * GiB)
    cfg = _gpt2_gpu(micro_batch_size=32, grad_accum_steps=1)
    cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, name="fp32"))
    levers = fit.find_levers(cfg, target.resolve(SmokeConfig("cpu"), "cpu"))
    half = next(lever.settings for lever in levers if "precision=" in lever.settings)
    assert half == "precision=fp16 or precision=bf16"  # float8 needs an Ada/Hopper GPU, not this CPU
    on_a_gpu = fit.find_levers(cfg, target.resolve(SmokeConfig("1"), "cuda"))
    assert any("precision=fp8" in lever.settings for lever in on_a_gpu)


def test_smoke_fails_with_exit_1_when_the_prediction_exceeds_the_target(tiny):
    # Tiny widths with a large batch: two CPU steps in seconds, a full-config prediction over 1 GiB.
    big = ["model.seq_len=1024", "trainer.micro_batch_size=64", "smoke.target=1"]
    r = run_cli("smoke", *tiny, *big)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "smoke FAIL" in r.stdout and "does not fit" in r.stdout and "Traceback" not in r.stderr
    base = Config()  # the same config as the command line, built here to compute the numbers it must print
    model = ModelConfig(n_layer=2, n_embd=64, n_head=2, seq_len=1024, vocab_size=512)
    cfg = dataclasses.replace(
        base, model=model, trainer=dataclasses.replace(base.trainer, micro_batch_size=64)
    )
    assert _peak(cfg, 64) > GiB
    assert f"does not fit: {fit.gib(_peak(cfg, 64))} needed, 1.00 GiB" in r.stdout
    lines = [line.strip() for line in r.stdout.splitlines()]
    micro = next(
        line for line in lines if line.startswith("trainer.micro_batch_size=32 trainer.grad_accum_steps=2")
    )
    assert micro.endswith(f"{fit.gib(_peak(cfg, 32))}  fits")
    full = next(line for line in lines if line.startswith("activation_checkpointing=full "))
    assert fit.gib(_peak(cfg, 64, "full")) in full


def test_a_gpu_recipe_too_large_for_a_gpu_of_the_table_fails(tiny):
    r = run_cli(
        "smoke",
        "+recipe=gpt2_gpu",
        *tiny,
        "model.seq_len=1024",
        "trainer.micro_batch_size=2048",
        "smoke.target=t4",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "does not fit" in r.stdout and "NVIDIA T4 (smoke.target=t4)" in r.stdout


# --- data: the real splits against the real seq_len ---------------------------------------------------------


def _small_corpus(path: Path, words: int = 800) -> Path:
    rng = random.Random(0)
    vocab = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
    ]
    path.write_text(" ".join(rng.choice(vocab) for _ in range(words)))
    return path


def _text_config(corpus: Path, cache: Path, **data_values) -> Config:
    base = Config()
    d = DataConfig(
        source="text", paths=[str(corpus)], cache_dir=str(cache), **({"max_chars": 0} | data_values)
    )
    model = dataclasses.replace(base.model, seq_len=128, vocab_size=512)
    return dataclasses.replace(base, data=d, model=model)


def _val_fraction_for(cfg: Config, val_tokens: int) -> float:
    """A val_fraction that gives the val split about `val_tokens`: between the smoke's window and the real one."""
    built = data.build(cfg.data, cfg.model.vocab_size)
    return val_tokens / (built.train_tokens + built.val_tokens)


def test_a_val_split_too_small_for_the_real_seq_len_is_a_data_error(tmp_path):
    corpus = _small_corpus(tmp_path / "notes.txt")
    cfg = _text_config(corpus, tmp_path / "cache")
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, val_fraction=_val_fraction_for(cfg, 100))
    )
    dataset = data.build(cfg.data, cfg.model.vocab_size)
    assert (
        smoke.SMOKE_SEQ_LEN < dataset.val_tokens <= cfg.model.seq_len
    )  # the shrunk window fits; the real one not
    with pytest.raises(DataError) as e:
        smoke.check_data(dataset, cfg)
    msg = str(e.value)
    assert (
        "model.seq_len=128" in msg
        and "needs 129 tokens" in msg
        and f"val split has {dataset.val_tokens}" in msg
    )
    assert "data.val_fraction=" in msg and "model.seq_len=" in msg and "data.paths" in msg
    assert "data.max_chars" not in msg  # no cap is set (0): raising it would change nothing


def test_a_binding_character_cap_is_named(tmp_path):
    corpus = _small_corpus(tmp_path / "notes.txt", words=2000)
    cfg = _text_config(corpus, tmp_path / "cache", max_chars=3000, val_fraction=0.12)
    dataset = data.build(cfg.data, cfg.model.vocab_size)
    assert dataset.val_tokens <= cfg.model.seq_len
    with pytest.raises(DataError, match=r"data\.max_chars=\d+ \(now 3000"):
        smoke.check_data(dataset, cfg)


def test_smoke_of_a_too_small_corpus_exits_2_before_training(tiny, tmp_path):
    corpus = _small_corpus(tmp_path / "notes.txt")
    cfg = _text_config(corpus, tmp_path / "cache")
    vf = _val_fraction_for(cfg, 100)
    overrides = [o for o in tiny if not o.startswith(("data.max_chars", "model.seq_len", "data.cache_dir"))]
    r = run_cli(
        "smoke",
        *overrides,
        "data=text",
        f"data.paths=[{corpus}]",
        f"data.val_fraction={vf}",
        "model.seq_len=128",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "corpus too small for model.seq_len=128" in r.stderr and "data.val_fraction=" in r.stderr
    assert "PASS" not in r.stdout and "Traceback" not in r.stderr


# --- what the two steps of a GPU config run: precision, depth, device ------------------------------------------


def _with(cfg: Config, precision_name: str = "", policy: str = "") -> Config:
    if precision_name:
        cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, name=precision_name))
    if policy:
        cfg = dataclasses.replace(
            cfg, activation_checkpointing=dataclasses.replace(cfg.activation_checkpointing, policy=policy)
        )
    return cfg


def test_a_gpu_config_runs_its_cpu_steps_in_fp32_whatever_this_cpus_matmuls_measure(monkeypatch):
    def measured(*_):
        raise AssertionError("the decision must not depend on a matmul measurement")

    monkeypatch.setattr(hardware, "matmul_rates", measured)
    for name in ("bf16", "fp16", "fp8"):
        run_as, why = smoke.cpu_precision(_with(_gpt2_gpu(), name), on_gpu=True)
        assert run_as == "fp32" and "minutes" in why, name
    assert smoke.cpu_precision(_with(_gpt2_gpu(), "fp32"), on_gpu=True) == ("fp32", "")
    # A CPU run trains in its own precision on this CPU: the steps test exactly that.
    assert smoke.cpu_precision(_gpt2_gpu(), on_gpu=False) == ("bf16", "")
    fp8 = _with(_gpt2_gpu(), "fp8")
    assert smoke.cpu_precision(fp8, on_gpu=False) == ("bf16", "its own kernels need a GPU")


def test_the_memory_prediction_stays_the_full_bf16_config(monkeypatch):
    monkeypatch.setattr(target.torch.cuda, "is_available", lambda: False)
    cfg = _gpt2_gpu()
    seen = {}

    def steps(_cfg, small, device):
        seen.update(small=small, device=device)
        return "", [1.0, 0.9]

    monkeypatch.setattr(smoke, "_two_steps", steps)
    result = smoke.run(cfg)
    small = seen["small"]
    assert (small.precision.name, small.model.n_layer, small.trainer.device) == ("fp32", 2, "cpu")
    assert (small.model.n_embd, small.model.n_head, small.model.vocab_size) == (768, 12, 50257)
    assert seen["device"].type == "cpu" and result.ran_on == "the CPU"
    assert result.layers_run == 2 and result.params == 124_475_904
    assert result.estimate.total == _peak(cfg, 16)  # 12 blocks, 16 x 1024, bf16
    assert _peak(cfg, 16) != _peak(_with(cfg, "fp32"), 16)  # which precision is predicted shows in the number


@pytest.mark.parametrize(
    ("policy", "n_layer", "blocks"),
    [("none", 12, 2), ("full", 12, 2), ("every_k", 12, 2), ("sqrt", 12, 3), ("sqrt", 2, 2), ("none", 1, 1)],
)
def test_a_gpu_config_runs_the_fewest_blocks_that_show_its_checkpointing_plan(policy, n_layer, blocks):
    cfg = _with(_gpt2_gpu(), policy=policy)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=n_layer))
    n, why = smoke.smoke_depth(cfg, on_gpu=True, ram=1000 * GiB)
    assert n == blocks and bool(why) == (blocks < n_layer)
    full = set(activation_checkpointing.plan(cfg.activation_checkpointing, n_layer))
    assert set(activation_checkpointing.plan(cfg.activation_checkpointing, n)) == full


def test_a_cpu_config_runs_every_block_unless_ram_is_short():
    cpu = dataclasses.replace(_gpt2_gpu(), trainer=dataclasses.replace(_gpt2_gpu().trainer, device="cpu"))
    assert smoke.smoke_depth(cpu, on_gpu=False, ram=1000 * GiB) == (12, "")
    state = 124_475_904 * smoke.BYTES_PER_PARAM_CPU  # 1.85 GiB of fp32 weights, grads and AdamW moments
    n, why = smoke.smoke_depth(cpu, on_gpu=False, ram=int(state / smoke.RAM_SHARE) - 1)
    assert n == 2 and "would not fit in this machine's RAM" in why
    # Room for the embeddings and one block only: one block, for a CPU and a GPU config alike.
    embeddings = 124_475_904 - 12 * 7_087_872
    one = int((embeddings + 1.5 * 7_087_872) * smoke.BYTES_PER_PARAM_CPU / smoke.RAM_SHARE)
    assert smoke.smoke_depth(cpu, on_gpu=False, ram=one)[0] == 1
    assert smoke.smoke_depth(_gpt2_gpu(), on_gpu=True, ram=one)[0] == 1


def test_the_device_for_the_two_steps():
    need = 3 * GiB
    assert smoke.preflight_device(True, True, 40 * GiB, need) == (
        True,
        "40.0 GiB free there, 3.00 GiB needed",
    )
    assert smoke.preflight_device(True, True, need, need)[0]
    busy, why = smoke.preflight_device(True, True, need - 1, need)
    assert not busy and "free of the 3.00 GiB needed" in why
    assert smoke.preflight_device(True, True, None, need) == (
        False,
        "the run trains on a GPU, but the one here has an unknown amount free of the 3.00 GiB needed",
    )
    assert smoke.preflight_device(True, False, 40 * GiB, need) == (
        False,
        "the run trains on a GPU, and none is visible here",
    )
    assert smoke.preflight_device(True, True, 40 * GiB, need, ["precision=bf16: no bf16 here"]) == (
        False,
        "precision=bf16: no bf16 here",
    )
    assert smoke.preflight_device(False, True, 40 * GiB, need) == (False, "")  # a CPU run stays on the CPU


def test_a_free_gpu_runs_the_two_steps_in_the_configured_precision(monkeypatch):
    cuda = target.torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(precision.get("bf16"), "device_problems", lambda device: [])
    free = {"bytes": 140 * GiB}
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 * GiB))
    seen = {}

    def steps(_cfg, small, device):
        seen.update(small=small, device=device)
        return "", [1.0, 0.9]

    monkeypatch.setattr(smoke, "_two_steps", steps)
    cfg = dataclasses.replace(
        _gpt2_gpu(), smoke=SmokeConfig("h200")
    )  # a table GPU: resolve asks CUDA nothing
    result = smoke.run(cfg)
    small = seen["small"]
    assert seen["device"] == target.torch.device("cuda", 0) and result.ran_on == "NVIDIA H200 (cuda:0)"
    assert (small.precision.name, small.trainer.device, small.trainer.compile) == ("bf16", "cuda", False)
    assert small.model.n_layer == 2 and result.ran_as == "bf16"
    assert result.estimate.total == _peak(cfg, 16)

    need = fit.estimate(smoke.smoke_config(cfg, 2, "bf16", device="cuda")).total
    free["bytes"] = need  # less than the need with its margin: the CPU stands in
    result = smoke.run(cfg)
    assert seen["device"].type == "cpu" and seen["small"].precision.name == "fp32"
    assert "free of the" in result.ran_on_why


def test_a_gpu_recipe_reports_what_its_cpu_steps_ran(tiny):
    r = run_cli("smoke", "+recipe=gpt2_gpu", *tiny, "model.n_layer=6", "model.seq_len=128")
    assert r.returncode == 0, r.stdout + r.stderr
    if torch.cuda.is_available():
        assert "in bf16, eager" in r.stdout
    else:
        assert "bf16 ran as fp32 on the CPU (the run trains on a GPU, and none is visible here)" in r.stdout
    assert "ran 2 of 6 blocks (same width, heads and vocabulary)" in r.stdout
    assert "the memory prediction is all 6's" in r.stdout
