import pytest

from quark import verifiable as V
from tests.tiny_lm import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (one_thread is a fixture)


def prompt(t):
    return t["messages"][-1]["content"]


def test_held_out_tasks_are_disjoint_from_training_by_construction():
    train, held = V.make_tasks(split="train"), V.make_tasks(split="heldout")
    assert {t["family"] for t in held} == set(V.FAMILIES) and len(held) >= 200
    assert not {prompt(t) for t in train} & {prompt(t) for t in held}
    adds = [{prompt(t) for t in split if t["family"] == "add"} for split in (train, held)]
    assert len(adds[0]) == 42 and len(adds[1]) == 13 and not adds[0] & adds[1]   # operand pairs never trained on
    train_answers = {t["answer"] for t in train if t["family"] in ("format", "code")}
    assert not train_answers & {t["answer"] for t in held if t["family"] in ("format", "code")}
    assert V.make_tasks(["add"]) == V.make_tasks(["add"])   # deterministic
    with pytest.raises(ValueError, match="unknown verifiable task families"):
        V.make_tasks(["poetry"])
    with pytest.raises(ValueError, match="split"):
        V.make_tasks(split="test")


def test_verifiers_check_exact_answers_and_run_code_in_the_sandbox():
    add = V.make_tasks(["add"])[5]
    a, b = map(int, prompt(add).rstrip("=").split("+"))
    assert V.verify(add, f" {a + b}\n") == 1.0 and V.verify(add, str(a + b + 1)) == 0.0
    assert V.verify(add, f"{a + b} apples") == 0.0                      # exact: extra words fail
    fmt = V.make_tasks(["format"], "heldout")[0]
    assert V.verify(fmt, fmt["answer"]) == 1.0 and V.verify(fmt, fmt["answer"] + ".") == 0.0
    code = V.make_tasks(["code"], "heldout")[0]
    assert V.verify(code, code["answer"]) == 1.0
    assert V.verify(code, "```python\n" + code["answer"] + "\n```") == 1.0
    assert V.verify(code, "def f(x):\n    return x") == 0.0
    assert V.verify(code, "import os\nos._exit(0)") == 0.0              # the sandbox's report, not the exit code
    assert V.verify(code, "def f(x):\n    while True: pass") == 0.0     # killed at the timeout


def test_task_files_and_reference_records(tmp_path):
    tasks = V.make_tasks(["add", "code"], "heldout")
    V.write_tasks(tmp_path / "t.jsonl", tasks)
    assert V.load_tasks(tmp_path / "t.jsonl") == tasks
    (tmp_path / "bad.jsonl").write_text('{"family": "code", "messages": [{"role": "user", "content": "x"}], "answer": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a code task needs 'tests'"):
        V.load_tasks(tmp_path / "bad.jsonl")
    rec = V.reference_records(tasks[:1])[0]
    assert rec["messages"][-1] == {"role": "assistant", "content": tasks[0]["answer"]}


def test_solved_scores_each_item_greedily(one_thread):
    tok = tiny_tokenizer()
    tasks = V.make_tasks(["add"], "heldout")
    scores = V.solved(tiny_model(tok.get_vocab_size()), tok, tasks, max_new_tokens=4)
    assert scores == [0.0] * len(tasks)   # an untrained model solves none
