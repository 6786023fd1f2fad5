import json
import subprocess
import sys

import pytest

from quark.eval.gate import BaselineStore, compare


def test_directions_and_tolerances():
    base = {"val/loss": 2.0, "task/acc": 0.50, "task/n": 10, "heldout/perplexity": 10.0}
    ok = compare({"val/loss": 2.05, "task/acc": 0.46, "task/n": 3, "heldout/perplexity": 10.4}, base)
    assert not any(c.regressed for c in ok) and {c.metric for c in ok} == {"val/loss", "task/acc", "heldout/perplexity"}
    bad = {c.metric: c.regressed for c in compare({"val/loss": 2.1, "task/acc": 0.40, "heldout/perplexity": 9.0}, base)}
    assert bad == {"val/loss": True, "task/acc": True, "heldout/perplexity": False}


def test_store_records_versions_and_refuses_corruption(tmp_path):
    s = BaselineStore(tmp_path / "b.json")
    assert s.get() == (None, None)
    s.record("v1", {"a/acc": 0.1})
    s.record("v2", {"a/acc": 0.2})
    assert BaselineStore(tmp_path / "b.json").get() == ("v2", {"a/acc": 0.2})
    assert BaselineStore(tmp_path / "b.json").get("v1") == ("v1", {"a/acc": 0.1})
    with pytest.raises(KeyError, match="no baseline for version 'v9'"):
        s.get("v9")
    (tmp_path / "b.json").write_text("{trunc")
    with pytest.raises(ValueError, match="corrupted"):
        BaselineStore(tmp_path / "b.json")


def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "quark.cli", "eval", *args], capture_output=True, text=True, timeout=300)


def test_cli_gate_fails_on_regression_and_passes_otherwise(tiny_model_dir, tmp_path):
    store = tmp_path / "baselines.json"
    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--model", str(tiny_model_dir), "--tasks", "python_builtins", "--task-limit", "4",
              "--baselines", str(store)]
    r = run_eval(*common)                  # no baseline yet: passes and records this version
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "eval" / "results.json").read_text())["gate"]["passed"]
    assert run_eval(*common, "--gate").returncode == 0
    data = json.loads(store.read_text())
    version = next(iter(data["versions"]))
    data["versions"][version]["metrics"]["python_builtins/acc"] = 1.0    # an unreachable baseline
    store.write_text(json.dumps(data))
    r = run_eval(*common, "--gate")
    assert r.returncode == 1 and "REGRESSED" in r.stdout and "gate FAILED" in r.stdout
    assert run_eval(*common, "--no-gate").returncode == 0   # recorded as failed, not an error, without --gate
