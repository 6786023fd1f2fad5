"""`quark run [RECIPE]`: every step of the life cycle in order, in one run directory, with resume.

Step contract: a step is a module with `run_step(run_dir: Path, cfg: dict) -> dict`. It reads what
earlier steps wrote under run_dir, writes its own outputs under run_dir/<step>/ atomically, resumes
its own partial work, and returns JSON-able stats. The pipeline records each finished step in
run_dir/pipeline.json with a fingerprint of its config and of every step before it, so a rerun
skips finished steps whose inputs and config did not change and redoes the rest.

Recipe (YAML): name, run_dir, seed, budget (tiny|default|large) and steps: {step: {settings...,
budgets: {tiny: {overrides}}}}. A step's settings are checked by its own dataclass before anything runs.
"""
import copy
import hashlib
import importlib
import importlib.util
import json
import os
import time
from pathlib import Path

import yaml

from quark.config import ConfigError
from quark.io import atomic_write_json

# (step name, module) in run order.
STEPS = [
    ("crawl", "quark.data.crawl"),
    ("scrape", "quark.data.repos"),
    ("clean", "quark.data.clean"),
    ("dedup", "quark.data.dedup"),
    ("tokenizer", "quark.data.tokenizer"),
    ("pack", "quark.data.pack"),
    ("plan", "quark.train.plan"),
    ("pretrain", "quark.train.trainer"),
    ("instruct", "quark.tune.instruct"),
    ("sft", "quark.tune.sft"),
    ("reward", "quark.align.reward"),
    ("dpo", "quark.align.dpo"),
    ("redteam", "quark.align.redteam"),
    ("index", "quark.retrieval.store"),
    ("rag", "quark.retrieval.rag"),
    ("quantize", "quark.optimize.quantize"),
    ("distill", "quark.optimize.distill"),
    ("eval", "quark.eval.harness"),
    ("promote", "quark.improve.registry"),
    ("report", "quark.eval.report"),
]
STEP_NAMES = [name for name, _ in STEPS]
BUDGETS = ("tiny", "default", "large")
TOP_LEVEL_KEYS = ("name", "run_dir", "seed", "budget", "steps")


def default_recipe_path():
    source = Path(__file__).resolve().parents[2] / "recipes" / "default.yaml"  # source checkout / editable
    return source if source.exists() else Path(__file__).parent / "recipes" / "default.yaml"  # wheel


def load_recipe(path=None, budget=None, run_dir=None):
    path = Path(path) if path else default_recipe_path()
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top level")
    for key in recipe:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"recipe {path}: unknown key {key!r}; allowed keys: {', '.join(TOP_LEVEL_KEYS)}")
    recipe.setdefault("name", path.stem)
    recipe.setdefault("seed", 0)
    recipe.setdefault("steps", {})
    if budget:
        recipe["budget"] = budget
    recipe.setdefault("budget", "default")
    if recipe["budget"] not in BUDGETS:
        raise ConfigError(f"recipe {path}: budget must be one of {list(BUDGETS)}, got {recipe['budget']!r}")
    if not isinstance(recipe["seed"], int):
        raise ConfigError(f"recipe {path}: seed must be an integer, got {recipe['seed']!r}")
    if not isinstance(recipe["steps"], dict):
        raise ConfigError(f"recipe {path}: steps must be a mapping of step name to settings")
    for name in recipe["steps"]:
        if name not in STEP_NAMES:
            raise ConfigError(f"recipe {path}: unknown step {name!r}; allowed steps: {', '.join(STEP_NAMES)}")
    recipe["run_dir"] = str(run_dir or recipe.get("run_dir") or f"runs/{recipe['name']}")
    return recipe


def step_config(recipe, name):
    """The settings of one step with its budget overrides applied and the recipe seed passed down."""
    cfg = copy.deepcopy(recipe["steps"].get(name) or {})
    if not isinstance(cfg, dict):
        raise ConfigError(f"steps.{name}: expected a mapping of settings, got {cfg!r}")
    budgets = cfg.pop("budgets", {}) or {}
    for b in budgets:
        if b not in BUDGETS:
            raise ConfigError(f"steps.{name}.budgets: unknown budget {b!r}; allowed: {list(BUDGETS)}")
    cfg.update(budgets.get(recipe["budget"], {}) or {})
    return cfg


def available(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _fingerprint(previous, name, cfg):
    blob = json.dumps({"previous": previous, "step": name, "cfg": cfg}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def validate(recipe):
    """Check every step's settings with its own dataclass before any work starts."""
    for name, module in STEPS:
        cfg = step_config(recipe, name)
        if not available(module):
            continue
        mod = importlib.import_module(module)
        check = getattr(mod, "validate_config", None)
        if check is not None:
            try:
                check(cfg)
            except ConfigError as e:
                raise ConfigError(f"steps.{name}: {e}") from None


def run(recipe, only=None, force=False, log=print):
    run_dir = Path(recipe["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "pipeline.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"steps": {}}
    state["recipe"] = recipe
    previous = _fingerprint("", "recipe", {"seed": recipe["seed"], "budget": recipe["budget"]})
    for name, module in STEPS:
        cfg = step_config(recipe, name)
        cfg.setdefault("seed", recipe["seed"])
        fp = _fingerprint(previous, name, cfg)
        previous = fp
        if only and name not in only:
            continue
        if not available(module):
            log(f"[{name}] not implemented yet ({module}); stopping before it")
            atomic_write_json(state_path, state)
            return False
        done = state["steps"].get(name, {})
        if not force and done.get("status") == "done" and done.get("fingerprint") == fp:
            log(f"[{name}] up to date, skipped")
            continue
        log(f"[{name}] running")
        t0 = time.time()
        stats = importlib.import_module(module).run_step(run_dir, cfg)
        state["steps"][name] = {"status": "done", "fingerprint": fp, "seconds": round(time.time() - t0, 2),
                                "stats": stats, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(state_path, state)
        log(f"[{name}] done in {time.time() - t0:.1f}s")
    return True


def configure_parser(parser):
    parser.add_argument("recipe", nargs="?", default=None, help="recipe YAML (default: recipes/default.yaml)")
    parser.add_argument("--budget", choices=BUDGETS, default=None, help="scale every step (tiny runs in CI)")
    parser.add_argument("--run-dir", default=None, help="override the recipe's run directory")
    parser.add_argument("--only", nargs="*", default=None, choices=STEP_NAMES, metavar="STEP",
                        help="run only these steps (their inputs must exist)")
    parser.add_argument("--force", action="store_true", help="rerun steps even when up to date")
    parser.add_argument("--plan", action="store_true", help="print the steps and exit")


def run_cli(args):
    try:
        recipe = load_recipe(args.recipe, args.budget, args.run_dir)
        validate(recipe)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print(f"recipe {recipe['name']} (budget {recipe['budget']}) -> {recipe['run_dir']}")
    for i, (name, module) in enumerate(STEPS, 1):
        print(f"  {i:2d}. {name:<10} {module:<28} {'' if available(module) else '(not implemented yet)'}")
    if args.plan:
        return 0
    os.environ.setdefault("PYTHONHASHSEED", str(recipe["seed"]))
    return 0 if run(recipe, only=args.only, force=args.force) else 1
