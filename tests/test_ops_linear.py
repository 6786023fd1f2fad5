"""quark.ops.linear: the fp32 and bf16 GEMV kernels (csrc/quant/gemv_f32*, gemv_bf16*) and their fallback
to F.linear."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quark
from quark import _C
from quark.ops import linear, reference
from quark.ops.linear import MAX_ROWS

ALL_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")
# the family's paths (gemv_f32 registers up to avx512, gemv_bf16 up to avx512_bf16) that this CPU can run
AVAILABLE = [lv for lv in ALL_LEVELS[:3] if ALL_LEVELS.index(lv) <= ALL_LEVELS.index(_C.detected_isa())]
AVAILABLE_BF16 = [lv for lv in ALL_LEVELS[:4] if ALL_LEVELS.index(lv) <= ALL_LEVELS.index(_C.detected_isa())]


def check_close(y, x, w, b=None):
    """y against the float64 oracle, within fp32 summation error (|x| @ |w|^T bounds each dot product)."""
    ref = reference.linear(x.double(), w.double(), None if b is None else b.double())
    bound = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert bool(((y.double() - ref).abs() <= bound).all()), float((y.double() - ref).abs().max())


@pytest.mark.parametrize("isa", AVAILABLE)
@pytest.mark.parametrize("N,K", [(1, 1), (13, 7), (37, 61), (130, 515), (1001, 33)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 16])
def test_linear_matches_float64_reference(isa, N, K, M):
    g = torch.Generator().manual_seed(N * 1000 + K * 10 + M)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    with quark.isa(isa):
        check_close(linear(x, w), x, w)
        check_close(linear(x, w, b), x, w, b)


@pytest.mark.parametrize("isa", AVAILABLE)
def test_kernel_takes_any_number_of_rows(isa):
    # quark.ops.linear sends M > MAX_ROWS to torch; the kernel itself runs any M in chunks of 8 rows
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(43, 45, generator=g), torch.randn(23, 45, generator=g)
    out = torch.empty(43, 23)
    with quark.isa(isa):
        _C.gemv_f32(x, w, None, out)
    check_close(out, x, w)


def test_leading_dimensions_and_noncontiguous_x():
    x, w = torch.randn(2, 1, 3, 40)[:, :, 1], torch.randn(17, 40)   # (2, 1, 40), not contiguous
    y = linear(x, w)
    assert y.shape == (2, 1, 17)
    check_close(y.reshape(2, 17), x.reshape(2, 40), w)


def test_fallbacks_match_torch():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(9, 20, generator=g), torch.randn(9, generator=g)
    x = torch.randn(MAX_ROWS + 1, 20, generator=g)                        # more rows: a GEMM
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))
    with pytest.raises(RuntimeError, match="dtype"):                     # mixed dtypes: torch's own error
        linear(x[:2].bfloat16(), w)
    wt = torch.randn(20, 9, generator=g).T                                # non-contiguous weight
    torch.testing.assert_close(linear(x[:1], wt), F.linear(x[:1], wt))
    assert linear(torch.randn(0, 20), w).shape == (0, 9)


def test_autograd_goes_through_torch():
    w = torch.randn(5, 8, requires_grad=True)
    x = torch.randn(1, 8, requires_grad=True)
    linear(x, w).sum().backward()
    torch.testing.assert_close(w.grad, x.detach().expand(5, 8))
    torch.testing.assert_close(x.grad, w.detach().sum(0, keepdim=True))
    with torch.no_grad():                                                 # no graph: the kernel runs
        check_close(linear(x, w), x.detach(), w.detach())


def test_bad_arguments():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(TypeError, match="x must be a torch tensor"):
        linear(np.ones((1, 8), np.float32), w)
    with pytest.raises(TypeError, match="bias must be a torch tensor"):
        linear(x, w, [0.0] * 4)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear(x, torch.randn(8))
    with pytest.raises(ValueError, match="x must have last dimension K=8"):
        linear(torch.randn(1, 7), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        linear(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="out must have shape"):    # direct callers of quark._C
        _C.gemv_f32(x, w, None, torch.empty(1, 5))
    with pytest.raises(ValueError, match="K=7"):
        _C.gemv_f32(torch.randn(1, 7), w, None, torch.empty(1, 4))


def check_close_bf16(y, x, w, b=None):
    """bf16 y against the float64 oracle on the same bf16 values: fp32 sums rounded once to bf16, so
    each output is within half a bf16 ulp (2^-8 relative: 8 significant bits) of the exact value, plus fp32 summation error;
    and no worse than torch's own bf16 linear."""
    xd, wd = x.double(), w.double()
    ref = reference.linear(xd, wd, None if b is None else b.double())
    bound = 2.0 ** -8 * ref.abs() + 1e-5 * (xd.abs() @ wd.abs().T) + 1e-30
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    if x.shape[0] <= MAX_ROWS:
        theirs = (F.linear(x, w, b).double() - ref).abs()
        assert float(err.max()) <= 1.5 * float(theirs.max()) + 1e-30


@pytest.mark.parametrize("isa", AVAILABLE_BF16)
@pytest.mark.parametrize("N,K", [(1, 1), (13, 7), (37, 61), (130, 515), (1001, 33), (9, 64)])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 16])
def test_linear_bf16_matches_float64_reference(isa, N, K, M):
    g = torch.Generator().manual_seed(N * 1000 + K * 10 + M)
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in ((M, K), (N, K), (N,)))
    with quark.isa(isa):
        check_close_bf16(linear(x, w), x, w)
        check_close_bf16(linear(x, w, b), x, w, b)


@pytest.mark.parametrize("isa", AVAILABLE_BF16)
def test_bf16_kernel_takes_any_number_of_rows_and_rejects_other_dtypes(isa):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(43, 45, generator=g).bfloat16(), torch.randn(23, 45, generator=g).bfloat16()
    out = torch.empty(43, 23, dtype=torch.bfloat16)
    with quark.isa(isa):
        _C.gemv_bf16(x, w, None, out)
    check_close_bf16(out, x, w)
    with pytest.raises(ValueError, match="weight must be bfloat16"):
        _C.gemv_bf16(x, w.float(), None, out)
    with pytest.raises(ValueError, match="bias must be bfloat16"):
        _C.gemv_bf16(x, w, torch.zeros(23), out)
    with pytest.raises(ValueError, match="out must have shape"):
        _C.gemv_bf16(x, w, None, torch.empty(43, 22, dtype=torch.bfloat16))
