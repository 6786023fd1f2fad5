"""Llama-style decoder: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP,
optional tied embeddings, and a KV cache for generation.

References: nanoGPT / gpt-fast model.py; Llama (Touvron et al. 2023); RoFormer (Su et al. 2021);
GQA (Ainslie et al. 2023); SwiGLU (Shazeer 2020).
Attention runs through quark.ops.attention (C++ on CPU, Triton on CUDA, SDPA elsewhere), and decode
steps through quark.ops.decode_attention over the cache.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from quark import ops
from quark.model.config import GPTConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cache(seq_len, head_dim, theta, device=None):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)   # (D/2,)
    t = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(t, inv_freq)                                                            # (S, D/2)
    return torch.cos(freqs), torch.sin(freqs)


def apply_rope(x, cos, sin):
    """x (B, H, S, D); cos/sin (S, D/2) or (B, 1, S, D/2). Rotates interleaved halves (x1, x2)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Preallocated per-layer caches (B, Hkv, Smax, D) and per-sequence lengths (B,)."""

    def __init__(self, config: GPTConfig, batch_size, max_seq_len=None, dtype=torch.float32, device=None):
        self.max_seq_len = max_seq_len or config.max_seq_len
        shape = (batch_size, config.n_kv_head, self.max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)

    def append(self, layer, k, v):
        """k/v (B, Hkv, T, D) at positions seqlens[b] .. seqlens[b]+T (same T for every sequence)."""
        T = k.shape[2]
        if int(self.seqlens.max()) + T > self.max_seq_len:
            raise ValueError(f"KV cache full: {int(self.seqlens.max())} + {T} > max_seq_len {self.max_seq_len}")
        for b in range(k.shape[0]):
            s = int(self.seqlens[b])
            self.k[layer][b, :, s:s + T] = k[b]
            self.v[layer][b, :, s:s + T] = v[b]

    def advance(self, n):
        self.seqlens += n


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        H, Hkv, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q = self.wq(x).view(B, T, H, D).transpose(1, 2)      # (B, H, T, D)
        k = self.wk(x).view(B, T, Hkv, D).transpose(1, 2)    # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
        else:
            cache.append(layer, k, v)
            if T == 1:
                lens = cache.seqlens + 1
                y = ops.decode_attention(q[:, :, 0].contiguous(), cache.k[layer], cache.v[layer], lens)[:, :, None]
            else:  # prefill into a cache: all sequences share the same start position; causal
                s0 = int(cache.seqlens[0])   # masking aligns the last query with the last key
                kk, vv = cache.k[layer][:, :, : s0 + T], cache.v[layer][:, :, : s0 + T]
                y = ops.attention(q.contiguous(), kk.contiguous(), vv.contiguous(), causal=True)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return F.dropout(self.wo(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)   # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)   # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)   # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)   # (Smax, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():   # GPT-2 scaled init of the residual projections
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    def hidden_states(self, idx, cache=None):
        """idx (B, T) int64 -> final normed hidden states (B, T, d_model)."""
        B, T = idx.shape
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            pos = cache.seqlens.long()[:, None] + torch.arange(T, device=idx.device)[None, :]   # (B, T)
            if int(pos.max()) >= self.rope_cos.shape[0]:
                raise ValueError(f"position {int(pos.max())} exceeds max_seq_len {self.config.max_seq_len}")
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]                  # (B, 1, T, D/2)
        x = self.tok_emb(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def forward(self, idx, targets=None, cache=None, ignore_index=-100):
        """idx (B, T) -> logits (B, T, V); with targets (B, T) also the mean cross-entropy loss."""
        logits = self.lm_head(self.hidden_states(idx, cache))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, generator=None):
        """Simple batched generation with a KV cache (the serving engine has the full sampler)."""
        self.eval()
        B, T = idx.shape
        cache = KVCache(self.config, B, min(self.config.max_seq_len, T + max_new_tokens),
                        dtype=self.tok_emb.weight.dtype, device=idx.device)
        logits, _ = self(idx, cache=cache)
        out = [idx]
        for _ in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature <= 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k:
                    kth = torch.topk(last, min(top_k, last.size(-1))).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=generator)
            out.append(nxt)
            if int(cache.seqlens.max()) >= cache.max_seq_len:
                break
            logits, _ = self(nxt, cache=cache)
        return torch.cat(out, dim=1)
