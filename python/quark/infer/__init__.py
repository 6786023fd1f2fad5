"""Inference shared by the steps: the one decoder (slot KV cache, continuous batching, sampling,
streaming, speculative decoding). Serving, RAG, eval generation and RL sampling all run it."""
from quark.infer.engine import Engine, QueueFull, Runner, ShuttingDown, load_for_serving
from quark.infer.sampling import SamplingParams

__all__ = ["Engine", "QueueFull", "Runner", "SamplingParams", "ShuttingDown", "load_for_serving"]
