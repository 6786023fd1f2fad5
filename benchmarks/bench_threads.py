"""Kernels under a noisy neighbour: the slowdown factor (median time while another process spins on
one of the benchmark's cores / median time quiet) of Quark's decode kernels against torch's
equivalent ops, same run.

The process and all its threads are pinned to the first `threads` cores it may use, and a spinner
process to the last of them, so the scheduler cannot move the kernels' threads off the busy core: a
thread there gets about half of it. The spinner is stopped (SIGSTOP) for the quiet rounds and
continued (SIGCONT) for the busy ones; rounds alternate quiet / busy, calls within a round interleave
the providers, and each factor compares medians over all rounds. Operands are a single layer's and
stay in the caches: the factor measures scheduling (who waits for the descheduled thread), not DRAM.
Ops: decode attention over a bf16 cache (torch: SDPA with GQA), an int4 g32 GEMV at M = 1 with bf16
activations (torch: _weight_int4pack_mm_for_cpu) and an fp32 GEMV at M = 1 (torch: F.linear).
`python -m benchmarks --only threads` (add --quick for small shapes and few rounds), or
`python -m benchmarks.bench_threads [--quick] [--threads N]`.
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import quark
from benchmarks.harness import interleaved, summarize
from quark.ops import decode_attention, linear, qlinear, quantize


def _decode_case(B, Hq, Hkv, S, D):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, D, generator=g).bfloat16()
    k = torch.randn(B, Hkv, S, D, generator=g).bfloat16()
    v = torch.randn(B, Hkv, S, D, generator=g).bfloat16()
    lengths = torch.full((B,), S, dtype=torch.int64)
    q4 = q[:, :, None]   # SDPA wants (B, Hq, 1, D)
    return f"decode attention bf16 B={B} Hq={Hq} Hkv={Hkv} S={S} D={D}", {
        "quark": lambda: decode_attention(q, k, v, lengths),
        "torch sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True),
    }


def _int4_case(N, K, G=32):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(1, K, generator=g).bfloat16()
    qt = quantize(w, "int4", G)
    # torch's CPU int4 format from the same integer weights (its zero point is folded into an offset)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    scales_zeros = torch.randn(K // G, N, 2, generator=g).bfloat16()
    return f"qlinear int4 g{G} M=1 N={N} K={K} bf16 x", {
        "quark": lambda: qlinear(x, qt),
        "torch int4pack_mm": lambda: torch._weight_int4pack_mm_for_cpu(x, packed, G, scales_zeros),
    }


def _fp32_case(N, K):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(1, K, generator=g)
    return f"gemv fp32 M=1 N={N} K={K}", {
        "quark": lambda: linear(x, w),
        "torch F.linear": lambda: F.linear(x, w),
    }


def _pin_all_threads(cores):
    """Pin every thread of this process (the kernels' pools included) to cores; returns the old masks."""
    old = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            old[int(tid)] = os.sched_getaffinity(int(tid))
            os.sched_setaffinity(int(tid), cores)
        except OSError:   # a thread that ended meanwhile
            pass
    return old


def _restore(old):
    for tid, mask in old.items():
        try:
            os.sched_setaffinity(tid, mask)
        except OSError:
            pass


def compare(quick=False):
    threads = quark.num_threads()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    cores = sorted(os.sched_getaffinity(0))[:threads]
    busy_core = cores[-1]
    cases = ([_decode_case(1, 16, 4, 512, 128), _int4_case(2048, 2048), _fp32_case(1024, 2048)] if quick else
             [_decode_case(1, 32, 8, 2048, 128), _int4_case(4096, 4096), _fp32_case(4096, 4096)])
    rounds, repeats = (2, 5) if quick else (10, 20)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    old = None
    try:
        os.sched_setaffinity(spinner.pid, {busy_core})
        os.kill(spinner.pid, signal.SIGSTOP)
        with torch.no_grad():
            for _, providers in cases:   # start every pool before pinning, so its threads are pinned too
                interleaved(providers, repeats=1, warmup=1)
            old = _pin_all_threads(set(cores))
            times = {(label, state): {name: [] for name in providers} for label, providers in cases
                     for state in ("quiet", "busy")}
            for _ in range(rounds):
                for state in ("quiet", "busy"):
                    os.kill(spinner.pid, signal.SIGCONT if state == "busy" else signal.SIGSTOP)
                    time.sleep(0.05)   # let the scheduler settle into the new state
                    for label, providers in cases:
                        for name, ts in interleaved(providers, repeats=repeats, warmup=1).items():
                            times[(label, state)][name] += ts
    finally:
        spinner.kill()
        spinner.wait()
        if old:
            _restore(old)
        torch.set_num_threads(torch_threads)

    rows = []
    print(f"threads: {threads} on cores {cores}, spinner on core {busy_core}; {rounds} rounds x {repeats} calls per state")
    print(f"{'op':<52} {'provider':<18} {'quiet ms':>9} {'busy ms':>9} {'slowdown':>9}")
    for label, providers in cases:
        factors = {}
        for name in providers:
            quiet = statistics.median(times[(label, "quiet")][name])
            busy = statistics.median(times[(label, "busy")][name])
            factors[name] = busy / quiet
            print(f"{label:<52} {name:<18} {quiet * 1e3:>9.3f} {busy * 1e3:>9.3f} {busy / quiet:>8.2f}x")
            for state in ("quiet", "busy"):
                rows += summarize("threads", f"{label} {state}", {name: times[(label, state)][name]},
                                  unit="", extra={"slowdown": round(busy / quiet, 3), "threads": threads})
        peer = next(n for n in providers if n != "quark")
        print(f"{'':<52} {'torch / quark slowdown':<38} {factors[peer] / factors['quark']:>8.2f}x")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes and few rounds (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="threads for Quark and torch (default: Quark's)")
    args = p.parse_args(argv)
    if args.threads:
        quark.set_num_threads(args.threads)
    compare(quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
