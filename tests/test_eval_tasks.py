import json
import math

import pytest

from quark.config import ConfigError
from quark.eval.lm import LanguageModel
from quark.eval.tasks import builtin_tasks, evaluate_task, load_task, pass_at_k


def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 3), (20, 7, 10)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert abs(pass_at_k(n, c, k) - exact) < 1e-9


def test_shipped_tasks_load():
    names = {load_task(p)[0].task: len(load_task(p)[1]) for p in builtin_tasks()}
    assert names.keys() == {"python_builtins", "python_syntax", "python_functions"}
    assert all(n > 0 for n in names.values())


def test_multiple_choice_scores_agree_with_loglikelihood(tiny_model_dir):
    lm = LanguageModel.from_dir(tiny_model_dir)
    spec, docs = load_task(next(p for p in builtin_tasks() if p.stem == "python_builtins"))
    docs = docs[:5]
    r = evaluate_task(lm, spec, docs)
    expected = 0
    for d in docs:
        ctx = f"Question: {d['question']}\nAnswer:"
        ll = [s for s, _ in lm.loglikelihood([(ctx, " " + c) for c in d["choices"]])]
        expected += int(max(range(len(ll)), key=ll.__getitem__) == d["answer"])
    assert r["acc"] == expected / 5 and r["n"] == 5 and r["chance"] == 0.25


class ScriptedLM:
    """Returns fixed completions: the way to exercise the correct-answer path of the scorers,
    which a tiny random model never reaches."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompt, max_new_tokens=64, until=(), temperature=0.0, seed=0):
        text = self.answers(prompt, seed)
        for s in until:
            if s in text:
                text = text[: text.index(s)]
        return text


def test_code_task_pass_at_k_runs_completions_in_the_sandbox(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"prompt": "def inc(x):\n", "test": "assert inc(1) == 2"}) + "\n" +
        json.dumps({"prompt": "def dbl(x):\n", "test": "assert dbl(2) == 4"}) + "\n")
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: d.jsonl\noutput_type: code\ndoc_to_text: '{{prompt}}'\n"
                                     "num_samples: 4\nk: [1, 4]\n")
    spec, docs = load_task(tmp_path / "t.yaml")
    # inc: right on every sample; dbl: right on half the samples (seed parity)
    lm = ScriptedLM(lambda p, s: "    return x + 1\n" if "inc" in p else ("    return 2 * x\n" if s % 2 else "    return x\n"))
    r = evaluate_task(lm, spec, docs)
    assert r["pass@1"] == pytest.approx((1.0 + 0.5) / 2)
    assert r["pass@4"] == pytest.approx(1.0)


@pytest.mark.parametrize("cheat", ["import os; os._exit(0)", "import sys; sys.exit(0)", "raise SystemExit(0)"])
def test_code_task_completion_that_exits_early_fails(tmp_path, cheat):
    """Before, "passed" meant exit code 0 and the completion ran before the tests: an exit faked a pass."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "def inc(x):\n", "test": "assert inc(1) == 2"}) + "\n")
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: d.jsonl\noutput_type: code\ndoc_to_text: '{{prompt}}'\n")
    spec, docs = load_task(tmp_path / "t.yaml")
    r = evaluate_task(ScriptedLM(lambda p, s: f"    {cheat}\n"), spec, docs)
    assert r["pass@1"] == 0.0
    honest = evaluate_task(ScriptedLM(lambda p, s: "    return x + 1\n"), spec, docs)
    assert honest["pass@1"] == 1.0


def test_generation_exact_match(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"p": "a", "t": "X"}) + "\n" + json.dumps({"p": "b", "t": "Y"}) + "\n")
    (tmp_path / "t.yaml").write_text("task: g\ndataset_path: d.jsonl\noutput_type: generate_until\n"
                                     "doc_to_text: '{{p}}'\ndoc_to_target: '{{t}}'\n")
    spec, docs = load_task(tmp_path / "t.yaml")
    r = evaluate_task(ScriptedLM(lambda p, s: " X\nmore" if p == "a" else "Z"), spec, docs)
    assert r["exact_match"] == 0.5


@pytest.mark.parametrize("yaml_text,data,match", [
    ("task: t\ndataset_path: missing.jsonl\noutput_type: code\ndoc_to_text: x\n", None, "does not exist"),
    ("task: t\ndataset_path: d.jsonl\noutput_type: essay\ndoc_to_text: x\n", "{}\n", "must be one of"),
    ("task: t\ndataset_path: d.jsonl\noutput_type: code\ndoc_to_txt: x\n", "{}\n", "unknown key 'doc_to_txt'"),
    ("task: t\ndataset_path: d.jsonl\noutput_type: code\ndoc_to_text: x\n", "{}\n{bad\n", r"d.jsonl:2: not valid JSON"),
])
def test_malformed_task_files(tmp_path, yaml_text, data, match):
    if data is not None:
        (tmp_path / "d.jsonl").write_text(data)
    (tmp_path / "t.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_task(tmp_path / "t.yaml")
