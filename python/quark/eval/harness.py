"""`quark eval` and the pipeline's eval step: perplexity / bits-per-byte on held-out data, a
held-out continuation task built from the run's own validation split, the shipped task files
(multiple choice, generation, sandboxed code), public benchmarks from local copies (NAME=PATH,
quark.eval.public), telemetry, and every item's scores for the regression gate.

Results (run_dir/eval/results.json) hold the means and, under "items", each document's (and each
held-out window's) scores: the registry gates a candidate against its champion item by item
(quark.eval.gate); `quark eval --gate RESULTS.json` does the same against any stored results."""
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from quark.config import ConfigError, Step, from_dict
from quark.eval import gate as gates
from quark.eval import public
from quark.eval.lm import LanguageModel
from quark.eval.perplexity import evaluate_tokens
from quark.eval.tasks import builtin_tasks, doc_id, evaluate_task, load_task
from quark.eval.telemetry import Telemetry
from quark.io import atomic_write_json
from quark.rundir import RunDir


@dataclass
class EvalConfig:
    seed: int = 0
    model: str = "latest"           # a model directory or model step; "latest": the run's most aligned model
    max_tokens: int = 20000         # held-out tokens scored for perplexity / bits-per-byte
    heldout_mc: int = 40            # held-out continuation questions (0: skip)
    tasks: list = field(default_factory=lambda: ["builtin"])   # "builtin", shipped task names, YAML paths, or NAME=PATH (public)
    task_limit: int = 0             # at most this many documents per task (0: all)
    gate: str = ""                  # a results file (e.g. the champion's eval/results.json): fail when a metric is
                                    # significantly worse on the shared items (paired test); "": no gate
    confidence: float = gates.CONFIDENCE   # the gate's confidence level


def validate_config(cfg):
    s = from_dict(EvalConfig, cfg, "eval")
    if not 0.0 < s.confidence < 1.0:
        raise ConfigError(f"eval.confidence: must be in (0, 1), got {s.confidence}")
    return s


def model_version(model_dir):
    """Content hash of the weights: the identity under which results are stored and registered."""
    from quark.model.io import weight_files
    h = hashlib.sha256()
    for path in weight_files(model_dir):   # one file, or an HF checkpoint's shards
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def resolve_tasks(names, limit=0):
    """-> [(TaskSpec, docs)] for shipped task names, "builtin", YAML task files, or NAME=PATH of a public
    benchmark's local copy (hellaswag, arc, mmlu, gsm8k, humaneval, mbpp)."""
    out = []
    shipped = {p.stem: p for p in builtin_tasks()}
    for name in names:
        if "=" in name and name.split("=", 1)[0] in public.LOADERS:
            out.append(public.load(*name.split("=", 1), limit=limit))
            continue
        if name == "builtin":
            paths = list(shipped.values())
        elif name in shipped:
            paths = [shipped[name]]
        elif Path(name).exists():
            paths = [Path(name)]
        else:
            raise ValueError(f"unknown task {name!r}: not a shipped task ({', '.join(shipped)}), a YAML file, "
                             f"or NAME=PATH of a public benchmark ({', '.join(public.LOADERS)})")
        for path in paths:
            spec, docs = load_task(path)
            out.append((spec, docs[: limit or None]))
    return out


