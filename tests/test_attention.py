"""quark.ops.attention / decode_attention / quantize_kv against the float64 oracles in
quark.ops.reference, on every ISA path this CPU has, at odd shapes (S = 1, 7, 129, 1000;
D = 40, 64, 96, 128), with GQA, causal and not, fully masked rows and empty caches."""
import pytest
import torch
import torch.nn.functional as F

import quark
from quark import ops
from quark.ops import reference

LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")
DETECTED = quark.info()["isa_detected"]
# Every level this CPU has: avx512_bf16 adds the vdpbf16ps bf16 prefill, amx the AMX prefill (bf16, and
# fp32 as three bf16 products).
ISAS = [lvl for lvl in LEVELS if LEVELS.index(lvl) <= LEVELS.index(DETECTED)]


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("D", [40, 64, 96, 128])
@pytest.mark.parametrize("S", [1, 7, 129, 1000])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_fp32_matches_float64(isa, D, S, causal):
    q, k, v = make_qkv(1, 4, 2, S, S, D, seed=S + D)        # GQA: 2 query heads per kv head
    with quark.isa(isa):
        out = ops.attention(q, k, v, causal=causal)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("Sq,Sk", [(5, 70), (64, 200), (130, 129)])
def test_causal_prefix_and_scale(isa, Sq, Sk):
    # Sq < Sk: the queries continue a cached prefix (last query aligned with last key).
    q, k, v = make_qkv(2, 3, 1, Sq, Sk, 64, seed=Sq)     # MQA
    with quark.isa(isa):
        out = ops.attention(q, k, v, causal=True, scale=0.3)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True, scale=0.3)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("isa", ISAS)
def test_fully_masked_rows_and_empty_keys_give_zeros(isa):
    # Sq > Sk under a causal mask: the first Sq - Sk queries see no key at all.
    q, k, v = make_qkv(1, 2, 2, 10, 4, 64, requires_grad=True)
    with quark.isa(isa):
        out = ops.attention(q, k, v, causal=True)
        out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert (out[:, :, :6] == 0).all() and (q.grad[:, :, :6] == 0).all()
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert rel_err(out, ref) < 1e-4
    q0, k0, v0 = make_qkv(1, 2, 2, 3, 0, 32)
    with quark.isa(isa):
        assert (ops.attention(q0, k0, v0, causal=False) == 0).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B,Hq,Hkv,S,D,causal", [(1, 2, 1, 7, 40, True), (2, 4, 2, 129, 64, True),
                                                 (1, 2, 2, 100, 96, False), (1, 2, 1, 200, 128, True)])
def test_backward_matches_float64(isa, B, Hq, Hkv, S, D, causal):
    q, k, v = make_qkv(B, Hq, Hkv, S, S, D, seed=D, requires_grad=True)
    dout = torch.randn(B, Hq, S, D, generator=torch.Generator().manual_seed(1))
    with quark.isa(isa):
        ops.attention(q, k, v, causal=causal).backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.attention(q64, k64, v64, causal=causal).backward(dout.double())
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert ours.dtype == torch.float32
        assert rel_err(ours, ref) < 1e-4


def test_no_grad_forward_equals_grad_forward():
    q, k, v = make_qkv(1, 2, 1, 33, 33, 32, requires_grad=True)
    with torch.no_grad():
        a = ops.attention(q, k, v)
    b = ops.attention(q, k, v)
    assert not a.requires_grad and b.requires_grad
    assert torch.equal(a, b.detach())
    b.square().mean().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


def _bf16_errors(isa, B, Hq, Hkv, S, D, causal, temperature=1.0):
    q, k, v = make_qkv(B, Hq, Hkv, S, S, D, dtype=torch.bfloat16, seed=S * D)
    q = (q.float() * temperature).bfloat16()
    ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    with quark.isa(isa):
        ours = ops.attention(q, k, v, causal=causal)
    kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    theirs = F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
    return ours, (ours.double() - ref).abs().max().item(), (theirs.double() - ref).abs().max().item()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("S,D,causal,temperature", [(7, 40, True, 1.0), (129, 64, True, 1.0), (300, 128, False, 1.0),
                                                   (1000, 96, True, 1.0), (300, 128, False, 8.0)])
def test_forward_bf16_within_2x_torch_bf16_error(isa, S, D, causal, temperature):
    # temperature 8: large logits, a peaked softmax where the rounding of the largest weights shows.
    ours, err, torch_err = _bf16_errors(isa, 1, 4, 2, S, D, causal, temperature)
    assert ours.dtype == torch.bfloat16
    assert err <= 2 * torch_err + 1e-3


@pytest.mark.parametrize("isa", ISAS[-1:])
def test_backward_bf16(isa):
    q, k, v = make_qkv(1, 2, 1, 70, 70, 64, dtype=torch.bfloat16, requires_grad=True)
    with quark.isa(isa):
        ops.attention(q, k, v).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.attention(q64, k64, v64).sum().backward()
    assert q.grad.dtype == torch.bfloat16
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(ours, ref) < 2e-2


