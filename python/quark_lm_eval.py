"""Registers Quark's model with lm-evaluation-harness, so that `lm_eval --model quark --model_args
path=DIR --tasks T` works from the command line.

lm_eval finds models only in its own registry (no plugin entry points), so quark-lm-eval.pth, installed
beside this module, imports it at interpreter start. It only adds an import hook: nothing of Quark or
lm_eval loads until a program imports lm_eval.models, after which "quark" is registered as a lazy
placeholder for quark.eval.lm_eval_adapter:QuarkLM.
"""
import importlib.abc
import importlib.util
import sys

TARGET = "quark.eval.lm_eval_adapter:QuarkLM"


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)   # the real finders locate the module; this hook fires once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)   # lm_eval's own models first: its registry imports them only when empty
            from lm_eval.api.registry import model_registry
            if "quark" not in model_registry:
                model_registry.register("quark", target=TARGET)

        spec.loader.exec_module = exec_and_register
        return spec


def install():
    if "lm_eval.models" in sys.modules:
        from lm_eval.api.registry import model_registry
        if "quark" not in model_registry:
            model_registry.register("quark", target=TARGET)
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


install()
