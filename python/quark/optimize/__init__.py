"""Model optimization for inference: weight quantization (quantize), later distillation and sharding."""
from quark.optimize.quantize import (QuantizeReport, load_quantized_model, model_nbytes, quantize_model,
                                     save_quantized_model)

__all__ = ["QuantizeReport", "load_quantized_model", "model_nbytes", "quantize_model", "save_quantized_model"]