def make_cache(B, Hq, Hkv, Smax, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, D, generator=g), torch.randn(B, Hkv, Smax, D, generator=g),
            torch.randn(B, Hkv, Smax, D, generator=g))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("D", [40, 64, 128])
@pytest.mark.parametrize("B,Hq,Hkv,Smax,lens", [(3, 4, 2, 37, [0, 37, 5]), (1, 8, 1, 1000, [999]),
                                                (2, 2, 2, 600, [600, 1])])
def test_decode_fp32_matches_float64(isa, D, B, Hq, Hkv, Smax, lens):
    q, kc, vc = make_cache(B, Hq, Hkv, Smax, D, seed=D)
    lengths = torch.tensor(lens)
    with quark.isa(isa):
        out = ops.decode_attention(q, kc, vc, lengths)
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), lengths)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4
    for b, n in enumerate(lens):
        if n == 0:
            assert (out[b] == 0).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("temperature", [1.0, 8.0])
def test_decode_bf16_cache_and_query(isa, temperature):
    # temperature 8: large logits and a peaked softmax, where rounding a scaled q or P shows most.
    q, kc, vc = make_cache(2, 4, 2, 300, 64, seed=3)
    q = q * temperature
    kb, vb = kc.bfloat16(), vc.bfloat16()
    lengths = [300, 17]
    with quark.isa(isa):
        out32 = ops.decode_attention(q, kb, vb, lengths)          # fp32 query over a bf16 cache
        out16 = ops.decode_attention(q.bfloat16(), kb, vb, lengths)
    ref = reference.decode_attention(q.double(), kb.double(), vb.double(), lengths)
    assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16
    assert rel_err(out32, ref) < 1e-4
    qb = q.bfloat16()
    ref16 = reference.decode_attention(qb.double(), kb.double(), vb.double(), lengths)
    # bf16 in and out: at most 2x the error of torch's own bf16 SDPA on the same inputs.
    torch_err = max((F.scaled_dot_product_attention(qb[b:b + 1, :, None], kb[b:b + 1, :, :n].repeat_interleave(2, 1),
                                                    vb[b:b + 1, :, :n].repeat_interleave(2, 1))[:, :, 0].double()
                     - ref16[b:b + 1]).abs().max().item() for b, n in enumerate(lengths))
    assert (out16.double() - ref16).abs().max().item() <= 2 * torch_err + 1e-3


def test_quantize_kv_round_trip():
    x = torch.randn(2, 3, 5, 40)
    x[0, 0, 0] = 0
    q, s = ops.quantize_kv(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 5) and s.dtype == torch.float32
    assert ((q.float() * s[..., None] - x).abs() <= s[..., None] / 2 + 1e-6).all()
    assert (q[0, 0, 0] == 0).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("D,outlier", [(40, 1.0), (128, 1.0), (128, 300.0)])
def test_decode_int8_cache(isa, D, outlier):
    # outlier: one query channel 300x the others (LLM queries have such channels); the VNNI path rounds
    # q to fixed point against its largest entry and must stay as exact as the float paths.
    q, kc, vc = make_cache(2, 4, 2, 700, D, seed=D)
    q[..., 3] *= outlier
    (kq, ks), (vq, vs) = ops.quantize_kv(kc), ops.quantize_kv(vc)
    lengths = torch.tensor([700, 0])
    with quark.isa(isa):
        out = ops.decode_attention(q, kq, vq, lengths, k_scale=ks, v_scale=vs)
    # Exact against the dequantized cache; close to the unquantized one.
    ref = reference.decode_attention(q.double(), kq, vq, lengths, k_scale=ks.double(), v_scale=vs.double())
    assert rel_err(out, ref) < 1e-4
    assert (out[1] == 0).all()
    full = reference.decode_attention(q.double(), kc.double(), vc.double(), lengths)
    assert rel_err(out, full) < 5e-2


def test_errors_name_the_problem():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 32)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        ops.attention(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="head_dim"):
        ops.attention(q, k[..., :16].contiguous(), v[..., :16].contiguous())
    with pytest.raises(ValueError, match="same shape"):
        ops.attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="share a dtype"):
        ops.attention(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="contiguous"):
        ops.attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        ops.attention(q.double(), k.double(), v.double())
    qd, kc, vc = make_cache(2, 4, 2, 16, 32)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 16\]"):
        ops.decode_attention(qd, kc, vc, [3, 17])
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        ops.decode_attention(qd, kc, vc, [3])
    with pytest.raises(ValueError, match="multiple of cache heads"):
        ops.decode_attention(qd[:, :3], kc, vc, [1, 1])
    with pytest.raises(ValueError, match="contiguous"):
        ops.decode_attention(qd, kc.transpose(1, 2).contiguous().transpose(1, 2), vc, [1, 1])
    with pytest.raises(ValueError, match="needs both k_scale and v_scale"):
        ops.decode_attention(qd, ops.quantize_kv(kc)[0], ops.quantize_kv(vc)[0], [1, 1])
    with pytest.raises(ValueError, match="share a dtype"):
        ops.decode_attention(qd, kc, vc.bfloat16(), [1, 1])
