"""Supervised fine-tuning on chat records: full fine-tuning or LoRA.

Records are JSONL lines {"messages": [{"role", "content"}, ...]} rendered with the model's chat template
(RunDir.chat: a Hugging Face checkpoint's own, else Quark's of quark.chat); the loss covers assistant
tokens only (the template's mask). Examples are packed greedily
(first fit, longest first) into rows of max_seq_len tokens so little compute goes to padding; as in
most packed-SFT trainers, a packed example may attend to the ones before it in its row (each starts
with <|bos|>), which is harmless at these lengths and avoids a document mask in the attention kernel.

Step `sft`: run_dir/pretrain/final + run_dir/instruct/{train,val}.jsonl -> run_dir/sft/final (a plain
model directory: LoRA adapters are merged) and, with method lora, run_dir/sft/adapter (the adapter alone).
"""
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from quark.chat import QuarkChat, check_chat_record
from quark.config import ConfigError, Step, from_dict
from quark.infer.measure import held_out
from quark.io import atomic_write_json, read_jsonl
from quark.model.io import load_model, save_model
from quark.model.lora import LoRAConfig, apply_lora, save_adapter, strip_lora
from quark.rundir import RunDir
from quark.train.loop import LoopSettings, clear_checkpoints, seeded_batches, train_loop

IGNORE = -100


@dataclass
class SFTConfig:
    init: str = "auto"                 # model dir, a model step, or "auto": the latest model before sft
    data: str = "instruct"             # directory with train.jsonl and val.jsonl (relative to run_dir or absolute)
    method: Literal["full", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    steps: int = 60
    batch_size: int = 8
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    packing: bool = True
    max_len: int = 0                   # longest example in tokens; 0: the model's max_seq_len
    overlong: Literal["error", "drop"] = "error"
    max_examples: int = 0              # 0: all
    ckpt_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for k in ("steps", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"sft.{k}: must be >= 1, got {getattr(self, k)}")
        if self.lr <= 0:
            raise ConfigError(f"sft.lr: must be > 0, got {self.lr}")
        if self.method == "lora":
            try:
                self.lora_config()
            except ValueError as e:
                raise ConfigError(f"sft.lora_*: {e}") from None

    def lora_config(self):
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=list(self.lora_targets))


def validate_config(cfg):
    return from_dict(SFTConfig, cfg, "sft")


def load_chat_jsonl(path, tokenizer, max_len, overlong="error", limit=0, chat=None):
    """-> (examples [(ids, mask)], dropped), rendered by `chat` (quark.chat.chat_format; Quark's
    template by default). Bad lines raise ValueError naming path:line."""
    chat = chat or QuarkChat(tokenizer)
    examples, dropped = [], 0
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the instruct step first or set data")
    for n, rec in read_jsonl(path):
        where = f"{path}:{n}"
        check_chat_record(rec, where)
        ids, mask = chat.encode(rec["messages"], tools=rec.get("tools"))   # tool calls train in the template's syntax
        if len(ids) > max_len:
            if overlong == "error":
                raise ValueError(f"{where}: example is {len(ids)} tokens, longer than max_len {max_len}; "
                                 "shorten it, raise max_len, or set overlong: drop")
            dropped += 1
            continue
        examples.append((ids, mask))
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise ValueError(f"{path}: no usable examples")
    return examples, dropped


def pack_examples(examples, seq_len, pad_id, packing=True):
    """[(ids, mask)] -> inputs x (N, seq_len), targets y (N, seq_len) with IGNORE off the assistant tokens.
    Position t of a row predicts token t+1 of its example; y is set only where that token is learned."""
    pieces = []
    for ids, mask in examples:
        x = ids[:-1]
        y = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        if len(x) > seq_len:
            raise ValueError(f"example of {len(ids)} tokens does not fit seq_len {seq_len}")
        pieces.append((x, y))
    rows = []
    if packing:
        free = []   # remaining room per row
        for x, y in sorted(pieces, key=lambda p: -len(p[0])):
            for r, room in enumerate(free):
                if room >= len(x):
                    rows[r][0].extend(x)
                    rows[r][1].extend(y)
                    free[r] -= len(x)
                    break
            else:
                rows.append((list(x), list(y)))
                free.append(seq_len - len(x))
    else:
        rows = [(list(x), list(y)) for x, y in pieces]
    X = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    Y = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        X[i, : len(x)] = torch.tensor(x)
        Y[i, : len(y)] = torch.tensor(y)
    return X, Y


