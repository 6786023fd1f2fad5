"""quark.model.shard: tensor-parallel GPT over 2 gloo processes, HF-style sharded checkpoints,
resharding between world sizes, per-rank slice loading."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from quark.model import GPT, preset
from quark.model.hf import to_hf_name
from quark.model.io import load_model, save_model
from quark.model.shard import (INDEX_NAME, CheckpointReader, check_tp, load_tp_model, plan_files, reshard,
                               save_sharded, save_tp_model, shard_state, split_dim)
from quark.train.distributed import init_distributed, spawn


def tiny_model(seed=0):
    torch.manual_seed(seed)
    # n_head 4 / n_kv_head 2: each of 2 ranks keeps 2 query heads on 1 KV head (GQA stays rank-local)
    return GPT(preset("nano", vocab_size=256, max_seq_len=64)).eval()


def _tp_worker(one_file_dir, out_dir):
    """Every check that needs a process group, in one spawn (starting processes is the slow part)."""
    env = init_distributed(torch.device("cpu"))
    r, W = env.rank, env.world_size
    ref = load_model(one_file_dir)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]

    # 1. forward and loss equal the unsharded model; each rank read about half the checkpoint
    tp, nbytes = load_tp_model(one_file_dir, r, W)
    total = sum(t.numel() * t.element_size() for t in ref.state_dict().values()) - ref.lm_head.weight.numel() * 4
    norms = sum(p.numel() * 4 for n, p in ref.named_parameters() if split_dim(n) is None)
    assert nbytes == (total - norms) // W + norms
    logits, loss = tp(x, y)
    ref_logits, ref_loss = ref(x, y)
    torch.testing.assert_close(tp.gather_logits(logits.detach()), ref_logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    # vocab-parallel cross-entropy with ignored targets, against the gathered logits
    y_ign = y.clone()
    y_ign[0, :5] = -100
    _, loss_ign = tp(x, y_ign)
    torch.testing.assert_close(loss_ign, F.cross_entropy(ref_logits.reshape(-1, 256), y_ign.reshape(-1)),
                               rtol=1e-5, atol=1e-6)

    # 2. backward: each rank's gradients are its slices of the unsharded gradients
    ref.zero_grad()
    ref_loss.backward()
    loss.backward()
    ref_grads = shard_state({n: p.grad for n, p in ref.named_parameters()}, r, W)
    for name, p in tp.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # 3. save from world size 2 into 3 HF-style files, then load that at world size 2 again
    save_tp_model(tp, out_dir, num_shards=3)
    tp2, _ = load_tp_model(out_dir, r, W)
    with torch.no_grad():
        torch.testing.assert_close(tp2(x)[0], logits.detach())


@pytest.mark.slow
def test_tensor_parallel_two_gloo_processes(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "one")
    spawn(_tp_worker, 2, str(tmp_path / "one"), str(tmp_path / "tp2"), threads=1)
    # resharding 2 -> 1: the checkpoint written by 2 ranks loads as a plain model
    index = json.loads((tmp_path / "tp2" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == 3 and index["metadata"]["saved_world_size"] == 2
    back = load_model(tmp_path / "tp2")
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


def test_split_layout_and_divisibility():
    assert [split_dim(n) for n in ("blocks.0.attn.wq.weight", "blocks.3.mlp.w3.weight", "blocks.1.attn.wo.weight",
                                   "blocks.0.mlp.w2.weight", "tok_emb.weight", "lm_head.weight",
                                   "blocks.0.attn_norm.weight", "norm.weight")] == [0, 0, 1, 1, 0, 0, None, None]
    check_tp(preset("nano"), 2)
    with pytest.raises(ValueError, match="n_kv_head"):
        check_tp(preset("nano"), 4)
    with pytest.raises(ValueError, match="vocab_size"):
        check_tp(preset("nano", vocab_size=255, n_kv_head=4), 2)


def test_plan_files():
    sizes = [(str(i), b) for i, b in enumerate([10, 10, 10, 10, 50, 10])]
    assert plan_files(sizes, num_shards=1) == [0] * 6
    assert plan_files(sizes, num_shards=3) == [0, 0, 0, 1, 1, 2]
    assert plan_files(sizes, max_shard_bytes=25) == [0, 0, 1, 1, 2, 3]
    assert plan_files(sizes[:2], num_shards=5) == [0, 1]           # never empty files
    with pytest.raises(ValueError, match="num_shards"):
        plan_files(sizes, num_shards=0)


def test_sharded_checkpoint_hf_layout_reshard_and_slices(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "one", metadata={"step": 1})
    (tmp_path / "one" / "tokenizer.json").write_text("{}")
    reshard(tmp_path / "one", tmp_path / "four", num_shards=4)
    files = sorted(p.name for p in (tmp_path / "four").glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "four" / INDEX_NAME).read_text())
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}   # tied: stored once
    assert set(index["weight_map"]) == {to_hf_name(k) for k in state} and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    with safe_open(str(tmp_path / "four" / files[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert (tmp_path / "four" / "tokenizer.json").exists()
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "four")(idx)[0], model(idx)[0])
    transformers = pytest.importorskip("transformers")   # a valid HF directory: transformers loads it as is
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "four", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max() < 1e-4
    # back to one file: a plain model directory, no index left behind
    reshard(tmp_path / "four", tmp_path / "four", num_shards=1)
    assert not (tmp_path / "four" / INDEX_NAME).exists() and (tmp_path / "four" / "model.safetensors").exists()
    assert not list((tmp_path / "four").glob("model-*"))
    # slices: rank 1 of 2 reads the second half of wq's rows only
    reader = CheckpointReader(tmp_path / "one")
    part = reader.read("blocks.0.attn.wq.weight", 0, 64, 128)
    assert torch.equal(part, model.blocks[0].attn.wq.weight[64:128]) and reader.bytes_read == part.numel() * 4
    cols = reader.read("blocks.1.mlp.w2.weight", 1, 0, 192)
    assert torch.equal(cols, model.blocks[1].mlp.w2.weight[:, :192])


def test_sharded_checkpoint_errors(tmp_path):
    model = tiny_model()
    save_sharded(model.state_dict(), tmp_path / "s", model.config, num_shards=3)
    (tmp_path / "s" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors is missing"):
        load_model(tmp_path / "s")
    (tmp_path / "s" / INDEX_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        load_model(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        CheckpointReader(tmp_path / "empty")
    save_model(model, tmp_path / "m")
    with pytest.raises(KeyError, match="not in the checkpoint"):
        CheckpointReader(tmp_path / "m").read("nope")
