"""Online RL with GRPO (Shao et al. 2024, DeepSeekMath): for each prompt sample a group of G
completions from the policy, score them (a reward model or a rule), and use the group-normalised
reward as every completion token's advantage; no value network.

    A_i   = (r_i - mean(r)) / (std(r) + eps)                     within the group of one prompt
    ratio = pi(t) / pi_old(t)                                    per completion token
    loss  = -mean_t min(ratio A, clip(ratio, 1-eps, 1+eps) A) + kl_beta * KL_t(pi || ref)
    KL_t  = exp(ref - logp) - (ref - logp) - 1                   (the k3 estimator, always >= 0)

pi_old is the policy that sampled the group; `inner_epochs` > 1 reuses a group for several updates,
where the clip matters. The reference is the frozen starting policy.

Rewards (f(prompt messages, completion text, terminated) -> float):
  - "verify" (default): verifiable tasks (quark.verifiable: exact arithmetic, output format, code run
    against unit tests in the sandbox); a program checks each completion, 1 when it solves its task. The
    step then scores a baseline (the starting model, or e.g. the sft model) and the trained model greedily
    on the held-out tasks (disjoint from training by construction) and reports the paired difference with
    its standard error.
  - "model": the reward model run_dir/reward/final.
  - rules: "terminates" (ends with a stop token), "brevity" (short, terminated answers), "refusal" (refuse
    the harmful requests of the build families in quark.safety_data, answer everything else), "keyword:WORD".
"""
import json
import copy
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from quark.config import ConfigError, Step, from_dict
from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams
from quark.io import atomic_write_json
from quark.model.io import load_model, save_model
from quark.rundir import RunDir
from quark.safety_data import harmful_requests, is_refusal


def _refusal_reward(prompt, text, terminated):
    harmful = {r["prompt"] for r in harmful_requests("build")}
    asked = prompt[-1]["content"]
    return 1.0 if is_refusal(text) == (asked in harmful) else 0.0


RULES = {
    "terminates": lambda prompt, text, terminated: 1.0 if terminated and text.strip() else 0.0,
    "brevity": lambda prompt, text, terminated: (1.0 if terminated else 0.0) - len(text) / 400,
    "refusal": _refusal_reward,
}


def rule_reward(name):
    if name.startswith("keyword:"):
        word = name.split(":", 1)[1].lower()
        return lambda prompt, text, terminated: float(text.lower().count(word))
    if name not in RULES:
        raise ConfigError(f"rl.reward: unknown rule {name!r}; use 'verify', 'model', one of {sorted(RULES)}, "
                          "or 'keyword:WORD'")
    return RULES[name]


@torch.no_grad()
def sample_group(model, prompt_ids, G, max_new_tokens, temperature, stop_ids, generator):
    """G completions of one prompt through the engine -> ids (G, P+N) (N: the longest completion with its
    stop token; shorter rows padded with a stop id), completion mask (G, P+N) (1 on generated tokens up to
    and including the stop token), terminated (G,) bool, answer lengths before the stop (G,)."""
    # fuse=False: the policy keeps training between groups, so its parameters must stay its own
    engine = Engine(model, max_batch=G, stop_ids=stop_ids, fuse=False)
    seeds = torch.randint(2**31, (G,), generator=generator).tolist()
    reqs = engine.run([prompt_ids] * G, [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=int(s))
                                         for s in seeds])
    rows = [r.output_ids + ([r.stop_token] if r.stop_token is not None else []) for r in reqs]
    P, N = len(prompt_ids), max(len(r) for r in rows)
    seqs = torch.full((G, P + N), min(stop_ids), dtype=torch.long)
    mask = torch.zeros(G, P + N)
    seqs[:, :P] = torch.tensor(prompt_ids)
    for i, row in enumerate(rows):
        seqs[i, P:P + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, P:P + len(row)] = 1.0
    terminated = torch.tensor([r.stop_token is not None for r in reqs])
    return seqs, mask, terminated, torch.tensor([len(r.output_ids) for r in reqs])


