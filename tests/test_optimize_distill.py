"""quark.optimize.distill: KD loss, teacher top-k cache, the distill step against a no-teacher run."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from quark.cli import main as cli_main
from quark.config import ConfigError
from quark.model import GPT, preset
from quark.model.io import load_model, save_model
from quark.optimize.distill import kd_loss, pick_teacher, run_step, student_config, validate_config
from tests._train_util import make_run_dir

SMALL = {"steps": 24, "batch_size": 4, "seq_len": 32, "warmup_steps": 3, "eval_batches": 2, "lr": 1e-2}


def test_kd_loss_full_and_topk():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    y = torch.randint(0, 16, (2, 5))
    total, kl, ce = kd_loss(s, y, 2.0, 0.3, teacher_logits=t)
    p = F.softmax(t / 2, -1)
    expect_kl = (p * (p.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(kl, expect_kl)
    torch.testing.assert_close(ce, F.cross_entropy(s.reshape(-1, 16), y.reshape(-1)))
    torch.testing.assert_close(total, 0.3 * expect_kl + 0.7 * ce)
    # top-k with k = V is the full distribution
    vals, ids = torch.topk(t, 16, dim=-1)
    _, kl_k, _ = kd_loss(s, y, 2.0, 0.3, topk_values=vals.half().float(), topk_ids=ids)
    torch.testing.assert_close(kl_k, expect_kl, rtol=1e-2, atol=1e-3)
    # the student matching the teacher has zero KL
    _, kl0, _ = kd_loss(t, y, 2.0, 1.0, teacher_logits=t)
    assert float(kl0) < 1e-6


def test_student_config_and_validation():
    teacher = preset("micro")
    assert student_config(teacher, {}).n_layer == 2
    small = student_config(teacher, {"d_model": 128, "n_head": 2, "n_kv_head": 1})
    assert small.ffn_hidden == 384 and small.vocab_size == teacher.vocab_size
    with pytest.raises(ConfigError, match="alpha"):
        validate_config({"alpha": 1.5})
    with pytest.raises(ConfigError, match="top_k"):
        validate_config({"top_k": -1})
    with pytest.raises(ConfigError, match="unknown key"):
        validate_config({"teachr": "x"})
    with pytest.raises(ConfigError, match="distill.student"):
        student_config(teacher, {"d_model": 100})


def make_teacher_run(tmp_path):
    """A run dir with packed data and a teacher briefly trained on it (pretrain/final)."""
    from quark.optimize.distill import DistillConfig, train_student
    from quark.train.trainer import data_spec
    run = make_run_dir(tmp_path / "run", vocab_size=256, train_tokens=20_000, val_tokens=2_000)
    cfg = preset("nano", vocab_size=256, max_seq_len=64)
    teacher, _ = train_student(cfg, data_spec(run), DistillConfig(**SMALL, seed=1), alpha=0.0, desc="teacher")
    save_model(teacher, run / "pretrain" / "final", tokenizer_path=run / "tokenizer" / "tokenizer.json")
    return run, teacher


def teacher_kl(student, teacher, run, top_k=0):
    """KL(teacher || student) on held-out tokens: full, or against the teacher's renormalised top-k."""
    x = torch.from_numpy(np.fromfile(run / "pack" / "val.bin", dtype=np.uint16)[:256].astype(np.int64)).view(8, 32)
    with torch.no_grad():
        t = teacher(x)[0]
        if top_k:
            vals, ids = torch.topk(t, top_k, dim=-1)
            return float(kd_loss(student(x)[0], x, 1.0, 1.0, topk_values=vals, topk_ids=ids)[1])
        return float(kd_loss(student(x)[0], x, 1.0, 1.0, teacher_logits=t)[1])


@pytest.mark.slow
def test_distill_step_on_the_fly_and_topk_cache(tmp_path):
    run, teacher = make_teacher_run(tmp_path)
    stats = run_step(run, {"seed": 0, **SMALL, "alpha": 0.9, "temperature": 1.0})
    for name in ("teacher", "student", "baseline"):
        assert stats[name]["perplexity"] > 1
    assert stats["student"]["params"] < stats["teacher"]["params"]
    assert stats["student"]["tokens"] == stats["baseline"]["tokens"] == 24 * 4 * 32
    assert stats["teacher"]["dir"] == str(run / "pretrain" / "final")
    assert stats["student"]["vs_baseline_2se"] > 0
    assert stats["student"]["vs_baseline"] == pytest.approx(
        100 * (stats["student"]["perplexity"] / stats["baseline"]["perplexity"] - 1), abs=0.05)
    student, baseline = load_model(run / "distill" / "student"), load_model(run / "distill" / "baseline")
    assert student.config.n_layer == 1 and (run / "distill" / "student" / "tokenizer.json").exists()
    # the distilled student imitates the teacher more closely than the same student trained without it
    assert teacher_kl(student, teacher, run) < teacher_kl(baseline, teacher, run)
    mtime = (run / "distill" / "student" / "model.safetensors").stat().st_mtime
    assert run_step(run, {"seed": 0, **SMALL, "alpha": 0.9, "temperature": 1.0}) == stats   # resumed
    assert (run / "distill" / "student" / "model.safetensors").stat().st_mtime == mtime

    # cached top-k: a teacher pass writes safetensors chunks; training reads them
    cached = run_step(run, {"seed": 0, **SMALL, "alpha": 0.9, "temperature": 1.0, "top_k": 8, "baseline": False})
    chunks = sorted((run / "distill" / "teacher_topk").glob("topk-*.safetensors"))
    assert len(chunks) == 1 and "baseline" not in cached
    with safe_open(str(chunks[0]), framework="pt") as f:
        assert f.metadata()["top_k"] == "8" and f.get_slice("values").get_shape() == [24, 4, 32, 8]
    # (a briefly trained teacher is far from peaked, so the student matches it on its top 8 ids)
    assert teacher_kl(load_model(run / "distill" / "student"), teacher, run, 8) < teacher_kl(baseline, teacher, run, 8)


