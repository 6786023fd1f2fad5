"""Hyperparameter search by successive halving (Jamieson & Talwalkar 2016; the inner loop of
Hyperband, Li et al. 2018): sample n configurations, run each on a small budget, keep the best
1/eta, multiply the budget by eta, repeat until one is left or the budget reaches its maximum.

Generic: search(objective, space, ...) works for any objective(params, budget, trial) -> float
(lower is better), so the AutoML step reuses it as is. The budget is an integer resource (training
steps here); an objective may resume a trial from where its previous rung stopped (tune_pretrain
does, through the trainer's exact-resume checkpoints, so a promoted trial never redoes work).

Search space: {name: spec}, spec one of
    [a, b, c]                          categorical choice
    {"low": x, "high": y}              uniform float        (add "log": true for log-uniform)
    {"low": i, "high": j, "int": true} uniform integer in [i, j]
    a constant                         passed through unchanged
"""
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quark.io import atomic_write_json, atomic_write_text
from quark.rundir import RunDir


@dataclass
class Trial:
    trial: int
    params: dict
    results: dict = field(default_factory=dict)   # budget -> objective value

    @property
    def last(self):
        return self.results[max(self.results)] if self.results else math.inf


@dataclass
class SearchResult:
    best_params: dict
    best_value: float
    best_trial: int
    trials: list
    rungs: list                                  # [{"budget", "trials": [ids], "kept": [ids]}]

    def table(self):
        """Markdown table: one row per trial, one column per budget it ran."""
        budgets = sorted({b for t in self.trials for b in t.results})
        names = sorted({k for t in self.trials for k in t.params})
        head = ["trial"] + names + [f"@{b}" for b in budgets]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for t in sorted(self.trials, key=lambda t: (-len(t.results), t.last)):
            cells = [str(t.trial) + (" *" if t.trial == self.best_trial else "")]
            cells += [_fmt(t.params.get(n)) for n in names]
            cells += [f"{t.results[b]:.4f}" if b in t.results else "" for b in budgets]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def sample(space, rng):
    """One configuration drawn from space with random.Random rng."""
    out = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            if not spec:
                raise ValueError(f"search space {name!r}: empty list of choices")
            out[name] = rng.choice(spec)
        elif isinstance(spec, dict):
            if "low" not in spec or "high" not in spec or spec["low"] > spec["high"]:
                raise ValueError(f"search space {name!r}: need low <= high, got {spec}")
            lo, hi = spec["low"], spec["high"]
            if spec.get("int"):
                out[name] = rng.randint(int(lo), int(hi))
            elif spec.get("log"):
                if lo <= 0:
                    raise ValueError(f"search space {name!r}: log scale needs low > 0, got {lo}")
                out[name] = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            else:
                out[name] = rng.uniform(lo, hi)
        else:
            out[name] = spec
    return out


def rungs_needed(n_trials, eta):
    """Promotions until one trial is left: floor(log_eta(n_trials))."""
    return int(math.log(n_trials) / math.log(eta) + 1e-9)


def search(objective, space, n_trials=9, min_budget=1, max_budget=None, eta=3, seed=0, log=print):
    """Successive halving over n_trials random configurations; returns a SearchResult.

    objective(params, budget, trial) -> float, lower is better (NaN/inf count as worst).
    Rung r runs the survivors at budget min_budget * eta**r (capped at max_budget)."""
    if n_trials < 1 or min_budget < 1 or eta < 2:
        raise ValueError(f"need n_trials >= 1, min_budget >= 1 and eta >= 2, got {n_trials}, {min_budget}, {eta}")
    max_budget = max_budget or min_budget * eta ** rungs_needed(n_trials, eta)
    if max_budget < min_budget:
        raise ValueError(f"max_budget ({max_budget}) must be >= min_budget ({min_budget})")
    rng = random.Random(seed)
    trials = [Trial(i, sample(space, rng)) for i in range(n_trials)]
    alive, budget, rungs = trials, min_budget, []
    while True:
        for t in alive:
            value = float(objective(dict(t.params), budget, t.trial))
            t.results[budget] = value if math.isfinite(value) else math.inf
            log(f"[hpo] trial {t.trial} budget {budget}: {value:.4f}  {t.params}")
        ranked = sorted(alive, key=lambda t: t.results[budget])
        keep = ranked[:max(1, len(alive) // eta)]
        rungs.append({"budget": budget, "trials": [t.trial for t in alive], "kept": [t.trial for t in keep]})
        if len(alive) == 1 or budget >= max_budget:
            best = ranked[0]
            break
        alive, budget = keep, min(budget * eta, max_budget)
    return SearchResult(dict(best.params), best.results[budget], best.trial, trials, rungs)


def write_results(result: SearchResult, out_dir):
    """out_dir/results.jsonl (every trial), results.md (the table) and best.json."""
    out = Path(out_dir)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps({**asdict(t), "results": {str(b): v for b, v in t.results.items()}}) + "\n"
                                                     for t in result.trials))
    atomic_write_text(out / "results.md", "# Hyperparameter search (successive halving)\n\n" + result.table() + "\n")
    atomic_write_json(out / "best.json", {"params": result.best_params, "value": result.best_value,
                                          "trial": result.best_trial, "rungs": result.rungs})


