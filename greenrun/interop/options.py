"""The arguments of `greenrun export` and `greenrun sample`, and their --help, without importing torch.

Each option reads as `--name VALUE`, `--name=VALUE` or `name=VALUE` (`--max-new-tokens` for max_new_tokens),
so both commands follow `greenrun report`'s `out=PATH | --out PATH`. Besides their own options they take the
keys that say where a saved run's files are on this machine (READ_KEYS); its config decides everything else.
A bad argument is a ConfigError (exit 2) naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from greenrun.core import checks

# Where the tokens are, how to reach the bucket, where an s3:// run comes down.
READ_KEYS = ("data.cache_dir=", "storage.", "run.dir=")
FORMATS = ("hf", "safetensors")
DTYPES = ("bf16", "fp16", "fp32")  # greenrun.ckpt.export.DTYPES' names
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ExportOptions:
    format: str = "hf"  # hf | safetensors
    dtype: str | None = None  # bf16 | fp16 | fp32; None: the run's checkpoint.weights_dtype
    out: str | None = None  # the directory written; None: RUN_DIR/export/...
    step: int | None = None  # the checkpoint's step; None: the newest valid one


@dataclass
class SampleOptions:
    max_new_tokens: int | None = None  # tokens to generate; None: the run's trainer.sample_tokens
    temperature: float = 0.8  # softmax temperature; <= 0 picks the likeliest token (greedy)
    top_k: int = 50  # sample among the k likeliest tokens; 0: the whole vocabulary
    seed: int | None = None  # the sampler's seed; None: the run's trainer.seed
    step: int | None = None  # the checkpoint's step; None: the newest valid one
    device: str = "auto"  # auto | cpu | cuda


def _error(problem: str) -> Exception:
    from greenrun.config import ConfigError  # the config stack imports torch: only once there is an error

    return ConfigError([problem])


def split(
    command: str, args: list[str], names: tuple[str, ...]
) -> tuple[list[str], dict[str, str], list[str]]:
    """(positional arguments, {option: value}, READ_KEYS overrides) of a command line."""
    positional, opts, overrides = [], {}, []
    spelled = {f"--{n.replace('_', '-')}": n for n in names} | {f"--{n}": n for n in names}
    it = iter(args)
    for a in it:
        key, eq, value = a.partition("=")
        if key in spelled and not eq:
            value = next(it, None)
            if value is None:
                raise _error(f"{command}: {a} needs a value")
            opts[spelled[key]] = value
        elif key in spelled or (eq and key in names):
            opts[spelled.get(key, key)] = value
        elif eq and a.startswith(READ_KEYS):
            overrides.append(a)
        elif a.startswith("-") or (eq and key.replace(".", "_").isidentifier()):
            raise _error(
                f"{command}: unknown option '{key}'; use {', '.join(n + '=' for n in names)} data.cache_dir=, "
                f"storage.* or run.dir= (`greenrun {command} --help`)"
            )
        else:
            positional.append(a)
    if not positional:
        raise _error(f"{command} takes a RUN_DIR or s3://bucket/prefix/run (`greenrun {command} --help`)")
    return positional, opts, overrides


def _number(command: str, opts: dict[str, str], name: str, kind: type, default: Any = None, low: int = 0):
    """opts[name] as an int or float (ints at least `low`), `default` when not given."""
    if name not in opts:
        return default
    try:
        value = kind(opts[name])
    except ValueError:
        value = None
    if value is None or (kind is int and value < low):
        raise _error(
            f"{command}: {name}={opts[name]} must be "
            + (f"an integer >= {low}" if kind is int else "a number")
        )
    return value


def export_args(args: list[str]) -> tuple[str, ExportOptions, list[str]]:
    positional, opts, overrides = split("export", args, ("format", "dtype", "out", "step"))
    if len(positional) > 1:
        raise _error(f"export takes one RUN_DIR or s3:// URL, got {positional}")
    chosen = ExportOptions(
        format=opts.get("format", "hf"),
        dtype=opts.get("dtype"),
        out=opts.get("out"),
        step=_number("export", opts, "step", int),
    )
    problems = checks.choice("export: --format", chosen.format, FORMATS)
    if chosen.dtype is not None:
        problems += checks.choice("export: --dtype", chosen.dtype, DTYPES)
    if chosen.out == "":
        problems.append("export: --out needs a DIR")
    if problems:
        from greenrun.config import ConfigError

        raise ConfigError(problems)
    return positional[0], chosen, overrides


def sample_args(args: list[str]) -> tuple[str, str | None, SampleOptions, list[str]]:
    names = ("max_new_tokens", "temperature", "top_k", "seed", "step", "device", "prompt")
    positional, opts, overrides = split("sample", args, names)
    if len(positional) > 2 or (len(positional) == 2 and "prompt" in opts):
        raise _error(f"sample takes a RUN_DIR or s3:// URL and one PROMPT (quote it), got {positional}")
    prompt = opts.get("prompt", positional[1] if len(positional) == 2 else None)
    chosen = SampleOptions(
        max_new_tokens=_number("sample", opts, "max_new_tokens", int),
        temperature=_number("sample", opts, "temperature", float, 0.8),
        top_k=_number("sample", opts, "top_k", int, 50),
        seed=_number("sample", opts, "seed", int),
        step=_number("sample", opts, "step", int),
        device=opts.get("device", "auto"),
    )
    if problems := checks.choice("sample: device", chosen.device, DEVICES):
        raise _error(problems[0])
    return positional[0], prompt, chosen, overrides


HELP = {
    "export": """\
