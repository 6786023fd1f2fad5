"""Knowledge distillation: a smaller student trained on a teacher's output distribution (Hinton et al.
2015, "Distilling the Knowledge in a Neural Network"), with a control run of the same student trained
without the teacher on the same tokens, so the report shows what the teacher adds.

Loss per token: alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, next token),
where p^T = softmax(logits / T). The T^2 keeps the soft-target gradients on the scale of the hard-label
ones as T changes (Hinton et al.). Teacher logits come either
  on the fly  (top_k = 0): a teacher forward per batch, the full distribution; or
  from a cache (top_k > 0): one teacher pass writes the k largest logits and their ids per token to
              run_dir/distill/teacher_topk/*.safetensors (fp16 values, int32 ids, with the teacher,
              k and loader settings in the metadata); training then needs no teacher. The teacher
              distribution is renormalised over its top k, and the KL is taken over those k ids
              against the student's full-vocabulary log-probabilities.
Both runs draw batches from the same deterministic loader (seed), start from the same initial
weights, and follow the same schedule, so they see exactly the same tokens.

Pipeline step `distill` / `quark distill --run-dir R`: the teacher is, unless a directory is given, the
run's trained model (pretrain, sft or dpo) with the lowest held-out loss: the teacher's job here is
to model pack/ text, which the alignment steps trade away for chat behaviour. A teacher with its own
tokenizer (an HF checkpoint) learns and teaches on the same text in its tokens (RunDir.tokens, written
to run_dir/distill/tokens/), and the student shares its vocabulary: a fresh copy of its architecture
with fewer layers, or a given model directory (student_init, e.g. a smaller checkpoint). Writes
run_dir/distill/{student,baseline}/ (model directories that `quark serve` loads) and report.json,
with the student's perplexity change against the baseline and its noise (+- 2 standard errors of
the paired per-batch difference on the same held-out batches).
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from quark.config import ConfigError, Step, from_dict
from quark.data.loader import TokenLoader, eval_batches
from quark.infer.measure import held_out, paired_delta
from quark.io import atomic_write_json, sha256_file
from quark.model import GPT, GPTConfig
from quark.model.config import load_config
from quark.rundir import RunDir
from quark.train.loop import LoopSettings, train_loop


@dataclass
class DistillConfig:
    teacher: str = "best"          # a model directory or model step; "best": the run's trained model with the
                                   # lowest held-out loss; "latest": the run's most aligned model
    student: dict = field(default_factory=dict)   # GPTConfig fields replacing the teacher's; {}: half the layers
    student_init: str = ""         # a model directory (Quark or HF) the student and the control start from instead
                                   # (its vocabulary must be the teacher's); "": fresh, from `student`
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = -1         # -1: a tenth of the steps
    weight_decay: float = 0.1
    temperature: float = 1.0       # T = 1: on the default recipe T = 2 trained students with too flat
                                   # distributions
    alpha: float = 0.8             # weight of the distillation term; 1 - alpha on the hard labels
    top_k: int = 0                 # 0: teacher logits on the fly; k > 0: cache the teacher's top-k to disk
    baseline: bool = True          # also train the student without the teacher (same tokens) for the report
    eval_batches: int = 8
    threads: int = 0               # torch threads while training; 0: leave as is
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps == -1:
            self.warmup_steps = self.steps // 10
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"distill.warmup_steps: must be -1 or in [0, steps), got {self.warmup_steps}")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature: must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha: must be in [0, 1], got {self.alpha}")
        if self.top_k < 0:
            raise ConfigError(f"distill.top_k: must be >= 0 (0: on the fly), got {self.top_k}")


def validate_config(cfg):
    c = from_dict(DistillConfig, cfg, "distill")
    try:
        GPTConfig.from_dict(c.student, "distill.student")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return c


def student_config(teacher: GPTConfig, overrides) -> GPTConfig:
    fields = asdict(teacher)
    fields["n_layer"] = max(1, teacher.n_layer // 2)
    if "d_model" in overrides and "ffn_hidden" not in overrides:
        fields["ffn_hidden"] = 0   # derived again from the new d_model
    fields.update(overrides)
    try:
        return GPTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"distill.student: {e}") from None


def kd_loss(student_logits, targets, temperature, alpha, teacher_logits=None, topk_values=None, topk_ids=None):
    """(total, kl, ce) for logits (B, T, V); the teacher as full logits (B, T, V) or top-k (B, T, k)."""
    V = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, V)
    ce = F.cross_entropy(s, targets.reshape(-1))
    if alpha == 0:
        return ce, torch.zeros(()), ce
    log_q = F.log_softmax(s / temperature, dim=-1)                               # (M, V)
    if teacher_logits is not None:
        log_p = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    else:
        k = topk_values.shape[-1]
        log_p = F.log_softmax(topk_values.float().reshape(-1, k) / temperature, dim=-1)   # renormalised over k
        kl = (log_p.exp() * (log_p - log_q.gather(1, topk_ids.reshape(-1, k).long()))).sum(-1).mean()
    kl = kl * temperature ** 2
    return alpha * kl + (1 - alpha) * ce, kl, ce


def _loader(data, c):
    return TokenLoader(data.train_bin, data.dtype, c.batch_size, c.seq_len, seed=c.seed)


@torch.no_grad()
def cache_teacher_topk(teacher, data, c, cache_dir, teacher_dir, chunk_steps=50):
    """Write the teacher's top-k logits of every training batch (same loader as training) to
    cache_dir/topk-NNNNN.safetensors; chunks already written with the same settings are kept."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save

    from quark.io import atomic_open
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": str(teacher_dir), "top_k": str(c.top_k), "batch_size": str(c.batch_size),
            "seq_len": str(c.seq_len), "seed": str(c.seed)}
    loader = _loader(data, c)
    teacher.eval()
    for start in tqdm(range(0, c.steps, chunk_steps), desc="teacher top-k", unit="chunk", file=sys.stderr):
        n = min(chunk_steps, c.steps - start)
        path = cache_dir / f"topk-{start:05d}.safetensors"
        batches = [loader.next_batch() for _ in range(n)]
        if path.exists():
            try:
                with safe_open(str(path), framework="pt") as f:
                    if f.metadata() == meta and f.get_slice("x").get_shape()[0] == n:
                        continue
            except (SafetensorError, OSError):   # unreadable (e.g. truncated) chunk: recompute it
                pass
        xs = torch.stack([x for x, _ in batches])                                # (n, B, T)
        vals, ids = [], []
        for x in xs:
            logits, _ = teacher(x)
            v, i = torch.topk(logits.float(), c.top_k, dim=-1)                   # (B, T, k)
            vals.append(v.half())
            ids.append(i.int())
        with atomic_open(path) as f:
            f.write(save({"x": xs.int(), "values": torch.stack(vals), "ids": torch.stack(ids)}, metadata=meta))
    return cache_dir


