"""`quark run --budget tiny`: the whole life cycle on the embedded default (pydoc crawl on
loopback, the local standard library as code), then resume semantics. Part of CI."""
import json
import math
import subprocess
import sys

import pytest
import yaml

from quark.recipe import default_recipe_path, load_recipe, recipe_steps

STEP_NAMES = recipe_steps(load_recipe())     # the steps the default recipe runs


def quark(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "quark.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    r = quark("run", "--budget", "tiny", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_every_step_ran_and_left_its_outputs(tiny_run):
    state = json.loads((tiny_run / "pipeline.json").read_text())
    assert [s for s in STEP_NAMES if state["steps"].get(s, {}).get("status") == "done"] == STEP_NAMES
    for path in ("crawl", "pack/train.bin", "tokenizer/tokenizer.json", "pretrain/final/model.safetensors",
                 "sft/final/model.safetensors", "dpo/final/model.safetensors", "redteam/report.json",
                 "index/store.sqlite", "rag/metrics.json", "quantize/summary.json", "eval/results.json",
                 "promote/registry.sqlite", "report.html"):
        assert (tiny_run / path).exists(), path
    assert state["steps"]["promote"]["stats"]["champion"] == state["steps"]["eval"]["stats"]["version"]
    # learned, not merely run: an untrained model sits at ln(vocab) on held-out tokens
    vocab = json.loads((tiny_run / "pack" / "meta.json").read_text())["vocab_size"]
    assert state["steps"]["pretrain"]["stats"]["val_loss"] <= math.log(vocab) - 1.0, state["steps"]["pretrain"]["stats"]
    rl = state["steps"]["rl"]["stats"]
    assert rl["reward"] == "verify" and rl["heldout_tasks"]["n"] >= 50   # the rl model vs the sft model, paired
    page = (tiny_run / "report.html").read_text()
    assert "<img src='data:image/png;base64," in page and "<h2>RL on verifiable tasks</h2>" in page


@pytest.mark.slow
def test_rerun_skips_finished_steps_and_a_changed_step_reruns_with_what_follows(tiny_run, tmp_path):
    r = quark("run", "--budget", "tiny", "--run-dir", str(tiny_run))
    assert r.returncode == 0 and r.stdout.count("up to date, skipped") == len(STEP_NAMES)
    recipe = yaml.safe_load(default_recipe_path().read_text())
    recipe["steps"]["eval"]["budgets"]["tiny"]["heldout_mc"] = 5
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(recipe))
    r = quark("run", str(changed), "--budget", "tiny", "--run-dir", str(tiny_run))
    assert r.returncode == 0, r.stdout[-2000:]
    ran = [s for s in STEP_NAMES if f"[{s}] running" in r.stdout]
    assert ran == ["eval", "promote", "report"]


@pytest.mark.slow
def test_chat_and_generate_use_the_resulting_model(tiny_run):
    r = quark("generate", str(tiny_run), "--prompt", "def add(a, b):", "--max-tokens", "8", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