def pretrain_space(max_steps):
    """Default space for pretraining trials: the settings that matter most at small scale."""
    return {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "weight_decay": [0.0, 0.1],
            "warmup_steps": {"low": 0, "high": max(0, max_steps // 5), "int": True}}


def tune_pretrain(run_dir, base_cfg: dict, space=None, n_trials=6, min_steps=20, max_steps=None, eta=2, seed=0,
                  log=print):
    """Search pretraining settings on run_dir's packed data. Every trial trains in
    run_dir/hpo/trial_K/ with its schedule fixed to max_steps and stops at each rung's budget; a
    promoted trial resumes from its checkpoint. Objective: validation loss at the budget.
    Writes run_dir/hpo/{results.jsonl,results.md,best.json}; best.json["config"] is base_cfg with
    the winning values, ready for the pretrain step."""
    from quark.train.trainer import data_spec, train, validate_config
    run_dir = RunDir.of(run_dir)
    data = data_spec(run_dir)
    out = run_dir.output("hpo")
    max_steps = max_steps or min_steps * eta ** rungs_needed(n_trials, eta)
    space = space or pretrain_space(max_steps)

    def objective(params, budget, trial):
        cfg = validate_config({**base_cfg, **params, "max_steps": max_steps,
                               "eval_interval": max_steps, "ckpt_interval": max_steps})
        stats = train(cfg, data, out / f"trial_{trial}", run_dir=run_dir, until_step=budget,
                      log=lambda msg: None)
        return stats["val_loss"]

    result = search(objective, space, n_trials, min_steps, max_steps, eta, seed, log)
    write_results(result, out)
    best = json.loads((out / "best.json").read_text())
    atomic_write_json(out / "best.json", {**best, "config": {**base_cfg, **result.best_params}})
    return result


# ---- `quark hpo`: a tool over the pretrain step's settings

def configure_parser(parser):
    parser.add_argument("--run-dir", default="runs/default", help="run directory holding pack/ (writes RUN_DIR/hpo)")
    parser.add_argument("--trials", type=int, default=6, help="configurations sampled for the first rung")
    parser.add_argument("--max-steps", type=int, default=200, help="steps of the longest rung (the schedule's length)")
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML or JSON file of pretrain settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one pretrain setting, VALUE parsed as YAML (repeatable)")


def run_cli(args):
    from quark.config import ConfigError, read_settings
    from quark.train.trainer import validate_config
    try:
        base = {k: v for k, v in read_settings(args.config, args.set).items() if k != "max_steps"}
        validate_config({**base, "max_steps": args.max_steps})
        if args.trials < 2:
            raise ConfigError(f"--trials: need at least 2 configurations to compare, got {args.trials}")
        result = tune_pretrain(args.run_dir, base, n_trials=args.trials, max_steps=args.max_steps,
                               min_steps=max(1, args.max_steps // 2 ** int(math.log2(args.trials))), eta=2)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(result.table())
    print(f"best: {json.dumps(result.best_params)} -> {RunDir.of(args.run_dir).root / 'hpo' / 'best.json'}")
    return 0
