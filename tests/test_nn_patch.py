"""quark.patch / quark.quantize_ on transformers models: the same logits and greedy tokens with Quark's
attention (prefill and cached decode) and linear kernels inside; quantized layers compute what their
dequantized weights compute; generate() keeps working; `import quark` does not import transformers."""
import subprocess
import sys

import pytest
import torch

import quark
from quark.nn import QuantLinear
from quark.nn import patch as patch_module
from tests.hf_helpers import VOCAB, make_hf_model

transformers = pytest.importorskip("transformers")


def _generate(model, prompt, n=24):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)


@pytest.fixture
def calls(monkeypatch):
    """Counts of the Quark kernels the patched attention reaches (the real kernels run)."""
    counts = {"attention": 0, "decode_attention": 0}
    for name in counts:
        real = getattr(patch_module.ops, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(patch_module.ops, name, counted)
    return counts


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("mistral", dict(sliding_window=12)), ("qwen2", {}),
                                            ("qwen3", {})])
def test_patched_logits_and_generate(tmp_path, calls, kind, overrides):
    hf = make_hf_model(tmp_path, kind, tokenizer=False, **overrides)
    x = torch.randint(0, VOCAB, (2, 8))
    prompt = x[:1, :6]
    with torch.no_grad():
        ref = hf(x).logits
    ref_tokens = _generate(hf, prompt)
    assert quark.patch(hf) is hf and hf.config._attn_implementation == "quark"
    with torch.no_grad():
        out = hf(x).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    assert calls["attention"] >= hf.config.num_hidden_layers
    assert _generate(hf, prompt).tolist() == ref_tokens.tolist()
    assert calls["decode_attention"] > 0   # (Mistral's decode past its window takes transformers' SDPA path)


def test_patched_bf16_model_runs_the_bf16_gemv(tmp_path, monkeypatch):
    """A bf16 model's projections at decode-sized rows go to the bf16 GEMV, and its logits are no
    further from the fp32 computation on the same weights than transformers' own bf16 forward."""
    import copy
    import importlib
    linear_module = importlib.import_module("quark.ops.linear")   # (quark.ops.linear is also the function)
    hf = make_hf_model(tmp_path, "llama", tokenizer=False, dtype=torch.bfloat16)
    exact = copy.deepcopy(hf).float()
    x = torch.randint(0, VOCAB, (2, 7))                        # 14 rows: within the GEMV's MAX_ROWS
    with torch.no_grad():
        ref, stock = exact(x).logits, hf(x).logits.float()
    ref_tokens = _generate(hf, x[:1, :5], 16)
    gemv = {"calls": 0}
    real = linear_module._KERNELS[torch.bfloat16]

    def counted(*args):
        gemv["calls"] += 1
        return real(*args)
    monkeypatch.setitem(linear_module._KERNELS, torch.bfloat16, counted)
    quark.patch(hf)
    with torch.no_grad():
        ours = hf(x).logits.float()
    assert gemv["calls"] == 7 * hf.config.num_hidden_layers + 1   # every projection and the head
    err, theirs = float((ours - ref).abs().max()), float((stock - ref).abs().max())
    assert 0 < err <= 1.5 * theirs, (err, theirs)
    tokens = _generate(hf, x[:1, :5], 16)
    assert tokens.shape == ref_tokens.shape and gemv["calls"] > 8 * hf.config.num_hidden_layers


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_quantize_then_generate(tmp_path, scheme):
    hf = quark.patch(make_hf_model(tmp_path, "llama", tokenizer=False))
    reference = make_hf_model(tmp_path / "ref", "llama", tokenizer=False)   # same seed, same weights
    names = quark.quantize_(hf, scheme=scheme, group_size=32)
    assert "lm_head" not in names and len(names) == 7 * hf.config.num_hidden_layers
    with torch.no_grad():   # the float model with each layer's dequantized weights computes the same
        for name in names:
            q = hf.get_submodule(name)
            assert isinstance(q, QuantLinear) and q.scheme == scheme
            reference.get_submodule(name).weight.copy_(q.qweight.dequantize())
    x = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        ours, theirs = hf(x).logits, reference(x).logits
    tol = 5e-2 if scheme == "w8a8" else 1e-4   # w8a8 also rounds the activations to int8
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < tol
    tokens = _generate(hf, x[:1, :5], 16)
    assert tokens.shape == (1, 21) and tokens[0, :5].tolist() == x[0, :5].tolist()


def test_errors_and_lazy_import():
    with pytest.raises(TypeError, match="expects a transformers llama, mistral, qwen2, qwen3 model"):
        quark.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="scheme must be one of"):
        quark.quantize_(torch.nn.Sequential(torch.nn.Linear(32, 4)), scheme="int3")
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        quark.quantize_(torch.nn.Sequential(torch.nn.ReLU()))
    code = "import sys, quark; assert quark.patch and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
