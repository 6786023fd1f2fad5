"""Triton pairwise distances and fused top-k on the CPU under TRITON_INTERPRET=1 against
quark.ops.reference.pairwise_distance (float64) and torch.topk over it: every metric, odd sizes,
zero vectors for cosine, several splits of the base set."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: kernels run on CPU tensors

import pytest
import torch

pytest.importorskip("triton")
from quark.ops import reference  # noqa: E402
from quark.ops.triton.distance import pairwise_distance, pairwise_topk  # noqa: E402


def data(nq, nb, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(nq, d, generator=g), torch.randn(nb, d, generator=g)
    x[0] = 0                                                     # a zero vector: cosine distance 1
    return x, y


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("nq,nb,d", [(5, 70, 3), (67, 130, 100)])
def test_distances_match_float64(metric, nq, nb, d):
    x, y = data(nq, nb, d, seed=d)
    out = pairwise_distance(x, y, metric)
    ref = reference.pairwise_distance(x.double(), y.double(), metric)
    assert out.shape == (nq, nb) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("k,splits", [(1, 1), (5, 3), (10, None)])
def test_topk_matches_sorted_reference(metric, k, splits):
    x, y = data(40, 300, 24, seed=k)
    dist, ids = pairwise_topk(x, y, k, metric, num_splits=splits)
    ref = reference.pairwise_distance(x.double(), y.double(), metric)
    ref_d, _ = torch.topk(ref, k, dim=1, largest=False)
    assert dist.shape == ids.shape == (40, k) and ids.dtype == torch.int64
    assert (dist.double() - ref_d).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    # The ids point at base vectors whose true distance is the returned one (ties may swap ids).
    assert (torch.gather(ref, 1, ids) - ref_d).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    assert torch.all(dist[:, 1:] >= dist[:, :-1])


def test_errors_name_the_problem():
    x, y = data(3, 10, 4)
    with pytest.raises(ValueError, match="k must be"):
        pairwise_topk(x, y, 11)
    with pytest.raises(ValueError, match="metric"):
        pairwise_distance(x, y, "hamming")
    with pytest.raises(ValueError, match="agree on d"):
        pairwise_distance(x, y[:, :3])
