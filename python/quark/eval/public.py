"""Public benchmarks from local copies in their published formats: HellaSwag, ARC, MMLU, GSM8K,
HumanEval and MBPP. Nothing is downloaded: the user points at the files they have.

    spec, docs = load("hellaswag", "hellaswag_val.jsonl")      # -> quark.eval.tasks.evaluate_task
    quark eval RUN --tasks hellaswag=/data/hellaswag_val.jsonl mmlu=/data/mmlu/test

A path is a file (.jsonl, .json, .parquet, .csv; any of them .gz) or a directory, read in sorted
order (e.g. MMLU's data/test/*.csv, or a Hugging Face snapshot's *.parquet shards). Accepted schemas:
- hellaswag: ctx_a, ctx_b, activity_label, endings, label (rowanz/hellaswag jsonl; Rowan/hellaswag)
- arc: question {stem, choices [{text, label}]}, answerKey (allenai ARC jsonl); or question,
  choices {text, label}, answerKey (allenai/ai2_arc)
- mmlu: question, choices, answer (0-3) (cais/mmlu); or header-less CSV rows question,A,B,C,D,letter
  (hendrycks/test data/), the subject taken from the file name
- gsm8k: question, answer ("... #### 42") (openai/grade-school-math jsonl; openai/gsm8k)
- humaneval: task_id, prompt, canonical_solution, test, entry_point (HumanEval.jsonl.gz)
- mbpp: text, code, test_list, test_setup_code (mbpp.jsonl); or prompt, code, test_list,
  test_imports (sanitized-mbpp.json)
Prompts follow lm-evaluation-harness's task definitions (zero-shot), so numbers are comparable to its
`--num_fewshot 0` runs. HumanEval and MBPP completions run in the sandbox (quark.sandbox).
"""
import csv
import gzip
import io
import json
import re
from pathlib import Path

from quark.config import ConfigError
from quark.eval.tasks import TaskSpec

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def _open_text(path):
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def _kind(path):
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _read_file(path):
    kind = _kind(path)
    if kind == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pylist()
    text = _open_text(path)
    if kind == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return out
    if kind == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    if kind == ".csv":
        return [{"_row": row, "_file": path.name} for row in csv.reader(io.StringIO(text)) if row]
    raise ConfigError(f"{path}: unknown format; expected one of {', '.join(SUFFIXES)} (optionally .gz)")


def read_records(path):
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
        if not files:
            raise ConfigError(f"{path}: no {'/'.join(SUFFIXES)} files in this directory")
        return [r for f in files for r in _read_file(f)]
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    return _read_file(path)


def _need(rec, keys, name, n):
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ConfigError(f"{name} record {n}: missing field {missing[0]!r} (has {', '.join(sorted(rec)) or 'nothing'}); "
                          f"is this the published {name} format?")


def _mc_spec(name):
    return TaskSpec(task=name, dataset_path="", output_type="multiple_choice", doc_to_text="{{query}}",
                    doc_to_choice="{{choices}}", doc_to_target="{{gold}}")


def _hellaswag_text(text):
    # as lm-evaluation-harness: brackets are artifacts of the WikiHow part of HellaSwag
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(records):
    docs = []
    for n, r in enumerate(records):
        _need(r, ("ctx_a", "ctx_b", "activity_label", "endings", "label"), "hellaswag", n)
        if r["label"] in ("", None):
            raise ConfigError(f"hellaswag record {n}: no label (the published test split is unlabelled; use val)")
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        docs.append({"query": _hellaswag_text(r["activity_label"] + ": " + ctx),
                     "choices": [_hellaswag_text(e) for e in r["endings"]], "gold": int(r["label"])})
    return _mc_spec("hellaswag"), docs


def arc(records):
    docs = []
    for n, r in enumerate(records):
        _need(r, ("question", "answerKey"), "arc", n)
        q = r["question"]
        if isinstance(q, dict):      # the allenai jsonl release: question {stem, choices [{text, label}]}
            texts, labels, stem = [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]], q["stem"]
        else:                        # the Hugging Face release: choices {text: [...], label: [...]}
            _need(r, ("choices",), "arc", n)
            texts, labels, stem = list(r["choices"]["text"]), list(r["choices"]["label"]), q
        if r["answerKey"] not in labels:
            raise ConfigError(f"arc record {n}: answerKey {r['answerKey']!r} is not one of the labels {labels}")
        docs.append({"query": f"Question: {stem}\nAnswer:", "choices": texts, "gold": labels.index(r["answerKey"])})
    return _mc_spec("arc"), docs


