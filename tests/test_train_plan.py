"""Planning: estimates (params, FLOPs, memory, Chinchilla tokens, probed time), the architecture
selector under parameter / memory / time budgets, and the plan step feeding pretrain."""
import json

import pytest
from tests._train_util import make_run_dir

from quark.cli import main as quark_main
from quark.config import ConfigError
from quark.model import GPT, preset
from quark.train import plan
from quark.train.trainer import PretrainConfig, pretrain


def test_estimate_numbers():
    cfg = preset("micro")
    e = plan.estimate(cfg, tokens=1_000_000, batch_size=8, seq_len=128, tokens_per_s=10_000)
    assert e["params"] == cfg.num_params() == sum(p.numel() for p in GPT(cfg).parameters())
    assert e["chinchilla_tokens"] == 20 * e["params"]
    assert e["train_flops"] == cfg.flops_per_token(128) * 1_000_000
    assert e["est_seconds"] == pytest.approx(100.0)
    mem = e["memory_bytes"]
    assert mem["weights"] == mem["grads"] == 4 * e["params"] and mem["adam"] == 8 * e["params"]
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    bf16 = plan.memory_estimate(cfg, 8, 128, "bfloat16")
    assert bf16["activations"] < mem["activations"] and bf16["weights"] == mem["weights"]


def test_selector_respects_each_budget():
    by_params = plan.select_architecture(4096, 128, 8, target_params=5_000_000)
    assert by_params[0].num_params() <= 5_000_000
    assert by_params[0].num_params() >= max(c.num_params() for c in by_params) * 0.999
    assert all(16 <= c.d_model / c.n_layer <= 128 for c in by_params)
    mem = 200 * 2 ** 20
    by_mem = plan.select_architecture(4096, 128, 8, max_memory_bytes=mem)
    assert plan.memory_estimate(by_mem[0], 8, 128)["total"] <= mem
    fast, slow = (plan.select_architecture(512, 128, 8, time_budget_s=t, achieved_flops=50e9)[0] for t in (60, 600))
    assert fast.num_params() < slow.num_params()
    n = fast.num_params()
    assert fast.flops_per_token(128) * 20 * n / 50e9 <= 60
    with pytest.raises(ValueError, match="no architecture fits"):
        plan.select_architecture(4096, 128, 8, target_params=1000)
    with pytest.raises(ValueError, match="achieved_flops"):
        plan.select_architecture(4096, 128, 8, time_budget_s=10)


def test_throughput_probe():
    assert plan.measure_throughput(preset("nano", vocab_size=256), 2, 32, steps=1) > 0



def test_plan_step_feeds_pretrain(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    stats = plan.run_step(run_dir, {"target_params": 300_000, "seq_len": 32, "batch_size": 4, "probe_steps": 1,
                                    "seed": 0})
    p = json.loads((run_dir / "plan" / "plan.json").read_text())
    assert p["model"]["vocab_size"] == 256 and stats["params"] <= 300_000 and stats["est_seconds"] > 0
    assert p["estimate"]["tokens"] == 40_000 and "probe" in (run_dir / "plan" / "plan.md").read_text()
    out = pretrain(run_dir, PretrainConfig(model="plan", seq_len=32, batch_size=4, max_steps=2, warmup_steps=0,
                                           eval_batches=1, peak_tflops=1.0, threads=1))
    assert out["params"] == stats["params"]


def test_plan_config_errors_and_cli(tmp_path, capsys):
    with pytest.raises(ConfigError, match="plan.model: unknown model preset"):
        plan.validate_config({"model": "giant"})
    with pytest.raises(ConfigError, match="needs target_params"):
        plan.validate_config({"target_params": 0})
    run = tmp_path / "run"
    assert quark_main(["plan", "--run-dir", str(run), "--model", "micro", "--vocab-size", "4096", "--tokens", "2e6",
                       "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "Chinchilla-optimal" in out and "memory:" in out
    assert json.loads((run / "plan" / "plan.json").read_text())["model"]["vocab_size"] == 4096
    assert quark_main(["plan", "--run-dir", str(tmp_path / "empty"), "--target-params", "1e6"]) == 1
    assert "set plan.vocab_size and plan.tokens" in capsys.readouterr().out


def test_plan_a_recipe_without_a_run(tmp_path):
    import subprocess
    import sys
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\nsteps:\n  plan: {{target_params: 300000, probe: false}}\n"
                      "  tokenizer: {vocab_size: 1024}\n")
    r = subprocess.run([sys.executable, "-m", "quark.cli", "run", str(recipe), "--plan"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "vocab=1024" in r.stdout and "Chinchilla-optimal" in r.stdout
    recipe.write_text("steps:\n  plan: {target_parms: 3}\n")
    r = subprocess.run([sys.executable, "-m", "quark.cli", "run", str(recipe), "--plan"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "target_parms" in r.stdout
