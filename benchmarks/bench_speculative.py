"""Speculative decoding at batch 1 in the engine: a draft model distilled from the target, and prompt
lookup, vs plain decode of the same target; same run, interleaved medians, ratio (plain / speculative
time for the same tokens: > 1 means speculation is faster), tokens/s and acceptance rate.

Random weights would make acceptance meaningless, so the pair is built as a run builds one, at bench
scale: a byte-level BPE (quark.data.tokenizer) and a target pretrained on the local Python standard
library's source (the embedded default's code corpus), then a draft with fewer, narrower layers
distilled from it with quark.optimize.distill's loss (Hinton et al. 2015). The target is sized so a
decode step streams tens of MB of weights (bandwidth-bound, not Python-bound); the draft is ~15x
smaller. Training is the slow part, so the pair is cached under $QUARK_BENCH_CACHE (default
~/.cache/quark/bench), keyed by its settings; reruns only time.

QUARK_BENCH_RUN=RUN times a run's own pair instead: the teacher its distill step used (distill/report.json)
and the student it wrote (distill/student).

Cases: greedy and sampled (T=0.8) continuation of a code prompt with the draft; prompt lookup on a
code-editing prompt (a function, then the instruction to repeat it with one change, then its first
lines: the answer largely repeats the prompt).
"""
import hashlib
import json
import math
import os
import statistics
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.harness import Result, interleaved
from quark.data.tokenizer import train as train_tokenizer
from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams
from quark.model import GPT, GPTConfig
from quark.model.io import load_model, save_model
from quark.optimize.distill import kd_loss

AREA = "speculative"


@dataclass
class PairSpec:
    target: dict
    draft: dict
    target_steps: int
    draft_steps: int
    batch: int = 8
    seq_len: int = 128
    corpus_chars: int = 3_000_000
    vocab: int = 4096
    seed: int = 0


def pair_spec(quick):
    if quick:   # a smoke run of the machinery: too small and short-trained for the speedup to mean much
        return PairSpec(target=dict(n_layer=3, n_head=4, n_kv_head=2, d_model=256),
                        draft=dict(n_layer=1, n_head=2, n_kv_head=1, d_model=96), target_steps=120, draft_steps=80,
                        seq_len=64, corpus_chars=1_000_000, vocab=2048)
    return PairSpec(target=dict(n_layer=8, n_head=8, n_kv_head=2, d_model=512),
                    draft=dict(n_layer=2, n_head=3, n_kv_head=1, d_model=192), target_steps=300, draft_steps=300)


def stdlib_corpus(max_chars):
    """The standard library's .py sources in a fixed order, up to max_chars characters."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


def train(model, tokens, spec, steps, teacher=None, lr=2e-3):
    """AdamW on random windows of tokens (cosine schedule, 10% warmup); with a teacher, the distillation
    loss (alpha 0.8 on the teacher's distribution, as quark distill) instead of plain next-token loss."""
    g = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
        starts = torch.randint(0, len(tokens) - spec.seq_len - 1, (spec.batch,), generator=g)
        x = torch.stack([tokens[s:s + spec.seq_len] for s in starts])
        y = torch.stack([tokens[s + 1:s + spec.seq_len + 1] for s in starts])
        if teacher is None:
            loss = model(x, y)[1]
        else:
            with torch.no_grad():
                teacher_logits = teacher(x)[0]
            loss = kd_loss(model(x)[0], y, 1.0, 0.8, teacher_logits)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"  {'distill' if teacher else 'pretrain'} step {step}/{steps} loss {loss.item():.3f}", flush=True)
    return model.eval()


def run_pair(run):
    """A run's distill teacher and student -> (target, draft, tokenizer)."""
    from tokenizers import Tokenizer
    run = Path(run)
    teacher = json.loads((run / "distill" / "report.json").read_text())["teacher"]["dir"]
    student = run / "distill" / "student"
    return load_model(teacher), load_model(student), Tokenizer.from_file(str(student / "tokenizer.json"))


