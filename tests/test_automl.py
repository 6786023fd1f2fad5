"""AutoML over recipes: real pipeline runs per trial on packed data, sharing the steps before
the first one the search touches."""
import json
import os

import pytest
import yaml

from quark.config import ConfigError
from quark.automl import apply_params, automl
from quark.pipeline import run
from quark.recipe import load_recipe
from tests._train_util import make_run_dir


@pytest.fixture
def base_run(tmp_path):
    run_dir = make_run_dir(tmp_path / "base", vocab_size=256, train_tokens=20_000, val_tokens=3_000)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "name": "t", "run_dir": str(run_dir), "budget": "tiny",
        "steps": {"plan": {"target_params": 200_000, "seq_len": 32, "batch_size": 4, "probe_steps": 1},
                  "pretrain": {"seq_len": 32, "batch_size": 4, "warmup_steps": 1, "eval_batches": 1,
                               "log_interval": 1, "threads": 1}}}))
    recipe = load_recipe(recipe_path)
    # the base run has packed data (made above) and a plan; record pack as done like the pipeline does
    (run_dir / "pipeline.json").write_text(json.dumps({"steps": {}}))
    assert run(recipe, only=["plan"], log=lambda m: None)
    return run_dir, recipe


def test_apply_params_wins_over_budget_overrides(base_run):
    _, recipe = base_run
    r = apply_params(recipe, {"pretrain.lr": 0.5})
    from quark.recipe import step_config
    assert step_config(r, "pretrain")["lr"] == 0.5 and "budgets" not in recipe["steps"]["pretrain"]
    with pytest.raises(ConfigError, match="must be '<step>.<setting>'"):
        apply_params(recipe, {"nosuchstep.lr": 1})


def test_search_runs_trials_through_the_pipeline_and_writes_the_best_recipe(base_run):
    run_dir, recipe = base_run
    result = automl(run_dir, recipe, {"pretrain.lr": [1e-4, 1e-2]}, n_trials=2, min_steps=4, max_steps=8, eta=2,
                    log=lambda m: None)
    assert result.best_params["pretrain.lr"] == 1e-2          # 1e-4 barely moves a tiny model in 8 steps
    trials = sorted(p.name for p in (run_dir / "automl").iterdir() if p.name.startswith("trial_"))
    assert len(trials) == 3 and sum(t.endswith("_steps_8") for t in trials) == 1   # halving kept one of two
    shared = run_dir / "automl" / trials[0] / "plan"
    assert os.path.islink(shared)                             # plan was shared, not rerun
    best = yaml.safe_load((run_dir / "automl" / "best_recipe.yaml").read_text())
    assert best["steps"]["pretrain"]["budgets"]["tiny"]["lr"] == 1e-2
    assert (run_dir / "automl" / "results.md").exists()
