"""The CLI commands of the fine-tuning and alignment steps."""
import json

import pytest

from quark.cli import main
from tests.tiny_lm import make_run, one_thread  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_instruct_and_sft_commands(tmp_path, capsys):
    run, _ = make_run(tmp_path)
    assert main(["instruct", "--run-dir", str(run), "--set", "max_examples=30"]) == 0
    assert (run / "instruct" / "train.jsonl").exists()
    assert main(["sft", "--run-dir", str(run), "--set", "steps=2", "--set", "method=lora"]) == 0
    out = capsys.readouterr().out
    assert '"method": "lora"' in out
    assert main(["dpo", "--run-dir", str(run), "--set", "stepz=2"]) == 2
    assert "unknown key 'stepz'" in capsys.readouterr().out
    cfg = tmp_path / "reward.yaml"
    cfg.write_text("steps: 2\nmax_pairs: 20\n")
    assert main(["reward", "--run-dir", str(run), "--config", str(cfg)]) == 0
    assert json.loads((run / "reward" / "metrics.json").read_text())["settings"]["steps"] == 2
    assert main(["redteam", "--run-dir", str(tmp_path / "missing")]) == 1
    assert "holds no trained model" in capsys.readouterr().out
