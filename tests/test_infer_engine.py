"""Engine: the slot runner against the model's own forward, continuous batching against one-at-a-time
greedy generation, stop tokens, limits, the bounded queue, cancellation and shutdown."""
import threading
import time

import pytest
import torch

from quark import ops
from quark.chat import encode_chat
from quark.infer.engine import CACHE_DTYPES, Engine, QueueFull, Runner, ShuttingDown, load_for_serving
from quark.infer.sampling import SamplingParams
from tests.serve_helpers import make_model, make_model_dir, make_tokenizer, single_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok.get_vocab_size())


@torch.no_grad()
def greedy_reference(model, ids, n):
    """Greedy continuation by full forwards of the model itself (no cache), one sequence at a time."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[-n:]


def test_runner_matches_model_forward(model):
    ids = torch.randint(8, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)[0][0]                                           # (23, V)
    r = Runner(model, slots=3)
    torch.testing.assert_close(r.extend(1, ids[0, :11].tolist(), all_logits=True), ref[:11], atol=2e-5, rtol=1e-4)
    # extending a slot that already holds a prefix (speculative verification) sees the whole prefix
    torch.testing.assert_close(r.extend(1, ids[0, 11:16].tolist(), all_logits=True), ref[11:16], atol=2e-5, rtol=1e-4)
    # ragged decode: slots 0..2 hold 7, 16 and 3 tokens
    r.lens[0] = 0
    r.extend(0, ids[0, :7].tolist())
    r.extend(2, ids[0, :3].tolist())
    out = r.decode([int(ids[0, 7]), int(ids[0, 16]), int(ids[0, 3])])
    torch.testing.assert_close(out, ref[[7, 16, 3]], atol=2e-5, rtol=1e-4)
    assert r.lens.tolist() == [8, 17, 4]
    r.move(2, 0)   # slot 0 takes over slot 2's sequence
    torch.testing.assert_close(r.decode([int(ids[0, 4])])[0], ref[4], atol=2e-5, rtol=1e-4)


def test_forward_verifies_ragged_proposals_and_rolls_back(model):
    """Speculative verification: ragged feeds to three slots holding ragged prefixes score every position
    as the model's own forward does; lowering lens (rejected proposals) and extending again is exact."""
    seqs = [torch.randint(8, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in (9, 14, 5)]
    with torch.no_grad():
        refs = [model(torch.tensor([s]))[0][0] for s in seqs]                                # (n, V) each
    r = Runner(model, slots=3)
    cuts = (4, 13, 0)
    for slot, (s, cut) in enumerate(zip(seqs, cuts)):
        if cut:
            r.extend(slot, s[:cut])
    out = r.forward([(j, s[cut:]) for j, (s, cut) in enumerate(zip(seqs, cuts))], [True] * 3)
    for got, ref, cut in zip(out, refs, cuts):
        torch.testing.assert_close(got, ref[cut:], atol=2e-5, rtol=1e-4)
    assert r.lens.tolist() == [9, 14, 5]
    r.lens[:] = torch.tensor([2, 3, 4])
    last = r.forward([(2, seqs[2][4:]), (0, seqs[0][2:6])])
    torch.testing.assert_close(torch.stack(last), torch.stack([refs[2][4], refs[0][5]]), atol=2e-5, rtol=1e-4)
    assert r.lens.tolist() == [6, 3, 5]


@pytest.mark.parametrize("cache_dtype", ["bf16", "int8"])
def test_low_precision_caches_are_close(model, cache_dtype):
    ids = list(range(10, 30))
    full = Runner(model, 1).extend(0, ids, all_logits=True)
    low = Runner(model, 2, cache_dtype=cache_dtype)
    low.extend(0, ids[5:11])
    low.extend(1, ids[:10])
    torch.testing.assert_close(low.extend(1, ids[10:12], all_logits=True), full[10:12], atol=0.05, rtol=0)
    low.move(1, 0)   # slot 0 takes over slot 1's sequence; int8 scales travel with it
    got = torch.stack([low.decode([t])[0] for t in ids[12:]])
    assert (got - full[12:]).abs().max() < 0.05
    assert low.k[0].dtype == CACHE_DTYPES[cache_dtype]
    with pytest.raises(ValueError, match="cache_dtype"):
        Runner(model, 1, cache_dtype="fp8")


def test_continuous_batching_equals_one_at_a_time(model):
    """More requests than slots, ragged prompts and lengths: each output equals the sequence generated alone."""
    prompts = [list(range(8 + i, 8 + i + 2 + 3 * i)) for i in range(7)]
    lengths = [5, 17, 9, 1, 12, 3, 20]
    eng = Engine(model, None, max_batch=3).start()
    reqs = [eng.submit(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
    for r in reqs:
        assert r.done.wait(60)
    eng.shutdown()
    for p, n, r in zip(prompts, lengths, reqs):
        assert r.output_ids == greedy_reference(model, p, n) and r.finish_reason == "length"
    assert eng.steps < sum(lengths)   # requests really shared decode steps


def test_seeded_sampling_independent_of_batch(model):
    p = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=3)
    alone = Engine(model, None, max_batch=1).generate([10, 11, 12], p).output_ids
    eng = Engine(model, None, max_batch=4).start()
    others = [eng.submit([20 + i], SamplingParams(max_tokens=15, temperature=1.0)) for i in range(3)]
    mine = eng.submit([10, 11, 12], SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95,
                                                   repetition_penalty=1.1, seed=3))
    mine.done.wait(60)
    for r in others:
        r.done.wait(60)
    eng.shutdown()
    assert mine.output_ids == alone


def test_a_failing_request_fails_alone(model):
    """Before, an exception while sampling one request ended every request in the batch and reset the
    cache. Now the broken one finishes with an error and the others keep their tokens and cache."""
    prompts = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    eng = Engine(model, None, max_batch=5).start()
    with eng.cond:   # admit all at once, so they share decode steps
        good = [eng.submit(p, SamplingParams(max_tokens=14, temperature=0)) for p in prompts]
        broken = SamplingParams(max_tokens=14, temperature=1.0)
        broken.top_k = -5                 # corrupted after validation: torch.topk raises inside the step
        bad = eng.submit([40, 41], broken)
        tiny = SamplingParams(max_tokens=14, temperature=1.0)
        tiny.temperature = 1e-40          # what main's validation let through
        overflow = eng.submit([10, 11, 12], tiny)
    for r in good + [bad, overflow]:
        assert r.done.wait(60)
    eng.shutdown()
    assert bad.finish_reason.startswith("error") and "k" in bad.finish_reason
    for p, r in zip(prompts, good):
        assert r.finish_reason == "length" and r.output_ids == greedy_reference(model, p, 14)
    assert overflow.finish_reason == "length" and overflow.output_ids == greedy_reference(model, [10, 11, 12], 14)


def test_a_raising_event_callback_cancels_only_its_request(tok, model):
    p = SamplingParams(max_tokens=20, temperature=0)
    alone = Engine(model, tok, max_batch=1).generate([30, 31, 32], p)
    eng = Engine(model, tok, max_batch=2).start()
    with eng.cond:
        rude = eng.submit([50, 51], p, on_event=lambda kind, value: 1 / 0)
        polite = eng.submit([30, 31, 32], p)
    assert rude.done.wait(60) and polite.done.wait(60)
    eng.shutdown()
    assert rude.finish_reason == "cancelled"
    assert polite.output_ids == alone.output_ids and polite.finish_reason == alone.finish_reason


def test_stop_token_and_streamed_text(tok):
    model = make_model(tok.get_vocab_size())
    end = tok.token_to_id("<|end|>")
    eng = Engine(model, tok, max_batch=2)
    events = []
    ids, _ = encode_chat(tok, [{"role": "user", "content": "Hello world"}], add_generation_prompt=True)
    req = eng.generate(ids, SamplingParams(max_tokens=30, temperature=0),
                       on_event=lambda kind, v: events.append((kind, v)))
    eng.shutdown()
    assert events[-1] == ("done", req.finish_reason)
    assert "".join(v for k, v in events if k == "token") == req.text == tok.decode(req.output_ids)
    assert end not in req.output_ids
    # force the stop token: an output head whose bias makes <|end|> win every argmax
    head = torch.nn.Linear(model.config.d_model, model.config.vocab_size)
    with torch.no_grad():
        head.weight.copy_(model.tok_emb.weight)
        head.bias.zero_()
        head.bias[end] = 1e4
    model.lm_head = head
    eng = Engine(model, tok, max_batch=2)
    req = eng.generate(ids, SamplingParams(max_tokens=30, temperature=0))
    eng.shutdown()
    assert req.finish_reason == "stop" and req.output_ids == [] and req.text == ""


def test_stop_string(tok, model):
    eng = Engine(model, tok, max_batch=1)
    free = eng.generate([10, 11], SamplingParams(max_tokens=20, temperature=0))
    stop = free.text[3:5]
    req = eng.generate([10, 11], SamplingParams(max_tokens=20, temperature=0, stop=[stop]))
    eng.shutdown()
    assert req.finish_reason == "stop" and req.text == free.text[:free.text.find(stop)]


def test_limits_are_checked(model):
    eng = Engine(model, None, max_batch=1, max_seq_len=32)
    with pytest.raises(ValueError, match="context"):
        eng.submit(list(range(8, 28)), SamplingParams(max_tokens=13))
    with pytest.raises(ValueError, match="empty"):
        eng.submit([], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        eng.submit([model.config.vocab_size], SamplingParams(max_tokens=4))


def test_queue_full_cancel_and_shutdown(model):
    eng = Engine(model, None, max_batch=1, max_queue=2)   # not started: nothing leaves the queue
    reqs = [eng.submit([9], SamplingParams(max_tokens=50, temperature=0)) for _ in range(3)]   # 1 slot + 2 queued
    with pytest.raises(QueueFull):
        eng.submit([9], SamplingParams(max_tokens=5))
    reqs[1].cancel()
    eng.start()
    eng.shutdown(drain=True, timeout=60)
    assert [r.finish_reason for r in reqs] == ["length", "cancelled", "length"]
    with pytest.raises(ShuttingDown):
        eng.submit([9], SamplingParams())


def test_shutdown_without_drain_cancels(model):
    eng = Engine(model, None, max_batch=2)
    reqs = [eng.submit([9], SamplingParams(max_tokens=200, temperature=0)) for _ in range(4)]
    eng.start()
    eng.shutdown(drain=False, timeout=60)
    assert all(r.done.is_set() for r in reqs)
    assert {r.finish_reason for r in reqs} <= {"cancelled", "length"}


def test_engine_threads_submit_concurrently(model):
    eng = Engine(model, None, max_batch=4, max_queue=64).start()
    results = {}

    def client(i):
        results[i] = eng.generate([8 + i, 9 + i], SamplingParams(max_tokens=6, temperature=0)).output_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    eng.shutdown()
    assert all(results[i] == greedy_reference(model, [8 + i, 9 + i], 6) for i in range(16))


def test_load_for_serving_run_and_model_dirs(tmp_path):
    mdir, model, _ = make_model_dir(tmp_path / "run" / "sft" / "final")
    (tmp_path / "run" / "tokenizer").mkdir()
    (mdir / "tokenizer.json").rename(tmp_path / "run" / "tokenizer" / "tokenizer.json")
    m, tok, found, run_dir = load_for_serving(tmp_path / "run")
    assert found == mdir and run_dir == tmp_path / "run" and tok.token_to_id("<|end|>") is not None
    m2, _, found2, run2 = load_for_serving(mdir)
    assert found2 == mdir and run2 == tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no trained model"):
        load_for_serving(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_for_serving(tmp_path / "missing")


@pytest.mark.parametrize("step", ["domain", "rl"])
def test_serving_a_run_picks_up_its_domain_and_rl_models(tmp_path, step):
    """rl/final (after dpo) and domain/final (after pretrain) are the run's latest model when present."""
    earlier = {"domain": "pretrain", "rl": "dpo"}[step]
    make_model_dir(tmp_path / "run" / earlier / "final")
    mdir, _, _ = make_model_dir(tmp_path / "run" / step / "final")
    assert load_for_serving(tmp_path / "run")[2] == mdir


class QLinear(torch.nn.Module):
    """nn.Linear's call contract over quark.ops.qlinear (what quantized models plug in)."""

    def __init__(self, linear, scheme):
        super().__init__()
        self.qt = ops.quantize(linear.weight.detach().contiguous(), scheme, group_size=32)

    def forward(self, x):
        return ops.qlinear(x, self.qt)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_projections_run_unfused(tok, scheme):
    model = make_model(tok.get_vocab_size())
    for blk in model.blocks:
        for parent, names in ((blk.attn, ("wq", "wk", "wv", "wo")), (blk.mlp, ("w1", "w2", "w3"))):
            for n in names:
                setattr(parent, n, QLinear(getattr(parent, n), scheme))
    prompt = [10, 11, 12, 13]
    eng = Engine(model, None, max_batch=2)
    assert eng.runner.qkv[0] is None and eng.runner.gate_up[0] is None   # only plain nn.Linear is fused
    reqs = [eng.submit(prompt, SamplingParams(max_tokens=8, temperature=0)), eng.submit([20], SamplingParams(max_tokens=5, temperature=0))]
    eng.start()
    for r in reqs:
        r.done.wait(60)
    eng.shutdown()
    assert reqs[0].output_ids == greedy_reference(model, prompt, 8)


def test_run_batches_on_the_callers_thread(tok):
    """Engine.run: more prompts than slots, each as the model's own greedy decode; a stop id ends a
    request and is recorded; per-prompt params; fuse=False leaves the model's parameters in place."""
    model = make_model(tok.get_vocab_size(), seed=3)
    params = dict(model.named_parameters())
    prompts = [[10 + i, 11 + i, 12 + i] for i in range(5)]
    eng = Engine(model, max_batch=2, fuse=False)
    reqs = eng.run(prompts, SamplingParams(max_tokens=9, temperature=0))
    assert eng.thread is None and all(model.get_parameter(n) is p for n, p in params.items())
    assert [r.output_ids for r in reqs] == [greedy_reference(model, p, 9) for p in prompts]
    assert all(r.finish_reason == "length" and r.stop_token is None for r in reqs)
    stop = reqs[0].output_ids[3]
    first = reqs[0].output_ids.index(stop)
    stopped = Engine(model, max_batch=2, stop_ids=[stop]).run(prompts[:1], SamplingParams(max_tokens=9, temperature=0))[0]
    assert stopped.output_ids == reqs[0].output_ids[:first] and stopped.stop_token == stop
    sampled = eng.run(prompts[:2] * 2, [SamplingParams(max_tokens=9, seed=s) for s in (1, 2, 1, 2)])
    assert sampled[0].output_ids == sampled[2].output_ids and sampled[1].output_ids == sampled[3].output_ids
    with pytest.raises(ValueError, match="2 SamplingParams for 5 prompts"):
        eng.run(prompts, [SamplingParams(), SamplingParams()])
    eng.start()
    with pytest.raises(RuntimeError, match="loop thread"):
        eng.run(prompts)
    eng.shutdown()


@pytest.mark.parametrize("window", [0, 6])
def test_runner_forward_batches_segments(tok, window):
    """One forward over running streams' next tokens (slots 0, 1), a one-token prompt (slot 4: single tokens
    off the slots 0..n-1 prefix) and two prompt chunks (slots 2, 3) equals the model's own forward of each
    sequence, with a sliding window too."""
    m = make_model(tok.get_vocab_size(), seed=5, sliding_window=window)
    ids = torch.randint(8, m.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(ids)[0][0]                                                                 # (23, V)
    seq = ids[0].tolist()
    r = Runner(m, 5)
    r.extend(0, seq[:9])
    r.extend(1, seq[:14])
    r.extend(3, seq[:4])
    out = r.forward([(0, [seq[9]]), (1, [seq[14]]), (2, seq[:11]), (3, seq[4:20]), (4, seq[:1])],
                    [False, False, False, True, False])
    for got, want in zip(out, [ref[9], ref[14], ref[10], ref[4:20], ref[0]]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert r.lens.tolist() == [10, 15, 11, 20, 1]


@pytest.mark.parametrize("cache_dtype", ["fp32", "bf16", "int8"])
def test_runner_kv_copy_and_swap(model, cache_dtype):
    """read_kv/write_kv carry a slot's sequence (int8 scales included) and swap exchanges two slots: decoding
    after either equals decoding the original."""
    ids = list(range(10, 30))
    r = Runner(model, 3, cache_dtype=cache_dtype)
    r.extend(0, ids)
    r.extend(1, ids[:5])
    want = r.decode([7, 8])                                                  # slots 0, 1 advance one token
    r.lens[:2] = torch.tensor([20, 5])
    r.write_kv(2, r.read_kv(0, 0, 20))
    assert int(r.lens[2]) == 20
    r.swap(0, 1)                                                             # slot 0 now holds 5 tokens
    assert r.lens.tolist() == [5, 20, 20]
    torch.testing.assert_close(r.decode([8, 7]), want.flip(0), atol=0, rtol=0)
    r.move(2, 0)
    torch.testing.assert_close(r.decode([7])[0], want[0], atol=0, rtol=0)


SYSTEM = list(range(40, 77))   # 37 tokens: two 16-token blocks and a partial one


@pytest.mark.parametrize("cache_dtype,window,chunk", [("fp32", 0, None), ("fp32", 0, 8), ("bf16", 0, 8), ("int8", 0, 8),
                                                      ("fp32", 12, 8), ("int8", 12, None)])
def test_prefix_cache_outputs_equal_uncached(tok, cache_dtype, window, chunk):
    """Concurrent requests sharing a system prompt (more than the slots): greedy outputs equal the engine without
    a cache, token for token, for every cache dtype, a sliding window model, whole and chunked prefill (chunks
    of several prompts and the running streams' tokens in one forward); hits are counted."""
    m = make_model(tok.get_vocab_size(), seed=2, sliding_window=window)
    prompts = [SYSTEM + [100 + i] * (1 + 5 * i) for i in range(6)] + [SYSTEM[:32] + [9]]   # last: 32 cached of 33
    params = SamplingParams(max_tokens=8, temperature=0)
    outputs = {}
    for mb in (0, 1):
        eng = Engine(m, None, max_batch=3, cache_dtype=cache_dtype, prefix_cache_mb=mb, prefill_chunk=chunk).start()
        with eng.cond:
            reqs = [eng.submit(p, params) for p in prompts]
        for r in reqs:
            assert r.done.wait(60)
        eng.shutdown()
        outputs[mb] = [r.output_ids for r in reqs]
        cached = [r.cached_tokens for r in reqs]
    assert outputs[1] == outputs[0]
    # the others, admitted with the first, start their prefill once the first stored its blocks
    assert cached == [0] + [32] * 6 and eng.prefix_cache.hit_tokens == 32 * 6
    if cache_dtype == "fp32":
        assert outputs[1] == [greedy_reference(m, p, 8) for p in prompts]


def test_prefix_cache_eviction_under_a_tiny_budget(model):
    """A budget of two blocks: alternating prompts keep evicting each other; every output stays the model's own."""
    kv_block = 2 * model.config.n_layer * model.config.n_kv_head * model.config.head_dim * 4 * 16   # fp32 bytes
    eng = Engine(model, None, max_batch=1, prefix_cache_mb=2.5 * kv_block / 2**20)
    a, b = list(range(20, 70)), list(range(120, 170))
    params = SamplingParams(max_tokens=5, temperature=0)
    prompts = [a, a + [3], b, a, b[:40]]
    reqs = eng.run(prompts, params)
    assert [r.output_ids for r in reqs] == [greedy_reference(model, p, 5) for p in prompts]
    cache = eng.prefix_cache
    assert len(cache) == 2 and cache.nbytes == 2 * kv_block
    # a's first two blocks (its leaf evicted) serve a + [3]; b evicts them, a evicts b's
    assert [r.cached_tokens for r in reqs] == [0, 32, 0, 0, 0]


def test_prompt_logprobs_bypass_the_prefix_cache(model):
    """prompt_logprobs need every position's logits: such a request computes its whole prompt (in chunks)
    even when its prefix is cached, and equals the model's own log-softmax."""
    ids = list(range(30, 80))
    eng = Engine(model, None, max_batch=1, prefill_chunk=7)
    eng.run([ids], SamplingParams(max_tokens=2, temperature=0))                     # caches 3 blocks of ids
    r = eng.run([ids], SamplingParams(max_tokens=2, temperature=0, logprobs=1, prompt_logprobs=True))[0]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0][0], -1)                    # (T, V)
    assert r.cached_tokens == 0 and len(r.prompt_logprobs) == len(ids) - 1
    assert [e[0] for e in r.prompt_logprobs] == pytest.approx([float(lp[t - 1, ids[t]]) for t in range(1, len(ids))],
                                                              abs=1e-4)
    assert r.output_ids == greedy_reference(model, ids, 2)


@pytest.mark.parametrize("chunk", [16, None])
def test_chunked_prefill_lets_running_streams_decode(model, chunk):
    """A running stream keeps emitting tokens while a long prompt is prefilled chunk by chunk (one decode
    step between chunks); unchunked, it waits for the whole prompt. Outputs are the same either way."""
    eng = Engine(model, None, max_batch=2, prefix_cache_mb=0, prefill_chunk=chunk)
    long_prompt = list(range(10, 210))                                               # 200 tokens: 13 chunks of 16
    seen = {}
    stream = eng.submit([5, 6, 7], SamplingParams(max_tokens=40, temperature=0))

    def first_token(output_ids, logits):   # runs as the newcomer's first token is sampled
        seen.setdefault("first", len(stream.output_ids))
        return logits

    eng.start()
    while len(stream.output_ids) < 3:
        time.sleep(0.001)
    with eng.cond:   # admitted at the next step; the stream's progress counts from here
        seen["admitted"] = len(stream.output_ids)
        newcomer = eng.submit(long_prompt, SamplingParams(max_tokens=4, temperature=0), processor=first_token)
    assert newcomer.done.wait(60) and stream.done.wait(60)
    eng.shutdown()
    progress = seen["first"] - seen["admitted"]
    if chunk:
        assert progress >= 200 // 16 - 1
    else:
        assert progress <= 1
    assert newcomer.output_ids == greedy_reference(model, long_prompt, 4)
    assert stream.output_ids == greedy_reference(model, [5, 6, 7], 40)


@pytest.mark.parametrize("cache_dtype", ["fp32", "int8"])
def test_prefix_cache_keeps_replies_for_the_next_turn(tok, cache_dtype):
    """A conversation's next turn resends the reply: the blocks of the finished sequence (prompt and the reply
    tokens fed back) are cached, and the next turn's output equals the engine without a cache."""
    m = make_model(tok.get_vocab_size(), seed=4)
    turn1, params = list(range(30, 70)), SamplingParams(max_tokens=20, temperature=0)
    outputs = {}
    for mb in (0, 1):
        eng = Engine(m, None, max_batch=2, cache_dtype=cache_dtype, prefix_cache_mb=mb)
        reply = eng.run([turn1], params)[0].output_ids
        second = eng.run([turn1 + reply + [5, 6, 7]], params)[0]
        outputs[mb] = (reply, second.output_ids)
    assert outputs[1] == outputs[0]
    assert second.cached_tokens == (len(turn1) + len(reply) - 1) // 16 * 16 == 48   # the last reply token was never fed
    if cache_dtype == "fp32":
        assert second.output_ids == greedy_reference(m, turn1 + reply + [5, 6, 7], 20)
