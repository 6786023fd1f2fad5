"""Llama-style GPT model, its config and presets."""
from quark.model.config import PRESETS, GPTConfig, preset
from quark.model.gpt import GPT

__all__ = ["GPT", "GPTConfig", "PRESETS", "preset"]
