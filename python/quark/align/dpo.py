"""Preference optimisation from pairs, with a frozen reference whose log-probs are computed once:

    DPO   (Rafailov et al. 2023):  -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)])
    IPO   (Azar et al. 2023):      ([(pi_c - ref_c) - (pi_r - ref_r)] - 1 / (2 beta))^2
    SimPO (Meng et al. 2024):      -log sigmoid(beta * (pi_c / |c| - pi_r / |r|) - gamma)   (no reference)

pi_* / ref_* are summed log-probs of the answer tokens (quark.align.pairs.sequence_logps) under the
policy / reference. Logged: implicit rewards beta * (pi - ref) for chosen and rejected, their margin
and the fraction of pairs with a positive margin, on training batches and on held-out pairs before
and after training (the held-out log-prob margin pi_c - pi_r is comparable across the three losses).

Step `dpo`: run_dir/sft/final (else pretrain/final) + on-policy pairs (`negatives: policy`, the default:
k samples per prompt from the starting policy and the reference answer, best over worst as the verifier of
the verifiable tasks judges, or the reward model run_dir/reward/final with `judge: model`; pairs from the held-out tasks are the
held-out set) or pairs built from run_dir/instruct (`negatives: instruct`), safety pairs,
an optional pairs JSONL and the users' feedback (the `feedback` setting names the database quark serve
writes; quark.feedback turns its ratings and corrections into pairs) -> run_dir/dpo/final and metrics.json.
"""
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from quark.align import pairs as P
from quark.config import ConfigError, Step, from_dict
from quark.io import atomic_write_json
from quark.model.io import load_model, save_model
from quark.model.lora import LoRAConfig, apply_lora, strip_lora
from quark.rundir import RunDir
from quark.train.loop import LoopSettings, clear_checkpoints, seeded_batches, train_loop


def preference_loss(kind, pi, ref, n_tokens, B, beta, gamma=0.0):
    """pi/ref/n_tokens (2B,) with chosen first -> (loss, metrics). ref is ignored by SimPO."""
    pc, pr = pi[:B], pi[B:]
    if kind == "simpo":
        h = beta * (pc / n_tokens[:B] - pr / n_tokens[B:])
        loss = -F.logsigmoid(h - gamma).mean()
        rc, rr = beta * pc / n_tokens[:B], beta * pr / n_tokens[B:]
    else:
        rc, rr = beta * (pc - ref[:B]), beta * (pr - ref[B:])
        h = (pc - ref[:B]) - (pr - ref[B:])
        loss = -F.logsigmoid(beta * h).mean() if kind == "dpo" else ((h - 1 / (2 * beta)) ** 2).mean()
    margin = (rc - rr).detach()
    return loss, {"reward_chosen": rc.detach().mean(), "reward_rejected": rr.detach().mean(),
                  "reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}


@torch.no_grad()
def reference_logps(model, encoded, pad, batch_size=16):
    """Summed answer log-probs (N, 2): [chosen, rejected] per pair, and answer token counts (N, 2)."""
    model.eval()
    logps, counts = [], []
    for i in range(0, len(encoded), batch_size):
        idx = list(range(i, min(i + batch_size, len(encoded))))
        ids, mask, _ = P.pair_batch(encoded, idx, pad)
        lp, n = P.sequence_logps(model, ids, mask)
        B = len(idx)
        logps.append(torch.stack([lp[:B], lp[B:]], 1))
        counts.append(torch.stack([n[:B], n[B:]], 1))
    return torch.cat(logps), torch.cat(counts)


@torch.no_grad()
def heldout_metrics(model, encoded, ref, pad, beta):
    """Held-out implicit-reward margin/accuracy (vs the reference) and log-prob margin pi_c - pi_r."""
    pi, _ = reference_logps(model, encoded, pad)
    rm = beta * ((pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1]))
    lp_margin = pi[:, 0] - pi[:, 1]
    def acc(m):   # a tie (the untrained policy equals its reference) counts as a coin flip
        return float((m > 0).float().mean() + 0.5 * (m == 0).float().mean())
    return {"reward_margin": float(rm.mean()), "reward_accuracy": acc(rm),
            "logp_margin": float(lp_margin.mean()), "logp_accuracy": acc(lp_margin)}


def optimize(model, train, ref, counts, pad, s, seed=0, ckpt_dir=None):
    """Train the policy on encoded pairs; ref/counts from reference_logps on the same pairs."""
    def loss_fn(gen):
        idx = torch.randint(0, len(train), (min(s.batch_size, len(train)),), generator=gen)
        ids, mask, _ = P.pair_batch(train, idx.tolist(), pad)
        pi, n = P.sequence_logps(model, ids, mask)
        r = torch.cat([ref[idx, 0], ref[idx, 1]])
        return preference_loss(s.loss, pi, r, n.clamp_min(1), len(idx), s.beta, s.gamma)
    loop = LoopSettings(steps=s.steps, lr=s.lr, min_lr=0.1 * s.lr, warmup=s.warmup, weight_decay=s.weight_decay,
                        ckpt_every=s.ckpt_every)
    return train_loop(model, seeded_batches(loss_fn, seed), loop, ckpt_root=ckpt_dir, keep_history=True, desc=s.loss)[0]


