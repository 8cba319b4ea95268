"""greenrun.train.curriculum: pacing by hand, the seqlen ladder, window scores on a handmade corpus, cached
scores, batches as a pure function, and exact resume and smoke through the real CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from greenrun import config, data
from greenrun.config import Config
from greenrun.core.output import Reporter
from greenrun.core.shipped import load_option, option_names
from greenrun.data import DataConfig, DataError
from greenrun.data.dataset import Dataset, length_scores, rarity_scores
from greenrun.runtime import distributed
from greenrun.train import curriculum
from greenrun.train.curriculum import CurriculumConfig, Difficulty, SeqLen
from greenrun.train.model import ModelConfig
from tests.common import run_cli, straight_and_sliced
from tests.test_resume import STEPS, assert_same_run


def _cfg(**kw) -> CurriculumConfig:
    return CurriculumConfig(**({"ramp_steps": 100} | kw))


# --- a handmade corpus: token ids chosen so every score can be worked out by hand ---------------------------

EOT = 0
# Train: two shards; documents end at EOT (global positions 2, 7, 12), the one at 8..12 spans both shards and
# the last, a lone token 2, has no EOT. With seq_len=3 the tiling is 3 windows of shard 0 and 1 of shard 1.
TRAIN = [[1, 2, 0, 3, 3, 3, 3, 0, 4, 1], [1, 1, 0, 2]]
WINDOWS = [[1, 2, 0, 3], [3, 3, 3, 3], [3, 0, 4, 1], [1, 1, 0, 2]]


def _handmade(root: Path) -> Dataset:
    root.mkdir(parents=True)
    vocab = {data.EOT: EOT, "a": 1, "b": 2, "c": 3, "d": 4}
    Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(root / "tokenizer.json"))
    shards: dict[str, list[int]] = {"train": [], "val": []}
    for split, parts in (("train", TRAIN), ("val", [[1, 2, 3, 0, 4, 3, 2, 1]])):
        for i, part in enumerate(parts):
            np.array(part, dtype="<u2").tofile(root / f"{split}-{i:05d}.bin")
            shards[split].append(len(part))
    meta = {"key": "ab" * 32, "vocab_size": 5, "eot_id": EOT, "dtype": "uint16", "shards": shards}
    meta |= {"train_tokens": 14, "val_tokens": 8, "config": {}}
    (root / "meta.json").write_text(json.dumps(meta))
    return Dataset(root)


@pytest.fixture
def hand(tmp_path: Path) -> Dataset:
    return _handmade(tmp_path / "hand")


# A real corpus of generated text for batches and the trainer.
@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("corpus")
    for f in range(3):
        body = "".join(f"def f{f}_{i}(x):\n    return x * {i} + {f}\n" for i in range(150 + 100 * f))
        (root / f"doc{f}.txt").write_text(body)
    cfg = DataConfig(source="text", paths=[str(root / "*.txt")], max_chars=0, cache_dir=str(root / "cache"))
    return data.build(cfg, 300)


# --- pacing, hand-computed ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pacing", "expect"),
    [
        # 64 + 960 p, rounded down to a rung of 64, 128, 256, 512, 1024
        ("linear", {0: 64, 6: 64, 7: 128, 20: 256, 50: 512, 99: 512, 100: 1024, 500: 1024}),
        # 64 * 16 ** p: one doubling every 25 steps
        ("exponential", {0: 64, 24: 64, 25: 128, 50: 256, 74: 256, 75: 512, 99: 512, 100: 1024}),
        # stages=4: 64, 384, 704, 1024 held for a third of the ramp each (rounded down to rungs)
        ("step", {0: 64, 33: 64, 34: 256, 66: 256, 67: 512, 99: 512, 100: 1024}),
    ],
)
def test_seqlen_length_at_chosen_steps(ds: Dataset, pacing: str, expect: dict[int, int]) -> None:
    sl = SeqLen(_cfg(name="seqlen", pacing=pacing, start_len=64, bucket=64), ds, 1024, 16, 0)
    assert sl.lengths == [64, 128, 256, 512, 1024]
    assert {s: sl.length_at(s) for s in expect} == expect
    assert {s: sl.ramping(s) for s in expect} == {s: n < 1024 for s, n in expect.items()}


@pytest.mark.parametrize(
    ("pacing", "stages", "expect"),
    [
        ("linear", 4, {0: 1, 33: 1, 34: 2, 66: 2, 67: 3, 99: 3, 100: 4, 300: 4}),  # floor(1 + 3 p)
        ("exponential", 4, {0: 1, 49: 1, 50: 2, 79: 2, 80: 3, 99: 3, 100: 4}),  # floor(4 ** p)
        ("step", 2, {0: 1, 50: 1, 99: 1, 100: 4}),  # two levels: the easiest bin, then all
        ("step", 3, {0: 1, 49: 1, 50: 2, 99: 2, 100: 4}),  # 1, 2.5, 4 rounded down
    ],
)
def test_difficulty_bins_at_chosen_steps(hand: Dataset, pacing: str, stages: int, expect: dict) -> None:
    cfg = _cfg(name="difficulty", pacing=pacing, stages=stages, n_bins=4)
    d = Difficulty(cfg, hand, 3, 2, 0)
    assert {s: d.bins_at(s) for s in expect} == expect
    assert {s: d.ramping(s) for s in expect} == {s: n < 4 for s, n in expect.items()}


def test_the_pacings_are_the_documented_formulas() -> None:
    assert curriculum.PACINGS.names() == ["linear", "exponential", "step"]
    assert curriculum.linear(0.25, 2, 10, 4) == 4.0
    assert math.isclose(curriculum.exponential(0.5, 2, 32, 4), 8.0)
    assert curriculum.step(0.7, 0, 9, 4) == 6.0  # floor(0.7 * 3) = 2 of 3 levels up


# --- seqlen: constant tokens, few shapes, the ladder's rules --------------------------------------------------


def test_seqlen_tokens_per_micro_batch_are_constant_and_shapes_few(ds: Dataset) -> None:
    sl = SeqLen(_cfg(name="seqlen", start_len=8, bucket=8, ramp_steps=40), ds, 64, 3, 7)
    shapes = set()
    for step in range(0, 45):
        x, y = sl.batch(step, 0)
        assert x.numel() == y.numel() == 3 * 64, step
        assert x.shape[1] == sl.length_at(step) and torch.equal(x[:, 1:], y[:, :-1])
        shapes.add(tuple(x.shape))
    assert shapes == {(24, 8), (12, 16), (6, 32), (3, 64)}  # log2(64 / 8) + 1 compiles, no more


def test_seqlen_ladder_and_its_validation() -> None:
    assert curriculum.ladder(1024, 64, 64) == [64, 128, 256, 512, 1024]
    assert curriculum.ladder(768, 64, 64) == [192, 384, 768]  # 96 is no multiple of 64
    assert curriculum.ladder(32, 8, 64) == [32]  # a shrunk (smoke) seq_len: the rungs that fit
    ok = _cfg(name="seqlen", start_len=128, bucket=64)
    assert curriculum.validate(ok, 1024, 600) == []
    (problem,) = curriculum.validate(dataclasses.replace(ok, start_len=100), 1024, 600)
    assert "curriculum.start_len=100" in problem and "64, 128, 256, 512, 1024" in problem
    (problem,) = curriculum.validate(dataclasses.replace(ok, start_len=8), 32, 600)
    assert "curriculum.bucket" in problem
    (problem,) = curriculum.validate(dataclasses.replace(ok, start_len=2048), 1024, 600)
    assert "[1, model.seq_len=1024]" in problem


def test_validation_collects_every_problem_with_its_key() -> None:
    bad = CurriculumConfig(name="seqlen", pacing="expo", ramp_steps=900, stages=1, start_len=100)
    problems = curriculum.validate(bad, 1024, 600)
    assert len(problems) == 4
    assert problems[0].startswith("curriculum.pacing: unknown value 'expo'") and "exponential" in problems[0]
    assert "curriculum.ramp_steps" in problems[1] and "trainer.max_steps=600" in problems[1]
    assert "curriculum.stages" in problems[2] and "curriculum.start_len=100" in problems[3]
    (typo,) = curriculum.validate(CurriculumConfig(name="seqeln"), 1024, 600)
    assert "did you mean seqlen?" in typo
    model = curriculum.validate(CurriculumConfig(name="difficulty", score="model", n_bins=1), 1024, 600)
    assert any("curriculum.n_bins" in p for p in model) and any(
        "curriculum.reference=RUN_DIR" in p for p in model
    )
    assert "did you mean rarity?" in curriculum.validate(_cfg(name="difficulty", score="rarty"), 64, 600)[0]
    with pytest.raises(config.ConfigError, match="curriculum.start_len"):
        config.validate(dataclasses.replace(Config(), curriculum=bad), check_device=False)


def test_shipped_yaml_options_are_the_registered_ones() -> None:
    assert option_names("curriculum") == sorted(curriculum.CURRICULA.names())
    for name in option_names("curriculum"):
        values = load_option("curriculum", name)
        assert values["name"] == name
        assert curriculum.validate(CurriculumConfig(**values), 1024, 600) == []
    assert load_option("curriculum", "none") == {
        "name": CurriculumConfig().name
    }  # the default sets nothing else


# --- scores on the handmade corpus --------------------------------------------------------------------------


def test_window_tiling_of_the_handmade_corpus(hand: Dataset) -> None:
    assert hand.tiles(3).tolist() == [3, 4] and hand.tile_starts(3).tolist() == [0, 3, 6, 10]
    assert hand.tile_rows(np.arange(4), 3).tolist() == WINDOWS


def test_length_scores_by_hand(hand: Dataset) -> None:
    # Documents (EOT included): positions 0-2 (3 tokens), 3-7 (5), 8-12 (5, across the shard end), 13 (1).
    expect = [(3 + 3 + 3 + 5) / 4, 5.0, 5.0, (5 + 5 + 5 + 1) / 4]
    assert length_scores(hand, 3).tolist() == expect


def test_rarity_scores_by_hand(hand: Dataset) -> None:
    # Train counts over 14 tokens: id 0 x3, 1 x4, 2 x2, 3 x4, 4 x1; a token costs log(14 / count).
    cost = {
        0: math.log(14 / 3),
        1: math.log(14 / 4),
        2: math.log(14 / 2),
        3: math.log(14 / 4),
        4: math.log(14),
    }
    expect = [sum(cost[t] for t in w) / 4 for w in WINDOWS]
    assert np.allclose(rarity_scores(hand, 3), expect, rtol=1e-12)


def test_difficulty_draws_only_from_the_bins_introduced(hand: Dataset) -> None:
    # Length scores 3.5, 5, 5, 4: the easy half is windows 0 and 3.
    d = Difficulty(_cfg(name="difficulty", n_bins=2, pacing="step", stages=2), hand, 3, 8, 0)
    assert d.order.tolist() == [0, 3, 1, 2] and d.ends == [2, 4]
    easy = {tuple(WINDOWS[0][:3]), tuple(WINDOWS[3][:3])}
    seen_early = {tuple(row) for s in range(5) for row in d.batch(s, 0)[0].tolist()}
    assert seen_early == easy
    seen_late = {tuple(row) for s in range(100, 110) for row in d.batch(s, 0)[0].tolist()}
    assert seen_late == {tuple(w[:3]) for w in WINDOWS}


def test_too_few_windows_for_the_bins_names_the_knobs(hand: Dataset) -> None:
    with pytest.raises(DataError, match=r"4 windows of 4 tokens.*curriculum.n_bins=5"):
        Difficulty(_cfg(name="difficulty", n_bins=5), hand, 3, 2, 0)


def test_scores_are_cached_beside_the_shards(hand: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = curriculum.rarity_scores

    def counting(d: Dataset, seq_len: int) -> np.ndarray:
        calls.append(seq_len)
        return real(d, seq_len)

    monkeypatch.setattr(curriculum, "rarity_scores", counting)
    cfg = _cfg(name="difficulty", score="rarity", n_bins=2)
    first = Difficulty(cfg, hand, 3, 2, 0)
    npy = hand.cache_path / "scores-rarity-3.npy"
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["kind"] == "rarity" and meta["seq_len"] == 3 and meta["windows"] == 4
    mtime = npy.stat().st_mtime_ns
    again = Difficulty(cfg, Dataset(hand.cache_path), 3, 2, 0)  # a fresh process over the same cache
    assert calls == [3] and npy.stat().st_mtime_ns == mtime
    assert again.order.tolist() == first.order.tolist()
    Difficulty(cfg, hand, 2, 2, 0)  # another seq_len: another tiling, scored once more
    assert calls == [3, 2] and (hand.cache_path / "scores-rarity-2.npy").is_file()
    npy.with_suffix(".json").write_text(json.dumps(meta | {"windows": 5}))  # not this tiling: recompute
    Difficulty(cfg, hand, 3, 2, 0)
    assert calls == [3, 2, 3]


# --- batches: a pure function -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [_cfg(name="seqlen", start_len=8, bucket=8, ramp_steps=10), _cfg(name="difficulty", ramp_steps=10)],
    ids=["seqlen", "difficulty"],
)
def test_batches_are_a_pure_function(ds: Dataset, cfg: CurriculumConfig) -> None:
    a = curriculum.build(cfg, ds, 32, 4, 1337)
    b = curriculum.build(cfg, Dataset(ds.cache_path), 32, 4, 1337)  # a resumed process
    for step in (0, 3, 9, 12):
        x, y = a.batch(step, 1)
        assert torch.equal(x, b.batch(step, 1)[0]) and torch.equal(y, b.batch(step, 1)[1])
        for other in (a.batch(step + 1, 1), a.batch(step, 2), a.batch(step, 0)):
            assert other[0].shape != x.shape or not torch.equal(other[0], x)
    seeded = curriculum.build(cfg, ds, 32, 4, 1338)
    assert not torch.equal(seeded.batch(12, 0)[0], a.batch(12, 0)[0])


def test_the_trainer_asks_the_curriculum(ds: Dataset, tmp_path: Path) -> None:
    from greenrun.trainer import Trainer

    base = Config()
    cfg = dataclasses.replace(
        base,
        model=ModelConfig(n_layer=1, n_head=2, n_embd=32, seq_len=32, vocab_size=300),
        trainer=dataclasses.replace(base.trainer, device="cpu", micro_batch_size=2, sample_tokens=0),
        curriculum=_cfg(name="seqlen", start_len=8, bucket=8, ramp_steps=4),
    )
    one = distributed.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(cfg, tmp_path, dist=one, data_set=ds, reporter=Reporter(enabled=False))
    try:
        assert [trainer.curriculum_ramping(s) for s in (0, 3, 4)] == [True, True, False]
        assert trainer._batch("train", 0, 0)[0].shape == (8, 8)  # 2 x 32 tokens as 8 rows of 8
        assert trainer._batch("val", 0, 0)[0].shape == (2, 32)  # validation stays at the full length
        assert math.isfinite(trainer.train_step()["loss"])
    finally:
        trainer.close()


# --- score=model: a previous run's checkpoint ---------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, list[str]]:
    from tests.common import TINY

    tiny = [*TINY, f"data.cache_dir={cache_dir}"]
    run_dir = tmp_path_factory.mktemp("reference")
    r = run_cli("train", *tiny, "trainer.max_steps=3", "preflight=false", f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    return run_dir, tiny


def test_model_scores_are_the_references_loss_and_cached(reference, cache_dir, monkeypatch) -> None:
    from greenrun.ckpt import checkpoint
    from greenrun.train.model import GPT

    run_dir, _ = reference
    ds = data.build(DataConfig(cache_dir=str(cache_dir), max_chars=200_000), 512)
    cfg = _cfg(name="difficulty", score="model", reference=str(run_dir))
    d = Difficulty(cfg, ds, 32, 2, 0)
    (npy,) = ds.cache_path.glob("scores-model-32-*.npy")
    scores = np.load(npy)
    ckpt, ref = curriculum.reference(str(run_dir), ds, 32)
    net = GPT(ref)
    net.load_state_dict(checkpoint.load(ckpt)[0])
    net.eval()
    for w in (0, len(scores) // 2, len(scores) - 1):
        row = torch.from_numpy(ds.tile_rows(np.array([w]), 32))
        with torch.no_grad():
            _, loss = net(row[:, :-1], row[:, 1:])
        assert math.isclose(scores[w], loss.item(), rel_tol=1e-5), w
    assert len(set(scores.tolist())) > len(scores) // 2  # a real score, not a constant

    def no_scoring(*_):
        raise AssertionError("scored again although the cache holds this reference's scores")

    monkeypatch.setattr(curriculum, "model_losses", no_scoring)
    assert Difficulty(cfg, ds, 32, 2, 0).order.tolist() == d.order.tolist()


def test_model_score_refuses_a_reference_of_other_data(reference, hand: Dataset) -> None:
    run_dir, _ = reference
    with pytest.raises(DataError, match="trained on the token cache"):
        curriculum.reference(str(run_dir), hand, 3)
    with pytest.raises(DataError, match="not a saved greenrun config"):
        (hand.cache_path / "config.yaml").write_text("- a list\n")
        (hand.cache_path / "checkpoints").mkdir()
        curriculum.reference(str(hand.cache_path), hand, 3)


def test_model_scoring_stays_within_its_budget(reference, cache_dir) -> None:
    run_dir, _ = reference
    ds = data.build(DataConfig(cache_dir=str(cache_dir), max_chars=200_000), 512)
    ckpt, ref = curriculum.reference(str(run_dir), ds, 32)
    with pytest.raises(DataError, match=r"curriculum.score_budget_s=1e-06"):
        curriculum.model_losses(ckpt, ref, ds, 32, 1e-6)


# --- the real CLI: exact resume and smoke ------------------------------------------------------------------

CURRICULA = {
    # lengths 8 (steps 0-5), 16 (6-15), 32 (16-): a rung change before and after the resume at step 10
    "seqlen": [
        "curriculum=seqlen",
        "curriculum.start_len=8",
        "curriculum.bucket=8",
        "curriculum.ramp_steps=16",
    ],
    # bins 1 (steps 0-5), 2 (6-10), 3 (11-15), 4 (16-)
    "difficulty": ["curriculum=difficulty", "curriculum.score=rarity", "curriculum.ramp_steps=16"],
}


def test_stop_and_resume_is_bit_exact_with_the_difficulty_curriculum(tiny: list[str], tmp_path: Path) -> None:
    # seqlen's exact resume is in tests/test_resume.py, with every other lever on at once.
    args = [*tiny, *STEPS, *CURRICULA["difficulty"]]
    straight, sliced = straight_and_sliced(args, tmp_path)
    assert_same_run(straight, sliced)
    uniform = tmp_path / "uniform"  # and the curriculum did change what was trained
    r = run_cli("train", *tiny, *STEPS, "trainer.stop_at_step=10", f"run.dir={uniform}")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (uniform / "metrics.jsonl").read_text().splitlines()]
    mine = [json.loads(line) for line in (sliced / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in rows if r["step"] == 3] != [r.get("loss") for r in mine if r["step"] == 3]


@pytest.mark.parametrize("name", sorted(CURRICULA))
def test_smoke_passes_with_a_curriculum(name: str, tiny: list[str]) -> None:
    r = run_cli("smoke", *tiny, *CURRICULA[name])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout
