import json
import random
import subprocess
import sys

import pytest

from quark.improve.augment import augment_records, noise, roundtrip


def test_noise_is_deterministic_and_near_its_rate():
    text = "the quick brown fox jumps over the lazy dog " * 20
    a, b = noise(text, random.Random(1), 0.05), noise(text, random.Random(1), 0.05)
    assert a == b and a != text
    assert abs(len(a) - len(text)) < 0.15 * len(text)
    words = set(text.split())
    intact = sum(w in words for w in a.split()) / len(a.split())
    assert 0.6 < intact < 1.0           # most words survive a 5% edit rate, some do not
    assert noise(text, random.Random(1), 0.0) == text


class ScriptedLM:
    def __init__(self, replies):
        self.replies = list(replies)

    def generate(self, prompt, max_new_tokens=64, until=(), temperature=0.0, seed=0):
        return self.replies.pop(0)


def test_roundtrip_keeps_only_parseable_code():
    code = "def f(x):\n    return x + 1\n"
    assert roundtrip(ScriptedLM(["adds one", "g(x):\n    return x + 1\n"]), code) == ("adds one", "def g(x):\n    return x + 1\n")
    assert roundtrip(ScriptedLM(["adds one", "g(x) return"]), code) is None


def test_paraphrase_filters_degenerate_rewrites():
    recs = [{"messages": [{"role": "user", "content": "How do I open a file?"}, {"role": "assistant", "content": "open()"}]}] * 3
    lm = ScriptedLM(["How can a file be opened?", "", "How do I open a file?"])
    out, stats = augment_records(recs, "paraphrase", lm)
    assert stats == {"in": 3, "out": 1, "rejected": 2}
    assert out[0]["messages"][0]["content"] == "How can a file be opened?" and out[0]["messages"][1]["content"] == "open()"


def test_cli_noise_and_bad_input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there friend"},
                                            {"role": "assistant", "content": "hi"}]}) + "\n")
    r = subprocess.run([sys.executable, "-m", "quark.cli", "augment", str(src), str(tmp_path / "out.jsonl"),
                        "--copies", "3", "--rate", "0.3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    src.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    r = subprocess.run([sys.executable, "-m", "quark.cli", "augment", str(src), str(tmp_path / "o.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "in.jsonl:1" in r.stderr and "role must be one of" in r.stderr
