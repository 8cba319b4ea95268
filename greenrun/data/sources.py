"""The corpus: `data.*` config, the SOURCES registry (one option per data.source) and reading the text.

A source turns the config into records: (name, text) pairs in a fixed order, the name relative so that
moving a corpus keeps its cache. A file is one record (plain text) or many (jsonl, parquet: one per row).
The expensive work on their text (dedup, tokenizer, shards) happens in greenrun.data.cache.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import logging
import math
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from greenrun.core.checks import choice
from greenrun.core.fields import maths, plain
from greenrun.core.registry import Registry
from greenrun.data import formats

log = logging.getLogger(__name__)

ENCODING_ERRORS = ("strict", "replace", "skip")
FORMATS = ("auto", "text", "jsonl", "parquet")
DEDUP = ("none", "exact", "near")
# data.format=auto reads these as rows of records; any other file is one plain-text record.
_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_SNIFF_BYTES = 8192  # text files have no NUL byte in their first 8 KiB; binaries nearly always do
_SKIPPED: set[Path] = set()  # files encoding_errors=skip left out, warned about once


class DataError(ValueError):
    """A data problem the user fixes by changing `data.*` or the files it points at."""


@dataclass
class DataConfig:
    source: str = maths("stdlib")  # stdlib (this Python's library, no download) | text (data.paths) | hf
    paths: list[str] = maths(factory=list, local=True)  # files or globs (** recurses) for text or hf; ~ ok
    format: str = maths("auto")  # auto (.jsonl/.ndjson, .parquet by extension) | text | jsonl | parquet
    text_field: str = maths("text")  # jsonl, parquet and hf: the field of each record holding its text
    name: str = maths("", local=True)  # hf: a Hub id, a save_to_disk directory, or json|parquet|text|csv
    config: str = maths("")  # hf: the dataset's configuration (subset) name; "" = its default
    split: str = maths("train")  # hf: the split to read, e.g. train or train[:10%]
    streaming: bool = plain(False)  # hf: iterate the dataset instead of materialising it in the HF cache
    max_chars: int = maths(4_000_000)  # cap on corpus characters read (0 = no cap); keeps CPU runs fast
    val_fraction: float = maths(0.05)  # share of tokens held out for validation (the stream tail), in (0, 1)
    cache_dir: str = plain("~/.cache/greenrun", local=True)  # tokens + tokenizer, keyed by text and settings
    cache_url: str = plain("", local=True)  # s3://bucket/prefix sharing built caches ("" = this machine only)
    cache_endpoint_url: str | None = plain(None, local=True)  # S3-compatible endpoint (MinIO, R2); None = AWS
    shard_tokens: int = maths(16_777_216)  # tokens per memory-mapped segment; batch windows never cross one
    group_bytes: int = plain(33_554_432)  # text bytes per token shard file, the unit tokenised and rebuilt
    workers: int = plain(0)  # tokeniser processes; 0 = one per core (on 3+ cores), 1 = in this process
    encoding: str = maths("utf-8")  # text encoding of the data.paths files, e.g. latin-1 or cp1252
    encoding_errors: str = maths("strict")  # a file that does not decode: strict (refuse) | replace | skip
    tokenizer: str = maths("bpe")  # bpe (trained here, model.vocab_size ids) | gpt2 | bytes | path
    tokenizer_path: str = maths("", local=True)  # gpt2: a dir or Hub id ("" = gpt2); path: a tokenizer.json
    eot_token: str = maths("<|endoftext|>")  # appended after every document; must be in the vocabulary
    dedup: str = maths("none")  # none | exact (identical text) | near (also MinHash/LSH near-duplicates)
    dedup_threshold: float = maths(0.8)  # near: Jaccard similarity of shingle sets that drops a later doc
    dedup_num_perm: int = maths(128)  # near: MinHash permutations; error ~ 1/sqrt(n), 4 bytes/doc each
    dedup_shingle: int = maths(5)  # near: words per shingle, the unit of the sets Jaccard compares


@dataclass(frozen=True)
class Doc:
    rel: str  # name in the cache key; relative, so moving a corpus directory keeps its cache
    path: Path
    entry: int  # index into data.paths for error messages; -1 for the stdlib


class Source:
    """One data.source: the corpus records, in the order they are read."""

    sample_prompt = "\n"  # what the end-of-run sample starts from, unless trainer.sample_prompt says

    def problems(self, cfg: DataConfig) -> list[str]:
        """What this source alone requires of cfg, seen without reading the corpus."""
        return []

    def documents(self, cfg: DataConfig) -> list[Doc]:
        """The corpus files, in order (a source of files: stdlib, text)."""
        raise NotImplementedError

    def records(self, cfg: DataConfig) -> Iterator[tuple[str, str]]:
        """(name, text) of every record, in order; empty texts may come too (they are left out later).
        A build reads the corpus several times (hash, dedup, tokenizer, shards): the files are listed once."""
        if getattr(self, "_listed", None) is None:
            self._listed = self.documents(cfg)
        for doc in self._listed:
            yield from read_records(doc, cfg)

    def identity(self, cfg: DataConfig) -> str | None:
        """What names the corpus without reading it, for a source too large to read just to hash it
        (a streamed dataset); None: the cache key hashes the text itself."""
        return None

    def empty(self, cfg: DataConfig) -> str:
        """The message when not one record holds text."""
        return f"data.source={cfg.source}: no document holds any text"


SOURCES: Registry[type[Source]] = Registry("data.source")
# Keys naming where the corpus and the tokenizer are: a resume whose token cache is here needs neither.
CORPUS_KEYS = ("data.paths", "data.name", "data.tokenizer_path")


def validate(cfg: DataConfig) -> list[str]:
    """Every problem with cfg's corpus settings that can be seen without reading the corpus."""
    problems = SOURCES.problems(cfg.source)
    if not problems:
        problems += SOURCES.get(cfg.source)().problems(cfg)
    if cfg.max_chars < 0:
        problems.append(f"data.max_chars: must be >= 0 (0 = no cap), got {cfg.max_chars}")
    if not 0.0 < cfg.val_fraction < 1.0:
        problems.append(f"data.val_fraction: must be in (0, 1), e.g. 0.05, got {cfg.val_fraction}")
    if cfg.shard_tokens < 2:
        problems.append(f"data.shard_tokens: must be >= 2, got {cfg.shard_tokens}")
    if cfg.group_bytes < 1:
        problems.append(f"data.group_bytes: must be >= 1 (text bytes per shard file), got {cfg.group_bytes}")
    if cfg.workers < 0:
        problems.append(f"data.workers: must be >= 0 (0 = one per CPU core), got {cfg.workers}")
    problems += choice("data.encoding_errors", cfg.encoding_errors, ENCODING_ERRORS)
    problems += choice("data.format", cfg.format, FORMATS)
    if not cfg.text_field:
        problems.append("data.text_field: empty; name the field holding each record's text, e.g. text")
    if cfg.streaming and cfg.source != "hf":
        problems.append(f"data.streaming=true: only data.source=hf streams (data.source={cfg.source})")
    try:
        codecs.lookup(cfg.encoding)
    except LookupError:
        problems.append(f"data.encoding: unknown encoding {cfg.encoding!r}; e.g. utf-8, latin-1, cp1252")
    return problems


