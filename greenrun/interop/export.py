"""`greenrun export RUN_DIR|s3://… [--format hf|safetensors] [--dtype bf16|fp16|fp32] [--out DIR] [--step N]`.

hf: a transformers GPT2LMHeadModel directory with the run's tokenizer (hf.py), by default
RUN_DIR/export/hf-step-<N>-<dtype>/. safetensors: the model-only weights under greenrun's names, padded
vocabulary included, as the end of a run exports them (ckpt/export.py), by default into RUN_DIR/export/.
The dtype defaults to the run's checkpoint.weights_dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import greenrun
from greenrun.ckpt import export as weights
from greenrun.interop import hf, load
from greenrun.interop.options import ExportOptions

log = logging.getLogger(__name__)
_LOAD_HINT = "load it with AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR)"


def export(target: str, opts: ExportOptions, overrides: list[str]) -> Path:
    """Write the export of a run's checkpoint; returns what was written (a directory, or the file)."""
    opened = load.open_run(target, opts.step, overrides)
    dtype = opts.dtype or opened.cfg.checkpoint.weights_dtype
    state = load.model_state(opened)
    if opts.format == "safetensors":
        folder = Path(opts.out) if opts.out else opened.run_dir / "export"
        name = weights.export_path(opened.run_dir, opened.step, dtype).name
        written = weights.write_file(folder / name, state, opened.step, dtype)
        log.info(f"{opened.checkpoint.name} of {target}: model-only weights ({dtype}) in {written}")
        return written
    tokens = load.tokens(opened)  # before any writing: without the tokenizer there is no hf export
    out = Path(opts.out) if opts.out else opened.run_dir / "export" / f"hf-step-{opened.step:08d}-{dtype}"
    provenance = {
        hf.MARK: opened.step,
        "greenrun_run": opened.url or str(Path(opened.run_dir).resolve()),
        "greenrun_config_hash": opened.manifest.get("config_hash", ""),
        "greenrun_version": greenrun.__version__,
    }
    written = hf.write(out, opened.cfg.model, state, tokens, dtype, provenance)
    log.info(f"{opened.checkpoint.name} of {target} in {written} ({dtype}): {_LOAD_HINT}")
    return written
