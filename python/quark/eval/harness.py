"""`quark eval` and the pipeline's eval step: perplexity / bits-per-byte on held-out data, a
held-out continuation task built from the run's own validation split, the shipped task files
(multiple choice, generation, sandboxed code), telemetry, and the regression gate."""
import hashlib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from quark.config import Step, from_dict
from quark.eval import gate as gates
from quark.eval.lm import LanguageModel
from quark.eval.perplexity import evaluate_tokens
from quark.eval.tasks import builtin_tasks, evaluate_task, load_task
from quark.eval.telemetry import Telemetry
from quark.io import atomic_write_json
from quark.rundir import RunDir


@dataclass
class EvalConfig:
    seed: int = 0
    model: str = "latest"           # a model directory or model step; "latest": the run's most aligned model
    max_tokens: int = 20000         # held-out tokens scored for perplexity / bits-per-byte
    heldout_mc: int = 40            # held-out continuation questions (0: skip)
    tasks: list = field(default_factory=lambda: ["builtin"])   # "builtin", shipped task names, or YAML paths
    task_limit: int = 0             # at most this many documents per task (0: all)
    baselines: str = ""             # baseline store; default run_dir/eval/baselines.json
    baseline_version: str = ""      # compare against this recorded version (default: the newest)
    gate: bool = False              # fail (exit status 1) when a metric regresses beyond its tolerance


def validate_config(cfg):
    return from_dict(EvalConfig, cfg, "eval")


def model_version(model_dir):
    """Content hash of the weights: the identity under which metrics and baselines are stored."""
    h = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def resolve_tasks(names):
    paths = []
    shipped = {p.stem: p for p in builtin_tasks()}
    for name in names:
        if name == "builtin":
            paths += list(shipped.values())
        elif name in shipped:
            paths.append(shipped[name])
        elif Path(name).exists():
            paths.append(Path(name))
        else:
            raise ValueError(f"unknown task {name!r}: not a shipped task ({', '.join(shipped)}) or a YAML file")
    return paths


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
    if not docs:
        return {}
    correct = 0
    for d in docs:
        ll = [s for s, _ in lm.loglikelihood([(d["context"], c) for c in d["choices"]])]
        correct += int(int(np.argmax(ll)) == d["answer"])
    return {"acc": correct / len(docs), "n": len(docs), "chance": 0.25}


def load_heldout_tokens(run_dir, max_tokens):
    """The first max_tokens of the run's pack/val.bin, or None when the run has no pack."""
    run_dir = RunDir.of(run_dir)
    if not run_dir.has("pack", "meta.json"):
        return None
    return np.asarray(run_dir.pack().tokens("val")[:max_tokens], dtype=np.int64)


def evaluate(model_dir, cfg: EvalConfig, run_dir=None, telemetry=None, log=print):
    """-> flat metrics {"<section>/<metric>": value}."""
    torch.manual_seed(cfg.seed)
    telemetry = telemetry or Telemetry()
    lm = LanguageModel.from_dir(model_dir, run_dir)
    metrics = {}
    tokens = load_heldout_tokens(run_dir, cfg.max_tokens) if run_dir else None
    if tokens is not None and len(tokens) > 1:
        with telemetry.timer("perplexity"):
            ppl = evaluate_tokens(lm, tokens)
        metrics |= {f"heldout/{k}": v for k, v in ppl.items()}
        log(f"  held-out: loss {ppl['loss']:.3f}  ppl {ppl['perplexity']:.2f}  bits/byte {ppl['bits_per_byte']:.3f}")
        with telemetry.timer("heldout_mc"):
            mc = score_heldout_mc(lm, heldout_continuation_docs(lm, tokens, cfg.heldout_mc, cfg.seed))
        metrics |= {f"heldout_mc/{k}": v for k, v in mc.items()}
    for path in resolve_tasks(cfg.tasks):
        spec, docs = load_task(path)
        if cfg.task_limit:
            docs = docs[: cfg.task_limit]
        t0 = time.perf_counter()
        with telemetry.timer("task", task=spec.task):
            result = evaluate_task(lm, spec, docs, seed=cfg.seed)
        metrics |= {f"{spec.task}/{k}": v for k, v in result.items()}
        log(f"  {spec.task}: " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in result.items()) + f"  ({time.perf_counter() - t0:.1f}s)")
    return metrics


def run_gate(metrics, store, version=None):
    """-> (baseline version or None, checks)."""
    base_version, baseline = store.get(version)
    if baseline is None:
        return None, []
    return base_version, gates.compare(metrics, baseline)


def run_step(run_dir, cfg):
    cfg = from_dict(EvalConfig, cfg, "eval")
    run_dir = RunDir.of(run_dir)
    out = run_dir.output("eval")
    model_dir = run_dir.model(cfg.model)
    print(f"evaluating {model_dir}")
    telemetry = Telemetry(out / "telemetry.jsonl")
    version = model_version(model_dir)
    metrics = evaluate(model_dir, cfg, run_dir, telemetry)
    store = gates.BaselineStore(cfg.baselines or out / "baselines.json")
    base_version, checks = run_gate(metrics, store, cfg.baseline_version or None)
    regressions = [c.describe() for c in checks if c.regressed]
    for c in checks:
        print("  gate:", c.describe())
    if not regressions:
        store.record(version, metrics)     # the newest passing model becomes the baseline
    result = {"model_dir": str(model_dir), "version": version, "metrics": metrics,
              "gate": {"baseline_version": base_version, "passed": not regressions, "regressions": regressions,
                       "checks": [asdict(c) for c in checks]},
              "telemetry": telemetry.summary()}
    atomic_write_json(out / "results.json", result)
    (out / "metrics.prom").write_text(telemetry.prometheus())
    if regressions and cfg.gate:
        raise ValueError(f"gate FAILED against baseline {base_version}: {'; '.join(regressions)}")
    return {"version": version, "gate_passed": not regressions, **{k: v for k, v in metrics.items() if not k.endswith("/n")}}


STEP = Step(name="eval", config=EvalConfig, run=run_step, check=validate_config)
