"""The one training loop: AdamW (weight decay on matrices only, as in nanoGPT), linear warmup + cosine
decay, gradient accumulation (DDP all-reduces only on the last micro-step), clipping, bf16 autocast,
log records, and atomic checkpoints (quark.train.checkpoint) with exact resume. Pretraining (also
under DDP / FSDP2), domain adaptation, SFT, the reward model, DPO and distillation each hand it the
loss of one micro-batch; everything else is here.

Exact resume: a checkpoint holds the trainable parameters, the optimizer state, the RNG state, the
log history when asked, and whatever the caller's `state` object reports (a data-loader position);
the schedule is a function of the step, so N steps + resume + N steps equals 2N steps.
"""
import math
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

from quark.train import checkpoint as ckpt
from quark.train.distributed import Dist, unwrap


@dataclass
class LoopSettings:
    steps: int                      # the schedule's length (a run may stop earlier with `until`)
    lr: float
    min_lr: float = 0.0             # the cosine decays to this at `steps`
    warmup: int = 0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0          # 0: no clipping
    grad_accum: int = 1             # micro-batches per optimizer step
    precision: str = "float32"      # "bfloat16": autocast (resolve "auto" with quark.train.precision first)
    ckpt_every: int = 0             # 0: no checkpoints; else every N steps and where the run stops
    keep_last: int = 2
    log_every: int = 10
    fused: bool = True              # the fused AdamW kernel (FSDP2's sharded DTensor parameters need foreach)


def lr_at(step, s: LoopSettings):
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr at `steps`."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model, s: LoopSettings):
    """AdamW over the trainable parameters; weight decay only on matrices (not norms, biases). The
    fused kernel updates all parameters in one pass, where the default foreach path makes several
    (BENCHMARKS.md, training)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=s.lr, betas=tuple(s.betas), eps=1e-8, fused=True if s.fused else None)


def clip_grad_norm(model, max_norm):
    """Clip the global gradient norm (also over FSDP shards; max_norm 0: no clipping) -> the norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):   # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def autocast(precision, device):
    """A factory of autocast contexts: bf16 where asked, a no-op for float32."""
    if precision == "bfloat16":
        return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext


def trainable_state(model):
    """The trainable parameters by name (DTensor shards under FSDP2); a tied alias appears once. Names are
    those of the unwrapped model, as torch.distributed.checkpoint gives them (no DDP "module." prefix)."""
    names = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model).items() if k in names}


def load_state(model, optimizer, model_sd, optim_sd):
    """Load full (unsharded) saved state into a possibly wrapped or sharded model and its optimizer."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    missing = sorted(trainable_state(model).keys() - model_sd.keys())
    if missing:
        raise ckpt.CheckpointError(f"checkpoint does not match the model: {missing[:5]} missing")
    try:
        set_model_state_dict(model, model_sd, options=options)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ckpt.CheckpointError(f"checkpoint does not match the model ({e})") from None


def train_loop(model, micro_loss, s: LoopSettings, *, optimizer=None, ckpt_root=None, env=None, until=None,
               state=None, keep_history=False, log=None, after_step=None, desc="train", check_meta=None,
               on_start=None):
    """Train `model` in place: step by step, micro_loss(step, micro) -> (loss, {name: float metric}) for
    each of the s.grad_accum micro-batches (under autocast). Resumes from the newest good checkpoint
    under ckpt_root. until: stop after that step (with a checkpoint) while the schedule still runs to
    s.steps. state: an object with state_dict() -> JSON-able dict, merged into each checkpoint's metadata
    (data position, counters), and load_state_dict(metadata) on resume. log(record) is called every s.log_every steps and at the stop with
    {"step" (steps done), "loss", "lr", "grad_norm", **metrics}; after_step(done) after each step (evaluation).
    check_meta(meta) may refuse a checkpoint's metadata (raise) before anything is loaded; on_start(step)
    is called with the step training starts from (0, or the one resumed from) before the first step.
    Returns (history of log records, step resumed from or None)."""
    env = env or Dist()
    optimizer = optimizer or make_optimizer(model, s)
    amp = autocast(s.precision, env.device)
    stop = min(s.steps, until or s.steps)
    start, history, resumed_from = 0, [], None
    found = ckpt.load_latest(ckpt_root, log=lambda m: print(m, file=sys.stderr)) if ckpt_root is not None else None
    if found is not None:
        meta, model_sd, optim_sd = found
        if check_meta is not None:
            check_meta(meta)
        load_state(model, optimizer, model_sd, optim_sd)
        ckpt.set_rng_state(meta["rng"])
        if state is not None:
            state.load_state_dict(meta)
        start = resumed_from = meta["step"]
        history = list(meta.get("history", []))
    if on_start is not None:
        on_start(start)

    def save(done):
        meta = {"rng": ckpt.rng_state(), **(state.state_dict() if state is not None else {})}
        if keep_history:
            meta["history"] = history
        ckpt.save_checkpoint(ckpt_root, done, trainable_state(model), get_optimizer_state_dict(model, optimizer), meta,
                             keep_last=s.keep_last, rank=env.rank, world_size=env.world_size, barrier=env.barrier)

    bar = tqdm(total=s.steps, initial=start, desc=desc, disable=not env.is_main, leave=False, file=sys.stderr,
               mininterval=1.0)
    was_training = model.training
    model.train()
    try:
        for step in range(start, stop):
            lr = lr_at(step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, metrics = 0.0, {}
            for micro in range(s.grad_accum):
                # DDP: all-reduce gradients only on the last micro-step of the accumulation
                sync = micro == s.grad_accum - 1 or not hasattr(model, "no_sync")
                with (nullcontext() if sync else model.no_sync()):
                    with amp():
                        loss, m = micro_loss(step, micro)
                    (loss / s.grad_accum).backward()
                loss_sum += float(loss.detach())
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / s.grad_accum
            grad_norm = clip_grad_norm(model, s.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % s.log_every == 0 or done == stop:
                rec = {"step": done, "loss": env.mean(loss_sum / s.grad_accum), "lr": lr, "grad_norm": grad_norm,
                       **{k: env.mean(v) for k, v in metrics.items()}}
                history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                if log is not None:
                    log(rec)
            if after_step is not None:
                after_step(done)
            if ckpt_root is not None and s.ckpt_every and (done % s.ckpt_every == 0 or done == stop):
                save(done)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return history, resumed_from


def seeded_batches(loss_fn, seed):
    """A micro_loss for train_loop from loss_fn(generator) -> (loss, metrics) that draws its own batch:
    the generator is seeded by (seed, step), so a resumed run draws exactly the batches of an
    uninterrupted one without saving any data position (grad_accum 1)."""
    return lambda step, micro: loss_fn(torch.Generator().manual_seed(seed * 1_000_003 + step))


def clear_checkpoints(ckpt_root):
    """Delete a finished run's checkpoints (steps that write a final model keep only that)."""
    if ckpt_root is not None:
        shutil.rmtree(ckpt_root, ignore_errors=True)
