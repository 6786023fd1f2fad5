"""Multi-LoRA serving: rows with different adapters (and none) in one batch against each adapter merged
into the weights (fused and unfused projections, int8/int4 bases, prefill and decode), PEFT adapters
against peft itself, and the checks that refuse an adapter which does not fit its base."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from quark.infer.engine import Engine, Runner
from quark.infer.lora import Adapter
from quark.infer.sampling import SamplingParams
from quark.nn.patch import quantize_
from tests.serve_helpers import make_adapter, make_model, single_thread  # noqa: F401 (autouse fixture)

V = 120
ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


@pytest.fixture()
def setup(tmp_path):
    """A base, adapters x (every target, rank 4) and y (q, v and down, rank 2), and their merged models."""
    base = make_model(V, seed=3)
    merged = {None: base,
              "x": make_adapter(base, tmp_path / "x", ALL, seed=1),
              "y": make_adapter(base, tmp_path / "y", ["wq", "wv", "w2"], seed=2, rank=2, alpha=3.0)}
    return base, merged, {"x": tmp_path / "x", "y": tmp_path / "y"}


@torch.no_grad()
def logits_of(model, ids):
    return model(torch.tensor([ids]))[0][0]                                             # (T, V)


@torch.no_grad()
def greedy(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(logits_of(model, ids)[-1].argmax()))
    return ids[-n:]


def check_mixed_batch(runner, refs, names, prompts, steps=4):
    """Slots 0..n-1 run adapters names[j] with prompts[j]: prefill logits and then every decode step's
    logits equal refs[names[j]] (a model with the adapter merged, or its equivalent) on the same tokens."""
    seqs = [list(p) for p in prompts]
    for j, (name, p) in enumerate(zip(names, prompts)):
        got = runner.extend(j, p, all_logits=True)
        torch.testing.assert_close(got, logits_of(refs[name], p), rtol=1e-4, atol=1e-5)
    for _ in range(steps):
        nxt = [int(logits_of(refs[name], s)[-1].argmax()) for name, s in zip(names, seqs)]
        for s, t in zip(seqs, nxt):
            s.append(t)
        got = runner.decode(nxt)                                                         # (n, V)
        want = torch.stack([logits_of(refs[name], s)[-1] for name, s in zip(names, seqs)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fuse", [True, False])
def test_mixed_batch_logits_equal_merged_models(setup, fuse):
    """x on rows 0 and 3 (a gather), y on row 2, none on row 1: each row's logits are its merged model's."""
    base, merged, dirs = setup
    runner = Runner(base, slots=4, fuse=fuse)
    assert (runner.qkv[0] is not None) == fuse
    adapters = {name: Adapter.load(d, base, name) for name, d in dirs.items()}
    names = ["x", None, "y", "x"]
    runner.slot_adapter[:] = [adapters.get(n) for n in names]
    prompts = [list(range(10, 17)), list(range(20, 31)), list(range(40, 43)), list(range(50, 59))]
    check_mixed_batch(runner, merged, names, prompts)
    # the adapters matter: each merged model answers differently from the base on these prompts
    for name in ("x", "y"):
        assert not torch.allclose(logits_of(merged[name], prompts[0]), logits_of(base, prompts[0]), atol=1e-2)


def test_engine_mixed_adapters_equal_merged_models_token_for_token(setup):
    """More requests than slots, ragged lengths (slots free and move mid-batch), adapters x, y and none
    interleaved: every output is its merged model's greedy continuation, and the requests shared steps."""
    base, merged, dirs = setup
    eng = Engine(base, None, max_batch=4, adapters=dirs)
    names = ["x", None, "y", "x", "y", None, "x", "y"]
    prompts = [list(range(8 + 3 * i, 8 + 3 * i + 2 + i)) for i in range(8)]
    lengths = [3, 12, 5, 9, 2, 7, 10, 6]
    reqs = eng.run(prompts, SamplingParams(max_tokens=12, temperature=0), adapters=names)
    want = [greedy(merged[a], p, 12) for a, p in zip(names, prompts)]
    assert [r.output_ids for r in reqs] == want
    assert [r.adapter for r in reqs] == names
    assert want[0] != greedy(base, prompts[0], 12) and want[2] != greedy(base, prompts[2], 12)
    # and with ragged lengths through the loop thread, prompts prefilled 3 tokens a step (slots swap)
    eng = Engine(base, None, max_batch=4, adapters=dirs, prefill_chunk=3).start()
    reqs = [eng.submit(p, SamplingParams(max_tokens=n, temperature=0), adapter=a)
            for p, n, a in zip(prompts, lengths, names)]
    for r in reqs:
        assert r.done.wait(60)
    eng.shutdown()
    assert [r.output_ids for r in reqs] == [w[:n] for w, n in zip(want, lengths)]
    assert eng.steps < sum(lengths)


