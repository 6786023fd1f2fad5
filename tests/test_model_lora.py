import pytest
import torch

from quark.model.io import load_model, save_model
from quark.model.lora import (LoRAConfig, LoRALinear, apply_lora, load_adapter, lora_modules, merge_lora, save_adapter,
                              strip_lora, unmerge_lora)
from tests.tiny_lm import one_thread, tiny_model  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

V = 97


def batch(seed=0, B=2, T=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def train(model, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = batch()
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_lora_trains_only_adapter_params_and_starts_equal_to_base():
    model = tiny_model(V)
    x, _ = batch()
    ref = model(x)[0].detach()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["wq", "wv", "w2"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(lora_modules(model)) == 3 * model.config.n_layer
    assert torch.equal(model(x)[0], ref)   # B = 0: the adapted model starts as its base
    losses = train(model)
    assert losses[-1] < losses[0]
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], base[k]) for k in base)   # frozen weights did not move
    assert any(float(m.lora_B.detach().abs().sum()) > 0 for m in lora_modules(model).values())


def test_merge_unmerge_exact_and_strip():
    model = apply_lora(tiny_model(V), LoRAConfig(rank=4, alpha=16, targets=["wq", "wk", "wv", "wo", "w1", "w3"]))
    train(model)
    x, _ = batch(1)
    out = model(x)[0].detach()
    w0 = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    merge_lora(model)
    assert all(m.merged for m in lora_modules(model).values())
    torch.testing.assert_close(model(x)[0], out, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    assert all(torch.equal(m.base.weight, w0[n]) for n, m in lora_modules(model).items())   # bit for bit
    strip_lora(model)
    assert not lora_modules(model)
    torch.testing.assert_close(model(x)[0], out, atol=1e-5, rtol=1e-5)


def test_adapter_saved_alone_and_loaded_onto_base(tmp_path):
    base_dir = save_model(tiny_model(V, seed=3), tmp_path / "base")
    model = apply_lora(load_model(base_dir), LoRAConfig(rank=2, alpha=4))
    train(model)
    x, _ = batch(2)
    out = model(x)[0].detach()
    save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert saved and all("lora_" in k for k in saved)   # adapters only, no base weights
    fresh = load_adapter(load_model(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(fresh(x)[0], out)


def test_adapter_errors(tmp_path):
    model = apply_lora(tiny_model(V), LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(tiny_model(V), tmp_path)
    wide = tiny_model(V, d_model=128)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(wide, tmp_path / "a")
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupted"):
        load_adapter(tiny_model(V), tmp_path / "a")
    with pytest.raises(ValueError, match="targets"):
        LoRAConfig(targets=["lm_head"])
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(tiny_model(V), tmp_path / "b")


def test_lora_dropout_only_in_training():
    lin = torch.nn.Linear(8, 8)
    m = LoRALinear(lin, rank=2, alpha=2, dropout=0.5)
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(4, 8)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))
