"""CUDA C++ kernels (csrc/cuda, quark.ops.cuda) against the oracles in quark.ops.reference. They need a
CUDA device and an extension built with QUARK_CUDA=ON, and skip otherwise; the CUDA sources
themselves are compiled by CI (.ci/run, cmake -DQUARK_CUDA=ON)."""
import pytest
import torch

from quark.ops import cuda, quantize, reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda.available(), reason="needs a CUDA device and QUARK_CUDA=ON")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,Smax,D", [(3, 8, 2, 1000, 128), (1, 4, 4, 70, 64), (2, 2, 1, 5000, 256)])
def test_decode_attention_matches_reference(B, Hq, Hkv, Smax, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, D, device="cuda", generator=g).to(dtype)
    kc, vc = (torch.randn(B, Hkv, Smax, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor([Smax, 0, Smax // 3][:B], device="cuda")
    out = cuda.decode_attention(q, kc, vc, lens)
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), lens)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert out.dtype == dtype and (out.double() - ref).abs().max() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 4, 8])
@pytest.mark.parametrize("G", [32, 128])
def test_int4_gemv_matches_reference(M, G, dtype):
    g = torch.Generator().manual_seed(M)
    qt = quantize(torch.randn(300, 1024, generator=g), scheme="int4", group_size=G).to("cuda")
    x = torch.randn(M, 1024, generator=g).to("cuda", dtype)
    bias = torch.randn(300, generator=g).cuda()
    out = cuda.int4_gemv(x, qt, bias)
    ref = reference.qlinear(x.double(), qt, bias.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < tol


def test_errors_name_the_argument():
    q = torch.randn(1, 2, 64, device="cuda")
    with pytest.raises(TypeError, match="k_cache"):
        cuda.decode_attention(q, torch.zeros(1, 2, 8, 64, device="cuda", dtype=torch.int8), q, [8])
    with pytest.raises(ValueError, match="int4"):
        cuda.int4_gemv(torch.randn(1, 64, device="cuda"), quantize(torch.randn(4, 64), scheme="int8").to("cuda"))
