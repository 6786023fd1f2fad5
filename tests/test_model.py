"""The Llama-style GPT: shapes and loss, causality, parameter counts, presets and config errors,
and model directories (quark.model.io)."""
import json

import pytest
import torch

from quark.model import GPT, PRESETS, GPTConfig, preset
from quark.model.io import load_model, save_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(preset("nano", vocab_size=97, max_seq_len=48)).eval()


@torch.no_grad()
def test_forward_and_loss(model):
    x = torch.randint(0, 97, (3, 20))
    logits, loss = model(x)
    assert logits.shape == (3, 20, 97) and loss is None
    y = torch.randint(0, 97, (3, 20))
    _, loss = model(x, y)
    assert abs(float(loss) - float(torch.log(torch.tensor(97.0)))) < 0.5   # near uniform at init
    ignore = y.clone()
    ignore[:, :10] = -100
    ref = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, 97), y[:, 10:].reshape(-1))
    assert torch.allclose(model(x, ignore)[1], ref, atol=1e-6)
    assert model.hidden_states(x).shape == (3, 20, model.config.d_model)


def test_causal(model):
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    a, b = model(x)[0], model(y)[0]
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6) and not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_matches_modules(name):
    cfg = PRESETS[name]
    if cfg.num_params() > 50_000_000:
        pytest.skip("large preset: counted by formula only")
    m = GPT(cfg)
    assert sum(p.numel() for p in m.parameters()) == cfg.num_params()


def test_flops_per_token():
    cfg = preset("nano")
    n = cfg.num_params(non_embedding=True) + cfg.vocab_size * cfg.d_model   # matmul weights incl. the head
    assert cfg.flops_per_token(64) == 6 * n + 6 * cfg.n_layer * 64 * cfg.d_model


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(d_model=100, n_head=3)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="unknown model preset 'giant'"):
        preset("giant")
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        GPT(preset("nano", max_seq_len=8))(torch.zeros(1, 9, dtype=torch.long))


def test_model_dir_round_trip(tmp_path, model):
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    save_model(model, tmp_path / "run" / "pretrain" / "final", tokenizer_path=tok)
    back = load_model(tmp_path / "run" / "pretrain" / "final")
    x = torch.randint(0, 97, (1, 12))
    assert torch.equal(back(x)[0], model(x)[0])
    cfg_path = tmp_path / "run" / "pretrain" / "final" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "n_layers": 3}))
    with pytest.raises(ValueError, match="n_layers"):
        load_model(tmp_path / "run" / "pretrain" / "final")
