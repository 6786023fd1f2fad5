"""Triton fused linear + cross-entropy on the CPU under TRITON_INTERPRET=1 against
quark.ops.reference.fused_linear_cross_entropy (float64 autograd): several token chunks, ignore_index,
mean and sum, bias, bf16, and the backward scaling by the incoming gradient."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: kernels run on CPU tensors

import pytest
import torch

pytest.importorskip("triton")
from quark.ops import reference  # noqa: E402
from quark.ops.triton.fused_linear_cross_entropy import _chunk_rows, fused_linear_cross_entropy  # noqa: E402


def make(N, C, V, dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(dtype)
    w = (torch.randn(V, C, generator=g) / C ** 0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    return x, w, t, b


def run_both(x, w, t, b, grad_scale=1.0, **kw):
    ours_in = [None if a is None else a.clone().requires_grad_() for a in (x, w, b)]
    ref_in = [None if a is None else a.double().requires_grad_() for a in (x, w, b)]
    loss = fused_linear_cross_entropy(ours_in[0], ours_in[1], t, ours_in[2], **kw)
    (loss * grad_scale).backward()
    ref = reference.fused_linear_cross_entropy(ref_in[0], ref_in[1], t, ref_in[2], **kw)
    (ref * grad_scale).backward()
    return loss, ref, [(a.grad, r.grad) for a, r in zip(ours_in, ref_in) if a is not None]


def err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_loss_and_grads_match_float64(reduction, bias):
    x, w, t, b = make(37, 16, 100, bias=bias, seed=3)
    assert _chunk_rows(37, 16, 100) < 37                        # the test covers several chunks
    t[[0, 5, 36]] = -100                                        # ignored rows
    loss, ref, grads = run_both(x, w, t, b, grad_scale=2.5, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    for ours, theirs in grads:
        assert err(ours, theirs) < 1e-5
    assert torch.all(grads[0][0][[0, 5, 36]] == 0)              # ignored rows get no gradient


def test_bf16_close_to_float64():
    x, w, t, _ = make(50, 32, 300, dtype=torch.bfloat16, seed=4)
    loss, ref, grads = run_both(x, w, t, None)
    assert abs(loss.item() - ref.item()) < 2e-2 * abs(ref.item())
    for ours, theirs in grads:
        assert ours.dtype == torch.bfloat16 and err(ours, theirs) < 3e-2


def test_bad_targets_and_shapes_raise():
    x, w, t, _ = make(4, 8, 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        fused_linear_cross_entropy(x, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="agree on C"):
        fused_linear_cross_entropy(x, w[:, :4], t)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(x, w, t, reduction="none")
