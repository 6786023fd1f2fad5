"""Inference engine: prefill + decode over a slot KV cache, continuous batching, streaming.

- Runner: the GPT forward written over a slot cache, per layer k/v of shape (slots, Hkv, Smax, D) and
  lengths (slots,). A request owns one slot; prefill writes its prompt there, and one decode step
  advances every active slot by one token through quark.ops.decode_attention over ragged lengths.
  Active slots are kept as a prefix 0..n-1 (a finished slot takes over the last active one), so a
  step attends over cache[:n] without any gather. The q/k/v and gate/up projections are fused into
  one matmul each when they are plain nn.Linear (one weight pass instead of three / two). Plain fp32
  projections and the output head run through quark.ops.linear: at decode's few rows (<= 16 slots)
  a streaming GEMV near the machine's read bandwidth (torch's sgemv reaches about half); prefill and
  other dtypes fall through to F.linear.
- Engine: one background thread owns the model. Requests wait in a bounded queue (submit raises
  QueueFull beyond it, so overload is answered, not absorbed), join the running batch as slots free
  up (continuous batching: Orca, Yu et al. 2022; vLLM), and stream text deltas through a callback.
  A newcomer's slot starts with the longest cached prefix of its prompt (quark.infer.prefix_cache), and
  the rest is prefilled at most prefill_chunk tokens per step; each step is one Runner.forward over the
  running streams' next tokens and the prompt chunks (chunked prefill with decodes riding on the chunk:
  Sarathi-Serve, Agrawal et al. 2024), so a long prompt never stalls the streams for longer than one chunk.
  With a draft model or prompt lookup (quark.infer.speculative), while at most spec_max_batch requests
  run and no prompt is prefilling, a step is a speculative round instead: proposals for every active
  slot are verified in one Runner.forward and rejection sampling keeps the target's distribution. Beyond
  that, plain batched decode already reads each weight once for many tokens, and a round would not pay.
Any module with the nn.Linear call contract works as a projection, so QuantLinear models run as is.
LoRA adapters (quark.infer.lora) run unmerged beside the base: each slot names its adapter, and after
every projection each adapter in the batch adds its low-rank delta to its own rows, so requests with
different adapters, or none, share every decode step.
The options of Hugging Face checkpoints (quark.model.hf) run as quark.model.gpt runs them: biases in
the projections, q/k norms before the rotation, rope scaling through model.rope, and a sliding window
as a mask (prefill) or windowed attention (decode past the window).
"""
import itertools
import threading
import time
from collections import deque

import torch
import torch.nn as nn
import torch.nn.functional as F

from quark import ops
from quark.infer.lora import Adapter, RowAdapters
from quark.infer.prefix_cache import PrefixCache
from quark.infer.sampling import Detokenizer, SamplingParams, probs, sample, token_logprobs
from quark.infer.speculative import DraftModel, PromptLookup, verify_token
from quark.model.gpt import window_attention

# int8: symmetric per (token, head) with float32 scales (quark.ops.quantize_kv), a quarter of fp32's bytes
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
SPEC_MAX_BATCH = 4   # speculate while at most this many requests run; beyond, batched decode is faster


class QueueFull(RuntimeError):
    """The engine's waiting queue is at capacity (the server answers 429)."""


class ShuttingDown(RuntimeError):
    """The engine no longer accepts requests (the server answers 503)."""


