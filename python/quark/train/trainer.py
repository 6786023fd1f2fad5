"""Pretraining: AdamW, linear warmup + cosine decay, gradient accumulation, clipping, bf16 autocast,
optional torch.compile, periodic validation, JSONL metrics (loss, lr, grad norm, tokens/s, MFU), a
progress bar, a loss-curve PNG, atomic checkpoints with exact resume, and DDP / FSDP2.

Pipeline step `pretrain` (and `quark pretrain --run-dir R`; under torchrun the same command trains
with DDP unless --strategy says otherwise): reads run_dir/pack/{train,val}.bin +
meta.json and run_dir/tokenizer/tokenizer.json; writes run_dir/pretrain/checkpoints/step_N/,
metrics.jsonl, loss.png, stats.json and the final model directory run_dir/pretrain/final/
(quark.model.io format, tokenizer included). Rerunning resumes from the newest good checkpoint.

Exact resume: the data loader position, RNG state, model and optimizer tensors are all in the
checkpoint and the schedule is a function of the step, so N steps + resume + N steps reproduces the
2N-step loss curve bit for bit on the same machine and thread count.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from quark.config import ConfigError, Step, from_dict
from quark.data.loader import TokenLoader, eval_batches
from quark.infer.measure import held_out
from quark.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from quark.model import GPT, GPTConfig, preset
from quark.model.config import check_preset
from quark.model.io import save_model
from quark.rundir import RunDir
from quark.train import checkpoint as ckpt
from quark.train import distributed as qdist
from quark.train.hpo import rungs_needed, search, write_results
from quark.train.loop import LoopSettings, autocast, train_loop
from quark.train.precision import measure_peak_flops, resolve_precision


@dataclass
class PretrainConfig:
    model: str = "plan"            # a preset name (quark.model.PRESETS), or "plan": run_dir/plan/plan.json's choice
    model_overrides: dict = field(default_factory=dict)   # GPTConfig fields replacing the preset's
    seq_len: int = 128
    batch_size: int = 16           # per process, per micro-step
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0         # 0: no clipping
    precision: Literal["auto", "float32", "bfloat16"] = "auto"   # bfloat16: autocast; auto: bf16 where native
    compile: bool = False
    eval_interval: int = 50
    eval_batches: int = 8
    ckpt_interval: int = 50
    keep_last: int = 2
    log_interval: int = 10
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    nproc: int = 1                 # > 1: spawn this many local processes (gloo on CPU)
    threads: int = 0               # torch threads per process; 0: cores / nproc
    peak_tflops: float = 0.0       # MFU denominator per process; 0: measured by a matmul probe
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "log_interval", "eval_interval",
                     "ckpt_interval", "nproc"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretrain.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ConfigError(f"pretrain.warmup_steps: must be in [0, max_steps), got {self.warmup_steps}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"pretrain.lr/min_lr: need 0 <= min_lr <= lr and lr > 0, got {self.lr}, {self.min_lr}")


@dataclass
class DataSpec:
    train_bin: str
    val_bin: str
    dtype: str
    vocab_size: int
    tokenizer: str | None = None


def validate_config(cfg):
    c = from_dict(PretrainConfig, cfg, "pretrain")
    if c.model != "plan":
        check_preset(c.model, "pretrain.model")
    try:
        GPTConfig.from_dict(c.model_overrides, "pretrain.model_overrides")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return c


def data_spec(run_dir):
    run_dir = RunDir.of(run_dir)
    pack = run_dir.pack()
    try:
        tok = str(run_dir.tokenizer_path())
    except FileNotFoundError:
        tok = None
    return DataSpec(str(pack.bin("train")), str(pack.bin("val")), pack.dtype, pack.vocab_size, tok)


def model_config(cfg: PretrainConfig, vocab_size, run_dir=None) -> GPTConfig:
    if cfg.model == "plan":
        run_dir = RunDir.of(run_dir or ".")
        try:
            path = run_dir.input("plan", "plan.json")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"pretrain.model is 'plan' but {e}, or set pretrain.model to a preset") from None
        base = GPTConfig.from_dict(json.loads(path.read_text())["model"], str(path))
    else:
        base = preset(cfg.model)
    fields = {**asdict(base), "vocab_size": vocab_size, "max_seq_len": max(base.max_seq_len, cfg.seq_len)}
    if base.ffn_hidden == ((8 * base.d_model // 3 + 63) // 64) * 64:
        fields["ffn_hidden"] = 0   # keep it derived, so a d_model override rescales it
    fields.update(cfg.model_overrides)
    return GPTConfig(**fields)


def _read_metrics(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    rows = _read_metrics(Path(metrics_path))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())


def train(cfg: PretrainConfig, data: DataSpec, out_dir, run_dir=None, until_step=None, log=None):
    """Train (or resume) in out_dir; on every rank when distributed. until_step: stop after that step
    with a checkpoint (the schedule still runs to max_steps), to be resumed later. Returns stats."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, data, Path(out_dir), run_dir, until_step, log)
    finally:
        torch.set_num_threads(threads)