class _TopkCache:
    """Reads the cached teacher top-k batch by batch, checking it lines up with the loader."""

    def __init__(self, cache_dir, chunk_steps=50):
        self.dir, self.chunk_steps, self.loaded = Path(cache_dir), chunk_steps, (None, None)

    def get(self, step, x):
        from safetensors.torch import load_file
        start = step - step % self.chunk_steps
        if self.loaded[0] != start:
            self.loaded = (start, load_file(str(self.dir / f"topk-{start:05d}.safetensors")))
        t = self.loaded[1]
        j = step - start
        if not torch.equal(t["x"][j].long(), x):
            raise ValueError(f"{self.dir}: cached teacher batch {step} does not match the loader's batch "
                             "(different data or settings); delete the cache to rebuild it")
        return t["values"][j], t["ids"][j]


def _check_vocab(model, data, where):
    if data.vocab_size > model.config.vocab_size:
        raise ValueError(f"pack vocab_size {data.vocab_size} > vocab_size {model.config.vocab_size} of {where}: "
                         "the teacher was trained with another tokenizer")


def pick_teacher(run_dir, choice, data, val):
    """(teacher directory, {candidate directory: held-out loss}) for DistillConfig.teacher."""
    def held_out_loss(model, where):
        _check_vocab(model, data, where)
        return held_out(model, val).mean()
    return RunDir.of(run_dir).choose_model(choice, held_out_loss=held_out_loss)


