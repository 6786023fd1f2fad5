"""Serving: decode tokens/s at batch 1 for the same random model in plain torch eager fp32 (nn.Linear,
SDPA, a torch.cat KV cache: the straightforward generate loop) vs the Quark engine's runner in fp32,
int8 and int4 weights; aggregate tokens/s of 16 concurrent requests vs one stream; time to first token;
the share of a batch-1 decode step spent outside the kernels (runner overhead, see outside_kernels).
Then the engine's scheduling: 16 closed-loop clients with prompts of 64-1024 tokens, the engine before
(no prefix cache, whole prompts before each decode step) vs after (prefix cache, chunked prefill) in the
same run (TTFT p50/p99, aggregate tokens/s, stalls of running streams), and TTFT on a prefix-cache hit
vs miss of a shared 1,000-token system prompt. Each prints its target and whether it is met.

The model is sized so its weights far exceed the caches (default d_model 1024, 8 layers, vocab 32000:
~120M parameters, ~490 MB in fp32), as in real decoding, which streams every weight once per token.
Rates are printed as effective weight bandwidth (GB/s = weight bytes read per token x tokens/s).
Random weights are fine: speed does not depend on them.
"""
import json
import statistics
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.harness import Result, interleaved, summarize
from quark.model import GPT, GPTConfig
from quark.nn.quant_linear import QuantLinear
from quark.infer.engine import Engine, Runner
from quark.infer.lora import Adapter
from quark.infer.sampling import SamplingParams

AREA = "serve"


def make_config(quick):
    if quick:
        return GPTConfig(vocab_size=8192, n_layer=4, n_head=8, n_kv_head=2, d_model=512, max_seq_len=1088)
    # 1088: the load test's longest prompt (1024) plus its generated tokens
    return GPTConfig(vocab_size=32000, n_layer=8, n_head=16, n_kv_head=4, d_model=1024, max_seq_len=1088)


def quantized_copy(cfg, state, scheme):
    """The same model with every projection and the output head in `scheme` (embeddings stay fp32)."""
    model = GPT(cfg)
    model.load_state_dict(state, strict=False)
    model.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    for blk in model.blocks:
        for parent, names in ((blk.attn, ("wq", "wk", "wv", "wo")), (blk.mlp, ("w1", "w2", "w3"))):
            for n in names:
                setattr(parent, n, QuantLinear.from_linear(getattr(parent, n), scheme))
    model.lm_head = QuantLinear.from_linear(model.lm_head, scheme)
    return model.eval()


