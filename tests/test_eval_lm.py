import math

import torch
import torch.nn.functional as F

from quark.eval.lm import LanguageModel
from quark.eval.perplexity import evaluate_text, evaluate_tokens


def test_loglikelihood_matches_direct_computation(tiny_model_dir):
    lm = LanguageModel.from_dir(tiny_model_dir)
    ctx, cont = "def add(a, b):", " return a + b"
    (lp, _), = lm.loglikelihood([(ctx, cont)])
    a, b = lm.encode(ctx), lm.encode(cont)
    ids = torch.tensor(a + b)
    logits, _ = lm.model(ids[None, :-1])
    logp = F.log_softmax(logits[0].float(), -1)
    expected = sum(logp[len(a) - 1 + i, b[i]].item() for i in range(len(b)))
    assert abs(lp - expected) < 1e-4


def test_rolling_nll_scores_every_token_once(tiny_model_dir):
    lm = LanguageModel.from_dir(tiny_model_dir)
    ids = torch.randint(0, lm.model.config.vocab_size, (3 * lm.max_len + 17,))
    nll, count = lm.rolling_nll(ids)
    assert count == len(ids) - 1        # every token after the first is predicted exactly once
    # the same windows scored one by one
    total = 0.0
    for s in range(0, len(ids) - 1, lm.max_len):
        w = ids[s: s + lm.max_len + 1]
        logits, _ = lm.model(w[None, :-1])
        total += F.cross_entropy(logits[0].float(), w[1:], reduction="sum").item()
    assert abs(nll - total) < 1e-2


def test_perplexity_and_bits_per_byte_are_consistent(tiny_model_dir):
    lm = LanguageModel.from_dir(tiny_model_dir)
    r = evaluate_text(lm, "The quick brown fox jumps over the lazy dog. " * 10)
    assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-6)
    assert math.isclose(r["bits_per_byte"], r["loss"] * r["tokens"] / math.log(2) / r["bytes"], rel_tol=1e-6)
    # a random model is near uniform: loss close to log(vocab)
    assert abs(r["loss"] - math.log(lm.model.config.vocab_size)) < 1.0
    assert evaluate_tokens(lm, lm.encode("hi there"), max_tokens=1)["tokens"] == 0


def test_generate_respects_stop_strings_and_budget(tiny_model_dir):
    lm = LanguageModel.from_dir(tiny_model_dir)
    out = lm.generate("def add(a, b):", max_new_tokens=20)
    assert isinstance(out, str)
    first = out[:3]
    if first:
        assert first[0] not in lm.generate("def add(a, b):", max_new_tokens=20, until=[first[0]])
    assert lm.generate("x", max_new_tokens=0) == ""


def test_language_model_on_an_hf_checkpoint(tmp_path):
    """An HF directory scores with transformers' log-likelihoods and stops at its generation_config eos ids."""
    import pytest
    transformers = pytest.importorskip("transformers")
    from tests.hf_helpers import make_hf_model
    hf = make_hf_model(tmp_path, "llama")
    lm = LanguageModel.from_path(tmp_path)
    assert lm.eos_ids == {2, 0}
    context, continuation = "The quick brown", " fox jumps"
    (lp, _), = lm.loglikelihood([(context, continuation)])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ctx, cont = tok(context)["input_ids"], tok(continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0, :-1].float(), -1)
    expected = float(logp[len(ctx) - 1:].gather(1, torch.tensor(cont)[:, None]).sum())
    assert abs(lp - expected) < 1e-3
