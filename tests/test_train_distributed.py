"""torch.distributed on CPU: 2 gloo processes with DDP and with FSDP2 reproduce single-process
training with the same global batch, and checkpoints reload across world sizes in both directions.
Each test spawns the 2 processes once (starting them is most of the time on a busy machine)."""
import json
import subprocess
import sys

import pytest
import torch
from tests._train_util import losses, make_run_dir

from quark.model.io import load_model
from quark.train import checkpoint as ckpt
from quark.train.trainer import PretrainConfig, pretrain

# Global batch 4 windows: one process of 4, or two processes of 2.
BASE = dict(model="nano", seq_len=32, warmup_steps=1, log_interval=1, eval_interval=3, eval_batches=2,
            ckpt_interval=3, peak_tflops=1.0, threads=1, max_steps=6, precision="float32")
SINGLE = PretrainConfig(**BASE, batch_size=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = make_run_dir(tmp_path_factory.mktemp("single") / "run")
    pretrain(run, SINGLE)
    return run


def _max_diff(a, b):
    la, lb = losses(a / "pretrain" / "metrics.jsonl"), losses(b / "pretrain" / "metrics.jsonl")
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    return max(abs(la[s] - lb[s]) for s in la)


@pytest.mark.slow
def test_fsdp_matches_single_and_shards_reload_anywhere(tmp_path, reference):
    """1 process to step 3, then FSDP2 on 2 processes to step 6 (world size 1 -> 2): the curve is the
    single-process one, the sharded checkpoint holds one file per rank, and its pieces reassemble
    (at any world size) into exactly the final model."""
    run = make_run_dir(tmp_path / "run")
    pretrain(run, SINGLE, until_step=3)
    stats = pretrain(run, PretrainConfig(**BASE, batch_size=2, nproc=2, strategy="fsdp"))
    assert stats["resumed_from"] == 3 and stats["world_size"] == 2 and stats["strategy"] == "fsdp"
    assert _max_diff(reference, run) < 2e-5     # the same math; only the reduction order differs
    newest = ckpt.list_checkpoints(run / "pretrain" / "checkpoints")[0]
    state, model, optim = ckpt.load_checkpoint(newest)
    assert state["step"] == 6 and state["world_size"] == 2 and state["n_files"] == 2 and state["sharded"]
    assert sorted(p.name for p in newest.glob("model-*")) == ["model-00000-of-00002.safetensors",
                                                             "model-00001-of-00002.safetensors"]
    final = load_model(run / "pretrain" / "final").state_dict()
    assert all(torch.equal(model[k], final[k]) for k in model)
    assert optim["state"]["tok_emb.weight"]["exp_avg"].shape == final["tok_emb.weight"].shape


@pytest.mark.slow
def test_ddp_matches_single_and_resumes_in_one_process(tmp_path, reference):
    """DDP on 2 processes to step 3, then 1 process to step 6 (world size 2 -> 1)."""
    run = make_run_dir(tmp_path / "run")
    stats = pretrain(run, PretrainConfig(**BASE, batch_size=2, nproc=2, strategy="ddp"), until_step=3)
    assert stats["world_size"] == 2 and stats["strategy"] == "ddp"
    assert json.loads((ckpt.step_dir(run / "pretrain" / "checkpoints", 3) / "state.json").read_text())["n_files"] == 1
    stats = pretrain(run, SINGLE)
    assert stats["resumed_from"] == 3 and stats["world_size"] == 1
    assert _max_diff(reference, run) < 2e-5


@pytest.fixture(scope="module")
def reference_bf16(tmp_path_factory):
    run = make_run_dir(tmp_path_factory.mktemp("single_bf16") / "run")
    pretrain(run, PretrainConfig(**{**BASE, "precision": "bfloat16"}, batch_size=4))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_bf16_matches_single_process(tmp_path, reference_bf16, strategy):
    """The real `torchrun` command launches `quark pretrain` on 2 gloo processes, bf16 (FSDP2 with its
    bf16 mixed-precision policy): the loss curve is the single-process bf16 one."""
    run = make_run_dir(tmp_path / "run")
    flags = [a for k, v in {**BASE, "batch_size": 2, "precision": "bfloat16", "strategy": strategy}.items()
             for a in (f"--{k.replace('_', '-')}", str(v))]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]   # what the `torchrun` script runs, in this venv
    done = subprocess.run([*torchrun, "--standalone", "--nproc_per_node", "2", "-m", "quark.cli", "pretrain",
                           "--run-dir", str(run), *flags], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((run / "pretrain" / "stats.json").read_text())
    assert (stats["world_size"], stats["strategy"], stats["precision"]) == (2, strategy, "bfloat16")
    assert _max_diff(reference_bf16, run) < 2e-3   # bf16 rounding in different batch splits, not another curve
