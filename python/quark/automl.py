"""AutoML over recipes: successive-halving search (quark.train.hpo.search) where a trial is a
whole recipe variant, run by the pipeline in its own run directory.

Search-space keys are "<step>.<setting>" (e.g. "pretrain.lr", "plan.target_params",
"tokenizer.vocab_size"); the budget is the number of pretraining steps. Every step before the
first one the space touches is shared with the base run (its outputs are linked, its pipeline
record copied, so the pipeline skips it); the rest run per trial. The objective is the
pretraining validation loss. The winning recipe is written as YAML, ready for `quark run`.
"""
import copy
import os
from pathlib import Path

import yaml

from quark.config import ConfigError
from quark.io import atomic_write_json, atomic_write_text
from quark.pipeline import run
from quark.recipe import STEP_NAMES, load_recipe
from quark.rundir import RunDir
from quark.train.hpo import search, write_results

DEFAULT_SPACE = {"pretrain.lr": {"low": 1e-3, "high": 1e-2, "log": True},
                 "plan.target_params": [250_000, 500_000, 1_000_000]}


def apply_params(recipe, params):
    """A copy of recipe with "<step>.<key>" values set so they win over budget overrides."""
    r = copy.deepcopy(recipe)
    for name, value in params.items():
        step, _, key = name.partition(".")
        if step not in STEP_NAMES or not key:
            raise ConfigError(f"search space key {name!r} must be '<step>.<setting>' with step one of {STEP_NAMES}")
        cfg = r["steps"].setdefault(step, {}) or {}
        r["steps"][step] = cfg
        cfg.setdefault("budgets", {}).setdefault(r["budget"], {})[key] = value
    return r


def _share(base, trial_dir, steps):
    """Link the outputs of the shared steps and copy their pipeline records into trial_dir."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    state = RunDir(base).state()
    shared = {s: state["steps"][s] for s in steps if s in state.get("steps", {})}
    for s in steps:
        link = trial_dir / s
        if (base / s).exists() and not link.exists():
            os.symlink((base / s).resolve(), link, target_is_directory=True)
    trial = RunDir(trial_dir)
    if not trial.state_path.exists():
        atomic_write_json(trial.state_path, {"steps": shared})


def automl(base_run_dir, recipe, space=None, n_trials=4, min_steps=20, max_steps=80, eta=2, seed=0, log=print):
    base = Path(base_run_dir)
    if not RunDir(base).state_path.exists():
        raise FileNotFoundError(f"{base} has no pipeline.json: run the recipe's data steps there first")
    space = space or DEFAULT_SPACE
    touched = [k.partition(".")[0] for k in space]
    for s in touched:
        if s not in STEP_NAMES:
            raise ConfigError(f"search space key must start with a step name; {s!r} is not one of {STEP_NAMES}")
    first = min(STEP_NAMES.index(s) for s in touched + ["pretrain"])
    last = STEP_NAMES.index("pretrain")
    if first > last:
        raise ConfigError("the search space may only touch steps up to pretrain")
    out = base / "automl"

    def objective(params, budget, trial):
        trial_dir = out / f"trial_{trial}_steps_{budget}"
        r = apply_params(recipe, {**params, "pretrain.max_steps": budget})
        r["run_dir"] = str(trial_dir)
        _share(base, trial_dir, STEP_NAMES[:first])
        run(r, only=STEP_NAMES[first:last + 1], log=lambda msg: None)
        stats = RunDir(trial_dir).state()["steps"]["pretrain"]["stats"]
        return stats["val_loss"] if stats.get("val_loss") is not None else stats["loss"]

    result = search(objective, space, n_trials, min_steps, max_steps, eta, seed, log)
    write_results(result, out)
    best = apply_params(recipe, result.best_params)
    best["run_dir"] = recipe["run_dir"]
    atomic_write_text(out / "best_recipe.yaml", yaml.safe_dump(best, sort_keys=False))
    return result


def configure_parser(p):
    p.add_argument("run_dir", help="base run directory whose data steps are done (e.g. after `quark run --only ... pack`)")
    p.add_argument("--recipe", default=None, help="recipe to vary (default: the embedded default)")
    p.add_argument("--budget", default=None, choices=["tiny", "default", "large"])
    p.add_argument("--space", default=None, help="YAML search space {'<step>.<setting>': spec}; see quark.train.hpo")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--min-steps", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--eta", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


def run_cli(args):
    try:
        recipe = load_recipe(args.recipe, args.budget, args.run_dir)
        space = yaml.safe_load(Path(args.space).read_text()) if args.space else None
        result = automl(args.run_dir, recipe, space, args.trials, args.min_steps, args.max_steps, args.eta, args.seed)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    print(result.table())
    print(f"best: {result.best_params} -> {Path(args.run_dir) / 'automl' / 'best_recipe.yaml'}")
    return 0