def _rope(x, cos, sin):
    """x (..., H, D) with cos/sin broadcastable to (..., 1, D/2): same rotation as quark.model.gpt."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _linear(module, x):
    """module(x) for any projection; plain nn.Linear goes through quark.ops.linear (see above)."""
    if type(module) is nn.Linear:
        return ops.linear(x, module.weight, module.bias)
    return module(x)


def _delta(y, x, lora, i, targets):
    """y, the projection of x over layer i's targets, plus its rows' LoRA deltas (lora: RowAdapters or None)."""
    return y if lora is None else lora.add(y, x, i, targets)


def _fuse(linears):
    """One weight for several bias-free nn.Linear on the same input, or None if any is something
    else (QuantLinear, LoRA...). The originals become views of it, so no memory is duplicated."""
    if not all(type(m) is nn.Linear and m.bias is None for m in linears):
        return None
    fused = torch.cat([m.weight.detach() for m in linears], 0)
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start:start + n], requires_grad=False)
        start += n
    return fused


class Runner:
    """The model's forward over a slot cache. Not thread-safe: one owner (the engine thread)."""

    def __init__(self, model, slots, max_seq_len=None, cache_dtype="fp32", fuse=True):
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}")
        self.model = model.eval()
        cfg = self.cfg = model.config
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.slots = slots
        self.dtype = model.tok_emb.weight.dtype
        self.cache_dtype = CACHE_DTYPES[cache_dtype]
        shape = (slots, cfg.n_kv_head, self.max_seq_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=self.cache_dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=self.cache_dtype) for _ in range(cfg.n_layer)]
        self.quantized = self.cache_dtype == torch.int8
        if self.quantized:
            self.k_scale = [torch.zeros(shape[:3]) for _ in range(cfg.n_layer)]                 # (slots, Hkv, Smax)
            self.v_scale = [torch.zeros(shape[:3]) for _ in range(cfg.n_layer)]
        self.lens = torch.zeros(slots, dtype=torch.long)
        # the LoRA adapter (quark.infer.lora.Adapter) or None each slot's sequence runs with: set before its
        # prefill, it moves with the sequence; rows of one batch may each run another (RowAdapters)
        self.slot_adapter = [None] * slots
        self.lora_cache = {}       # RowAdapters' stacks and masks of the running batch, kept across steps
        # fuse=False leaves the model's parameters alone (fusing replaces them by views of one tensor): for
        # a model that is still being trained between generations, such as the RL policy
        with torch.no_grad():
            self.qkv = [_fuse([b.attn.wq, b.attn.wk, b.attn.wv]) if fuse else None for b in model.blocks]
            self.gate_up = [_fuse([b.mlp.w1, b.mlp.w3]) if fuse else None for b in model.blocks]

    def _proj(self, i, module, target, h, lora):
        return _delta(_linear(module, h), h, lora, i, (target,))

    def _project_qkv(self, i, h, lora):
        a = self.model.blocks[i].attn
        if self.qkv[i] is not None:
            return _delta(ops.linear(h, self.qkv[i]), h, lora, i, ("wq", "wk", "wv")).split(
                [self.cfg.n_head * self.cfg.head_dim] + [self.cfg.n_kv_head * self.cfg.head_dim] * 2, -1)
        return tuple(self._proj(i, getattr(a, t), t, h, lora) for t in ("wq", "wk", "wv"))

    def _qk(self, i, q, k, cos, sin):
        """q (T, H, D), k (T, Hkv, D) -> normed (Qwen3) and rotated."""
        a = self.model.blocks[i].attn
        if self.cfg.qk_norm:
            q, k = a.q_norm(q), a.k_norm(k)
        return _rope(q, cos, sin), _rope(k, cos, sin)

    def _mlp(self, i, h, lora):
        m = self.model.blocks[i].mlp
        if self.gate_up[i] is not None:
            g, u = _delta(ops.linear(h, self.gate_up[i]), h, lora, i, ("w1", "w3")).chunk(2, -1)
        else:
            g, u = self._proj(i, m.w1, "w1", h, lora), self._proj(i, m.w3, "w3", h, lora)
        return self._proj(i, m.w2, "w2", F.silu(g) * u, lora)

    def extend(self, slot, ids, all_logits=False):
        """Append ids (T,) to a slot's sequence (a prompt, or tokens to verify) -> logits (T, V) or (V,)
        for the last position. Queries attend causally to the slot's whole cache."""
        return self.forward([(slot, ids)], [all_logits])[0]

    @torch.no_grad()
    def forward(self, segments, all_logits=None):
        """Append several slots' tokens in one pass: segments [(slot, ids)], a slot at most once -> per segment
        logits (T, V) where all_logits[s] is true, else (V,) of its last position. The projections and the MLP
        run once over all rows (one weight pass for prompt chunks of several requests and for the running
        streams' next tokens); attention runs per segment over its slot's cache."""
        H, Hkv, D, W = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim, self.cfg.sliding_window
        all_logits = all_logits or [False] * len(segments)
        spans = []                                                                           # (slot, p0, T, row offset)
        for slot, ids in segments:
            p0 = int(self.lens[slot])
            if p0 + len(ids) > self.max_seq_len:
                raise ValueError(f"sequence of {p0 + len(ids)} tokens exceeds the cache ({self.max_seq_len})")
            spans.append((slot, p0, len(ids), spans[-1][3] + spans[-1][2] if spans else 0))
        N = sum(T for _, _, T, _ in spans)
        pos = torch.cat([torch.arange(p0, p0 + T) for _, p0, T, _ in spans])
        cos, sin = (c[:, None].to(self.dtype) for c in self.model.rope(pos))
        x = self.model.tok_emb(torch.as_tensor([t for _, ids in segments for t in ids], dtype=torch.long))  # (N, d)
        lora = RowAdapters.of([self.slot_adapter[slot] for slot, ids in segments for _ in ids], self.lora_cache)
        chunks = [sp for sp in spans if sp[2] > 1]
        masks = []   # ops.attention's causal mask is bottom-right aligned: queries at p0.. see keys 0..p0+t
        for _, p0, T, _ in chunks:
            mask = None
            if W and p0 + T > W:   # ... and a sliding window only the last W of them
                mask = torch.ones(T, p0 + T, dtype=torch.bool).tril(diagonal=p0)
                mask &= ~torch.ones(T, p0 + T, dtype=torch.bool).tril(diagonal=p0 - W)
            masks.append(mask)
        # single new tokens (the running streams' next ones) attend together: one call over their slots with
        # a mask for their ragged lengths (and windows)
        ones = [sp for sp in spans if sp[2] == 1]
        if ones:
            one_slots, one_rows = torch.tensor([sp[0] for sp in ones]), torch.tensor([sp[3] for sp in ones])
            # the engine's running streams hold slots 0..n-1: a slice of the cache reads them without a copy
            one_load = slice(0, len(ones)) if one_slots.tolist() == list(range(len(ones))) else one_slots
            one_pos = torch.tensor([sp[1] for sp in ones])
            S = int(one_pos.max()) + 1
            keys = torch.arange(S)
            one_mask = keys <= one_pos[:, None]                                              # (n, S)
            if W:
                one_mask &= keys > one_pos[:, None] - W
            one_mask = one_mask[:, None, None]                                               # (n, 1, 1, S)
        for i, blk in enumerate(self.model.blocks):
            q, k, v = self._project_qkv(i, blk.attn_norm(x), lora)
            q, k = self._qk(i, q.view(N, H, D), k.view(N, Hkv, D), cos, sin)                 # (N, H|Hkv, D)
            v = v.view(N, Hkv, D)
            y = torch.empty(N, H * D, dtype=q.dtype)
            for (slot, p0, T, r), mask in zip(chunks, masks):
                self._store(i, slot, slice(p0, p0 + T), k[r:r + T].transpose(0, 1), v[r:r + T].transpose(0, 1))
                kk, vv = self._load(i, slot, p0 + T)                                         # (1, Hkv, S, D)
                qq = q[r:r + T].transpose(0, 1)[None]                                        # (1, H, T, D)
                if mask is None:
                    o = ops.attention(qq.contiguous(), kk.contiguous(), vv.contiguous(), causal=True)
                else:
                    o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=H != Hkv)
                y[r:r + T] = o[0].transpose(0, 1).reshape(T, H * D)
            if ones:
                self._store(i, one_slots, one_pos, k[one_rows], v[one_rows])                 # (n, Hkv, D)
                kk, vv = self._load(i, one_load, S)                                          # (n, Hkv, S, D)
                o = F.scaled_dot_product_attention(q[one_rows][:, :, None], kk, vv, attn_mask=one_mask,
                                                   enable_gqa=H != Hkv)                      # (n, H, 1, D)
                y[one_rows] = o.reshape(len(ones), H * D)
            x = x + self._proj(i, blk.attn.wo, "wo", y, lora)
            x = x + self._mlp(i, blk.mlp_norm(x), lora)
        for slot, p0, T, _ in spans:
            self.lens[slot] = p0 + T
        rows = [torch.arange(r, r + T) if full else torch.tensor([r + T - 1])
                for (_, _, T, r), full in zip(spans, all_logits)]
        logits = _linear(self.model.lm_head, self.model.norm(x[torch.cat(rows)])).float()
        out = list(logits.split([len(r) for r in rows]))
        return [o if full else o[0] for o, full in zip(out, all_logits)]

    @torch.no_grad()
    def decode(self, tokens):
        """One token for each of the active slots 0..n-1: tokens (n,) -> logits (n, V)."""
        H, Hkv, D, W = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim, self.cfg.sliding_window
        n = len(tokens)
        pos = self.lens[:n].clone()                                                          # (n,)
        if int(pos.max()) >= self.max_seq_len:
            raise ValueError(f"KV cache full ({self.max_seq_len} positions)")
        rows = torch.arange(n)
        cos, sin = (c[:, None].to(self.dtype) for c in self.model.rope(pos))
        x = self.model.tok_emb(torch.as_tensor(tokens, dtype=torch.long))                   # (n, d)
        seqlens = (pos + 1).to(torch.int32)
        windowed = W and int(seqlens.max()) > W
        lora = RowAdapters.of(self.slot_adapter[:n], self.lora_cache)
        for i, blk in enumerate(self.model.blocks):
            q, k, v = self._project_qkv(i, blk.attn_norm(x), lora)
            q, k = self._qk(i, q.view(n, H, D), k.view(n, Hkv, D), cos, sin)                 # (n, H|Hkv, D)
            self._store(i, rows, pos, k, v.view(n, Hkv, D))                                  # (n, Hkv, D)
            if windowed:   # past Mistral's window: attend to each slot's last W positions only
                S = int(seqlens.max())
                kk, vv = self._load(i, slice(0, n), S)
                y = window_attention(q[:, :, None], kk, vv, seqlens, W)[:, :, 0]
            elif self.quantized:
                y = ops.decode_attention(q.contiguous(), self.k[i][:n], self.v[i][:n], seqlens,
                                         k_scale=self.k_scale[i][:n], v_scale=self.v_scale[i][:n])
            else:
                y = ops.decode_attention(q.to(self.cache_dtype).contiguous(), self.k[i][:n], self.v[i][:n], seqlens)
            x = x + self._proj(i, blk.attn.wo, "wo", y.to(self.dtype).reshape(n, H * D), lora)
            x = x + self._mlp(i, blk.mlp_norm(x), lora)
        self.lens[:n] += 1
        return _linear(self.model.lm_head, self.model.norm(x)).float()

    def _store(self, i, slot, pos, k, v):
        """Write k/v rows into layer i at [slot, :, pos] (slot/pos: ints, a slice, or index tensors)."""
        if self.quantized:
            (kq, ks), (vq, vs) = ops.quantize_kv(k), ops.quantize_kv(v)
            self.k[i][slot, :, pos], self.k_scale[i][slot, :, pos] = kq, ks
            self.v[i][slot, :, pos], self.v_scale[i][slot, :, pos] = vq, vs
        else:
            self.k[i][slot, :, pos] = k.to(self.cache_dtype)
            self.v[i][slot, :, pos] = v.to(self.cache_dtype)

    def _load(self, i, slot, n):
        """The first n cached positions of a slot (or a slice or index tensor of slots) in the model's dtype -> k, v
        (slots, Hkv, n, D)."""
        rows = slot if isinstance(slot, (slice, torch.Tensor)) else slice(slot, slot + 1)
        k, v = self.k[i][rows, :, :n], self.v[i][rows, :, :n]
        if self.quantized:
            k = k.float() * self.k_scale[i][rows, :, :n, None]
            v = v.float() * self.v_scale[i][rows, :, :n, None]
        return k.to(self.dtype), v.to(self.dtype)

    def move(self, src, dst):
        """Slot dst takes over slot src's sequence (keeps active slots a prefix)."""
        n = int(self.lens[src])
        for i in range(self.cfg.n_layer):
            self.k[i][dst, :, :n] = self.k[i][src, :, :n]
            self.v[i][dst, :, :n] = self.v[i][src, :, :n]
            if self.quantized:
                self.k_scale[i][dst, :, :n] = self.k_scale[i][src, :, :n]
                self.v_scale[i][dst, :, :n] = self.v_scale[i][src, :, :n]
        self.lens[dst] = n
        self.lens[src] = 0
        self.slot_adapter[dst], self.slot_adapter[src] = self.slot_adapter[src], None

    def _caches(self):
        return (self.k, self.v) + ((self.k_scale, self.v_scale) if self.quantized else ())

    def swap(self, a, b):
        """Slots a and b exchange their sequences."""
        n = int(self.lens[[a, b]].max())
        for cache in self._caches():
            for layer in cache:
                layer[[a, b], :, :n] = layer[[b, a], :, :n]
        self.lens[[a, b]] = self.lens[[b, a]]
        self.slot_adapter[a], self.slot_adapter[b] = self.slot_adapter[b], self.slot_adapter[a]

    def read_kv(self, slot, start, end):
        """A copy of a slot's cached positions [start, end) in the cache dtype -> tensors with the position on
        dim 0: k and v (n, L, Hkv, D), and for int8 their scales (n, L, Hkv)."""
        return tuple(torch.stack([layer[slot, :, start:end] for layer in cache]).movedim(2, 0).contiguous()
                     for cache in self._caches())

    def write_kv(self, slot, kv):
        """Fill a slot with the positions 0..n-1 that read_kv returned (its sequence becomes those n)."""
        n = len(kv[0])
        for cache, t in zip(self._caches(), kv):
            for i, layer in enumerate(cache):
                layer[slot, :, :n] = t[:, i].transpose(0, 1)
        self.lens[slot] = n


