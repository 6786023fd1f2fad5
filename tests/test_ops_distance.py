"""quark.ops.pairwise_distance against a float64 reference, on every ISA path, plus the boundary."""
import numpy as np
import pytest
import torch

import quark
from quark.ops import pairwise_distance, reference
from tests.conftest import SUPPORTED_ISAS

SHAPES = [(1, 1, 1), (3, 5, 7), (9, 33, 17), (17, 65, 128), (70, 300, 96), (5, 257, 384), (2, 40, 3)]


def ref64(x, y, metric):
    return reference.pairwise_distance(x.astype(np.float64), y.astype(np.float64), metric)


def tolerance(x, y, metric):
    # fp32 accumulation over d terms: error ~ eps * d * |x||y| (l2 adds the norms).
    xn = np.linalg.norm(x.astype(np.float64), axis=1)[:, None]
    yn = np.linalg.norm(y.astype(np.float64), axis=1)[None, :]
    scale = {"l2": xn ** 2 + yn ** 2, "ip": xn * yn, "cosine": np.ones_like(xn * yn)}[metric]
    return 1e-5 * np.sqrt(x.shape[1]) * scale + 1e-6


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("nq,nb,d", SHAPES)
def test_matches_float64_reference(isa, metric, nq, nb, d):
    rng = np.random.default_rng(nq * 1000 + nb + d)
    x = rng.standard_normal((nq, d)).astype(np.float32)
    y = rng.standard_normal((nb, d)).astype(np.float32)
    out = pairwise_distance(x, y, metric)
    assert out.shape == (nq, nb) and out.dtype == np.float32
    assert np.all(np.abs(out - ref64(x, y, metric)) <= tolerance(x, y, metric))


def test_paths_really_differ_and_agree():
    """The scalar path computes the direct formula, SIMD paths the GEMM decomposition: both close."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 64)).astype(np.float32)
    y = rng.standard_normal((300, 64)).astype(np.float32)
    outs = {}
    for name in [n for n in SUPPORTED_ISAS if n in ("scalar", "avx2", "avx512")]:
        with quark.isa(name):
            outs[name] = pairwise_distance(x, y)
            assert quark.info()["kernel_paths"]["distance"] == name
    for o in outs.values():
        np.testing.assert_allclose(o, outs["scalar"], rtol=1e-4, atol=1e-3)


def test_torch_in_torch_out_zero_copy_inputs():
    x = torch.randn(7, 20)
    y = torch.randn(11, 20)
    out = pairwise_distance(x, y, "ip")
    assert isinstance(out, torch.Tensor) and out.shape == (7, 11)
    torch.testing.assert_close(out, -(x @ y.T), rtol=1e-5, atol=1e-5)


def test_zero_vector_cosine_is_one_and_l2_nonnegative():
    x = np.zeros((2, 8), np.float32)
    y = np.ones((3, 8), np.float32)
    assert np.all(pairwise_distance(x, y, "cosine") == 1.0)
    same = np.full((4, 16), 3.3, np.float32)
    assert np.all(pairwise_distance(same, same, "l2") >= 0)


def test_empty_inputs_give_empty_outputs():
    assert pairwise_distance(np.zeros((0, 4), np.float32), np.ones((3, 4), np.float32)).shape == (0, 3)
    assert pairwise_distance(np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32)).shape == (2, 0)


@pytest.mark.parametrize("bad,match,exc", [
    (np.ones((3, 4), np.float64), "x must have dtype float32", TypeError),
    (np.ones((3, 4), np.int32), "x must have dtype float32", TypeError),
    (np.ones(4, np.float32), "x must be 2-D", ValueError),
    (np.ones((4, 6), np.float32)[:, ::2], "x must be C-contiguous", ValueError),
    (np.ones((3, 5), np.float32), "same dim", ValueError),
    ([[1.0, 2.0]], "x must be a numpy array or torch tensor", TypeError),
])
def test_bad_arguments_raise_naming_the_argument(bad, match, exc):
    with pytest.raises(exc, match=match):
        pairwise_distance(bad, np.ones((2, 4), np.float32))


def test_bad_metric_and_mixed_kinds():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="metric must be one of"):
        pairwise_distance(x, x, "hamming")
    with pytest.raises(TypeError, match="must both be numpy arrays or both torch tensors"):
        pairwise_distance(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        pairwise_distance(torch.ones(4, 2).T, torch.ones(3, 4))


def test_extension_refuses_silent_conversion():
    """Direct callers of quark._C get a TypeError, never a silent float64->float32 copy."""
    out = np.empty((2, 2), np.float32)
    with pytest.raises(TypeError):
        quark._C.pairwise_distance(np.ones((2, 3)), np.ones((2, 3), np.float32), out, "l2")
    with pytest.raises(TypeError):
        quark._C.pairwise_distance(np.ones((3, 2), np.float32).T, np.ones((2, 3), np.float32), out, "l2")
    with pytest.raises(ValueError, match="same dim"):
        quark._C.pairwise_distance(np.ones((2, 3), np.float32), np.ones((2, 4), np.float32), out, "l2")


def test_meta_device_uses_reference():
    x = torch.randn(3, 4, device="meta")
    out = pairwise_distance(x, torch.randn(5, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 5)