def heldout_continuation_docs(lm, tokens, n, seed, ctx_len=48, cont_len=16):
    """Multiple-choice questions from held-out tokens: pick the true next span among 4 spans."""
    span = ctx_len + cont_len
    if n <= 0 or len(tokens) < span * 8:
        return []
    rng = random.Random(seed)
    starts = rng.sample(range(0, len(tokens) - span, span), min(n * 4, (len(tokens) - span) // span))
    docs = []
    for q in range(min(n, len(starts) // 4)):
        s, others = starts[4 * q], starts[4 * q + 1: 4 * q + 4]
        conts = [tokens[s + ctx_len: s + span]] + [tokens[o + ctx_len: o + span] for o in others]
        order = list(range(4))
        rng.shuffle(order)
        docs.append({"context": lm.decode(tokens[s: s + ctx_len].tolist()),
                     "choices": [lm.decode(conts[i].tolist()) for i in order], "answer": order.index(0)})
    return docs


def score_heldout_mc(lm, docs):
    """-> (means, items)."""
    if not docs:
        return {}, []
    items = []
    for d in docs:
        ll = [s for s, _ in lm.loglikelihood([(d["context"], c) for c in d["choices"]])]
        items.append({"id": doc_id(d), "acc": float(int(np.argmax(ll)) == d["answer"])})
    return {"acc": float(np.mean([i["acc"] for i in items])), "n": len(docs), "chance": 0.25}, items


def heldout_window_items(tokens, windows):
    """Per-window mean loss of the held-out tokens (windows: lm.window_nll(tokens)), each window named
    by a hash of its tokens (so two models pair up only where they saw the same tokens: same tokenizer,
    same split)."""
    items, start = [], 0
    for nll, count in windows:
        window = np.ascontiguousarray(tokens[start: start + count + 1], dtype=np.int64)
        items.append({"id": hashlib.sha256(window.tobytes()).hexdigest()[:16], "loss": nll / count})
        start += count
    return items


def load_heldout_tokens(run_dir, model_dir, max_tokens):
    """The first max_tokens of the run's held-out split (pack/val.bin) in model_dir's own tokens
    (RunDir.tokens), or None when the run has no pack."""
    run_dir = RunDir.of(run_dir)
    if not run_dir.has("pack", "meta.json"):
        return None
    return run_dir.tokens("val", model_dir, max_tokens)


def evaluate(model_dir, cfg: EvalConfig, run_dir=None, telemetry=None, log=print):
    """-> (metrics {"<section>/<metric>": mean}, items {"<section>": [{"id", metric: score}]})."""
    torch.manual_seed(cfg.seed)
    telemetry = telemetry or Telemetry()
    lm = LanguageModel.from_dir(model_dir, run_dir)
    metrics, items = {}, {}
    tokens = load_heldout_tokens(run_dir, model_dir, cfg.max_tokens) if run_dir else None
    if tokens is not None and len(tokens) > 1:
        with telemetry.timer("perplexity"):
            windows = lm.window_nll(tokens)
            ppl = evaluate_tokens(lm, tokens, windows=windows)
            items["heldout"] = heldout_window_items(tokens, windows)
        metrics |= {f"heldout/{k}": v for k, v in ppl.items()}
        log(f"  held-out: loss {ppl['loss']:.3f}  ppl {ppl['perplexity']:.2f}  bits/byte {ppl['bits_per_byte']:.3f}")
        with telemetry.timer("heldout_mc"):
            mc, items["heldout_mc"] = score_heldout_mc(lm, heldout_continuation_docs(lm, tokens, cfg.heldout_mc, cfg.seed))
        metrics |= {f"heldout_mc/{k}": v for k, v in mc.items()}
    for spec, docs in resolve_tasks(cfg.tasks, cfg.task_limit):
        t0 = time.perf_counter()
        with telemetry.timer("task", task=spec.task):
            result = evaluate_task(lm, spec, docs, seed=cfg.seed)
        items[spec.task] = result.pop("items")
        metrics |= {f"{spec.task}/{k}": v for k, v in result.items()}
        log(f"  {spec.task}: " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in result.items()) + f"  ({time.perf_counter() - t0:.1f}s)")
    return metrics, {k: v for k, v in items.items() if v}


def load_results(path):
    """A results file written by the eval step or `quark eval --json`: {"version", "metrics", "items"}."""
    try:
        res = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no results file {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"results file {path} is not valid JSON: {e}") from None
    if not isinstance(res, dict) or not isinstance(res.get("items"), dict):
        raise ValueError(f"results file {path} has no per-item results ('items'); re-run quark eval to write them")
    return res


def run_step(run_dir, cfg):
    cfg = validate_config(cfg)
    run_dir = RunDir.of(run_dir)
    out = run_dir.output("eval")
    model_dir = run_dir.model(cfg.model)
    print(f"evaluating {model_dir}")
    telemetry = Telemetry(out / "telemetry.jsonl")
    version = model_version(model_dir)
    baseline = load_results(cfg.gate) if cfg.gate else None    # a bad file fails before the work
    metrics, items = evaluate(model_dir, cfg, run_dir, telemetry)
    result = {"model_dir": str(model_dir), "version": version, "metrics": metrics, "items": items,
              "telemetry": telemetry.summary()}
    checks = []
    if baseline is not None:
        checks = gates.compare(items, baseline["items"], cfg.confidence)
        for c in checks:
            print("  gate:", c.describe())
        result["gate"] = {"against": cfg.gate, "version": baseline.get("version"), "confidence": cfg.confidence,
                          "passed": not any(c.regressed for c in checks), "checks": [asdict(c) for c in checks]}
    atomic_write_json(out / "results.json", result)
    (out / "metrics.prom").write_text(telemetry.prometheus())
    if cfg.gate:
        regressions = [c.describe() for c in checks if c.regressed]
        if regressions:
            raise ValueError(f"gate FAILED against {cfg.gate}: {'; '.join(regressions)}")
        print(f"gate passed against {cfg.gate} ({len(checks)} metrics on shared items)")
    return {"version": version, **{k: v for k, v in metrics.items() if not k.endswith("/n")}}


STEP = Step(name="eval", config=EvalConfig, run=run_step, check=validate_config)
