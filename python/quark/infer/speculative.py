"""Speculative decoding inside the engine: a proposer guesses up to k next tokens per request, the
target scores all of them (for every active slot) in one forward pass, and rejection sampling keeps
exactly the target's sampling distribution (Leviathan et al. 2023; Chen et al. 2023). With greedy
sampling a proposal is kept iff it is the target's argmax, so the output equals the target's own.

Two proposers:
- DraftModel: a small model sharing the tokenizer, run over its own slot cache beside the target's
  (slot j follows the engine's request j); its proposals carry the distribution q they were drawn from.
- PromptLookup (Saxena 2023, "prompt lookup decoding"): no model; the continuation of the latest
  earlier occurrence of the sequence's last n-gram. Its proposals are deterministic, a point mass q,
  so a proposal t is kept with probability p(t) and a rejection redraws from p with t removed.
"""
import numpy as np
import torch

from quark.infer.sampling import probs

NGRAM_MAX, NGRAM_MIN = 3, 1   # prompt lookup matches the longest suffix n-gram first


def verify_token(t, p, q, greedy, generator):
    """Proposal t drawn from q (V,), or q None for a point mass on t; target distribution p (V,) ->
    (kept, token). Keeps t with probability min(1, p[t] / q[t]), else draws from the residual
    max(0, p - q) renormalised: the token returned is then distributed exactly as p.
    Greedy: keep t iff it is p's argmax."""
    if greedy:
        best = int(p.argmax())
        return best == t, best
    if bool(torch.rand((), generator=generator) * (1.0 if q is None else q[t]) <= p[t]):
        return True, t
    if q is None:
        r = p.clone()
        r[t] = 0
    else:
        r = (p - q).clamp_min(0)
    return False, int(torch.multinomial(r / r.sum() if r.sum() > 0 else p, 1, generator=generator))


class DraftModel:
    """Proposals from a draft model's Runner (as many slots as the engine's). Its cache holds, per slot,
    a prefix of the request's sequence; each round first feeds what it has not seen but the last token,
    then decodes k tokens for every slot at once."""

    def __init__(self, runner, k):
        self.runner, self.k = runner, k
        self.owner = [None] * runner.slots   # the request whose sequence each draft slot holds

    def _follow(self, reqs):
        """Slot j follows reqs[j]: the engine moves a request into a freed slot, the draft cache moves with it."""
        for j, r in enumerate(reqs):
            if self.owner[j] is r:
                continue
            src = next((i for i, o in enumerate(self.owner) if o is r), None)
            if src is None:
                self.runner.lens[j] = 0
            else:
                self.runner.move(src, j)
                self.owner[src] = None
            self.owner[j] = r

    def propose(self, reqs, budgets):
        """Up to budgets[j] tokens for reqs[j] -> [(tokens, q (len(tokens), V) or None for greedy)]."""
        self._follow(reqs)
        seqs = [r.prompt_ids + r.output_ids for r in reqs]
        # every slot decodes the same number of steps: stay inside the cache for each of them
        k = min(max(budgets), min(self.runner.max_seq_len + 1 - len(s) for s in seqs))
        if k <= 0:
            return [([], None)] * len(reqs)
        for j, s in enumerate(seqs):   # catch up (a new prompt, or tokens decoded without speculation)
            seen = int(self.runner.lens[j])
            if seen < len(s) - 1:
                self.runner.extend(j, s[seen:-1])
        feed = [s[-1] for s in seqs]
        tokens, qs = [[] for _ in reqs], [[] for _ in reqs]
        for step in range(k):
            logits = self.runner.decode(feed)                                                # (n, V)
            for j, r in enumerate(reqs):
                if step >= budgets[j]:
                    continue
                if r.params.greedy and r.history is None:
                    t = int(logits[j].argmax())
                else:
                    history = None if r.history is None else torch.cat([r.history, torch.tensor(tokens[j], dtype=torch.long)])
                    q = probs(logits[j], r.params, history)
                    t = int(q.argmax()) if r.params.greedy else int(torch.multinomial(q, 1, generator=r.generator))
                    qs[j].append(q)
                tokens[j].append(t)
                feed[j] = t
        return [(t, torch.stack(q) if q and not r.params.greedy else None) for t, q, r in zip(tokens, qs, reqs)]

    def truncate(self, slot, n):
        """Drop the draft's cache past the first n tokens of slot's sequence (rejected proposals)."""
        self.runner.lens[slot] = min(int(self.runner.lens[slot]), n)


class PromptLookup:
    """Proposals copied from the request's own prompt and output (no model, no state)."""

    def __init__(self, k):
        self.k = k

    def propose(self, reqs, budgets):
        return [(lookup(r.prompt_ids + r.output_ids, b), None) if b else ([], None) for r, b in zip(reqs, budgets)]

    def truncate(self, slot, n):
        """Nothing is cached per slot."""


def lookup(seq, k, ngram_max=NGRAM_MAX, ngram_min=NGRAM_MIN):
    """The k tokens that followed the latest earlier occurrence of seq's last n-gram, for the longest n in
    [ngram_min, ngram_max] that occurs earlier; [] when none does. The copy runs on past the end of seq
    into its own output (as LZ77's overlapping copies), so a repeating pattern proposes k tokens, not the
    one or two between its latest occurrence and the end."""
    s = np.asarray(seq)
    for n in range(min(ngram_max, len(s) - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(s[:-1], n)   # starts whose n-gram ends before the last token
        hits = np.flatnonzero((windows == s[-n:]).all(1))
        if hits.size:
            start = int(hits[-1]) + n
            out = s[start:start + k].tolist()
            while len(out) < k:
                out.append(out[start + len(out) - len(s)] if start + len(out) >= len(s) else int(s[start + len(out)]))
            return out
    return []
