"""Every Triton kernel compiles for the GPU (sm_90, H100/H200), checked on a machine without one.

The interpreter tests run the kernels' Python semantics on CPU tensors; this test runs the real
compiler (Triton -> TTGIR -> PTX -> cubin with the bundled ptxas) on exactly the launches the host
launchers make. In a subprocess without TRITON_INTERPRET, JITFunction.run is replaced by a recorder
that turns each launch's arguments into a signature and calls triton.compile for GPUTarget("cuda", 90)
instead of launching (there is no GPU); the launchers run on small CPU tensors with the CUDA-only
argument check lifted. Uncached, a full compile takes about a minute, hence slow.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(r'''
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8",
             torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
    seen, compiled = set(), []

    def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args), **kwargs)
        sig, consts = {}, {}
        for p in self.params:
            v = bound[p.name]
            if p.is_constexpr:
                sig[p.name], consts[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + TYPES[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            else:
                sig[p.name] = "fp32"
        key = (self.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())))
        if key not in seen:
            seen.add(key)
            k = triton.compile(ASTSource(self, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts)
            assert k.asm["cubin"], self.__name__
            compiled.append(f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.__name__}")

    JITFunction.run = compile_instead_of_launch

    from quark.ops import quantize, quantize_kv
    from quark.ops.triton import (attention, decode_attention, distance, fused_linear_cross_entropy, qmatmul,
                                  rmsnorm, rope, swiglu)
    for mod in (attention, decode_attention, distance, fused_linear_cross_entropy, qmatmul, rmsnorm, rope, swiglu):
        mod.check_cuda_or_interpret = lambda name, t: None

    bf = torch.bfloat16
    q, k, v = (torch.randn(1, 4, 80, 128, dtype=bf, requires_grad=True) for _ in range(3))
    attention.attention(q, k[:, :2], v[:, :2]).sum().backward()
    for dtype in (torch.float16, torch.float32):                # fp32: the IEEE (no TF32) dots
        attention.attention(*(torch.randn(1, 4, 80, 64, dtype=dtype) for _ in range(3)))
    q, kc = torch.randn(2, 8, 128, dtype=bf), torch.randn(2, 2, 256, 128, dtype=bf)
    decode_attention.decode_attention(q, kc, kc, torch.tensor([256, 7]))
    (kq, ks) = quantize_kv(kc)
    decode_attention.decode_attention(q, kq, kq, torch.tensor([256, 7]), k_scale=ks, v_scale=ks)
    x = torch.randn(8, 4096, dtype=bf, requires_grad=True)
    rmsnorm.rmsnorm(x, torch.ones(4096, dtype=bf)).sum().backward()
    swiglu.swiglu(x, x.detach()).sum().backward()
    cos, sin = torch.randn(80, 64), torch.randn(80, 64)
    rope.rope(torch.randn(1, 4, 80, 128, dtype=bf, requires_grad=True), cos, sin).sum().backward()
    w = torch.randn(1000, 4096, dtype=bf, requires_grad=True)
    fused_linear_cross_entropy.fused_linear_cross_entropy(x, w, torch.zeros(8, dtype=torch.int64)).backward()
    for scheme in ("int4", "int8"):
        qt = quantize(torch.randn(256, 512), scheme=scheme, group_size=128)
        for rows in (1, 256):
            qmatmul.qmatmul(torch.randn(rows, 512, dtype=bf), scheme, qt.data, qt.scales, qt.zeros, qt.group_size)
    xs, ys = torch.randn(100, 128), torch.randn(1000, 128)
    distance.pairwise_distance(xs, ys, "l2")
    distance.pairwise_topk(xs, ys, 10, "cosine")
    print("COMPILED", len(compiled), " ".join(sorted(set(compiled))))
''')

KERNELS = ["attention._fwd_kernel", "attention._bwd_dkdv_kernel", "attention._bwd_dq_kernel",
           "attention._bwd_delta_kernel", "decode_attention._split_kernel", "decode_attention._combine_kernel",
           "rmsnorm._fwd_kernel", "rmsnorm._bwd_kernel", "swiglu._fwd_kernel", "swiglu._bwd_kernel",
           "rope._rope_kernel", "fused_linear_cross_entropy._ce_kernel", "qmatmul._int4_gemv_kernel",
           "qmatmul._int8_gemv_kernel", "qmatmul._qgemm_kernel", "distance._distance_kernel", "distance._topk_kernel"]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("COMPILED"))
    assert sorted(line.split()[2:]) == sorted(KERNELS), line