def weight_bytes(model):
    """Bytes of weights one decode step reads (projections + output head + one embedding row)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.qweight.nbytes
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total + model.config.d_model * 4


class EagerDecoder:
    """The peer: a straightforward torch generate loop over the same weights (nn.Linear modules,
    F.scaled_dot_product_attention, KV cache grown with torch.cat)."""

    def __init__(self, model):
        self.m = model

    @torch.no_grad()
    def forward(self, idx, cache):
        cfg, m = self.m.config, self.m
        B, T = idx.shape
        start = 0 if cache[0] is None else cache[0][0].shape[2]
        cos, sin = m.rope_cos[start:start + T], m.rope_sin[start:start + T]
        x = m.tok_emb(idx)
        for i, blk in enumerate(m.blocks):
            h = blk.attn_norm(x)
            q = blk.attn.wq(h).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
            k = blk.attn.wk(h).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
            v = blk.attn.wv(h).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if cache[i] is not None:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            cache[i] = (k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
            x = x + blk.attn.wo(y.transpose(1, 2).reshape(B, T, cfg.d_model))
            h = blk.mlp_norm(x)
            x = x + blk.mlp.w2(F.silu(blk.mlp.w1(h)) * blk.mlp.w3(h))
        return m.lm_head(m.norm(x[:, -1]))

    def prefill(self, ids):
        cache = [None] * self.m.config.n_layer
        return self.forward(torch.tensor([ids]), cache), cache

    def decode(self, logits, cache, n):
        cache = list(cache)   # the prompt's cache is reused by every call; torch.cat never writes into it
        for _ in range(n):
            logits = self.forward(logits.argmax(-1, keepdim=True), cache)
        return logits


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    return torch.cat([x[..., :h] * cos - x[..., h:] * sin, x[..., :h] * sin + x[..., h:] * cos], -1)


def quark_decoder(model, prompt):
    """Runner-based greedy decode of n tokens from a prefilled prompt (rewinds to the prompt each call)."""
    runner = Runner(model, 1)
    first = runner.extend(0, prompt)
    P = len(prompt)

    def decode(n):
        runner.lens[0] = P
        logits = first[None]
        for _ in range(n):
            logits = runner.decode([int(logits[0].argmax())])
    return decode


def compare(quick=False):
    torch.manual_seed(0)
    cfg = make_config(quick)
    n_tokens, repeats = (16, 3) if quick else (32, 5)
    prompt = torch.randint(0, cfg.vocab_size, (32,)).tolist()
    base = GPT(cfg).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    models = {"quark fp32": base, "quark int8": quantized_copy(cfg, state, "int8"),
              "quark int4": quantized_copy(cfg, state, "int4")}
    eager_model = GPT(cfg).eval()
    eager_model.load_state_dict(state, strict=False)
    eager = EagerDecoder(eager_model)
    logits0, cache0 = eager.prefill(prompt)

    providers = {name: (lambda d=quark_decoder(m, prompt): d(n_tokens)) for name, m in models.items()}
    providers["torch eager fp32"] = lambda: eager.decode(logits0, cache0, n_tokens)
    # correctness before timing: the fp32 paths agree on the greedy continuation
    ref_ids = list(prompt)
    with torch.no_grad():   # greedy by full forwards, no cache: the plainest reference
        for _ in range(8):
            ref_ids.append(int(base(torch.tensor([ref_ids]))[0][0, -1].argmax()))
    ref_ids = ref_ids[len(prompt):]
    eng = Engine(base, None, max_batch=1)
    assert eng.generate(prompt, SamplingParams(max_tokens=8, temperature=0)).output_ids == ref_ids
    eng.shutdown()

    times = interleaved(providers, repeats=repeats, warmup=1)
    rows = []
    fp32_bytes = weight_bytes(base)
    for name, ts in times.items():
        wb = weight_bytes(models[name]) if name in models else fp32_bytes
        tok_s = n_tokens / statistics.median(ts)
        rows += summarize(AREA, f"decode batch 1, {n_tokens} tokens, d{cfg.d_model} L{cfg.n_layer}", {name: ts},
                          work=wb * n_tokens, unit="GB/s",
                          extra={"tokens_per_s": round(tok_s, 2), "weight_MB": round(wb / 1e6, 1)})
    rows += outside_kernels(models, prompt, n_tokens)
    rows += batching(base, cfg, quick)
    rows += load(base, cfg, quick)
    rows += prefix_hit(base, cfg, quick)
    rows += multi_lora(quick, base)
    rows += constrained(quick)
    for r in rows:   # the table shows GB/s; tokens/s and TTFT are what serving cares about
        print(f"  {r.case:<44} {r.provider:<20} " + "  ".join(f"{k} {v}" for k, v in r.extra.items()))
    return rows


class KernelClock:
    """Stands in for quark._C inside quark.ops (and wraps quark.ops.linear's GEMVs) and sums the wall time
    spent in the calls that do a decode step's arithmetic: the projections and the head (qlinear,
    gemv_f32, gemv_bf16) and attention over the cache.
    Everything else in the step counts as outside: Python, torch ops, allocation, the small C++ glue ops
    (rmsnorm, rope_store, silu_mul) and this clock's own wrapping (~0.3 us a call), so the share is an
    upper bound of the runner's overhead."""
    KERNELS = ("qlinear", "gemv_f32", "gemv_bf16", "decode_attention")

    def __init__(self, module):
        self.module, self.seconds, self.cpu_seconds = module, 0.0, 0.0

    def __getattr__(self, name):
        fn = getattr(self.module, name)
        return self.wrap(fn) if name in self.KERNELS else fn

    def wrap(self, fn):
        def timed(*args):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - t0
                self.cpu_seconds += time.thread_time() - c0
        return timed


