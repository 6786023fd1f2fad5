"""Triton int4/int8 dequantizing matmul (GEMV for M <= 4, GEMM above) on the CPU under
TRITON_INTERPRET=1, on weights made by quark.ops.quantize (the quantization engineer's packed
formats), against quark.ops.reference.qlinear (x @ dequantize(W)^T in fp32)."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: kernels run on CPU tensors

import pytest
import torch

pytest.importorskip("triton")
from quark.ops import quantize, reference  # noqa: E402
from quark.ops.triton.qmatmul import qmatmul  # noqa: E402


def run(x, qt, bias=None):
    return qmatmul(x, "int4" if qt.scheme == "int4" else "int8", qt.data, qt.scales, qt.zeros,
                   qt.group_size, bias)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("M", [1, 3, 9, 70])
@pytest.mark.parametrize("scheme,G,K", [("int4", 32, 160), ("int4", 128, 256), ("int8", None, 100)])
def test_fp32_matches_dequantized_reference(M, scheme, G, K):
    g = torch.Generator().manual_seed(M + K)
    w = torch.randn(50, K, generator=g)
    qt = quantize(w, scheme=scheme, group_size=G or 32)
    x = torch.randn(M, K, generator=g)
    bias = torch.randn(50, generator=g)
    out = run(x, qt, bias)
    ref = reference.qlinear(x.double(), qt, bias.double())
    assert out.shape == (M, 50) and out.dtype == torch.float32
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("M", [2, 20])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_bf16_activations(M, scheme):
    g = torch.Generator().manual_seed(M)
    qt = quantize(torch.randn(40, 128, generator=g), scheme=scheme, group_size=64)
    x = torch.randn(2, M, 128, generator=g).bfloat16()                  # leading dims are flattened
    out = run(x, qt)
    ref = reference.qlinear(x.double(), qt)
    assert out.shape == (2, M, 40) and out.dtype == torch.bfloat16
    assert rel(out, ref) < 2e-2                                          # bf16 weights tile + bf16 output


def test_shape_errors():
    qt = quantize(torch.randn(8, 64), scheme="int4", group_size=32)
    with pytest.raises(ValueError, match="K=64"):
        run(torch.randn(1, 32), qt)
    with pytest.raises(ValueError, match="scheme"):
        qmatmul(torch.randn(1, 64), "int2", qt.data, qt.scales)
