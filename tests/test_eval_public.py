"""Public benchmark loaders on fixtures written in each published schema (records shaped exactly as
the released files: field names, nesting, label types), scored end to end: an answerer that knows the
gold answer (looked up in the raw record, not through the loader) gets everything right, one that
does not gets nothing, and code answers run in the sandbox."""
import csv
import gzip
import json

import pytest

from quark.config import ConfigError
from quark.eval.public import load, read_records
from quark.eval.tasks import evaluate_task, render

HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
     "ctx_b": "the lady", "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady", "split": "val",
     "split_type": "indomain", "label": 3, "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                                                        "pulls a rope attached to the barbell.",
                                                        "stands and lifts the weight over her head."],
     "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to make a garden bed [title] Pick a spot.",
     "ctx_b": "[step] choose", "ctx": "...", "split": "val", "split_type": "zeroshot", "label": 0,
     "endings": ["a sunny place [substeps] away from trees.", "a shady place.", "the roof.", "a closet."],
     "source_id": "wikihow~1"},
]
ARC_JSONL = [
    {"id": "Mercury_7175875", "question": {"stem": "An astronomer observes that a planet rotates faster after a meteorite "
     "impact. Which is the most likely effect of this increase in rotation?", "choices": [
        {"text": "Planetary density will decrease.", "label": "A"}, {"text": "Planetary years will become longer.", "label": "B"},
        {"text": "Planetary days will become shorter.", "label": "C"},
        {"text": "Planetary gravity will become stronger.", "label": "D"}]}, "answerKey": "C"},
    {"id": "NYSEDREGENTS_2015_4_8", "question": {"stem": "Which form of energy is produced when a rubber band vibrates?",
     "choices": [{"text": "chemical", "label": "1"}, {"text": "light", "label": "2"}, {"text": "electrical", "label": "3"},
                 {"text": "sound", "label": "4"}]}, "answerKey": "4"},
]
ARC_HF = [{"id": r["id"], "question": r["question"]["stem"],
           "choices": {"text": [c["text"] for c in r["question"]["choices"]], "label": [c["label"] for c in r["question"]["choices"]]},
           "answerKey": r["answerKey"]} for r in ARC_JSONL]
MMLU_ROWS = [["Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.", "0", "4", "2", "6", "B"],
             ["Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.", "8", "2", "24", "120", "C"]]
MMLU_HF = [{"question": r[0], "subject": "abstract_algebra", "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in MMLU_ROWS]
GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
               "in April and May.\n#### 72"},
    {"question": "A shop sells 1,000 pens a week for $1.20 each. What is a week's revenue in dollars?",
     "answer": "1,000 * 1.20 = <<1000*1.2=1200>>1,200\n#### 1,200"},
]
HUMANEVAL = [
    {"task_id": "HumanEval/0", "prompt": "from typing import List\n\n\ndef has_close_elements(numbers: List[float], "
     "threshold: float) -> bool:\n    \"\"\" Check if in given list of numbers, are any two numbers closer to each other "
     "than\n    given threshold.\n    \"\"\"\n",
     "canonical_solution": "    for idx, elem in enumerate(numbers):\n        for idx2, elem2 in enumerate(numbers):\n"
                           "            if idx != idx2:\n                distance = abs(elem - elem2)\n"
                           "                if distance < threshold:\n                    return True\n\n    return False\n",
     "test": "\n\nMETADATA = {\n    'author': 'jt',\n    'dataset': 'test'\n}\n\n\ndef check(candidate):\n"
             "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
             "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
             "    assert candidate([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == False\n",
     "entry_point": "has_close_elements"},
    {"task_id": "HumanEval/2", "prompt": "\n\ndef truncate_number(number: float) -> float:\n    \"\"\" Return the decimal "
     "part of the number.\n    >>> truncate_number(3.5)\n    0.5\n    \"\"\"\n",
     "canonical_solution": "    return number % 1.0\n",
     "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(3.5) == 0.5\n"
             "    assert abs(candidate(1.33) - 0.33) < 1e-6\n",
     "entry_point": "truncate_number"},
]
MBPP = [
    {"text": "Write a function to find the shared elements from the given two lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
     "task_id": 2, "test_setup_code": "",
     "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
                   "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
                   "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))"],
     "challenge_test_list": []},
    {"text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
             "        if n % i == 0:\r\n            result = True\r\n    return result",
     "task_id": 3, "test_setup_code": "",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True", "assert is_not_prime(35) == True"],
     "challenge_test_list": []},
]
MBPP_SANITIZED = [{"source_file": "Benchmark Questions Verification V2.ipynb", "task_id": r["task_id"], "prompt": r["text"],
                   "code": r["code"], "test_imports": [], "test_list": r["test_list"]} for r in MBPP]


