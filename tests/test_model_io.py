"""quark.model.io.save_model under crashes: a model directory is written as a whole, so a save killed
at any point leaves the old model, the new one, or a clear error; never the weights of one with the
config or tokenizer of the other."""
import json
import os
import subprocess
import sys

import pytest
import torch

from quark.model import GPT, GPTConfig
from quark.model.io import load_model, save_model

# Same shapes, different rope_theta: weights of one load "fine" under the config of the other.
CONFIGS = {"A": dict(rope_theta=10000.0), "B": dict(rope_theta=500000.0)}

_SAVE = """
import os, sys, torch
from quark.model import GPT, GPTConfig
from quark.model.io import save_model
directory, tokenizer, crash_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = [0]

def crashing(real):   # kill -9 stand-in at the crash_at-th rename, the commit points of a save
    def rename(*a, **k):
        calls[0] += 1
        if calls[0] == crash_at:
            os._exit(9)
        return real(*a, **k)
    return rename

os.replace, os.rename = crashing(os.replace), crashing(os.rename)
torch.manual_seed(2)
save_model(GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=32,
                         rope_theta=500000.0)), directory, tokenizer_path=tokenizer, metadata={"which": "B"})
"""


def _model(which):
    torch.manual_seed({"A": 1, "B": 2}[which])
    return GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=32,
                         **CONFIGS[which]))


def _which(directory, models):
    """-> "A" or "B" when weights, config and tokenizer all come from one save; raises otherwise."""
    m = load_model(directory)
    weights = [w for w, ref in models.items()
               if all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())]
    config = [w for w in models if m.config.rope_theta == CONFIGS[w]["rope_theta"]]
    tokenizer = json.loads((directory / "tokenizer.json").read_text())["which"]
    assert weights == config == [tokenizer], f"mixed: weights {weights}, config {config}, tokenizer {tokenizer}"
    return tokenizer


@pytest.mark.slow
def test_a_save_killed_at_any_point_leaves_old_or_new_never_a_mix(tmp_path):
    models = {w: _model(w) for w in "AB"}
    toks = {}
    for w in "AB":
        toks[w] = tmp_path / f"tok-{w}.json"
        toks[w].write_text(json.dumps({"which": w, "pad": "x" * 100_000}))
    directory = tmp_path / "run" / "final"
    outcomes = []
    for crash_at in range(1, 20):
        save_model(models["A"], directory, tokenizer_path=toks["A"])
        r = subprocess.run([sys.executable, "-c", _SAVE, str(directory), str(toks["B"]), str(crash_at)], timeout=120)
        try:
            outcomes.append(_which(directory, models))
        except FileNotFoundError as e:   # between the two renames of a replace: missing, said clearly
            assert "config.json is missing" in str(e)
            outcomes.append("missing")
        if r.returncode == 0:
            break
        assert r.returncode == 9
    assert outcomes[0] == "A" and outcomes[-1] == "B"
    assert sorted(os.listdir(directory.parent)) == ["final"]   # leftovers of the killed saves are gone
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_save_keeps_the_directory_tokenizer_and_drops_stale_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.json").write_text('{"which": "A"}')
    (d / "quant.json").write_text("{}")   # from an older quantized model: must not outlive the new save
    save_model(_model("A"), d)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (d / "tokenizer.json").read_text() == '{"which": "A"}' and _which(d, {"A": _model("A")}) == "A"
    with pytest.raises(FileNotFoundError):
        save_model(_model("A"), d, tokenizer_path=tmp_path / "missing.json")
    assert _which(d, {"A": _model("A")}) == "A"   # a failed save leaves the old directory
    assert os.listdir(tmp_path) == ["m"]           # and no temporary one


def test_weight_files_cover_hf_shards(tmp_path):
    from quark.model.io import weight_files
    from tests.hf_helpers import make_hf_model
    model = make_hf_model(tmp_path / "one", tokenizer=False)
    assert weight_files(tmp_path / "one") == [tmp_path / "one" / "model.safetensors"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = weight_files(tmp_path / "sharded")
    assert len(shards) > 1 and all(p.name.startswith("model-") for p in shards)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        weight_files(tmp_path)
