"""quark.ops.layer against the torch forms the decode step used before (quark.model.gpt's RMSNorm, the
rotate-half rope, quantize_kv): bf16 bit for bit, fp32 to rounding (the RMSNorm sum's order)."""
import pytest
import torch

from quark.model.gpt import RMSNorm
from quark.ops import layer, quantize_kv

DTYPES = [torch.float32, torch.bfloat16]


def _rope(x, cos, sin):
    h = x.shape[-1] // 2
    return torch.cat([x[..., :h] * cos - x[..., h:] * sin, x[..., :h] * sin + x[..., h:] * cos], -1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_with_residual_matches_the_module(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(96, generator=g).to(dtype)
    x, r = (torch.randn(3, 96, generator=g).to(dtype) for _ in range(2))
    want_x = x + r
    with torch.no_grad():
        want = norm(want_x)
    got = layer.rmsnorm(x, norm.weight.detach(), norm.eps, residual=r)
    assert torch.equal(x, want_x)   # the residual stream is updated in place
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:   # one bf16 step at most where the fp32 sums' order tips a rounding
        assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
        assert (got == want).float().mean() > 0.97
    # the kernels get bare addresses, so every check is in quark.ops.layer
    with pytest.raises(ValueError, match="weight must have shape"):
        layer.rmsnorm(x, norm.weight.detach()[:95], 1e-5)
    with pytest.raises(ValueError, match="x must be a contiguous"):
        layer.rmsnorm(torch.randn(96, 3).to(dtype).t(), norm.weight.detach(), 1e-5)
    with pytest.raises(ValueError, match="residual must have x's dtype"):
        layer.rmsnorm(x, norm.weight.detach(), 1e-5, residual=r.to(torch.bfloat16 if dtype == torch.float32 else torch.float32))
    with pytest.raises(TypeError, match="residual must be a torch tensor"):
        layer.rmsnorm(x, norm.weight.detach(), 1e-5, residual=r.tolist())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_rope_store_rotates_and_writes_each_slot_at_its_position(dtype, cache_dtype):
    g = torch.Generator().manual_seed(1)
    n, H, Hkv, D, Smax = 3, 4, 2, 16, 10
    qkv = torch.randn(n, (H + 2 * Hkv) * D, generator=g).to(dtype)
    cos, sin = torch.randn(n, D // 2, generator=g), torch.randn(n, D // 2, generator=g)
    pos = torch.tensor([4, 0, 9])
    kc, vc = (torch.zeros(n + 1, Hkv, Smax, D, dtype=cache_dtype) for _ in range(2))
    scales = (torch.zeros(n + 1, Hkv, Smax), torch.zeros(n + 1, Hkv, Smax)) if cache_dtype == torch.int8 else ()
    q_out = torch.empty(n, H, D, dtype=dtype)
    layer.rope_store(qkv, cos, sin, pos, q_out, kc, vc, *scales)

    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    c, s = cos[:, None].to(dtype), sin[:, None].to(dtype)
    assert torch.equal(q_out, _rope(q.view(n, H, D), c, s))
    k_want, v_want = _rope(k.view(n, Hkv, D), c, s), v.view(n, Hkv, D)
    for b in range(n):
        p = int(pos[b])
        if cache_dtype == torch.int8:
            (kq, ks), (vq, vs) = quantize_kv(k_want[b]), quantize_kv(v_want[b])
            assert torch.equal(kc[b, :, p], kq) and torch.equal(vc[b, :, p], vq)
            assert torch.equal(scales[0][b, :, p], ks) and torch.equal(scales[1][b, :, p], vs)
        else:
            assert torch.equal(kc[b, :, p], k_want[b].to(cache_dtype))
            assert torch.equal(vc[b, :, p], v_want[b].to(cache_dtype))
    written = torch.zeros(n + 1, Smax, dtype=torch.bool)
    written[torch.arange(n), pos] = True
    assert not kc.float().abs().sum((1, 3))[~written].any()   # nothing else in the cache was touched
    with pytest.raises(ValueError, match="pos outside"):
        layer.rope_store(qkv, cos, sin, torch.tensor([4, 0, Smax]), q_out, kc, vc, *scales)
    with pytest.raises(ValueError, match="qkv must have shape"):
        layer.rope_store(qkv[:, :-1].contiguous(), cos, sin, pos, q_out, kc, vc, *scales)
