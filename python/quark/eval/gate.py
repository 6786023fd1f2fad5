"""Regression gate: a candidate's per-item results against the champion's, decided by a paired test.

Both models are scored on the same items (documents matched by content id, held-out windows by their
tokens); they differ only where they disagree, and a paired test uses exactly that evidence. 0/1
scores (acc, exact_match, pass@1 of one sample) get the exact sign test over the discordant items;
graded scores (pass@k over samples, per-window loss) a paired bootstrap of the mean difference.
A metric REGRESSES when the candidate is worse and the difference is significant at the confidence
level (default 0.95): two-sided sign-test p < 1 - confidence, or the bootstrap interval entirely on
the bad side. Metrics without per-item results are not gated.

The baseline is the registry champion's stored per-item results (quark.improve.registry). It moves
only on promotion, and promotion needs more than passing: no gated metric may be behind the champion
even in its point estimate. A slow slide of small, individually insignificant losses therefore never
moves the baseline, and adds up against it until it is significant.
"""
import fnmatch
from dataclasses import dataclass
from typing import Optional

import numpy as np

from quark.stats import paired_bootstrap, sign_test

CONFIDENCE = 0.95
DIRECTIONS = {"acc": "higher", "acc_norm": "higher", "exact_match": "higher", "pass@*": "higher", "loss": "lower"}


@dataclass
class Check:
    metric: str          # "<task>/<metric>"
    n: int               # items both models were scored on
    baseline: float      # champion's mean over those items
    value: float         # candidate's mean over those items
    low: float           # interval of value - baseline (paired bootstrap)
    high: float
    wins: int            # items where the candidate is better
    losses: int          # ... worse
    p_value: Optional[float]   # two-sided sign-test p (0/1 scores); None for the bootstrap
    test: str            # "sign" | "bootstrap"
    confidence: float
    direction: str       # "higher" | "lower" is better
    regressed: bool

    @property
    def behind(self):
        """Worse in point estimate (significant or not)."""
        return self.value < self.baseline if self.direction == "higher" else self.value > self.baseline

    def describe(self):
        verdict = "REGRESSED" if self.regressed else "ok"
        return (f"{self.metric}: {self.value:.4g} vs champion {self.baseline:.4g} on {self.n} paired items "
                f"(diff {self.value - self.baseline:+.4g}, {self.confidence:.0%} interval [{self.low:+.4g}, {self.high:+.4g}], "
                f"{self.wins} better / {self.losses} worse, " + (f"sign test p={self.p_value:.3g}" if self.test == "sign" else
                "paired bootstrap") + f"; {self.direction} is better) {verdict}")


def direction_of(metric):
    return next((d for pattern, d in DIRECTIONS.items() if fnmatch.fnmatch(metric, pattern)), None)


def compare(candidate, baseline, confidence=CONFIDENCE, seed=0):
    """candidate, baseline: {section: [{"id": ..., metric: score}]} (the "items" of eval results).
    -> [Check] for every metric with a direction that both scored on shared items."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"gate confidence must be in (0, 1), got {confidence!r}")
    checks = []
    for section in sorted(set(candidate) & set(baseline)):
        base = {it["id"]: it for it in baseline[section]}
        pairs = [(base[it["id"]], it) for it in candidate[section] if it["id"] in base]
        metrics = sorted({m for _, it in pairs for m in it if m != "id"})
        for m in metrics:
            direction = direction_of(m)
            both = [(b[m], c[m]) for b, c in pairs if isinstance(b.get(m), (int, float)) and isinstance(c.get(m), (int, float))]
            if direction is None or not both:
                continue
            a = np.array([x for x, _ in both], dtype=np.float64)
            b = np.array([y for _, y in both], dtype=np.float64)
            sign = 1.0 if direction == "higher" else -1.0
            wins, losses = int((sign * (b - a) > 0).sum()), int((sign * (b - a) < 0).sum())
            _, low, high = paired_bootstrap(a, b, confidence, seed=seed)
            if set(np.unique(np.concatenate([a, b]))) <= {0.0, 1.0}:
                test, p = "sign", sign_test(wins, losses)
                regressed = losses > wins and p < 1 - confidence
            else:
                test, p = "bootstrap", None
                regressed = high < 0 if direction == "higher" else low > 0
            checks.append(Check(f"{section}/{m}", len(both), float(a.mean()), float(b.mean()), low, high, wins, losses,
                                p, test, confidence, direction, bool(regressed)))
    return checks
