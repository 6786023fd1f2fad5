"""llama.cpp vs Quark end to end on the same random Llama: batch-1 decode tokens/s and 512-token prefill
tokens/s, Quark's engine (quark.infer.engine.Runner) at int4 g32 and int8 against llama.cpp (the
llama-cpp-python build of benchmarks.llamacpp) at Q4_0 and Q8_0, 2 threads each, interleaved.

The model is TinyLlama-shaped (1.1B parameters: d 2048, 22 layers, GQA 32/4 heads, ffn 5632, vocab
32000, untied head), so a decoded token streams ~0.6 GB (Q4_0 / int4) or ~1.2 GB (Q8_0 / int8) of
weights from DRAM, several times this machine's last-level cache. It is built once from a fixed seed
and cached under $QUARK_BENCH_CACHE (~/.cache/quark-bench), never in the repository: Quark's quantized
model directories (quark.optimize.quantize_model, every projection and the head quantized, embeddings
float) and GGUF files written by Quark's exporter (quark.model.gguf.export_gguf: llama.cpp's own
blocks of 32, quantized from the same float weights). Building it needs ~5 GB of RAM for a minute.

Decode: from a 256-token context, 32 greedy tokens per timed call (each side argmaxes its own logits;
the context is rewound before each call). Prefill: 512 prompt tokens into an empty cache. KV caches
are 16-bit on both sides (llama.cpp's f16 default, Quark's bf16). Rates: tokens/s, and the weight
bytes a decoded token reads / time against the machine's read bandwidth measured in the same process
(benchmarks.harness.measure_read_bandwidth). Without the llama.cpp build, Quark runs alone and the
llama.cpp rows print "skipped".
"""
import statistics

import numpy as np
import torch

import quark
from benchmarks import llamacpp
from benchmarks.harness import Result, interleaved, measure_read_bandwidth
from quark.model import GPT, GPTConfig

AREA = "llamacpp"
THREADS = 2
PAIRS = (("int4", "q4_0"), ("int8", "q8_0"))


def make_config(quick):
    if quick:
        return GPTConfig(vocab_size=8192, n_layer=4, n_head=8, n_kv_head=2, d_model=512, ffn_hidden=1408,
                         max_seq_len=1024, tie_embeddings=False)
    return GPTConfig(vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, d_model=2048, ffn_hidden=5632,
                     max_seq_len=1024, tie_embeddings=False)


def model_dir(quick):
    cfg = make_config(quick)
    return llamacpp.cache_root() / f"llama-d{cfg.d_model}-L{cfg.n_layer}-v{cfg.vocab_size}"


def _random_model(cfg):
    torch.manual_seed(0)   # the same weights every time: each format is written from its own fresh copy
    return GPT(cfg).eval()


def _tokenizer(path):
    """A small byte-level BPE tokenizer.json: GGUF files carry a vocabulary (llama.cpp refuses one without);
    the benchmark feeds token ids, so its merges never matter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    tok.save(str(path))


def build(quick):
    """Write the cached model files unless they are there -> {format: path}."""
    from quark.model.gguf import export_gguf
    from quark.model.quantized import save_quantized_model
    from quark.optimize.quantize import quantize_model
    out = model_dir(quick)
    files = {"int4": out / "int4", "int8": out / "int8", "q4_0": out / "q4_0.gguf", "q8_0": out / "q8_0.gguf"}
    if all((p / "config.json").exists() if p.suffix != ".gguf" else p.exists() for p in files.values()):
        return files
    print(f"building the model files into {out} (once; not timed)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = out / "tokenizer.json"
    _tokenizer(tokenizer)
    cfg = make_config(quick)
    model = _random_model(cfg)
    for qtype in ("q4_0", "q8_0"):
        export_gguf(model, files[qtype], qtype, tokenizer_path=tokenizer)
    for scheme in ("int4", "int8"):
        model = model if scheme == "int4" else _random_model(cfg)   # quantize_model replaces layers in place
        report = quantize_model(model, scheme, 32, skip=())
        save_quantized_model(model, files[scheme], report, tokenizer_path=tokenizer)
    del model
    return files


def quark_weight_bytes(model):
    """Bytes a decoded token reads: every QuantLinear's packed weights + one embedding row."""
    from quark.nn import QuantLinear
    q = sum(m.qweight.nbytes for m in model.modules() if isinstance(m, QuantLinear))
    return q + model.config.d_model * model.tok_emb.weight.element_size()


def gguf_weight_bytes(path):
    """Bytes a decoded token reads from a GGUF file: every tensor but the embedding table (one row of it)."""
    from gguf import GGUFReader
    tensors = GGUFReader(str(path)).tensors
    emb = next(t for t in tensors if t.name == "token_embd.weight")
    return sum(int(t.n_bytes) for t in tensors if t is not emb) + int(emb.n_bytes) // int(emb.shape[-1])


