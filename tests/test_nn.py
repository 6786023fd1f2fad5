"""quark.nn.QuantLinear: drop-in for nn.Linear at inference."""
import pytest
import torch
import torch.nn as nn

from quark.nn import QuantLinear
from quark.ops import dequantize, quantize


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_matches_linear_with_dequantized_weight(scheme, bias):
    torch.manual_seed(0)
    lin = nn.Linear(128, 40, bias=bias)
    q = QuantLinear.from_linear(lin, scheme, 32)
    ref = nn.Linear(128, 40, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(dequantize(q.qweight))
        if bias:
            ref.bias.copy_(lin.bias)
    for shape in [(1, 128), (3, 7, 128), (64, 128)]:
        x = torch.randn(shape)
        if scheme == "w8a8":   # activations are quantized too: close to the float layer, not exact
            assert torch.allclose(q(x), ref(x), rtol=0, atol=0.05 * float(ref(x).abs().max()))
        else:
            assert torch.allclose(q(x), ref(x), rtol=1e-5, atol=1e-5)
    assert "scheme=" + scheme in repr(q)


def test_close_to_the_float_layer():
    torch.manual_seed(1)
    lin = nn.Linear(256, 64)
    x = torch.randn(8, 256)
    with torch.no_grad():
        y = lin(x)
    for scheme, tol in (("int8", 0.02), ("int4", 0.12), ("w8a8", 0.03)):
        err = float((QuantLinear.from_linear(lin, scheme)(x) - y).norm() / y.norm())
        assert err < tol, (scheme, err)


def test_state_dict_roundtrip_and_dtype_casts_keep_scale_dtypes():
    torch.manual_seed(2)
    q = QuantLinear.from_linear(nn.Linear(64, 16), "int4", 32)
    assert set(q.state_dict()) == {"data", "scales", "zeros", "bias"}
    x = torch.randn(2, 64)
    y = q(x)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):   # int4 scales are bf16, int8's fp32
        q8 = QuantLinear.from_linear(nn.Linear(64, 16), "int8").to(dtype)
        assert q8.scales.dtype == torch.float32 and q8.bias.dtype == torch.float32 and q8.data.dtype == torch.int8
        q16 = q.to(dtype)
        assert q16.scales.dtype == torch.bfloat16 and q16.bias.dtype == torch.float32 and q16.data.dtype == torch.uint8
    yb = q16(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), y, rtol=2e-2, atol=2e-2)
    clone = QuantLinear(quantize(torch.randn(16, 64), "int4", 32), torch.zeros(16))
    clone.load_state_dict(q.state_dict())
    assert torch.equal(clone(x), y)


def test_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="bias must have shape"):
        QuantLinear(quantize(torch.randn(8, 32), "int8"), torch.zeros(3))
    q = QuantLinear.from_linear(nn.Linear(32, 8), "int8")
    with pytest.raises(ValueError, match="last dimension K=32"):
        q(torch.randn(2, 31))


@torch.no_grad()
def test_qweight_checked_once_and_follows_its_buffers():
    torch.manual_seed(3)
    q = QuantLinear.from_linear(nn.Linear(64, 16), "int4", 32)
    x = torch.randn(2, 64)
    assert q.qweight is q.qweight                      # not rebuilt (and re-checked) per forward
    other = QuantLinear.from_linear(nn.Linear(64, 16), "int4", 32)
    q.load_state_dict(other.state_dict())              # copied in place: the cached view sees the new values
    assert torch.equal(q(x), other(x))
    q.scales = other.scales * 2                        # a new tensor: rebuilt, and checked again
    assert q.qweight.scales is q.scales
    q.scales = torch.full_like(q.scales, float("nan"))
    with pytest.raises(ValueError, match="inf or NaN"):
        q(x)
