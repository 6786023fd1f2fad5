"""Model optimization for inference: weight quantization (quantize: RTN, AWQ, GPTQ), distillation
(distill), resharding and the tensor-parallel check (shard). The quantized and sharded model
directory formats themselves are quark.model.quantized and quark.model.shard."""
from quark.optimize.quantize import QuantizeReport, model_nbytes, quantize_model

__all__ = ["QuantizeReport", "model_nbytes", "quantize_model"]
