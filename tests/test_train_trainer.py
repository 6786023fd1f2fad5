"""The pretraining loop: the pipeline step end to end, exact resume (2N steps == N + resume + N),
gradient accumulation, the schedule, bf16 autocast, configuration errors and the CLI."""
import json

import pytest
import torch
from tests._train_util import losses, make_run_dir

from quark.cli import main as quark_main
from quark.config import ConfigError
from quark.model.io import load_model
from quark.train import trainer
from quark.train.checkpoint import CheckpointError, list_checkpoints
from quark.train.trainer import PretrainConfig, pretrain, run_step

# nano model, short sequences; peak_tflops fixed so no matmul probe runs in the tests.
SMALL = dict(model="nano", seq_len=32, batch_size=4, warmup_steps=2, log_interval=1, eval_interval=4,
             ckpt_interval=4, eval_batches=2, peak_tflops=1.0, threads=1, lr=3e-3, min_lr=3e-4,
             precision="float32")


@pytest.fixture
def run_dir(tmp_path):
    return make_run_dir(tmp_path / "run")


def test_pretrain_step_end_to_end(run_dir):
    stats = run_step(run_dir, {**SMALL, "max_steps": 30, "eval_interval": 10, "ckpt_interval": 10, "seed": 0})
    out = run_dir / "pretrain"
    assert stats["steps"] == 30 and stats["tokens"] == 30 * 4 * 32 and stats["val_loss"] is not None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed_s"} <= set(train_rows[0])
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5          # it learns
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "stats.json").read_text())["steps"] == 30
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000030", "step_000020"]  # keep_last=2
    model = load_model(out / "final")
    assert (out / "final" / "tokenizer.json").read_text() == (run_dir / "tokenizer" / "tokenizer.json").read_text()
    x = torch.randint(0, 256, (1, 8))
    assert model(x)[0].shape == (1, 8, 256)
    # Rerunning a finished step resumes at the end instead of training again.
    again = run_step(run_dir, {**SMALL, "max_steps": 30, "eval_interval": 10, "ckpt_interval": 10, "seed": 0})
    assert again["resumed_from"] == 30


def test_exact_resume(tmp_path):
    a, b = make_run_dir(tmp_path / "a"), make_run_dir(tmp_path / "b")
    cfg = PretrainConfig(**SMALL, max_steps=12)
    pretrain(a, cfg)
    first = pretrain(b, cfg, until_step=6)
    assert first["steps"] == 6 and not (b / "pretrain" / "final").exists()
    second = pretrain(b, cfg)
    assert second["resumed_from"] == 6
    la, lb = losses(a / "pretrain" / "metrics.jsonl"), losses(b / "pretrain" / "metrics.jsonl")
    assert sorted(la) == sorted(lb) == list(range(1, 13))
    assert max(abs(la[s] - lb[s]) for s in la) <= 1e-6
    wa, wb = load_model(a / "pretrain" / "final").state_dict(), load_model(b / "pretrain" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grad_accum_matches_larger_batch(tmp_path):
    a, b = make_run_dir(tmp_path / "a"), make_run_dir(tmp_path / "b")
    pretrain(a, PretrainConfig(**{**SMALL, "batch_size": 4}, max_steps=5))
    pretrain(b, PretrainConfig(**{**SMALL, "batch_size": 2}, grad_accum=2, max_steps=5))
    la, lb = losses(a / "pretrain" / "metrics.jsonl"), losses(b / "pretrain" / "metrics.jsonl")
    assert max(abs(la[s] - lb[s]) for s in la) < 1e-5


def test_bf16_autocast_trains(run_dir):
    stats = pretrain(run_dir, PretrainConfig(**{**SMALL, "precision": "bfloat16"}, max_steps=20))
    assert stats["precision"] == "bfloat16"
    rows = losses(run_dir / "pretrain" / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(v)) for v in rows.values()) and rows[20] < rows[1]
    assert stats["val_loss"] is not None


def test_config_errors(run_dir):
    with pytest.raises(ConfigError, match="unknown key 'lerning_rate'"):
        trainer.validate_config({"lerning_rate": 1})
    with pytest.raises(ConfigError, match="warmup_steps"):
        trainer.validate_config({"max_steps": 10, "warmup_steps": 10})
    with pytest.raises(ConfigError, match="pretrain.model: unknown model preset 'huge'"):
        trainer.validate_config({"model": "huge"})
    with pytest.raises(ConfigError, match="n_layr"):
        trainer.validate_config({"model_overrides": {"n_layr": 3}})
    with pytest.raises(FileNotFoundError, match="run the plan step"):
        pretrain(run_dir, PretrainConfig(**{**SMALL, "model": "plan"}, max_steps=3))
    with pytest.raises(FileNotFoundError, match="pack step"):
        pretrain(run_dir / "nowhere", PretrainConfig(**SMALL, max_steps=3))


def test_resume_refuses_another_model(run_dir):
    pretrain(run_dir, PretrainConfig(**SMALL, max_steps=4))
    with pytest.raises(CheckpointError, match="another model config"):
        pretrain(run_dir, PretrainConfig(**SMALL, max_steps=8, model_overrides={"n_layer": 3}))


def test_cli_pretrain(run_dir, capsys):
    rc = quark_main(["pretrain", "--run-dir", str(run_dir), "--model", "nano", "--max-steps", "6", "--seq-len", "32",
                     "--batch-size", "2", "--set", "warmup_steps=1", "--set", "peak_tflops=1", "--set", "eval_batches=1",
                     "--set", "threads=1"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 6
    assert (run_dir / "pretrain" / "final" / "model.safetensors").exists()
    assert quark_main(["pretrain", "--run-dir", str(run_dir), "--set", "warmup=1"]) == 2