def teacher_data(run_dir, teacher_dir, out):
    """The run's packed text as the teacher reads it: the pack itself when the teacher uses the run's
    tokenizer, else its documents in the teacher's tokens (RunDir.tokens), written once to out/tokens/."""
    from quark.io import atomic_write_bytes, atomic_write_json
    from quark.train.trainer import DataSpec, data_spec
    run_dir = RunDir.of(run_dir)
    if run_dir.same_tokenizer(teacher_dir):
        return data_spec(run_dir)
    tok_path = run_dir.tokenizer_path(teacher_dir)
    vocab = run_dir.chat(teacher_dir).tokenizer.get_vocab_size()
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    d = out / "tokens"
    pack = run_dir.pack()
    key = {"teacher_tokenizer": sha256_file(tok_path),
           "pack": [[p.stat().st_size, p.stat().st_mtime_ns] for p in (pack.bin("train"), pack.bin("val"))]}
    if not (d / "meta.json").exists() or json.loads((d / "meta.json").read_text()).get("key") != key:
        for split in ("train", "val"):
            atomic_write_bytes(d / f"{split}.bin", run_dir.tokens(split, teacher_dir).astype(dtype).tobytes())
        atomic_write_json(d / "meta.json", {"key": key, "dtype": dtype, "vocab_size": vocab})
    return DataSpec(str(d / "train.bin"), str(d / "val.bin"), dtype, vocab, str(tok_path))


def new_student(cfg: GPTConfig, c: DistillConfig):
    """The student (or control) before training: c.student_init's weights, else fresh (init seed c.seed)."""
    from quark.model.io import load_model
    torch.manual_seed(c.seed)
    return load_model(c.student_init, dtype=torch.float32).train() if c.student_init else GPT(cfg)


def train_student(cfg: GPTConfig, data, c: DistillConfig, alpha, teacher=None, cache=None, desc="student"):
    """Train a student (new_student) for c.steps; returns (model, stats)."""
    model = new_student(cfg, c)
    cfg = model.config
    loader = _loader(data, c)

    def micro_loss(step, micro):
        x, y = loader.next_batch()
        logits, _ = model(x)
        if alpha == 0:
            loss, _, _ = kd_loss(logits, y, c.temperature, 0.0)
        elif cache is not None:
            vals, ids = cache.get(step, x)
            loss, _, _ = kd_loss(logits, y, c.temperature, alpha, topk_values=vals, topk_ids=ids)
        else:
            with torch.no_grad():
                t_logits, _ = teacher(x)
            loss, _, _ = kd_loss(logits, y, c.temperature, alpha, teacher_logits=t_logits)
        return loss, {}
    t0 = time.perf_counter()
    s = LoopSettings(steps=c.steps, lr=c.lr, min_lr=c.min_lr, warmup=c.warmup_steps, weight_decay=c.weight_decay,
                     log_every=c.steps)
    train_loop(model, micro_loss, s, desc=desc)
    return model.eval(), {"seconds": round(time.perf_counter() - t0, 2), "params": cfg.num_params(),
                          "tokens": c.steps * c.batch_size * c.seq_len}


