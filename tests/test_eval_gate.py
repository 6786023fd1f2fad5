import json
import subprocess
import sys

import numpy as np
import pytest

from quark.eval.gate import compare


def items(scores, metric="acc", prefix="d"):
    return [{"id": f"{prefix}{i}", metric: float(s)} for i, s in enumerate(scores)]


def flip(scores, losses=0, wins=0):
    """A copy of 0/1 scores with `losses` right answers made wrong and `wins` wrong ones made right."""
    out = list(scores)
    right = [i for i, s in enumerate(scores) if s == 1]
    wrong = [i for i, s in enumerate(scores) if s == 0]
    for i in right[:losses]:
        out[i] = 0
    for i in wrong[:wins]:
        out[i] = 1
    return out


CHAMP = [1, 0] * 20     # 40 items, acc 0.5


@pytest.mark.parametrize("losses,wins,regressed", [
    (2, 0, False),      # the old fixed 0.05 drop: 2 of 40 items is no evidence (sign test p = 0.5)
    (8, 0, True),       # 8 discordant items all against the candidate: p = 2 / 2^8
    (10, 6, False),     # a 0.1 drop, but the candidate also won 6 items: p ~ 0.45
    (0, 8, False),      # better is never a regression
])
def test_sign_test_over_discordant_items(losses, wins, regressed):
    (c,) = compare({"t": items(flip(CHAMP, losses, wins))}, {"t": items(CHAMP)})
    assert (c.test, c.n, c.wins, c.losses) == ("sign", 40, wins, losses)
    assert c.regressed == regressed and c.confidence == 0.95
    assert c.value - c.baseline == pytest.approx((wins - losses) / 40)
    assert ("REGRESSED" in c.describe()) == regressed and "95% interval" in c.describe()


def test_confidence_level_decides_borderline_cases():
    cand = {"t": items(flip(CHAMP, 6, 0))}          # p = 2 / 64 = 0.031
    assert compare(cand, {"t": items(CHAMP)}, confidence=0.95)[0].regressed
    assert not compare(cand, {"t": items(CHAMP)}, confidence=0.99)[0].regressed
    with pytest.raises(ValueError, match="confidence"):
        compare(cand, cand, confidence=1.0)


def test_graded_scores_use_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.uniform(2.0, 4.0, size=30)            # per-window losses vary a lot between windows...
    worse = base + 0.05 + rng.normal(0, 0.01, 30)    # ...but the candidate is worse on every one of them
    noisy = base + rng.normal(0, 0.05, 30)
    (c,) = compare({"heldout": items(worse, "loss")}, {"heldout": items(base, "loss")})
    assert c.test == "bootstrap" and c.direction == "lower" and c.regressed and c.low > 0 and c.p_value is None
    (c,) = compare({"heldout": items(noisy, "loss")}, {"heldout": items(base, "loss")})
    assert not c.regressed and c.low < 0 < c.high


def test_items_pair_by_id_and_unknown_metrics_do_not_gate():
    base = {"t": items(CHAMP), "only_base": items([1, 1])}
    cand = items(flip(CHAMP, 8, 0))[::-1] + [{"id": "new", "acc": 0.0}]      # other order, one extra item
    for it in cand:
        it["tokens"] = 5.0                                                     # no direction: not gated
    (c,) = compare({"t": cand}, base)
    assert c.metric == "t/acc" and c.n == 40 and c.losses == 8 and c.regressed
    assert compare({"x": items(CHAMP)}, base) == []


def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "quark.cli", "eval", *args], capture_output=True, text=True, timeout=300)


def test_cli_gate_against_a_results_file(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--model", str(tiny_model_dir), "--tasks", "python_builtins", "--task-limit", "16"]
    r = run_eval(*common)
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "eval" / "results.json").read_text())
    assert len(res["items"]["python_builtins"]) == 16 and res["metrics"]["python_builtins/n"] == 16
    (tmp_path / "champion.json").write_text(json.dumps(res))
    r = run_eval(*common, "--gate", str(tmp_path / "champion.json"))
    assert r.returncode == 0 and "gate passed" in r.stdout and "16 paired items" in r.stdout
    for it in res["items"]["python_builtins"]:
        it["acc"] = 1.0                                     # a champion that got everything right
    (tmp_path / "strong.json").write_text(json.dumps(res))
    r = run_eval(*common, "--gate", str(tmp_path / "strong.json"))
    assert r.returncode == 1 and "REGRESSED" in r.stdout + r.stderr and "gate FAILED" in r.stdout + r.stderr
    assert json.loads((run / "eval" / "results.json").read_text())["gate"]["passed"] is False   # recorded before failing
    (tmp_path / "old.json").write_text(json.dumps({"version": "v", "metrics": {}}))
    r = run_eval(*common, "--gate", str(tmp_path / "old.json"))
    assert r.returncode == 1 and "no per-item results" in r.stdout + r.stderr
