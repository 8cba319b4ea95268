"""The GPT-2 model: shapes, tying, init, the fused chunked loss, counts and sampling."""

import math

import pytest
import torch
import torch.nn.functional as F

from greenrun.core.shipped import load_option, option_names
from greenrun.train.model import (
    GPT,
    ModelConfig,
    count_params,
    flops_per_token,
    generate,
    num_params,
    padded_vocab,
    preset,
)


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**overrides))


def batch(cfg: ModelConfig, B: int = 2, T: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    T = T or cfg.seq_len
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    return idx, targets


def test_config_defaults_are_tiny_preset():
    cfg = ModelConfig()
    assert (cfg.name, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.seq_len) == ("tiny", 4, 4, 128, 128)
    assert (cfg.vocab_size, cfg.dropout, cfg.bias, cfg.loss_chunk) == (4096, 0.0, True, 0)
    assert preset("tiny") == cfg


@pytest.mark.parametrize("name", option_names("model"))
def test_preset_is_its_yaml_file(name):
    cfg = preset(name)
    assert cfg.name == name
    for key, value in load_option("model", name).items():
        assert getattr(cfg, key) == value, key


def test_preset_overrides_and_unknown_names():
    cfg = preset("gpt2", loss_chunk=4096, seq_len=512)
    assert (cfg.n_layer, cfg.n_embd, cfg.loss_chunk, cfg.seq_len) == (12, 768, 4096, 512)
    with pytest.raises(KeyError, match="gpt2-medium"):  # the message lists the valid presets
        preset("gpt3")


def test_padded_vocab():
    assert padded_vocab(ModelConfig(vocab_size=50257)) == 50304
    assert padded_vocab(ModelConfig(vocab_size=4096)) == 4096
    assert ModelConfig(vocab_size=1).padded_vocab == 64


def test_forward_shapes():
    model = make_model()
    cfg = model.cfg
    idx, targets = batch(cfg, B=2, T=16)
    logits, loss = model(idx)
    assert logits.shape == (2, 1, cfg.vocab_size) and loss is None
    logits, loss = model(idx, targets)
    assert logits is None and loss.shape == ()  # a training forward hands back no logits
    # An untrained model should be close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5
    model.cfg.loss_chunk = 8
    logits, loss_chunked = model(idx, targets)
    assert logits is None and loss_chunked.shape == ()
    with pytest.raises(ValueError, match="longer than seq_len"):
        model(torch.zeros(1, cfg.seq_len + 1, dtype=torch.long))


def test_state_dict_names_follow_gpt2():
    keys = set(make_model(n_layer=1).state_dict())
    expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    for sub in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
        expected |= {f"h.0.{sub}.weight", f"h.0.{sub}.bias"}
    assert keys == expected


def test_lm_head_is_tied_to_token_embedding():
    model = make_model(vocab_size=1000)
    assert model.lm_head_weight is model.wte.weight
    assert model.wte.weight.shape == (1024, model.cfg.n_embd)
    idx, targets = batch(model.cfg, T=8)
    _, loss = model(idx, targets)
    loss.backward()
    # Rows never looked up still get gradient through the head; padding rows never do.
    unused = torch.ones(1000, dtype=torch.bool)
    unused[idx.flatten()] = False
    assert model.wte.weight.grad[:1000][unused].abs().sum() > 0
    assert torch.all(model.wte.weight.grad[1000:] == 0)


def test_gpt2_init():
    model = make_model(n_layer=6, n_embd=256)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(2 * 6), rel=0.05), name
        elif name.endswith("c_attn.weight") or name.endswith("c_fc.weight"):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.ln_f.weight == 1)


def test_padding_mask_equals_slicing_the_logits():
    # vocab 1000 pads to 1024 rows: the masked loss over 1024 columns must be the loss over the real 1000,
    # and the padding rows of the tied embedding must get exactly zero gradient from the head.
    net = make_model(vocab_size=1000, n_layer=1)
    idx, targets = batch(net.cfg, T=20)
    targets[0, :5] = -1
    _, loss = net(idx, targets)
    loss.backward()
    masked_grad = net.wte.weight.grad.clone()
    net.zero_grad()
    x = net.ln_f(net.h[0](net.wte(idx) + net.wpe(torch.arange(20))))
    sliced = F.linear(x, net.wte.weight)[..., :1000]
    reference = F.cross_entropy(sliced.reshape(-1, 1000), targets.reshape(-1), ignore_index=-1)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(masked_grad, net.wte.weight.grad, rtol=1e-5, atol=1e-7)
    pad_rows = masked_grad[1000:]
    assert torch.equal(pad_rows, torch.zeros_like(pad_rows))  # no token in idx is a padding id either


