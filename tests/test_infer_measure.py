"""quark.infer.measure: the one held-out evaluator (per-window losses, ignored targets, KL to a
reference, perplexity and bits/byte on top), paired deltas, and decode speed through the engine."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quark.infer.measure import decode_tokens_per_s, held_out, paired_delta, window_batches
from quark.model import GPT, preset


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(preset("nano", vocab_size=256, max_seq_len=64)).eval()


def test_per_window_losses_match_the_models_own_loss_and_kl_to_itself_is_zero():
    model = tiny_model()
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 256, 1000))
    batches = window_batches(tokens, 64, max_tokens=300, batch_size=2)
    assert [x.shape for x, _ in batches] == [(2, 64), (2, 64), (1, 64)]       # 5 windows of 64 >= 300 targets
    r = held_out(model, batches, reference=model)
    assert r.losses.shape == (5,) and r.tokens.tolist() == [64] * 5 and float(r.kl.abs().max()) < 1e-6
    with torch.no_grad():
        for k in (0, 4):
            _, loss = model(tokens[64 * k: 64 * k + 64][None], tokens[64 * k + 1: 64 * k + 65][None])
            assert float(r.losses[k]) == pytest.approx(float(loss), rel=1e-5)
    assert r.mean() == pytest.approx(float(r.losses.mean()), rel=1e-12)
    assert r.perplexity() == pytest.approx(math.exp(r.mean()))
    assert r.bits_per_byte(1000) == pytest.approx(float(r.nll.sum()) / math.log(2) / 1000)
    assert held_out(tiny_model(1), batches, reference=model).mean_kl() > 1e-3   # another model: a real divergence


def test_ignored_targets_are_not_scored_and_the_mean_weights_tokens():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 20), generator=g)
    y = torch.randint(0, 256, (3, 20), generator=g)
    y[0, :15] = -100                                    # row 0 scores 5 targets, row 2 none
    y[2] = -100
    r = held_out(model, [(x, y)])
    assert r.tokens.tolist() == [5, 20, 0] and float(r.losses[2]) == 0.0
    with torch.no_grad():
        logits, _ = model(x)
        expected = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), ignore_index=-100)
    assert r.mean() == pytest.approx(float(expected), rel=1e-5)
    assert math.isnan(held_out(model, []).mean())
    assert model.training is False


def test_window_batches_refuse_tokens_of_another_tokenizer():
    with pytest.raises(ValueError, match="another tokenizer"):
        window_batches(torch.tensor([1, 2, 300, 4, 5]), 2, vocab_size=256)


def test_paired_delta():
    base = torch.tensor([2.0, 3.0, 2.5, 4.0], dtype=torch.float64)
    delta, two_se = paired_delta(base + 0.01, base)          # the same shift on every window: no noise
    assert delta == pytest.approx(100 * (np.exp(0.01) - 1)) and two_se == pytest.approx(0, abs=1e-9)
    d = torch.tensor([0.02, -0.01, 0.03, 0.0], dtype=torch.float64)
    delta, two_se = paired_delta(base + d, base)
    assert two_se == pytest.approx(100 * 2 * float(d.std()) / 2 * np.exp(float(d.mean())))


def test_decode_speed_runs_the_engine():
    model = tiny_model()
    assert decode_tokens_per_s(model, torch.arange(8), new_tokens=4, repeats=1) > 0
