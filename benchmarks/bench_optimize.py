"""Compression: decode speed of each variant the `quantize` step produces (fp32, int8 per channel, and
int4 g128 by round-to-nearest, AWQ and GPTQ) at batch 1 through the serving engine's runner, on the
model directories as saved and loaded back by load_model: what `quark serve` runs.

The model is sized so its weights far exceed the caches (d_model 1024, 8 layers, GQA 16/4 heads,
ffn 2816: 90M projection weights, 361 MB in fp32), so each decoded token streams every projection
once and the GEMVs dominate. Embeddings and the tied output head stay fp32, as in the step. Random
weights (speed does not depend on them); AWQ and GPTQ calibrate on random token windows, which runs
the same code and yields the same packed format as on real data. Rates: effective weight bandwidth
(bytes read per token x tokens/s) and tokens/s.

Calibrating the full-size model takes minutes, so the variants are built once into
.benchmarks/optimize-<size>/ and reused; build them outside the timing lock with
`python -m benchmarks.bench_optimize --build [--quick]`. --quick uses d_model 256 and 2 layers (a
smoke run: built in seconds when missing, its rates are not a result).
"""
import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.harness import interleaved, summarize
from quark.model import GPT, GPTConfig
from quark.model.io import load_model, save_model
from quark.nn import QuantLinear
from quark.model.quantized import save_quantized_model
from quark.optimize.quantize import quantize_calibrated, quantize_model
from quark.infer.engine import Runner

AREA = "optimize"
VARIANTS = ("fp32", "int8", "int4-rtn", "int4-awq", "int4-gptq")


def make_config(quick):
    if quick:
        return GPTConfig(vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, d_model=256, ffn_hidden=768,
                         max_seq_len=256)
    return GPTConfig(vocab_size=4096, n_layer=8, n_head=16, n_kv_head=4, d_model=1024, ffn_hidden=2816,
                     max_seq_len=256)   # ffn a multiple of 128: every projection takes g128


def cache_dir(quick):
    cfg = make_config(quick)
    return Path(".benchmarks") / f"optimize-d{cfg.d_model}-L{cfg.n_layer}"


def build(quick, group_size=128):
    """Write every variant's model directory unless all are there already; returns the cache dir."""
    out = cache_dir(quick)
    if all((out / name / "config.json").exists() for name in VARIANTS):
        return out
    print(f"building the variants into {out} (not timed)", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # GPTQ / AWQ run many tiny ops: on a loaded machine extra threads only wait
    try:
        _build(quick, out, group_size)
    finally:
        torch.set_num_threads(threads)
    return out


def _build(quick, out, group_size):
    torch.manual_seed(0)
    base = GPT(make_config(quick)).eval()
    calib = torch.randint(0, base.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(0))
    save_model(base, out / "fp32")
    for name in VARIANTS[1:]:
        m = copy.deepcopy(base)
        if name == "int8":
            report = quantize_model(m, "int8")
        else:
            report = quantize_calibrated(m, name.split("-")[1], calib, group_size)
        save_quantized_model(m, out / name, report)


def decode_bytes(model):
    """Weight bytes one decode step reads: every projection, the output head, one embedding row."""
    total = sum(m.qweight.nbytes for m in model.modules() if isinstance(m, QuantLinear))
    total += sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    return total + model.config.d_model * 4


def decoder(model, prompt, n_tokens):
    """Greedy decode of n_tokens after a prefilled prompt, rewound to the prompt on every call."""
    runner = Runner(model, 1, max_seq_len=len(prompt) + n_tokens + 1)
    first = runner.extend(0, prompt)

    def run():
        runner.lens[0] = len(prompt)
        token = int(first.argmax())
        for _ in range(n_tokens):
            token = int(runner.decode([token])[0].argmax())
    return run


def compare(quick=False):
    out = build(quick)
    models = {f"quark {name}": load_model(out / name) for name in VARIANTS}
    n_tokens, repeats = (16, 3) if quick else (32, 9)
    prompt = torch.randint(0, models["quark fp32"].config.vocab_size, (8,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    times = interleaved({name: decoder(m, prompt, n_tokens) for name, m in models.items()}, repeats=repeats, warmup=1)
    cfg = models["quark fp32"].config
    case = f"decode batch 1, {n_tokens} tokens, d{cfg.d_model} L{cfg.n_layer}, {torch.get_num_threads()} thr"
    rows = []
    for name, ts in times.items():
        wb = decode_bytes(models[name])
        rows += summarize(AREA, case, {name: ts}, work=wb * n_tokens, unit="GB/s",
                          extra={"tokens_per_s": round(n_tokens / statistics.median(ts), 1),
                                 "weight_MB": round(wb / 1e6, 1)})
    for r in rows:
        print(f"  {r.case:<44} {r.provider:<22} " + "  ".join(f"{k} {v}" for k, v in r.extra.items()))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="build the variants this benchmark times (no timing)")
    p.add_argument("--build", action="store_true", required=True)
    p.add_argument("--quick", action="store_true")
    print(build(p.parse_args().quick))
