"""Measurements every step shares: the one held-out evaluator (next-token loss per window, with
perplexity, bits/byte and paired deltas on top) and decode speed through the engine.

Losses are kept per window, not only per corpus: two models scored on the same windows are compared
by the mean of their per-window differences (paired_delta), far less noisy than the difference of
two perplexities. Pretraining validation, fine-tuning, distillation, quantization and evaluation all
score held-out text here, so their numbers mean the same thing.
"""
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from quark.infer.engine import Runner


@dataclass
class HeldOut:
    nll: torch.Tensor              # (n,) float64: summed next-token negative log-likelihood (nats) per window
    tokens: torch.Tensor           # (n,) int64: scored targets per window (ignored targets excluded)
    kl: torch.Tensor | None = None   # (n,) float64: summed KL(reference || model) per window, with a reference

    @property
    def losses(self):
        """(n,) mean loss per window (0 for a window with nothing scored)."""
        return self.nll / self.tokens.clamp_min(1)

    def mean(self):
        """Token-weighted mean loss over all windows (nan when nothing was scored)."""
        n = int(self.tokens.sum())
        return float(self.nll.sum()) / n if n else float("nan")

    def perplexity(self):
        return math.exp(min(self.mean(), 50.0))   # capped: an untrained model's exp(loss) overflows nothing useful

    def bits_per_byte(self, n_bytes):
        """Total NLL in bits per UTF-8 byte of the scored text: unlike perplexity it does not depend on the
        tokenizer, so models with different vocabularies compare fairly."""
        return float(self.nll.sum()) / math.log(2) / max(n_bytes, 1)

    def mean_kl(self):
        return float(self.kl.sum()) / max(int(self.tokens.sum()), 1)


@torch.no_grad()
def held_out(model, batches, reference=None, ignore_index=-100, autocast=nullcontext):
    """Score held-out windows: batches is an iterable of (x, y) token batches (B, T) (for example
    quark.data.loader.eval_batches, or window_batches of a token stream); targets equal to
    ignore_index are not scored. With a reference model, also KL(reference || model) per window."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens, kl = [], [], []
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(x)[0]
            log_q = torch.log_softmax(logits.float(), -1)                                   # (B, T, V)
            scored = y != ignore_index
            target = torch.where(scored, y, 0)
            token_nll = -log_q.gather(-1, target[..., None])[..., 0] * scored               # (B, T)
            nll.append(token_nll.double().sum(1).cpu())
            tokens.append(scored.sum(1).cpu())
            if reference is not None:
                with autocast():
                    log_p = torch.log_softmax(reference(x)[0].float(), -1)
                kl.append(((log_p.exp() * (log_p - log_q)).sum(-1) * scored).double().sum(1).cpu())
    finally:
        model.train(was_training)
    empty = torch.zeros(0, dtype=torch.float64)
    return HeldOut(torch.cat(nll) if nll else empty,
                   torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int64),
                   (torch.cat(kl) if kl else empty) if reference is not None else None)


def window_batches(tokens, seq_len, max_tokens=None, batch_size=16, vocab_size=None):
    """Consecutive windows of seq_len + 1 tokens from the start of a flat token tensor, enough to score
    about max_tokens targets (all that fit when None), as (x, y) batches for held_out."""
    T = min(seq_len, len(tokens) - 1)
    fit = (len(tokens) - 1) // T
    n = fit if max_tokens is None else max(1, min(math.ceil(max_tokens / T), fit))
    windows = torch.stack([tokens[i * T: i * T + T + 1] for i in range(n)])                # (n, T + 1)
    if vocab_size is not None and int(windows.max()) >= vocab_size:
        raise ValueError(f"token id {int(windows.max())} >= vocab_size {vocab_size}: "
                         "the held-out tokens were packed with another tokenizer")
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


def paired_delta(losses, baseline):
    """Perplexity change of `losses` against `baseline` on the same windows, in percent, with its noise:
    (delta %, 2 standard errors %). exp(mean(l - l_base)) - 1; the standard error is that of the mean
    per-window difference (windows ~ independent samples), so +-2 SE is a ~95% interval."""
    d = torch.as_tensor(losses, dtype=torch.float64) - torch.as_tensor(baseline, dtype=torch.float64)
    mean = float(d.mean())
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return 100 * math.expm1(mean), 100 * 2 * se * math.exp(mean)


@torch.no_grad()
def decode_tokens_per_s(model, prompt, new_tokens=32, repeats=3):
    """Greedy decode speed at batch 1 through the engine's runner (what serving runs: every Linear is
    a GEMV); median of repeats, each rewound to the same 8-token prompt."""
    prompt = prompt[:8].tolist()
    new_tokens = max(1, min(new_tokens, model.config.max_seq_len - len(prompt) - 1))
    runner = Runner(model, 1, max_seq_len=len(prompt) + new_tokens + 1)
    first = runner.extend(0, prompt)

    def generate(n):
        runner.lens[0] = len(prompt)
        token = int(first.argmax())
        for _ in range(n):
            token = int(runner.decode([token])[0].argmax())

    generate(2)                                                                    # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(new_tokens)
        times.append(time.perf_counter() - t0)
    return new_tokens / sorted(times)[len(times) // 2]
