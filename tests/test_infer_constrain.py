"""Constrained decoding in the engine: a random model's output follows the grammar, other requests in
the same batch are untouched, and a bad grammar or a failing processor is its own request's problem."""
import json

import jsonschema
import pytest
import torch

from quark.infer.constrain import Constraint
from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams
from tests.serve_helpers import make_model, make_tokenizer, single_thread  # noqa: F401 (autouse fixture)

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}},
          "required": ["n", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok.get_vocab_size())


def test_constrained_requests_beside_free_ones(model, tok):
    eos = tok.token_to_id("<|end|>")
    prompts = [tok.encode(t).ids for t in ("The quick", "Hello world", "def add")]
    free = SamplingParams(max_tokens=12, temperature=0)
    alone = [r.output_ids for r in Engine(model, tok, max_batch=3).run(prompts, free)]
    engine = Engine(model, tok, max_batch=5)
    with engine.cond:   # all five are admitted into one batch
        reqs = [engine.submit(prompts[0], SamplingParams(max_tokens=80, temperature=1.0, seed=s),
                              processor=Constraint.json_schema(tok, SCHEMA, eos)) for s in range(3)]
        mixed = [engine.submit(p, free) for p in prompts[1:]]
    engine.start()
    for r in reqs + mixed:
        r.done.wait(60)
    engine.shutdown()
    assert [r.output_ids for r in mixed] == alone[1:]
    for r in reqs:
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), SCHEMA)


def test_logprobs_are_the_models_log_softmax(model, tok):
    ids = tok.encode("The quick brown").ids
    r = Engine(model, tok, max_batch=1).run([ids], SamplingParams(max_tokens=4, temperature=0, logprobs=2,
                                                                   prompt_logprobs=True))[0]
    full = ids + r.output_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([full]))[0][0], -1)                  # (T, V)
    got = [e[0] for e in r.prompt_logprobs + r.logprobs]
    assert got == pytest.approx([float(lp[t - 1, full[t]]) for t in range(1, len(full))], abs=1e-4)
    assert [v for _, v in r.logprobs[0][1]] == pytest.approx(lp[len(ids) - 1].topk(2).values.tolist(), abs=1e-4)


def test_bad_grammars_and_failing_processors(model, tok):
    eos = tok.token_to_id("<|end|>")
    with pytest.raises(ValueError, match="frob"):
        Constraint.json_schema(tok, {"type": "frob"}, eos)
    with pytest.raises(ValueError, match="nsatisfiable"):
        Constraint.json_schema(tok, {"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 1}},
                                     "required": ["a"]}, eos)

    def broken(output_ids, logits):
        raise RuntimeError("processor bug")
    engine = Engine(model, tok, max_batch=2).start()
    bad = engine.submit(tok.encode("Hello").ids, SamplingParams(max_tokens=5), processor=broken)
    good = engine.submit(tok.encode("Hello").ids, SamplingParams(max_tokens=5, temperature=0))
    good.done.wait(30)
    bad.done.wait(30)
    engine.shutdown()
    assert bad.finish_reason.startswith("error") and "processor bug" in bad.finish_reason
    assert good.finish_reason == "length" and len(good.output_ids) == 5