def token_logps(model, ids):
    """ids (B, T) -> log p(ids[:, t+1] | ids[:, :t+1]) (B, T-1)."""
    logits, _ = model(ids[:, :-1])
    return F.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, kl_beta):
    """Per-token GRPO objective averaged over completion tokens: logp/old/ref/mask (B, T-1), adv (B,)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    per_token = -(surrogate - kl_beta * kl)
    n = mask.sum().clamp_min(1)
    return (per_token * mask).sum() / n, float((kl.detach() * mask).sum() / n)


@dataclass
class RLConfig:
    init: str = "auto"               # policy model dir, or "auto": dpo/final, else sft/final, else pretrain/final
    reward: str = "verify"           # "verify" (verifiable tasks), "model" (run_dir/reward/final), a rule (RULES), "keyword:WORD"
    reward_model: str = "reward/final"
    tasks: str = "add,format,code"   # verify: task families (quark.verifiable), or a tasks JSONL (with TASKS.heldout.jsonl beside it)
    heldout_tasks: int = 200         # verify: held-out tasks scored for the baseline and the trained model (0: none)
    baseline: str = "init"           # verify: the model the trained one is paired against on them: "init" (the
                                     # starting model), a model step (e.g. sft) or a model directory
    prompts: str = "instruct/train.jsonl"   # other rewards: chat records; the messages before the last assistant turn
    max_prompts: int = 64
    steps: int = 20
    prompts_per_step: int = 2
    group_size: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    inner_epochs: int = 1
    clip_eps: float = 0.2
    kl_beta: float = 0.04
    lr: float = 1e-5
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.group_size < 2:
            raise ConfigError(f"rl.group_size: must be >= 2 (advantages are relative within a group), got {self.group_size}")
        if self.steps < 1 or self.prompts_per_step < 1 or self.inner_epochs < 1:
            raise ConfigError("rl.steps, rl.prompts_per_step and rl.inner_epochs must be >= 1")
        if self.reward not in ("model", "verify"):
            rule_reward(self.reward)


def grpo(policy, chat, prompts, reward_fn, s: RLConfig, seed=0, log=None):
    """Train `policy` in place on prompts (lists of messages), rendered in its chat format (quark.chat:
    Quark's, or an HF checkpoint's own template, whose eos ids end a completion). Returns the history
    of per-step metrics."""
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(s.steps):
        batch = []
        for prompt in rng.sample(prompts, min(s.prompts_per_step, len(prompts))):
            ids, _ = chat.encode(prompt, add_generation_prompt=True)
            ids = ids[-(policy.config.max_seq_len - s.max_new_tokens):]
            seqs, mask, term, lens = sample_group(policy, ids, s.group_size, s.max_new_tokens, s.temperature,
                                                  chat.stop_ids, gen)
            texts = [chat.tokenizer.decode(row[len(ids): len(ids) + int(n)].tolist()) for row, n in zip(seqs, lens)]
            r = torch.tensor([reward_fn(prompt, t, bool(k)) for t, k in zip(texts, term)])
            adv = (r - r.mean()) / (r.std() + 1e-4)
            with torch.no_grad():
                old = token_logps(policy, seqs)
                ref_lp = token_logps(ref, seqs)
            batch.append((seqs, mask[:, 1:], adv, old, ref_lp, r))
        policy.train()
        for _ in range(s.inner_epochs):
            opt.zero_grad(set_to_none=True)
            kls = []
            for seqs, mask, adv, old, ref_lp, _ in batch:
                loss, kl = grpo_loss(token_logps(policy, seqs), old, ref_lp, adv, mask, s.clip_eps, s.kl_beta)
                (loss / len(batch)).backward()
                kls.append(kl)
            torch.nn.utils.clip_grad_norm_(policy.parameters(), s.grad_clip)
            opt.step()
        policy.eval()
        rewards = torch.cat([b[5] for b in batch])
        rec = {"step": step, "reward_mean": round(float(rewards.mean()), 4), "kl": round(statistics.mean(kls), 5),
               "completion_tokens": round(float(torch.cat([b[1].sum(1) for b in batch]).mean()), 1)}
        history.append(rec)
        if log:
            log(rec)
    return history


def paired_difference(new, old):
    """Per-item scores of two models on the same items -> mean difference and its standard error."""
    d = [a - b for a, b in zip(new, old)]
    mean = statistics.mean(d)
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("inf")
    return {"n": len(d), "baseline": round(statistics.mean(old), 4), "rl": round(statistics.mean(new), 4),
            "diff": round(mean, 4), "se": round(se, 4), "better": mean > 2 * se}


def load_prompts(path, limit):
    from quark.align.pairs import load_chat_records
    recs = load_chat_records(path, limit)
    if not recs:
        raise ValueError(f"{path}: no prompts")
    return [r["messages"][:-1] for r in recs]


def validate_config(cfg):
    return from_dict(RLConfig, cfg, "rl")


def run_step(run_dir, cfg: dict) -> dict:
    s = from_dict(RLConfig, cfg, "rl")
    seed = s.seed
    run_dir = RunDir.of(run_dir)
    torch.manual_seed(seed)
    init = run_dir.model(s.init, before="rl")
    tok_path = run_dir.tokenizer_path(init)
    chat = run_dir.chat(init)   # the model's chat format: Quark's, or an HF checkpoint's own template
    policy = load_model(init)
    heldout = None
    if s.reward == "verify":
        from quark import verifiable as V
        tasks = V.tasks_for(s.tasks, "train", run_dir.path)
        by_prompt = {json.dumps(t["messages"]): t for t in tasks}
        prompts = [t["messages"] for t in random.Random(seed).sample(tasks, min(s.max_prompts, len(tasks)))]

        def reward_fn(prompt, text, terminated):
            return V.verify(by_prompt[json.dumps(prompt)], text)
        if s.heldout_tasks:
            heldout = V.tasks_for(s.tasks, "heldout", run_dir.path)
            heldout = random.Random(seed + 1).sample(heldout, min(s.heldout_tasks, len(heldout)))
            base_dir = init if s.baseline == "init" else run_dir.model(s.baseline)
            base = policy if s.baseline == "init" else load_model(base_dir)
            before = V.solved(base, run_dir.chat(base_dir), heldout, s.max_new_tokens)
    elif s.reward == "model":
        from quark.align.reward import load_reward_model
        rm = load_reward_model(run_dir.path(s.reward_model))

        def reward_fn(prompt, text, terminated):
            return rm.score(chat, prompt, text)
        prompts = load_prompts(run_dir.path(s.prompts), s.max_prompts)
    else:
        reward_fn = rule_reward(s.reward)
        prompts = load_prompts(run_dir.path(s.prompts), s.max_prompts)
    t0 = time.time()
    history = grpo(policy, chat, prompts, reward_fn, s, seed)
    out = run_dir.output("rl")
    save_model(policy, out / "final", tokenizer_path=tok_path, metadata={"step": "rl", "reward": s.reward, "base": str(init)})
    first, last = history[: max(1, len(history) // 4)], history[-max(1, len(history) // 4):]
    stats = {"init": str(init), "reward": s.reward, "prompts": len(prompts),
             "reward_first_quarter": round(statistics.mean(h["reward_mean"] for h in first), 4),
             "reward_last_quarter": round(statistics.mean(h["reward_mean"] for h in last), 4),
             "kl_last": history[-1]["kl"], "seconds": round(time.time() - t0, 1), "settings": asdict(s)}
    if heldout:   # held-out verifiable accuracy, the baseline vs the trained model on the same items
        stats["heldout_tasks"] = {**paired_difference(V.solved(policy, chat, heldout, s.max_new_tokens), before),
                                  "baseline_model": str(base_dir)}
    atomic_write_json(out / "metrics.json", {**stats, "history": history})
    return stats


STEP = Step(name="rl", config=RLConfig, run=run_step, check=validate_config)