usage: greenrun export RUN_DIR|s3://B/P/RUN [--format hf|safetensors] [--dtype bf16|fp16|fp32] [--out DIR]
                       [--step N] [data.cache_dir=DIR] [storage.*=...] [run.dir=DIR]

One checkpoint's weights (the newest valid one, or --step N), for use outside greenrun. Loading reads data
only: config.yaml (nothing in it is resolved), manifest.json and safetensors.

  --format hf           (default) a transformers GPT2LMHeadModel directory: config.json, model.safetensors and
                        the run's tokenizer (end-of-text as bos and eos), for AutoModelForCausalLM and
                        AutoTokenizer.from_pretrained(DIR), offline
  --format safetensors  the model-only weights under greenrun's names, as the end of a run exports them
  --dtype D             bf16 | fp16 | fp32 (default: the run's checkpoint.weights_dtype)
  --out DIR             default RUN_DIR/export/hf-step-N-D/ (hf) or RUN_DIR/export/ (safetensors); an earlier
                        hf export there is replaced, any other non-empty directory refused
  --step N              a committed checkpoint's step (default: the newest valid one); another is exit 2
  data.cache_dir=DIR    where the run's token cache is (hf needs its tokenizer; default: the run's setting)
  storage.*=...         how to reach an s3:// run's bucket (e.g. storage.endpoint_url=...)
  run.dir=DIR           where an s3:// run comes down (default ./runs/<run id>), as with `greenrun resume`

Each option also reads as key=value (format=hf, dtype=fp32, out=DIR, step=N).""",
    "sample": """\
usage: greenrun sample RUN_DIR|s3://B/P/RUN ["PROMPT"] [max_new_tokens=N] [temperature=T] [top_k=K] [seed=S]
                       [step=N] [device=auto|cpu|cuda] [data.cache_dir=DIR] [storage.*=...] [run.dir=DIR]

Text from one checkpoint (the newest valid one, or step=N) on stdout; the same seed gives the same text. The
trainer's end-of-run sample takes the same path, so the defaults reprint a finished run's sample.

  PROMPT             the text to continue (default: the run's trainer.sample_prompt, else its data source's);
                     one that looks like key=value goes as prompt='x=1'
  max_new_tokens=N   tokens to generate (default: the run's trainer.sample_tokens)
  temperature=T      softmax temperature (default 0.8; 0 = always the likeliest token)
  top_k=K            sample among the K likeliest tokens (default 50; 0 = the whole vocabulary)
  seed=S             the sampler's seed (default: the run's trainer.seed)
  step=N             a committed checkpoint's step (default: the newest valid one); another is exit 2
  device=D           auto (a GPU when there is one) | cpu | cuda
  data.cache_dir=DIR, storage.*=..., run.dir=DIR    as for `greenrun export --help`

Each option also reads as --name VALUE (--max-new-tokens 50, --seed 1).""",
}
