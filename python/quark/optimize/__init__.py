"""Model optimization for inference: weight quantization (quantize: RTN, AWQ, GPTQ), distillation
(distill), tensor-parallel sharding and sharded checkpoints (shard)."""
from quark.optimize.quantize import (QuantizeReport, load_quantized_model, model_nbytes, quantize_model,
                                     save_quantized_model)

__all__ = ["QuantizeReport", "load_quantized_model", "model_nbytes", "quantize_model", "save_quantized_model"]
