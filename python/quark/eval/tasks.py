"""Evaluation tasks from local YAML + JSONL files, in a format close to lm-evaluation-harness:

    task: python_builtins            # name
    dataset_path: python_builtins.jsonl   # relative to the YAML file
    output_type: multiple_choice     # | generate_until | code
    doc_to_text: "Q: {{question}}\nA:"    # Jinja2 template over a JSONL record (as lm-eval)
    doc_to_choice: "{{choices}}"     # multiple_choice: a list field
    doc_to_target: "{{answer}}"      # index of the right choice, or the expected string
    target_delimiter: " "
    generation_kwargs: {until: ["\n"], max_gen_toks: 32}
    answer_regex: ""                 # generate_until: compare the last match of this regex (its first
                                     # non-empty group) instead of the whole output (GSM8K-style answers)
    # code tasks: doc_to_text is the prompt (signature + docstring); the completion is appended
    # (prompt_in_program: false: the completion alone is the program, MBPP-style), then the record's
    # `test` code runs in the sandbox; num_samples n and k for pass@k.

Scoring: multiple choice by log-likelihood (acc; acc_norm divides by the choice's UTF-8 length),
generation by exact match after stripping, code by unbiased pass@k (Chen et al. 2021). Besides the
means, evaluate_task returns every document's scores under "items" (with a content hash of the
document as its id): the regression gate compares two models item by item (quark.eval.gate).
Public benchmarks in their published formats load through quark.eval.public.
"""
import ast
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jinja2
import numpy as np
import yaml

from quark.config import ConfigError, from_dict
from quark.sandbox import run_program

BUILTIN_DIR = Path(__file__).parent / "tasks"
_env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclass
class TaskSpec:
    task: str
    dataset_path: str
    output_type: Literal["multiple_choice", "generate_until", "code"]
    doc_to_text: str
    doc_to_target: str = ""
    doc_to_choice: str = ""
    target_delimiter: str = " "
    generation_kwargs: dict = field(default_factory=dict)
    num_samples: int = 1
    k: list = field(default_factory=lambda: [1])
    temperature: float = 0.8
    timeout: float = 5.0
    limit: int = 0
    answer_regex: str = ""
    prompt_in_program: bool = True

    def __post_init__(self):
        if self.answer_regex:
            try:
                re.compile(self.answer_regex)
            except re.error as e:
                raise ConfigError(f"task {self.task}: answer_regex {self.answer_regex!r} is not a valid regular expression ({e})") from None


def load_task(path):
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"task file {path}: {e}") from None
    spec = from_dict(TaskSpec, raw, where=str(path))
    data = path.parent / spec.dataset_path
    if not data.exists():
        raise ConfigError(f"{path}: dataset_path {spec.dataset_path!r} does not exist")
    docs = []
    with open(data, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{data}:{n}: not valid JSON ({e.msg})") from None
    return spec, docs[: spec.limit or None]


def builtin_tasks():
    return sorted(BUILTIN_DIR.glob("*.yaml"))


def render(template, doc):
    return _env.from_string(template).render(**doc)


def _value(template, doc):
    text = render(template, doc).strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def doc_id(doc):
    """A document's identity across runs and models: a hash of its content."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def normalize_answer(text):
    """Numbers as GSM8K writes them: no thousands commas, no currency sign, no final period."""
    return text.strip().replace(",", "").replace("$", "").rstrip(".").strip()


def extract_answer(text, pattern):
    matches = list(re.finditer(pattern, text))
    if not matches:
        return ""
    m = matches[-1]
    return next((g for g in m.groups() if g), m.group(0))


def _score_docs(lm, spec, docs, seed):
    """[{metric: score}] per document."""
    kw = spec.generation_kwargs
    out = []
    for i, doc in enumerate(docs):
        if spec.output_type == "multiple_choice":
            ctx = render(spec.doc_to_text, doc)
            choices = _value(spec.doc_to_choice, doc)
            target = int(_value(spec.doc_to_target, doc))
            scores = lm.loglikelihood([(ctx, spec.target_delimiter + str(c)) for c in choices])
            ll = np.array([s for s, _ in scores])
            lens = np.array([len((spec.target_delimiter + str(c)).encode()) for c in choices])
            out.append({"acc": float(ll.argmax() == target), "acc_norm": float((ll / lens).argmax() == target),
                        "chance": 1 / len(choices)})
        elif spec.output_type == "generate_until":
            gen = lm.generate(render(spec.doc_to_text, doc), kw.get("max_gen_toks", 32), kw.get("until", ["\n"]))
            if spec.answer_regex:   # the target as written ("1,200" is a number here, not a Python tuple)
                target = render(spec.doc_to_target, doc)
                hit = normalize_answer(extract_answer(gen, spec.answer_regex)) == normalize_answer(target)
            else:
                hit = gen.strip() == str(_value(spec.doc_to_target, doc)).strip()
            out.append({"exact_match": float(hit)})
        else:
            # n samples; the sandbox runs each completion, then the tests, and passes it only on its
            # harness's report that the tests finished (an early exit in the completion is a failure)
            prompt = render(spec.doc_to_text, doc)
            c = 0
            for s in range(spec.num_samples):
                temp = 0.0 if spec.num_samples == 1 else spec.temperature
                completion = lm.generate(prompt, kw.get("max_gen_toks", 128), kw.get("until", ["\ndef ", "\nclass "]),
                                         temperature=temp, seed=seed * 1000 + i * 100 + s)
                program = (prompt if spec.prompt_in_program else "") + completion + "\n"
                c += run_program(program, doc["test"] + "\n", timeout=spec.timeout).passed
            out.append({f"pass@{k}": pass_at_k(spec.num_samples, c, k) for k in spec.k})
    return out


def evaluate_task(lm, spec, docs, seed=0):
    """-> {metric: mean over documents, "n": count, "items": [{"id", metric: score}] in document order}."""
    scores = _score_docs(lm, spec, docs, seed)
    names = {"multiple_choice": ["acc", "acc_norm", "chance"], "generate_until": ["exact_match"],
             "code": [f"pass@{k}" for k in spec.k]}[spec.output_type]
    means = {m: float(np.mean([s[m] for s in scores])) if scores else 0.0 for m in names}
    items = [{"id": doc_id(d), **{m: v for m, v in s.items() if m != "chance"}} for d, s in zip(docs, scores)]
    return means | {"n": len(docs), "items": items}
