"""A greenrun GPT as a transformers GPT2LMHeadModel directory: config.json, model.safetensors and the tokenizer,
for `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`, offline.

The two models compute the same function once four differences in how the weights are kept are undone:
  - greenrun pads the embedding rows to a multiple of 64 (train/model.py): the export keeps model.vocab_size;
  - nn.Linear stores [out, in] and GPT-2's Conv1D [in, out]: every block matrix is transposed;
  - model.bias=false has no biases, while GPT-2 always adds them: they are exported as zeros;
  - the head is tied to the token embedding in both, so it is stored once.
q, k and v are packed alike (one c_attn, split into thirds, heads contiguous within each) and the MLP's GELU
is the tanh approximation in both (`gelu_new`), LayerNorm eps 1e-5.

transformers is imported here only, when an export runs: `import greenrun.cli` stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from greenrun import data
from greenrun.ckpt.export import DTYPES
from greenrun.config import ConfigError
from greenrun.core import fs
from greenrun.train.model import ModelConfig

# GPT-2's per-block matrices and their output widths in units of n_embd (the zero bias's length).
_LINEARS = {"attn.c_attn": 3, "attn.c_proj": 1, "mlp.c_fc": 4, "mlp.c_proj": 1}
_NORMS = ("ln_1", "ln_2")
MARK = "greenrun_step"  # in config.json: which checkpoint step an export holds; it also marks one replaceable


def gpt2_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """greenrun's weights (by its names) as GPT2LMHeadModel's state dict, fp32."""
    width = cfg.n_embd

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        weight = state[f"{prefix}.weight"].float()
        bias = state.get(f"{prefix}.bias")
        return {
            f"transformer.{prefix}.weight": weight,
            f"transformer.{prefix}.bias": torch.zeros(width) if bias is None else bias.float(),
        }

    wte = state["wte.weight"][: cfg.vocab_size].float().contiguous()
    out = {"transformer.wte.weight": wte, "transformer.wpe.weight": state["wpe.weight"].float()}
    for i in range(cfg.n_layer):
        for name in _NORMS:
            out |= norm(f"h.{i}.{name}")
        for name, times in _LINEARS.items():
            key = f"h.{i}.{name}"
            bias = state.get(f"{key}.bias")
            out[f"transformer.{key}.weight"] = state[f"{key}.weight"].float().t().contiguous()
            out[f"transformer.{key}.bias"] = torch.zeros(times * width) if bias is None else bias.float()
    out |= norm("ln_f")
    out["lm_head.weight"] = wte  # tied: the same tensor, saved once
    return out


def gpt2_config(cfg: ModelConfig, eot_id: int, provenance: dict[str, Any]) -> Any:
    """The transformers GPT2Config of greenrun's model.*; `provenance` (step, run, hash) rides along in it."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.seq_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=1e-5,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
        **provenance,
    )


def tokenizer(tokens: data.Dataset, seq_len: int) -> Any:
    """The run's tokenizer.json as a PreTrainedTokenizerFast, end-of-text as both bos and eos."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    eot = tokens.tokenizer.id_to_token(tokens.eot_id)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokens.tokenizer.to_str()),  # a copy: the wrapper may change it
        bos_token=eot,
        eos_token=eot,
        model_max_length=seq_len,
        clean_up_tokenization_spaces=False,  # decode as greenrun does: " ." stays " ."
    )


def write(
    out: Path,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    tokens: data.Dataset,
    dtype: str,
    provenance: dict[str, Any],
) -> Path:
    """Write the directory `out` whole (a temp directory renamed into place) and return it. `provenance`
    goes into config.json ({"greenrun_step": N, ...}, the step under MARK).

    `out` may be missing, empty, or an earlier export (its config.json says greenrun_step); anything else
    is refused, so an export never deletes files of someone else's.
    """
    try:
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ConfigError(
            ["--format hf needs the transformers package: pip install transformers (or --format safetensors)"]
        ) from None
    out = Path(out)
    fs.refuse_symlink(out)
    if out.exists() and not _replaceable(out):
        raise ConfigError(
            [f"--out {out}: exists and is not an earlier greenrun export; choose another --out or remove it"]
        )
    net = GPT2LMHeadModel(gpt2_config(cfg, tokens.eot_id, provenance))
    net.load_state_dict(gpt2_state(cfg, state), strict=True)  # every name and shape, or it says which
    net = net.to(DTYPES[dtype]).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    hf_logging.disable_progress_bar()  # one file of a small model: a bar would only clutter the log
    try:
        net.save_pretrained(tmp)
        tokenizer(tokens, cfg.seq_len).save_pretrained(tmp)
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
        for path in tmp.iterdir():  # readable by the machine's other users, as greenrun's other files
            path.chmod(0o644)
        if out.exists():
            old = out.parent / f".old-{out.name}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replaceable(out: Path) -> bool:
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        return MARK in json.loads((out / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _portable_tokenizer_class(path: Path) -> None:
    """transformers 5 writes its own class name (TokenizersBackend), which 4.x cannot resolve; the
    PreTrainedTokenizerFast name loads the same tokenizer.json in both."""
    settings = json.loads(path.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    fs.atomic_write(path, json.dumps(settings, indent=2) + "\n")
