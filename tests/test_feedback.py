import json

import pytest

from quark.feedback import FeedbackStore


def test_ratings_become_preference_pairs(tmp_path):
    fb = FeedbackStore(tmp_path / "feedback.sqlite")
    p1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of France?"}]
    fb.record(p1, "Paris.", 5, model="sft")
    fb.record(p1, "Paris.", 4, model="sft")             # repeated rating of one response: averaged (4.5)
    fb.record(p1, "It is Lyon.", 1, model="pretrain")
    fb.record(p1, "Paris, I think.", 4, model="dpo")
    fb.record(p1, "France.", 3.8, model="pretrain")
    fb.record("say hi", "hi!", 1, model="sft")
    fb.record("say hi", "hello", 1, model="dpo")          # a tie: no pair
    fb.record("only one", "answer", 5)
    pairs = fb.preference_pairs(min_margin=1.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Paris.", "It is Lyon.")]
    assert pairs[0]["prompt"] == p1 and pairs[0]["margin"] == 3.5
    wide = fb.preference_pairs(min_margin=0.1)
    assert [(p["chosen"], p["rejected"]) for p in wide] == [("Paris.", "It is Lyon."), ("Paris, I think.", "France.")]
    n = fb.export_pairs(tmp_path / "prefs.jsonl", min_margin=0.1)
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert n == 2 and set(rows[0]) == {"prompt", "chosen", "rejected"} and rows[1]["chosen"] == "Paris, I think."
    s = fb.stats()
    assert s["ratings"] == 8 and s["prompts"] == 3 and s["by_model"]["sft"]["n"] == 3
    fb.close()
    assert len(FeedbackStore(tmp_path / "feedback.sqlite")) == 8        # persisted


def test_bad_feedback_is_refused(tmp_path):
    fb = FeedbackStore(tmp_path / "f.sqlite")
    with pytest.raises(ValueError, match="rating"):
        fb.record("q", "a", float("nan"))
    with pytest.raises(ValueError, match="rating"):
        fb.record("q", "a", "good")
    with pytest.raises(ValueError, match="response"):
        fb.record("q", "", 1)
    with pytest.raises(ValueError, match="role"):
        fb.record([{"role": "robot", "content": "x"}], "a", 1)


def test_thumbs_and_corrections_become_pairs(tmp_path):
    fb = FeedbackStore(tmp_path / "f.sqlite")
    q = [{"role": "user", "content": "2+2?"}]
    fb.record(q, "5", "down", correction="4", response_id="chatcmpl-1")   # the user's own answer beats the reply
    fb.record(q, "four", "up")                                             # a thumbs-up alternative beats it too
    fb.record([{"role": "user", "content": "hi"}], "hello", "up", correction="hello")   # no-op correction: no pair
    pairs = [(p["chosen"], p["rejected"]) for p in fb.preference_pairs()]
    assert pairs == [("4", "5"), ("four", "5")]
    with pytest.raises(ValueError, match="correction"):
        fb.record(q, "5", "down", correction=" ")
    with pytest.raises(ValueError, match="rating"):
        fb.record(q, "5", "meh")
