"""Post-training weight quantization of a whole model: swap nn.Linear for quark.nn.QuantLinear,
report the size before and after, and the pipeline step `quantize` (perplexity and decode speed of
each scheme against the float model). The quantized model directory format (save / load) is
quark.model.quantized.

Layers are quantized with round-to-nearest (quark.ops.quantize). Calibrated methods (AWQ, GPTQ)
plug in through `quantize_model(..., quantizer=fn)`, where fn(name, linear) returns the
QuantizedTensor for that layer (for example after scaling or error-correcting its weight);
`quantize_calibrated(model, method, calib)` runs them on calibration token windows
(`load_calibration`: a few hundred sequences of run_dir/pack/train.bin, never the held-out split).

"""
import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from quark.config import ConfigError, from_dict
from quark.io import atomic_write_json, atomic_write_text
from quark.model.quantized import MODEL_FORMAT, save_quantized_model
from quark.nn.patch import is_skipped, quantize_
from quark.ops.quant import GROUP_SIZES, SCHEMES, quantize

METHODS = ("rtn", "awq", "gptq")   # round-to-nearest; activation-aware scaling; second-order error compensation


@dataclass
class QuantizeReport:
    scheme: str
    group_size: int
    layers: list = field(default_factory=list)    # names of the swapped layers
    skipped: dict = field(default_factory=dict)   # name -> reason
    bytes_before: int = 0                         # whole model, each storage counted once
    bytes_after: int = 0
    method: str = "rtn"
    calibration: dict = field(default_factory=dict)   # calibration data and settings (AWQ / GPTQ)

    @property
    def ratio(self):
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def to_dict(self):
        return asdict(self) | {"ratio": round(self.ratio, 3)}


def model_nbytes(model: nn.Module):
    """Bytes of all parameters and buffers; tied tensors (one storage) count once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def quantize_model(model: nn.Module, scheme="int4", group_size=32, skip=("lm_head",), quantizer=None):
    """Replace every nn.Linear of `model` (in place) by a QuantLinear; returns a QuantizeReport.

    skip: layer names (or name suffixes) kept in float; the output head by default, as GPTQ/AWQ do,
    since it is the layer most sensitive to quantization. int4 layers whose in_features is not a
    multiple of group_size pad their last group (quark.ops.quant).
    quantizer(name, linear) -> QuantizedTensor overrides round-to-nearest (the AWQ/GPTQ hook).
    """
    report = QuantizeReport(scheme, group_size if scheme == "int4" else 0, bytes_before=model_nbytes(model))
    report.skipped = {name: "skipped by request" for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and is_skipped(name, skip)}
    report.layers = quantize_(model, scheme, group_size, skip, quantizer)
    report.bytes_after = model_nbytes(model)
    return report


# ---- calibrated int4 (AWQ, GPTQ) ------------------------------------------------------------------

def load_calibration(source, n_sequences=128, seq_len=128, seed=0):
    """(n_sequences, seq_len) int64 windows drawn at random from a packed token file.

    source: a run directory (its pack/train.bin) or a .bin file with meta.json beside it (its
    "dtype"). The training split, never val.bin: the held-out perplexity must not see calibration text.
    """
    source = Path(source)
    path = source / "pack" / "train.bin" if source.is_dir() else source
    meta_path = path.parent / "meta.json"
    for p in (path, meta_path):
        if not p.exists():
            raise FileNotFoundError(f"calibration data: {p} is missing (run the pack step, or pass a packed .bin)")
    try:
        dtype = np.dtype(json.loads(meta_path.read_text())["dtype"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: needs a valid 'dtype' key ({e})") from None
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{path} holds {len(tokens)} tokens; calibration needs at least seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len, size=n_sequences)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))


@torch.no_grad()
def block_inputs(model, tokens, batch_size=16):
    """Calibration hidden states entering the first block: (x (n, T, d), cos, sin)."""
    T = tokens.shape[1]
    if T > model.config.max_seq_len:
        raise ValueError(f"calibration seq_len {T} exceeds the model's max_seq_len {model.config.max_seq_len}")
    if int(tokens.max()) >= model.config.vocab_size:
        raise ValueError(f"calibration token id {int(tokens.max())} >= vocab_size {model.config.vocab_size}: "
                         "the calibration data was packed with another tokenizer")
    x = torch.cat([model.tok_emb(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)])
    return x.float(), model.rope_cos[:T], model.rope_sin[:T]


@torch.no_grad()
def run_block(block, x, cos, sin, batch_size=16):
    """One transformer block over all calibration sequences, batch_size sequences at a time."""
    return torch.cat([block(x[i:i + batch_size], cos, sin) for i in range(0, len(x), batch_size)])


def quantize_calibrated(model, method, calib, group_size=128, skip=("lm_head",), calib_info=None, act_order=True,
                        damp=0.01):
    """int4 with a calibrated method on calib tokens (n, T); in place, like quantize_model -> report.

    rtn: plain round-to-nearest (calib unused). awq: scales folded into the preceding norms /
    linears and per-group clipping searched on the calibration activations, then round-to-nearest.
    gptq: layer-by-layer second-order error compensation (act_order, damp: see gptq.gptq_quantize).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    quantizer = None
    info = {}
    if method == "awq":
        from quark.optimize.awq import awq_model
        info = awq_model(model, calib, group_size, skip=skip)
    elif method == "gptq":
        from quark.optimize.gptq import gptq_model
        qts = gptq_model(model, calib, group_size, damp, act_order, skip=skip)
        info = {"act_order": act_order, "damp": damp}

        def quantizer(name, linear):   # layers GPTQ did not see (e.g. a requested head): round-to-nearest
            return qts[name] if name in qts else quantize(linear.weight, "int4", group_size)
    report = quantize_model(model, "int4", group_size, skip=skip, quantizer=quantizer)
    report.method = method
    if method != "rtn":
        report.calibration = {"sequences": int(calib.shape[0]), "seq_len": int(calib.shape[1]), **info,
                              **(calib_info or {})}
    return report


