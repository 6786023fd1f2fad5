"""Public kernel entry points. Each op dispatches on where its inputs live: numpy arrays and CPU
tensors run the C++ core (quark._C), CUDA tensors the Triton/CUDA kernels, anything else the plain
torch oracle in quark.ops.reference."""
from quark.ops.attention import attention, decode_attention, quantize_kv
from quark.ops.distance import pairwise_distance
from quark.ops.minhash import minhash
from quark.ops.quant import QuantizedTensor, dequantize, qlinear, quantize

__all__ = [
    "attention",
    "decode_attention",
    "minhash",
    "pairwise_distance",
    "quantize_kv",
]
__all__ += ["QuantizedTensor", "dequantize", "qlinear", "quantize"]
