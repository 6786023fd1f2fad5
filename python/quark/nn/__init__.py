"""Inference layers built on Quark kernels."""
from quark.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
