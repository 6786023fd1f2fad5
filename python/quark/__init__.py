"""Quark: a compact toolkit for developing language models.

Fast compiled kernels (C++ with runtime SIMD dispatch, Triton and CUDA on GPUs) at the core, and the
whole model life cycle around them: data, pretraining, fine-tuning, alignment, retrieval,
orchestration, optimization, evaluation and continuous improvement.
"""
__version__ = "0.1.0"

from quark._runtime import info, isa, num_threads, set_num_threads

__all__ = ["__version__", "info", "isa", "num_threads", "patch", "quantize_", "set_num_threads"]


def __getattr__(name):
    # quark.patch / quark.quantize_ (quark.nn.patch) load on first use: `import quark` stays light
    if name in ("patch", "quantize_"):
        import importlib
        return getattr(importlib.import_module("quark.nn.patch"), name)
    raise AttributeError(f"module 'quark' has no attribute {name!r}")
