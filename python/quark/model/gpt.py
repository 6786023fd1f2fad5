"""Llama-style decoder: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP,
optional tied embeddings. Generation, with its KV cache, is quark.infer's engine.
The options of the Hugging Face Llama family (GPTConfig: biases, Qwen3's q/k norms, Mistral's sliding
window, rope scaling) follow transformers' definitions, so a checkpoint loaded by quark.model.hf gives
transformers' logits.

References: nanoGPT / gpt-fast model.py; Llama (Touvron et al. 2023); RoFormer (Su et al. 2021);
GQA (Ainslie et al. 2023); SwiGLU (Shazeer 2020).
Attention runs through quark.ops.attention (C++ on CPU, Triton on CUDA, SDPA elsewhere).
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


def rope_inv_freq(head_dim, theta, scaling=None, seq_len=0):
    """(D/2,) inverse frequencies, with transformers' rope scaling (modeling_rope_utils): "linear"
    divides them by factor; "llama3" divides the low ones by factor and interpolates the middle band;
    "dynamic" (NTK) raises theta once the sequence (seq_len = last position + 1) outgrows the original
    context, computed in float32 tensors as transformers does."""
    kind = (scaling or {}).get("rope_type")
    if kind == "dynamic" and seq_len > scaling["original_max_position_embeddings"]:
        factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
        theta = theta * ((factor * torch.tensor(seq_len) / orig) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / high) * ~(wavelen > orig / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cache(seq_len, head_dim, theta, device=None, scaling=None):
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)                               # (D/2,)
    t = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(t, inv_freq)                                                            # (S, D/2)
    return torch.cos(freqs), torch.sin(freqs)


def apply_rope(x, cos, sin):
    """x (B, H, S, D); cos/sin (S, D/2) or (B, 1, S, D/2). Rotates interleaved halves (x1, x2)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def window_attention(q, k, v, lengths, window):
    """Causal attention that sees only the last `window` keys up to each query (transformers' sliding
    window: key j is visible from query i when i - window < j <= i). q (B, H, T, D) holds the last T of
    lengths[b] positions; k/v (B, Hkv, S, D) with S >= max(lengths)."""
    T, S = q.shape[2], k.shape[2]
    qpos = lengths.to(q.device).long()[:, None] - T + torch.arange(T, device=q.device)   # (B, T)
    kpos = torch.arange(S, device=q.device)
    mask = (kpos <= qpos[..., None]) & (kpos > qpos[..., None] - window)                  # (B, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        H, Hkv, D, W = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim, self.cfg.sliding_window
        q = self.wq(x).view(B, T, H, D)
        k = self.wk(x).view(B, T, Hkv, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)          # (B, H, T, D), (B, Hkv, T, D)
        v = self.wv(x).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if W and T > W:
            y = window_attention(q, k, v, torch.full((B,), T), W)
        else:
            y = ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return F.dropout(self.wo(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.mlp_bias)   # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.mlp_bias)   # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.mlp_bias)   # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
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
        self.init_rope()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():   # GPT-2 scaled init of the residual projections
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def init_rope(self, device=None):
        """(Re)compute the rotary tables, e.g. after the weights were loaded onto a model built on "meta"."""
        cfg = self.config
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, device, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)   # (Smax, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)

    def rope(self, pos):
        """cos, sin (..., D/2) at positions pos (T,) or (B, T); "dynamic" rope scaling recomputes the
        frequencies for the longest sequence of the call once it outgrows the original context. (A
        transformers model also keeps the frequencies of the longest call it has seen until a call fits
        the original context again; here each call stands alone, which is what a fresh model computes.)"""
        seq_len = int(pos.max()) + 1
        if seq_len > self.rope_cos.shape[0]:
            raise ValueError(f"position {seq_len - 1} exceeds max_seq_len {self.config.max_seq_len}")
        scaling = self.config.rope_scaling
        if scaling and scaling["rope_type"] == "dynamic" and seq_len > scaling["original_max_position_embeddings"]:
            inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, scaling, seq_len)
            freqs = pos[..., None].float() * inv_freq.to(pos.device)
            return torch.cos(freqs), torch.sin(freqs)
        return self.rope_cos[pos], self.rope_sin[pos]

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    def hidden_states(self, idx):
        """idx (B, T) int64 -> final normed hidden states (B, T, d_model)."""
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope(torch.arange(T, device=idx.device))                                # (T, D/2)
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def forward(self, idx, targets=None, ignore_index=-100):
        """idx (B, T) -> logits (B, T, V); with targets (B, T) also the mean cross-entropy loss."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
        return logits, loss