class QuarkSide:
    def __init__(self, path, prompt, ctx):
        from quark.infer.engine import Runner
        from quark.model.io import load_model
        self.model = load_model(path)
        self.runner = Runner(self.model, 1, max_seq_len=ctx, cache_dtype="bf16")
        self.prompt = prompt
        self.first = int(self.runner.extend(0, prompt).argmax())
        self.bytes = quark_weight_bytes(self.model)

    def decode(self, n):
        self.runner.lens[0] = len(self.prompt)
        tok, out = self.first, []
        for _ in range(n):
            tok = int(self.runner.decode([tok])[0].argmax())
            out.append(tok)
        return out

    def prefill(self, ids):
        self.runner.lens[0] = 0
        return int(self.runner.extend(0, ids).argmax())


class LlamaSide:
    def __init__(self, lib, path, prompt, ctx):
        self.llm = lib.Llama(model_path=str(path), n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=THREADS,
                             n_threads_batch=THREADS, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.prompt = prompt
        self.llm.reset()
        self.llm.eval(prompt)
        self.first = self._argmax()
        self.bytes = gguf_weight_bytes(path)

    def _argmax(self):
        return int(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).argmax())

    def decode(self, n):
        self.llm.n_tokens = len(self.prompt)   # eval drops the cache beyond n_tokens first
        tok, out = self.first, []
        for _ in range(n):
            self.llm.eval([tok])
            tok = self._argmax()
            out.append(tok)
        return out

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return self._argmax()


def compare(quick=False, repeats=None):
    files = build(quick)
    cfg = make_config(quick)
    torch.set_num_threads(THREADS)
    quark.set_num_threads(THREADS)
    n_tokens, n_prefill, default_repeats = (8, 512, 2) if quick else (32, 512, 5)
    repeats = repeats or default_repeats
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (256,), generator=gen).tolist()
    prefill_ids = torch.randint(0, cfg.vocab_size, (n_prefill,), generator=gen).tolist()
    lib = llamacpp.load()
    if lib is None:
        print("  llama.cpp: skipped (not built; run `python -m benchmarks.llamacpp` once)")
    bw = measure_read_bandwidth()
    print(f"  measured read bandwidth: {bw:.1f} GB/s")
    rows = [Result(AREA, "read bandwidth (buf.sum, all threads)", "machine", 1.0, 1.0, 1.0, bw * 1e9, "GB/s")]
    for scheme, qtype in PAIRS:
        sides = {f"quark {scheme}": QuarkSide(files[scheme], prompt, cfg.max_seq_len)}
        if lib is not None:
            sides[f"llama.cpp {qtype.upper()}"] = LlamaSide(lib, files[qtype], prompt, cfg.max_seq_len)
        dec = interleaved({k: (lambda s=s: s.decode(n_tokens)) for k, s in sides.items()}, repeats=repeats, warmup=1)
        pre = interleaved({k: (lambda s=s: s.prefill(prefill_ids)) for k, s in sides.items()}, repeats=repeats, warmup=1)
        for name, side in sides.items():
            rows.append(_row(f"{scheme}/{qtype} decode batch 1, {n_tokens} tokens after 256", name, dec[name],
                             n_tokens, side.bytes * n_tokens, bw))
            rows.append(_row(f"{scheme}/{qtype} prefill {n_prefill} tokens", name, pre[name], n_prefill, 0, bw))
        del sides
    for r in rows[1:]:
        print(f"  {r.case:<44} {r.provider:<18} " + "  ".join(f"{k} {v}" for k, v in r.extra.items()))
    _targets(rows)
    return rows


def _targets(rows):
    """Issue 27's targets: decode >= 1.5x llama.cpp's tokens/s at the same width, prefill >= 2x."""
    by_case = {}
    for r in rows[1:]:
        by_case.setdefault(r.case, {})[r.provider.split()[0]] = r
    for case, group in by_case.items():
        if "llama.cpp" not in group:
            continue
        ratio = group["llama.cpp"].median_s / group["quark"].median_s
        want = 1.5 if "decode" in case else 2.0
        print(f"  {case}: quark / llama.cpp tokens/s {ratio:.2f}x (target >= {want}x: {'met' if ratio >= want else 'not met'})")


def _row(case, name, ts, n, nbytes, bw):
    med = statistics.median(ts)
    q = np.percentile(ts, [10, 90])
    extra = {"tokens_per_s": round(n / med, 2)}
    if nbytes:
        extra |= {"weight_GB_s": round(nbytes / med / 1e9, 1), "of_read_bw": f"{100 * nbytes / med / 1e9 / bw:.0f}%"}
    return Result(AREA, case, name, med, float(q[0]), float(q[1]), nbytes or 0.0, "GB/s", extra)


if __name__ == "__main__":
    import sys
    from benchmarks.harness import print_table
    print_table(compare(quick="--quick" in sys.argv))
