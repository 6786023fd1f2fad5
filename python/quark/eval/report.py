"""The run report: one self-contained report.html (tables + embedded PNG plots) from what the
steps wrote in the run directory: pipeline.json (per-step stats and timings), every
<step>/metrics.jsonl (loss curves and other series), eval/results.json (metrics and the gate),
and eval/telemetry.jsonl (latencies)."""
import base64
import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # no display: render straight to PNG bytes
import matplotlib.pyplot as plt  # noqa: E402

from quark.config import Step, from_dict  # noqa: E402
from quark.io import atomic_write_text  # noqa: E402
from quark.rundir import RunDir  # noqa: E402

SERIES_KEYS = ("loss", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu", "grad_norm", "accuracy",
               "reward_margin", "reward_accuracy", "kl", "reward", "reward_mean")


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def read_metrics_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue          # a torn last line from an interrupted run is skipped, not fatal
            if isinstance(rec, dict):
                rows.append(rec)
    return rows


def plot_series(name, rows):
    """One figure per metrics file: every known numeric series against step (or row index)."""
    keys = [k for k in SERIES_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(f"{name}: {key}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_latencies(path):
    samples = {}
    for r in read_metrics_jsonl(path):
        if r.get("kind") == "latency":
            samples.setdefault(r["name"], []).append(r["value"])
    if not samples:
        return None
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.boxplot(list(samples.values()), tick_labels=list(samples.keys()))
    ax.set_ylabel("seconds")
    ax.set_title("evaluation latencies", fontsize=9)
    return _png(fig)


def _load_json(path):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def quantization_section(run_dir):
    """Size, held-out perplexity and decode speed per quantized variant (quantize/summary.json)."""
    summary = _load_json(run_dir.input("quantize", "summary.json")) if run_dir.has("quantize", "summary.json") else {}
    rows = [(name, v.get("bytes_after", v.get("bytes")), v.get("perplexity"), v.get("decode_tokens_per_s"))
            for name, v in summary.items() if isinstance(v, dict) and "perplexity" in v]
    if not rows:
        return []
    return ["<h2>Quantization</h2>" + table(rows, ["variant", "bytes", "held-out perplexity", "decode tokens/s"])]


def _asr_chart(title, present):
    """Horizontal bars of attack success rates with their intervals: present [(label, rate, [low, high])]."""
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * len(present)))
    err = [[max(0.0, p[1] - p[2][0]) for p in present][::-1], [max(0.0, p[2][1] - p[1]) for p in present][::-1]]
    ax.barh([p[0] for p in present][::-1], [p[1] for p in present][::-1], xerr=err, color="#b55", capsize=3)
    ax.set_xlim(0, 1)
    ax.set_xlabel("attack success rate (95% interval)")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def redteam_section(stats):
    """Attack success rate per source, each rate with its 95% Wilson interval: the built-in suite (held-out
    intent families; before and after alignment, with and without the safety filter) and, when it ran,
    garak's probes per probe family against `quark serve` with the filter off and on."""
    keys = [("before alignment", "asr_before"), ("aligned model only", "asr_after_model_only"),
            ("filter only", "asr_filter_only"), ("aligned + filter", "asr_after")]
    present = [(label, stats[k], stats.get(k + "_ci") or [stats[k], stats[k]])
               for label, k in keys if isinstance(stats.get(k), (int, float))]
    parts = []
    if present:
        rows = [(label, rate, f"[{lo:.3f}, {hi:.3f}]") for label, rate, (lo, hi) in present]
        parts.append(f"<h3>built-in suite ({stats.get('n_attacks', '?')} attacks, held-out intent families)</h3>"
                     f"<img src='data:image/png;base64,{_asr_chart('red-team: built-in suite', present)}'>"
                     + table(rows, ["configuration", "attack success", "95% interval"]))
    garak = [(f"{family} (filter {mode})", *v) for mode in ("off", "on")
             for family, v in sorted((stats.get(f"garak_asr_filter_{mode}") or {}).items())
             if isinstance(v, list) and len(v) == 3]
    if garak:
        parts.append("<h3>garak probes against quark serve</h3>"
                     f"<img src='data:image/png;base64,{_asr_chart('red-team: garak', [(g[0], g[1], g[2:]) for g in garak])}'>"
                     + table([(g[0], g[1], f"[{g[2]:.3f}, {g[3]:.3f}]") for g in garak],
                             ["probe family", "attack success", "95% interval"]))
    return ["<h2>Red-team</h2>" + "".join(parts)] if parts else []