def mmlu(records):
    docs = []
    for n, r in enumerate(records):
        if "_row" in r:              # hendrycks CSV: question, A, B, C, D, answer letter
            row = r["_row"]
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                raise ConfigError(f"mmlu {r['_file']} row {n}: expected question,A,B,C,D,letter; got {len(row)} fields")
            question, choices, answer = row[0], row[1:5], "ABCD".index(row[5].strip())
        else:
            _need(r, ("question", "choices", "answer"), "mmlu", n)
            question, choices, answer = r["question"], list(r["choices"]), r["answer"]
            answer = "ABCD".index(answer) if isinstance(answer, str) else int(answer)
        if len(choices) != 4 or not 0 <= answer < 4:
            raise ConfigError(f"mmlu record {n}: need 4 choices and an answer in 0-3")
        query = f"{question.strip()}\n" + "".join(f"{k}. {c}\n" for k, c in zip("ABCD", choices)) + "Answer:"
        docs.append({"query": query, "choices": ["A", "B", "C", "D"], "gold": answer})
    return _mc_spec("mmlu"), docs


GSM8K_ANSWER = r"#### (\-?[0-9\.\,]+)|(-?[$0-9.,]{2,})|(-?[0-9]+)"   # strict "#### n", else the last number


def gsm8k(records):
    docs = []
    for n, r in enumerate(records):
        _need(r, ("question", "answer"), "gsm8k", n)
        if "####" not in r["answer"]:
            raise ConfigError(f"gsm8k record {n}: the answer has no '#### <number>' line")
        docs.append({"query": f"Question: {r['question']}\nAnswer:", "target": r["answer"].split("####")[-1].strip()})
    spec = TaskSpec(task="gsm8k", dataset_path="", output_type="generate_until", doc_to_text="{{query}}",
                    doc_to_target="{{target}}", answer_regex=GSM8K_ANSWER,
                    generation_kwargs={"until": ["Question:", "</s>", "<|im_end|>"], "max_gen_toks": 256})
    return spec, docs


def humaneval(records):
    docs = []
    for n, r in enumerate(records):
        _need(r, ("task_id", "prompt", "test", "entry_point"), "humaneval", n)
        docs.append({"task_id": r["task_id"], "prompt": r["prompt"], "test": f"{r['test']}\ncheck({r['entry_point']})\n"})
    spec = TaskSpec(task="humaneval", dataset_path="", output_type="code", doc_to_text="{{prompt}}",
                    generation_kwargs={"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_gen_toks": 512})
    return spec, docs


def mbpp(records):
    docs = []
    for n, r in enumerate(records):
        text = r.get("text", r.get("prompt"))
        _need(r, ("task_id", "test_list"), "mbpp", n)
        if text is None:
            raise ConfigError(f"mbpp record {n}: missing field 'text' (or 'prompt' in the sanitized release)")
        tests = list(r["test_list"])
        setup = "\n".join([r.get("test_setup_code", "") or ""] + list(r.get("test_imports", []) or []))
        query = (f"You are an expert Python programmer, and here is your task: {text} "
                 "Your code should pass these tests:\n\n" + "\n".join(tests[:3]) + "\n[BEGIN]\n")
        docs.append({"task_id": r["task_id"], "query": query, "test": setup.strip() + "\n" + "\n".join(tests) + "\n"})
    spec = TaskSpec(task="mbpp", dataset_path="", output_type="code", doc_to_text="{{query}}", prompt_in_program=False,
                    generation_kwargs={"until": ["[DONE]"], "max_gen_toks": 512})
    return spec, docs


LOADERS = {"hellaswag": hellaswag, "arc": arc, "mmlu": mmlu, "gsm8k": gsm8k, "humaneval": humaneval, "mbpp": mbpp}


def load(name, path, limit=0):
    """-> (TaskSpec, docs) of a public benchmark from the user's local copy at path."""
    if name not in LOADERS:
        raise ConfigError(f"unknown public benchmark {name!r}; known: {', '.join(LOADERS)}")
    spec, docs = LOADERS[name](read_records(path))
    if not docs:
        raise ConfigError(f"{path}: no {name} records")
    return spec, docs[: limit or None]
