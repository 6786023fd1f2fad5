"""Triton kernels for CUDA tensors, one file per op (Liger-Kernel style: the @triton.jit kernel, its
host launcher and, where the op is differentiable, its torch.autograd.Function live together).

quark.ops routes CUDA tensors here; nothing in this package is imported until a CUDA tensor (or a
test) asks for it, because triton is an optional dependency and `triton.jit` decides at import time
whether it compiles for the GPU or runs under the CPU interpreter (TRITON_INTERPRET=1, the tests).

    attention.py                  flash attention forward + backward (causal, GQA; fp16/bf16/fp32)
    decode_attention.py           split-K decode over a KV cache (fp16/bf16/fp32 or int8 + scales)
    rmsnorm.py, rope.py, swiglu.py  fused elementwise/row ops with their backward
    fused_linear_cross_entropy.py   LM-head matmul + cross-entropy in token chunks, no (N, V) logits
    qmatmul.py                    int4 / int8 weight-dequantizing GEMV and GEMM (quark.ops.quant formats)
    distance.py                   pairwise distances and fused per-block top-k for vector search
"""
import importlib.util


def available():
    """True when triton is installed (the kernels themselves are imported on first use)."""
    return importlib.util.find_spec("triton") is not None
