"""Verifiable tasks: prompts whose answers a program checks, the rewards of GRPO and the on-policy pairs.

Families, generated procedurally so a tiny model can learn them at its size and the held-out split
is disjoint from training by construction:
  - "add":    "A+B=" for single digits with A+B <= 9; the answer is exactly the sum. The operand pairs
              are split by a fixed rule (every fourth pair in a fixed order is held out), so held-out
              items ask sums of pairs never trained on.
  - "format": "Reply with only the number N, nothing else." for N in 100..999; the answer is exactly N.
              Every N with N % 4 == 3 is held out.
  - "code":   "Write a Python function f(x) that returns x + K." (or "x * K"); the answer runs with
              unit tests in the sandbox (quark.sandbox.run_program). Training K is 1..5, held-out 6..9.
Each task is {"family", "messages" (the prompt), "answer" (the reference), "tests" (code only)}, and
verify(task, text) -> 1.0 when the program's check passes, else 0.0. A task file (JSONL) holds such
records; `reference_records` turns tasks into chat records for SFT.
"""
import json
import re
from pathlib import Path

from quark.io import read_jsonl

FAMILIES = ("add", "format", "code")
SPLITS = ("train", "heldout")


def _add(split):
    pairs = [(a, b) for a in range(10) for b in range(10 - a)]
    held = {p for i, p in enumerate(pairs) if i % 4 == 3}
    return [{"family": "add", "messages": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}
            for a, b in pairs if (split == "heldout") == ((a, b) in held)]


def _format(split):
    numbers = [n for n in range(100, 1000) if (split == "heldout") == (n % 4 == 3)]
    return [{"family": "format", "messages": [{"role": "user", "content": f"Reply with only the number {n}, nothing else."}],
             "answer": str(n)} for n in numbers]


def _code(split):
    ks = range(1, 6) if split == "train" else range(6, 10)
    out = []
    for k in ks:
        for op, fn in (("+", lambda x, k=k: x + k), ("*", lambda x, k=k: x * k)):
            tests = "\n".join(f"assert f({x}) == {fn(x)}" for x in (0, 1, 2, 7, -3))
            out.append({"family": "code",
                        "messages": [{"role": "user", "content": f"Write a Python function f(x) that returns x {op} {k}."}],
                        "answer": f"def f(x):\n    return x {op} {k}", "tests": tests})
    return out


def make_tasks(families=FAMILIES, split="train"):
    """The tasks of the given families for one split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown verifiable task families {unknown}; known: {list(FAMILIES)}")
    make = {"add": _add, "format": _format, "code": _code}
    return [t for f in families for t in make[f](split)]


def _code_block(text):
    m = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
    return m.group(1) if m else text


def verify(task, text):
    """1.0 when the completion `text` solves `task` (exact answer, or the code passes its tests), else 0.0."""
    if task["family"] == "code":
        from quark.sandbox import run_program
        return 1.0 if run_program(_code_block(text), task["tests"], timeout=5.0).passed else 0.0
    return 1.0 if text.strip() == task["answer"] else 0.0


def check_task(rec, where):
    if not isinstance(rec, dict) or rec.get("family") not in FAMILIES:
        raise ValueError(f"{where}: a verifiable task needs a 'family' in {list(FAMILIES)}")
    if not isinstance(rec.get("messages"), list) or not rec["messages"] or not isinstance(rec.get("answer"), str):
        raise ValueError(f"{where}: a verifiable task needs 'messages' (the prompt) and 'answer' (a string)")
    if rec["family"] == "code" and not isinstance(rec.get("tests"), str):
        raise ValueError(f"{where}: a code task needs 'tests' (Python asserts)")
    return rec


def load_tasks(path):
    return [check_task(rec, f"{path}:{n}") for n, rec in read_jsonl(path)]


def write_tasks(path, tasks):
    from quark.io import atomic_write_text
    atomic_write_text(path, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks))


def tasks_for(spec, split, path_of=Path):
    """The tasks a step's setting names: comma-separated families, or a tasks JSONL whose held-out split
    lies beside it as NAME.heldout.jsonl (path_of resolves the setting, e.g. RunDir.path)."""
    if all(f.strip() in FAMILIES for f in spec.split(",")):
        return make_tasks([f.strip() for f in spec.split(",")], split)
    path = Path(path_of(spec))
    if split == "heldout":
        path = path.with_name(path.name.removesuffix(".jsonl") + ".heldout.jsonl")
    if not path.is_file():
        raise ValueError(f"tasks: {spec!r} names neither task families {list(FAMILIES)} nor a file ({path} is missing)")
    return load_tasks(path)


def reference_records(tasks):
    """Tasks -> chat records (prompt + the reference answer) for supervised fine-tuning."""
    return [{"messages": t["messages"] + [{"role": "assistant", "content": t["answer"]}]} for t in tasks]


def solved(model, chat, tasks, max_new_tokens=24):
    """Greedy answers of `model` through the engine, verified -> one 0/1 score per task (the paired items).
    chat: the model's chat format (quark.chat), or a tokenizer with Quark's chat tokens."""
    from quark.chat import QuarkChat, TemplateChat
    from quark.infer.engine import Engine
    from quark.infer.sampling import SamplingParams
    chat = chat if isinstance(chat, (QuarkChat, TemplateChat)) else QuarkChat(chat)
    engine = Engine(model, max_batch=16, stop_ids=chat.stop_ids, fuse=False)
    prompts = [chat.encode(t["messages"], add_generation_prompt=True)[0] for t in tasks]
    reqs = engine.run(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0))
    return [verify(t, chat.tokenizer.decode(r.output_ids)) for t, r in zip(tasks, reqs)]
