"""Speculative decoding keeps the target's output: identical greedy tokens whatever the draft, and the
target's sampling distribution under rejection sampling."""
import copy

import pytest
import torch

from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams, probs
from quark.infer.speculative import SpeculativeDecoder, verify_token
from tests.serve_helpers import make_model, make_tokenizer, single_thread  # noqa: F401 (autouse fixture)

V = 400


@pytest.fixture(scope="module")
def target():
    return make_model(V, seed=0)


def target_alone(target, prompt, n):
    eng = Engine(target, None, max_batch=1)
    out = eng.generate(prompt, SamplingParams(max_tokens=n, temperature=0)).output_ids
    eng.shutdown()
    return out


@pytest.mark.parametrize("draft_kind", ["same", "unrelated", "shallow"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_output_equals_target_alone(target, draft_kind, k):
    draft = {"same": lambda: copy.deepcopy(target), "unrelated": lambda: make_model(V, seed=5),
             "shallow": lambda: make_model(V, seed=0, n_layer=1)}[draft_kind]()
    prompt = [12, 40, 7 + k, 99, 250]
    res = SpeculativeDecoder(target, draft, k=k).generate(prompt, SamplingParams(max_tokens=40, temperature=0))
    assert res.output_ids == target_alone(target, prompt, 40)
    assert res.finish_reason == "length" and len(res.output_ids) == 40
    if draft_kind == "same":   # a perfect draft: every proposal kept, one target pass per k+1 tokens
        assert res.acceptance_rate == 1.0 and res.target_passes <= 1 + -(-40 // (k + 1))
    if draft_kind == "unrelated":
        assert res.accepted < res.proposed   # the rejection path ran


def test_verify_token_keeps_the_target_distribution():
    """Rejection sampling: draw t ~ q, verify against p; the returned token is distributed as p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    q = torch.tensor([0.05, 0.1, 0.25, 0.3, 0.3])
    n = 20000
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    out = [verify_token(t, p, q, False, g) for t in drafts]
    freq = torch.bincount(torch.tensor([tok for _, tok in out]), minlength=5) / n
    assert (freq - p).abs().max() < 0.015
    kept = sum(k for k, _ in out) / n
    assert abs(kept - torch.minimum(p, q).sum()) < 0.015   # acceptance rate = sum min(p, q)
    assert verify_token(2, p, q, True, g) == (False, 0) and verify_token(0, p, q, True, g) == (True, 0)


def test_sampling_end_to_end_follows_the_target():
    """First token after a fixed prompt over many seeds, draft very different from the target."""
    t = make_model(24, seed=1, init_std=0.5)
    d = make_model(24, seed=2, init_std=0.5)
    params = dict(max_tokens=1, temperature=1.0, top_k=12)
    prompt = [9, 10, 11]
    with torch.no_grad():
        want = probs(t(torch.tensor([prompt]))[0][0, -1], SamplingParams(**params))
        draft_p = probs(d(torch.tensor([prompt]))[0][0, -1], SamplingParams(**params))
    assert (want - draft_p).abs().sum() > 0.5
    dec = SpeculativeDecoder(t, d, k=2)
    n = 400
    counts = torch.zeros(24)
    for seed in range(n):
        counts[dec.generate(prompt, SamplingParams(seed=seed, **params)).output_ids[0]] += 1
    assert (counts / n - want).abs().max() < 0.08


def test_sampling_with_penalties_and_stop_string(target):
    tok = make_tokenizer()
    res = SpeculativeDecoder(target, make_model(V, seed=0, n_layer=1), k=3).generate(
        [20, 21], SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=0), tok)
    assert 1 <= len(res.output_ids) <= 30 and res.text == tok.decode(res.output_ids)
    # the same seed reproduces the same output
    again = SpeculativeDecoder(target, make_model(V, seed=0, n_layer=1), k=3).generate(
        [20, 21], SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=0), tok)
    assert again.output_ids == res.output_ids


def test_context_end_and_errors(target):
    dec = SpeculativeDecoder(target, make_model(V, seed=3), k=4, max_seq_len=24)
    res = dec.generate(list(range(8, 18)), SamplingParams(max_tokens=14, temperature=0))
    assert len(res.output_ids) == 14
    assert res.output_ids == target_alone(target, list(range(8, 18)), 14)
    with pytest.raises(ValueError, match="context"):
        dec.generate(list(range(8, 18)), SamplingParams(max_tokens=15))
    with pytest.raises(ValueError, match="vocab_size"):
        SpeculativeDecoder(target, make_model(V + 1))
    with pytest.raises(ValueError, match="k"):
        SpeculativeDecoder(target, target, k=0)
