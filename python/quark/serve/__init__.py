"""Serving: the inference engine (slot KV cache, continuous batching, sampling, streaming),
speculative decoding, and the OpenAI-compatible server with its web UI."""
from quark.serve.engine import Engine, QueueFull, Runner, ShuttingDown, load_for_serving
from quark.serve.sampling import SamplingParams
from quark.serve.speculative import SpeculativeDecoder

__all__ = ["Engine", "QueueFull", "Runner", "SamplingParams", "ShuttingDown", "SpeculativeDecoder", "load_for_serving"]