@pytest.mark.parametrize("chunk", [0, 64])
def test_pad_logits_learn_is_the_softmax_over_every_row_in_training_only(chunk):
    # learn: the training loss is nanoGPT's, over all 1024 padded columns, so padding rows get gradient;
    # eval still masks, so validation losses of both settings are the loss over the real 1000 classes.
    masked = make_model(vocab_size=1000, n_layer=1, loss_chunk=chunk)
    learn = make_model(vocab_size=1000, n_layer=1, loss_chunk=chunk, pad_logits="learn")
    idx, targets = batch(masked.cfg, T=20)
    _, loss = learn(idx, targets)
    loss.backward()
    x = learn.ln_f(learn.h[0](learn.wte(idx) + learn.wpe(torch.arange(20))))
    full = F.cross_entropy(F.linear(x, learn.wte.weight).reshape(-1, 1024), targets.reshape(-1))
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    assert loss > masked(idx, targets)[1]  # the padding columns hold some probability mass
    assert learn.wte.weight.grad[1000:].abs().sum() > 0
    learn.eval()
    masked.eval()
    with torch.no_grad():
        torch.testing.assert_close(learn(idx, targets)[1], masked(idx, targets)[1])


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_loss_matches_plain_loss_and_grads(chunk):
    # vocab 1000 pads to 1024 rows, so the padding mask is exercised; some targets are ignored.
    plain = make_model(vocab_size=1000, n_layer=2)
    fused = make_model(vocab_size=1000, n_layer=2, loss_chunk=chunk)
    idx, targets = batch(plain.cfg, T=50)
    targets[0, :10] = -1
    targets[1, -3:] = -1
    _, loss_plain = plain(idx, targets)
    logits, loss_fused = fused(idx, targets)
    assert logits is None
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-5, atol=1e-6)
    loss_plain.backward()
    loss_fused.backward()
    grads = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.all(grads["wte.weight"].grad[1000:] == 0)


def test_chunked_loss_scales_by_upstream_gradient():
    model = make_model(n_layer=1, loss_chunk=32)
    idx, targets = batch(model.cfg, T=20)
    _, loss = model(idx, targets)
    (3.0 * loss).backward()
    g3 = model.h[0].mlp.c_fc.weight.grad.clone()
    model.zero_grad()
    _, loss = model(idx, targets)
    loss.backward()
    torch.testing.assert_close(g3, 3.0 * model.h[0].mlp.c_fc.weight.grad)


def test_chunked_loss_under_bf16_autocast_is_close_to_plain():
    plain = make_model(n_layer=2)
    fused = make_model(n_layer=2, loss_chunk=100)
    idx, targets = batch(plain.cfg, T=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss_plain = plain(idx, targets)
        _, loss_fused = fused(idx, targets)
    assert loss_fused.dtype == torch.float32
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-2, atol=1e-2)
    loss_plain.backward()
    loss_fused.backward()
    assert fused.wte.weight.grad.dtype == torch.float32
    torch.testing.assert_close(fused.wte.weight.grad, plain.wte.weight.grad, rtol=0.05, atol=2e-4)


def test_num_params_and_count_params_agree():
    for name in option_names("model"):
        cfg = preset(name)
        with torch.device("meta"):
            model = GPT(cfg)
        for non_embedding in (True, False):
            assert num_params(model, non_embedding) == count_params(cfg, non_embedding), name
    cfg = ModelConfig(bias=False, n_layer=2)
    assert num_params(GPT(cfg), False) == count_params(cfg, False)


def test_gpt2_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(preset("gpt2"))
    assert model.wte.weight.shape == (50304, 768)
    assert 123e6 < num_params(model, non_embedding=False) < 126e6


def test_flops_per_token_gpt2():
    assert flops_per_token(preset("gpt2")) == pytest.approx(855e6, rel=0.02)
    # Larger presets must cost more per token.
    flops = [flops_per_token(preset(n)) for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")]
    assert flops == sorted(flops)


def test_generate_length_cropping_and_determinism():
    model = make_model(seq_len=16)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 20))  # longer than seq_len: must be cropped
    out = generate(model, prompt, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 25) and torch.equal(out[:, :20], prompt)
    assert model.training  # generate restores the mode it found
    again = generate(model, prompt, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    greedy = generate(model, prompt, 3, temperature=0)
    top1 = generate(model, prompt, 3, top_k=1)
    assert torch.equal(greedy, top1)
    assert int(out.max()) < model.cfg.vocab_size
