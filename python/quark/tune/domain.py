"""Domain adaptation: continued pretraining on a domain corpus mixed with a replay fraction of the
general corpus, which limits forgetting (as in "Don't Stop Pretraining", Gururangan et al. 2020, and
the replay results of Ibrahim et al. 2024). Held-out loss on both corpora is reported before and after.

Corpora are JSONL files with a "text" field (a file, or a directory of *.jsonl): by default the
domain is the run's code (scrape/) and the general corpus its documentation (clean/docs.jsonl).
Each text is tokenized with the model's tokenizer and followed by its end-of-document token (<|eos|> for
Quark's models, the checkpoint's eos for a Hugging Face directory); the last val_fraction of each token
stream is held out.

`quark domain --run-dir R [--set domain=path/to/domain.jsonl] [--set init=HF_OR_MODEL_DIR]`
-> run_dir/domain/final + metrics.json.
"""
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quark.config import ConfigError, Step, from_dict
from quark.infer.measure import held_out
from quark.io import atomic_write_json, read_jsonl
from quark.model.io import load_model, save_model
from quark.rundir import RunDir
from quark.train.loop import LoopSettings, clear_checkpoints, seeded_batches, train_loop


@dataclass
class DomainConfig:
    init: str = "auto"                    # model dir, a model step, or "auto": the latest model before domain (pretrain)
    domain: str = "scrape"                # JSONL file or directory of *.jsonl with "text" (relative to run_dir or absolute)
    general: str = "clean/docs.jsonl"
    replay: float = 0.25                  # fraction of training rows drawn from the general corpus
    steps: int = 60
    batch_size: int = 8
    seq_len: int = 0                      # 0: the model's max_seq_len
    lr: float = 1e-4
    warmup: int = 5
    val_fraction: float = 0.1
    max_tokens: int = 1_000_000           # per corpus
    eval_windows: int = 16
    ckpt_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"domain.replay: must be in [0, 1), got {self.replay}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"domain.val_fraction: must be in (0, 0.5), got {self.val_fraction}")


def validate_config(cfg):
    return from_dict(DomainConfig, cfg, "domain")


def tokenize_corpus(path, tokenizer, eos, max_tokens):
    """All "text" fields of a JSONL file (or directory of them), each followed by token `eos`, -> one
    token stream (N,) int64."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"corpus {path} does not exist (expected JSONL with a 'text' field)")
    ids = []
    for f in files:
        for n, rec in read_jsonl(f):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{f}:{n}: expected an object with a string field 'text'")
            ids += tokenizer.encode(rec["text"], add_special_tokens=False).ids + [eos]
            if len(ids) >= max_tokens:
                return torch.tensor(ids[:max_tokens])
    return torch.tensor(ids)


def split_stream(tokens, val_fraction, seq_len):
    n_val = max(int(len(tokens) * val_fraction), seq_len + 1)
    if len(tokens) - n_val < seq_len + 1:
        raise ValueError(f"corpus of {len(tokens)} tokens is too small for seq_len {seq_len}")
    return tokens[:-n_val], tokens[-n_val:]


def stream_loss(model, tokens, seq_len, n_windows=16):
    """Mean next-token loss over evenly spaced windows of a held-out stream."""
    last = len(tokens) - seq_len - 1
    starts = torch.linspace(0, max(0, last), min(n_windows, last + 1)).long().tolist()
    x = torch.stack([tokens[i: i + seq_len] for i in starts])
    y = torch.stack([tokens[i + 1: i + 1 + seq_len] for i in starts])
    return held_out(model, [(x, y)]).mean()


def adapt(model, domain, general, s: DomainConfig, seq_len, seed=0, ckpt_dir=None):
    """Continued pretraining; each row comes from `general` with probability s.replay, else `domain`."""
    def loss_fn(gen):
        xs, ys, n_replay = [], [], 0
        for from_general in (torch.rand(s.batch_size, generator=gen) < s.replay).tolist():
            tokens = general if from_general else domain
            i = int(torch.randint(0, len(tokens) - seq_len - 1, (1,), generator=gen))
            xs.append(tokens[i: i + seq_len])
            ys.append(tokens[i + 1: i + 1 + seq_len])
            n_replay += from_general
        return model(torch.stack(xs), torch.stack(ys))[1], {"replay_rows": n_replay}
    loop = LoopSettings(steps=s.steps, lr=s.lr, min_lr=0.1 * s.lr, warmup=s.warmup, ckpt_every=s.ckpt_every)
    return train_loop(model, seeded_batches(loss_fn, seed), loop, ckpt_root=ckpt_dir, keep_history=True, desc="domain")[0]


def run_step(run_dir, cfg: dict) -> dict:
    s = from_dict(DomainConfig, cfg, "domain")
    seed = s.seed
    run_dir = RunDir.of(run_dir)
    torch.manual_seed(seed)
    init = run_dir.model(s.init, before="domain")
    tok_path = run_dir.tokenizer_path(init)
    chat = run_dir.chat(init)   # the tokenizer and end-of-document token of init (Quark's or an HF checkpoint's)
    if chat.eos_id is None:
        raise ValueError(f"the tokenizer of {init} has no eos token to separate documents")
    model = load_model(init)
    seq_len = s.seq_len or model.config.max_seq_len
    corpus = {name: tokenize_corpus(run_dir.path(path), chat.tokenizer, chat.eos_id, s.max_tokens)
              for name, path in (("domain", s.domain), ("general", s.general))}
    dom_train, dom_val = split_stream(corpus["domain"], s.val_fraction, seq_len)
    gen_train, gen_val = split_stream(corpus["general"], s.val_fraction, seq_len)
    t0 = time.time()
    before = {"domain": stream_loss(model, dom_val, seq_len, s.eval_windows), "general": stream_loss(model, gen_val, seq_len, s.eval_windows)}
    out = run_dir.output("domain")
    history = adapt(model, dom_train, gen_train, s, seq_len, seed, ckpt_dir=out / "ckpt")
    after = {"domain": stream_loss(model, dom_val, seq_len, s.eval_windows), "general": stream_loss(model, gen_val, seq_len, s.eval_windows)}
    save_model(model, out / "final", tokenizer_path=tok_path, metadata={"step": "domain", "base": str(init)})
    clear_checkpoints(out / "ckpt")
    stats = {"init": str(init), "domain_tokens": len(dom_train), "general_tokens": len(gen_train),
             "domain_loss_before": round(before["domain"], 4), "domain_loss_after": round(after["domain"], 4),
             "general_loss_before": round(before["general"], 4), "general_loss_after": round(after["general"], 4),
             "seconds": round(time.time() - t0, 1), "settings": asdict(s)}
    atomic_write_json(out / "metrics.json", {**stats, "history": history})
    return stats


STEP = Step(name="domain", config=DomainConfig, run=run_step, check=validate_config)