def distill(run_dir, c: DistillConfig):
    from quark.model.io import load_model, save_model, weight_files
    from quark.train.trainer import data_spec
    run_dir = RunDir.of(run_dir)
    data = data_spec(run_dir)
    val = eval_batches(data.val_bin, data.dtype, c.batch_size, c.seq_len, c.eval_batches)
    teacher_dir, candidates = pick_teacher(run_dir, c.teacher, data, val)
    out = run_dir.output("distill")
    data = teacher_data(run_dir, teacher_dir, out)
    val = eval_batches(data.val_bin, data.dtype, c.batch_size, c.seq_len, c.eval_batches)
    teacher = load_model(teacher_dir, dtype=torch.float32)
    _check_vocab(teacher, data, teacher_dir)
    scfg = student_config(teacher.config, c.student)
    if c.student_init:
        student_dir = run_dir.model(c.student_init)
        scfg = load_config(student_dir)
        if scfg.vocab_size != teacher.config.vocab_size or not run_dir.same_tokenizer(student_dir, teacher_dir):
            raise ConfigError(f"distill.student_init: {student_dir} does not share the tokenizer of the teacher "
                              f"{teacher_dir} (vocab_size {scfg.vocab_size} vs {teacher.config.vocab_size})")
        c = replace(c, student_init=str(student_dir))
    if c.seq_len > min(teacher.config.max_seq_len, scfg.max_seq_len):
        raise ConfigError(f"distill.seq_len {c.seq_len} exceeds the models' max_seq_len")
    key = {"teacher": str(teacher_dir), "teacher_mtime": max(p.stat().st_mtime for p in weight_files(teacher_dir)),
           **asdict(c)}
    report_path = out / "report.json"
    if report_path.exists():
        prev = json.loads(report_path.read_text())
        if prev.get("key") == key:
            return prev
    threads = torch.get_num_threads()
    if c.threads:
        torch.set_num_threads(c.threads)
    try:
        cache = None
        if c.top_k:
            cache = _TopkCache(cache_teacher_topk(teacher, data, c, out / "teacher_topk", teacher_dir))
        student, s_stats = train_student(scfg, data, c, c.alpha, teacher=teacher, cache=cache)
        s_val = held_out(student, val)
        results = {"teacher": {"dir": str(teacher_dir), "params": teacher.config.num_params(),
                               "val_loss": held_out(teacher, val).mean()},
                   "student": {**s_stats, "val_loss": s_val.mean()}}
        meta = {"distilled_from": str(teacher_dir), "temperature": c.temperature, "alpha": c.alpha,
                "top_k": c.top_k, "steps": c.steps}
        save_model(student, out / "student", tokenizer_path=data.tokenizer, metadata=meta)
        if c.baseline:
            baseline, b_stats = train_student(scfg, data, c, 0.0, desc="baseline")
            b_val = held_out(baseline, val)
            results["baseline"] = {**b_stats, "val_loss": b_val.mean()}
            results["student"]["vs_baseline"], results["student"]["vs_baseline_2se"] = \
                (round(v, 3) for v in paired_delta(s_val.losses, b_val.losses))
            save_model(baseline, out / "baseline", tokenizer_path=data.tokenizer,
                       metadata={"steps": c.steps, "teacher": "none"})
    finally:
        torch.set_num_threads(threads)
    for r in results.values():
        r["perplexity"] = round(math.exp(r["val_loss"]), 3)
        r["val_loss"] = round(r["val_loss"], 4)
    report = {"key": key, **results, "settings": {"temperature": c.temperature, "alpha": c.alpha, "top_k": c.top_k,
                                                  "steps": c.steps, "student": asdict(scfg)}}
    if candidates:
        report["teacher_candidates"] = candidates
    atomic_write_json(report_path, report)
    return report


def run_step(run_dir, cfg):
    report = distill(run_dir, validate_config(cfg))
    return {k: v for k, v in report.items() if k != "key"}


STEP = Step(name="distill", config=DistillConfig, run=run_step, check=validate_config)