def trim(X, Y):
    """Drop the all-padding tail columns of a batch (rows are left-aligned)."""
    width = int((Y != IGNORE).any(0).nonzero().max()) + 1 if (Y != IGNORE).any() else 1
    return X[:, :width], Y[:, :width]


def evaluate_loss(model, X, Y, batch_size=16):
    """Mean cross-entropy over the learned (assistant) tokens of all rows (0 when there are none)."""
    batches = [trim(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(0, len(X), batch_size)]
    scored = held_out(model, batches, ignore_index=IGNORE)
    return scored.mean() if int(scored.tokens.sum()) else 0.0


def finetune(model, X, Y, cfg: SFTConfig, seed=0, ckpt_dir=None, desc="sft"):
    """Train model (already wrapped with LoRA when cfg.method == 'lora') on the packed rows."""
    def loss_fn(gen):
        idx = torch.randint(0, len(X), (min(cfg.batch_size, len(X)),), generator=gen)
        x, y = trim(X[idx], Y[idx])
        _, loss = model(x, y, ignore_index=IGNORE)
        return loss, {}
    s = LoopSettings(steps=cfg.steps, lr=cfg.lr, min_lr=0.1 * cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                     grad_clip=cfg.grad_clip, ckpt_every=cfg.ckpt_every)
    return train_loop(model, seeded_batches(loss_fn, seed), s, ckpt_root=ckpt_dir, keep_history=True, desc=desc)[0]


def run_step(run_dir, cfg: dict) -> dict:
    s = from_dict(SFTConfig, cfg, "sft")
    seed = s.seed
    run_dir = RunDir.of(run_dir)
    torch.manual_seed(seed)
    init = run_dir.model(s.init, before="sft")
    tok_path = run_dir.tokenizer_path(init)
    chat = run_dir.chat(init)
    tok = chat.tokenizer
    model = load_model(init)
    max_len = s.max_len or model.config.max_seq_len
    if max_len > model.config.max_seq_len + 1:
        raise ConfigError(f"sft.max_len {max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    data = run_dir.path(s.data)
    train, dropped = load_chat_jsonl(data / "train.jsonl", tok, max_len, s.overlong, s.max_examples, chat=chat)
    val, _ = load_chat_jsonl(data / "val.jsonl", tok, max_len, "drop", chat=chat)
    pad = chat.pad_id
    seq = model.config.max_seq_len
    X, Y = pack_examples(train, seq, pad, s.packing)
    Xv, Yv = pack_examples(val, seq, pad, s.packing)
    out = run_dir.output("sft")
    t0 = time.time()
    val_before = evaluate_loss(model, Xv, Yv)
    if s.method == "lora":
        apply_lora(model, s.lora_config())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    history = finetune(model, X, Y, s, seed, ckpt_dir=out / "ckpt")
    val_after = evaluate_loss(model, Xv, Yv)
    if s.method == "lora":
        save_adapter(model, out / "adapter", metadata={"base": str(init)})
        strip_lora(model)
    save_model(model, out / "final", tokenizer_path=tok_path, metadata={"step": "sft", "base": str(init), "method": s.method})
    clear_checkpoints(out / "ckpt")
    stats = {"init": str(init), "method": s.method, "train_examples": len(train), "dropped_overlong": dropped,
             "val_examples": len(val), "train_rows": len(X), "assistant_tokens": int((Y != IGNORE).sum()),
             "packing_efficiency": round(float((X != pad).float().mean()), 3), "trainable_params": n_train,
             "val_loss_before": round(val_before, 4), "val_loss_after": round(val_after, 4),
             "seconds": round(time.time() - t0, 1), "settings": asdict(s)}
    atomic_write_json(out / "metrics.json", {**stats, "history": history})
    return stats


STEP = Step(name="sft", config=SFTConfig, run=run_step, check=validate_config)
