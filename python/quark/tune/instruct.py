"""Instruction data from the run's own corpus, plus self-instruct generation with a teacher model.

Corpus pairs (deterministic, no model needed):
- code (run_dir/scrape/files-*.jsonl, Python files parsed with ast):
  function signature -> its docstring, docstring -> the function's code, module/class -> its docstring;
- docs (run_dir/clean/docs.jsonl): section title -> the paragraph under it, page title -> its first paragraph;
- safety: harmful requests (the *build* intent families of quark.safety_data) -> the refusal template,
  so SFT teaches refusals without seeing the families the red-team evaluation uses;
- tool use, with the built-in tools of quark.retrieval.tools listed as the agent lists them: a docs
  question -> a search_docs call (OpenAI tool_calls; the chat template renders it as
  <tool_call>...</tool_call>, the syntax `quark serve` and the agent parse) -> the passage as the tool's
  observation -> the answer; and an arithmetic question -> a calculator call -> its result -> an answer
  that states it, so the run's own model learns to emit calls and use what comes back;
- verifiable tasks (quark.verifiable, training split): prompt -> reference answer, so the SFT model is a
  warm start for GRPO on the same kinds of task (their held-out split stays out of every step's training).
Self-instruct (Wang et al. 2022, "Self-Instruct"): a teacher model is shown a few sampled instructions,
writes a new one and answers it; kept only if well-formed and not too similar (word-set Jaccard) to
any instruction already in the pool.
All pairs are filtered (length bounds, token budget under the run's tokenizer and chat format, a base
model's own when the run starts from one) and deduplicated
(normalised prompt, normalised response), then split into train/val by a seeded shuffle.

Step `instruct` -> run_dir/instruct/{train,val}.jsonl (chat records) and stats.json.
"""
import ast
import hashlib
import inspect
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quark.config import ConfigError, Step, from_dict
from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams
from quark.io import atomic_open, atomic_write_json, read_jsonl
from quark.retrieval.tools import ToolResult, builtin_tools, calculate
from quark.rundir import RunDir
from quark.safety_data import REFUSAL, harmful_requests
from quark.verifiable import FAMILIES, make_tasks, reference_records

SYSTEM = "You are Quark, a concise assistant for Python and its documentation."
DOC_PROMPTS = ("Write the docstring for this Python function:\n{sig}", "What does `{sig}` do?",
               "Document this function in one paragraph:\n{sig}")
CODE_PROMPTS = ("Write a Python function `{name}` that does this: {doc}", "Implement `{name}`. {doc}")
# the title in quotes, as a search_docs query writes it in JSON: the same tokens in both, so a call copies them
SECTION_PROMPTS = ("Explain \"{title}\".", "What does the documentation say about \"{title}\"?", "Tell me about \"{title}\".")


@dataclass
class InstructConfig:
    max_examples: int = 1500          # cap after filtering (a seeded sample)
    val_fraction: float = 0.05
    min_response_chars: int = 20
    max_response_chars: int = 600
    max_code_chars: int = 500         # docstring -> code pairs only for functions up to this size
    max_tokens: int = 0               # token budget per example under the run's chat format; 0: 256
    system_prompt: bool = False       # prepend the SYSTEM message to every record
    safety_examples: int = 40         # harmful request -> refusal records (0: none; at most 10% of the data)
    tool_examples: int = 40           # docs question -> search_docs call -> answer records (0: none; one per docs pair at most)
    calculator_examples: int = 40     # arithmetic question -> calculator call -> answer records (0: none)
    verifiable_examples: int = 0      # records from verifiable tasks' training split (0: none)
    verifiable_tasks: str = "add,format,code"   # their families (quark.verifiable)
    self_instruct: int = 0            # new instructions to generate with the teacher model (0: off)
    teacher: str = "auto"             # model dir, a model step, or "auto": the latest model of the run
    max_files: int = 0                # code files to read (0: all)
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"instruct.val_fraction: must be in (0, 0.5), got {self.val_fraction}")
        if self.max_examples < 10:
            raise ConfigError(f"instruct.max_examples: must be >= 10, got {self.max_examples}")
        unknown = [f for f in self.verifiable_tasks.split(",") if f.strip() not in FAMILIES]
        if unknown:
            raise ConfigError(f"instruct.verifiable_tasks: unknown families {unknown}; known: {list(FAMILIES)}")


