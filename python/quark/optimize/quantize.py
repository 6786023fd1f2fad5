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
import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from quark.config import ConfigError, Step, from_dict
from quark.infer.measure import decode_tokens_per_s, held_out, paired_delta, window_batches
from quark.io import atomic_write_json, atomic_write_text
from quark.model.quantized import MODEL_FORMAT, save_quantized_model
from quark.nn.patch import is_skipped, quantize_
from quark.ops.quant import GROUP_SIZES, SCHEMES, quantize
from quark.optimize.awq import awq_model
from quark.optimize.calibration import load_calibration
from quark.optimize.gptq import gptq_model
from quark.rundir import RunDir

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
        info = awq_model(model, calib, group_size, skip=skip)
    elif method == "gptq":
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


# ---- held-out tokens the step scores ---------------------------------------------------------------

def load_val_tokens(run_dir, model_dir=None):
    """The run's held-out tokens (pack/val.bin) in model_dir's own tokens (RunDir.tokens), a flat int64 tensor."""
    tokens = RunDir.of(run_dir).tokens("val", model_dir)
    if len(tokens) < 2:
        raise ValueError(f"the run's pack/val.bin holds {len(tokens)} tokens; need at least 2 to evaluate")
    return torch.from_numpy(tokens)


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


def _evaluate(model, tokens, c, reference=None, scored=None):
    """Perplexity, decode speed and size of model (and its KL to reference); scored: the model's
    held-out result when already measured (no reference then)."""
    if scored is None:
        batches = window_batches(tokens, model.config.max_seq_len, c.eval_tokens, vocab_size=model.config.vocab_size)
        scored = held_out(model, batches, reference)
    out = {"perplexity": round(scored.perplexity(), 4), "eval_tokens": int(scored.tokens.sum()),
           "decode_tokens_per_s": round(decode_tokens_per_s(model, tokens, c.decode_tokens, c.decode_repeats), 2),
           "bytes": model_nbytes(model), "window_losses": [round(float(v), 6) for v in scored.losses]}
    if scored.kl is not None:
        out["kl_to_float"] = round(scored.mean_kl(), 6)
    return out


def run_step(run_dir, cfg):
    from tqdm import tqdm

    from quark.model.io import load_model, weight_files
    c = validate_config(cfg)
    torch.manual_seed(c.seed)
    run_dir = RunDir.of(run_dir)
    heldout = {}   # "best" measures every candidate's window losses: the float baseline reuses its own

    def held_out_loss(model, where):
        batches = window_batches(load_val_tokens(run_dir, where), model.config.max_seq_len, c.eval_tokens,
                                 vocab_size=model.config.vocab_size)
        heldout[str(where)] = held_out(model, batches)
        return heldout[str(where)].mean()
    src, candidates = run_dir.choose_model(c.model, held_out_loss=held_out_loss)
    tokens = load_val_tokens(run_dir, src)   # the source model's own tokens: its variants share its tokenizer
    source = {"model_dir": str(src), "mtime": max(p.stat().st_mtime for p in weight_files(src)),
              "eval_tokens": c.eval_tokens}
    out = run_dir.output("quantize")
    stats = {"source": str(src), "candidates": candidates}
    base_path = out / "float.json"
    base = json.loads(base_path.read_text()) if base_path.exists() else {}
    if base.get("source") != source:   # resume: the float baseline is measured once per source model
        base = {"source": source, **_evaluate(load_model(src), tokens, c, scored=heldout.get(str(src)))}
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
                                             min(c.calib_seq_len, model.config.max_seq_len), c.seed, src)
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


STEP = Step(name="quantize", config=QuantizeConfig, run=run_step, check=validate_config)