def test_prefix_cache_never_shares_kv_between_adapters(setup):
    """One 40-token prompt on x, then none, then y, then x again: only the repeat on x reuses cached KV,
    and every output is its own merged model's."""
    base, merged, dirs = setup
    eng = Engine(base, None, max_batch=2, adapters=dirs)
    prompt = list(range(10, 50))
    names = ["x", None, "y", "x"]
    reqs = [eng.run([prompt], SamplingParams(max_tokens=6, temperature=0), adapters=a)[0] for a in names]
    assert [r.cached_tokens for r in reqs] == [0, 0, 0, 32]
    assert [r.output_ids for r in reqs] == [greedy(merged[a], prompt, 6) for a in names]


class WithDelta(nn.Module):
    """base(x) + the adapter's delta, computed by the module itself: the reference for quantized bases."""

    def __init__(self, base, a, b, scale):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x):
        return self.base(x) + (x @ self.a.T) @ self.b.T * self.scale


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_base_adds_deltas_on_the_float_side(setup, scheme):
    base, _, dirs = setup
    quantize_(base, scheme)
    refs = {None: base}
    for name, rank, alpha in (("x", 4, 8.0), ("y", 2, 3.0)):
        from safetensors.torch import load_file
        state = load_file(dirs[name] / "adapter.safetensors")
        ref = copy.deepcopy(base)
        for key in state:
            if key.endswith("lora_A"):
                module = key.removesuffix(".lora_A")
                parent, child = module.rsplit(".", 1)
                setattr(ref.get_submodule(parent), child, WithDelta(ref.get_submodule(module), state[key],
                                                                   state[module + ".lora_B"], alpha / rank))
        refs[name] = ref
    runner = Runner(base, slots=3)
    assert runner.qkv[0] is None   # quantized projections are not fused
    names = ["y", "x", None]
    runner.slot_adapter[:] = [None if n is None else Adapter.load(dirs[n], base, n) for n in names]
    check_mixed_batch(runner, refs, names, [list(range(30, 36)), list(range(60, 64)), list(range(70, 79))], steps=3)


def test_bf16_base_runs_adapters_as_closely_as_the_merged_model_in_bf16(setup):
    """A bf16 model: each row's logits are as close to its fp32 merged model as that merged model run in bf16."""
    base, merged, dirs = setup
    names, prompts = ["x", None, "y"], [list(range(10, 19)), list(range(20, 26)), list(range(30, 37))]
    runner = Runner(copy.deepcopy(base).to(torch.bfloat16), slots=3)
    runner.slot_adapter[:] = [None if n is None else Adapter.load(dirs[n], runner.model, n) for n in names]
    for j, p in enumerate(prompts):
        runner.extend(j, p[:-1])
    got = runner.decode([p[-1] for p in prompts])                                          # (3, V)
    for j, (name, p) in enumerate(zip(names, prompts)):
        want = logits_of(merged[name], p)[-1]
        torch_err = (logits_of(copy.deepcopy(merged[name]).to(torch.bfloat16), p)[-1].float() - want).abs().max()
        assert (got[j] - want).abs().max() <= 3 * torch_err + 1e-3, name


def test_peft_adapters_match_peft(tmp_path):
    """Adapters trained by peft on a tiny HF Llama (one plain, one with rsLoRA and rank/alpha patterns),
    served on that base loaded through quark.model.hf: peft's own logits and greedy tokens."""
    pytest.importorskip("peft")
    from quark.model.hf import load_hf
    from tests.hf_helpers import make_hf_model, make_peft_adapter
    hf = make_hf_model(tmp_path / "base", "llama", tokenizer=False)
    configs = {"plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
               "patterned": dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"o_proj": 2}, alpha_pattern={
                   "gate_proj": 3}, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"])}
    peft_models = {name: make_peft_adapter(hf, tmp_path / name, seed=k, **cfg) for k, (name, cfg) in enumerate(configs.items())}
    model = load_hf(tmp_path / "base")
    eng = Engine(model, None, max_batch=3, adapters={n: tmp_path / n for n in configs})
    prompts = [[5, 9, 40, 41, 7], [100, 3, 64, 9], [12, 13, 14, 15, 16, 17]]
    names = ["plain", None, "patterned"]
    reqs = eng.run(prompts, SamplingParams(max_tokens=10, temperature=0), adapters=names)
    refs = {None: hf} | peft_models
    for p, name, r in zip(prompts, names, reqs):
        ids = list(p)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(refs[name](torch.tensor([ids])).logits[0, -1].argmax()))
        assert r.output_ids == ids[len(p):], name
    runner = Runner(load_hf(tmp_path / "base"), slots=1)
    runner.slot_adapter[0] = Adapter.load(tmp_path / "patterned", runner.model)
    with torch.no_grad():
        want = peft_models["patterned"](torch.tensor([prompts[2]])).logits[0]
    torch.testing.assert_close(runner.extend(0, prompts[2], all_logits=True), want, rtol=1e-4, atol=1e-5)