def validate_config(cfg):
    return from_dict(InstructConfig, cfg, "instruct")


def chat(prompt, response):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def first_paragraph(text, max_chars=600):
    return clip_sentences(" ".join(inspect.cleandoc(text).split("\n\n")[0].split()), max_chars)


def clip_sentences(text, max_chars):
    """Cut at the last sentence end that fits, so responses end cleanly."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[: end + 1] if end > max_chars // 3 else ""


def signature(node):
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){ret}"


def code_pairs(source, path, rng, s: InstructConfig):
    """Pairs from one Python file; a file that does not parse yields none."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    mod_doc = ast.get_docstring(tree)
    if mod_doc:
        out.append(chat(f"What is the Python module `{Path(path).stem}` for?", first_paragraph(mod_doc)))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node)
            if doc:
                out.append(chat(f"What does the class `{node.name}` in `{Path(path).stem}` do?", first_paragraph(doc)))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            para, sig = first_paragraph(doc), signature(node)
            out.append(chat(rng.choice(DOC_PROMPTS).format(sig=sig), para))
            code = ast.get_source_segment(source, node)
            if code and len(code) <= s.max_code_chars:
                out.append(chat(rng.choice(CODE_PROMPTS).format(name=node.name, doc=para), inspect.cleandoc(code)))
    return out


HEADING = re.compile(r"^[A-Za-z0-9_.()\-:, ]{3,70}$")


def doc_pairs(text, title, rng, max_chars=600):
    """Section title -> the paragraph under it; page title -> the first paragraph. Each record keeps its
    title as "topic" (the query of its search_docs record)."""
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
    out = []
    for head, body in zip(blocks, blocks[1:]):
        if "\n" not in head and HEADING.match(head) and not head.endswith(".") and len(body) >= 40 \
                and not HEADING.match(body):
            topic = head.strip(":")
            out.append(chat(rng.choice(SECTION_PROMPTS).format(title=topic), clip_sentences(" ".join(body.split()), max_chars))
                       | {"topic": topic})
    if title and blocks:
        body = next((b for b in blocks if len(b) >= 60), None)
        if body:
            out.append(chat(f"Summarize the documentation page \"{title}\".", clip_sentences(" ".join(body.split()), max_chars))
                       | {"topic": title})
    return out


TOOLS = builtin_tools().openai_tools()     # every tool record lists the agent's tools, in its order
# the expression in quotes, as in the call's JSON: its tokens are the same in both, so the call copies them
CALC_PROMPTS = ('What is "{e}"?', 'Compute "{e}".', 'Calculate "{e}" exactly.')


def tool_record(question, name, arguments, result, answer):
    """The question, one call, the tool's observation (as the agent writes it) and the answer."""
    call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    observation = ToolResult(name, True, result).to_message()["content"]
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": question}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": observation}, {"role": "assistant", "content": answer}]}


def tool_records(pairs, n, rng):
    """Docs question/answer pairs -> search_docs records: the query is the topic, the passage comes back
    and is the answer."""
    return [tool_record(r["messages"][-2]["content"], "search_docs", {"query": r["topic"]},
                        [{"doc": r.get("doc", ""), "text": r["messages"][-1]["content"]}], r["messages"][-1]["content"])
            for r in rng.sample(pairs, min(n, len(pairs)))]


def calculator_records(n, rng):
    """Arithmetic a small model cannot do itself -> calculator records; the answer states the result."""
    out = []
    for _ in range(n):
        e = f"{rng.randrange(10, 1000)}{rng.choice('+-*')}{rng.randrange(10, 100)}"
        value = calculate(e)
        out.append(tool_record(rng.choice(CALC_PROMPTS).format(e=e), "calculator", {"expression": e}, value,
                               f"The calculator says {value}."))
    return out