@pytest.mark.slow
def test_teacher_is_the_best_held_out_model_not_the_latest(tmp_path):
    """An aligned model later in the run (here an untrained one standing in for a weak dpo model) is
    the run's latest model, but "best" picks the one that models the held-out text best."""
    from quark.data.loader import eval_batches
    from quark.train.trainer import data_spec
    run, _ = make_teacher_run(tmp_path)
    save_model(GPT(preset("nano", vocab_size=256, max_seq_len=64)), run / "dpo" / "final")
    data = data_spec(run)
    val = eval_batches(data.val_bin, data.dtype, 4, 32, 2)
    best, losses = pick_teacher(run, "best", data, val)
    assert best == run / "pretrain" / "final" and set(losses) == {str(run / "pretrain" / "final"), str(run / "dpo" / "final")}
    assert losses[str(best)] < losses[str(run / "dpo" / "final")]
    assert pick_teacher(run, "latest", data, val) == (run / "dpo" / "final", {})
    assert pick_teacher(run, str(run / "dpo" / "final"), data, val) == (run / "dpo" / "final", {})
    stats = run_step(run, {"seed": 0, **SMALL, "baseline": False})
    assert stats["teacher"]["dir"] == str(best) and stats["teacher_candidates"] == losses


def test_errors_and_cli(tmp_path, capsys):
    run = make_run_dir(tmp_path / "run", vocab_size=256, train_tokens=20_000, val_tokens=2_000)
    assert cli_main(["distill", "--run-dir", str(run), "--steps", "5"]) == 1   # no teacher in the run yet
    assert "no trained model" in capsys.readouterr().out
    save_model(GPT(preset("nano", vocab_size=128, max_seq_len=64)), run / "pretrain" / "final")
    with pytest.raises(ValueError, match="another tokenizer"):
        run_step(run, {"seed": 0, **SMALL})
    save_model(GPT(preset("nano", vocab_size=256, max_seq_len=64)), run / "pretrain" / "final")
    assert cli_main(["distill", "--run-dir", str(run), "--steps", "4", "--no-baseline", "--set", "batch_size=2",
                     "--set", "seq_len=16", "--set", "warmup_steps=1", "--set", "eval_batches=1"]) == 0
    out = capsys.readouterr().out
    assert "student" in out and "baseline" not in out
    assert json.loads((run / "distill" / "report.json").read_text())["settings"]["steps"] == 4


def test_distill_from_an_hf_teacher_into_an_hf_student(tmp_path):
    """An HF teacher in a run packed with Quark's tokenizer: both models learn on the run's text in the
    teacher's tokens; the student starts from a smaller checkpoint with the same tokenizer and keeps the
    chat files; a student with another vocabulary is refused by name."""
    from quark.chat import TemplateChat
    from quark.rundir import RunDir
    from tests.hf_helpers import make_hf_model, make_packed_run
    run, _ = make_packed_run(tmp_path)
    make_hf_model(tmp_path / "teacher", max_position_embeddings=64)
    small = make_hf_model(tmp_path / "student", seed=1, max_position_embeddings=64, num_hidden_layers=1)
    cfg = {"seed": 0, "teacher": str(tmp_path / "teacher"), "student_init": str(tmp_path / "student"), "steps": 4,
           "batch_size": 2, "seq_len": 32, "eval_batches": 1, "warmup_steps": 0, "baseline": False}
    stats = run_step(run, cfg)
    tokens = np.fromfile(run / "distill" / "tokens" / "train.bin", dtype=np.uint16)
    np.testing.assert_array_equal(tokens, RunDir(run).tokens("train", tmp_path / "teacher"))
    student = load_model(run / "distill" / "student")
    assert student.config.n_layer == 1 and student.config.vocab_size == 320
    assert stats["teacher"]["params"] > stats["student"]["params"]
    assert not torch.equal(student.blocks[0].attn.wq.weight, small.model.layers[0].self_attn.q_proj.weight)  # trained
    assert isinstance(RunDir(run).chat(run / "distill" / "student"), TemplateChat)
    run_step(run, {**cfg, "lr": 0.0, "min_lr": 0.0})     # no update: the student is the checkpoint it started from
    torch.testing.assert_close(load_model(run / "distill" / "student").blocks[0].attn.wq.weight,
                               small.model.layers[0].self_attn.q_proj.weight)
    save_model(GPT(preset("nano", vocab_size=600, max_seq_len=64)), tmp_path / "other",
               tokenizer_path=run / "tokenizer" / "tokenizer.json")
    with pytest.raises(ConfigError, match="student_init: .*other does not share the tokenizer"):
        run_step(run, {**cfg, "student_init": str(tmp_path / "other")})