class Request:
    """One generation: its prompt, parameters, progress, timings and an event callback.
    Events: ("token", text_delta) as text becomes safe to send, then ("done", finish_reason).
    processor: None, or a callable (output_ids, logits (V,)) -> logits (V,) applied before sampling
    (constrained decoding: quark.infer.constrain.Constraint). With params.logprobs, `logprobs` holds one
    (log p, [(id, log p)] top alternatives) per output token, from the model's own log-softmax (before
    any processor or sampling setting); with params.prompt_logprobs, `prompt_logprobs` holds one per
    prompt token after the first. adapter: the name of the LoRA adapter it runs with (Engine.adapters), or
    None for the base model; KV computed for one adapter is never valid for another."""
    _ids = itertools.count()

    def __init__(self, prompt_ids, params, tokenizer, stop_ids, on_event=None, processor=None, adapter=None):
        self.id = next(self._ids)
        self.processor = processor
        self.adapter = adapter
        self.logprobs = [] if params.logprobs is not None else None
        self.prompt_logprobs = None
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_ids = stop_ids
        self.output_ids = []
        self.detok = Detokenizer(tokenizer, params.stop) if tokenizer is not None else None
        self.text = ""
        self.finish_reason = None
        self.stop_token = None     # the stop token id that ended it (not in output_ids)
        self.slot = None           # its KV slot in the engine while admitted
        self.cached_tokens = None  # prompt tokens reused from the prefix cache (None until its prefill starts)
        self.cancelled = False
        self.generator = params.generator()
        self.history = torch.tensor(self.prompt_ids, dtype=torch.long) if params.penalized else None
        self.t_submit = time.perf_counter()
        self.t_first = None
        self.t_tokens = []         # when each token was sampled (inter-token latency, stalls)
        self.t_done = None
        self.done = threading.Event()
        self._on_event = on_event

    def _emit(self, kind, value):
        if self._on_event is not None:
            try:
                self._on_event(kind, value)
            except Exception:   # a broken consumer cancels its own request, never the engine
                self._on_event = None
                self.cancelled = True

    def _accept(self, token, logprob=None):
        """Record a sampled token (and its logprobs entry); returns True when the request is finished."""
        self.t_tokens.append(time.perf_counter())
        if self.t_first is None:
            self.t_first = self.t_tokens[0]
        if token in self.stop_ids:
            self.stop_token = token
            return self._finish("stop")
        self.output_ids.append(token)   # before logprobs: a reader on another thread never sees more entries than ids
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.history is not None:
            self.history = torch.cat([self.history, torch.tensor([token])])
        if self.detok is not None:
            delta = self.detok.add(token)
            if delta:
                self.text += delta
                self._emit("token", delta)
            if self.detok.stopped:
                return self._finish("stop")
        if len(self.output_ids) >= self.params.max_tokens:
            return self._finish("length")
        return False

    def _finish(self, reason):
        if self.detok is not None and not self.detok.stopped:
            tail = self.detok.flush()
            if tail:
                self.text += tail
                self._emit("token", tail)
        self.finish_reason = reason
        self.t_done = time.perf_counter()
        self._emit("done", reason)
        self.done.set()
        return True

    def cancel(self):
        self.cancelled = True

    @property
    def ttft(self):
        return None if self.t_first is None else self.t_first - self.t_submit


