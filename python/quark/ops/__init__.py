"""Public kernel entry points. Each op dispatches on where its inputs live: numpy arrays and CPU
tensors run the C++ core (quark._C), CUDA tensors the Triton/CUDA kernels, anything else the plain
torch oracle in quark.ops.reference."""
from quark._runtime import init_threads
from quark.ops.attention import attention, decode_attention, quantize_kv
from quark.ops.distance import pairwise_distance
from quark.ops.linear import linear
from quark.ops.minhash import minhash
from quark.ops.quant import QuantizedTensor, dequantize, qlinear, quantize

init_threads()

__all__ = [
    "QuantizedTensor",
    "attention",
    "decode_attention",
    "dequantize",
    "linear",
    "minhash",
    "pairwise_distance",
    "qlinear",
    "quantize",
    "quantize_kv",
]
