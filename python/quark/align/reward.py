"""Reward model: the GPT backbone with a scalar head on the last token, trained with the
Bradley-Terry loss on (prompt, chosen, rejected) pairs (Ouyang et al. 2022, InstructGPT):

    loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected))

The score is read at the closing <|end|> of the answer. Held-out pairwise accuracy (fraction of pairs
with r_chosen > r_rejected) is reported before and after training; chance is 0.5.

Step `reward`: from run_dir/sft/final (else pretrain/final) and pairs built from run_dir/instruct
(+ an optional pairs JSONL) -> run_dir/reward/final: a model directory of the backbone plus
head.safetensors, and metrics.json.
"""
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from quark.align import pairs as P
from quark.config import ConfigError, Step, from_dict
from quark.io import atomic_write_bytes, atomic_write_json
from quark.model.gpt import GPT
from quark.model.io import load_model, save_model
from quark.rundir import RunDir
from quark.train.loop import LoopSettings, clear_checkpoints, seeded_batches, train_loop


class RewardModel(nn.Module):
    def __init__(self, backbone: GPT):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids, lengths):
        """ids (B, T) right-padded, lengths (B,) -> scores (B,) at each sequence's last token."""
        h = self.backbone.hidden_states(ids)                                   # (B, T, d)
        last = h[torch.arange(ids.shape[0]), lengths - 1]                      # (B, d)
        return self.head(last.float()).squeeze(-1)

    @torch.no_grad()
    def score(self, tokenizer, prompt, answer):
        ids, _ = P.encode_answer(tokenizer, prompt, answer)
        ids = ids[-self.backbone.config.max_seq_len:]
        return float(self(torch.tensor([ids]), torch.tensor([len(ids)]))[0])


def save_reward_model(rm: RewardModel, directory, tokenizer_path=None, metadata=None):
    directory = Path(directory)
    save_model(rm.backbone, directory, tokenizer_path, metadata)
    atomic_write_bytes(directory / "head.safetensors", save({k: v.detach().contiguous() for k, v in rm.head.state_dict().items()}))
    return directory


def load_reward_model(directory) -> RewardModel:
    directory = Path(directory)
    head = directory / "head.safetensors"
    if not head.exists():
        raise FileNotFoundError(f"{directory} is not a reward model directory: head.safetensors is missing")
    rm = RewardModel(load_model(directory))
    try:
        rm.head.load_state_dict(load_file(head))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{head} is corrupted or does not fit the backbone: {e}") from None
    return rm.eval()


def bt_loss(scores, B):
    """scores (2B,) with chosen first -> (loss, accuracy, mean margin)."""
    margin = scores[:B] - scores[B:]
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean(), margin.mean()


@torch.no_grad()
def accuracy(rm, encoded, pad, batch_size=16):
    """Held-out pairwise accuracy and mean margin."""
    rm.eval()
    correct, margins = 0, []
    for i in range(0, len(encoded), batch_size):
        idx = list(range(i, min(i + batch_size, len(encoded))))
        ids, _, lens = P.pair_batch(encoded, idx, pad)
        s = rm(ids, lens)
        m = s[: len(idx)] - s[len(idx):]
        correct += float((m > 0).sum()) + 0.5 * float((m == 0).sum())   # a tie is a coin flip
        margins += m.tolist()
    return correct / max(1, len(encoded)), sum(margins) / max(1, len(margins))


def train_reward(rm, train, pad, s, seed=0, ckpt_dir=None):
    def loss_fn(gen):
        idx = torch.randint(0, len(train), (min(s.batch_size, len(train)),), generator=gen).tolist()
        ids, _, lens = P.pair_batch(train, idx, pad)
        loss, acc, margin = bt_loss(rm(ids, lens), len(idx))
        return loss, {"accuracy": acc, "margin": margin}
    loop = LoopSettings(steps=s.steps, lr=s.lr, min_lr=0.1 * s.lr, warmup=s.warmup, weight_decay=s.weight_decay,
                        ckpt_every=s.ckpt_every)
    return train_loop(rm, seeded_batches(loss_fn, seed), loop, ckpt_root=ckpt_dir, keep_history=True, desc="reward")[0]


