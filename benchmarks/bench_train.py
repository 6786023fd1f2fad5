"""Training throughput: one full step (forward, backward, AdamW) of a ~10M-parameter Llama-style model
("small" preset: 6 layers, d_model 384, GQA 6/2 heads, vocab 8192), tokens/s and MFU.

Providers, interleaved in the same run, each on its own copy of the same weights:
  quark fp32             quark.model.GPT: attention through quark.ops.attention (C++ flash-style
                         forward/backward kernels), updated by the training loop's optimizer (fused AdamW)
  torch fp32 (SDPA)      the same architecture written in plain torch (nn.Linear, F.scaled_dot_product_attention,
                         nn.RMSNorm), torch.optim.AdamW with its defaults (foreach)
  quark bf16 autocast    the trainer's precision="bfloat16": bf16 matmuls (AVX512-BF16) with fp32 master
                         weights, and the C++ bf16 attention kernel
  torch bf16 autocast    the plain torch model under the same autocast (SDPA in bf16)
Before timing, the plain torch model is checked to give our logits (same function, same weights).
MFU = achieved FLOP/s (GPTConfig.flops_per_token) / the measured matmul peak of this process in
that dtype (quark.train.precision.measure_peak_flops).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.harness import interleaved, summarize
from quark.model import GPT, preset
from quark.model.gpt import apply_rope, rope_cache
from quark.train.precision import measure_peak_flops
from quark.train.loop import LoopSettings, make_optimizer


class TorchBlock(nn.Module):
    """One decoder block in plain torch, parameter names as quark.model.GPT (so weights load 1:1)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.mlp_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.attn = nn.ModuleDict({"wq": nn.Linear(d, cfg.n_head * hd, bias=False),
                                   "wk": nn.Linear(d, cfg.n_kv_head * hd, bias=False),
                                   "wv": nn.Linear(d, cfg.n_kv_head * hd, bias=False),
                                   "wo": nn.Linear(cfg.n_head * hd, d, bias=False)})
        self.mlp = nn.ModuleDict({"w1": nn.Linear(d, cfg.ffn_hidden, bias=False),
                                  "w3": nn.Linear(d, cfg.ffn_hidden, bias=False),
                                  "w2": nn.Linear(cfg.ffn_hidden, d, bias=False)})

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        H, Hkv, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        h = self.attn_norm(x)
        q = self.attn["wq"](h).view(B, T, H, D).transpose(1, 2)       # (B, H, T, D)
        k = self.attn["wk"](h).view(B, T, Hkv, D).transpose(1, 2)     # (B, Hkv, T, D)
        v = self.attn["wv"](h).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
        x = x + self.attn["wo"](y.transpose(1, 2).reshape(B, T, H * D))
        h = self.mlp_norm(x)
        return x + self.mlp["w2"](F.silu(self.mlp["w1"](h)) * self.mlp["w3"](h))


class TorchGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(TorchBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, self.rope_cos[:T], self.rope_sin[:T])
        logits = self.lm_head(self.norm(x))
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def make_models(cfg, seed=0):
    torch.manual_seed(seed)
    ours = GPT(cfg)
    plain = TorchGPT(cfg)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def check_same_function(ours, plain, cfg):
    x = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        a, b = ours(x, x)[0], plain(x, x)[0]
    err = float((a - b).abs().max())
    if err > 1e-3:
        raise AssertionError(f"plain torch model disagrees with quark.model.GPT: max |logit diff| {err}")
    return err


def make_step(model, batch, bf16, quark_optimizer):
    """One optimizer step on a fixed batch (the data loader is not what is measured). Quark's path uses
    the training loop's optimizer (fused AdamW, no decay on norms); the peer torch's default AdamW."""
    if quark_optimizer:
        opt = make_optimizer(model, LoopSettings(steps=1, lr=1e-4, min_lr=1e-5, weight_decay=0.1))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    x, y = batch

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def compare(quick=False):
    B, T = (2, 128) if quick else (8, 256)
    cfg = preset("small", max_seq_len=T)
    ours, plain = make_models(cfg)
    err = check_same_function(ours, plain, cfg)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    batch = (idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    providers = {
        "quark fp32": make_step(ours, batch, False, True),
        "torch fp32 (SDPA)": make_step(plain, batch, False, False),
        "quark bf16 autocast": make_step(copy.deepcopy(ours), batch, True, True),
        "torch bf16 autocast": make_step(copy.deepcopy(plain), batch, True, False),
    }
    times = interleaved(providers, repeats=2 if quick else 5, warmup=1)
    tokens = B * T
    flops = cfg.flops_per_token(T) * tokens
    peak = {"fp32": measure_peak_flops(dtype=torch.float32), "bf16": measure_peak_flops(dtype=torch.bfloat16)}
    rows = []
    for name, ts in times.items():
        row = summarize("train", f"step small {cfg.num_params() / 1e6:.1f}M B={B} T={T}", {name: ts}, work=flops)[0]
        dtype = "bf16" if "bf16" in name else "fp32"
        row.extra = {"tokens_per_s": round(tokens / row.median_s, 1), "mfu": round(row.rate * 1e9 / peak[dtype], 4),
                     "peak_gflops": round(peak[dtype] / 1e9, 1), "max_logit_diff_vs_torch": err}
        rows.append(row)
    for r in rows:
        print(f"  {r.provider:<22} {r.extra['tokens_per_s']:>9,.0f} tokens/s  MFU {r.extra['mfu']:.1%} "
              f"(of {r.extra['peak_gflops']} GFLOP/s measured {('bf16' if 'bf16' in r.provider else 'fp32')} peak)")
    return rows


def _bench_step(benchmark, which, bf16):
    cfg = preset("small", max_seq_len=128)
    ours, plain = make_models(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 129))
    benchmark(make_step(ours if which == "quark" else plain, (idx[:, :-1], idx[:, 1:]), bf16, which == "quark"))


def test_quark_train_step(benchmark):
    _bench_step(benchmark, "quark", False)


def test_torch_train_step(benchmark):
    _bench_step(benchmark, "torch", False)
