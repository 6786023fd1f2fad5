"""Recipes (YAML): which steps `quark run` runs, with what settings, at what budget.

    name, run_dir, seed, budget (tiny|default|large), base_model (optional), steps: {step: {settings...,
    budgets: {tiny: {...}}}}

base_model: a model directory (Hugging Face or Quark) the run starts from instead of pretraining. The
run records it (pipeline.json) and quark.rundir.RunDir resolves it: its model("latest") is the base
until a step trains another, and the run's tokenizer is the base model's. Such a recipe runs only the
steps it names (the data and pretraining steps it leaves out are not needed).

STEPS is the one list of the life-cycle steps, in run order: name -> (module, one-line help). Each
module declares `STEP = quark.config.Step(...)` (its settings dataclass and run function); the modules
are imported only when a step runs, so `quark --help` imports no torch. A step marked optional runs in
`quark run` only when the recipe names it. A step's settings are checked by its own dataclass.
"""
import copy
import importlib
from pathlib import Path

import yaml

from quark.config import ConfigError

STEPS = {
    # name: (module, one-line help, optional)
    "crawl": ("quark.data.crawl", "crawl web pages into run_dir/crawl (default: the local pydoc server)", False),
    "scrape": ("quark.data.repos", "collect code files from git repositories / directories into run_dir/scrape", False),
    "clean": ("quark.data.clean", "quality filters (Gopher, C4, FineWeb, code) and PII scrubbing -> run_dir/clean", False),
    "dedup": ("quark.data.dedup", "exact and MinHash-LSH near-duplicate removal -> run_dir/dedup", False),
    "tokenizer": ("quark.data.tokenizer", "train a byte-level BPE tokenizer -> run_dir/tokenizer/tokenizer.json", False),
    "pack": ("quark.data.pack", "tokenize into memory-mapped train/val token files -> run_dir/pack", False),
    "plan": ("quark.train.plan", "scope pretraining: params, FLOPs, memory, tokens, time; pick an architecture", False),
    "pretrain": ("quark.train.trainer", "pretrain a model on the run's packed tokens (resumable, DDP/FSDP2)", False),
    "domain": ("quark.tune.domain", "continued pretraining on a domain corpus with general-corpus replay", True),
    "instruct": ("quark.tune.instruct", "build instruction/response chat data from the run's corpus (+ self-instruct)", False),
    "sft": ("quark.tune.sft", "supervised fine-tuning on chat data: full or LoRA, assistant-only loss, packing", False),
    "reward": ("quark.align.reward", "train a reward model (Bradley-Terry) on preference pairs", False),
    "dpo": ("quark.align.dpo", "preference optimisation: DPO, IPO or SimPO on the policy's own ranked samples (+ users' feedback)", False),
    "rl": ("quark.align.rl", "online RL with GRPO: verifiable rewards (arithmetic, format, sandboxed code), a reward model or a rule; KL to the reference", True),
    "redteam": ("quark.align.redteam", "attack suite against a model + safety filter: success rate before/after alignment", False),
    "index": ("quark.retrieval.store", "build the run's hybrid index (SQLite FTS5 + vectors) -> run_dir/index", False),
    "rag": ("quark.retrieval.rag", "evaluate RAG on questions generated from the index: recall, MRR, cited answers", False),
    "quantize": ("quark.optimize.quantize", "quantize a model (int8 / int4 / w8a8; rtn, awq, gptq) and measure each variant", False),
    "distill": ("quark.optimize.distill", "train a smaller student from a teacher's logits (+ a no-teacher control run)", False),
    "eval": ("quark.eval.harness", "evaluate a model: perplexity, tasks, code pass@k, and the regression gate", False),
    "promote": ("quark.improve.registry", "register the run's models and promote the evaluated one through the gate", False),
    "report": ("quark.eval.report", "write report.html (tables and plots) for the run", False),
}
STEP_NAMES = list(STEPS)
BUDGETS = ("tiny", "default", "large")
TOP_LEVEL_KEYS = ("name", "run_dir", "seed", "budget", "base_model", "steps")


def load_step(name):
    """The Step object that module STEPS[name] declares."""
    step = importlib.import_module(STEPS[name][0]).STEP
    assert step.name == name, f"{STEPS[name][0]}.STEP is named {step.name!r}, listed as {name!r}"
    return step


def recipes_dir():
    """The shipped recipes: the checkout's recipes/ (source or editable install), else the wheel's
    quark/recipes (CMakeLists.txt installs every recipes/*.yaml there)."""
    source = Path(__file__).resolve().parents[2] / "recipes"
    return source if (source / "default.yaml").exists() else Path(__file__).parent / "recipes"


def default_recipe_path():
    return recipes_dir() / "default.yaml"


def recipe_path(recipe=None):
    """A recipe file from a YAML path, or the name of a shipped recipe ("finetune": recipes/finetune.yaml,
    found the same way in a checkout and in an installed wheel); None: the default recipe."""
    if recipe is None:
        return default_recipe_path()
    path = Path(recipe)
    if path.exists():
        return path
    if path.suffix or len(path.parts) > 1:
        raise ConfigError(f"recipe {path} does not exist")
    shipped = recipes_dir() / f"{recipe}.yaml"
    if not shipped.exists():
        names = ", ".join(sorted(f.stem for f in recipes_dir().glob("*.yaml")))
        raise ConfigError(f"recipe {recipe!r} is neither a file nor a shipped recipe ({names})")
    return shipped


def load_recipe(path=None, budget=None, run_dir=None, base_model=None):
    """The recipe at `path` (a YAML file or a shipped recipe's name; None: the default), checked."""
    path = recipe_path(path)
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
        if name not in STEPS:
            raise ConfigError(f"recipe {path}: unknown step {name!r}; allowed steps: {', '.join(STEP_NAMES)}")
    recipe["run_dir"] = str(run_dir or recipe.get("run_dir") or f"runs/{recipe['name']}")
    if base_model:
        recipe["base_model"] = base_model
    if "base_model" in recipe:
        recipe["base_model"] = _base_model(path, recipe["base_model"])
    return recipe


def _base_model(path, base):
    """The recipe's base_model as an absolute directory (relative to the working directory)."""
    from quark.rundir import is_model_dir
    if not isinstance(base, str) or not base:
        raise ConfigError(f"recipe {path}: base_model must be a model directory path, got {base!r}")
    base = Path(base).expanduser().resolve()
    if not is_model_dir(base):
        raise ConfigError(f"recipe {path}: base_model {base} is not a model directory (config.json and weights)")
    return str(base)


def recipe_steps(recipe):
    """The steps `quark run` runs for this recipe, in order: every step but the optional ones it does not
    name; a recipe with a base_model runs only the steps it names."""
    if recipe.get("base_model"):
        return [name for name in STEPS if name in recipe["steps"]]
    return [name for name, (_, _, optional) in STEPS.items() if not optional or name in recipe["steps"]]


def step_config(recipe, name):
    """The settings of one step with its budget overrides applied (the seed is added by the pipeline)."""
    cfg = copy.deepcopy(recipe["steps"].get(name) or {})
    if not isinstance(cfg, dict):
        raise ConfigError(f"steps.{name}: expected a mapping of settings, got {cfg!r}")
    budgets = cfg.pop("budgets", {}) or {}
    for b in budgets:
        if b not in BUDGETS:
            raise ConfigError(f"steps.{name}.budgets: unknown budget {b!r}; allowed: {list(BUDGETS)}")
    cfg.update(budgets.get(recipe["budget"], {}) or {})
    return cfg
