import pytest

from quark import verifiable as V
from quark.align.pairs import on_policy_pairs
from tests.tiny_lm import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_on_policy_pairs_rank_the_models_own_samples():
    tok = tiny_tokenizer()
    model = tiny_model(tok.get_vocab_size())
    prompts = [t["messages"] for t in V.make_tasks(["add"])[:6]]
    seen = {}

    def by_length(prompt, text):   # a judge that prefers longer answers; records what it was shown
        seen.setdefault(prompt[-1]["content"], set()).add(text)
        return len(text)

    pairs = on_policy_pairs(model, tok, prompts, by_length, k=4, max_new_tokens=8, seed=3)
    assert len(pairs) == len(prompts)
    for p in pairs:
        shown = seen[p["prompt"][-1]["content"]]
        assert {p["chosen"], p["rejected"]} <= shown and 2 <= len(shown) <= 4
        assert len(p["chosen"]) == max(map(len, shown)) > len(p["rejected"]) == min(map(len, shown))
    assert on_policy_pairs(model, tok, prompts, by_length, k=4, max_new_tokens=8, seed=3) == pairs      # seeded
    assert on_policy_pairs(model, tok, prompts, lambda p, t: 0.0, k=4, max_new_tokens=8) == []          # all tie


def test_a_verifier_pairs_the_reference_over_the_models_mistakes():
    tok = tiny_tokenizer()
    tasks = V.make_tasks(["add"], "heldout")
    by_prompt = {t["messages"][-1]["content"]: t for t in tasks}
    pairs = on_policy_pairs(tiny_model(tok.get_vocab_size()), tok, [t["messages"] for t in tasks],
                            lambda p, text: V.verify(by_prompt[p[-1]["content"]], text), k=3, max_new_tokens=6,
                            references=[t["answer"] for t in tasks])
    assert len(pairs) == len(tasks)   # an untrained model solves none, so each reference beats a sample
    for p in pairs:
        task = by_prompt[p["prompt"][-1]["content"]]
        assert p["chosen"] == task["answer"] and V.verify(task, p["rejected"]) == 0.0
