"""Regression gate: metrics of a candidate against a stored baseline, with per-metric tolerances.

Baselines are stored per model version in a JSON file (atomic writes). A metric regresses when it
moves in its bad direction by more than its tolerance; metrics without a rule (counts, timings)
are reported but never gate. `quark eval --gate` exits non-zero on any regression.
"""
import fnmatch
import json
import time
from dataclasses import dataclass
from pathlib import Path

from quark.io import atomic_write_json

# pattern -> (better direction, tolerance, relative?)
DEFAULT_RULES = {
    "*perplexity": ("lower", 0.05, True),
    "*loss": ("lower", 0.03, True),
    "*bits_per_byte": ("lower", 0.03, True),
    "*acc": ("higher", 0.05, False),
    "*acc_norm": ("higher", 0.05, False),
    "*exact_match": ("higher", 0.05, False),
    "*pass@*": ("higher", 0.05, False),
}


@dataclass
class Check:
    metric: str
    baseline: float
    value: float
    direction: str
    limit: float
    regressed: bool

    def describe(self):
        verdict = "REGRESSED" if self.regressed else "ok"
        return (f"{self.metric}: {self.value:.4g} vs baseline {self.baseline:.4g} "
                f"({self.direction} is better, limit {self.limit:.4g}) {verdict}")


def rule_for(metric, rules):
    for pattern, rule in rules.items():
        if fnmatch.fnmatch(metric, pattern):
            return rule
    return None


def compare(metrics, baseline, rules=None):
    """-> list of Check for every numeric metric present in both and covered by a rule."""
    rules = DEFAULT_RULES if rules is None else rules
    checks = []
    for name, base in sorted(baseline.items()):
        value = metrics.get(name)
        rule = rule_for(name, rules)
        if rule is None or not isinstance(value, (int, float)) or not isinstance(base, (int, float)):
            continue
        direction, tol, relative = rule
        slack = tol * abs(base) if relative else tol
        limit = base + slack if direction == "lower" else base - slack
        regressed = value > limit if direction == "lower" else value < limit
        checks.append(Check(name, float(base), float(value), direction, float(limit), bool(regressed)))
    return checks


class BaselineStore:
    def __init__(self, path):
        self.path = Path(path)
        self.data = {"versions": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"baseline file {self.path} is corrupted: {e}") from None
            if not isinstance(self.data.get("versions"), dict):
                raise ValueError(f"baseline file {self.path} has no 'versions' mapping")

    def versions(self):
        return sorted(self.data["versions"], key=lambda v: self.data["versions"][v]["recorded_at"])

    def get(self, version=None):
        if not self.data["versions"]:
            return None, None
        version = version or self.versions()[-1]
        if version not in self.data["versions"]:
            raise KeyError(f"no baseline for version {version!r}; known: {', '.join(self.versions())}")
        return version, self.data["versions"][version]["metrics"]

    def record(self, version, metrics):
        self.data["versions"][version] = {"metrics": metrics, "recorded_at": time.time()}
        atomic_write_json(self.path, self.data)
