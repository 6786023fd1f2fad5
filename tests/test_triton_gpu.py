"""On a CUDA machine: quark.ops sends CUDA tensors to the compiled (not interpreted) Triton kernels,
and their results match the references. Runs in a subprocess because the other test_triton_* files
put this process's Triton in interpreter mode. Skips without a CUDA device."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SCRIPT = textwrap.dedent(r'''
    import torch
    from quark import ops
    from quark.ops import reference
    from quark.ops.triton.fused_linear_cross_entropy import fused_linear_cross_entropy
    from quark.ops.triton.rmsnorm import rmsnorm
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    q, k, v = (torch.randn(2, h, 300, 128, device=dev, dtype=bf, requires_grad=True) for h in (8, 2, 2))
    out = ops.attention(q, k, v)
    out.float().sum().backward()
    ref = reference.attention(*(t.detach().double() for t in (q, k, v)))
    low = reference.attention(*(t.detach() for t in (q, k, v)))
    assert err(out, ref) <= 3 * err(low, ref) + 1e-3, ("attention", err(out, ref), err(low, ref))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()

    qd = torch.randn(4, 8, 128, device=dev, dtype=bf)
    kc, vc = (torch.randn(4, 2, 1000, 128, device=dev, dtype=bf) for _ in range(2))
    lens = torch.tensor([1000, 0, 17, 512])
    assert err(ops.decode_attention(qd, kc, vc, lens), reference.decode_attention(qd.double(), kc.double(), vc.double(), lens.cuda())) < 2e-2

    x, y = torch.randn(100, 64, device=dev), torch.randn(3000, 64, device=dev)
    for metric in ("l2", "ip", "cosine"):
        ref = reference.pairwise_distance(x.double(), y.double(), metric)
        assert err(ops.pairwise_distance(x, y, metric), ref) < 1e-3 * max(1.0, ref.abs().max().item()), metric

    for scheme in ("int4", "int8", "w8a8"):
        qt = ops.quantize(torch.randn(512, 1024), scheme=scheme, group_size=128).to(dev)
        for M in (1, 100):
            xa = torch.randn(M, 1024, device=dev)
            r = reference.qlinear(xa, qt)
            assert err(ops.qlinear(xa, qt), r) < 1e-3 * r.abs().max().item(), (scheme, M)

    xn = torch.randn(64, 1000, device=dev, dtype=bf)
    assert err(rmsnorm(xn, torch.ones(1000, device=dev, dtype=bf)), reference.rmsnorm(xn.double(), torch.ones(1000, device=dev).double())) < 5e-2

    xc = torch.randn(512, 256, device=dev, requires_grad=True)
    w = torch.randn(5000, 256, device=dev, requires_grad=True)
    t = torch.randint(0, 5000, (512,), device=dev)
    loss = fused_linear_cross_entropy(xc, w, t)
    assert abs(loss.item() - torch.nn.functional.cross_entropy(xc @ w.T, t).item()) < 1e-3
    print("OK")
''')


def test_quark_ops_route_cuda_tensors_to_compiled_triton():
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]
