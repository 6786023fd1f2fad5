import json
import random

import pytest

from quark.chat import QuarkChat, check_chat_record
from quark.tune import instruct
from quark.retrieval.tools import builtin_tools, calculate
from quark.tune.instruct import InstructConfig, code_pairs, dedup, doc_pairs, self_instruct
from quark.verifiable import make_tasks
from tests.tiny_lm import DOC, chat_record, make_run, one_thread, tiny_model, write_jsonl  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE = '''
def area(width: float, height: float = 1.0) -> float:
    """Return the area of a rectangle.

    More details that are not part of the first paragraph.
    """
    return width * height


class Shape:
    """A geometric shape with a name."""

    def _private(self):
        """Skipped: private helpers are not instructions."""
'''


def test_code_pairs_signature_docstring_and_code():
    recs = code_pairs(SOURCE, "geometry.py", random.Random(0), InstructConfig())
    prompts = [r["messages"][0]["content"] for r in recs]
    answers = [r["messages"][1]["content"] for r in recs]
    assert any("def area(width: float, height: float=1.0) -> float" in p for p in prompts)
    assert "Return the area of a rectangle." in answers
    code = next(a for p, a in zip(prompts, answers) if "`area`" in p)
    assert code.startswith("def area(") and "return width * height" in code   # docstring -> code
    assert any("class `Shape`" in p for p in prompts)
    assert not any("_private" in p for p in prompts)
    assert code_pairs("def broken(:\n", "x.py", random.Random(0), InstructConfig()) == []


def test_doc_pairs_section_title_to_paragraph():
    recs = doc_pairs(DOC, "Built-in Types", random.Random(0))
    pairs = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in recs}
    assert any("Tuples" in p and a.startswith("Tuples are immutable") for p, a in pairs.items())
    assert any("Built-in Types" in p for p in pairs)


def test_dedup_on_prompt_and_response():
    recs = [chat_record("What is X?", "X is a letter."), chat_record("what is  x", "Something else."),
            chat_record("Other?", "x is a LETTER"), chat_record("New?", "New answer.")]
    assert [r["messages"][0]["content"] for r in dedup(recs)] == ["What is X?", "New?"]


def test_step_writes_valid_chat_jsonl(tmp_path):
    run, tok = make_run(tmp_path, with_model=False)
    cfg = {"seed": 0, "system_prompt": True, "max_tokens": 1024, "calculator_examples": 5, "verifiable_examples": 6}
    stats = instruct.run_step(run, cfg)   # max_tokens: room for a tool list
    assert stats["code_pairs"] > 5 and stats["doc_pairs"] >= 3 and stats["train"] > stats["val"] >= 1
    lines = (run / "instruct" / "train.jsonl").read_text().splitlines()
    for n, line in enumerate(lines, 1):
        check_chat_record(json.loads(line), f"train.jsonl:{n}")
        assert json.loads(line)["messages"][0]["role"] == "system"
    assert stats["safety_pairs"] <= (stats["train"] + stats["val"]) // 10 + 1
    # tool-use records list the agent's built-in tools as its registry does, call one, and get the observation
    # the agent writes; SFT reads them with the calls in the template syntax
    recs = [json.loads(line) for line in lines + (run / "instruct" / "val.jsonl").read_text().splitlines()]
    tool_recs = [r for r in recs if r.get("tools")]
    assert len(tool_recs) == stats["tool_records"] and stats["tool_records"] - 5 <= (stats["train"] + stats["val"]) // 10 + 1
    assert all(r["tools"] == builtin_tools().openai_tools() for r in tool_recs)
    calls = [(r["messages"][-3]["tool_calls"][0]["function"], json.loads(r["messages"][-2]["content"]), r) for r in tool_recs]
    assert {f["name"] for f, _, _ in calls} == {"search_docs", "calculator"}
    for f, obs, r in calls:
        if f["name"] == "calculator":   # the answer states what the tool returned, for an expression in the question
            expression = json.loads(f["arguments"])["expression"]
            assert f'"{expression}"' in r["messages"][-4]["content"]
            assert obs == {"tool": "calculator", "result": calculate(expression)} and str(obs["result"]) in r["messages"][-1]["content"]
    from quark.tune.sft import load_chat_jsonl
    examples, _ = load_chat_jsonl(run / "instruct" / "train.jsonl", tok, 100_000)
    assert sum('<tool_call>{"name": ' in tok.decode([t for t, m in zip(ids, mask) if m])
               for ids, mask in examples) == len([line for line in lines if '"tool_calls"' in line])
    # verifiable records: training-split prompts with their reference answers, never a held-out prompt
    held = {json.dumps(t["messages"]) for t in make_tasks(split="heldout")}
    train = {json.dumps(t["messages"]): t["answer"] for t in make_tasks(split="train")}
    verifiable = [r for r in recs if json.dumps(r["messages"][-2:-1]) in train]
    assert len(verifiable) == stats["verifiable_records"] == 6
    assert all(r["messages"][-1]["content"] == train[json.dumps(r["messages"][-2:-1])] for r in verifiable)
    assert not any(json.dumps(r["messages"][-2:-1]) in held for r in recs)
    again = instruct.run_step(run, cfg)
    assert again["train"] == stats["train"] and (run / "instruct" / "train.jsonl").read_text().splitlines() == lines


def test_bad_corpus_line_is_named(tmp_path):
    run, _ = make_run(tmp_path, with_model=False)
    write_jsonl(run / "scrape" / "files-00001.jsonl", ['{"path": "a.py", "text": "x = 1"}', '{"oops": 1}'])
    with pytest.raises(ValueError, match=r"files-00001.jsonl:2: expected fields 'path' and 'text'"):
        instruct.run_step(run, {"seed": 0})
    with pytest.raises(FileNotFoundError, match="run the data steps first"):
        instruct.run_step(tmp_path / "empty", {"seed": 0})


def test_self_instruct_generates_new_filtered_instructions(tmp_path):
    run, tok = make_run(tmp_path, with_model=False)
    pool = [chat_record(f"Explain item number {i} of the list.", "It is an item.") for i in range(5)]
    model = tiny_model(tok.get_vocab_size(), max_seq_len=256)
    recs, stats = self_instruct(model, QuarkChat(tok), pool, 3, random.Random(0), max_new_tokens=16)
    assert stats["attempts"] >= 1 and stats["kept"] == len(recs) <= 3
    assert stats["attempts"] == stats["kept"] + stats["empty"] + stats["similar"]
    seeds = {p["messages"][0]["content"] for p in pool}
    for r in recs:
        check_chat_record(r, "generated")
        assert r["messages"][0]["content"] not in seeds and len(r["messages"][0]["content"]) >= 10
