"""Pairwise distance: quark.ops.pairwise_distance vs torch.cdist and numpy/BLAS (x @ y.T + norms).

compare() is the same-run comparison behind `python -m benchmarks`; the test_* functions are the
pytest-benchmark view (`pytest benchmarks/bench_distance.py --benchmark-only`).
"""
import numpy as np
import torch

from benchmarks.harness import interleaved, summarize
from quark.ops import pairwise_distance


def _numpy_l2(x, y, yn):
    return np.maximum((x * x).sum(1)[:, None] + yn[None, :] - 2.0 * (x @ y.T), 0.0)


def make_case(nq, nb, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((nq, d), dtype=np.float32), rng.standard_normal((nb, d), dtype=np.float32)


def compare(quick=False):
    shapes = [(256, 20_000, 128)] if quick else [(1000, 100_000, 128), (1000, 50_000, 384), (64, 200_000, 96)]
    rows = []
    for nq, nb, d in shapes:
        x, y = make_case(nq, nb, d)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        yn = (y * y).sum(1)
        providers = {
            "quark": lambda: pairwise_distance(x, y, "l2"),
            "torch.cdist": lambda: torch.cdist(xt, yt),
            "numpy (BLAS)": lambda: _numpy_l2(x, y, yn),
        }
        times = interleaved(providers, repeats=3 if quick else 7, warmup=1)
        rows += summarize("distance", f"l2 nq={nq} nb={nb} d={d}", times, work=2.0 * nq * nb * d)
    return rows


def test_quark_l2(benchmark):
    x, y = make_case(256, 20_000, 128)
    benchmark(pairwise_distance, x, y, "l2")


def test_torch_cdist(benchmark):
    x, y = make_case(256, 20_000, 128)
    benchmark(torch.cdist, torch.from_numpy(x), torch.from_numpy(y))
