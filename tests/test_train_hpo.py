"""Successive halving: the generic search (the AutoML step reuses it), the search-space grammar,
and the pretraining search that resumes promoted trials from their checkpoints."""
import json

import pytest
from tests._train_util import make_run_dir

from quark.train import hpo, trainer


def test_search_finds_the_minimum_and_halves():
    calls = []

    def objective(params, budget, trial):
        calls.append((trial, budget))
        return (params["x"] - 0.3) ** 2 + (0.5 if params["kind"] == "bad" else 0.0) + 1.0 / budget

    result = hpo.search(objective, {"x": {"low": 0.0, "high": 1.0}, "kind": ["good", "bad"], "fixed": 7},
                        n_trials=9, min_budget=1, eta=3, seed=0, log=lambda m: None)
    assert [r["budget"] for r in result.rungs] == [1, 3, 9]
    assert [len(r["trials"]) for r in result.rungs] == [9, 3, 1]
    assert len(calls) == 13
    values = {t.trial: (t.params["x"] - 0.3) ** 2 + (0.5 if t.params["kind"] == "bad" else 0) for t in result.trials}
    assert result.best_trial == min(values, key=values.get)             # the true best survives every rung
    assert result.best_params["fixed"] == 7 and result.best_value == pytest.approx(values[result.best_trial] + 1 / 9)
    table = result.table()
    assert table.count("\n") == 9 + 1 and f"| {result.best_trial} * |" in table


def test_search_is_seeded_and_survives_nan():
    def objective(params, budget, trial):
        return float("nan") if trial == 0 else params["lr"]

    space = {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "layers": {"low": 1, "high": 4, "int": True}}
    a = hpo.search(objective, space, n_trials=4, min_budget=2, eta=2, seed=5, log=lambda m: None)
    b = hpo.search(objective, space, n_trials=4, min_budget=2, eta=2, seed=5, log=lambda m: None)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert a.best_trial != 0 and all(1e-4 <= t.params["lr"] <= 1e-1 for t in a.trials)
    assert all(isinstance(t.params["layers"], int) and 1 <= t.params["layers"] <= 4 for t in a.trials)


def test_space_and_argument_errors():
    with pytest.raises(ValueError, match="'lr'.*low <= high"):
        hpo.search(lambda p, b, t: 0.0, {"lr": {"low": 1.0, "high": 0.1}}, log=lambda m: None)
    with pytest.raises(ValueError, match="log scale needs low > 0"):
        hpo.search(lambda p, b, t: 0.0, {"lr": {"low": 0.0, "high": 1.0, "log": True}}, log=lambda m: None)
    with pytest.raises(ValueError, match="empty list"):
        hpo.search(lambda p, b, t: 0.0, {"act": []}, log=lambda m: None)
    with pytest.raises(ValueError, match="eta >= 2"):
        hpo.search(lambda p, b, t: 0.0, {}, eta=1)


def test_tune_pretrain_resumes_promoted_trials(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    base = {"model": "nano", "seq_len": 32, "batch_size": 4, "eval_batches": 2, "peak_tflops": 1.0, "threads": 1,
            "log_interval": 1, "warmup_steps": 1}
    result = trainer.tune_pretrain(run_dir, base, space={"lr": {"low": 1e-3, "high": 1e-2, "log": True}},
                                   n_trials=3, min_steps=3, eta=3, log=lambda m: None)
    assert [r["budget"] for r in result.rungs] == [3, 9]
    best = json.loads((run_dir / "hpo" / "best.json").read_text())
    assert best["config"]["lr"] == result.best_params["lr"] and best["config"]["model"] == "nano"
    assert (run_dir / "hpo" / "results.md").read_text().startswith("# Hyperparameter search")
    winner = run_dir / "hpo" / f"trial_{result.best_trial}"
    stats = json.loads((winner / "stats.json").read_text())
    assert stats["resumed_from"] == 3 and stats["steps"] == 9        # promoted: continued, not restarted
    assert len((run_dir / "hpo" / "results.jsonl").read_text().splitlines()) == 3