def rl_section(stats):
    """Held-out verifiable tasks: the baseline (SFT) model's accuracy, the RL model's, and their paired
    difference with +-2 standard errors (the GRPO reward curve is plotted with the other curves)."""
    h = stats.get("heldout_tasks")
    if not isinstance(h, dict) or not all(isinstance(h.get(k), (int, float)) for k in ("baseline", "rl", "diff", "se", "n")):
        return []
    verdict = "<span class='ok'>better</span>" if h["diff"] > 2 * h["se"] else "<span class='bad'>not better</span>"
    base = html.escape(Path(str(h.get("baseline_model", "baseline"))).parent.name or "baseline")
    return [f"<h2>RL on verifiable tasks</h2><p>held-out tasks (disjoint from training by construction), {h['n']} "
            f"items, greedy: {base} model {h['baseline']:.3f}, RL model {h['rl']:.3f}; paired difference "
            f"<b>{h['diff']:+.3f} &plusmn; {2 * h['se']:.3f}</b> (2 SE): {verdict}</p>"]


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + "/")
        elif isinstance(v, list):
            out[key] = f"[{len(v)} items]" if len(v) > 6 or any(isinstance(x, (dict, list)) for x in v) else v
        else:
            out[key] = v
    return out


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def table(rows, headers):
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}
th{background:#f3f3f3}h2{border-bottom:2px solid #ddd;padding-bottom:4px}.ok{color:#080}.bad{color:#b00}
img{max-width:100%;margin:4px 0}"""


def build_report(run_dir):
    run_dir = RunDir.of(run_dir)
    state = run_dir.state()
    recipe = state.get("recipe", {})
    parts = [f"<h1>Quark run report: {html.escape(str(recipe.get('name', run_dir.root.name)))}</h1>",
             f"<p>run directory <code>{html.escape(str(run_dir.root))}</code>, budget <b>{html.escape(str(recipe.get('budget', '?')))}</b>, "
             f"written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    steps = state.get("steps", {})
    total = sum(s.get("seconds", 0) for s in steps.values())
    parts.append("<h2>Steps</h2>" + table([(n, s.get("status"), s.get("seconds"), s.get("finished_at", ""))
                                            for n, s in steps.items()] + [("total", "", round(total, 1), "")],
                                           ["step", "status", "seconds", "finished"]))
    if run_dir.has("eval", "results.json"):
        res = run_dir.json("eval", "results.json")
        g = steps.get("promote", {}).get("stats") or {}      # the gate runs where the champion lives (registry)
        gate = ""
        if "gate_passed" in g:
            verdict = "<span class='ok'>passed</span>" if g["gate_passed"] else "<span class='bad'>FAILED</span>"
            gate = (f"; gate {verdict} against champion {html.escape(str(g.get('champion')))} (paired test over items, "
                    f"confidence {g.get('confidence')}), {'promoted' if g.get('promoted') else 'not promoted'}")
        parts.append(f"<h2>Evaluation</h2><p>model <code>{html.escape(res.get('model_dir', ''))}</code> version "
                     f"<code>{html.escape(res.get('version', ''))}</code>{gate}</p>")
        parts.append(table(sorted(res.get("metrics", {}).items()), ["metric", "value"]))
        if g.get("checks"):
            parts.append("<ul>" + "".join(f"<li class='{'bad' if 'REGRESSED' in c else 'ok'}'>{html.escape(c)}</li>"
                                          for c in g["checks"]) + "</ul>")
        tel = res.get("telemetry")
        if tel:
            parts.append("<h3>Telemetry</h3>" + table(sorted(tel.items()), ["metric", "value"]))
    parts += quantization_section(run_dir) + redteam_section(steps.get("redteam", {}).get("stats") or {})
    parts += rl_section(steps.get("rl", {}).get("stats") or {})
    plots = []
    series = [(p.parent.name, read_metrics_jsonl(p)) for p in sorted(run_dir.root.glob("*/metrics.jsonl"))]
    for p in sorted(run_dir.root.glob("*/metrics.json")):       # steps that keep their curve in "history"
        history = _load_json(p).get("history")
        if isinstance(history, list):
            series.append((p.parent.name, [r for r in history if isinstance(r, dict)]))
    for name, rows in series:
        png = plot_series(name, rows)
        if png:
            plots.append(f"<h3>{html.escape(name)}</h3><img src='data:image/png;base64,{png}'>")
    if run_dir.has("eval", "telemetry.jsonl") and (png := plot_latencies(run_dir.input("eval", "telemetry.jsonl"))):
        plots.append(f"<h3>latencies</h3><img src='data:image/png;base64,{png}'>")
    if plots:
        parts.append("<h2>Curves</h2>" + "".join(plots))
    parts.append("<h2>Step details</h2>")
    for name, s in steps.items():
        stats = flatten(s.get("stats") or {})
        if stats:
            parts.append(f"<h3>{html.escape(name)}</h3>" + table(sorted(stats.items()), ["stat", "value"]))
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Quark report</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"


@dataclass
class ReportConfig:
    pass    # the report takes no settings: it shows what the run holds


def run_step(run_dir, cfg):
    from_dict(ReportConfig, cfg, "report")
    run_dir = RunDir.of(run_dir)
    page = build_report(run_dir)
    path = run_dir.root / "report.html"     # beside the step folders: the page a user opens first
    atomic_write_text(path, page)
    return {"report": str(path), "bytes": len(page)}


STEP = Step(name="report", config=ReportConfig, run=run_step)
