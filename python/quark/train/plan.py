"""Scoping a pretraining run before spending compute on it: parameters, training FLOPs (6ND plus
attention), memory for weights / gradients / AdamW / activations, the Chinchilla-optimal token count
(about 20 tokens per parameter, Hoffmann et al. 2022), and a time estimate from a short throughput
probe on this machine. An architecture selector picks depth / width / heads to fit a parameter,
memory or time budget.

Pipeline step `plan` (`quark plan --run-dir R`; `quark run RECIPE --plan` previews a recipe's plan): writes run_dir/plan/plan.json (the chosen
GPTConfig under "model", which `pretrain` uses when its model is "plan", plus the estimates and the
runner-up candidates) and a readable run_dir/plan/plan.md.
"""
import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from quark.config import ConfigError, Step, from_dict
from quark.io import atomic_write_json, atomic_write_text
from quark.model import GPT, GPTConfig, preset
from quark.model.config import check_preset
from quark.rundir import RunDir
from quark.train.precision import resolve_precision

TOKENS_PER_PARAM = 20          # Chinchilla-optimal tokens per parameter
BYTES = {"float32": 4, "bfloat16": 2}


def memory_estimate(cfg: GPTConfig, batch_size, seq_len, precision="float32"):
    """Bytes for training one micro-batch with AdamW, by component.

    Weights, gradients and the two AdamW moments stay in fp32 (bf16 autocast keeps fp32 masters).
    Activations kept for backward, per token and layer: 8 d (norm inputs/outputs, attention output,
    residual), 4 kv (k, v before and after RoPE), 4 ffn (gate, up, SiLU, product), at the autocast
    width; plus the fp32 logits and their gradient (2 V per token). An estimate, not a measurement."""
    p = cfg.num_params()
    kv = cfg.n_kv_head * cfg.head_dim
    per_token = cfg.n_layer * (8 * cfg.d_model + 4 * kv + 4 * cfg.ffn_hidden) * BYTES[precision] + 2 * cfg.vocab_size * 4
    out = {"weights": 4 * p, "grads": 4 * p, "adam": 8 * p, "activations": per_token * batch_size * seq_len}
    out["total"] = sum(out.values())
    return out


