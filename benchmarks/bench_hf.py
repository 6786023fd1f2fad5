"""Hugging Face checkpoints: a random-initialized LlamaForCausalLM of about 100M parameters saved as an
HF directory (d_model 768, 12 layers, GQA 12/4, vocab 32000), then from that one directory:

  transformers fp32 / bf16            model.generate, stock (SDPA attention)
  transformers patched fp32 / bf16    the same after quark.patch(model)
  quark fp32 / int8 / int4            Quark's engine on load_model(DIR) (int8 / int4: quantize_model)
  quark int4 bf16                     the same int4 layers on the model loaded in bf16: embeddings, head
                                      (the float layer quantize_model keeps) and activations bf16, as in
                                      transformers bf16 (its head runs quark.ops.linear's bf16 GEMV)

Each provider decodes batch 1 greedily (tokens/s over `n_tokens` new tokens after a 16-token prompt,
prefill included once) and prefills 512 tokens (seconds). Targets (issue 23): Quark int4 decode
>= 3x transformers bf16; patched transformers >= 1.3x stock at the same dtype. Before any timing the
providers agree: Quark fp32 and patched fp32 give transformers fp32's greedy tokens.
Random weights are fine: speed does not depend on them. The last lines print the two target ratios.
"""
import tempfile

import torch

from benchmarks.harness import interleaved, summarize

AREA = "hf"


def make_hf_dir(directory, quick):
    import transformers
    size = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=8192) if quick else \
        dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000)
    config = transformers.LlamaConfig(max_position_embeddings=1024, tie_word_embeddings=True, **size)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return config


def _hf(directory, dtype, patched):
    import transformers

    import quark
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    return quark.patch(model) if patched else model


def _quark(directory, scheme, dtype=torch.float32):
    from quark.model.io import load_model
    from quark.optimize.quantize import quantize_model
    model = load_model(directory, dtype=dtype)
    if scheme != "fp32":
        quantize_model(model, scheme, 32)
    return model


def compare(quick=False):
    from quark.infer.engine import Engine
    from quark.infer.sampling import SamplingParams
    directory = tempfile.mkdtemp(prefix="bench_hf_")
    config = make_hf_dir(directory, quick)
    n_tokens, repeats, prefill_len = (16, 2, 128) if quick else (64, 3, 512)
    prompt = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    long_prompt = torch.randint(0, config.vocab_size, (1, prefill_len), generator=torch.Generator().manual_seed(2))
    hf = {f"transformers {'patched ' if p else ''}{n}": _hf(directory, d, p)
          for n, d in (("fp32", torch.float32), ("bf16", torch.bfloat16)) for p in (False, True)}
    quark_models = {f"quark {s}": _quark(directory, s) for s in ("fp32", "int8", "int4")}
    quark_models["quark int4 bf16"] = _quark(directory, "int4", torch.bfloat16)
    engines = {name: Engine(m, None, max_batch=1) for name, m in quark_models.items()}

    def hf_decode(model):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:].tolist()

    def quark_decode(engine):
        return engine.generate(prompt[0].tolist(), SamplingParams(max_tokens=n_tokens, temperature=0)).output_ids

    # correctness before timing
    reference = hf_decode(hf["transformers fp32"])
    assert hf_decode(hf["transformers patched fp32"]) == reference, "patched fp32 differs from transformers fp32"
    assert quark_decode(engines["quark fp32"]) == reference, "Quark fp32 differs from transformers fp32"

    def prefill(model):   # a transformers model or a Quark GPT: one forward over the long prompt
        with torch.no_grad():
            model(long_prompt)

    decode = {n: (lambda m=m: hf_decode(m)) for n, m in hf.items()}
    decode |= {n: (lambda e=e: quark_decode(e)) for n, e in engines.items()}
    prefills = {n: (lambda m=m: prefill(m)) for n, m in (hf | quark_models).items()}
    rows = []
    size = f"d{config.hidden_size} L{config.num_hidden_layers} V{config.vocab_size}"
    for name, ts in interleaved(decode, repeats=repeats, warmup=1).items():
        rows += summarize(AREA, f"decode batch 1, {n_tokens} tokens, {size}", {name: ts}, unit="tok/s",
                          extra={"tokens_per_s": round(n_tokens / sorted(ts)[len(ts) // 2], 2)})
    rows += summarize(AREA, f"prefill {prefill_len} tokens, {size}", interleaved(prefills, repeats=repeats, warmup=1),
                      unit="s")
    for engine in engines.values():
        engine.shutdown()
    for r in rows:
        print(f"  {r.case:<48} {r.provider:<28} median {r.median_s:.3f} s  " +
              "  ".join(f"{k} {v}" for k, v in r.extra.items()))
    speed = {r.provider: r.extra["tokens_per_s"] for r in rows if "tokens_per_s" in r.extra}
    for ours, theirs in (("transformers patched fp32", "transformers fp32"), ("transformers patched bf16", "transformers bf16"),
                         ("quark int4", "transformers bf16"), ("quark int4 bf16", "transformers bf16")):
        print(f"  decode {ours} / {theirs}: {speed[ours] / speed[theirs]:.2f}x")
    return rows
