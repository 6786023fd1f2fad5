"""Attention: quark.ops.attention / decode_attention vs torch.nn.functional.scaled_dot_product_attention
(torch's own CPU flash-attention kernel), interleaved in one run.

Work: causal prefill counts the visible half of the two GEMMs, 2*B*H*S^2*D FLOPs; forward+backward
counts 3.5x that (backward recomputes S and runs five GEMMs). Decode is memory-bound: GB/s counts the
cache bytes read (K and V, plus int8 scales; every provider cycles through copies of its caches that
span 1.5x the LLC, so the reads come from DRAM), and the table row `read bandwidth` is this machine's
sustained read rate measured in the same run (benchmarks.harness.measure_read_bandwidth).

compare() is the same-run comparison behind `python -m benchmarks --only attention`; the test_*
functions are the pytest-benchmark view (`pytest benchmarks/bench_attention.py --benchmark-only`).
"""
import itertools

import torch
import torch.nn.functional as F

from benchmarks.harness import Result, copies_beyond_llc, interleaved, measure_read_bandwidth, summarize
from quark.ops import attention, decode_attention, quantize_kv


def make_qkv(B, H, S, D, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def _prefill(rows, B, H, S, D, dtype, repeats):
    q, k, v = make_qkv(B, H, S, D, dtype)
    times = interleaved({
        "quark": lambda: attention(q, k, v, causal=True),
        "torch sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }, repeats=repeats, warmup=1)
    name = str(dtype).replace("torch.", "")
    rows += summarize("attention", f"{name} causal fwd ({B},{H},{S},{D})", times, work=2.0 * B * H * S * S * D)


def _train(rows, B, H, S, D, repeats):
    q, k, v = make_qkv(B, H, S, D, requires_grad=True)
    dout = torch.randn(B, H, S, D)

    def step(fn):
        q.grad = k.grad = v.grad = None
        fn().backward(dout)

    times = interleaved({
        "quark": lambda: step(lambda: attention(q, k, v, causal=True)),
        "torch sdpa": lambda: step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }, repeats=repeats, warmup=1)
    rows += summarize("attention", f"fp32 causal fwd+bwd ({B},{H},{S},{D})", times, work=3.5 * 2.0 * B * H * S * S * D)


def _decode(rows, B, H, S, D, repeats):
    # Each provider cycles through copies of its caches spanning 1.5x the LLC, so every call streams
    # the cache from DRAM, as decoding through all layers does (one layer's cache alone may fit in L3).
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g)
    kc, vc = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    (kq, ks), (vq, vs) = quantize_kv(kc), quantize_kv(vc)
    kb, vb, qb = kc.bfloat16(), vc.bfloat16(), q.bfloat16()
    lengths = torch.full((B,), S, dtype=torch.int64)
    q4, qb4 = q[:, :, None], qb[:, :, None]                     # SDPA wants (B, H, 1, D)
    fp32_bytes = 2.0 * kc.numel() * 4
    int8_bytes = 2.0 * kq.numel() + 2.0 * ks.numel() * 4        # bytes the int8 kernel reads
    fp32 = _rotation((kc, vc), fp32_bytes)
    int8 = _rotation((kq, ks, vq, vs), int8_bytes)
    bf16 = _rotation((kb, vb), fp32_bytes / 2)
    case = f"decode ({B},{H},{S},{D})"
    times = interleaved({
        "quark fp32 cache": lambda: decode_attention(q, *next(fp32), lengths),
        "torch sdpa fp32": lambda: F.scaled_dot_product_attention(q4, *next(fp32)),
    }, repeats=repeats, warmup=2)
    rows += summarize("attention", case + " fp32", times, work=fp32_bytes, unit="GB/s")

    def quark_int8():
        k, k_scale, v, v_scale = next(int8)
        return decode_attention(q, k, v, lengths, k_scale=k_scale, v_scale=v_scale)

    times = interleaved({
        "quark int8 cache": quark_int8,
        "torch sdpa fp32": lambda: F.scaled_dot_product_attention(q4, *next(fp32)),
    }, repeats=repeats, warmup=2)
    int8_rows = summarize("attention", case + " int8 vs fp32", times, work=fp32_bytes, unit="GB/s")
    int8_rows[0].work = int8_bytes
    rows += int8_rows
    times = interleaved({
        "quark bf16 cache": lambda: decode_attention(qb, *next(bf16), lengths),
        "torch sdpa bf16": lambda: F.scaled_dot_product_attention(qb4, *next(bf16)),
    }, repeats=repeats, warmup=2)
    rows += summarize("attention", case + " bf16", times, work=fp32_bytes / 2, unit="GB/s")


def _rotation(tensors, nbytes):
    """Endless cycle over distinct copies of tensors, enough copies to span 1.5x the LLC."""
    n = copies_beyond_llc(nbytes, minimum=2)
    return itertools.cycle([tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)])


def compare(quick=False):
    rows = []
    reps = 3 if quick else 7
    prefill = [(1, 8, 512, 64)] if quick else [(1, 16, 1024, 64), (1, 32, 2048, 128)]
    for shape in prefill:
        _prefill(rows, *shape, torch.float32, reps)
    _train(rows, *((1, 8, 512, 64) if quick else (1, 16, 1024, 64)), reps)
    for shape in prefill:
        _prefill(rows, *shape, torch.bfloat16, reps)
    for shape in ([(1, 32, 1024, 128)] if quick else [(1, 32, 4096, 128), (8, 32, 1024, 128)]):
        _decode(rows, *shape, 5 * reps)
    bw = measure_read_bandwidth(nbytes=(1 << 28) if quick else None)
    rows.append(Result("attention", "read bandwidth (buf.sum, all threads)", "machine", 1.0, 1.0, 1.0, bw * 1e9, "GB/s"))
    return rows


def test_quark_causal_fwd(benchmark):
    q, k, v = make_qkv(1, 8, 512, 64)
    benchmark(attention, q, k, v)


def test_torch_sdpa_causal_fwd(benchmark):
    q, k, v = make_qkv(1, 8, 512, 64)
    benchmark(F.scaled_dot_product_attention, q, k, v, is_causal=True)


def test_quark_decode(benchmark):
    q = torch.randn(1, 32, 128)
    kc, vc = torch.randn(1, 32, 1024, 128), torch.randn(1, 32, 1024, 128)
    benchmark(decode_attention, q, kc, vc, torch.tensor([1024]))
