"""The lm-evaluation-harness adapter, driven with requests shaped like lm_eval's Instance."""
from types import SimpleNamespace

import pytest

from quark.eval.lm import LanguageModel
from quark.eval.lm_eval_adapter import QuarkLM


def req(*args):
    return SimpleNamespace(args=args)


def test_three_request_types(tiny_model_dir):
    lm = QuarkLM.create_from_arg_string(f"path={tiny_model_dir}")
    direct = LanguageModel.from_dir(tiny_model_dir)
    ll = lm.loglikelihood([req("def add(a, b):", " return a + b")])
    assert ll == direct.loglikelihood([("def add(a, b):", " return a + b")])
    (rolling,) = lm.loglikelihood_rolling([req("The quick brown fox")])
    assert rolling < 0
    (gen,) = lm.generate_until([req("import os", {"until": ["\n"], "max_gen_toks": 5})])
    assert isinstance(gen, str) and "\n" not in gen


def test_model_args_must_name_a_path():
    with pytest.raises(ValueError, match="path="):
        QuarkLM.create_from_arg_string("device=cpu")