def test_quark_adapter_exported_as_peft_loads_the_same(setup, tmp_path):
    from quark.model.hf import export_peft
    from quark.model.lora import load_adapter
    base, _, dirs = setup
    export_peft(load_adapter(copy.deepcopy(base), dirs["y"]), tmp_path / "peft")
    ours, theirs = Adapter.load(dirs["y"], base), Adapter.load(tmp_path / "peft", base)
    assert ours.weights.keys() == theirs.weights.keys() and len(ours.weights) == 3 * base.config.n_layer
    for key, (a, b) in ours.weights.items():
        torch.testing.assert_close(theirs.weights[key][0], a)
        torch.testing.assert_close(theirs.weights[key][1], b)


def test_adapters_that_do_not_fit_the_base_are_refused_naming_the_tensor(setup, tmp_path):
    base, _, dirs = setup
    wider = make_model(V, seed=0, d_model=32)
    make_adapter(wider, tmp_path / "wider", ["wq"], seed=0)
    with pytest.raises(ValueError, match=r"tensor blocks\.0\.attn\.wq\.lora_A has shape \(4, 32\).*needs \(4, 64\)"):
        Adapter.load(tmp_path / "wider", base)
    deeper = make_model(V, seed=0, n_layer=3)
    make_adapter(deeper, tmp_path / "deeper", ["wv"], seed=0)
    with pytest.raises(ValueError, match=r"tensor blocks\.2\.attn\.wv\.lora_A has no place in the base model \(2 layers\)"):
        Adapter.load(tmp_path / "deeper", base)
    cfg = json.loads((dirs["x"] / "adapter_config.json").read_text())
    (dirs["x"] / "adapter_config.json").write_text(json.dumps(cfg | {"rank": 8}))
    with pytest.raises(ValueError, match=r"tensors blocks\.0\.attn\.wk\.lora_A \(4, 64\).*not a rank-8 pair"):
        Adapter.load(dirs["x"], base)
    (dirs["x"] / "adapter_config.json").write_text(json.dumps(cfg | {"targets": ["wq", "wv"]}))
    with pytest.raises(ValueError, match=r"targets \['wq', 'wv'\] but adapter.safetensors holds adapters for \['w1'"):
        Adapter.load(dirs["x"], base)
    with pytest.raises(FileNotFoundError, match="neither adapter.safetensors"):
        Adapter.load(tmp_path, base)
    eng = Engine(base, None, adapters={"y": dirs["y"]})
    with pytest.raises(ValueError, match=r"adapter 'x' is not loaded \(loaded: y\)"):
        eng.submit([1, 2, 3], adapter="x")
    for bad in ("", "a:b", "a/b"):
        with pytest.raises(ValueError, match="adapter name"):
            eng.add_adapter(bad, dirs["y"])


def test_peft_options_quark_does_not_run_are_refused(setup, tmp_path):
    from quark.model.hf import export_peft
    from quark.model.lora import load_adapter
    base, _, dirs = setup
    export_peft(load_adapter(copy.deepcopy(base), dirs["y"]), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    for change, message in (({"use_dora": True}, "use_dora=True is not supported"),
                            ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"target_modules": ["q_proj", "lm_head"]}, "target module 'lm_head' has no LoRA place"),
                            ({"target_modules": ["q_proj", "v_proj"]}, r"target_modules \['q_proj', 'v_proj'\] but"),
                            ({"r": 4}, r"lora_A.weight \(2, 64\).*not a rank-4 pair")):
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg | change))
        with pytest.raises(ValueError, match=message):
            Adapter.load(tmp_path, base)