def outside_kernels(models, prompt, n_tokens, repeats=5):
    """Share of a batch-1 decode step (Runner.decode + argmax) outside the kernels, per model: 1 - kernel
    time / wall time over n_tokens steps, median of repeats. On a loaded machine the wall time outside
    the kernels also holds the time the thread waited for a core, so outside_cpu_ms, the calling
    thread's CPU time outside the kernels per step (time.thread_time), is printed beside it: the work
    itself, whatever the load."""
    import sys
    from quark import _C
    mods = [sys.modules[m] for m in ("quark.ops.quant", "quark.ops.linear", "quark.ops.attention")]
    clock = KernelClock(_C)
    rows = []
    for m in mods:
        m._C = clock
    gemvs = dict(mods[1]._KERNELS)   # quark.ops.linear holds its GEMVs by dtype
    mods[1]._KERNELS.update({dtype: clock.wrap(fn) for dtype, fn in gemvs.items()})
    try:
        for name, model in models.items():
            decode = quark_decoder(model, prompt)
            decode(2)
            walls, shares, cpus = [], [], []
            for _ in range(repeats):
                clock.seconds = clock.cpu_seconds = 0.0
                t0, c0 = time.perf_counter(), time.thread_time()
                decode(n_tokens)
                wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                walls.append(wall / n_tokens)
                shares.append(1 - clock.seconds / wall)
                cpus.append((cpu - clock.cpu_seconds) / n_tokens)
            step, share = statistics.median(walls), statistics.median(shares)
            rows.append(Result(AREA, "batch-1 decode step, share outside kernels", name, step, min(walls), max(walls),
                               extra={"outside_kernels_pct": round(100 * share, 1),
                                      "outside_ms": round(1e3 * step * share, 3),
                                      "outside_cpu_ms": round(1e3 * statistics.median(cpus), 3)}))
            print(f"  {name}: {100 * share:.1f}% of a batch-1 decode step outside kernels (target <= 10%: "
                  f"{'met' if share <= 0.10 else 'not met'})")
    finally:
        for m in mods:
            m._C = _C
        mods[1]._KERNELS.update(gemvs)
    return rows


