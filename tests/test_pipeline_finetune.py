"""`quark run finetune --base-model DIR --budget tiny` (recipes/finetune.yaml): a run that starts from a Hugging
Face checkpoint instead of pretraining (instruct -> sft -> dpo -> quantize -> eval -> report), and the
models it writes read back by transformers (through quark export) and by load_model."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quark.recipe import load_recipe, recipe_steps
from quark.rundir import RunDir
from tests.hf_helpers import make_hf_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "finetune.yaml"
STEPS = ["scrape", "clean", "dedup", "pack", "instruct", "sft", "dpo", "quantize", "eval", "report"]


def quark(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "quark.cli", *args], capture_output=True, text=True, timeout=timeout)


def make_base(directory):
    """A random LlamaForCausalLM with its own tokenizer, the chat template inside tokenizer_config.json."""
    make_hf_model(directory, "llama", max_position_embeddings=512)
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    jinja = directory / "chat_template.jinja"
    if jinja.exists():   # newer transformers save the template beside the config
        cfg["chat_template"] = jinja.read_text()
        jinja.unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    base = make_base(root / "base")
    run_dir = root / "run"
    r = quark("run", str(RECIPE), "--budget", "tiny", "--run-dir", str(run_dir), "--base-model", str(base))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return base, run_dir


def test_recipe_runs_only_its_steps_and_needs_a_base_model(tmp_path):
    base = make_base(tmp_path / "base")
    assert recipe_steps(load_recipe(RECIPE, base_model=str(base))) == STEPS
    r = quark("run", "finetune", "--plan", "--run-dir", str(tmp_path / "run"), "--base-model", str(base))
    assert r.returncode == 0 and "no pretraining to plan" in r.stdout and "pretrain" not in r.stdout.split("starts")[0]
    r = quark("run", str(RECIPE), "--plan", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "base_model" in r.stdout and "models/base" in r.stdout


@pytest.mark.slow
def test_finetune_recipe_trains_the_base_model_and_writes_models_transformers_loads(finetune_run, tmp_path):
    import transformers

    from quark.model.io import load_model
    base, run_dir = finetune_run
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert [s for s in STEPS if state["steps"].get(s, {}).get("status") == "done"] == STEPS
    assert not any((run_dir / s).exists() for s in ("crawl", "tokenizer", "plan", "pretrain"))
    assert state["steps"]["sft"]["stats"]["init"] == str(base.resolve())     # sft started from the base model
    assert state["steps"]["dpo"]["stats"]["init"] == str(run_dir / "sft" / "final")

    # the run's tokens are the base model's: documents end with its eos (<|im_end|>, id 2)
    meta = json.loads((run_dir / "pack" / "meta.json").read_text())
    assert meta["eos_id"] == 2 and meta["vocab_size"] == 320
    hf_tok = transformers.AutoTokenizer.from_pretrained(base)
    val = np.fromfile(run_dir / "pack" / "val.bin", dtype=np.uint16)
    first = val[: int(np.argmax(val == 2))].tolist()
    assert hf_tok(hf_tok.decode(first), add_special_tokens=False)["input_ids"] == first

    # the instruction data fits the base model's chat format (max_tokens 384 < its 512 positions)
    chat = RunDir(run_dir).chat(base)
    records = [json.loads(line) for line in (run_dir / "instruct" / "train.jsonl").read_text().splitlines()]
    assert records and all(len(chat.encode(r["messages"])[0]) <= 384 for r in records)

    # dpo/final: trained away from the base, and exported to transformers with equal logits and the base's template
    dpo = load_model(run_dir / "dpo" / "final")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base)
    assert not torch.equal(dpo.tok_emb.weight, hf_base.model.embed_tokens.weight)
    out = tmp_path / "hf"
    r = quark("export", str(run_dir / "dpo" / "final"), "--format", "hf", "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([first[:40]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, dpo(ids)[0], rtol=1e-4, atol=1e-4)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is os.path?"}]
    assert transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=False) == \
        hf_tok.apply_chat_template(messages, tokenize=False)

    # quantize: the dpo model's int4 variant, read by load_model, scored on the base tokenizer's held-out text
    summary = json.loads((run_dir / "quantize" / "summary.json").read_text())
    assert summary["source"] == str(run_dir / "dpo" / "final")
    int4 = load_model(run_dir / "quantize" / "int4")
    with torch.no_grad():
        assert torch.isfinite(int4(ids)[0]).all()
    assert math.isfinite(summary["int4"]["perplexity"]) and summary["int4"]["bytes_after"] < summary["int4"]["bytes_before"]

    # eval: the dpo model on held-out windows of the base tokenizer's text, and the report
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["model_dir"] == str(run_dir / "dpo" / "final")
    assert 0 < results["metrics"]["heldout/loss"] < 2 * math.log(320) and results["items"]["heldout"]
    assert (run_dir / "report.html").stat().st_size > 1000