def safety_pairs(n, rng):
    reqs = harmful_requests("build")
    return [chat(r["prompt"], REFUSAL) for r in rng.sample(reqs, min(n, len(reqs)))]


def norm(text):
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def dedup(records):
    """Drop records whose normalised prompt or normalised response was already seen."""
    seen, out = set(), []
    for r in records:
        keys = [("p", norm(r["messages"][-2]["content"])), ("r", norm(r["messages"][-1]["content"]))]
        keys = [hashlib.blake2b(f"{k}:{v}".encode(), digest_size=8).digest() for k, v in keys]
        if any(k in seen for k in keys):
            continue
        seen.update(keys)
        out.append(r)
    return out


def keep(rec, s: InstructConfig, fmt=None, max_tokens=256):
    resp = rec["messages"][-1]["content"]
    if not (s.min_response_chars <= len(resp) <= max(s.max_response_chars, s.max_code_chars)):
        return False
    if sum(c.isprintable() or c in "\n\t" for c in resp) < 0.98 * len(resp):
        return False
    return fits(rec, fmt, max_tokens)


def fits(rec, fmt, max_tokens):
    """Within the token budget under the run's chat format (no format yet: True)."""
    if fmt is None:
        return True
    try:
        ids, _ = fmt.encode(rec["messages"], tools=rec.get("tools"))
    except ValueError:   # a checkpoint's own template may refuse a record (e.g. tool turns it has no syntax for)
        return False
    return len(ids) <= max_tokens


def jaccard(a, b):
    a, b = set(a.split()), set(b.split())
    return len(a & b) / max(1, len(a | b))


@torch.no_grad()
def self_instruct(model, fmt, pool, n, rng, max_new_tokens=48, max_similarity=0.7, attempts_per_item=3):
    """Generate up to n new (instruction, response) records with `model` as the teacher, prompted in its
    chat format (quark.chat: Quark's, or an HF checkpoint's own template and eos ids).
    Returns (records, stats) where stats counts the attempts and why candidates were rejected."""
    seeds = [r["messages"][-2]["content"] for r in pool]
    known = [norm(x) for x in seeds]
    out, stats = [], {"attempts": 0, "empty": 0, "similar": 0, "kept": 0}

    engine = Engine(model, max_batch=1, stop_ids=fmt.stop_ids)

    def complete(messages, limit):
        ids, _ = fmt.encode(messages, add_generation_prompt=True)
        ids = ids[-(model.config.max_seq_len - limit):]
        params = SamplingParams(max_tokens=limit, temperature=0.8, top_k=40, seed=rng.randrange(2**31))
        return fmt.tokenizer.decode(engine.run([ids], params)[0].output_ids).strip()

    for _ in range(n * attempts_per_item):
        if len(out) >= n or not seeds:
            break
        stats["attempts"] += 1
        shots = rng.sample(seeds, min(3, len(seeds)))
        ask = "Here are some tasks:\n" + "\n".join(f"{i + 1}. {t}" for i, t in enumerate(shots)) + "\nWrite one new task."
        instruction = complete([{"role": "user", "content": ask}], max_new_tokens).split("\n")[0].strip()
        if len(instruction) < 10:
            stats["empty"] += 1
            continue
        ni = norm(instruction)
        if any(jaccard(ni, k) > max_similarity for k in known):
            stats["similar"] += 1
            continue
        response = complete([{"role": "user", "content": instruction}], max_new_tokens)
        if len(response) < 5:
            stats["empty"] += 1
            continue
        known.append(ni)
        out.append(chat(instruction, response))
    stats["kept"] = len(out)
    return out, stats