def loop_settings(cfg: PretrainConfig, precision):
    return LoopSettings(steps=cfg.max_steps, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps,
                        weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), grad_clip=cfg.grad_clip,
                        grad_accum=cfg.grad_accum, precision=precision, ckpt_every=cfg.ckpt_interval,
                        keep_last=cfg.keep_last, log_every=cfg.log_interval, fused=cfg.strategy != "fsdp")


class _Progress:
    """What a pretraining checkpoint holds besides weights: the loader position, tokens seen, configs."""

    def __init__(self, loader, mcfg, cfg):
        self.loader, self.tokens, self.mcfg, self.cfg = loader, 0, mcfg, cfg

    def state_dict(self):
        return {"loader": self.loader.state_dict(), "tokens": self.tokens, "model_config": asdict(self.mcfg),
                "train_config": asdict(self.cfg)}

    def load_state_dict(self, meta):
        self.loader.load_state_dict(meta["loader"])
        self.tokens = meta["tokens"]


def _train(cfg, data, out_dir, run_dir, until_step, log):
    env = qdist.init_distributed()
    log = log or (lambda msg: print(msg, file=sys.stderr) if env.is_main else None)
    mcfg = model_config(cfg, data.vocab_size, run_dir)
    ckpt_root = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"

    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(env.device)
    precision = resolve_precision(cfg.precision, env.device)
    model = qdist.wrap_model(model, cfg.strategy, env, precision)
    runner = torch.compile(model) if cfg.compile else model
    loader = TokenLoader(data.train_bin, data.dtype, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                         rank=env.rank, world_size=env.world_size)
    val = eval_batches(data.val_bin, data.dtype, cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                       rank=env.rank, world_size=env.world_size)
    s = loop_settings(cfg, precision)
    progress = _Progress(loader, mcfg, cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * env.world_size
    flops_per_token = mcfg.flops_per_token(cfg.seq_len)
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    peak = (cfg.peak_tflops * 1e12 if cfg.peak_tflops else measure_peak_flops(env.device, dtype)) * env.world_size
    stop = min(cfg.max_steps, until_step or cfg.max_steps)

    def check_meta(meta):
        if meta["model_config"] != asdict(mcfg):
            raise ckpt.CheckpointError(f"checkpoints in {ckpt_root} were written for another model config "
                                       f"({meta['model_config']}); use a new output directory")
        log(f"resumed from step {meta['step']} (world size {meta['world_size']} -> {env.world_size})")

    def micro_loss(step, micro):
        x, y = loader.next_batch()
        progress.tokens += tokens_per_step // cfg.grad_accum
        return runner(x.to(env.device), y.to(env.device))[1], {}

    metrics = None
    last = {"loss": float("nan"), "val_loss": None, "tokens_per_s": 0.0, "mfu": 0.0}
    t_start = time.perf_counter()
    clock = {"t": t_start, "step": 0}

    def on_start(start):
        nonlocal metrics
        clock["step"] = start
        if env.is_main:   # the curve continues from the checkpoint: drop records of steps after it
            kept = [r for r in _read_metrics(metrics_path) if r["step"] <= start]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            metrics = open(metrics_path, "a")

    def on_log(rec):
        now = time.perf_counter()
        tps = (rec["step"] - clock["step"]) * tokens_per_step / max(now - clock["t"], 1e-9)
        clock.update(t=now, step=rec["step"])
        last.update(loss=rec["loss"], tokens_per_s=tps, mfu=flops_per_token * tps / peak)
        if metrics:
            metrics.write(json.dumps({**rec, "tokens": progress.tokens, "tokens_per_s": round(tps, 1),
                                      "mfu": round(last["mfu"], 5), "elapsed_s": round(now - t_start, 3)}) + "\n")
            metrics.flush()

    def after_step(done):
        if done % cfg.eval_interval == 0 or done == stop:
            scored = held_out(runner, val, autocast=autocast(precision, env.device))
            last["val_loss"] = env.mean(scored.mean()) if val else None
            if metrics and last["val_loss"] is not None:
                metrics.write(json.dumps({"step": done, "val_loss": last["val_loss"]}) + "\n")
                metrics.flush()

    try:
        _, resumed_from = train_loop(model, micro_loss, s, ckpt_root=ckpt_root, env=env, until=until_step,
                                     state=progress, log=on_log, after_step=after_step, desc="pretrain",
                                     check_meta=check_meta, on_start=on_start)
    finally:
        if metrics:
            metrics.close()

    stats = {"steps": stop, "max_steps": cfg.max_steps, "tokens": progress.tokens, "loss": last["loss"],
             "val_loss": last["val_loss"], "params": mcfg.num_params(), "tokens_per_s": round(last["tokens_per_s"], 1),
             "mfu": round(last["mfu"], 5), "seconds": round(time.perf_counter() - t_start, 2),
             "resumed_from": resumed_from, "world_size": env.world_size, "strategy": cfg.strategy,
             "precision": precision}
    if stop == cfg.max_steps:
        full = qdist.full_model_state(model)   # collective under FSDP: every rank takes part
        if env.is_main:
            final = GPT(mcfg)
            qdist.load_full_state(final, None, full, None)
            save_model(final, out_dir / "final", tokenizer_path=data.tokenizer,
                       metadata={"step": stop, "val_loss": last["val_loss"]})
    if env.is_main:
        plot_losses(metrics_path, out_dir / "loss.png")
        atomic_write_json(out_dir / "stats.json", stats)
    env.barrier()
    return stats


def _spawned(cfg_dict, data_dict, out_dir, run_dir, until_step):
    train(PretrainConfig(**cfg_dict), DataSpec(**data_dict), out_dir, run_dir=run_dir, until_step=until_step)


def pretrain(run_dir, cfg: PretrainConfig, until_step=None):
    """Train on run_dir's packed data into run_dir/pretrain (spawning cfg.nproc processes)."""
    run_dir = RunDir.of(run_dir)
    data = data_spec(run_dir)
    out_dir = run_dir.output("pretrain")
    if "WORLD_SIZE" in os.environ and cfg.strategy == "none":
        cfg = replace(cfg, strategy="ddp")   # launched by torchrun
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        if cfg.strategy == "none":
            raise ConfigError("pretrain.strategy: choose 'ddp' or 'fsdp' when nproc > 1")
        qdist.spawn(_spawned, cfg.nproc, asdict(cfg), asdict(data), str(out_dir), str(run_dir.root), until_step,
                    threads=cfg.threads or None)
        return json.loads((out_dir / "stats.json").read_text())
    try:
        return train(cfg, data, out_dir, run_dir=run_dir, until_step=until_step)
    finally:
        if "WORLD_SIZE" in os.environ:
            qdist.shutdown()


def run_step(run_dir, cfg):
    return pretrain(run_dir, validate_config(cfg))


STEP = Step(name="pretrain", config=PretrainConfig, run=run_step, check=validate_config)


# ---- `quark hpo`: hyperparameter search over pretraining runs -------------------------------------

def pretrain_space(max_steps):
    """Default space for pretraining trials: the settings that matter most at small scale."""
    return {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "weight_decay": [0.0, 0.1],
            "warmup_steps": {"low": 0, "high": max(0, max_steps // 5), "int": True}}


def tune_pretrain(run_dir, base_cfg: dict, space=None, n_trials=6, min_steps=20, max_steps=None, eta=2, seed=0,
                  log=print):
    """Search pretraining settings on run_dir's packed data. Every trial trains in
    run_dir/hpo/trial_K/ with its schedule fixed to max_steps and stops at each rung's budget; a
    promoted trial resumes from its checkpoint. Objective: validation loss at the budget.
    Writes run_dir/hpo/{results.jsonl,results.md,best.json}; best.json["config"] is base_cfg with
    the winning values, ready for the pretrain step."""
    run_dir = RunDir.of(run_dir)
    data = data_spec(run_dir)
    out = run_dir.output("hpo")
    max_steps = max_steps or min_steps * eta ** rungs_needed(n_trials, eta)
    space = space or pretrain_space(max_steps)

    def objective(params, budget, trial):
        cfg = validate_config({**base_cfg, **params, "max_steps": max_steps,
                               "eval_interval": max_steps, "ckpt_interval": max_steps})
        stats = train(cfg, data, out / f"trial_{trial}", run_dir=run_dir, until_step=budget, log=lambda msg: None)
        return stats["val_loss"]

    result = search(objective, space, n_trials, min_steps, max_steps, eta, seed, log)
    write_results(result, out)
    best = json.loads((out / "best.json").read_text())
    atomic_write_json(out / "best.json", {**best, "config": {**base_cfg, **result.best_params}})
    return result


def configure_parser(parser):
    """`quark hpo` (a tool: the pretrain step itself is `quark pretrain`)."""
    parser.add_argument("--run-dir", default="runs/default", help="run directory holding pack/ (writes RUN_DIR/hpo)")
    parser.add_argument("--trials", type=int, default=6, help="configurations sampled for the first rung")
    parser.add_argument("--max-steps", type=int, default=200, help="steps of the longest rung (the schedule's length)")
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML or JSON file of pretrain settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one pretrain setting, VALUE parsed as YAML (repeatable)")


def run_cli(args):
    from quark.config import read_settings
    try:
        base = {k: v for k, v in read_settings(args.config, args.set).items() if k != "max_steps"}
        validate_config({**base, "max_steps": args.max_steps})
        if args.trials < 2:
            raise ConfigError(f"--trials: need at least 2 configurations to compare, got {args.trials}")
        result = tune_pretrain(args.run_dir, base, n_trials=args.trials, max_steps=args.max_steps,
                               min_steps=max(1, args.max_steps // 2 ** int(math.log2(args.trials))), eta=2)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(result.table())
    print(f"best: {json.dumps(result.best_params)} -> {RunDir.of(args.run_dir).root / 'hpo' / 'best.json'}")
    return 0
