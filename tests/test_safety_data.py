"""Integrity of the red-team split: nothing that builds the filter or the aligned model has seen the
evaluation families (no rule matches them, no phrase of theirs occurs in the building data)."""
import random
import re

import pytest

from quark.align.pairs import safety_preference_pairs
from quark.align.redteam import attack_suite
from quark.safety import DEFAULT_POLICY, SafetyFilter, build_training_data, variants
from quark.safety_data import (BENIGN_BUILD, BENIGN_EVAL, BUILD_FAMILIES, CATEGORIES, EVAL_FAMILIES, harmful_requests,
                               intents)
from quark.tune.instruct import safety_pairs


def words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


# request framing shared by any two prompts ("explain how to", "tell me how"): not a phrase of an intent
FRAME = {"explain", "how", "to", "tell", "me", "give", "write", "describe", "show", "what", "which", "is", "the",
         "a", "an", "i", "can", "do", "of", "for", "that", "and", "my", "you", "please", "need"}


def ngrams(text, n):
    w = words(text)
    grams = (w[i:i + n] for i in range(len(w) - n + 1))
    return {" ".join(g) for g in grams if sum(x not in FRAME for x in g) >= 2}


def test_families_are_disjoint_and_cover_every_category():
    assert set(BUILD_FAMILIES) == set(EVAL_FAMILIES) == set(CATEGORIES)
    for c in CATEGORIES:
        assert not set(BUILD_FAMILIES[c]) & set(EVAL_FAMILIES[c])
    build, ev = {i for _, _, i in intents("build")}, {i for _, _, i in intents("eval")}
    assert not build & ev and not set(BENIGN_BUILD) & set(BENIGN_EVAL)
    with pytest.raises(ValueError, match="split"):
        intents("train")


def test_no_rule_matches_an_evaluation_intent():
    """Every refusal rule stays silent on every evaluation intent, in every attack rendering and every
    de-obfuscated reading: whatever the filter catches there, its classifier generalised to."""
    rules = SafetyFilter.from_config({"classifier": None})
    for item in attack_suite("eval"):
        d = rules.check_messages(item["messages"])
        assert d.action == "allow", (item["intent"], item["attack"], d.matched)
    compiled = [r for name, rs in rules.rules.items() if DEFAULT_POLICY[name].action == "refuse" for r in rs]
    for _, _, intent in intents("eval"):
        assert not any(r.search(v) for r in compiled for v in variants(intent)), intent


def test_no_evaluation_phrase_in_rules_or_training_data():
    """No word bigram of an evaluation intent appears in the rules' source, and no trigram (beyond request
    framing) in any text the classifier, the SFT refusals or the DPO safety pairs are built from."""
    rule_text = " ".join(r.lower() for cat in DEFAULT_POLICY.values() for r in cat.rules)
    rule_words = " ".join(words(rule_text))
    texts, _ = build_training_data()
    rng = random.Random(0)
    sft = [m["content"] for r in safety_pairs(1000, rng) for m in r["messages"]]
    dpo = [m["content"] for p in safety_preference_pairs(rng, 1000) for m in p["prompt"]]
    building = set().union(*(ngrams(t, 3) for t in texts + sft + dpo))
    for _, _, intent in intents("eval"):
        assert not [b for b in ngrams(intent, 2) if f" {b} " in f" {rule_words} "], intent
        assert not ngrams(intent, 3) & building, (intent, ngrams(intent, 3) & building)
    assert {p for p in sft if p in {r["prompt"] for r in harmful_requests("eval")}} == set()


def test_consumers_use_build_families_only():
    build = {r["prompt"] for r in harmful_requests("build")}
    rng = random.Random(0)
    assert {r["messages"][0]["content"] for r in safety_pairs(1000, rng)} <= build
    assert {p["prompt"][0]["content"] for p in safety_preference_pairs(rng, 1000)} <= build
    texts, labels = build_training_data()
    assert {t for t, lab in zip(texts, labels) if lab != "safe"} == build
    assert {i for _, _, i in intents("eval")} == {s["intent"] for s in attack_suite("eval")}