def batching(model, cfg, quick):
    """16 concurrent requests through the continuous-batching engine vs one request alone (fp32)."""
    n_req, n_tokens = 16, (16 if quick else 32)
    prompts = [torch.randint(0, cfg.vocab_size, (24 + i,)).tolist() for i in range(n_req)]
    params = SamplingParams(max_tokens=n_tokens, temperature=0)
    rows = []
    for label, batch, reqs in (("1 stream", 1, prompts[:1]), (f"{n_req} concurrent", n_req, prompts)):
        eng = Engine(model, None, max_batch=batch).start()
        eng.generate(prompts[0], SamplingParams(max_tokens=2, temperature=0))   # warm-up
        t0 = time.perf_counter()
        handles = [eng.submit(p, params) for p in reqs]
        for h in handles:
            h.done.wait()
        wall = time.perf_counter() - t0
        eng.shutdown()
        tokens = sum(len(h.output_ids) for h in handles)
        ttft = sorted(h.ttft for h in handles)
        rows.append(Result(AREA, f"engine fp32, {n_tokens} tokens/request", f"quark {label}", wall, wall, wall,
                           extra={"tokens_per_s": round(tokens / wall, 2), "ttft_median_ms": round(1e3 * ttft[len(ttft) // 2], 1),
                                  "ttft_max_ms": round(1e3 * ttft[-1], 1)}))
    return rows


# the engine as it was before prefix caching and chunked prefill: every admitted prompt prefilled whole, in
# admission order, before the next decode step
BEFORE = dict(prefix_cache_mb=0, prefill_chunk=None)
AFTER = dict()   # the engine's defaults


def load(model, cfg, quick):
    """16 closed-loop clients (each sends its next request when the previous one finished, as chat users and
    agents do), the engine as before vs after in the same run, rounds interleaved (order alternating), two
    workloads with prompts of 64-1024 tokens:
    - independent: every prompt 64-1024 fresh random tokens (no shared prefix: scheduling alone);
    - conversations: each client's next prompt is its previous prompt + the reply + a new user turn, as a
      stateless chat API resends the history (first turn 64-448 tokens, later turns 32-224 more).
    Also the running streams' stalls: the longest gaps between two tokens of one stream."""
    rows = []
    for workload in ("independent", "conversations"):
        rows += closed_loop(model, cfg, quick, workload)
    return rows


def closed_loop(model, cfg, quick, workload):
    n_clients, per_client, n_tokens, rounds = (16, 2, 16, 1) if quick else (16, 3, 32, 2)
    gen = torch.Generator().manual_seed(1)

    def tokens(lo, hi):
        return torch.randint(0, cfg.vocab_size, (int(torch.randint(lo, hi + 1, (), generator=gen)),), generator=gen).tolist()

    if workload == "independent":
        turns = [[tokens(64, 1024) for _ in range(per_client)] for _ in range(n_clients)]
    else:   # at most 448 + 2 * (32 + 224) = 960 prompt tokens by the third turn
        turns = [[tokens(64, 448)] + [tokens(32, 224) for _ in range(per_client - 1)] for _ in range(n_clients)]
    params = SamplingParams(max_tokens=n_tokens, temperature=0)
    runs = {"before": BEFORE, "after": AFTER}
    reqs, walls = ({name: [] for name in runs} for _ in range(2))
    for i in range(rounds):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            eng = Engine(model, None, max_batch=n_clients, **runs[name]).start()
            eng.generate(tokens(64, 64), SamplingParams(max_tokens=2, temperature=0))   # warm-up
            done = [[] for _ in range(n_clients)]

            def client(c):
                history = []
                for turn in turns[c]:
                    done[c].append(eng.generate(history + turn, params))
                    if workload == "conversations":
                        history = done[c][-1].prompt_ids + done[c][-1].output_ids

            threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            walls[name].append(time.perf_counter() - t0)
            eng.shutdown()
            reqs[name] += [r for row in done for r in row]
    # scheduling and the prefix cache never change what a request generates
    assert [r.output_ids for r in reqs["after"]] == [r.output_ids for r in reqs["before"]]

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    rows = []
    lengths = [len(r.prompt_ids) for r in reqs["after"]]
    for name in runs:
        ttft = [r.ttft for r in reqs[name]]
        gaps = [b - a for r in reqs[name] for a, b in zip(r.t_tokens, r.t_tokens[1:])]
        tokens_out = sum(len(r.output_ids) for r in reqs[name])
        rows.append(Result(AREA, f"{n_clients} closed-loop clients x {per_client}, {workload} prompts "
                                 f"{min(lengths)}-{max(lengths)}, {n_tokens} tokens",
                           f"engine {name}", pct(ttft, 0.5), pct(ttft, 0.1), pct(ttft, 0.9),
                           extra={"ttft_p50_ms": round(1e3 * pct(ttft, 0.5), 1), "ttft_p99_ms": round(1e3 * pct(ttft, 0.99), 1),
                                  "tokens_per_s": round(tokens_out / sum(walls[name]), 2),
                                  "stall_p99_ms": round(1e3 * pct(gaps, 0.99), 1)}))
    before, after = rows
    ratio = after.extra["ttft_p99_ms"] / before.extra["ttft_p99_ms"]
    agg = after.extra["tokens_per_s"] / before.extra["tokens_per_s"]
    met = ratio <= 0.5 and agg >= 1.0
    print(f"  {workload}: TTFT p99 after/before {ratio:.2f}x (target <= 0.5x), aggregate tokens/s after/before "
          f"{agg:.2f}x (target >= 1.0x): {'met' if met else 'not met'}; TTFT p50 "
          f"{after.extra['ttft_p50_ms'] / before.extra['ttft_p50_ms']:.2f}x, stall p99 "
          f"{after.extra['stall_p99_ms'] / before.extra['stall_p99_ms']:.2f}x")
    after.extra |= {"ttft_p99_vs_before": round(ratio, 3), "tokens_per_s_vs_before": round(agg, 3), "target_met": met}
    return rows


def prefix_hit(model, cfg, quick):
    """TTFT of one request whose 1,000-token system prompt is in the prefix cache vs one whose is not
    (a fresh system prompt each time), same user turn length, interleaved."""
    n_system, n_user, repeats = 1000, 24, (3 if quick else 5)
    gen = torch.Generator().manual_seed(2)

    def tokens(n):
        return torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()

    system = tokens(n_system)
    eng = Engine(model, None, max_batch=1)
    params = SamplingParams(max_tokens=1, temperature=0)
    eng.run([system + tokens(n_user)], params)   # caches the shared system prompt (and warms up)
    times = {"miss": [], "hit": []}
    for _ in range(repeats):
        for name in times:
            req = eng.run([(system if name == "hit" else tokens(n_system)) + tokens(n_user)], params)[0]
            assert req.cached_tokens == (n_system // 16 * 16 if name == "hit" else 0)
            times[name].append(req.ttft)
    rows = summarize(AREA, f"TTFT, {n_system}-token system prompt + {n_user}", {f"prefix cache {k}": v for k, v in times.items()})
    speedup = statistics.median(times["miss"]) / statistics.median(times["hit"])
    met = speedup >= 5
    print(f"  prefix cache: TTFT hit {speedup:.1f}x faster than miss (target >= 5x): {'met' if met else 'not met'}")
    for r in rows:
        r.extra = {"ttft_ms": round(1e3 * r.median_s, 1)}
    rows[1].extra |= {"speedup_vs_miss": round(speedup, 2), "target_met": met}
    return rows


def constrained(quick=False):
    """Per-token cost of constrained decoding (response_format json_schema through llguidance: the grammar
    matcher advances and masks every step) vs the same request unconstrained, batch 1, interleaved: time per
    output token after the first (the grammar's compile and first mask are paid once, before the first
    token), each request's over the tokens it generated, since the two generate different text."""
    from benchmarks.bench_speculative import stdlib_corpus
    from quark.data.tokenizer import train as train_tokenizer
    from quark.infer.constrain import Constraint
    tok = train_tokenizer(stdlib_corpus(1_000_000), vocab_size=4096)
    torch.manual_seed(0)
    cfg = make_config(quick)
    cfg = GPTConfig(**{**cfg.__dict__, "vocab_size": tok.get_vocab_size()})
    model = GPT(cfg).eval()
    eos = tok.token_to_id("<|eos|>")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
        "enum": ["a", "b", "c"]}}, "size": {"type": "integer"}}, "required": ["name", "tags", "size"]}
    n_tokens, repeats = (24, 5) if quick else (48, 7)
    prompt = tok.encode("Describe the object as JSON: ").ids
    eng = Engine(model, tok, max_batch=1, stop_ids=[eos]).start()
    params = SamplingParams(max_tokens=n_tokens, temperature=0)
    per_token = {"unconstrained": [], "json_schema": []}

    def go(name):
        def run():
            processor = Constraint.json_schema(tok, schema, eos) if name == "json_schema" else None
            req = eng.submit(prompt, params, processor=processor)
            req.done.wait()
            assert name == "unconstrained" or req.finish_reason == "length" or json.loads(req.text)
            per_token[name].append((req.t_done - req.t_first) / max(1, len(req.output_ids) - 1))
        return run
    interleaved({name: go(name) for name in per_token}, repeats=repeats, warmup=1)
    eng.shutdown()
    rows = summarize(AREA, f"decode batch 1, per token, d{cfg.d_model} L{cfg.n_layer}", per_token)
    overhead = statistics.median(per_token["json_schema"]) / statistics.median(per_token["unconstrained"]) - 1
    met = overhead <= 0.10
    print(f"  constrained decoding: {overhead:+.1%} per token vs unconstrained (target <= 10%): "
          f"{'met' if met else 'not met'}")
    for r in rows:
        r.extra = {"ms_per_token": round(1e3 * r.median_s, 2)}
    rows[1].extra |= {"overhead": round(overhead, 4), "target_met": met}
    return rows


