"""Recipe loading and validation (a malformed recipe fails before any work, naming the key), budgets,
and resume by content."""
import json
import subprocess
import sys

import pytest

from quark.config import ConfigError
from quark.pipeline import run, summary, validate
from quark.recipe import (STEP_NAMES, STEPS, default_recipe_path, load_recipe, recipe_path, recipe_steps,
                          recipes_dir, step_config)


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_default_recipe_loads_and_is_valid():
    r = load_recipe(default_recipe_path())
    assert r["name"] == "default" and r["budget"] == "default"
    assert set(r["steps"]) <= set(STEP_NAMES)


def test_shipped_recipes_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no recipes/ here: names resolve to the shipped ones (the wheel's quark/recipes)
    assert recipe_path("finetune") == recipes_dir() / "finetune.yaml" and recipe_path(None) == default_recipe_path()
    assert load_recipe("default")["steps"] == load_recipe()["steps"]
    (tmp_path / "finetune").write_text("name: mine\n")   # a file of that name is the user's recipe
    assert load_recipe("finetune")["name"] == "mine"
    with pytest.raises(ConfigError, match=r"recipe 'fintune' is neither a file nor a shipped recipe \(default, finetune"):
        load_recipe("fintune")
    with pytest.raises(ConfigError, match="recipe fintune.yaml does not exist"):
        load_recipe("fintune.yaml")


def test_installed_layout_finds_the_shipped_recipes(tmp_path):
    """The wheel's layout (CMakeLists.txt installs recipes/*.yaml as quark/recipes; no checkout above the
    package): `quark run finetune` still finds the recipe, from any working directory."""
    import shutil
    from pathlib import Path

    import quark
    from quark.model.io import save_model
    from tests.tiny_lm import tiny_model
    site = tmp_path / "site"
    shutil.copytree(Path(quark.__file__).parent, site / "quark", ignore=shutil.ignore_patterns("__pycache__", "recipes"))
    shutil.copytree(recipes_dir(), site / "quark" / "recipes", ignore=shutil.ignore_patterns("*.md"))
    save_model(tiny_model(64), tmp_path / "base")
    r = subprocess.run([sys.executable, "-m", "quark.cli", "run", "finetune", "--plan", "--base-model",
                        str(tmp_path / "base"), "--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "recipe finetune" in r.stdout and "sft" in r.stdout and "no pretraining to plan" in r.stdout


def test_budget_overrides_apply(tmp_path):
    p = write(tmp_path, "steps:\n  crawl:\n    max_pages: 100\n    budgets:\n      tiny: {max_pages: 5}\n")
    assert step_config(load_recipe(p, budget="tiny"), "crawl") == {"max_pages": 5}
    assert step_config(load_recipe(p), "crawl") == {"max_pages": 100}


@pytest.mark.parametrize("text,message", [
    ("nmae: x\n", "unknown key 'nmae'; allowed keys: name, run_dir, seed, budget, base_model, steps"),
    ("steps:\n  pretrian: {}\n", "unknown step 'pretrian'; allowed steps: crawl"),
    ("budget: huge\n", "budget must be one of ['tiny', 'default', 'large']"),
    ("seed: abc\n", "seed must be an integer"),
    ("steps: [1]\n", "steps must be a mapping"),
    ("- a\n- b\n", "expected a mapping at the top level"),
    ("a: [\n", "not valid YAML"),
])
def test_malformed_recipes_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text))
    assert message in str(e.value)


def test_unknown_budget_in_step_overrides(tmp_path):
    p = write(tmp_path, "steps:\n  crawl:\n    budgets:\n      huge: {}\n")
    with pytest.raises(ConfigError, match="unknown budget 'huge'"):
        step_config(load_recipe(p), "crawl")


def test_cli_reports_malformed_recipe_before_work(tmp_path):
    p = write(tmp_path, f"run_dir: {tmp_path / 'run'}\nsteps:\n  bogus: {{}}\n")
    r = subprocess.run([sys.executable, "-m", "quark.cli", "run", str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown step 'bogus'" in r.stdout
    assert not (tmp_path / "run").exists()


def test_plan_lists_every_step(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quark.cli", "run", "--plan", "--run-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in recipe_steps(load_recipe()):
        assert name in r.stdout
    assert "Chinchilla-optimal" in r.stdout       # and the pretraining plan of the recipe


def test_optional_steps_run_only_when_the_recipe_names_them(tmp_path):
    assert "domain" not in recipe_steps(load_recipe()) and "rl" in recipe_steps(load_recipe())   # the default names rl
    assert "rl" not in recipe_steps(load_recipe(write(tmp_path, "steps:\n  sft: {steps: 2}\n")))
    assert "rl" in recipe_steps(load_recipe(write(tmp_path, "steps:\n  rl: {steps: 2}\n")))
    assert [n for n in STEP_NAMES if not STEPS[n][2] or n == "rl"] == recipe_steps(load_recipe())


def test_budget_large_changes_the_model_and_the_data():
    default, large = load_recipe(), load_recipe(budget="large")
    validate(large)
    for step, key in (("crawl", "max_pages"), ("scrape", "max_files"), ("tokenizer", "vocab_size"),
                      ("plan", "target_params"), ("pretrain", "max_steps"), ("pretrain", "seq_len")):
        assert step_config(large, step)[key] > step_config(default, step).get(key, 0), (step, key)
    assert recipe_steps(large) == recipe_steps(default)              # the same steps, only bigger


DOCS = ["The quick brown fox jumps over the lazy dog near the river bank.",
        "Python lists hold items in order; dictionaries map keys to values.",
        "A heap is a binary tree where every parent is smaller than its children."]


def write_docs(run_dir, texts):
    (run_dir / "dedup").mkdir(parents=True, exist_ok=True)
    (run_dir / "dedup" / "docs.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts * 20)))


def test_a_step_redone_upstream_redoes_what_read_its_output(tmp_path):
    """`quark run --only tokenizer --force` on new input, then `quark run`: pack and plan read the new
    tokenizer, so they are not up to date (they were, when resume fingerprinted configs only)."""
    run_dir = tmp_path / "run"
    recipe = load_recipe(write(tmp_path, f"run_dir: {run_dir}\nsteps:\n  tokenizer: {{vocab_size: 300}}\n"
                                         "  plan: {target_params: 300000, seq_len: 32, probe: false}\n"))
    write_docs(run_dir, DOCS)
    only = ["tokenizer", "pack", "plan"]
    log = []
    run(recipe, only=only, log=log.append)
    assert [m for m in log if "running" in m] == ["[tokenizer] running (not run yet)", "[pack] running (not run yet)",
                                                  "[plan] running (not run yet)"]
    log.clear()
    run(recipe, only=only, log=log.append)
    assert [m for m in log if "skipped" in m] == [f"[{s}] up to date, skipped" for s in only]
    write_docs(run_dir, DOCS + ["Completely different words: zebra xylophone quartz juniper."])
    tokenizer_before = (run_dir / "tokenizer" / "tokenizer.json").read_bytes()
    run(recipe, only=["tokenizer"], force=True, log=lambda m: None)
    assert (run_dir / "tokenizer" / "tokenizer.json").read_bytes() != tokenizer_before
    log.clear()
    run(recipe, only=only, log=log.append)
    assert "[tokenizer] up to date, skipped" in log
    assert any(m.startswith("[pack] running") for m in log) and any(m.startswith("[plan] running") for m in log)
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert set(state["steps"]) == set(only)


def test_summary_names_key_metrics_report_and_next_commands():
    steps = {
        "pretrain": {"seconds": 60, "stats": {"params": 2_500_000, "tokens": 409_600, "val_loss": 4.91}},
        "sft": {"seconds": 30, "stats": {"val_loss_before": 3.2, "val_loss_after": 2.5}},
        "rl": {"seconds": 40, "stats": {"heldout_tasks": {"baseline": 0.2, "rl": 0.45, "diff": 0.25, "se": 0.05,
                                                                "baseline_model": "runs/r/sft/final"}}},
        "eval": {"seconds": 20, "stats": {"heldout/bits_per_byte": 1.86, "gate_passed": True}},
        "quantize": {"seconds": 10, "stats": {"source": "x", "int4": {"ratio": 6.1, "perplexity_delta": 0.8,
                                                                      "speedup": 1.9}}},
        "report": {"seconds": 1, "stats": {"report": "runs/r/report.html"}},
    }
    text = "\n".join(summary("runs/r", steps))
    assert "6 steps, 2.7 min" in text
    assert "2.50M parameters, 409,600 tokens, validation loss 4.910" in text
    assert "3.200 -> 2.500" in text and "sft 20%, rl 45%" in text and "+0.250 +- 0.100" in text
    assert "1.860 bits/byte, regression gate passed" in text
    assert "int4: 6.1x smaller, perplexity +0.80, decode 1.90x" in text
    assert "report: runs/r/report.html" in text and "quark chat runs/r" in text
    assert "dpo" not in text     # a step that did not run is not summarized
