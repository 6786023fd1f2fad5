"""Triton flash attention (quark.ops.triton.attention) on the CPU under TRITON_INTERPRET=1, forward and
backward against the float64 oracle quark.ops.reference.attention at small odd shapes: causal or not,
GQA/MQA, Sq < Sk (cached prefix), Sq > Sk (rows that see nothing), head_dim not a power of two.
Low precision: our error is at most a few times torch's own error in the same dtype (the
flash-attention test rule)."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: kernels run on CPU tensors

import pytest
import torch

pytest.importorskip("triton")
from quark.ops import reference  # noqa: E402
from quark.ops.triton.attention import attention  # noqa: E402


def make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, s, D, generator=g).to(dtype) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk))]


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


SHAPES = [  # B, Hq, Hkv, Sq, Sk, D
    (1, 2, 2, 1, 1, 16),
    (2, 4, 2, 37, 37, 40),       # GQA, D not a power of two, ragged blocks
    (1, 3, 1, 20, 150, 32),      # MQA, Sq < Sk: continue a cached prefix across several key blocks
    (1, 2, 1, 150, 70, 64),      # Sq > Sk: the first 80 causal rows see no key
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_forward_backward_match_float64(shape, causal):
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k, v = make_qkv(*shape, torch.float32, seed=Sq + D)
    dout = torch.randn(B, Hq, Sq, D, generator=torch.Generator().manual_seed(1))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = attention(qs, ks, vs, causal=causal, scale=0.3)
    out.backward(dout)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(qd, kd, vd, causal=causal, scale=0.3)
    ref.backward(dout.double())
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert max_err(out, ref) < 1e-5
    for ours, theirs in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert ours.shape == theirs.shape and torch.isfinite(ours).all()
        assert max_err(ours, theirs) < 1e-4 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_low_precision_error_within_torch_error(shape, dtype):
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k, v = make_qkv(*shape, dtype, seed=7)
    dout = torch.randn(B, Hq, Sq, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = attention(qs, ks, vs, causal=True)
    out.backward(dout)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(qd, kd, vd, causal=True)
    ref.backward(dout.double())
    ql, kl, vl = (t.clone().float().requires_grad_() for t in (q, k, v))   # torch in the low dtype's rounding
    low = reference.attention(ql.to(dtype), kl.to(dtype), vl.to(dtype), causal=True)
    low.backward(dout)
    assert out.dtype == dtype
    assert max_err(out, ref) <= 3 * max_err(low, ref) + 1e-3
    for ours, theirs, torch_low in ((qs.grad, qd.grad, ql.grad), (ks.grad, kd.grad, kl.grad), (vs.grad, vd.grad, vl.grad)):
        assert max_err(ours, theirs) <= 3 * max_err(torch_low, theirs) + 1e-2


def test_fully_masked_rows_get_zero_output_and_gradient():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 10, 4, 16, torch.float32, seed=3))
    out = attention(q, k, v, causal=True)
    out.sum().backward()
    assert torch.all(out[:, :, :6] == 0) and torch.all(q.grad[:, :, :6] == 0)
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_non_contiguous_heads_layout():
    # (B, S, H, D) storage viewed as (B, H, S, D): the kernels take strides, only the last dim must be dense.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 33, 4, 32, generator=g).transpose(1, 2) for _ in range(3))
    out = attention(q, k, v, causal=True)
    assert max_err(out, reference.attention(q.double(), k.double(), v.double())) < 1e-5


def test_rejects_cpu_tensors_outside_the_interpreter_and_bad_dtype():
    q = torch.zeros(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        attention(q, q, q)
