"""lm-evaluation-harness adapter: `lm_eval --model quark --model_args path=RUN_OR_MODEL_DIR --tasks T`.

QuarkLM implements the harness's three request types on top of quark.eval.lm.LanguageModel and is
registered under the name "quark": by the decorator when this module is imported, and from the command
line by the import hook quark_lm_eval.py (installed with a .pth), which points lm_eval's registry here.
"""

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from quark.eval.lm import LanguageModel


@register_model("quark")
class QuarkLM(LM):
    def __init__(self, path, **kwargs):   # lm_eval also passes batch_size, device, ...: one CPU/GPU model here
        super().__init__()
        self.lm = LanguageModel.from_path(path)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        args = simple_parse_args_string(arg_string)
        if "path" not in args:
            raise ValueError("model_args must include path=<run or model directory>")
        return cls(**args, **{k: v for k, v in (additional_config or {}).items() if v is not None})

    def loglikelihood(self, requests):
        return self.lm.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests):
        # the whole text is scored, its first token conditioned on an end-of-text token (as lm_eval does)
        prefix = [min(self.lm.eos_ids)] if self.lm.eos_ids else []
        return [-self.lm.rolling_nll(prefix + self.lm.encode(r.args[0]))[0] for r in requests]

    def generate_until(self, requests):
        out = []
        for r in requests:
            context, kwargs = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else until
            out.append(self.lm.generate(context, kwargs.get("max_gen_toks", 128), until,
                                        temperature=float(kwargs.get("temperature", 0.0))))
        return out
