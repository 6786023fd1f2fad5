"""GPU kernels (Triton and CUDA C++) vs torch on the same device, interleaved in one run:
attention vs torch SDPA with the flash backend, decode attention vs SDPA, int4/int8 GEMV and GEMM vs
a torch bf16 matmul, RMSNorm / SwiGLU / RoPE vs the torch reference ops, fused linear cross-entropy
vs logits + F.cross_entropy (time and peak memory), distances + top-k vs matmul + torch.topk.

Rates are printed against this device's measured peaks (rows `peak bf16 matmul` and
`peak copy bandwidth`): causal attention counts the visible half, 2*B*H*S^2*D FLOPs forward and 3.5x
that forward+backward; memory-bound kernels count the bytes they must read and write once.
Each timed call runs the op `inner` times and synchronises, so launch latency is amortised.

Targets (issue 12, H100/H200): attention forward >= 0.9x SDPA flash, int4 GEMV >= 3x bf16 GEMV at
batch 1, fused cross-entropy peak memory <= 0.2x unfused. On a machine without CUDA compare() prints
that it skipped and returns [].
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import Result, interleaved, summarize

AREA = "gpu"


def _cuda():
    return torch.cuda.is_available()


def _timed(fn, inner):
    def run():
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
    return run


def _bench(rows, case, providers, work, unit, inner, repeats, extra=None):
    """Interleave providers {name: fn}; per-call medians (the timed call runs fn `inner` times)."""
    times = interleaved({name: _timed(fn, inner) for name, fn in providers.items()}, repeats=repeats, warmup=2)
    times = {name: [t / inner for t in ts] for name, ts in times.items()}
    rows += summarize(AREA, case, times, work=work, unit=unit, extra=extra)


def _peaks(rows, quick):
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    _bench(rows, f"peak bf16 matmul {n}^3", {"torch matmul": lambda: a @ a}, 2.0 * n ** 3, "GFLOP/s", 5, 5)
    buf = torch.empty(1 << 28, device="cuda", dtype=torch.float32)                      # 1 GiB
    dst = torch.empty_like(buf)
    _bench(rows, "peak copy bandwidth (1 GiB, read+write)", {"torch copy_": lambda: dst.copy_(buf)},
           2.0 * buf.numel() * 4, "GB/s", 5, 5)


def _attention(rows, B, Hq, Hkv, S, D, repeats):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from quark.ops import attention
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)   # flash SDPA wants equal heads

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    ref = sdpa()
    err = (attention(q, k, v).float() - ref.float()).abs().max().item()
    flops = 2.0 * B * Hq * S * S * D
    _bench(rows, f"attention bf16 causal fwd ({B},{Hq}/{Hkv},{S},{D})",
           {"quark triton": lambda: attention(q, k, v), "torch sdpa flash": sdpa}, flops, "GFLOP/s", 3, repeats,
           {"max_abs_err_vs_sdpa": err})
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    qr, krg, vrg = (t.detach().requires_grad_() for t in (q, kr, vr))
    dout = torch.randn_like(q)

    def train_ours():
        attention(qg, kg, vg).backward(dout)

    def train_sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(qr, krg, vrg, is_causal=True).backward(dout)
    _bench(rows, f"attention bf16 causal fwd+bwd ({B},{Hq}/{Hkv},{S},{D})",
           {"quark triton": train_ours, "torch sdpa flash": train_sdpa}, 3.5 * flops, "GFLOP/s", 2, repeats)


def _decode(rows, B, Hq, Hkv, S, D, repeats):
    from quark.ops import cuda as quark_cuda
    from quark.ops import decode_attention, quantize_kv
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kc, vc = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    lens = torch.full((B,), S, device="cuda", dtype=torch.int64)
    kr, vr = kc.repeat_interleave(Hq // Hkv, 1), vc.repeat_interleave(Hq // Hkv, 1)
    providers = {"quark triton": lambda: decode_attention(q, kc, vc, lens),
                 "torch sdpa (repeated kv)": lambda: F.scaled_dot_product_attention(q[:, :, None], kr, vr)}
    if quark_cuda.available():
        providers["quark cuda c++"] = lambda: quark_cuda.decode_attention(q, kc, vc, lens)
    _bench(rows, f"decode bf16 cache ({B},{Hq}/{Hkv},{S},{D})", providers, 2.0 * kc.numel() * 2, "GB/s", 10, repeats)
    (kq, ks), (vq, vs) = quantize_kv(kc), quantize_kv(vc)
    _bench(rows, f"decode int8 cache ({B},{Hq}/{Hkv},{S},{D})",
           {"quark triton int8": lambda: decode_attention(q, kq, vq, lens, k_scale=ks, v_scale=vs)},
           2.0 * (kq.numel() + ks.numel() * 4), "GB/s", 10, repeats)


def _qmatmul(rows, N, K, repeats):
    from quark.ops import cuda as quark_cuda
    from quark.ops import qlinear, quantize
    w = torch.randn(N, K) / K ** 0.5
    q4 = quantize(w, scheme="int4", group_size=128).to("cuda")
    q8 = quantize(w, scheme="int8").to("cuda")
    wb = w.to("cuda", torch.bfloat16)
    for M in (1, 4096):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        providers = {"quark triton int4": lambda: qlinear(x, q4), "quark triton int8": lambda: qlinear(x, q8),
                     "torch bf16 matmul": lambda: x @ wb.T}
        if M == 1 and quark_cuda.available():
            providers["quark cuda c++ int4"] = lambda: quark_cuda.int4_gemv(x, q4)
        if M == 1:   # memory-bound: GB/s of the bf16 weight each provider replaces (same work for all)
            _bench(rows, f"GEMV x(1,{K}) W({N},{K}) [GB/s = bf16 weight bytes]", providers, 2.0 * N * K, "GB/s",
                   50, repeats, {"int4_bytes": q4.nbytes, "int8_bytes": q8.nbytes, "bf16_bytes": 2 * N * K})
        else:
            _bench(rows, f"GEMM x({M},{K}) W({N},{K})", providers, 2.0 * M * N * K, "GFLOP/s", 5, repeats)


def _rowops(rows, repeats):
    from quark.model.gpt import rope_cache
    from quark.ops import reference
    from quark.ops.triton.rmsnorm import rmsnorm
    from quark.ops.triton.rope import rope
    from quark.ops.triton.swiglu import swiglu
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    _bench(rows, "rmsnorm fwd (16384, 4096) bf16", {"quark triton": lambda: rmsnorm(x, w),
                                                    "torch reference": lambda: reference.rmsnorm(x, w)},
           2.0 * x.numel() * 2, "GB/s", 10, repeats)
    a, b = torch.randn_like(x), torch.randn_like(x)
    _bench(rows, "swiglu fwd (16384, 4096) bf16", {"quark triton": lambda: swiglu(a, b),
                                                   "torch F.silu(a) * b": lambda: F.silu(a) * b},
           3.0 * a.numel() * 2, "GB/s", 10, repeats)
    t = torch.randn(8, 32, 2048, 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = (c.cuda() for c in rope_cache(2048, 128, 10000.0))
    _bench(rows, "rope (8, 32, 2048, 128) bf16", {"quark triton": lambda: rope(t, cos, sin),
                                                  "torch reference": lambda: reference.rope(t, cos, sin)},
           2.0 * t.numel() * 2, "GB/s", 10, repeats)


def _peak_memory(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _cross_entropy(rows, N, C, V, repeats):
    from quark.ops.triton.fused_linear_cross_entropy import fused_linear_cross_entropy
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, C, device="cuda") / C ** 0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")

    def ours():
        x.grad = w.grad = None
        fused_linear_cross_entropy(x, w, t).backward()

    def unfused():
        x.grad = w.grad = None
        F.cross_entropy((x @ w.T).float(), t).backward()
    mem = {"quark fused": _peak_memory(ours), "torch logits + F.cross_entropy": _peak_memory(unfused)}
    ratio = mem["quark fused"] / mem["torch logits + F.cross_entropy"]
    flops = 3 * 2.0 * N * C * V
    _bench(rows, f"linear+cross-entropy fwd+bwd N={N} C={C} V={V}",
           {"quark fused": ours, "torch logits + F.cross_entropy": unfused}, flops, "GFLOP/s", 1, repeats,
           {"peak_bytes": mem, "peak_memory_ratio": ratio})


def _topk(rows, repeats):
    from quark.ops import pairwise_distance
    from quark.ops.triton.distance import pairwise_topk
    xq = torch.randn(1024, 128, device="cuda")
    yb = torch.randn(1_000_000, 128, device="cuda")
    flops = 2.0 * xq.shape[0] * yb.shape[0] * xq.shape[1]
    _bench(rows, "top-10 l2, 1024 queries x 1M x 128 fp32",
           {"quark triton fused top-k": lambda: pairwise_topk(xq, yb, 10),
            "quark distances + torch.topk": lambda: torch.topk(pairwise_distance(xq, yb), 10, largest=False),
            "torch cdist + torch.topk": lambda: torch.topk(torch.cdist(xq, yb), 10, largest=False)},
           flops, "GFLOP/s", 1, repeats)


def compare(quick=False):
    if not _cuda():
        print("bench_gpu: no CUDA device, skipped (nothing timed)")
        return []
    rows = []
    reps = 5 if quick else 10
    _peaks(rows, quick)
    _attention(rows, 2 if quick else 4, 32, 8, 2048 if quick else 4096, 128, reps)
    _decode(rows, 8, 32, 8, 4096 if quick else 8192, 128, reps)
    _qmatmul(rows, 4096 if quick else 14336, 4096, reps)
    _rowops(rows, reps)
    _cross_entropy(rows, 2048 if quick else 8192, 4096, 32000 if quick else 128256, reps)
    _topk(rows, reps)
    for r in rows:
        if r.extra:
            print(f"{r.case} [{r.provider}]: {r.extra}")
    return rows


needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")


@needs_cuda
def test_quark_attention_fwd(benchmark):
    from quark.ops import attention
    q, k, v = (torch.randn(1, 16, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    benchmark(_timed(lambda: attention(q, k, v), 1))


@needs_cuda
def test_torch_sdpa_attention_fwd(benchmark):
    q, k, v = (torch.randn(1, 16, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    benchmark(_timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 1))


@needs_cuda
def test_quark_int4_gemv(benchmark):
    from quark.ops import qlinear, quantize
    qt = quantize(torch.randn(4096, 4096), scheme="int4", group_size=128).to("cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    benchmark(_timed(lambda: qlinear(x, qt), 1))


def test_compare_skips_without_cuda():
    if _cuda():
        pytest.skip("a CUDA device is present; compare() times for real")
    assert compare(quick=True) == []
