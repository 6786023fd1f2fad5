"""quark.train.loop: the one training loop (schedule, optimizer groups, gradient accumulation, exact
resume from its checkpoints, log records) that pretraining, fine-tuning, alignment and distillation run."""
import pytest
import torch

from quark.model import GPT, preset
from quark.model.lora import LoRAConfig, apply_lora
from quark.train import checkpoint as ckpt
from quark.train.loop import LoopSettings, lr_at, make_optimizer, seeded_batches, train_loop


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(preset("nano", vocab_size=64, n_layer=1, max_seq_len=16))


def lm_loss(model):
    def loss_fn(gen):
        idx = torch.randint(0, 64, (4, 9), generator=gen)
        return model(idx[:, :-1], idx[:, 1:])[1], {"rows": 4}
    return loss_fn


def test_lr_schedule():
    s = LoopSettings(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0) and lr_at(100, s) == pytest.approx(0.1)
    assert lr_at(55, s) == pytest.approx(0.55)                      # cosine midpoint
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(10, 100))


def test_optimizer_decays_matrices_only_and_skips_frozen_parameters():
    model = tiny()
    apply_lora(model, LoRAConfig(rank=2))
    opt = make_optimizer(model, LoopSettings(steps=1, lr=1e-3, weight_decay=0.1))
    decay, no_decay = opt.param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable) < len(list(model.parameters()))
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model, LoopSettings(steps=1, lr=1e-3))


def test_gradient_accumulation_equals_the_whole_batch():
    """Two micro-batches of 2 rows accumulate the gradient of one batch of 4 (equal-sized halves): the
    same logged loss and gradient norm at every step, and the same weights (Adam amplifies rounding
    of near-zero gradients to ~1e-6)."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 64, (4, 9), generator=g)
    whole, halves = tiny(), tiny()
    a, _ = train_loop(whole, lambda step, micro: (whole(idx[:, :-1], idx[:, 1:])[1], {}),
                      LoopSettings(steps=3, lr=1e-2, grad_clip=0.0, log_every=1))
    h = idx.split(2)
    b, _ = train_loop(halves, lambda step, micro: (halves(h[micro][:, :-1], h[micro][:, 1:])[1], {}),
                      LoopSettings(steps=3, lr=1e-2, grad_clip=0.0, log_every=1, grad_accum=2))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5) and rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    for (n, p), (_, q) in zip(whole.named_parameters(), halves.named_parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=n)


class Counter:
    def __init__(self):
        self.calls = 0

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, meta):
        self.calls = meta["calls"]


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    s = LoopSettings(steps=8, lr=1e-2, warmup=2, min_lr=1e-3, ckpt_every=3, log_every=2)
    a = tiny()
    history_a, resumed = train_loop(a, seeded_batches(lm_loss(a), 7), s, keep_history=True)
    assert resumed is None and [r["step"] for r in history_a] == [2, 4, 6, 8] and history_a[0]["rows"] == 4
    b, counter = tiny(), Counter()

    def counted(loss_fn):
        def micro(step, m):
            counter.calls += 1
            return loss_fn(step, m)
        return micro
    train_loop(b, counted(seeded_batches(lm_loss(b), 7)), s, ckpt_root=tmp_path, until=5, state=counter, keep_history=True)
    assert [c.name for c in ckpt.list_checkpoints(tmp_path)] == ["step_000005", "step_000003"] and counter.calls == 5
    c = tiny(1)                                   # other initial weights: the checkpoint overwrites them
    history_c, resumed = train_loop(c, counted(seeded_batches(lm_loss(c), 7)), s, ckpt_root=tmp_path, state=counter,
                                    keep_history=True)
    assert resumed == 5 and counter.calls == 8    # the counter continued from the checkpoint, 3 more calls
    assert [r["step"] for r in history_c] == [2, 4, 5, 6, 8]   # history kept across the stop (5: where it stopped)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    assert history_c[-1]["loss"] == pytest.approx(history_a[-1]["loss"], rel=1e-5)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    s = LoopSettings(steps=2, lr=1e-2, ckpt_every=1)
    a = tiny()
    train_loop(a, seeded_batches(lm_loss(a), 0), s, ckpt_root=tmp_path)
    other = GPT(preset("nano", vocab_size=64, n_layer=2, max_seq_len=16))
    with pytest.raises(ckpt.CheckpointError, match="does not match the model"):
        train_loop(other, seeded_batches(lm_loss(other), 0), LoopSettings(steps=4, lr=1e-2), ckpt_root=tmp_path)
