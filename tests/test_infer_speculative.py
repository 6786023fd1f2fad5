"""Speculative decoding in the engine keeps the target's output: identical greedy tokens whatever the
proposer (draft model or prompt lookup, batches of several requests), and the target's sampling
distribution under rejection sampling (chi-square tests over a small vocabulary)."""
import copy

import pytest
import torch

from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams, probs
from quark.infer.speculative import lookup, verify_token
from quark.model import GPT, GPTConfig
from tests.serve_helpers import make_model, make_tokenizer, perturbed, single_thread  # noqa: F401 (autouse fixture)

V = 400
PROMPTS = [[12, 40, 7, 99, 250], [5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [100, 101, 102], [30] * 4, list(range(9, 1, -1)),
           [77, 78, 79, 80, 81, 77, 78], [300, 12]]
LENGTHS = [40, 25, 33, 10, 18, 1, 29]


@pytest.fixture(scope="module")
def target():
    return make_model(V, seed=0)


def outputs(model, prompts=PROMPTS, lengths=LENGTHS, max_batch=3, **spec):
    eng = Engine(model, None, max_batch=max_batch, **spec)
    reqs = eng.run(prompts, [SamplingParams(max_tokens=n, temperature=0) for n in lengths])
    assert all(r.finish_reason == "length" for r in reqs)
    return [r.output_ids for r in reqs], eng


@pytest.mark.parametrize("proposer", ["same", "unrelated", "shallow", "prompt-lookup"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_batch_equals_target_alone(target, proposer, k):
    """Seven requests through three slots, speculating while at most two run (so slots switch between
    speculative rounds and plain decode steps): every output equals the target's own greedy output."""
    want, plain = outputs(target)
    spec = {"prompt_lookup": True} if proposer == "prompt-lookup" else {"draft": {
        "same": lambda: copy.deepcopy(target), "unrelated": lambda: make_model(V, seed=5),
        "shallow": lambda: make_model(V, seed=0, n_layer=1)}[proposer]()}
    got, eng = outputs(target, spec_k=k, spec_max_batch=2, **spec)
    assert got == want
    assert eng.spec_proposed > 0 and eng.steps < plain.steps
    if proposer == "same":   # a perfect draft: every proposal kept
        assert eng.spec_accepted == eng.spec_proposed
    if proposer == "unrelated":
        assert eng.spec_accepted < eng.spec_proposed   # the rejection path ran


def test_prefix_cache_keeps_only_verified_positions(target):
    """A finished request's cached positions go to the prefix cache (never those of rejected proposals): a
    next turn that resends the reply reuses them and decodes as the model alone does."""
    eng = Engine(target, None, max_batch=3, draft=make_model(V, seed=5), spec_k=4)
    B = eng.prefix_cache.block_size   # replies end on a block boundary, so their last position is cached
    lengths = [B * (2 + len(p) // B) - len(p) for p in PROMPTS]
    first = [r.output_ids for r in eng.run(PROMPTS, [SamplingParams(max_tokens=n, temperature=0) for n in lengths])]
    assert eng.spec_accepted < eng.spec_proposed
    turns = [p + out + [21, 22] for p, out in zip(PROMPTS, first)]
    want, _ = outputs(target, turns, LENGTHS, max_batch=3, prefix_cache_mb=0)
    reqs = eng.run(turns, [SamplingParams(max_tokens=n, temperature=0) for n in LENGTHS])
    assert eng.prefix_cache.hit_tokens > 0
    assert [r.output_ids for r in reqs] == want


def test_speculating_every_slot_at_once(target):
    """All slots verified in one target pass (spec_max_batch = max_batch), one pass per round."""
    want, _ = outputs(target, max_batch=4)
    got, eng = outputs(target, max_batch=4, draft=make_model(V, seed=0, n_layer=1), spec_max_batch=4)
    assert got == want and eng.spec_accepted > 0


def markov(seed, n_layer=0):
    """A model over 8 tokens; without layers its next-token distribution depends on the last token
    alone, so a sampled output is a Markov chain whose transition probabilities are known exactly."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=8, n_layer=n_layer, n_head=2, n_kv_head=1, d_model=32, max_seq_len=1024,
                         init_std=0.3, tie_embeddings=False)).eval()


def draft_of(target):
    """A one-layer draft that shares the target's embeddings and head: close to it, but not the same."""
    draft = markov(2, n_layer=1)
    draft.load_state_dict(target.state_dict(), strict=False)
    return draft


def chi_square_pvalue(counts, expected):
    """Pearson's test of transition counts (8, 8) against expected counts, per row cells with expected
    < 5 pooled into one; df = sum over rows of (cells - 1) (Anderson & Goodman 1957, Markov chains)."""
    stat, df = 0.0, 0
    for obs, exp in zip(counts, expected):
        small = exp < 5
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
        exp = torch.cat([exp[~small], exp[small].sum()[None]])
        keep = exp > 0
        stat += float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
        df += max(int(keep.sum()) - 1, 0)
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64))), stat


@pytest.mark.parametrize("proposer,params", [
    ("draft", dict(temperature=1.0)),
    ("draft", dict(temperature=0.8, top_k=4)),
    ("prompt-lookup", dict(temperature=1.0)),
    ("prompt-lookup", dict(temperature=1.2, top_p=0.8, repetition_penalty=1.3)),
])
def test_sampling_follows_the_target_distribution(proposer, params):
    """Four sampled requests of 600 tokens, verified together in speculative rounds, against the
    target's exact transition probabilities (the sampler's processed distribution): a chi-square test,
    and no transition of probability 0. A wrong rejection step (keeping every proposal, or redrawing
    from p instead of the residual) fails it. The prompt holds every token, so a repetition penalty
    treats every step alike."""
    target = markov(1)
    prompt = list(range(8))
    sp = SamplingParams(**params)
    with torch.no_grad():
        logits = target(torch.arange(8)[None])[0][0]                                    # (8, 8): row a scores a's successor
    want = torch.stack([probs(row, sp, torch.arange(8) if sp.penalized else None) for row in logits])
    spec = {"prompt_lookup": True} if proposer == "prompt-lookup" else {"draft": draft_of(target)}
    eng = Engine(target, None, max_batch=4, spec_k=3, prefix_cache_mb=0, **spec)   # no layers: no KV to cache
    reqs = eng.run([prompt] * 4, [SamplingParams(max_tokens=600, seed=s, **params) for s in range(4)])
    counts = torch.zeros(8, 8)
    for r in reqs:
        seq = prompt[-1:] + r.output_ids
        for a, b in zip(seq, seq[1:]):
            counts[a, b] += 1
    assert counts[want == 0].sum() == 0
    p, stat = chi_square_pvalue(counts, want * counts.sum(1, keepdim=True))
    assert p > 1e-3, f"chi-square {stat:.1f}: the output does not follow the target's distribution"
    assert 0.1 < eng.spec_accepted / eng.spec_proposed < 0.9   # kept and rejected proposals both common


def test_verify_token_keeps_the_target_distribution():
    """Rejection sampling: t ~ q (or a point mass), verified against p; the token returned is distributed as p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    q = torch.tensor([0.05, 0.1, 0.25, 0.3, 0.3])
    n = 20000
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    out = [verify_token(t, p, q, False, g) for t in drafts]
    freq = torch.bincount(torch.tensor([tok for _, tok in out]), minlength=5) / n
    assert (freq - p).abs().max() < 0.015
    assert abs(sum(k for k, _ in out) / n - torch.minimum(p, q).sum()) < 0.015   # acceptance = sum min(p, q)
    n = 5000
    for t in (0, 2, 4):   # a point mass on t: kept with probability p[t], else a draw from p without t
        out = [verify_token(t, p, None, False, g) for _ in range(n)]
        freq = torch.bincount(torch.tensor([tok for _, tok in out]), minlength=5) / n
        assert (freq - p).abs().max() < 0.025
        assert abs(sum(k for k, _ in out) / n - p[t]) < 0.025
    assert verify_token(2, p, q, True, g) == (False, 0) and verify_token(0, p, None, True, g) == (True, 0)


def test_lookup_proposes_the_latest_longest_match():
    seq = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 0, 2, 3]
    assert lookup(seq, 2) == [7, 8]            # "2 3" last seen before 7 8 (the latest match, not the first)
    assert lookup(seq, 7) == [7, 8, 0, 2, 3, 7, 8]   # past the end the copy repeats the pattern
    assert lookup([5, 9, 9, 9], 4) == [9, 9, 9, 9]    # a run, matched one token back, continues
    assert lookup([5, 2, 3, 4, 6, 1, 2, 3, 7, 5, 2, 3], 2) == [4, 6]   # the 3-gram "5 2 3" before the later "2 3"
    assert lookup([4, 5, 6, 4, 5, 9, 5], 3) == [9, 5, 9]   # no earlier "9 5": the 1-gram "5", seen last before 9
    assert lookup([4, 5, 6, 4, 5, 9, 5, 6], 2) == [4, 5]   # the 2-gram "5 6" before the 1-gram "6"
    assert lookup([1, 2, 3], 4) == [] and lookup([7], 4) == []


def test_stops_logprobs_constraints_and_cancellation():
    """Stop strings and tokens, max_tokens, penalties, the target's logprobs and a constrained request in
    one batch all come out as without speculation; a request cancelled mid-stream ends alone."""
    tok = make_tokenizer()
    base = make_model(tok.get_vocab_size(), seed=2)   # its greedy text repeats itself: prompt lookup has hits
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. The quick").ids
    plain = Engine(base, tok, max_batch=4).run([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    stop_id = plain.output_ids[36]
    stop_text = tok.decode(plain.output_ids[20:22])
    no_odd = lambda out, logits: logits.masked_fill(torch.arange(len(logits)) % 2 == 1, float("-inf"))  # noqa: E731
    cases = [(SamplingParams(max_tokens=40, temperature=0, stop=[stop_text]), None),
             (SamplingParams(max_tokens=40, temperature=0, logprobs=3), None),
             (SamplingParams(max_tokens=7, temperature=0), None),
             (SamplingParams(max_tokens=20, temperature=0), no_odd),
             (SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.5, presence_penalty=0.5), None)]

    def run(**spec):
        eng = Engine(base, tok, max_batch=4, stop_ids=[stop_id], **spec).start()
        reqs = [eng.submit(prompt, sp, processor=proc) for sp, proc in cases]
        for r in reqs:
            assert r.done.wait(60)
        eng.shutdown()
        return reqs, eng

    want, _ = run()
    assert [r.finish_reason for r in want[:3]] == ["stop", "stop", "length"]
    assert stop_text not in want[0].text and want[1].stop_token == stop_id
    for spec in ({"prompt_lookup": True}, {"draft": perturbed(base)}):
        got, eng = run(**spec)
        assert 0 < eng.spec_accepted < eng.spec_proposed
        for w, g in zip(want, got):
            assert (g.output_ids, g.text, g.finish_reason, g.stop_token) == (w.output_ids, w.text, w.finish_reason, w.stop_token)
        for (lp, top), (wlp, wtop) in zip(got[1].logprobs, want[1].logprobs):
            assert abs(lp - wlp) < 1e-4 and [i for i, _ in top] == [i for i, _ in wtop]
        assert all(t % 2 == 0 for t in got[3].output_ids)

        eng = Engine(base, tok, max_batch=2, **spec).start()
        deltas = []

        def cancel_after_three(kind, value):
            deltas.append(value)
            if len(deltas) == 3:
                long.cancel()
        long = eng.submit(prompt, SamplingParams(max_tokens=200, temperature=0), on_event=cancel_after_three)
        other = eng.submit(prompt, SamplingParams(max_tokens=40, temperature=0))
        assert long.done.wait(30) and other.done.wait(30)
        eng.shutdown()
        assert long.finish_reason == "cancelled" and len(long.output_ids) < 20
        assert other.output_ids == plain.output_ids


def test_bad_speculation_settings_are_named(target):
    with pytest.raises(ValueError, match="vocab_size"):
        Engine(target, draft=make_model(V + 1))
    with pytest.raises(ValueError, match="context"):
        Engine(target, draft=make_model(V, max_seq_len=128))
    assert Engine(target, draft=make_model(V, max_seq_len=128), max_seq_len=128).max_seq_len == 128
    with pytest.raises(ValueError, match="exclude"):
        Engine(target, draft=target, prompt_lookup=True)
    with pytest.raises(ValueError, match="spec_k"):
        Engine(target, prompt_lookup=True, spec_k=0)


def test_context_end(target):
    """Requests that fill the context exactly: proposals stay inside the caches."""
    prompts = [list(range(8, 8 + 200)), list(range(50, 60)) * 20 + [50]]
    lengths = [56, 55]
    want, _ = outputs(target, prompts, lengths, max_batch=2)
    for spec in ({"prompt_lookup": True}, {"draft": copy.deepcopy(target)}):
        assert outputs(target, prompts, lengths, max_batch=2, spec_k=6, **spec)[0] == want
