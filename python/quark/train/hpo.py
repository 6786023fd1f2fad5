"""Hyperparameter search by successive halving (Jamieson & Talwalkar 2016; the inner loop of
Hyperband, Li et al. 2018): sample n configurations, run each on a small budget, keep the best
1/eta, multiply the budget by eta, repeat until one is left or the budget reaches its maximum.

Generic: search(objective, space, ...) works for any objective(params, budget, trial) -> float
(lower is better), so the AutoML step reuses it as is. The budget is an integer resource (training
steps here); an objective may resume a trial from where its previous rung stopped (the trainer's
tune_pretrain does, through the trainer's exact-resume checkpoints, so a promoted trial never redoes work).

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
