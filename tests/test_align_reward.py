import json
import random

import pytest
import torch

from quark.align import reward
from quark.align.pairs import encode_pairs, load_pairs, pad_id
from quark.align.reward import RewardModel, accuracy, load_reward_model, save_reward_model, train_reward, RewardConfig
from quark.tune import instruct, sft
from tests.tiny_lm import make_run, one_thread, tiny_model, tiny_tokenizer, write_jsonl  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["hello", "world", "fox", "dog", "lazy", "quick", "brown", "python", "lists", "items", "order", "sum"]


def preference_pairs(n, seed):
    """A learnable preference: chosen answers agree ("yes ..."), rejected ones disagree ("no ...")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.sample(WORDS, 2)
        out.append({"prompt": [{"role": "user", "content": f"is {w[0]} {w[1]}?"}],
                    "chosen": f"yes this is correct, {w[0]}", "rejected": f"no that is wrong, {w[1]}"})
    return out


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(extra=[" ".join(WORDS)] * 5)


def test_reward_model_learns_heldout_preferences(tok):
    train, _ = encode_pairs(tok, list(enumerate(preference_pairs(48, 0), 1)), 64)
    val, _ = encode_pairs(tok, list(enumerate(preference_pairs(24, 1), 1)), 64)
    rm = RewardModel(tiny_model(tok.get_vocab_size()))
    before, _ = accuracy(rm, val, pad_id(tok))
    assert before == 0.5   # zero-initialised head: every pair a tie
    train_reward(rm, train, pad_id(tok), RewardConfig(steps=25, batch_size=8, lr=3e-3))
    after, margin = accuracy(rm, val, pad_id(tok))
    assert after >= 0.9 and margin > 0    # chance is 0.5


def test_reward_model_round_trip(tmp_path, tok):
    rm = RewardModel(tiny_model(tok.get_vocab_size()))
    torch.nn.init.normal_(rm.head.weight)
    prompt = [{"role": "user", "content": "hello"}]
    s = rm.score(tok, prompt, "fine thanks")
    loaded = load_reward_model(save_reward_model(rm, tmp_path / "rm"))
    assert abs(loaded.score(tok, prompt, "fine thanks") - s) < 1e-5
    (tmp_path / "rm" / "head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="head.safetensors is missing"):
        load_reward_model(tmp_path / "rm")


@pytest.mark.parametrize("line,match", [
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}', "role must be one of"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}',
     "must not end with an assistant message"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "", "rejected": "b"}', "'chosen' must be a non-empty string"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "' + "fine thanks " * 30 + '", "rejected": "b"}', "longer than max_len 32"),
])
def test_bad_pair_lines_are_named(tmp_path, tok, line, match):
    good = json.dumps(preference_pairs(1, 0)[0])
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, line])
    with pytest.raises(ValueError, match=rf"pairs.jsonl:2: .*{match}"):
        load_pairs(path, tok, 32)


def sentence_records(n, seed):
    """Chat records whose answers are well-formed sentences: the step pairs each with its own answer cut
    short or shuffled (mismatch 0), a difference a reward model can learn and check on held-out prompts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.sample(WORDS, 3)
        out.append({"messages": [{"role": "user", "content": f"tell me about {a}"},
                                 {"role": "assistant", "content": f"the {a} is quick and the {b} is lazy, but the {c} sleeps in order."}]})
    return out


def test_reward_step(tmp_path):
    run, _ = make_run(tmp_path)
    instruct.run_step(run, {"seed": 0})
    sft.run_step(run, {"seed": 0, "steps": 3})
    extra = write_jsonl(run / "feedback" / "pairs.jsonl", preference_pairs(6, 2))
    stats = reward.run_step(run, {"seed": 0, "steps": 6, "pairs": str(extra)})
    assert stats["init"].endswith("sft/final") and stats["train_pairs"] > 6 and stats["heldout_accuracy_before"] == 0.5
    data = run / "sentences"
    write_jsonl(data / "train.jsonl", sentence_records(96, 3))
    write_jsonl(data / "val.jsonl", sentence_records(40, 4))
    stats = reward.run_step(run, {"seed": 0, "steps": 40, "lr": 1e-3, "data": str(data), "mismatch": 0.0,
                                  "safety_pairs": 0})
    # 40 held-out pairs, chance 0.5: a guesser reaches 0.75 with probability < 0.1% (binomial tail)
    assert stats["heldout_pairs"] == 40 and stats["heldout_accuracy"] >= 0.75, stats
    assert load_reward_model(run / "reward" / "final") is not None
    assert json.loads((run / "reward" / "metrics.json").read_text())["history"]
