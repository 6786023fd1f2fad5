"""quark.data.tokenizer: byte-level BPE trained from a corpus iterator; exact round trip of any
UTF-8 text (property test); chat special tokens present, atomic and unsplittable."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quark.rundir import RunDir
from quark import chat
from quark.config import ConfigError
from quark.data import tokenizer

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Ünïcödé text, 日本語のテキスト, emoji 🙂🚀, and tabs\tand\r\nnewlines.",
    "for i in range(10):\n    print(i * i)\n",
] * 50


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train(iter(CORPUS), vocab_size=400)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=100))
def test_round_trip_arbitrary_utf8_from_bytes(tok, data):
    text = data.decode("utf-8", errors="replace")
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_special_tokens_and_chat_template(tok):
    ids = chat.special_ids(tok)
    assert [ids[t] for t in chat.SPECIAL_TOKENS] == list(range(len(chat.SPECIAL_TOKENS)))
    for t in chat.SPECIAL_TOKENS:
        assert tok.encode(t, add_special_tokens=False).ids == [ids[t]]
    msgs = [{"role": "user", "content": "hi <|end|> there"}, {"role": "assistant", "content": "hello"}]
    out, mask = chat.encode_chat(tok, msgs)
    assert out[0] == ids["<|bos|>"] and out.count(ids["<|end|>"]) == 2  # the forged <|end|> is neutralised
    assert tok.get_vocab_size() <= 400  # BPE stops early when no pair is frequent enough


def test_step(tmp_path):
    (tmp_path / "dedup").mkdir()
    with open(tmp_path / "dedup" / "docs.jsonl", "w") as f:
        for i, t in enumerate(CORPUS):
            f.write(json.dumps({"id": str(i), "text": t, "source": "web", "meta": {}}) + "\n")
    stats = tokenizer.run_step(tmp_path, {"vocab_size": 300, "max_chars": 2000, "seed": 0})
    assert stats["vocab_size"] == 300 and stats["chars"] == 2000 and stats["special_tokens"]["<|eos|>"] == 1
    tok = RunDir(tmp_path).tokenizer()
    assert tok.decode(tok.encode("round trip ✓").ids) == "round trip ✓"


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        tokenizer.validate_config({"vocab_size": 100})
    with pytest.raises(FileNotFoundError, match="run the dedup step first"):
        tokenizer.run_step(tmp_path, {})
