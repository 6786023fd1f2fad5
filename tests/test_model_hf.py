"""Hugging Face Llama interop: export -> transformers LlamaForCausalLM gives our logits; a
transformers-made Llama imports into GPT with its logits; round trips; clear errors."""
import json

import pytest
import torch

from quark.model import GPT, preset
from quark.model.hf import export_hf, import_hf


def _model(**overrides):
    torch.manual_seed(0)
    model = GPT(preset("nano", vocab_size=300, max_seq_len=64, **overrides)).eval()
    with torch.no_grad():   # norms away from 1 so a wrong mapping of them would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip(tmp_path, tied):
    model = _model(tie_embeddings=tied)
    tok = tmp_path / "tokenizer.json"
    tok.write_text(json.dumps({"added_tokens": [{"id": 0, "content": "<|bos|>"}, {"id": 1, "content": "<|eos|>"}]}))
    out = export_hf(model, tmp_path / "hf", tokenizer_path=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is tied
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert (out / "tokenizer.json").exists()
    back = import_hf(out)
    assert back.config == model.config
    x = torch.randint(0, 300, (2, 17))
    assert torch.equal(back(x)[0], model(x)[0])


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_export_with_matching_logits(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    model = _model(tie_embeddings=tied)
    export_hf(model, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, 23))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_import_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    assert (model.config.n_layer, model.config.n_kv_head, model.config.ffn_hidden) == (2, 2, 160)
    x = torch.randint(0, 200, (2, 19))
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max() < 1e-4


def test_import_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        import_hf(tmp_path)
    out = export_hf(_model(), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        import_hf(out)
    (out / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="only 'llama'"):
        import_hf(out)
    (out / "config.json").write_text(json.dumps(config))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        import_hf(out)
