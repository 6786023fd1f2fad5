"""lm-evaluation-harness adapter: `lm_eval --model quark --model_args path=RUN_OR_MODEL_DIR ...`.

QuarkLM implements the harness's three request types on top of quark.eval.lm.LanguageModel;
each request carries its arguments in `.args` exactly as lm_eval's Instance does. When lm_eval is
installed the class is registered with it under the name "quark"; without it the class still works
(the tests drive it directly)."""

from quark.eval.lm import LanguageModel

try:
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model
except ImportError:     # lm_eval is optional
    _Base, register_model = object, None


class QuarkLM(_Base):
    def __init__(self, path, **kwargs):
        if _Base is not object:
            super().__init__()
        self.lm = LanguageModel.from_path(path)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        if "path" not in args:
            raise ValueError("model_args must include path=<run or model directory>")
        return cls(**args)

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


if register_model is not None:
    register_model("quark")(QuarkLM)
