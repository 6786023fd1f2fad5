"""Hugging Face directories in and out: every architecture and option gives transformers' logits and
greedy tokens; sharded and bf16 checkpoints; bad directories give named errors; exports load in
transformers (HF) and peft (PEFT adapters) with equal logits."""
import json

import pytest
import torch

from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams
from quark.model import GPT, preset
from quark.model.hf import export_hf, export_peft, load_hf
from quark.model.io import load_model, save_model
from tests.hf_helpers import VOCAB, make_hf_model

transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {   # name -> (model_type, config overrides); SmolLM2 and TinyLlama are Llama shapes
    "llama": ("llama", {}),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "smollm2-tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "tinyllama-gqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=1, rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0})),
    "rope-llama3": ("llama", dict(rope_parameters=LLAMA3)),
    "rope-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    # the 40-token inputs below run past max_position_embeddings, where dynamic scaling acts
    "rope-dynamic": ("llama", dict(max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})),
    "mistral-window": ("mistral", dict(sliding_window=6)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-bias": ("qwen3", dict(attention_bias=True, tie_word_embeddings=True)),
}


def _rel(ours, theirs):
    ours, theirs = ours.detach().float(), theirs.detach().float()
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    return request.param, make_hf_model(d, kind, tokenizer=False, **overrides), d


def test_logits_equal_transformers(case):
    name, hf, d = case
    model = load_model(d)   # the one loader dispatches on the directory
    assert isinstance(model, GPT) and model.tok_emb.weight.dtype == torch.float32
    x = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert _rel(model(x)[0], hf(x).logits) < 1e-4


def test_greedy_32_tokens_equal_transformers(case):
    name, hf, d = case
    model = load_hf(d)
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    (req,) = Engine(model, None, max_batch=1, stop_ids=()).run(
        [prompt[0].tolist()], SamplingParams(max_tokens=32, temperature=0.0))
    ours = prompt[0].tolist() + req.output_ids
    theirs = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert ours == theirs[0].tolist()