def sample_prompt(cfg: DataConfig) -> str:
    """The source's own prompt for the end-of-run sample."""
    return SOURCES.get(cfg.source).sample_prompt


def documents(cfg: DataConfig) -> list[Doc]:
    """The corpus files of cfg's source."""
    return SOURCES.get(cfg.source)().documents(cfg)


def records(cfg: DataConfig, source: Source | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of every non-empty record of cfg's source in order, the last one cut so that the total
    is at most data.max_chars characters. Pass the same `source` to read a corpus again without listing it."""
    budget = cfg.max_chars or math.inf
    for name, text in (source or SOURCES.get(cfg.source)()).records(cfg):
        text = text[: int(min(len(text), budget))]
        if text:
            budget -= len(text)
            yield name, text
        if budget <= 0:
            return


# --- data.source=stdlib ----------------------------------------------------------------------------

# Not hand-written Python: tests, vendored packages, the IDE, 2to3's grammar tables and the codecs.
_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "encodings"})
_HEAD_LINES = 10  # generator tools announce themselves at the top of the file
_GENERATED = re.compile(r"auto-?generated|automatically generated|do not edit|this file is generated", re.I)
# "# ... generated by/and used by ...": only in a comment, since docstrings say "can be generated by".
_GENERATED_COMMENT = re.compile(r"^\s*#.*\bgenerated (?:by|and used by)\b", re.I | re.M)
# A line of nothing but literals (strings, numbers, comments) and the punctuation between them.
_LITERAL = re.compile(
    r"""[rbuRBU]?(?:'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*")|0[xXoObB][0-9a-fA-F_]+"""
    r"""|\d[\d_]*(?:\.\d*)?(?:[eE][-+]?\d+)?|#.*$"""
)
_PUNCTUATION = re.compile(r"[\s{}\[\](),:=+-]*")
_TABLE_SAMPLE = 400  # code lines looked at: a table is uniform, so its start tells
_TABLE_MIN_LINES = 50
_TABLE_SHARE = 0.9  # hand-written mappings (e.g. _compat_pickle.py) stay below this
_LONGEST_LINE = 1000  # no person writes a line this long; a dumped blob of numbers does


def is_generated(text: str) -> bool:
    """True for text a program wrote: a generator's marker at the top, or a data table rather than code."""
    lines = text.splitlines()
    head = "\n".join(lines[:_HEAD_LINES])
    if _GENERATED.search(head) or _GENERATED_COMMENT.search(head):
        return True
    if lines and max(map(len, lines)) > _LONGEST_LINE:
        return True
    return _is_table(lines)


def _is_table(lines: list[str]) -> bool:
    code = literal = 0
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        code += 1
        if _PUNCTUATION.fullmatch(_LITERAL.sub("", stripped)):
            literal += 1
        elif code - literal > (1 - _TABLE_SHARE) * _TABLE_SAMPLE:
            return False  # already too much code for a table: stop reading
        if code == _TABLE_SAMPLE:
            break
    return code >= _TABLE_MIN_LINES and literal >= _TABLE_SHARE * code


@SOURCES.register("stdlib")
class Stdlib(Source):
    """The running interpreter's standard library source: real text, present everywhere, no download."""

    sample_prompt = "def "

    def documents(self, cfg: DataConfig) -> list[Doc]:
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
            for name in filenames:
                path = Path(dirpath, name)
                if name.endswith(".py") and _hand_written(path):
                    docs.append(Doc(path.relative_to(root).as_posix(), path, -1))
        # Ordered by a hash of the path, not the path: deterministic on any filesystem, and a capped corpus
        # and its validation tail are then a random sample of the library rather than its alphabetical start.
        return sorted(docs, key=lambda d: hashlib.sha256(d.rel.encode()).hexdigest())


def _hand_written(path: Path) -> bool:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False  # a few files use legacy encodings; leaving them out keeps the text clean
    return not is_generated(text)


# --- data.source=text ------------------------------------------------------------------------------


@SOURCES.register("text")
class Text(Source):
    """The user's own UTF-8 files: data.paths, each a file or a glob."""

    def problems(self, cfg: DataConfig) -> list[str]:
        if cfg.paths:
            return []
        return [
            "data.paths: empty but data.source=text — set 'data.paths=[corpus/**/*.txt]', "
            "or use data=stdlib for the bundled corpus"
        ]

    def documents(self, cfg: DataConfig) -> list[Doc]:
        errors, found = [], {}
        for i, entry in enumerate(cfg.paths):
            expanded = os.path.expanduser(entry)
            matches = []
            if any(c in expanded for c in "*?["):
                matches = [Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
                if not matches:
                    errors.append(f"data.paths[{i}]: {entry!r} matched no files — check the pattern")
            elif os.path.isdir(expanded):
                errors.append(
                    f"data.paths[{i}]: {entry!r} is a directory — use a glob like '{entry}/**/*.txt'"
                )
            elif not os.path.isfile(expanded):
                where = os.path.abspath(expanded)
                errors.append(
                    f"data.paths[{i}]: {entry!r} does not exist (looked for {where}) — check the path"
                )
            else:
                matches = [Path(expanded)]
            for path in matches:
                found.setdefault(path.resolve(), i)
        if errors:
            raise DataError("\n".join(errors + ["(or use data=stdlib for the bundled corpus)"]))
        ordered = sorted(found, key=str)
        base = Path(os.path.commonpath([p.parent for p in ordered]))
        return [Doc(p.relative_to(base).as_posix(), p, found[p]) for p in ordered]

    def empty(self, cfg: DataConfig) -> str:
        return (
            f"data.paths {list(cfg.paths)}: all {len(self.documents(cfg))} matched files are empty — point "
            "data.paths at files with text, or use data=stdlib for the bundled corpus"
        )


# --- reading ---------------------------------------------------------------------------------------


def _decode(doc: Doc, raw: bytes, encoding: str, errors: str) -> str | None:
    """The text of a data.paths file; None to leave it out (encoding_errors=skip). Binary files are refused."""
    if b"\0" in raw[:_SNIFF_BYTES]:
        raise DataError(
            f"data.paths[{doc.entry}]: {doc.path} looks binary (NUL bytes), not text; "
            "leave it out of data.paths (a narrower glob, e.g. '**/*.txt')"
        )
    try:
        return raw.decode(encoding, errors="strict")
    except UnicodeDecodeError as e:
        if errors == "replace":
            return raw.decode(encoding, errors="replace")
        if errors == "skip":
            if doc.path not in _SKIPPED:  # once per file, though a build reads the corpus several times
                _SKIPPED.add(doc.path)
                log.warning(f"data.paths[{doc.entry}]: left out {doc.path}: not {encoding} at byte {e.start}")
            return None
        raise DataError(
            f"data.paths[{doc.entry}]: {doc.path} is not {encoding} text (byte {e.start}: {e.reason}); set "
            "data.encoding (e.g. latin-1), or data.encoding_errors=replace or skip"
        ) from None


def file_format(doc: Doc, cfg: DataConfig) -> str:
    """text, jsonl or parquet: data.format, or by the file's extension for auto (the stdlib is text)."""
    if doc.entry < 0 or cfg.format != "auto":
        return "text" if doc.entry < 0 else cfg.format
    return _BY_SUFFIX.get(doc.path.suffix.lower(), "text")


def read_records(doc: Doc, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """A file's records: the whole text of a plain-text file, one per row of a jsonl or parquet file."""
    kind = file_format(doc, cfg)
    if kind != "text":
        try:
            for row, text in formats.READERS[kind](doc.path, cfg.text_field):
                yield f"{doc.rel}:{row}", text
        except formats.FormatError as e:
            raise DataError(f"data.paths[{doc.entry}]: {doc.path}: {e}") from None
        return
    try:
        raw = doc.path.read_bytes()
    except OSError as e:
        if doc.entry < 0:
            return  # a stdlib file that changed since it was listed: leave it out as the listing would
        raise DataError(f"data.paths[{doc.entry}]: cannot read {doc.path}: {e}") from e
    if doc.entry < 0:
        try:
            text: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None  # a few stdlib files use legacy encodings; leaving them out keeps the text clean
    else:
        text = _decode(doc, raw, cfg.encoding, cfg.encoding_errors)
    if text is not None:
        yield doc.rel, text
