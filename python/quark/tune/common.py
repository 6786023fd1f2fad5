"""The training loop shared by the fine-tuning and alignment steps: a compact AdamW loop (warmup +
cosine decay, gradient clipping) whose state is checkpointed in safetensors so an interrupted step
resumes where it stopped.

Batches are drawn with a generator seeded by (seed, step), so a resumed run sees exactly the batches
the uninterrupted run would have seen.
"""
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm import tqdm

from quark.io import atomic_write_bytes, atomic_write_json


@dataclass
class LoopSettings:
    steps: int
    lr: float
    warmup: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ckpt_every: int = 0          # 0: no intermediate checkpoints


def lr_at(step, s: LoopSettings):
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_generator(seed, step):
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_loop(model, loss_fn, s: LoopSettings, seed=0, ckpt_dir=None, desc="train", log_every=10):
    """Minimise loss_fn(gen) -> (loss, metrics dict of floats) over the model's trainable parameters.
    Returns the history: one dict per logged step. Resumes from ckpt_dir/state.safetensors if present."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))
    start, history = 0, []
    if ckpt_dir is not None and (Path(ckpt_dir) / "state.safetensors").exists():
        start, history = _load_checkpoint(Path(ckpt_dir), named, opt)
    model.train()
    bar = tqdm(range(start, s.steps), desc=desc, initial=start, total=s.steps, leave=False, mininterval=1.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        loss, metrics = loss_fn(batch_generator(seed, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in named], s.grad_clip) if s.grad_clip > 0 else torch.tensor(0.0)
        opt.step()
        if step % log_every == 0 or step == s.steps - 1:
            rec = {"step": step, "loss": round(float(loss.detach()), 5), "lr": lr_at(step, s), "grad_norm": round(float(gnorm), 4)}
            rec.update({k: round(float(v.detach() if torch.is_tensor(v) else v), 5) for k, v in metrics.items()})
            history.append(rec)
            bar.set_postfix(loss=rec["loss"])
        if ckpt_dir is not None and s.ckpt_every and (step + 1) % s.ckpt_every == 0 and step + 1 < s.steps:
            _save_checkpoint(Path(ckpt_dir), named, opt, step + 1, history)
    model.eval()
    return history


def _save_checkpoint(d, named, opt, step, history):
    state = {f"param.{n}": p.detach().contiguous() for n, p in named}
    for i, (_, p) in enumerate(named):
        st = opt.state.get(p)
        if st:
            state[f"opt.{i}.exp_avg"] = st["exp_avg"].contiguous()
            state[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
    atomic_write_bytes(d / "state.safetensors", save(state))
    atomic_write_json(d / "state.json", {"step": step, "history": history})


def _load_checkpoint(d, named, opt):
    state = load_file(d / "state.safetensors")
    meta = json.loads((d / "state.json").read_text())
    with torch.no_grad():
        for i, (n, p) in enumerate(named):
            key = f"param.{n}"
            if key not in state or state[key].shape != p.shape:
                raise ValueError(f"checkpoint {d} does not match the model ({key}); delete it to start over")
            p.copy_(state[key])
            if f"opt.{i}.exp_avg" in state:
                opt.state[p] = {"step": torch.tensor(float(meta["step"])), "exp_avg": state[f"opt.{i}.exp_avg"].clone(),
                                "exp_avg_sq": state[f"opt.{i}.exp_avg_sq"].clone()}
    return int(meta["step"]), list(meta["history"])


def clear_checkpoint(ckpt_dir):
    if ckpt_dir is not None and Path(ckpt_dir).exists():
        shutil.rmtree(ckpt_dir)
