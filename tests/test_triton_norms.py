"""Triton RMSNorm, RoPE and SwiGLU (quark.ops.triton.{rmsnorm,rope,swiglu}) on the CPU under
TRITON_INTERPRET=1: forward and backward against the oracles in quark.ops.reference (autograd
through them in float64), odd sizes, fp32 and bf16."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: kernels run on CPU tensors

import pytest
import torch

pytest.importorskip("triton")
from quark.model.gpt import apply_rope, rope_cache  # noqa: E402
from quark.ops import reference  # noqa: E402
from quark.ops.triton.rmsnorm import rmsnorm  # noqa: E402
from quark.ops.triton.rope import rope  # noqa: E402
from quark.ops.triton.swiglu import swiglu  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def grads_vs_reference(ours_fn, ref_fn, inputs, dout):
    """Run both with autograd (the reference in float64) and return [(ours, ref)] for outputs and grads."""
    mine = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    wide = [t.double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    y = ours_fn(*mine)
    y.backward(dout)
    r = ref_fn(*wide)
    r.backward(dout.double())
    return [(y, r)] + [(a.grad, b.grad) for a, b in zip(mine, wide) if a.requires_grad]


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 130), (1, 1)])
def test_rmsnorm_forward_backward(shape, dtype):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(*shape, generator=g).to(dtype)
    pairs = grads_vs_reference(lambda a, b: rmsnorm(a, b, 1e-5), lambda a, b: reference.rmsnorm(a, b, 1e-5), [x, w], dy)
    assert pairs[0][0].dtype == dtype
    for ours, ref in pairs:
        assert rel(ours, ref) < TOL[dtype]


def test_rmsnorm_rejects_wrong_weight():
    with pytest.raises(ValueError, match="weight must have shape"):
        rmsnorm(torch.randn(2, 8), torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,S,D", [(2, 3, 19, 40), (1, 2, 1, 16)])
def test_rope_matches_model_and_inverts(B, H, S, D, dtype):
    g = torch.Generator().manual_seed(S)
    x = torch.randn(B, H, S, D, generator=g).to(dtype)
    cos, sin = rope_cache(S, D, 10000.0)
    dy = torch.randn(B, H, S, D, generator=g).to(dtype)
    pairs = grads_vs_reference(lambda a: rope(a, cos, sin), lambda a: reference.rope(a, cos, sin), [x], dy)
    for ours, ref in pairs:
        assert rel(ours, ref) < TOL[dtype]
    if dtype == torch.float32:
        assert rel(rope(x, cos, sin), apply_rope(x.double(), cos, sin)) < 1e-6    # the model's own layout


def test_rope_per_sequence_positions():
    # Decode with ragged lengths: each sequence has its own position -> cos/sin (B, 1, S, D/2).
    cos_all, sin_all = rope_cache(64, 32, 10000.0)
    pos = torch.tensor([[5], [63], [0]])                           # (B, S=1)
    cos, sin = cos_all[pos][:, None], sin_all[pos][:, None]        # (B, 1, 1, 16)
    x = torch.randn(3, 4, 1, 32)
    assert rel(rope(x, cos, sin), apply_rope(x.double(), cos.double(), sin.double())) < 1e-6
    with pytest.raises(ValueError, match="cos and sin"):
        rope(x, cos_all, sin_all)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 45), (2049,)])
def test_swiglu_forward_backward(shape, dtype):
    g = torch.Generator().manual_seed(1)
    a, b, dy = (torch.randn(*shape, generator=g).mul(3).to(dtype) for _ in range(3))
    pairs = grads_vs_reference(swiglu, reference.swiglu, [a, b], dy)
    for ours, ref in pairs:
        assert ours.shape == ref.shape and rel(ours, ref) < TOL[dtype]
