"""Triton split-K decode attention on the CPU under TRITON_INTERPRET=1 against
quark.ops.reference.decode_attention: GQA, ragged lengths including 0 and Smax, several splits,
fp32/fp16/bf16 caches and int8 caches with per-token scales from quark.ops.quantize_kv."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: kernels run on CPU tensors

import pytest
import torch

pytest.importorskip("triton")
from quark.ops import quantize_kv, reference  # noqa: E402
from quark.ops.triton.decode_attention import decode_attention  # noqa: E402


def make(B, Hq, Hkv, Smax, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, D, generator=g), torch.randn(B, Hkv, Smax, D, generator=g),
            torch.randn(B, Hkv, Smax, D, generator=g))


@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("B,Hq,Hkv,Smax,D", [(3, 4, 2, 150, 40), (2, 6, 1, 70, 64), (1, 2, 2, 1, 16)])
def test_fp32_matches_float64(B, Hq, Hkv, Smax, D, splits):
    q, kc, vc = make(B, Hq, Hkv, Smax, D, seed=Smax)
    lens = torch.tensor([Smax, 0, Smax // 2][:B])
    out = decode_attention(q, kc, vc, lens, num_splits=splits)
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), lens)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-5
    if B > 1:
        assert torch.all(out[1] == 0)                                   # length 0 -> zeros


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cache(dtype):
    q, kc, vc = make(2, 8, 2, 130, 64, seed=1)
    lens = torch.tensor([130, 77])
    out = decode_attention(q.to(dtype), kc.to(dtype), vc.to(dtype), lens, scale=0.2, num_splits=2)
    ref = reference.decode_attention(q.to(dtype).double(), kc.to(dtype).double(), vc.to(dtype).double(), lens, 0.2)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2                    # rounding of P and of the output
    assert out.dtype == dtype and (out.double() - ref).abs().max() < tol


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])
def test_int8_cache_matches_dequantized_reference(qdtype):
    q, kc, vc = make(2, 4, 2, 100, 32, seed=2)
    (kq, ks), (vq, vs) = quantize_kv(kc), quantize_kv(vc)
    lens = torch.tensor([100, 41])
    out = decode_attention(q.to(qdtype), kq, vq, lens, k_scale=ks, v_scale=vs, num_splits=2)
    ref = reference.decode_attention(q.to(qdtype).double(), kq, vq, lens, k_scale=ks.double(), v_scale=vs.double())
    tol = 1e-5 if qdtype == torch.float32 else 2e-2
    assert (out.double() - ref).abs().max() < tol


def test_cache_dtype_must_match_q():
    q, kc, vc = make(1, 2, 2, 8, 16)
    with pytest.raises(TypeError, match="q's dtype"):
        decode_attention(q, kc.half(), vc.half(), torch.tensor([8]))
