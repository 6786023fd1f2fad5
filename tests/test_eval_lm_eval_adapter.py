"""The lm-evaluation-harness adapter, run by lm_eval itself: its command line (`lm_eval --model quark`,
found through the import hook that the installed .pth loads) on local YAML tasks over JSONL files, with
its numbers checked against Quark's own computation on the same documents."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quark.eval.lm import LanguageModel
from quark.eval.lm_eval_adapter import QuarkLM
from quark.eval.tasks import TaskSpec, evaluate_task

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"

MC = [{"question": q, "choices": c, "answer": a} for q, c, a in [
    ("def add(a, b):", ["return a + b", "lazy dog", "quickly"], 0),
    ("The quick brown fox", ["jumps over the lazy dog.", "import os", "return a"], 0),
    ("import os\nprint(", ["os.path.join('a', 'b'))", "brown fox", "language"], 0),
    ("Python is a programming", ["language that lets you work quickly.", "def add", "print("], 0),
    ("The lazy", ["dog.", "os.path", "return a + b"], 1),
]]
TEXTS = [{"text": t} for t in ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
                               "Python is a programming language that lets you work quickly. " * 4]]
GEN = [{"prompt": p, "target": t} for p, t in [("def add(a, b):", "return"), ("The quick", "brown"), ("import", "os")]]

TASKS = {
    "quark_mc": ({"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                  "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}, MC),
    "quark_rolling": ({"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                       "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]}, TEXTS),
    "quark_gen": ({"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                   "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                   "metric_list": [{"metric": "exact_match"}]}, GEN),
}


def write_tasks(root):
    for name, (spec, docs) in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (root / f"{name}.yaml").write_text(json.dumps(task))   # JSON is YAML


@pytest.fixture(scope="module")
def lm_eval_results(tiny_model_dir, tmp_path_factory):
    """`lm_eval --model quark ...` in a fresh interpreter whose site directory holds quark-lm-eval.pth."""
    root = tmp_path_factory.mktemp("lm_eval")
    write_tasks(root)
    out = root / "out"
    argv = ["lm_eval", "--model", "quark", "--model_args", f"path={tiny_model_dir}", "--tasks", ",".join(TASKS),
            "--include_path", str(root), "--output_path", str(out), "--log_samples"]
    code = (f"import site, sys; site.addsitedir({str(PYTHON_DIR)!r}); sys.argv = {argv!r}; "
            "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "",
           "HF_DATASETS_CACHE": str(root / "hf_cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = list(out.rglob("results_*.json"))
    samples = {name: [json.loads(line) for line in next(out.rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()]
               for name in TASKS}
    return json.loads(results.read_text())["results"], samples


def test_lm_eval_cli_multiple_choice_matches_quark(lm_eval_results, tiny_model_dir):
    lm = LanguageModel.from_dir(tiny_model_dir)
    spec = TaskSpec(task="mc", dataset_path="", output_type="multiple_choice", doc_to_text="{{question}}",
                    doc_to_choice="{{choices}}", doc_to_target="{{answer}}")
    results, samples = lm_eval_results
    for s in sorted(samples["quark_mc"], key=lambda s: s["doc_id"]):   # every choice's log-likelihood
        doc = MC[s["doc_id"]]
        ours = lm.loglikelihood([(doc["question"], " " + c) for c in doc["choices"]])
        assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx([lp for lp, _ in ours], abs=1e-4)
    assert results["quark_mc"]["acc,none"] == pytest.approx(evaluate_task(lm, spec, MC)["acc"])


def test_lm_eval_cli_rolling_matches_quark(lm_eval_results, tiny_model_dir):
    lm = LanguageModel.from_dir(tiny_model_dir)
    eos = min(lm.eos_ids)
    nll = sum(lm.rolling_nll([eos] + lm.encode(d["text"]))[0] for d in TEXTS)
    n_bytes = sum(len(d["text"].encode()) for d in TEXTS)
    n_words = sum(len(re.split(r"\s+", d["text"])) for d in TEXTS)     # lm_eval's word count
    got = lm_eval_results[0]["quark_rolling"]
    assert got["bits_per_byte,none"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(nll / n_words), rel=1e-4)


def test_lm_eval_cli_generation_matches_quark(lm_eval_results, tiny_model_dir):
    lm = LanguageModel.from_dir(tiny_model_dir)
    results, samples = lm_eval_results
    ours = [lm.generate(d["prompt"], 6, ["\n"]) for d in GEN]
    assert [s["filtered_resps"][0] for s in sorted(samples["quark_gen"], key=lambda s: s["doc_id"])] == ours
    hits = [o.strip() == d["target"] for o, d in zip(ours, GEN)]
    assert results["quark_gen"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))


def test_model_args_must_name_a_path():
    with pytest.raises(ValueError, match="path="):
        QuarkLM.create_from_arg_string("device=cpu")
