"""Checkpoints: atomic layout, keep-last-K, checksums, and refusal of truncated / corrupted /
incomplete checkpoints with a fallback to the previous good one (also inside the trainer)."""
import json

import pytest
import torch
from tests._train_util import losses, make_run_dir

from quark.train import checkpoint as ckpt
from quark.train.trainer import PretrainConfig, pretrain

SMALL = dict(model="nano", seq_len=32, batch_size=4, warmup_steps=2, log_interval=1, eval_interval=100,
             eval_batches=1, peak_tflops=1.0, threads=1, ckpt_interval=2, keep_last=3)


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    model = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}
    optim = {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(5, 3, generator=g)}},
             "param_groups": [{"params": ["w", "b"], "lr": 0.1, "betas": [0.9, 0.95]}]}
    return model, optim


def test_round_trip_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        model, optim = _state(step)
        ckpt.save_checkpoint(tmp_path, step, model, optim, {"loader": {"epoch": 0, "consumed": step}}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000004", "step_000003"]
    state, m, o = ckpt.load_latest(tmp_path)
    ref_m, ref_o = _state(4)
    assert state["step"] == 4 and state["loader"]["consumed"] == 4
    assert torch.equal(m["w"], ref_m["w"]) and torch.equal(o["state"]["w"]["exp_avg"], ref_o["state"]["w"]["exp_avg"])
    assert o["param_groups"][0]["lr"] == 0.1
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"), ("flip", "SHA-256 mismatch"), ("missing", "optim-00000-of-00001.safetensors is missing"),
    ("state", "state.json is corrupted"), ("no_state", "state.json is missing")])
def test_damaged_checkpoint_refused_and_previous_used(tmp_path, damage, message):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, *_state(step), {})
    newest = ckpt.step_dir(tmp_path, 2)
    weights = newest / "model-00000-of-00001.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "missing":
        (newest / "optim-00000-of-00001.safetensors").unlink()
    elif damage == "state":
        (newest / "state.json").write_text('{"step": 2, "fi')
    else:
        (newest / "state.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_checkpoint(newest)
    logged = []
    state, model, _ = ckpt.load_latest(tmp_path, log=logged.append)
    assert state["step"] == 1 and torch.equal(model["w"], _state(1)[0]["w"])
    assert "refusing" in logged[0] and message in logged[0] and "falling back" in logged[0]


def test_stale_temporary_directory_is_ignored(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, *_state(1), {})
    (tmp_path / ".tmp-step_000002").mkdir()   # a crash in the middle of writing step 2
    (tmp_path / ".tmp-step_000002" / "model-00000-of-00001.safetensors").write_bytes(b"partial")
    assert ckpt.load_latest(tmp_path)[0]["step"] == 1
    ckpt.save_checkpoint(tmp_path, 3, *_state(3), {})
    assert not list(tmp_path.glob(".tmp-*"))   # cleaned by the next successful save


def test_rng_state_round_trip():
    state = json.loads(json.dumps(ckpt.rng_state()))
    a = torch.rand(4)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(4), a)


def test_trainer_falls_back_to_previous_checkpoint(tmp_path):
    """Damage the newest checkpoint: the trainer says so, resumes from the one before, and the
    loss curve still matches an uninterrupted run."""
    ref, run = make_run_dir(tmp_path / "ref"), make_run_dir(tmp_path / "run")
    cfg = PretrainConfig(**SMALL, max_steps=8)
    pretrain(ref, cfg)
    pretrain(run, cfg, until_step=6)
    newest = ckpt.step_dir(run / "pretrain" / "checkpoints", 6)
    weights = newest / "model-00000-of-00001.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    stats = pretrain(run, cfg)
    assert stats["resumed_from"] == 4
    la, lb = losses(ref / "pretrain" / "metrics.jsonl"), losses(run / "pretrain" / "metrics.jsonl")
    assert sorted(lb) == list(range(1, 9)) and max(abs(la[s] - lb[s]) for s in la) <= 1e-6
