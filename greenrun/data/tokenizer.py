"""Which tokenizer turns the text into ids: the TOKENIZERS registry, one option per data.tokenizer.

Every option ends as a `tokenizers.Tokenizer`, saved as tokenizer.json in the token cache, so everything
downstream (Dataset, export, sampling) reads one format. Only `bpe` is learned from the corpus (after dedup,
so duplicates do not buy merges); the others are fixed before any text is read, which lets a changed file
re-tokenise alone: a learned vocabulary would change with every edit, and with it every shard.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from greenrun.core.registry import Registry
from greenrun.data.sources import DataConfig, DataError

EOT = "<|endoftext|>"
_OFFLINE = ("1", "ON", "YES", "TRUE")  # how huggingface_hub spells true in HF_HUB_OFFLINE


class TokenizerOption:
    """One data.tokenizer: `load` for a fixed vocabulary, `train` for one learned from the corpus."""

    trains = False  # True: train() runs on the (deduplicated) corpus; False: load() needs no text

    def problems(self, cfg: DataConfig) -> list[str]:
        return []

    def load(self, cfg: DataConfig) -> Tokenizer:
        raise NotImplementedError

    def train(self, cfg: DataConfig, texts: Iterator[str], vocab_size: int) -> Tokenizer:
        raise NotImplementedError


TOKENIZERS: Registry[type[TokenizerOption]] = Registry("data.tokenizer")


def problems(cfg: DataConfig) -> list[str]:
    found = TOKENIZERS.problems(cfg.tokenizer)
    if not found:
        found += option(cfg).problems(cfg)
    if not cfg.eot_token:
        found.append(f"data.eot_token: empty; the end-of-text token GPT-2 uses is {EOT}")
    return found


def option(cfg: DataConfig) -> TokenizerOption:
    return TOKENIZERS.get(cfg.tokenizer)()


def digest(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON: two tokenizers with one digest give the same ids for any text."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def eot_id(tok: Tokenizer, cfg: DataConfig) -> int:
    found = tok.token_to_id(cfg.eot_token)
    if found is None:
        special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special][:8]
        raise DataError(
            f"data.eot_token={cfg.eot_token!r} is not in the vocabulary of data.tokenizer={cfg.tokenizer} "
            f"(its special tokens: {', '.join(special) or 'none'}); set data.eot_token to the one that "
            "ends a document"
        )
    return found


def id_space(tok: Tokenizer) -> int:
    """Ids a model must have rows for: the largest id + 1 (added tokens can sit above the base vocabulary)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _fixed(tok: Tokenizer) -> Tokenizer:
    # A tokenizer.json from elsewhere may truncate or pad (a model's max length): documents must not be cut.
    tok.no_truncation()
    tok.no_padding()
    return tok


@TOKENIZERS.register("bpe")
class Bpe(TokenizerOption):
    """A byte-level BPE trained on the corpus with model.vocab_size ids: every byte is in its alphabet, so
    no text is ever out of vocabulary."""

    trains = True

    def train(self, cfg: DataConfig, texts: Iterator[str], vocab_size: int) -> Tokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[cfg.eot_token],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return tok


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255, the alphabet of every byte-level tokenizer."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


@TOKENIZERS.register("bytes")
class Bytes(TokenizerOption):
    """Raw UTF-8 bytes: id b for byte b, and 256 for the end-of-text token. Nothing to learn or download."""

    def load(self, cfg: DataConfig) -> Tokenizer:
        vocab = {char: b for b, char in enumerate(byte_chars())}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([cfg.eot_token])
        return tok


def _offline() -> bool:
    return any(os.environ.get(k, "").upper() in _OFFLINE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@TOKENIZERS.register("gpt2")
class Gpt2(TokenizerOption):
    """GPT-2's tokenizer (50,257 ids) through transformers: from data.tokenizer_path, a local directory or a
    Hub id, else `gpt2` from the Hugging Face cache (a download unless HF_HUB_OFFLINE=1)."""

    def load(self, cfg: DataConfig) -> Tokenizer:
        try:
            from transformers import AutoTokenizer  # seconds to import: only when this option is used
        except ImportError:
            raise DataError(
                "data.tokenizer=gpt2 loads through transformers, which is not installed: pip install "
                "transformers, or use data.tokenizer=path with the tokenizer.json"
            ) from None
        where = os.path.expanduser(cfg.tokenizer_path) if cfg.tokenizer_path else "gpt2"
        local = os.path.isdir(where)
        try:
            loaded = AutoTokenizer.from_pretrained(where, local_files_only=local or _offline())
        except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError and hub errors alike
            hint = (
                "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set: run once online"
                if _offline() and not local
                else "point data.tokenizer_path at a directory holding tokenizer.json"
            )
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"data.tokenizer=gpt2: cannot load {where!r} ({first}); {hint}") from None
        backend = getattr(loaded, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise DataError(
                f"data.tokenizer=gpt2: {where!r} has no fast tokenizer (tokenizer.json); save it with "
                "transformers' PreTrainedTokenizerFast.save_pretrained, or use data.tokenizer=path"
            )
        return _fixed(Tokenizer.from_str(backend.to_str()))


@TOKENIZERS.register("path")
class FromFile(TokenizerOption):
    """Any tokenizer.json (the `tokenizers` format), or a directory holding one."""

    def problems(self, cfg: DataConfig) -> list[str]:
        if cfg.tokenizer_path:
            return []
        return [
            "data.tokenizer_path: empty but data.tokenizer=path; name a tokenizer.json (or its directory)"
        ]

    def load(self, cfg: DataConfig) -> Tokenizer:
        path = Path(os.path.expanduser(cfg.tokenizer_path))
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            return _fixed(Tokenizer.from_file(str(path)))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
            raise DataError(
                f"data.tokenizer_path={cfg.tokenizer_path!r}: cannot load {path} as a tokenizer.json ({e})"
            ) from None
