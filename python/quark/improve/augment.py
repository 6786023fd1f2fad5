"""Data augmentation for chat-format training data ({"messages": [...]} JSONL):

- noise: character edits (swap, drop, duplicate) and word dropout on user turns, at a set rate,
  so the model learns to answer imperfect prompts; deterministic for a seed.
- paraphrase: a model rewrites the user turn; rewrites that are empty, identical, or far from the
  original length are dropped.
- roundtrip (code <-> docstring): for records whose answer is Python code, the model writes a
  docstring for the code and code for that docstring; only syntactically valid code is kept.
"""
import ast
import json
import random

from quark.io import atomic_write_text, read_jsonl


def noise(text, rng, rate=0.05):
    words = [w for w in text.split(" ") if not (len(text.split(" ")) > 3 and rng.random() < rate / 2)]
    chars = list(" ".join(words))
    out, i = [], 0
    while i < len(chars):
        c, r = chars[i], rng.random()
        if r < rate / 3 and i + 1 < len(chars):
            out += [chars[i + 1], c]
            i += 2
            continue
        if r < 2 * rate / 3:
            pass                             # drop
        elif r < rate:
            out += [c, c]                    # duplicate
        else:
            out.append(c)
        i += 1
    return "".join(out)


def paraphrase(lm, text, seed=0, max_new_tokens=96):
    prompt = f"Rewrite the following in other words.\nText: {text}\nRewritten:"
    out = lm.generate(prompt, max_new_tokens=max_new_tokens, until=["\n"], temperature=0.7, seed=seed).strip()
    if not out or out == text.strip() or not 0.5 <= len(out) / max(len(text), 1) <= 2.0:
        return None
    return out


def valid_python(code):
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        return False


def roundtrip(lm, code, seed=0):
    """-> (docstring, new_code) or None: code -> docstring -> code, kept only if the code parses."""
    doc = lm.generate(f"{code}\n# Summary of the code above in one sentence:\n#", max_new_tokens=48,
                      until=["\n"], seed=seed).strip()
    if not doc:
        return None
    new_code = lm.generate(f'# {doc}\ndef ', max_new_tokens=128, until=["\n\n\n", "\nclass "], seed=seed + 1)
    new_code = "def " + new_code
    return (doc, new_code) if valid_python(new_code) else None


def augment_records(records, method, lm=None, copies=1, seed=0, rate=0.05):
    rng = random.Random(seed)
    out, stats = [], {"in": 0, "out": 0, "rejected": 0}
    for n, rec in enumerate(records):
        stats["in"] += 1
        msgs = rec["messages"]
        for c in range(copies):
            s = seed * 100003 + n * 101 + c
            if method == "noise":
                new = [dict(m, content=noise(m["content"], rng, rate)) if m["role"] == "user" else m for m in msgs]
            elif method == "paraphrase":
                user = next((m for m in msgs if m["role"] == "user"), None)
                text = paraphrase(lm, user["content"], seed=s) if user else None
                new = None if text is None else [dict(m, content=text) if m is user else m for m in msgs]
            elif method == "roundtrip":
                answer = next((m for m in msgs if m["role"] == "assistant"), None)
                pair = roundtrip(lm, answer["content"], seed=s) if answer and valid_python(answer["content"]) else None
                new = None if pair is None else [{"role": "user", "content": f"Write a Python function: {pair[0]}"},
                                                 {"role": "assistant", "content": pair[1]}]
            else:
                raise ValueError(f"method must be noise, paraphrase or roundtrip, got {method!r}")
            if new is None:
                stats["rejected"] += 1
                continue
            out.append({"messages": new, "meta": {"augmented": method, "source_line": n + 1}})
            stats["out"] += 1
    return out, stats


def configure_parser(p):
    p.add_argument("input", help="chat JSONL ({'messages': [...]} per line)")
    p.add_argument("output", help="augmented JSONL to write")
    p.add_argument("--method", choices=["noise", "paraphrase", "roundtrip"], default="noise")
    p.add_argument("--model", default=None, help="model or run directory (paraphrase / roundtrip)")
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.05, help="noise rate")
    p.add_argument("--seed", type=int, default=0)


def run_cli(args):
    from quark.chat import validate_messages
    records = []
    for n, rec in read_jsonl(args.input):
        validate_messages(rec.get("messages") if isinstance(rec, dict) else None, where=f"{args.input}:{n}")
        records.append(rec)
    lm = None
    if args.method != "noise":
        if not args.model:
            print(f"error: --model is required for {args.method}")
            return 2
        from quark.eval.lm import LanguageModel
        lm = LanguageModel.from_path(args.model)
    out, stats = augment_records(records, args.method, lm, args.copies, args.seed, args.rate)
    atomic_write_text(args.output, "".join(json.dumps(r) + "\n" for r in out))
    print(json.dumps(stats))
    return 0