def measure_throughput(cfg: GPTConfig, batch_size, seq_len, steps=3, precision="float32"):
    """tokens/s of full training steps (forward, backward, AdamW) on this machine, after one warm-up."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return batch_size * seq_len / sorted(times)[len(times) // 2]


def estimate(cfg: GPTConfig, tokens, batch_size, seq_len, precision="float32", tokens_per_s=None):
    """Everything a plan reports for training cfg on `tokens` tokens."""
    flops_per_token = cfg.flops_per_token(seq_len)
    mem = memory_estimate(cfg, batch_size, seq_len, precision)
    out = {"params": cfg.num_params(), "non_embedding_params": cfg.num_params(non_embedding=True),
           "tokens": int(tokens), "flops_per_token": flops_per_token, "train_flops": flops_per_token * tokens,
           "train_flops_6nd": 6 * cfg.num_params() * tokens, "chinchilla_tokens": TOKENS_PER_PARAM * cfg.num_params(),
           "memory_bytes": mem}
    if tokens_per_s:
        out["tokens_per_s"] = tokens_per_s
        out["est_seconds"] = tokens / tokens_per_s
        out["achieved_flops"] = flops_per_token * tokens_per_s
    return out


def candidates(vocab_size, seq_len, tie_embeddings=True, head_dims=(32, 64)):
    """A grid of sensible shapes: depth 2..24, width a multiple of the head size, aspect ratio
    d_model / n_layer in [16, 128] (Kaplan et al. 2020: loss is flat across shapes in that range),
    GQA with 2 query heads per KV head when the head count allows."""
    out = []
    for n_layer in (2, 3, 4, 6, 8, 10, 12, 16, 20, 24):
        for head_dim in head_dims:
            for n_head in range(2, 33):
                d = n_head * head_dim
                if not 16 <= d / n_layer <= 128:
                    continue
                kv = n_head // 2 if n_head % 2 == 0 else n_head
                out.append(GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=kv,
                                     d_model=d, max_seq_len=seq_len, tie_embeddings=tie_embeddings))
    return out


def select_architecture(vocab_size, seq_len, batch_size, target_params=None, max_memory_bytes=None,
                        time_budget_s=None, tokens=None, achieved_flops=None, precision="float32"):
    """The largest candidate that fits every budget given, ranked (best first).

    target_params: total parameters at most this. max_memory_bytes: memory_estimate total at most
    this. time_budget_s: training `tokens` (default: the candidate's Chinchilla-optimal tokens) at
    `achieved_flops` FLOP/s (measured by a probe) within this many seconds. Ties in size prefer an
    aspect ratio d_model / n_layer near 64."""
    if not (target_params or max_memory_bytes or time_budget_s):
        raise ValueError("select_architecture needs at least one of target_params, max_memory_bytes, time_budget_s")
    if time_budget_s and not achieved_flops:
        raise ValueError("a time budget needs achieved_flops (measure it with measure_throughput)")
    fits = []
    for c in candidates(vocab_size, seq_len):
        p = c.num_params()
        if target_params and p > target_params:
            continue
        if max_memory_bytes and memory_estimate(c, batch_size, seq_len, precision)["total"] > max_memory_bytes:
            continue
        if time_budget_s:
            n_tokens = tokens or TOKENS_PER_PARAM * p
            if c.flops_per_token(seq_len) * n_tokens / achieved_flops > time_budget_s:
                continue
        fits.append(c)
    if not fits:
        raise ValueError("no architecture fits these budgets; raise them or shorten seq_len")
    return sorted(fits, key=lambda c: (-c.num_params(), abs(math.log2(c.d_model / c.n_layer / 64))))


@dataclass
class PlanConfig:
    model: str = "auto"            # a preset to report on, or "auto": pick one with select_architecture
    target_params: int = 2_000_000  # budgets for "auto" (0: unused); at least one must be set
    max_memory_gb: float = 0.0
    time_budget_s: float = 0.0     # with tokens (0: Chinchilla-optimal per candidate)
    tokens: int = 0                # training tokens to plan for; 0: one epoch of pack/train.bin
    vocab_size: int = 0            # 0: the run's pack/meta.json
    seq_len: int = 128
    batch_size: int = 16
    precision: str = "auto"       # as pretrain: auto = bfloat16 where bf16 matmuls are native
    probe: bool = True             # measure tokens/s of the chosen model (a few training steps)
    probe_steps: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.precision not in ("auto", *BYTES):
            raise ConfigError(f"plan.precision: must be one of {['auto', *BYTES]}, got {self.precision!r}")
        if self.model == "auto" and not (self.target_params or self.max_memory_gb or self.time_budget_s):
            raise ConfigError("plan.target_params: model 'auto' needs target_params, max_memory_gb or time_budget_s")


def validate_config(cfg):
    c = from_dict(PlanConfig, cfg, "plan")
    if c.model != "auto":
        check_preset(c.model, "plan.model")
    return c


def make_plan(c: PlanConfig, vocab_size, tokens, log=print):
    """-> plan dict (JSON-able) with the chosen model config, estimates and runner-up candidates."""
    c = replace(c, precision=resolve_precision(c.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    probe_flops = None
    if c.time_budget_s:   # throughput of a mid-sized reference model stands in for every candidate
        ref = preset("micro", vocab_size=vocab_size, max_seq_len=c.seq_len)
        probe_flops = ref.flops_per_token(c.seq_len) * measure_throughput(ref, c.batch_size, c.seq_len, c.probe_steps, c.precision)
    ranked = []
    if c.model == "auto":
        ranked = select_architecture(vocab_size, c.seq_len, c.batch_size, c.target_params or None,
                                     c.max_memory_gb * 2 ** 30 or None, c.time_budget_s or None,
                                     tokens if c.tokens else None, probe_flops, c.precision)
        model = ranked[0]
    else:
        model = preset(c.model, vocab_size=vocab_size, max_seq_len=max(preset(c.model).max_seq_len, c.seq_len))
    tps = measure_throughput(model, c.batch_size, c.seq_len, c.probe_steps, c.precision) if c.probe else None
    est = estimate(model, tokens, c.batch_size, c.seq_len, c.precision, tps)
    return {"model": asdict(model), "estimate": est, "settings": asdict(c), "threads": torch.get_num_threads(),
            "candidates": [{"n_layer": m.n_layer, "d_model": m.d_model, "n_head": m.n_head, "n_kv_head": m.n_kv_head,
                            "params": m.num_params()} for m in ranked[:5]]}


def _fmt(n, unit=""):
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


def render(plan):
    m, e = plan["model"], plan["estimate"]
    mem = e["memory_bytes"]
    lines = [f"model: n_layer={m['n_layer']} d_model={m['d_model']} n_head={m['n_head']} n_kv_head={m['n_kv_head']} "
             f"ffn_hidden={m['ffn_hidden']} vocab={m['vocab_size']} tied={m['tie_embeddings']}",
             f"parameters: {_fmt(e['params'])} ({_fmt(e['non_embedding_params'])} non-embedding)",
             f"training tokens: {_fmt(e['tokens'])} (Chinchilla-optimal: {_fmt(e['chinchilla_tokens'])})",
             f"training compute: {_fmt(e['train_flops'], 'FLOP')} ({_fmt(e['flops_per_token'], 'FLOP')}/token; "
             f"6ND = {_fmt(e['train_flops_6nd'], 'FLOP')})",
             "memory: " + ", ".join(f"{k} {_fmt(v, 'B')}" for k, v in mem.items())]
    if "tokens_per_s" in e:
        lines.append(f"probe ({plan['threads']} threads): {e['tokens_per_s']:,.0f} tokens/s, "
                     f"{_fmt(e['achieved_flops'], 'FLOP/s')} achieved -> estimated {e['est_seconds']:,.0f} s "
                     f"({e['est_seconds'] / 3600:.2f} h) for the planned tokens")
    if plan["candidates"]:
        lines.append("candidates: " + "; ".join(f"L{c['n_layer']} d{c['d_model']} h{c['n_head']}/{c['n_kv_head']} "
                                                f"{_fmt(c['params'])}" for c in plan["candidates"]))
    return "\n".join(lines)


def _vocab_and_tokens(run_dir, c: PlanConfig):
    """(vocab size, training tokens): the settings, else the run's pack (Chinchilla-optimal tokens for the
    target size when there is no pack yet)."""
    if c.vocab_size and c.tokens:
        return c.vocab_size, c.tokens
    try:
        pack = RunDir.of(run_dir).pack()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (or set plan.vocab_size and plan.tokens)") from None
    return c.vocab_size or pack.vocab_size, c.tokens or int(pack.meta.get("train_tokens", 0))


def run_step(run_dir, cfg):
    c = validate_config(cfg)
    vocab_size, tokens = _vocab_and_tokens(run_dir, c)
    plan = make_plan(c, vocab_size, tokens)
    out = RunDir.of(run_dir).output("plan")
    atomic_write_json(out / "plan.json", plan)
    atomic_write_text(out / "plan.md", "# Pretraining plan\n\n```\n" + render(plan) + "\n```\n")
    print(render(plan))
    e = plan["estimate"]
    return {"params": e["params"], "tokens": e["tokens"], "train_flops": e["train_flops"],
            "est_seconds": e.get("est_seconds"), "model": {k: plan["model"][k] for k in ("n_layer", "d_model", "n_head")}}


def preview(run_dir, cfg, vocab_size):
    """The rendered plan of a recipe before its run exists: vocab and tokens from the run's pack when
    present, else vocab_size and Chinchilla-optimal tokens for the target size (`quark run --plan`)."""
    c = validate_config(cfg)
    try:
        vocab_size, tokens = _vocab_and_tokens(run_dir, c)
    except FileNotFoundError:
        vocab_size, tokens = c.vocab_size or vocab_size, c.tokens or TOKENS_PER_PARAM * (c.target_params or 2_000_000)
    return render(make_plan(c, vocab_size, tokens))


STEP = Step(name="plan", config=PlanConfig, run=run_step, check=validate_config)
