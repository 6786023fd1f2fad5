"""Speculative decoding: a small draft model proposes k tokens, the target scores them all in one
forward pass, and rejection sampling keeps exactly the target's sampling distribution
(Leviathan et al. 2023; Chen et al. 2023). With greedy sampling a draft token is kept iff it is the
target's argmax, so the output equals the target's own greedy output.

Bookkeeping: `seq` is the committed sequence. Each model's cache holds a prefix of it (`cached`);
before a round both feed whatever of `seq` they have not seen. After a round, caches are rolled
back to the longest prefix still valid (draft tokens past the first rejection are dropped).
"""
import time
from dataclasses import dataclass

import torch

from quark.infer.engine import Runner
from quark.infer.sampling import Detokenizer, SamplingParams, probs


@dataclass
class SpeculativeResult:
    output_ids: list
    text: str
    finish_reason: str
    proposed: int           # draft tokens proposed
    accepted: int           # draft tokens kept
    target_passes: int      # target forward passes (one per round, plus the prefill)
    seconds: float

    @property
    def acceptance_rate(self):
        return self.accepted / self.proposed if self.proposed else 0.0


def verify_token(t, p, q, greedy, generator):
    """Draft token t drawn from q (V,); target distribution p (V,) -> (kept, token). Keeps t with
    probability min(1, p[t] / q[t]), else draws from the residual max(0, p - q) renormalised: the
    token returned is then distributed exactly as p. Greedy: keep t iff it is p's argmax."""
    if greedy:
        best = int(p.argmax())
        return best == t, best
    if bool(torch.rand((), generator=generator) * q[t] <= p[t]):
        return True, t
    r = (p - q).clamp_min(0)
    return False, int(torch.multinomial(r / r.sum() if r.sum() > 0 else p, 1, generator=generator))


class SpeculativeDecoder:
    def __init__(self, target, draft, k=4, max_seq_len=None, cache_dtype="fp32"):
        if target.config.vocab_size != draft.config.vocab_size:
            raise ValueError(f"draft vocab_size ({draft.config.vocab_size}) must equal the target's "
                             f"({target.config.vocab_size}): they must share a tokenizer")
        if k < 1:
            raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
        self.k = k
        self.target = Runner(target, 1, max_seq_len, cache_dtype)
        self.draft = Runner(draft, 1, self.target.max_seq_len, cache_dtype)
        self.max_seq_len = min(self.target.max_seq_len, self.draft.max_seq_len)

    def generate(self, prompt_ids, params=None, tokenizer=None, stop_ids=(), on_text=None):
        params = params or SamplingParams()
        if len(prompt_ids) + params.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context of {self.max_seq_len} tokens")
        t0 = time.perf_counter()
        gen = params.generator()
        detok = Detokenizer(tokenizer, params.stop) if tokenizer is not None else None
        stop_ids = set(stop_ids)
        seq = list(prompt_ids)
        n_prompt = len(seq)
        out, text = [], []
        self.target.lens.zero_()
        self.draft.lens.zero_()
        proposed = accepted = passes = 0
        reason = None

        def history(ids):   # the ids penalties see for the next token (None: no penalties)
            return torch.tensor(ids, dtype=torch.long) if params.penalized else None

        # prefill the target on all but the last prompt token; every round then starts by feeding
        # the target the tokens it has not seen, so its first logits row scores the first draft token
        if n_prompt > 1:
            self.target.extend(0, seq[:-1])
            passes += 1
        while reason is None:
            k = min(self.k, params.max_tokens - len(out))
            if len(seq) + k >= self.max_seq_len:
                k = max(0, self.max_seq_len - len(seq) - 1)
            # draft proposes k tokens, remembering the distribution each was drawn from
            drafts, q_dists = [], []
            if k:
                logits = self.draft.extend(0, seq[int(self.draft.lens[0]):])
                for j in range(k):
                    q = probs(logits, params, history(seq + drafts))
                    t = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=gen))
                    drafts.append(t)
                    q_dists.append(q)
                    if j + 1 < k:
                        logits = self.draft.decode([t])[0]
            # target scores the unseen tail + all drafts in one pass: row r scores the token after it
            feed = seq[int(self.target.lens[0]):] + drafts
            logits = self.target.extend(0, feed, all_logits=True)            # (len(feed), V)
            passes += 1
            base = len(feed) - len(drafts) - 1                               # row that scores drafts[0]
            new = []
            for j, t in enumerate(drafts):
                p = probs(logits[base + j], params, history(seq + new))
                kept, token = verify_token(t, p, q_dists[j], params.greedy, gen)
                new.append(token)
                if not kept:
                    break
            else:   # every draft kept: the target's last row gives one more token for free
                p = probs(logits[base + len(drafts)], params, history(seq + new))
                new.append(int(p.argmax()) if params.greedy else int(torch.multinomial(p, 1, generator=gen)))
            proposed += len(drafts)
            accepted += len(new) - 1          # kept drafts, plus one correction or bonus token
            # roll caches back to the committed prefix (entries past it belong to rejected drafts)
            valid = len(seq) + len(new) - 1
            self.target.lens[0] = min(int(self.target.lens[0]), valid)
            self.draft.lens[0] = min(int(self.draft.lens[0]), valid)
            for t in new:
                if t in stop_ids:
                    reason = "stop"
                    break
                seq.append(t)
                out.append(t)
                if detok is not None:
                    delta = detok.add(t)
                    if delta:
                        text.append(delta)
                        if on_text:
                            on_text(delta)
                    if detok.stopped:
                        reason = "stop"
                        break
                if len(out) >= params.max_tokens:
                    reason = "length"
                    break
        if detok is not None and not detok.stopped:
            tail = detok.flush()
            if tail:
                text.append(tail)
                if on_text:
                    on_text(tail)
        return SpeculativeResult(out, "".join(text), reason, proposed, accepted, passes, time.perf_counter() - t0)
