"""Pieces shared by the fine-tuning and alignment steps: finding the run's tokenizer and models, a
compact AdamW loop (warmup + cosine decay, gradient clipping) whose state is checkpointed in
safetensors so an interrupted step resumes where it stopped, and the step/CLI glue.

Batches are drawn with a generator seeded by (seed, step), so a resumed run sees exactly the batches
the uninterrupted run would have seen.
"""
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save
from tokenizers import Tokenizer
from tqdm import tqdm

from quark.chat import QuarkChat, chat_format, special_ids
from quark.config import ConfigError, from_dict
from quark.io import atomic_write_bytes, atomic_write_json
from quark.model.io import latest_model_dir


def load_tokenizer(path):
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist; run the tokenizer step first")
    tok = Tokenizer.from_file(str(path))
    if isinstance(chat_format(tok, path.parent), QuarkChat):   # (an HF checkpoint brings its own template)
        special_ids(tok)   # fails early, naming the missing chat tokens
    return tok


def find_tokenizer(run_dir, model_dir=None):
    """The tokenizer saved beside the model, else the run's tokenizer step output."""
    for p in ([Path(model_dir) / "tokenizer.json"] if model_dir else []) + [Path(run_dir) / "tokenizer" / "tokenizer.json"]:
        if p.exists():
            return p
    raise FileNotFoundError(f"no tokenizer.json beside {model_dir} or in {run_dir}/tokenizer; run the tokenizer step first")


def resolve_model_dir(run_dir, init, order):
    """init 'auto': the first of run_dir/<step>/final for step in order; otherwise a path (absolute, or
    relative to run_dir)."""
    if init != "auto":
        p = Path(init)
        p = p if p.is_absolute() or p.exists() else Path(run_dir) / p
        if not (p / "model.safetensors").exists():
            raise FileNotFoundError(f"model directory {p} does not exist (no model.safetensors)")
        return p
    for step in order:
        d = Path(run_dir) / step / "final"
        if (d / "model.safetensors").exists():
            return d
    if not order:
        return latest_model_dir(run_dir)
    raise FileNotFoundError(f"{run_dir} holds no model to start from (looked for {', '.join(order)}/final); "
                            "run the earlier steps first or set init to a model directory")


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


def settings(cls, cfg, where):
    """Step settings from the recipe dict (the pipeline adds "seed"; it is kept apart)."""
    cfg = dict(cfg or {})
    seed = cfg.pop("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"{where}.seed: expected an integer, got {seed!r}")
    return from_dict(cls, cfg, where), seed


# ---- CLI glue: every command takes --run-dir, an optional --config YAML and --set key=value overrides.

def add_common_args(parser):
    parser.add_argument("--run-dir", required=True, help="run directory holding the earlier steps' outputs")
    parser.add_argument("--config", default=None, help="YAML file with the step's settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (VALUE is parsed as YAML), repeatable")
    parser.add_argument("--seed", type=int, default=0)


def cli_config(args):
    cfg = {}
    if args.config:
        cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"{args.config}: expected a mapping of settings")
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        cfg[k.strip()] = yaml.safe_load(v)
    cfg["seed"] = args.seed
    return cfg


def run_step_cli(module, args):
    try:
        cfg = cli_config(args)
        module.validate_config(cfg)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    t0 = time.time()
    try:
        stats = module.run_step(Path(args.run_dir), cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    print(json.dumps(stats, indent=1, default=str))
    print(f"done in {time.time() - t0:.1f}s")
    return 0