def test_options_matter(tmp_path):
    """The window and the rope scaling change the logits here, so the equalities above test them."""
    x = torch.randint(0, VOCAB, (1, 40))
    make_hf_model(tmp_path / "plain", "llama", tokenizer=False)
    make_hf_model(tmp_path / "dyn", "llama", tokenizer=False, **CASES["rope-dynamic"][1])
    make_hf_model(tmp_path / "mistral", "mistral", tokenizer=False, sliding_window=None)
    make_hf_model(tmp_path / "window", "mistral", tokenizer=False, sliding_window=6)
    with torch.no_grad():
        for a, b in (("plain", "dyn"), ("mistral", "window")):
            assert _rel(load_hf(tmp_path / a)(x)[0], load_hf(tmp_path / b)(x)[0]) > 1e-2


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model(tmp_path, "qwen2", tokenizer=False)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    x = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        assert _rel(load_model(tmp_path)(x)[0], hf(x).logits) < 1e-4


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    hf = make_hf_model(tmp_path, "llama", dtype=torch.bfloat16, tokenizer=False)
    model = load_model(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
        exact = load_model(tmp_path, dtype=torch.float32)(x)[0]   # the same weights upcast
    assert _rel(load_model(tmp_path, dtype=torch.float32).tok_emb.weight, hf.model.embed_tokens.weight) == 0
    # bf16 against the fp32 computation: no worse than transformers' own bf16 forward
    assert _rel(ours, exact) <= 2 * _rel(theirs, exact) + 1e-3


def test_load_takes_the_device(tmp_path):
    """Weights and rotary tables go where `device` says (meta here: any device but the default CPU);
    nothing in the loader pins them to the CPU."""
    make_hf_model(tmp_path, "qwen2", tokenizer=False)
    model = load_model(tmp_path, device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and {t.device.type for t in tensors} == {"meta"}


def _config(d):
    return json.loads((d / "config.json").read_text())


def test_bad_directories_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_hf(tmp_path)
    d = tmp_path / "m"
    hf = make_hf_model(d, "llama", tokenizer=False)
    good = _config(d)
    for change, message in (({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
                            ({"hidden_act": "gelu"}, "hidden_act='gelu' is not implemented"),
                            ({"quantization_config": {"bits": 4}}, "field 'quantization_config' is not implemented"),
                            ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
                             "rope_scaling type 'yarn' is not implemented"),
                            ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                                                  "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
                            ({"intermediate_size": 80},
                             r"mlp.down_proj.weight has shape \(64, 96\), config.json implies \(64, 80\)")):
        (d / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=message):
            load_model(d)
    qwen2 = {k: v for k, v in good.items() if k not in ("attention_bias", "mlp_bias")}
    (d / "config.json").write_text(json.dumps({**qwen2, "model_type": "qwen2", "use_sliding_window": True}))
    with pytest.raises(ValueError, match="use_sliding_window=True is not implemented"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({**good, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"tensor model.layers.2.\S+ is missing"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({**good, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="model.layers.1.input_layernorm.weight has no place"):
        load_model(d)
    (d / "config.json").write_text(json.dumps(good))
    hf.save_pretrained(d, max_shard_size="40KB")
    (d / "model.safetensors").unlink(missing_ok=True)
    shard = sorted(d.glob("model-0000*.safetensors"))[1]
    shard.rename(d / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=f"{shard.name} is missing \\(listed in model.safetensors.index.json"):
        load_model(d)
    (d / "moved.safetensors").write_bytes(b"\x00" * 10)
    (d / "moved.safetensors").rename(shard)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_model(d)
    for p in d.glob("*.safetensors*"):
        p.unlink()
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin is a pickle, which Quark never loads"):
        load_model(d)


def test_quark_model_trained_from_hf_saves_and_reloads(tmp_path):
    """A model loaded from an HF directory and saved by a step (save_model) reloads with the same
    logits and keeps the checkpoint's tokenizer files (chat template, eos ids)."""
    make_hf_model(tmp_path / "hf", "qwen3")
    model = load_model(tmp_path / "hf")
    save_model(model, tmp_path / "sft", tokenizer_path=tmp_path / "hf" / "tokenizer.json")
    assert (tmp_path / "sft" / "tokenizer_config.json").exists() and (tmp_path / "sft" / "generation_config.json").exists()
    x = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "sft")(x)[0], model(x)[0])


# ---- out ------------------------------------------------------------------------------------------

def _quark_model(**overrides):
    torch.manual_seed(0)
    model = GPT(preset("nano", vocab_size=300, max_seq_len=64, **overrides)).eval()
    with torch.no_grad():   # norms away from 1 so a wrong mapping of them would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trip_and_transformers_logits(tmp_path, tied):
    model = _quark_model(tie_embeddings=tied)
    tok = tmp_path / "tokenizer.json"
    tok.write_text(json.dumps({"added_tokens": [{"id": 0, "content": "<|bos|>"}, {"id": 1, "content": "<|eos|>"},
                                                {"id": 7, "content": "<|end|>"}]}))
    out = export_hf(model, tmp_path / "hf", tokenizer_path=tok)
    config = _config(out)
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is tied
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [7, 1]
    back = load_model(out)
    x = torch.randint(0, 300, (2, 23))
    assert torch.equal(back(x)[0], model(x)[0])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert _rel(model(x)[0], hf(x).logits) < 1e-4


@pytest.mark.parametrize("name", ["llama-bias", "rope-llama3", "rope-dynamic", "mistral-window", "qwen2", "qwen3-bias"])
def test_hf_options_survive_export(tmp_path, name):
    kind, overrides = CASES[name]
    hf = make_hf_model(tmp_path / "in", kind, tokenizer=False, **overrides)
    out = export_hf(load_hf(tmp_path / "in"), tmp_path / "out", max_shard_bytes=60_000)
    assert _config(out)["model_type"] == kind and (out / "model.safetensors.index.json").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert _rel(again(x).logits, hf(x).logits) < 1e-5


def test_export_of_lora_and_quantized_models(tmp_path):
    from quark.model.lora import LoRAConfig, apply_lora
    from quark.optimize.quantize import quantize_model
    model = _quark_model()
    apply_lora(model, LoRAConfig(rank=4, targets=["wq", "w2"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    x = torch.randint(0, 300, (2, 15))
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "lora"), dtype=torch.float32)
    with torch.no_grad():
        assert _rel(model(x)[0], hf(x).logits) < 1e-4
    q = _quark_model()
    quantize_model(q, "int4", 32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(q, tmp_path / "q"), dtype=torch.float32)
    with torch.no_grad():
        assert _rel(q(x)[0], hf(x).logits) < 1e-4


def test_lora_peft_export_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from quark.model.lora import LoRAConfig, apply_lora
    make_hf_model(tmp_path / "base", "qwen2", tokenizer=False)
    model = apply_lora(load_hf(tmp_path / "base"), LoRAConfig(rank=4, alpha=8.0, targets=["wq", "wv", "w1"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    export_peft(model, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    x = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        plain = base(x).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()(x).logits
        ours = model(x)[0]
    assert _rel(adapted, plain) > 1e-3   # the adapters change the logits ...
    assert _rel(ours, adapted) < 1e-4    # ... the same way in both