class Engine:
    """Continuous-batching generation over one model.

        engine = Engine(model, tokenizer, max_batch=16).start()
        req = engine.submit(ids, SamplingParams(max_tokens=32), on_event=print)
        req.done.wait(); print(req.text)
        engine.shutdown()

    adapters: {name: LoRA adapter directory (Quark or PEFT)} loaded onto the model (quark.infer.lora); a
    request names one (submit(..., adapter=name)) and runs in the same batch as every other.

    Speculative decoding: draft=a model sharing the tokenizer, or prompt_lookup=True; spec_k tokens
    proposed per round. Requests with a processor (constrained decoding) take part without proposals.
    """

    def __init__(self, model, tokenizer=None, max_batch=8, max_queue=64, max_seq_len=None, cache_dtype="fp32",
                 stop_tokens=("<|end|>", "<|eos|>"), stop_ids=None, fuse=True, prefix_cache_mb=256,
                 prefill_chunk=512, adapters=None, draft=None, prompt_lookup=False, spec_k=4,
                 spec_max_batch=SPEC_MAX_BATCH):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        if prefix_cache_mb < 0 or (prefill_chunk is not None and prefill_chunk < 1):
            raise ValueError(f"prefix_cache_mb must be >= 0 and prefill_chunk None or >= 1, got {prefix_cache_mb}, "
                             f"{prefill_chunk}")
        self.runner = Runner(model, max_batch, max_seq_len, cache_dtype, fuse)
        # 0 MB turns the prefix cache off; prefill_chunk=None prefills every admitted prompt whole and alone
        # before the next decode step (the running streams wait for all of them). Smaller chunks bound the
        # streams' stalls tighter but split prompts into more, less efficient forwards.
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb else None
        self.prefill_chunk = prefill_chunk
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_seq_len = self.runner.max_seq_len
        self.speculator = self._speculator(draft, prompt_lookup, spec_k, cache_dtype, fuse)
        self.spec_max_batch = spec_max_batch
        self.spec_proposed = self.spec_accepted = 0   # proposals verified / kept (speculative decoding)
        if stop_ids is None:   # by default the tokenizer's stop tokens (none without a tokenizer)
            stop_ids = [tokenizer.token_to_id(t) for t in stop_tokens] if tokenizer is not None else []
        self.stop_ids = frozenset(i for i in stop_ids if i is not None)
        self.waiting = deque()
        self.active = []           # decoding requests; active[j] owns slot j
        self.prefilling = []       # admitted requests still prefilling, in admission order, each in a slot >= len(active)
        self.cond = threading.Condition()
        self.accepting = True
        self.stopping = False
        self.thread = None
        self.steps = 0             # decode steps run (for tests and metrics)
        self.tokens_generated = 0
        self.adapters = {}
        for name, directory in (adapters or {}).items():
            self.add_adapter(name, directory)

    def add_adapter(self, name, directory):
        """Load the LoRA adapter in directory (checked against the model) under name -> the Adapter."""
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "._-" for c in name):
            raise ValueError(f"adapter name must be a non-empty string of letters, digits, '.', '_' or '-', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already loaded")
        self.adapters[name] = Adapter.load(directory, self.runner.model, name)
        return self.adapters[name]

    def _speculator(self, draft, prompt_lookup, k, cache_dtype, fuse):
        """The proposer of speculative decoding (None: plain decoding)."""
        if draft is None and not prompt_lookup:
            return None
        if draft is not None and prompt_lookup:
            raise ValueError("draft and prompt_lookup exclude each other: speculate with one proposer")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"spec_k (tokens proposed per round) must be an integer >= 1, got {k!r}")
        if prompt_lookup:
            return PromptLookup(k)
        cfg = self.runner.cfg
        if draft.config.vocab_size != cfg.vocab_size:
            raise ValueError(f"the draft's vocab_size ({draft.config.vocab_size}) must equal the model's "
                             f"({cfg.vocab_size}): a draft shares the model's tokenizer")
        if draft.config.max_seq_len < self.max_seq_len:
            raise ValueError(f"the draft's context ({draft.config.max_seq_len}) is shorter than the model's "
                             f"({self.max_seq_len}): pass max_seq_len <= {draft.config.max_seq_len}")
        return DraftModel(Runner(draft, self.max_batch, self.max_seq_len, cache_dtype, fuse), k)

    # ---- client side (any thread) ----
    def _request(self, prompt_ids, params, on_event=None, processor=None, adapter=None):
        params = params or SamplingParams()
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(sorted(self.adapters)) or 'none'})")
        if not prompt_ids:
            raise ValueError("prompt is empty: it must hold at least one token")
        if len(prompt_ids) + params.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.max_seq_len} tokens")
        vocab = self.runner.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        return Request(prompt_ids, params, self.tokenizer, self.stop_ids, on_event, processor, adapter)

    def submit(self, prompt_ids, params=None, on_event=None, processor=None, adapter=None):
        req = self._request(prompt_ids, params, on_event, processor, adapter)
        with self.cond:
            if not self.accepting:
                raise ShuttingDown("the engine is shutting down")
            if len(self.waiting) >= self.max_queue + self._free_slots():
                raise QueueFull(f"too many requests waiting ({len(self.waiting)}); retry later")
            self.waiting.append(req)
            self.cond.notify()
        return req

    def generate(self, prompt_ids, params=None, on_event=None, adapter=None):
        """Submit and wait (starts the loop thread if needed) -> the finished Request."""
        if self.thread is None:
            self.start()
        req = self.submit(prompt_ids, params, on_event, adapter=adapter)
        req.done.wait()
        return req

    def run(self, prompts, params=None, adapters=None):
        """Generate for every prompt on the caller's thread (no loop thread, no queue bound), max_batch at
        a time with continuous batching -> the finished Requests in prompt order. params: one
        SamplingParams for all prompts, or a list with one per prompt (e.g. distinct seeds); adapters
        likewise: one adapter name (or None) for all, or a list with one per prompt."""
        if self.thread is not None:
            raise RuntimeError("run() drives the engine itself; this engine already has its loop thread")
        per_prompt = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        names = adapters if isinstance(adapters, (list, tuple)) else [adapters] * len(prompts)
        if len(names) != len(prompts):
            raise ValueError(f"got {len(names)} adapters for {len(prompts)} prompts")
        reqs = [self._request(p, sp, adapter=a) for p, sp, a in zip(prompts, per_prompt, names)]
        pending = deque(reqs)
        while pending or self.active or self.prefilling:
            admitted = []
            while pending and len(admitted) < self._free_slots():
                admitted.append(pending.popleft())
            self._step(admitted)
        return reqs

    @property
    def queue_depth(self):
        return len(self.waiting)

    @property
    def num_active(self):
        return len(self.active) + len(self.prefilling)

    def _free_slots(self):
        return self.max_batch - len(self.active) - len(self.prefilling)

    def start(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="quark-engine", daemon=True)
            self.thread.start()
        return self

    def shutdown(self, drain=True, timeout=None):
        """Stop accepting; with drain, finish every submitted request first, else cancel them."""
        with self.cond:
            self.accepting = False
            if not drain:
                for r in list(self.waiting) + self.active + self.prefilling:
                    r.cancel()
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    # ---- engine thread ----
    def _loop(self):
        while True:
            with self.cond:
                while not self.waiting and not self.active and not self.prefilling and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.waiting and not self.active and not self.prefilling:
                    return
                admitted = []
                while self.waiting and len(admitted) < self._free_slots():
                    admitted.append(self.waiting.popleft())
            try:
                self._step(admitted)
            except Exception as e:   # the batch's forward failed: fail every request in flight, never hang them
                for r in self.active + self.prefilling + admitted:
                    if r.finish_reason is None:
                        r._finish(f"error: {e}")
                self.active, self.prefilling = [], []
                self.runner.lens.zero_()

    def _step(self, admitted):
        """Admit newcomers, then one forward: the running streams' next tokens together with up to
        prefill_chunk prompt tokens (chunks of one or more admitted prompts), so a long prompt stalls the
        running streams for one chunk at a time, and they ride on the chunk's weight pass. With
        prefill_chunk=None, every admitted prompt is prefilled whole and alone before a decode step."""
        for req in admitted:
            self._admit(req)
        if self.prefill_chunk is None:
            while plan := self._plan(float("inf"), first_only=True):
                (req, start, end), = plan
                try:
                    logits = self.runner.extend(req.slot, req.prompt_ids[start:end], req.params.prompt_logprobs)
                except Exception as e:   # this prompt alone fails; its slot is freed
                    self._drop(req, f"error: {e}")
                    continue
                self._prefilled(req, start, end, logits)
            if self.active and not self._speculate():
                self._decoded(self.runner.decode(self._next_tokens()))
            return
        plan = self._plan(self.prefill_chunk)
        if not plan:
            if self.active and not self._speculate():
                self._decoded(self.runner.decode(self._next_tokens()))
            return
        n = len(self.active)
        out = self.runner.forward([(j, [t]) for j, t in enumerate(self._next_tokens())] +
                                  [(req.slot, req.prompt_ids[a:b]) for req, a, b in plan],
                                  [False] * n + [req.params.prompt_logprobs for req, _, _ in plan])
        if n:
            self._decoded(torch.stack(out[:n]))
        for (req, start, end), logits in zip(plan, out[n:]):
            self._prefilled(req, start, end, logits)

    def _next_tokens(self):
        return [r.output_ids[-1] if r.output_ids else r.prompt_ids[-1] for r in self.active]

    def _decoded(self, logits):
        """Sample the running streams' next tokens from logits (n, V); release the finished ones."""
        self.steps += 1
        greedy = [j for j, r in enumerate(self.active)
                  if r.params.greedy and not r.params.penalized and r.processor is None]
        argmax = logits[greedy].argmax(-1).tolist() if greedy else []
        picks = dict(zip(greedy, argmax))
        finished = []
        for j, req in enumerate(self.active):
            if req.cancelled:
                req._finish("cancelled")
                finished.append(j)
            elif self._sample_and_accept(req, logits[j], picks.get(j)):
                finished.append(j)
        for j in reversed(finished):
            self._release(j)

    def _admit(self, req):
        """Give a newcomer a free slot; its prefill starts when _plan reaches it."""
        if req.cancelled:
            req._finish("cancelled")
            return
        taken = {r.slot for r in self.prefilling}
        req.slot = next(s for s in range(len(self.active), self.max_batch) if s not in taken)
        self.runner.lens[req.slot] = 0
        self.runner.slot_adapter[req.slot] = None if req.adapter is None else self.adapters[req.adapter]
        if req.params.prompt_logprobs:
            req.prompt_logprobs = []
        self.prefilling.append(req)

    def _reuse_prefix(self, req):
        """Fill a request's slot with the longest cached prefix of its prompt, just before its first chunk (so
        it finds what the prompts prefilled before it left there). At least one prompt token is left to
        compute, so its logits exist; prompt_logprobs need every position's logits: those compute it all."""
        req.cached_tokens = 0
        if self.prefix_cache is not None and not req.params.prompt_logprobs:
            req.cached_tokens, kv = self.prefix_cache.lookup(req.prompt_ids, len(req.prompt_ids) - 1,
                                                             _cache_space(req))
            if kv is not None:
                self.runner.write_kv(req.slot, kv)

    def _plan(self, budget, first_only=False):
        """The prompt chunks of the next forward: admitted prompts in admission order, budget tokens in all ->
        [(req, start, end)]. A prompt starting now first takes its cached prefix; one whose first block is
        an earlier prompt's, still prefilling, waits for it to finish and find its blocks cached (concurrent
        requests with one system prompt prefill it once)."""
        plan, firsts = [], set()   # firsts: first blocks of the earlier prompts still prefilling
        B = self.prefix_cache.block_size if self.prefix_cache is not None else 0
        for req in list(self.prefilling):
            if budget <= 0 or (first_only and plan):
                break
            if req.cancelled:
                self._drop(req, "cancelled")
                continue
            first = (_cache_space(req), tuple(req.prompt_ids[:B])) if len(req.prompt_ids) > B > 0 else None
            if req.cached_tokens is None:
                if first is not None and first in firsts:
                    continue
                try:
                    self._reuse_prefix(req)
                except Exception as e:
                    self._drop(req, f"error: {e}")
                    continue
            firsts.add(first)
            start = int(self.runner.lens[req.slot])
            end = min(len(req.prompt_ids), start + budget)
            plan.append((req, start, end))
            budget -= end - start
        return plan

    def _prefilled(self, req, start, end, logits):
        """Positions start..end-1 of a prompt are in its slot (logits: (T, V) with prompt_logprobs, else the
        last position's). A complete prompt keeps its blocks in the prefix cache, samples its first token
        and joins the decoding."""
        if req.params.prompt_logprobs:   # position t predicts prompt token t + 1
            k = req.params.logprobs or 0
            req.prompt_logprobs += [token_logprobs(logits[t - start], req.prompt_ids[t + 1], k)
                                    for t in range(start, min(end, len(req.prompt_ids) - 1))]
            logits = logits[-1]
        if end < len(req.prompt_ids):
            return
        self.prefilling.remove(req)
        if self.prefix_cache is not None:
            self.prefix_cache.insert(req.prompt_ids, lambda a, b, s=req.slot: self.runner.read_kv(s, a, b),
                                     _cache_space(req))
        self._join(req)
        if self._sample_and_accept(req, logits):
            self._release(len(self.active) - 1)

    def _drop(self, req, reason):
        self.prefilling.remove(req)
        self.runner.lens[req.slot] = 0
        req._finish(reason)

    def _join(self, req):
        """A prefilled request moves to slot len(active) (swapping with a prefilling one there) and decodes."""
        n = len(self.active)
        if req.slot != n:
            other = next((r for r in self.prefilling if r.slot == n), None)
            if other is None:
                self.runner.move(req.slot, n)
            else:
                self.runner.swap(req.slot, n)
                other.slot = req.slot
            req.slot = n
        self.active.append(req)

    def _speculate(self):
        """One speculative round for the active slots in place of a decode step: the speculator proposes
        up to spec_k tokens per request, one target pass scores them all, and rejection sampling keeps a
        prefix of them plus one token of the target's own -> False (nothing ran) without a speculator, with
        more than spec_max_batch streams, or when nothing was proposed. Requests with a processor propose
        nothing (their grammar state cannot take back a token)."""
        if self.speculator is None or len(self.active) > self.spec_max_batch:
            return False
        budgets = [0 if r.processor is not None else min(self.speculator.k, r.params.max_tokens - len(r.output_ids) - 1)
                   for r in self.active]
        proposals = self.speculator.propose(self.active, budgets)
        if not any(tokens for tokens, _ in proposals):
            return False
        feeds = [(j, [t] + tokens) for j, (t, (tokens, _)) in enumerate(zip(self._next_tokens(), proposals))]
        rows = self.runner.forward(feeds, [True] * len(feeds))                            # [(1 + k_j, V)]
        self.steps += 1
        finished = []
        for j, (req, (tokens, q), logits) in enumerate(zip(self.active, proposals, rows)):
            if req.cancelled:
                req._finish("cancelled")
                done = True
            else:
                done = self._verify(req, tokens, q, logits)
            # the caches keep all but the last token: past it lie rejected proposals (also for a finished
            # request, whose cached positions the prefix cache takes over)
            n = len(req.prompt_ids) + len(req.output_ids) - 1
            self.runner.lens[j] = n
            self.speculator.truncate(j, n)
            if done:
                finished.append(j)
        for j in reversed(finished):
            self._release(j)
        return True

    def _verify(self, req, tokens, q, logits):
        """Accept req's proposals while rejection sampling keeps them, then one more token: the
        correction at the first rejection, or from the last row when all were kept -> True when done."""
        try:
            for i, t in enumerate(tokens):
                p = probs(logits[i], req.params, req.history)
                kept, token = verify_token(t, p, None if q is None else q[i], req.params.greedy, req.generator)
                self.spec_proposed += 1
                self.spec_accepted += kept
                if self._sample_and_accept(req, logits[i], token):
                    return True
                if not kept:
                    return False
        except Exception as e:   # this request alone fails, as in _sample_and_accept
            if req.finish_reason is None:
                req._finish(f"error: {e}")
            return True
        return self._sample_and_accept(req, logits[len(tokens)])

    def _sample_and_accept(self, req, logits, token=None):
        """Sample (unless the batched argmax already picked token) and record -> True when req is done.
        A failure here is this request's alone: it finishes with an error, the batch goes on."""
        try:
            if token is None:
                allowed = logits if req.processor is None else req.processor(req.output_ids, logits)
                token = sample(allowed, req.params, req.history, req.generator)
            entry = token_logprobs(logits, token, req.params.logprobs) if req.logprobs is not None else None
            self.tokens_generated += 1
            return req._accept(token, entry)
        except Exception as e:
            if req.finish_reason is None:
                req._finish(f"error: {e}")
            return True

    def _release(self, slot):
        """Free a slot; the last active request moves into it so active slots stay a prefix. The prefix cache
        keeps the finished sequence's blocks, reply included: a conversation's next turn resends it."""
        if self.prefix_cache is not None:
            req, n = self.active[slot], int(self.runner.lens[slot])
            self.prefix_cache.insert((req.prompt_ids + req.output_ids)[:n],   # the tokens fed so far
                                     lambda a, b: self.runner.read_kv(slot, a, b), _cache_space(req))
        last = len(self.active) - 1
        if slot != last:
            self.runner.move(last, slot)
            self.active[slot] = self.active[last]
        self.runner.lens[last] = 0
        self.active.pop()


def _cache_space(req):
    """The prefix cache's key space of a request: KV computed with one LoRA adapter (or none) is not another's."""
    return b"" if req.adapter is None else f"adapter:{req.adapter}".encode()


def load_for_serving(path):
    """A run directory or a model directory -> (model, tokenizer, model_dir, run_dir or None).
    The run's latest model (RunDir.model("latest")) is served; the tokenizer is the model
    directory's tokenizer.json, else the run's."""
    from tokenizers import Tokenizer

    from quark.model.io import load_model
    from quark.rundir import RunDir
    run, model_dir = RunDir.locate(path)
    if run is not None:
        tokenizer = run.tokenizer(model_dir)
    elif (model_dir / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    else:
        raise FileNotFoundError(f"no tokenizer found (looked for {model_dir / 'tokenizer.json'})")
    return load_model(model_dir), tokenizer, model_dir, run.root if run is not None else None