# ---- evaluation used by the pipeline step ---------------------------------------------------------

def load_val_tokens(run_dir):
    """run_dir/pack/val.bin as a flat int64 tensor, dtype from pack/meta.json["dtype"]."""
    pack = Path(run_dir) / "pack"
    meta_path, val_path = pack / "meta.json", pack / "val.bin"
    for p in (meta_path, val_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing; run the pack step first")
    try:
        dtype = np.dtype(json.loads(meta_path.read_text())["dtype"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: needs a valid 'dtype' key ({e})") from None
    tokens = np.fromfile(val_path, dtype=dtype)
    if len(tokens) < 2:
        raise ValueError(f"{val_path} holds {len(tokens)} tokens; need at least 2 to evaluate")
    return torch.from_numpy(tokens.astype(np.int64))


def _windows(model, tokens, max_tokens):
    """Consecutive windows of max_seq_len + 1 tokens covering ~max_tokens targets: (n, T + 1)."""
    T = min(model.config.max_seq_len, len(tokens) - 1)
    n = max(1, min(math.ceil(max_tokens / T), (len(tokens) - 1) // T))
    windows = torch.stack([tokens[i * T: i * T + T + 1] for i in range(n)])
    if int(windows.max()) >= model.config.vocab_size:
        raise ValueError(f"token id {int(windows.max())} >= vocab_size {model.config.vocab_size}: "
                         "val.bin was packed with another tokenizer")
    return windows


@torch.no_grad()
def window_losses(model, tokens, max_tokens=512, reference=None, batch_size=16):
    """Per-window mean next-token loss (n,) over the held-out windows, and per-window mean
    KL(reference || model) (n,) when a reference model is given (else None).

    Kept per window so that two variants can be compared on the same windows (paired_delta): their
    difference is far less noisy than either perplexity. KL measures how far quantization moved the
    output distribution, far more sensitive than the perplexity difference.
    """
    windows = _windows(model, tokens, max_tokens)
    losses, kls = [], []
    for w in windows.split(batch_size):
        x, y = w[:, :-1], w[:, 1:]
        log_q = torch.log_softmax(model(x)[0].float(), -1)                                # (b, T, V)
        losses.append(-log_q.gather(-1, y[..., None])[..., 0].double().mean(1))
        if reference is not None:
            log_p = torch.log_softmax(reference(x)[0].float(), -1)
            kls.append((log_p.exp() * (log_p - log_q)).sum(-1).double().mean(1))
    return torch.cat(losses), (torch.cat(kls) if reference is not None else None)


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
    """Greedy decode speed at batch 1 through the serving engine's runner (what `quark serve` runs:
    every Linear is a GEMV); median of repeats, each rewound to the same 8-token prompt."""
    from quark.infer.engine import Runner
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


# ---- pipeline step --------------------------------------------------------------------------------

@dataclass
class QuantizeConfig:
    model: str = "latest"       # "latest" (the most aligned model, the one served), "best" (lowest held-out
                                # loss on the eval windows among pretrain/sft/dpo) or a model directory
    schemes: list = field(default_factory=lambda: ["int8", "int4"])
    group_size: int = 32
    eval_tokens: int = 512      # held-out targets for perplexity / KL (windows of max_seq_len of pack/val.bin)
    decode_tokens: int = 32     # generated tokens for the tokens/s figure
    decode_repeats: int = 3     # tokens/s is the median of this many timed generations
    methods: list = field(default_factory=lambda: list(METHODS))   # int4 variants: rtn -> int4/, awq -> int4-awq/, ...
    calib_sequences: int = 128  # calibration windows of pack/train.bin for awq / gptq
    calib_seq_len: int = 128    # capped at the model's max_seq_len
    act_order: bool = True      # gptq: columns by decreasing input energy (static groups)
    damp: float = 0.01          # gptq: fraction of the mean Hessian diagonal added to it
    seed: int = 0


def validate_config(cfg):
    c = from_dict(QuantizeConfig, cfg, "quantize")
    for s in c.schemes:
        if s not in SCHEMES:
            raise ConfigError(f"quantize.schemes: {s!r} is not one of {list(SCHEMES)}")
    if c.group_size not in GROUP_SIZES:
        raise ConfigError(f"quantize.group_size: must be one of {list(GROUP_SIZES)}, got {c.group_size}")
    if c.eval_tokens < 1 or c.decode_tokens < 1 or c.decode_repeats < 1:
        raise ConfigError("quantize.eval_tokens, decode_tokens and decode_repeats must be >= 1")
    for m in c.methods:
        if m not in METHODS:
            raise ConfigError(f"quantize.methods: {m!r} is not one of {list(METHODS)}")
    if c.calib_sequences < 1 or c.calib_seq_len < 2:
        raise ConfigError("quantize.calib_sequences must be >= 1 and quantize.calib_seq_len >= 2")
    if not 0 < c.damp < 1:
        raise ConfigError(f"quantize.damp: must be in (0, 1), got {c.damp}")
    return c


def _variants(c):
    """(output name, scheme, method): int8/w8a8 by round-to-nearest, int4 once per method."""
    out = []
    for scheme in c.schemes:
        methods = c.methods if scheme == "int4" else ["rtn"]
        out += [(scheme if m == "rtn" else f"{scheme}-{m}", scheme, m) for m in methods]
    return out


def format_table(stats):
    """The summary as a Markdown table: one row per variant against the float model. "vs" columns:
    perplexity change on the same held-out windows, +- 2 standard errors of the paired difference."""
    def vs(s, key):
        return f"{s[key]:+.2f}% ± {s[key + '_2se']:.2f}" if s.get(key) is not None else "-"

    rows = [f"Model: {stats['source']}\n"] if "source" in stats else []
    rows += ["| variant | group | bytes | ratio | perplexity | vs fp32 | vs int4 RTN | KL to fp32 | decode tok/s "
             "| speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    f = stats["float"]
    rows.append(f"| fp32 | - | {f['bytes']:,} | 1.00 | {f['perplexity']:.3f} | - | - | - | "
                f"{f['decode_tokens_per_s']:.1f} | 1.00 |")
    for name, s in stats.items():
        if isinstance(s, dict) and "perplexity_delta" in s:
            rows.append(f"| {name} | {s.get('group_size') or '-'} | {s['bytes_after']:,} | {s['ratio']:.2f} | "
                        f"{s['perplexity']:.3f} | {vs(s, 'vs_float')} | {vs(s, 'vs_rtn')} | {s['kl_to_float']:.5f} | "
                        f"{s['decode_tokens_per_s']:.1f} | {s['speedup']:.2f} |")
    return "\n".join(rows) + "\n"


def _evaluate(model, tokens, c, reference=None, losses=None):
    """Perplexity, decode speed and size of model (and its KL to reference); losses: the model's
    window losses when already measured (no reference then)."""
    kls = None
    if losses is None:
        losses, kls = window_losses(model, tokens, c.eval_tokens, reference)
    out = {"perplexity": round(math.exp(float(losses.mean())), 4),
           "eval_tokens": int(losses.numel()) * min(model.config.max_seq_len, len(tokens) - 1),
           "decode_tokens_per_s": round(decode_tokens_per_s(model, tokens, c.decode_tokens, c.decode_repeats), 2),
           "bytes": model_nbytes(model), "window_losses": [round(float(v), 6) for v in losses]}
    if kls is not None:
        out["kl_to_float"] = round(float(kls.mean()), 6)
    return out


def run_step(run_dir, cfg):
    from tqdm import tqdm

    from quark.model.io import load_model, pick_model
    c = validate_config(cfg)
    torch.manual_seed(c.seed)
    run_dir = Path(run_dir)
    tokens = load_val_tokens(run_dir)
    heldout = {}   # "best" measures every candidate's window losses: the float baseline reuses its own

    def held_out_loss(model, where):
        heldout[str(where)] = window_losses(model, tokens, c.eval_tokens)[0]
        return heldout[str(where)].mean()
    src, candidates = pick_model(run_dir, c.model, held_out_loss)
    source = {"model_dir": str(src), "mtime": (src / "model.safetensors").stat().st_mtime,
              "eval_tokens": c.eval_tokens}
    out = run_dir / "quantize"
    stats = {"source": str(src), "candidates": candidates}
    base_path = out / "float.json"
    base = json.loads(base_path.read_text()) if base_path.exists() else {}
    if base.get("source") != source:   # resume: the float baseline is measured once per source model
        base = {"source": source, **_evaluate(load_model(src), tokens, c, losses=heldout.get(str(src)))}
        atomic_write_json(base_path, base)
    stats["float"] = {k: v for k, v in base.items() if k not in ("source", "window_losses")}
    calib, reference, done = None, None, {}
    for name, scheme, method in tqdm(_variants(c), desc="quantize", unit="variant"):
        d = out / name
        report_path = d / "report.json"
        # the file format is part of the key: a variant written in an older one is redone on resume
        key = {"source": source, "scheme": scheme, "group_size": c.group_size, "method": method, "format": MODEL_FORMAT}
        if method != "rtn":
            key |= {"calib_sequences": c.calib_sequences, "calib_seq_len": c.calib_seq_len, "seed": c.seed}
        if method == "gptq":
            key |= {"act_order": c.act_order, "damp": c.damp}
        prev = json.loads(report_path.read_text()) if report_path.exists() else {}
        if prev.get("key") != key or "window_losses" not in prev:
            model = load_model(src)
            if method == "rtn":
                report = quantize_model(model, scheme, c.group_size)
            else:
                if calib is None:
                    calib = load_calibration(run_dir, c.calib_sequences,
                                             min(c.calib_seq_len, model.config.max_seq_len), c.seed)
                report = quantize_calibrated(model, method, calib, c.group_size, act_order=c.act_order, damp=c.damp,
                                             calib_info={"source": "pack/train.bin", "seed": c.seed})
            save_quantized_model(model, d, report, src / "tokenizer.json")
            if reference is None:
                reference = load_model(src)
            result = _evaluate(model, tokens, c, reference)
            prev = {"key": key, **report.to_dict(), **result,
                    "perplexity_delta": round(result["perplexity"] - base["perplexity"], 4),
                    "speedup": round(result["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)}
            atomic_write_json(report_path, prev)   # written last: its presence marks the variant done
        done[name] = prev
        row = {k: prev[k] for k in ("method", "group_size", "bytes_before", "bytes_after", "ratio", "perplexity",
                                    "perplexity_delta", "kl_to_float", "decode_tokens_per_s", "speedup")}
        row["vs_float"], row["vs_float_2se"] = (round(v, 3) for v in paired_delta(prev["window_losses"],
                                                                                  base["window_losses"]))
        if scheme == "int4" and method != "rtn" and "int4" in done:
            row["vs_rtn"], row["vs_rtn_2se"] = (round(v, 3) for v in paired_delta(prev["window_losses"],
                                                                                done["int4"]["window_losses"]))
        stats[name] = row
    atomic_write_json(out / "summary.json", stats)
    atomic_write_text(out / "table.md", format_table(stats))
    return stats


# ---- CLI: quark quantize MODEL_DIR --scheme int4 [--method awq --calib RUN_DIR] --out DIR ----------

def configure_parser(parser: argparse.ArgumentParser):
    parser.add_argument("model_dir", help="model directory (config.json + model.safetensors)")
    parser.add_argument("--scheme", choices=SCHEMES, default="int4")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=32, help="int4 group along K")
    parser.add_argument("--method", choices=METHODS, default="rtn",
                        help="int4 only: round-to-nearest, AWQ or GPTQ (the last two calibrate on --calib)")
    parser.add_argument("--calib", default=None,
                        help="calibration tokens: a run directory (pack/train.bin) or a packed .bin with meta.json "
                             "beside it (default: the run directory holding MODEL_DIR, i.e. MODEL_DIR/../..)")
    parser.add_argument("--calib-sequences", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn")
    parser.add_argument("--no-act-order", dest="act_order", action="store_false",
                        help="gptq: quantize the columns in their own order, not by decreasing input energy")
    parser.add_argument("--damp", type=float, default=0.01, help="gptq: Hessian damping (fraction of its mean diagonal)")
    parser.add_argument("--out", required=True, help="output directory for the quantized model")
    parser.add_argument("--quantize-head", action="store_true", help="also quantize lm_head")


def run_cli(args):
    from quark.model.io import load_model
    if args.method != "rtn" and args.scheme != "int4":
        print(f"error: --method {args.method} is for --scheme int4 (int8 / w8a8 use round-to-nearest)")
        return 2
    try:
        model = load_model(args.model_dir)
        calib = None
        if args.method != "rtn":
            source = Path(args.calib) if args.calib else Path(args.model_dir).resolve().parent.parent
            calib = load_calibration(source, args.calib_sequences, min(args.calib_seq_len, model.config.max_seq_len),
                                     args.seed)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {e}")
        return 2
    skip = () if args.quantize_head else ("lm_head",)
    if args.method == "rtn":
        report = quantize_model(model, args.scheme, args.group_size, skip=skip)
    else:
        report = quantize_calibrated(model, args.method, calib, args.group_size, skip=skip,
                                     calib_info={"source": str(source), "seed": args.seed},
                                     act_order=args.act_order, damp=args.damp)
    save_quantized_model(model, args.out, report, Path(args.model_dir) / "tokenizer.json")
    print(f"{args.scheme} ({args.method}): {len(report.layers)} layers quantized, {len(report.skipped)} kept in float; "
          f"{report.bytes_before / 1e6:.2f} MB -> {report.bytes_after / 1e6:.2f} MB ({report.ratio:.2f}x) -> {args.out}")
    return 0