def build_pair(spec):
    """-> (target, draft, tokenizer), trained now or read from the cache."""
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("QUARK_BENCH_CACHE", Path.home() / ".cache" / "quark" / "bench")) / f"speculative-{key}"
    if not (root / "draft" / "config.json").exists():
        print(f"  training the target/draft pair into {root} (once)", flush=True)
        torch.manual_seed(spec.seed)
        tok = train_tokenizer(stdlib_corpus(spec.corpus_chars), vocab_size=spec.vocab)
        tokens = torch.tensor([t for text in stdlib_corpus(spec.corpus_chars) for t in tok.encode(text).ids])
        root.mkdir(parents=True, exist_ok=True)
        tok.save(str(root / "tokenizer.json"))
        base = dict(vocab_size=tok.get_vocab_size(), max_seq_len=1024)
        target = train(GPT(GPTConfig(**base, **spec.target)), tokens, spec, spec.target_steps)
        save_model(target, root / "target", tokenizer_path=root / "tokenizer.json")
        draft = train(GPT(GPTConfig(**base, **spec.draft)), tokens, spec, spec.draft_steps, teacher=target)
        save_model(draft, root / "draft", tokenizer_path=root / "tokenizer.json")
    from tokenizers import Tokenizer
    return load_model(root / "target"), load_model(root / "draft"), Tokenizer.from_file(str(root / "tokenizer.json"))


CODE_PROMPT = '''def _splitext(p, sep, altsep, extsep):
    """Split the extension from a pathname."""
'''

EDIT_PROMPT = '''def commonprefix(m):
    "Given a list of pathnames, returns the longest common leading component"
    if not m: return ''
    s1 = min(m)
    s2 = max(m)
    for i, c in enumerate(s1):
        if c != s2[i]:
            return s1[:i]
    return s1

# The same function with the argument renamed from m to paths:
def commonprefix(paths):
    "Given a list of pathnames, returns the longest common leading component"
'''


def params_count(model):
    return sum(p.numel() for p in model.parameters())


def compare(quick=False):
    torch.manual_seed(0)
    spec = pair_spec(quick)
    run = os.environ.get("QUARK_BENCH_RUN")
    target, draft, tok = run_pair(run) if run else build_pair(spec)
    n_tokens, repeats = (48, 3) if quick else (128, 5)
    print(f"  target {params_count(target) / 1e6:.1f}M parameters, draft {params_count(draft) / 1e6:.1f}M")
    engines = {"plain": Engine(target, tok, max_batch=1, stop_ids=[]),   # stop_ids=[]: every run makes n_tokens
               "quark draft k=4": Engine(target, tok, max_batch=1, stop_ids=[], draft=draft, spec_k=4),
               "quark prompt lookup": Engine(target, tok, max_batch=1, stop_ids=[], prompt_lookup=True, spec_k=8)}
    rows = []
    for case, prompt, temperature, names in (
            ("code, greedy", CODE_PROMPT, 0.0, ("plain", "quark draft k=4")),
            ("code, T=0.8", CODE_PROMPT, 0.8, ("plain", "quark draft k=4")),
            ("code edit, greedy", EDIT_PROMPT, 0.0, ("plain", "quark prompt lookup"))):
        ids = tok.encode(prompt).ids
        n_new = min(n_tokens, target.config.max_seq_len - len(ids))
        if n_new < 8:
            print(f"  {case}: skipped, the prompt fills the model's context ({target.config.max_seq_len})")
            continue
        outputs, stats = {}, {n: [0, 0] for n in names}

        def runner(name):
            eng = engines[name]

            def go():
                p0, a0 = eng.spec_proposed, eng.spec_accepted
                req = eng.run([ids], SamplingParams(max_tokens=n_new, temperature=temperature, seed=0))[0]
                outputs[name] = req.output_ids
                stats[name][0] += eng.spec_proposed - p0
                stats[name][1] += eng.spec_accepted - a0
            return go

        times = interleaved({n: runner(n) for n in names}, repeats=repeats, warmup=1)
        if temperature == 0:   # speculation must not change the greedy output
            assert outputs[names[1]] == outputs["plain"], f"{case}: speculative output differs from plain"
        base = statistics.median(times["plain"])
        for name in names:
            med = statistics.median(times[name])
            proposed, accepted = stats[name]
            extra = {"tokens_per_s": round(n_new / med, 1), "speedup": round(base / med, 2)}
            if name != "plain":
                extra["acceptance"] = round(accepted / max(proposed, 1), 3)
            q = sorted(times[name])
            rows.append(Result(AREA, f"batch 1, {n_new} tokens, {case}", name if name != "plain" else "plain decode",
                               med, q[len(q) // 10], q[(9 * len(q)) // 10], extra=extra))
    print(f"  the target's last answer: {tok.decode(outputs['plain'])[:160]!r}")
    for r in rows:
        print(f"  {r.case:<40} {r.provider:<16} " + "  ".join(f"{k} {v}" for k, v in r.extra.items()))
    return rows


if __name__ == "__main__":
    import sys
    from benchmarks.harness import print_table
    print_table(compare(quick="--quick" in sys.argv))
