"""Quantized linear: quark.ops.qlinear (int4 / int8 weight-only, W8A8) vs torch F.linear in fp32 and
bf16 and torch.ao dynamic int8 quantization (quantize_dynamic), same run, interleaved; and the dense
GEMVs of quark.ops.linear (fp32 and bf16, decode rows M <= MAX_ROWS) against the same torch rows.

Each provider cycles through copies of its weights (distinct memory, at least 8, enough to span 1.5x
the last-level cache: this Xeon reports 480 MiB of L3) so every call streams its weights from DRAM,
as a decode step through all layers does, and reads each copy once before the timed rounds.
M=1 rows report GB/s of weight bytes actually read (packed data + scales + zero points for ours) and
the fraction of the machine's measured read bandwidth; M > 4 rows report GFLOP/s (2 M N K). 11008x4096
also runs decode batches, M = 5, 8, 16 and 32.
`python -m benchmarks --only quant` (add --quick for one shape); pytest-benchmark view:
`pytest benchmarks/bench_quant.py --benchmark-only`.
"""
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.harness import copies_beyond_llc, interleaved, measure_read_bandwidth, summarize
from quark.ops import QuantizedTensor, linear, qlinear, quantize
from quark.ops.linear import MAX_ROWS


def _copies(make):
    first = make()
    nbytes = first.nbytes if isinstance(first, QuantizedTensor) else first.numel() * first.element_size()
    return [first] + [_clone(first) for _ in range(copies_beyond_llc(nbytes) - 1)]


def _clone(obj):
    if isinstance(obj, QuantizedTensor):
        zeros = None if obj.zeros is None else obj.zeros.clone()
        return QuantizedTensor(obj.scheme, obj.shape, obj.data.clone(), obj.scales.clone(), zeros, obj.group_size)
    return obj.clone()


def _rotating(fn, items, start=0):
    it = itertools.islice(itertools.cycle(items), start, None)

    def call():
        return fn(next(it))
    call.copies = len(items)
    return call


def _touch_every_copy(calls):
    """One pass of each provider over all its copies before timing. On this VM memory left untouched
    for seconds reads slower on its next pass (a GEMV over weights idle 10 s: 1.62 ms, then 1.07 ms), and
    building the later providers' copies takes that long: without this pass the providers with the
    most copies (int4 g128: 31) spent half their timed calls on that first pass. A decode loop reads
    every layer each token, so its weights are never idle that long."""
    for call in calls:
        for _ in range(call.copies):
            call()


def _dynamic_int8(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    try:
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    except (RuntimeError, AttributeError):   # builds without a quantized engine: no peer for this row
        return None


def case(N, K, Ms, quick=False):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen) * 0.02
    ws = _copies(lambda: w)
    wb = _copies(lambda: w.bfloat16())
    q4 = _copies(lambda: quantize(w, "int4", 32))
    q4g128 = _copies(lambda: quantize(w, "int4", 128))
    q8 = _copies(lambda: quantize(w, "int8"))
    qw8a8 = [QuantizedTensor("w8a8", q.shape, q.data, q.scales) for q in q8]   # same bytes as int8
    dyn = _dynamic_int8(w)
    dyns = [dyn] + [_dynamic_int8(w) for _ in range(len(q8) - 1)] if dyn is not None else None   # int8 bytes
    rows = []
    for M in Ms:
        x = torch.randn(M, K, generator=gen)
        xb = x.bfloat16()
        providers = {
            "quark int4 g32": (_rotating(lambda q: qlinear(x, q), q4), q4[0].nbytes),
            "quark int4 g128": (_rotating(lambda q: qlinear(x, q), q4g128), q4g128[0].nbytes),
            "quark int8": (_rotating(lambda q: qlinear(x, q), q8), q8[0].nbytes),
            # these two read the same copies as int8 / int4 g32: half a cycle apart, so neither finds
            # the other's last copy still in the LLC
            "quark w8a8": (_rotating(lambda q: qlinear(x, q), qw8a8, len(qw8a8) // 2), qw8a8[0].nbytes),
            "quark int4 g32 bf16x": (_rotating(lambda q: qlinear(xb, q), q4, len(q4) // 2), q4[0].nbytes),
            "torch fp32": (_rotating(lambda t: F.linear(x, t), ws), N * K * 4),
            "torch bf16": (_rotating(lambda t: F.linear(xb, t), wb), N * K * 2),
        }
        if M <= MAX_ROWS:   # (beyond it quark.ops.linear is F.linear) half a cycle from torch's copies, as above
            providers["quark fp32 gemv"] = (_rotating(lambda t: linear(x, t), ws, len(ws) // 2), N * K * 4)
            providers["quark bf16 gemv"] = (_rotating(lambda t: linear(xb, t), wb, len(wb) // 2), N * K * 2)
        if dyns is not None:
            providers["torch.ao dynamic int8"] = (_rotating(lambda m: m(x), dyns), N * K + N * 4)
        with torch.no_grad():
            repeats = (5 if quick else 15) if M <= 32 else (2 if quick else 5)
            _touch_every_copy(v[0] for v in providers.values())
            times = interleaved({k: v[0] for k, v in providers.items()}, repeats=repeats, warmup=1,
                                min_time=0.0 if quick else (1.0 if M == 1 else 0.0))
        label = f"M={M} N={N} K={K}"
        for name, (_, nbytes) in providers.items():
            if M <= 4:
                rows += summarize("quant", label, {name: times[name]}, work=nbytes, unit="GB/s")
            else:
                rows += summarize("quant", label, {name: times[name]}, work=2.0 * M * N * K, unit="GFLOP/s")
    return rows


def compare(quick=False):
    bw = measure_read_bandwidth()
    # decode batches (M = 5-32) on one shape: where the GEMV passes and the GEMMs take over
    shapes = [(4096, 4096, (1, 256))] if quick else [(4096, 4096, (1, 256)), (11008, 4096, (1, 5, 8, 16, 32, 256)),
                                                      (4096, 11008, (1, 256))]
    rows = []
    for N, K, Ms in shapes:
        rows += case(N, K, Ms, quick)
    for r in rows:
        r.extra["read_bw_GBs"] = round(bw, 1)
        if r.unit == "GB/s":
            r.extra["of_read_bw"] = round(r.rate / bw, 3)
    print(f"measured read bandwidth: {bw:.1f} GB/s")
    return rows


def _qt(scheme):
    return quantize(torch.randn(4096, 4096) * 0.02, scheme, 32)


def test_quark_int4_gemv(benchmark):
    qt, x = _qt("int4"), torch.randn(1, 4096)
    benchmark(qlinear, x, qt)


def test_quark_int8_gemv(benchmark):
    qt, x = _qt("int8"), torch.randn(1, 4096)
    benchmark(qlinear, x, qt)


def test_torch_fp32_gemv(benchmark):
    w, x = torch.randn(4096, 4096), torch.randn(1, 4096)
    benchmark(F.linear, x, w)


def test_quark_w8a8_gemm(benchmark):
    qt, x = _qt("w8a8"), torch.randn(256, 4096)
    benchmark(qlinear, x, qt)
