"""Evaluation tasks from local YAML + JSONL files, in a format close to lm-evaluation-harness:

    task: python_builtins            # name
    dataset_path: python_builtins.jsonl   # relative to the YAML file
    output_type: multiple_choice     # | generate_until | code
    doc_to_text: "Q: {{question}}\nA:"    # Jinja2 template over a JSONL record (as lm-eval)
    doc_to_choice: "{{choices}}"     # multiple_choice: a list field
    doc_to_target: "{{answer}}"      # index of the right choice, or the expected string
    target_delimiter: " "
    generation_kwargs: {until: ["\n"], max_gen_toks: 32}
    # code tasks: doc_to_text is the prompt (signature + docstring); the completion is appended,
    # then the record's `test` code runs in the sandbox; num_samples n and k for pass@k.

Scoring: multiple choice by log-likelihood (acc; acc_norm divides by the choice's UTF-8 length),
generation by exact match after stripping, code by unbiased pass@k (Chen et al. 2021).
"""
import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jinja2
import numpy as np
import yaml

from quark.config import ConfigError, from_dict
from quark.eval.sandbox import run_program

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


def evaluate_task(lm, spec, docs, seed=0):
    if spec.output_type == "multiple_choice":
        correct = correct_norm = 0
        for doc in docs:
            ctx = render(spec.doc_to_text, doc)
            choices = _value(spec.doc_to_choice, doc)
            target = int(_value(spec.doc_to_target, doc))
            scores = lm.loglikelihood([(ctx, spec.target_delimiter + str(c)) for c in choices])
            ll = np.array([s for s, _ in scores])
            lens = np.array([len((spec.target_delimiter + str(c)).encode()) for c in choices])
            correct += int(ll.argmax() == target)
            correct_norm += int((ll / lens).argmax() == target)
        n = max(len(docs), 1)
        return {"acc": correct / n, "acc_norm": correct_norm / n, "n": len(docs),
                "chance": float(np.mean([1 / len(_value(spec.doc_to_choice, d)) for d in docs])) if docs else 0.0}
    if spec.output_type == "generate_until":
        kw = spec.generation_kwargs
        hits = 0
        for doc in docs:
            out = lm.generate(render(spec.doc_to_text, doc), kw.get("max_gen_toks", 32), kw.get("until", ["\n"]))
            hits += int(out.strip() == str(_value(spec.doc_to_target, doc)).strip())
        return {"exact_match": hits / max(len(docs), 1), "n": len(docs)}
    # code: n samples per problem; the sandbox runs each completion, then the tests, and passes it only on
    # its harness's report that the tests finished (an early exit in the completion is a failure)
    per_k = {k: [] for k in spec.k}
    kw = spec.generation_kwargs
    for i, doc in enumerate(docs):
        prompt = render(spec.doc_to_text, doc)
        c = 0
        for s in range(spec.num_samples):
            temp = 0.0 if spec.num_samples == 1 else spec.temperature
            completion = lm.generate(prompt, kw.get("max_gen_toks", 128), kw.get("until", ["\ndef ", "\nclass "]),
                                     temperature=temp, seed=seed * 1000 + i * 100 + s)
            c += run_program(prompt + completion + "\n", doc["test"] + "\n", timeout=spec.timeout).passed
        for k in spec.k:
            per_k[k].append(pass_at_k(spec.num_samples, c, k))
    return {f"pass@{k}": float(np.mean(v)) if v else 0.0 for k, v in per_k.items()} | {"n": len(docs)}
