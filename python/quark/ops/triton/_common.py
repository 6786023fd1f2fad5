"""Pieces shared by the Triton kernels.

INTERPRET: Triton 3.9's CPU interpreter (TRITON_INTERPRET=1) stores bfloat16 as raw uint16 and its
tl.dot multiplies those integers, so bf16 operands are widened to fp32 before tl.dot there; elementwise
bf16 arithmetic is broken the same way, which is why every kernel converts loads to fp32 before any
math. On the GPU the branch folds away at compile time and tl.dot runs on bf16/fp16 tensor cores.
"""
import os

import triton
import triton.language as tl

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation; IEEE=True keeps fp32 operands exact (no TF32)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def next_pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(int(n)))


def check_cuda_or_interpret(name, t):
    """Kernels take CUDA tensors; under the interpreter (tests) CPU tensors stand in for them."""
    if t.device.type != "cuda" and not INTERPRET.value:
        raise ValueError(f"{name} must be a CUDA tensor for the Triton kernels, got device {t.device}")
