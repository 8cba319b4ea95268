"""`greenrun export`: a trained tiny run as a transformers GPT2LMHeadModel whose logits are greenrun's (fp32,
max abs diff <= 1e-4), with biases and without, loaded back with from_pretrained offline; and the
model-only safetensors, the refusals and the fast `import greenrun.cli`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from greenrun import cli, config, job
from greenrun.interop import load
from tests.common import TINY

# vocab_size 500 pads the embedding to 512 rows: the export must cut them off again.
SHAPES = {"bias": ["model.vocab_size=500"], "nobias": ["model.bias=false"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """Two tiny runs trained for a few steps through the real job (preflight off): with and without biases."""
    made = {}
    for name, extra in SHAPES.items():
        run_dir = tmp_path_factory.mktemp("export") / name
        overrides = [*TINY, f"data.cache_dir={cache_dir}", *extra, f"run.dir={run_dir}", "preflight=false"]
        overrides += ["trainer.max_steps=4", "trainer.eval_interval=2", "checkpoint.interval=2"]
        overrides += ["checkpoint.keep_last=3", "optimizer.lr=1e-2"]  # a few big steps: the weights move
        result = job.guarded(lambda o=overrides: job.train(config.apply_overrides(config.Config(), o)))
        assert result.exit_code == 0, result.message
        made[name] = run_dir
    return made


def _greenrun_logits(run_dir: Path, idx: torch.Tensor) -> torch.Tensor:
    """Every position's logits over the real vocabulary (GPT.forward returns the last position's only)."""
    net = load.build_model(load.open_run(str(run_dir)))
    seen = {}
    net.ln_f.register_forward_hook(lambda _m, _i, out: seen.setdefault("x", out))
    with torch.no_grad():
        net(idx)
    return F.linear(seen["x"], net.wte.weight)[..., : net.cfg.vocab_size]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_hf_export_has_greenrun_logits_and_loads_offline(runs, name, tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from_pretrained must not reach for a hub
    out = tmp_path / "hf"
    assert cli.main(["export", str(runs[name]), "--format", "hf", "--dtype", "fp32", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    saved = config.load_yaml(runs[name] / "config.yaml").model
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.vocab_size == saved.vocab_size
    assert (
        hf.config.greenrun_step == 4 and hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    )

    idx = torch.randint(0, saved.vocab_size, (2, saved.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(idx).logits
    ours = _greenrun_logits(runs[name], idx)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= 1e-4

    # The tokenizer is the run's: the same ids, the same text back, end-of-text as eos and bos.
    tokens = load.tokens(load.open_run(str(runs[name])))
    text = "def f(x):\n    return x + 1  # ok<|endoftext|>"
    assert tok(text)["input_ids"] == tokens.encode(text)
    assert tok.decode(tokens.encode(text)) == tokens.decode(tokens.encode(text))
    assert tok.eos_token_id == tok.bos_token_id == tokens.eot_id == hf.config.eos_token_id


def test_export_defaults_step_dtype_and_replaces_an_earlier_export(runs) -> None:
    run_dir = runs["bias"]
    assert cli.main(["export", str(run_dir), "step=2"]) == 0
    out = run_dir / "export" / "hf-step-00000002-bf16"  # the run's checkpoint.weights_dtype
    meta = json.loads((out / "config.json").read_text())
    assert meta["greenrun_step"] == 2 and meta["dtype"] == "bfloat16"
    assert cli.main(["export", str(run_dir), "step=2"]) == 0  # its own earlier export: replaced
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_safetensors_export_is_the_model_only_weights(runs, tmp_path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "st"
    assert cli.main(["export", str(runs["bias"]), "format=safetensors", "dtype=fp16", f"out={out}"]) == 0
    weights = load_file(str(out / "model-step-00000004-fp16.safetensors"))
    state = load.model_state(load.open_run(str(runs["bias"])))
    assert set(weights) == set(state) and weights["wte.weight"].shape[0] == 512  # greenrun's padded rows
    assert all(w.dtype == torch.float16 for w in weights.values())
    assert torch.equal(weights["h.0.mlp.c_fc.weight"], state["h.0.mlp.c_fc.weight"].half())


def test_bad_arguments_and_a_missing_token_cache_are_one_message_exit_2(runs, tmp_path, capsys) -> None:
    run_dir = str(runs["nobias"])
    assert cli.main(["export", run_dir, "--format", "onnx"]) == 2
    assert "--format: unknown value 'onnx'" in capsys.readouterr().err
    assert cli.main(["export", run_dir, "--dtype=fp8"]) == 2
    assert cli.main(["export", run_dir, "--step", "3"]) == 2
    assert "step=3" in capsys.readouterr().err
    assert cli.main(["export", run_dir, "optimizer.lr=1"]) == 2
    assert "unknown option 'optimizer.lr'" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert cli.main(["export", run_dir, f"--out={tmp_path / 'taken'}"]) == 2
    assert "not an earlier greenrun export" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert cli.main(["export", run_dir, f"data.cache_dir={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err
    assert "data.cache_dir" in err and "tokenizer" in err and "Traceback" not in err
    assert cli.main(["export", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_import_greenrun_cli_and_export_help_stay_light() -> None:
    code = (
        "import sys; from greenrun import cli; cli.main(['export', '--help']); cli.main(['sample', '--help']); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("[]") and "--format hf" in r.stdout and "max_new_tokens=N" in r.stdout
