"""Text from a model: a prompt, sampled tokens, the text back. The trainer's end-of-run sample and
`greenrun sample` run this same function, so a checkpoint sampled later with the run's own seed, prompt and
length prints what the run printed at its end (on the same device).

The generator is seeded per call and nothing draws from the global RNGs, so the same seed gives the same
text, and sampling leaves a training process's random state alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from greenrun import data
from greenrun.config import ConfigError
from greenrun.interop import load
from greenrun.interop.options import SampleOptions
from greenrun.runtime import distributed
from greenrun.train import model, precision


def generate_text(
    net: model.GPT,
    tokens: data.Dataset,
    prompt: str,
    max_new_tokens: int,
    *,
    seed: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> str:
    """`prompt` and `max_new_tokens` sampled tokens as text (an empty prompt starts from end-of-text)."""
    device = net.wte.weight.device
    ids = torch.tensor([tokens.encode(prompt) or [tokens.eot_id]], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    net.eval()
    with autocast():
        out = model.generate(net, ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tokens.decode(out[0].tolist())


def sample(target: str, prompt: str | None, opts: SampleOptions, overrides: list[str]) -> tuple[str, int]:
    """(text, checkpoint step) of `prompt` continued by a run's checkpoint; prompt None: the run's own."""
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["sample: device=cuda, but no CUDA GPU is visible here; use device=auto or cpu"])
    opened = load.open_run(target, opts.step, overrides)
    cfg = opened.cfg
    tokens = load.tokens(opened)
    device = distributed.resolve_device(opts.device)
    net = load.build_model(opened, device)
    if prompt is None:
        prompt = cfg.trainer.sample_prompt or data.sample_prompt(cfg.data)
    n = cfg.trainer.sample_tokens if opts.max_new_tokens is None else opts.max_new_tokens
    seed = cfg.trainer.seed if opts.seed is None else opts.seed
    option = precision.get(cfg.precision.name)
    text = generate_text(
        net,
        tokens,
        prompt,
        n,
        seed=seed,
        temperature=opts.temperature,
        top_k=opts.top_k,
        autocast=lambda: option.autocast(device),
    )
    return text, opened.step
