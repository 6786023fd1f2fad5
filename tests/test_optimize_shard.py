"""quark.optimize.shard: the `quark shard` command (reshard a model directory; argument errors)."""
import torch

from quark.cli import main as cli_main
from quark.model import GPT, preset
from quark.model.io import save_model
from quark.model.shard import INDEX_NAME


def test_cli(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(GPT(preset("nano", vocab_size=256, max_seq_len=64)), tmp_path / "m")
    assert cli_main(["shard", str(tmp_path / "m"), "--out", str(tmp_path / "s"), "--num-shards", "2"]) == 0
    assert "wrote 2 file(s)" in capsys.readouterr().out
    assert (tmp_path / "s" / INDEX_NAME).exists()
    assert cli_main(["shard", str(tmp_path / "m")]) == 2
    assert cli_main(["shard", str(tmp_path / "m"), "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["shard", str(tmp_path / "nothing"), "--out", str(tmp_path / "y"), "--num-shards", "1"]) == 2
    assert "error:" in capsys.readouterr().out