@dataclass
class RewardConfig:
    init: str = "auto"               # backbone model dir, or "auto": sft/final, else pretrain/final
    data: str = "instruct"           # chat records to build pairs from (train.jsonl -> training, val.jsonl -> held out)
    pairs: str = ""                  # optional extra preference pairs JSONL (e.g. exported from the feedback DB)
    feedback: str = ""               # optional feedback DB (quark serve's RUN/feedback/feedback.sqlite): its pairs join training
    feedback_margin: float = 1.0     # rated responses pair when their mean ratings differ by this much (thumbs: 1)
    max_pairs: int = 400
    mismatch: float = 0.5            # fraction of built pairs whose rejected answer belongs to another prompt
    safety_pairs: int = 40
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-4
    warmup: int = 5
    weight_decay: float = 0.0
    max_len: int = 0                 # 0: the model's max_seq_len
    overlong: Literal["error", "drop"] = "drop"
    ckpt_every: int = 40
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.max_pairs < 2:
            raise ConfigError("reward: steps and batch_size must be >= 1, max_pairs >= 2")
        if not 0.0 <= self.mismatch <= 1.0:
            raise ConfigError(f"reward.mismatch: must be in [0, 1], got {self.mismatch}")


def validate_config(cfg):
    return from_dict(RewardConfig, cfg, "reward")


def build_datasets(run_dir, s, tok, max_len, rng, built=None):
    """Train and held-out encoded pairs: `built` (train, held-out pair lists, e.g. on-policy pairs) or pairs
    from the instruction data, + extra pairs, users' feedback and safety pairs."""
    run_dir = RunDir.of(run_dir)
    data = run_dir.path(s.data)
    train_recs = P.load_chat_records(data / "train.jsonl")
    val_recs = P.load_chat_records(data / "val.jsonl")
    rng.shuffle(train_recs)
    if built is None:
        train = P.pairs_from_chat(train_recs[: s.max_pairs], rng, s.mismatch)
        val = P.pairs_from_chat(val_recs, rng, s.mismatch)
    else:
        train, val = list(built[0]), list(built[1])
    if s.safety_pairs:
        # at most a quarter of the pairs; half as many benign "answer over refusal" pairs as refusal ones
        n = min(s.safety_pairs, len(train) // 4)
        safety = P.safety_preference_pairs(rng, n, train_recs[: n // 2])
        tr, va = P.split(safety, 0.2, rng)
        train += tr
        val += va
    enc_train, dropped = P.encode_pairs(tok, list(enumerate(train, 1)), max_len, "built pairs", "drop")
    if s.pairs:
        more, d2 = P.load_pairs(run_dir.path(s.pairs), tok, max_len, s.overlong)
        enc_train += more
        dropped += d2
    if s.feedback:
        from quark.feedback import FeedbackStore
        path = run_dir.path(s.feedback)
        if not path.is_file():
            raise ValueError(f"feedback: {path} does not exist (quark serve RUN writes RUN/feedback/feedback.sqlite)")
        store = FeedbackStore(path)
        users = store.preference_pairs(s.feedback_margin)
        store.close()
        more, d3 = P.encode_pairs(tok, list(enumerate(users, 1)), max_len, str(path), s.overlong)
        enc_train += more
        dropped += d3
    enc_val, _ = P.encode_pairs(tok, list(enumerate(val, 1)), max_len, "held-out pairs", "drop")
    if len(enc_train) < 2 or not enc_val:
        raise ValueError(f"too few preference pairs ({len(enc_train)} train, {len(enc_val)} held out); "
                         "the instruction data is too small")
    return enc_train, enc_val, dropped


def run_step(run_dir, cfg: dict) -> dict:
    s = from_dict(RewardConfig, cfg, "reward")
    seed = s.seed
    run_dir = RunDir.of(run_dir)
    torch.manual_seed(seed)
    init = run_dir.model(s.init, before="dpo")
    tok_path = run_dir.tokenizer_path(init)
    tok = run_dir.chat(init)   # the model's chat format: Quark's, or an HF checkpoint's own template
    rm = RewardModel(load_model(init))
    max_len = s.max_len or rm.backbone.config.max_seq_len
    train, val, dropped = build_datasets(run_dir, s, tok, max_len, random.Random(seed))
    pad = P.pad_id(tok)
    t0 = time.time()
    acc_before, _ = accuracy(rm, val, pad)
    out = run_dir.output("reward")
    history = train_reward(rm, train, pad, s, seed, ckpt_dir=out / "ckpt")
    acc_after, margin_after = accuracy(rm, val, pad)
    acc_train, _ = accuracy(rm, train[: len(val) * 2], pad)
    save_reward_model(rm, out / "final", tok_path, {"step": "reward", "base": str(init)})
    clear_checkpoints(out / "ckpt")
    stats = {"init": str(init), "train_pairs": len(train), "heldout_pairs": len(val), "dropped_overlong": dropped,
             "heldout_accuracy_before": round(acc_before, 3), "heldout_accuracy": round(acc_after, 3),
             "heldout_margin": round(margin_after, 4), "train_accuracy": round(acc_train, 3),
             "seconds": round(time.time() - t0, 1), "settings": asdict(s)}
    atomic_write_json(out / "metrics.json", {**stats, "history": history})
    return stats


STEP = Step(name="reward", config=RewardConfig, run=run_step, check=validate_config)