def write_jsonl(path, records, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_parquet(path, records):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


class Answerer:
    """Scores the continuation that `gold(context)` names highest (lowest when avoid); generates `gen(prompt)`."""

    def __init__(self, gold=None, gen=None, avoid=False):
        self.gold, self.gen, self.avoid = gold, gen, avoid

    def loglikelihood(self, requests):
        return [(-10.0 if (cont.strip() == self.gold(ctx)) == self.avoid else 0.0, False) for ctx, cont in requests]

    def generate(self, prompt, max_new_tokens=64, until=(), temperature=0.0, seed=0):
        text = self.gen(prompt)
        for s in until:
            if s and s in text:
                text = text[: text.index(s)]
        return text


def score_mc(spec, docs, gold_by_prompt):
    right = evaluate_task(Answerer(gold=lambda ctx: gold_by_prompt[ctx]), spec, docs)
    wrong = evaluate_task(Answerer(gold=lambda ctx: gold_by_prompt[ctx], avoid=True), spec, docs)
    return right, wrong


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_hellaswag_matches_lm_eval_preprocessing(tmp_path, fmt):
    datasets = pytest.importorskip("datasets")
    from lm_eval.tasks.hellaswag.utils import process_docs
    if fmt == "jsonl":      # rowanz/hellaswag: integer labels
        path = write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG)
    else:                   # Rowan/hellaswag on the Hugging Face hub: string labels
        path = write_parquet(tmp_path / "validation.parquet", [{**r, "label": str(r["label"])} for r in HELLASWAG])
    spec, docs = load("hellaswag", path)
    theirs = process_docs(datasets.Dataset.from_list(HELLASWAG))
    assert [(d["query"], d["choices"], d["gold"]) for d in docs] == [(t["query"], t["choices"], t["gold"]) for t in theirs]
    assert docs[2]["query"] == "Home and Garden: How to make a garden bed. Pick a spot. choose"   # [title], [header], [step]
    gold = {d["query"]: r["endings"][int(r["label"])].replace(" [substeps]", "") for d, r in zip(docs, HELLASWAG)}
    right, wrong = score_mc(spec, docs, gold)
    assert right["acc"] == 1.0 and wrong["acc"] == 0.0 and right["chance"] == 0.25


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_arc_both_releases(tmp_path, fmt):
    path = write_jsonl(tmp_path / "ARC-Challenge-Test.jsonl", ARC_JSONL) if fmt == "jsonl" else \
        write_parquet(tmp_path / "test-00000-of-00001.parquet", ARC_HF)
    spec, docs = load("arc", path)
    assert docs[0]["query"] == f"Question: {ARC_JSONL[0]['question']['stem']}\nAnswer:"
    assert [d["gold"] for d in docs] == [2, 3]                  # "C" of A-D, "4" of 1-4
    gold = {d["query"]: next(c["text"] for c in r["question"]["choices"] if c["label"] == r["answerKey"])
            for d, r in zip(docs, ARC_JSONL)}
    right, wrong = score_mc(spec, docs, gold)
    assert right["acc"] == right["acc_norm"] == 1.0 and wrong["acc"] == 0.0


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_mmlu_csv_directory_and_parquet(tmp_path, fmt):
    if fmt == "csv":
        (tmp_path / "test").mkdir()
        with open(tmp_path / "test" / "abstract_algebra_test.csv", "w", newline="") as f:
            csv.writer(f).writerows(MMLU_ROWS)
        path = tmp_path / "test"
    else:
        path = write_parquet(tmp_path / "mmlu.parquet", MMLU_HF)
    spec, docs = load("mmlu", path)
    assert docs[0]["query"] == (MMLU_ROWS[0][0] + "\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert docs[0]["choices"] == ["A", "B", "C", "D"] and [d["gold"] for d in docs] == [1, 2]
    right, wrong = score_mc(spec, docs, {d["query"]: r[5] for d, r in zip(docs, MMLU_ROWS)})
    assert right["acc"] == 1.0 and wrong["acc"] == 0.0


def test_gsm8k_extracts_the_final_number(tmp_path):
    spec, docs = load("gsm8k", write_jsonl(tmp_path / "test.jsonl", GSM8K))
    assert [d["target"] for d in docs] == ["72", "1,200"]
    assert render(spec.doc_to_text, docs[0]) == f"Question: {GSM8K[0]['question']}\nAnswer:"
    answers = {docs[0]["query"]: " 48/2 = 24 in May, so 48 + 24 = 72.\n#### 72\n\nQuestion: next",
               docs[1]["query"]: " The revenue is $1,200."}
    assert evaluate_task(Answerer(gen=answers.get), spec, docs)["exact_match"] == 1.0
    wrong = {docs[0]["query"]: " #### 71", docs[1]["query"]: " 1,200 pens at 1.20 is 1440"}
    assert evaluate_task(Answerer(gen=wrong.get), spec, docs)["exact_match"] == 0.0


def test_humaneval_runs_completions_in_the_sandbox(tmp_path):
    spec, docs = load("humaneval", write_jsonl(tmp_path / "HumanEval.jsonl.gz", HUMANEVAL, gz=True))
    canonical = {r["prompt"]: r["canonical_solution"] for r in HUMANEVAL}
    r = evaluate_task(Answerer(gen=canonical.get), spec, docs)
    assert r["pass@1"] == 1.0 and [i["pass@1"] for i in r["items"]] == [1.0, 1.0]
    wrong = evaluate_task(Answerer(gen=lambda p: "    return 0.5\n"), spec, docs)
    assert [i["pass@1"] for i in wrong["items"]] == [0.0, 0.0]   # 0.5 passes truncate(3.5), not truncate(1.33)


@pytest.mark.parametrize("release", ["mbpp.jsonl", "sanitized-mbpp.json"])
def test_mbpp_runs_the_completion_alone_in_the_sandbox(tmp_path, release):
    if release.endswith(".jsonl"):
        path = write_jsonl(tmp_path / release, MBPP)
    else:
        path = tmp_path / release
        path.write_text(json.dumps(MBPP_SANITIZED))
    spec, docs = load("mbpp", path)
    assert docs[0]["query"].startswith("You are an expert Python programmer, and here is your task: Write a function")
    assert docs[0]["query"].endswith(MBPP[0]["test_list"][2] + "\n[BEGIN]\n")
    code = {d["query"]: r["code"] + "\n[DONE]\nextra" for d, r in zip(docs, MBPP)}
    assert evaluate_task(Answerer(gen=code.get), spec, docs)["pass@1"] == 1.0
    assert evaluate_task(Answerer(gen=lambda p: "def similar_elements(a, b):\n  return ()\n"), spec, docs)["pass@1"] == 0.0


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load("arc", tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="unknown public benchmark"):
        load("squad", tmp_path)
    with pytest.raises(ConfigError, match="missing field 'endings'"):
        load("hellaswag", write_jsonl(tmp_path / "h.jsonl", [{k: v for k, v in HELLASWAG[0].items() if k != "endings"}]))
    with pytest.raises(ConfigError, match="unlabelled"):
        load("hellaswag", write_jsonl(tmp_path / "t.jsonl", [{**HELLASWAG[0], "label": ""}]))
    with pytest.raises(ConfigError, match="#### <number>"):
        load("gsm8k", write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "42"}]))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{trunc\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match="unknown format"):
        read_records(tmp_path / "x.txt")