def multi_lora(quick=False, model=None):
    """Decode tokens/s of a batch of 8 whose rows run 4 LoRA adapters (rank 16 on every projection, rows
    interleaved a b c d a b c d, as requests arrive) vs the same batch running none: the
    cost of adding the deltas unmerged (quark.infer.lora)."""
    torch.manual_seed(0)
    cfg = make_config(quick)
    model = model or GPT(cfg).eval()
    n_tokens, repeats, rank = (16, 5, 16) if quick else (32, 5, 16)
    widths = {t: getattr(part, t).out_features for part in (model.blocks[0].attn, model.blocks[0].mlp)
              for t in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") if hasattr(part, t)}
    ins = {t: cfg.d_model if t != "w2" else cfg.ffn_hidden for t in widths}
    adapters = [Adapter(f"a{k}", {(i, t): (torch.randn(rank, ins[t]) * 0.05, torch.randn(widths[t], rank) * 0.05)
                                  for i in range(cfg.n_layer) for t in widths}, widths) for k in range(4)]
    runner = Runner(model, 8)
    prompts = [torch.randint(0, cfg.vocab_size, (24 + j,)).tolist() for j in range(8)]
    for j, p in enumerate(prompts):
        runner.extend(j, p)
    start = runner.lens.clone()

    def decode(slot_adapters):
        def go():
            runner.slot_adapter[:] = slot_adapters
            runner.lens.copy_(start)
            tokens = [p[-1] for p in prompts]
            for _ in range(n_tokens):
                tokens = runner.decode(tokens).argmax(-1).tolist()
        return go
    providers = {"quark no adapter": decode([None] * 8), "quark 4 adapters": decode(adapters * 2)}
    times = interleaved(providers, repeats=repeats, warmup=1)
    rows = summarize(AREA, f"decode batch 8, LoRA r{rank} on all projections", times,
                     extra={"d_model": cfg.d_model, "layers": cfg.n_layer})
    for r in rows:
        r.extra["tokens_per_s"] = round(8 * n_tokens / r.median_s, 1)
        print(f"  {r.case:<44} {r.provider:<20} tokens_per_s {r.extra['tokens_per_s']}")
    return rows


def test_serve_decode_quark_fp32(benchmark):
    torch.manual_seed(0)
    cfg = make_config(quick=True)
    decode = quark_decoder(GPT(cfg).eval(), list(range(16)))
    benchmark(decode, 8)