def corpus_records(run_dir, s: InstructConfig, rng):
    run_dir = RunDir.of(run_dir)
    code, docs, files = [], [], 0
    paths = run_dir.shards("scrape", "files")
    for path in paths:
        for n, rec in read_jsonl(path):
            if not isinstance(rec, dict) or "text" not in rec or "path" not in rec:
                raise ValueError(f"{path}:{n}: expected fields 'path' and 'text'")
            if str(rec.get("language", "")).lower() != "python" and not str(rec["path"]).endswith(".py"):
                continue
            files += 1
            code += code_pairs(rec["text"], rec["path"], rng, s)
            if s.max_files and files >= s.max_files:
                break
        if s.max_files and files >= s.max_files:
            break
    if run_dir.has("clean", "docs.jsonl"):
        clean = run_dir.input("clean", "docs.jsonl")
        for n, rec in read_jsonl(clean):
            if not isinstance(rec, dict) or "text" not in rec:
                raise ValueError(f"{clean}:{n}: expected field 'text'")
            meta = rec.get("meta") or {}
            docs += [r | {"doc": str(rec.get("id", ""))} for r in
                     doc_pairs(rec["text"], meta.get("title") if isinstance(meta, dict) else None, rng, s.max_response_chars)]
    if not paths and not run_dir.has("clean", "docs.jsonl"):
        raise FileNotFoundError(f"{run_dir.root} has neither scrape/files-*.jsonl nor clean/docs.jsonl; run the data steps first")
    return code, docs, files


def write_jsonl(path, records):
    import json
    with atomic_open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def run_step(run_dir, cfg: dict) -> dict:
    s = from_dict(InstructConfig, cfg, "instruct")
    seed = s.seed
    run_dir = RunDir.of(run_dir)
    rng = random.Random(seed)
    code, docs, files = corpus_records(run_dir, s, rng)
    fmt = run_dir.chat() if run_dir.has("tokenizer", "tokenizer.json") or run_dir.base_model() else None
    max_tokens = s.max_tokens or 256
    pool = dedup([r for r in code + docs if keep(r, s, fmt, max_tokens)])
    rng.shuffle(pool)
    # at most 10% refusals, so a small corpus does not teach the model to refuse everything
    safety = safety_pairs(min(s.safety_examples, len(pool) // 10), rng) if s.safety_examples else []
    # tool use over the docs pairs: added after dedup (a record repeats its pair's answer), one per pair at most
    doc_ids = {id(r) for r in docs}
    tools = [r for r in tool_records([r for r in pool if id(r) in doc_ids], s.tool_examples, rng)
             if keep(r, s, fmt, max_tokens)]
    # generated, so not bounded by the corpus; short answers: only the token budget applies
    tools += [r for r in calculator_records(s.calculator_examples, rng) if fits(r, fmt, max_tokens)]
    tasks = make_tasks([f.strip() for f in s.verifiable_tasks.split(",")], "train")
    verifiable = [r for r in reference_records(rng.sample(tasks, min(s.verifiable_examples, len(tasks))))
                  if fits(r, fmt, max_tokens)]
    pool = pool[: max(0, s.max_examples - len(safety) - len(tools) - len(verifiable))]
    gen_stats = {}
    if s.self_instruct:
        from quark.model.io import load_model
        teacher = run_dir.model(s.teacher)
        teacher_chat = run_dir.chat(teacher)
        new, gen_stats = self_instruct(load_model(teacher), teacher_chat, pool, s.self_instruct, rng)
        pool += dedup([r for r in new if keep(r, s, fmt or teacher_chat, max_tokens)])
    records = pool + safety + tools + verifiable
    if s.system_prompt:
        records = [r | {"messages": [{"role": "system", "content": SYSTEM}] + r["messages"]} for r in records]
    rng.shuffle(records)
    n_val = max(1, int(len(records) * s.val_fraction))
    val, train = records[:n_val], records[n_val:]
    if len(train) < 2:
        raise ValueError(f"only {len(records)} instruction pairs survived filtering; the corpus is too small")
    out = run_dir.output("instruct")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    stats = {"python_files": files, "code_pairs": len(code), "doc_pairs": len(docs), "safety_pairs": len(safety),
             "tool_records": len(tools), "verifiable_records": len(verifiable),
             "self_instruct": gen_stats, "train": len(train), "val": len(val), "settings": asdict(s)}
    atomic_write_json(out / "stats.json", stats)
    return stats


STEP = Step(name="instruct", config=InstructConfig, run=run_step, check=validate_config)