@dataclass
class DPOConfig:
    init: str = "auto"               # policy (and reference) model dir, or "auto": sft/final, else pretrain/final
    loss: Literal["dpo", "ipo", "simpo"] = "dpo"
    beta: float = 0.1                # SimPO usually wants ~2
    gamma: float = 0.5               # SimPO target margin
    data: str = "instruct"
    negatives: Literal["policy", "instruct"] = "policy"   # own samples ranked, or mismatched/corrupted references
    judge: Literal["verify", "model"] = "verify"          # policy: the verifiable tasks' checks, or reward/final
    tasks: str = "add,format,code"   # judge verify: task families or a tasks JSONL (quark.verifiable)
    reward_model: str = "reward/final"
    samples: int = 4                 # policy: completions sampled per prompt
    max_new_tokens: int = 32
    pairs: str = ""                  # optional extra preference pairs JSONL (relative to run_dir or absolute)
    feedback: str = ""               # optional feedback DB (quark serve's RUN/feedback/feedback.sqlite): its pairs join training
    feedback_margin: float = 1.0     # rated responses pair when their mean ratings differ by this much (thumbs: 1)
    max_pairs: int = 300
    mismatch: float = 0.5
    safety_pairs: int = 60           # harmful request -> refusal (and benign -> answer) pairs
    steps: int = 40
    batch_size: int = 8
    lr: float = 5e-5
    warmup: int = 5
    weight_decay: float = 0.0
    lora_rank: int = 0               # > 0: train LoRA adapters (merged into dpo/final)
    max_len: int = 0
    overlong: Literal["error", "drop"] = "drop"
    ckpt_every: int = 40
    seed: int = 0

    def __post_init__(self):
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta: must be > 0, got {self.beta}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("dpo.steps and dpo.batch_size must be >= 1")
        if self.samples < 2:
            raise ConfigError(f"dpo.samples: must be >= 2 (pairs need a best and a worst sample), got {self.samples}")


def policy_pairs(run_dir, s, model, tok, rng):
    """On-policy pairs (train, held out) from the starting policy's own samples, ranked by the judge."""
    if s.judge == "verify":
        from quark import verifiable as V
        def sets(split):
            tasks = V.tasks_for(s.tasks, split, run_dir.path)
            return rng.sample(tasks, min(s.max_pairs, len(tasks)))
        by_prompt = {}
        train_tasks, val_tasks = sets("train"), sets("heldout")
        for t in train_tasks + val_tasks:
            by_prompt[json.dumps(t["messages"])] = t
        def score(prompt, text):
            return V.verify(by_prompt[json.dumps(prompt)], text)
        prompts = [[t["messages"] for t in ts] for ts in (train_tasks, val_tasks)]
        refs = [[t["answer"] for t in ts] for ts in (train_tasks, val_tasks)]
    else:
        from quark.align.reward import load_reward_model
        rm = load_reward_model(run_dir.path(s.reward_model))
        def score(prompt, text):
            return rm.score(tok, prompt, text)
        data = run_dir.path(s.data)
        recs = [P.load_chat_records(data / f"{split}.jsonl", s.max_pairs) for split in ("train", "val")]
        prompts = [[r["messages"][:-1] for r in rs] for rs in recs]
        refs = [[r["messages"][-1]["content"] for r in rs] for rs in recs]
    return tuple(P.on_policy_pairs(model, tok, ps, score, s.samples, s.max_new_tokens, seed=s.seed + i, references=rf)
                 for i, (ps, rf) in enumerate(zip(prompts, refs)))


def validate_config(cfg):
    return from_dict(DPOConfig, cfg, "dpo")


def run_step(run_dir, cfg: dict) -> dict:
    from quark.align.reward import build_datasets
    s = from_dict(DPOConfig, cfg, "dpo")
    seed = s.seed
    run_dir = RunDir.of(run_dir)
    torch.manual_seed(seed)
    init = run_dir.model(s.init, before="dpo")
    tok_path = run_dir.tokenizer_path(init)
    tok = run_dir.chat(init)   # the model's chat format: Quark's, or an HF checkpoint's own template
    model = load_model(init)
    max_len = s.max_len or model.config.max_seq_len
    built = policy_pairs(run_dir, s, model, tok, random.Random(seed)) if s.negatives == "policy" else None
    train, val, dropped = build_datasets(run_dir, s, tok, max_len, random.Random(seed + 1), built)
    pad = P.pad_id(tok)
    t0 = time.time()
    ref_train, counts = reference_logps(model, train, pad)   # the policy starts as the reference
    ref_val, _ = reference_logps(model, val, pad)
    before = heldout_metrics(model, val, ref_val, pad, s.beta)
    if s.lora_rank:
        apply_lora(model, LoRAConfig(rank=s.lora_rank, alpha=2.0 * s.lora_rank, targets=["wq", "wk", "wv", "wo"]))
    out = run_dir.output("dpo")
    history = optimize(model, train, ref_train, counts, pad, s, seed, ckpt_dir=out / "ckpt")
    if s.lora_rank:
        strip_lora(model)
    after = heldout_metrics(model, val, ref_val, pad, s.beta)
    save_model(model, out / "final", tokenizer_path=tok_path, metadata={"step": "dpo", "loss": s.loss, "base": str(init)})
    clear_checkpoints(out / "ckpt")
    stats = {"init": str(init), "loss": s.loss, "train_pairs": len(train), "heldout_pairs": len(val),
             "dropped_overlong": dropped, "heldout_before": {k: round(v, 4) for k, v in before.items()},
             "heldout_after": {k: round(v, 4) for k, v in after.items()},
             "train_last": history[-1] if history else {}, "seconds": round(time.time() - t0, 1), "settings": asdict(s)}
    atomic_write_json(out / "metrics.json", {**stats, "history": history})
    return stats


STEP = Step(name="dpo", config=DPOConfig, run=run_step, check=validate_config)
